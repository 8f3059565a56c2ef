"""Batched datagram I/O over real loopback sockets, for both implementations.

Every behaviour is checked on the compiled Linux implementation and on the
portable fallback, and the cross tests (one implementation sends, the other
receives) hold them to identical results.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import socket
import struct
import sys
import time

import pytest
from conftest import BUILD_HINT, missing_extension
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rudp import udp

IMPLEMENTATIONS = ["native", "python"]


def _require(impl: str) -> bool:
    if impl == "native" and not udp.native_available():
        missing_extension(f"rudp._udp (batched socket I/O) is not importable; {BUILD_HINT}")
    return impl == "native"


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request: pytest.FixtureRequest) -> str:
    _require(request.param)
    return request.param


@pytest.fixture
def sockets():
    """Factory for bound loopback UDP sockets, closed after the test."""
    made: list[socket.socket] = []

    def make(family: int = socket.AF_INET) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        made.append(sock)
        sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        return sock

    yield make
    for sock in made:
        sock.close()


def wrap(sock: socket.socket, impl: str, **kwargs) -> udp.DatagramIO:
    udp.configure(sock, native=_require(impl), **kwargs)
    return udp.datagram_io(sock)


def drain(io: udp.DatagramIO, count: int, timeout: float = 5.0) -> list[tuple[bytes, udp.Address]]:
    """Receive until ``count`` datagrams arrived (waiting for readiness, not sleeping)."""
    out: list[tuple[bytes, udp.Address]] = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select([io.sock], [], [], remaining)
        if ready:
            out.extend(io.recv_batch())
    return out


def payloads(sizes: list[int], seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(n) for n in sizes]


def test_configure_reports_capabilities(impl, sockets):
    sock = sockets()
    caps = udp.configure(sock, native=_require(impl))
    io = udp.datagram_io(sock)
    assert io.capabilities == caps
    assert caps.native is (impl == "native")
    assert caps.mmsg is (impl == "native")
    if sys.platform.startswith("linux"):
        assert caps.gso and caps.gro  # loopback on Linux >= 5.0 has both
    if os.geteuid() == 0:  # SO_*BUFFORCE passes net.core.[rw]mem_max
        assert caps.rcvbuf >= 1024 * 1024 and caps.sndbuf >= 1024 * 1024
    assert io.sock.getblocking() is False


def test_configure_can_switch_offloads_off(impl, sockets):
    caps = wrap(sockets(), impl, gso=False, gro=False).capabilities
    assert not caps.gso and not caps.gro


@pytest.mark.parametrize(
    ("field", "value"), [("max_datagrams", 0), ("max_datagrams", 1025), ("buffer_size", 10)]
)
def test_configure_rejects_bad_values(sockets, field, value):
    with pytest.raises(ValueError, match=field):
        udp.configure(sockets(), **{field: value})


def test_configure_rejects_stream_sockets():
    with socket.socket() as tcp, pytest.raises(ValueError, match="SOCK_DGRAM"):
        udp.configure(tcp)


def test_module_functions_use_the_configured_socket(impl, sockets):
    a_sock, b_sock = sockets(), sockets()
    with pytest.raises(ValueError, match="configure"):
        udp.recv_batch(a_sock)
    udp.configure(a_sock, native=_require(impl))
    udp.configure(b_sock, native=_require(impl))
    data = payloads([1000] * 5 + [10])
    assert udp.send_batch(a_sock, data, b_sock.getsockname()) == 6
    assert udp.send_many(a_sock, [(b"x", b_sock.getsockname())]) == 1
    select.select([b_sock], [], [], 5)
    got = udp.recv_batch(b_sock)
    assert [d for d, _ in got] == [*data, b"x"]
    assert udp.datagram_io(a_sock).stats()["send_datagrams"] == 7


def test_recv_on_empty_socket_returns_nothing(impl, sockets):
    io = wrap(sockets(), impl)
    assert io.recv_batch() == []
    with pytest.raises(ValueError, match="max_datagrams"):
        io.recv_batch(0)


@pytest.mark.parametrize("sender", IMPLEMENTATIONS)
@pytest.mark.parametrize("receiver", IMPLEMENTATIONS)
def test_batches_both_directions(sender, receiver, sockets):
    a_sock, b_sock = sockets(), sockets()
    a, b = wrap(a_sock, sender), wrap(b_sock, receiver)
    forth = payloads([1400] * 150 + [100, 0, 9000, 1400, 1400, 37] * 5, seed=2)
    back = payloads([64] * 40 + [1200, 1300] * 20, seed=3)
    assert a.send_batch(forth, b_sock.getsockname()) == len(forth)
    got = drain(b, len(forth))
    assert [d for d, _ in got] == forth
    assert {addr for _, addr in got} == {a_sock.getsockname()}
    assert b.send_batch(back, got[0][1]) == len(back)
    got_back = drain(a, len(back))
    assert [d for d, _ in got_back] == back
    assert {addr for _, addr in got_back} == {b_sock.getsockname()}


def test_gso_run_reaches_a_plain_receiver_exactly(impl, sockets):
    """GSO output is checked by a receiver that shares no code with ours."""
    s_sock, r_sock = sockets(), sockets()
    sender = wrap(s_sock, impl)
    r_sock.settimeout(5)
    data = payloads([1000] * 20 + [333] + [1000] * 3, seed=4)
    assert sender.send_batch(data, r_sock.getsockname()) == len(data)
    assert [r_sock.recv(65536) for _ in data] == data
    stats = sender.stats()
    # 20 x 1000 + the shorter 333 share one buffer; the last three another.
    assert stats["send_datagrams"] == 24
    assert stats["send_messages"] == 2


def test_gro_buffer_split_at_exact_boundaries(impl, sockets):
    """A GSO buffer built by hand (not by our sender) is split back exactly."""
    s_sock, r_sock = sockets(), sockets()
    receiver = wrap(r_sock, impl)
    segment, count, tail = 1200, 30, 77
    blob = random.Random(5).randbytes(segment * count + tail)
    s_sock.sendmsg(
        [blob], [(udp.SOL_UDP, udp.UDP_SEGMENT, struct.pack("=H", segment))], 0,
        r_sock.getsockname(),
    )  # fmt: skip
    got = drain(receiver, count + 1)
    expected = [blob[i : i + segment] for i in range(0, len(blob), segment)]
    assert [d for d, _ in got] == expected
    assert [len(d) for d, _ in got][-2:] == [segment, tail]
    stats = receiver.stats()
    assert stats["recv_datagrams"] == count + 1
    assert stats["recv_messages"] < stats["recv_datagrams"]  # the kernel did coalesce


def test_without_gro_each_datagram_is_its_own_message(impl, sockets):
    s_sock, r_sock = sockets(), sockets()
    sender, receiver = wrap(s_sock, impl), wrap(r_sock, impl, gro=False)
    data = payloads([500] * 40)
    sender.send_batch(data, r_sock.getsockname())
    assert [d for d, _ in drain(receiver, 40)] == data
    stats = receiver.stats()
    assert stats["recv_messages"] == stats["recv_datagrams"] == 40


def test_without_gso_each_datagram_is_its_own_message(impl, sockets):
    s_sock, r_sock = sockets(), sockets()
    sender, receiver = wrap(s_sock, impl, gso=False), wrap(r_sock, impl)
    data = payloads([500] * 40)
    assert sender.send_batch(data, r_sock.getsockname()) == 40
    assert [d for d, _ in drain(receiver, 40)] == data
    assert sender.stats()["send_messages"] == 40


def test_gso_limits_split_long_runs(impl, sockets):
    """No GSO buffer exceeds 64 segments or 65507 bytes."""
    s_sock, r_sock = sockets(), sockets()
    sender, receiver = wrap(s_sock, impl), wrap(r_sock, impl)
    data = payloads([100] * 130 + [30000] * 5)
    assert sender.send_batch(data, r_sock.getsockname()) == len(data)
    assert [d for d, _ in drain(receiver, len(data))] == data
    # 130 small: 64 + 64 + 2; 5 large: 2 + 2 + 1
    assert sender.stats()["send_messages"] == 6


def test_long_batches_span_several_system_calls(impl, sockets):
    s_sock, r_sock = sockets(), sockets()
    sender, receiver = wrap(s_sock, impl, gso=False), wrap(r_sock, impl, max_datagrams=16)
    data = payloads([200] * 700)
    assert sender.send_batch(data, r_sock.getsockname()) == 700
    first = receiver.recv_batch()
    assert len(first) == 16  # max_datagrams bounds one call
    assert [d for d, _ in first + drain(receiver, 700 - 16)] == data


def test_a_call_stops_near_the_byte_budget(impl, sockets):
    """Big batches of fresh bytes cost page faults; the rest waits for the next call."""
    s_sock, r_sock = sockets(), sockets()
    sender, receiver = wrap(s_sock, impl, gso=False), wrap(r_sock, impl, gro=False)
    data = payloads([1400] * 300)
    assert sender.send_batch(data, r_sock.getsockname()) == 300
    first = receiver.recv_batch()
    assert 0 < len(first) <= udp.RECV_BUDGET // 1400 + 1
    assert [d for d, _ in first + drain(receiver, 300 - len(first))] == data


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    sizes=st.lists(
        st.one_of(st.sampled_from([0, 1, 1400, 1400, 1400, 1472]), st.integers(0, 9000)),
        max_size=200,
    ),
    sender=st.sampled_from(IMPLEMENTATIONS),
    receiver=st.sampled_from(IMPLEMENTATIONS),
)
def test_mixed_sizes_round_trip_identically(sizes, sender, receiver, sockets):
    s_sock, r_sock = sockets(), sockets()
    s, r = wrap(s_sock, sender), wrap(r_sock, receiver)
    data = payloads(sizes, seed=len(sizes))
    assert s.send_batch(data, r_sock.getsockname()) == len(data)
    got = drain(r, len(data))
    assert [d for d, _ in got] == data
    assert r.recv_batch() == []


def test_send_many_to_several_peers(impl, sockets):
    s_sock = sockets()
    peers = [sockets() for _ in range(3)]
    sender = wrap(s_sock, impl)
    receivers = [wrap(p, "python") for p in peers]
    items = []
    expected: list[list[bytes]] = [[], [], []]
    rng = random.Random(6)
    for i in range(120):
        k = (i // 7) % 3  # runs of 7 to one peer, then the next
        data = rng.randbytes(rng.choice([1200, 1200, 1200, 50]))
        items.append((data, peers[k].getsockname()))
        expected[k].append(data)
    assert sender.send_many(items) == len(items)
    for k in range(3):
        assert [d for d, _ in drain(receivers[k], len(expected[k]))] == expected[k]
    assert sender.stats()["send_messages"] < len(items)  # same-peer runs were coalesced


def test_many_peers_get_the_right_addresses(impl, sockets):
    """More peers than the receiver's address cache has entries, interleaved."""
    r_sock = sockets()
    receiver = wrap(r_sock, impl)
    senders = [sockets() for _ in range(150)]
    for round_ in range(2):
        for i, s in enumerate(senders):
            s.sendto(f"{round_}:{i}".encode(), r_sock.getsockname())
    got = drain(receiver, 300)
    assert len(got) == 300
    for data, addr in got:
        i = int(data.split(b":")[1])
        assert addr == senders[i].getsockname()


def test_non_bytes_payloads_are_accepted(impl, sockets):
    s_sock, r_sock = sockets(), sockets()
    sender, receiver = wrap(s_sock, impl), wrap(r_sock, impl)
    data = [bytearray(b"abc"), memoryview(b"defg"), b"hij"]
    assert sender.send_batch(data, r_sock.getsockname()) == 3
    assert [d for d, _ in drain(receiver, 3)] == [b"abc", b"defg", b"hij"]


def test_host_names_are_resolved(impl, sockets):
    s_sock, r_sock = sockets(), sockets()
    sender, receiver = wrap(s_sock, impl), wrap(r_sock, impl)
    assert sender.send_batch([b"x"], ("localhost", r_sock.getsockname()[1])) == 1
    assert drain(receiver, 1)[0][0] == b"x"


def test_bad_addresses_raise(impl, sockets):
    sender = wrap(sockets(), impl)
    with pytest.raises(OverflowError):
        sender.send_batch([b"x"], ("127.0.0.1", 70000))
    with pytest.raises((TypeError, OSError)):
        sender.send_many([(b"x", "not an address")])


def test_bad_address_after_a_partial_send_is_raised_by_the_next_call(impl, sockets):
    s_sock, r_sock = sockets(), sockets()
    sender, receiver = wrap(s_sock, impl), wrap(r_sock, impl)
    good = r_sock.getsockname()
    items = [(b"%d" % i, good) for i in range(300)] + [(b"bad", ("127.0.0.1", 70000))]
    sent = sender.send_many(items)
    assert 1 <= sent < len(items)
    assert [d for d, _ in drain(receiver, sent)] == [d for d, _ in items[:sent]]
    with pytest.raises(OverflowError):
        sender.send_many(items[sent:])
    assert sender.send_many(items[sent:-1]) == len(items) - 1 - sent  # usable again


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
@pytest.mark.parametrize("sender", IMPLEMENTATIONS)
@pytest.mark.parametrize("receiver", IMPLEMENTATIONS)
def test_ipv6(sender, receiver, sockets):
    s_sock, r_sock = sockets(socket.AF_INET6), sockets(socket.AF_INET6)
    s, r = wrap(s_sock, sender), wrap(r_sock, receiver)
    data = payloads([1300] * 50 + [10, 0, 5000])
    assert s.send_batch(data, r_sock.getsockname()) == len(data)
    got = drain(r, len(data))
    assert [d for d, _ in got] == data
    assert {addr for _, addr in got} == {s_sock.getsockname()}
    assert len(got[0][1]) == 4  # (host, port, flowinfo, scope_id), as the socket module gives
    assert r.send_many([(b"back", got[0][1][:2])]) == 1  # a 2-tuple is enough
    assert drain(s, 1)[0][0] == b"back"


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_refused_surfaces_on_receive(impl):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("127.0.0.1", _closed_port()))
        io = wrap(sock, impl)
        assert io.send_batch([b"ping"]) == 1
        select.select([sock], [], [], 5)  # the ICMP error makes the socket readable
        with pytest.raises(ConnectionRefusedError):
            io.recv_batch()


def test_refused_after_partial_send_is_raised_by_the_next_call(impl):
    """Datagrams that went out are counted; the error is not lost, it comes next."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("127.0.0.1", _closed_port()))
        io = wrap(sock, impl)
        sent = io.send_batch([b"a" * 10, b"b" * 20, b"c" * 30])
        assert 1 <= sent <= 3
        select.select([sock], [], [], 5)
        with pytest.raises(ConnectionRefusedError):
            io.send_batch([b"d"])
        # The error was reported once; the socket is usable again.
        with contextlib.suppress(ConnectionRefusedError):
            io.recv_batch()


def test_gso_failure_falls_back_and_is_remembered(impl, sockets):
    """SO_NO_CHECK makes the kernel refuse GSO (EINVAL), as a device without offload would."""
    s_sock, r_sock = sockets(), sockets()
    s_sock.setsockopt(socket.SOL_SOCKET, 11, 1)  # SO_NO_CHECK
    sender, receiver = wrap(s_sock, impl), wrap(r_sock, impl)
    assert sender.capabilities.gso
    data = payloads([800] * 10 + [20, 30] + [800] * 5)
    assert sender.send_batch(data, r_sock.getsockname()) == len(data)
    assert [d for d, _ in drain(receiver, len(data))] == data
    assert not sender.capabilities.gso
    assert sender.stats()["gso_fallbacks"] == 1
    assert sender.send_batch(data, r_sock.getsockname()) == len(data)
    assert sender.stats()["gso_fallbacks"] == 1  # not retried
    assert [d for d, _ in drain(receiver, len(data))] == data


class _FullAfter:
    """A socket stand-in whose send buffer fills after ``room`` sends."""

    def __init__(self, sock: socket.socket, room: int) -> None:
        self._sock, self.room = sock, room

    def _take(self) -> None:
        if self.room == 0:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        self.room -= 1

    def sendto(self, data, addr):
        self._take()
        return self._sock.sendto(data, addr)

    def sendmsg(self, buffers, control, flags, addr):
        self._take()
        return self._sock.sendmsg(buffers, control, flags, addr)


def test_full_send_buffer_returns_the_count_sent(sockets):
    """EAGAIN mid-batch: the prefix that went out is reported, the caller keeps the rest.

    (Loopback never fills a UDP send buffer, so the fallback is driven through a
    stand-in; the native code shares the contract and the return path.)
    """
    s_sock, r_sock = sockets(), sockets()
    receiver = wrap(r_sock, "python")
    io = udp.PythonDatagramIO(_FullAfter(s_sock, 3), gso=False, gro=False)  # type: ignore[arg-type]
    data = payloads([100] * 10)
    assert io.send_batch(data, r_sock.getsockname()) == 3
    io.sock.room = 100
    assert io.send_batch(data[3:], r_sock.getsockname()) == 7
    assert [d for d, _ in drain(receiver, 10)] == data


def test_oversized_datagram_raises(impl, sockets):
    sender = wrap(sockets(), impl)
    with pytest.raises(OSError):
        sender.send_batch([b"x" * 70000], ("127.0.0.1", 9))
