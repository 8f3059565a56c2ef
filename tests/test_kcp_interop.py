"""rudp's engines and the reference C KCP (PyPI ``kcp``: Cython bindings of ikcp.c)
understand each other, both directions at once, through a seeded lossy link that
reorders and duplicates, in virtual time.

The ``kcp`` package cannot switch ikcp to stream mode, so C KCP always speaks
message mode: in the stream tests rudp (stream mode) reads C's messages as one
byte stream, and C reads each of rudp's segments as a message, which
concatenated must give the stream back. Message tests keep messages within the
C KCP's 127-fragment limit. rudp runs with and without redundant bundling
(``bundle``): the copies are ordinary PUSH segments C KCP acknowledges as duplicates.
"""

from __future__ import annotations

import random
from collections import deque

import pytest
from conftest import transfer
from test_arq_bundle import thin_stream

import netem

kcp = pytest.importorskip("kcp", reason="the reference C KCP (PyPI kcp) is not installed")

CONV = 0x5EED
LINK = netem.Profile.from_options(
    "interop", delay="20ms", jitter="10ms", loss="8%", duplicate="2%", reorder="5%"
)
# (nodelay, interval, resend, no congestion control), the same on both sides
MODES = {"fast3": (1, 10, 2, True), "normal-reno": (0, 40, 2, False)}


class CKcp:
    """The C KCP behind the engine interface ``transfer`` drives.

    ``flush`` is ``ikcp_update`` (which itself flushes only on its interval
    tick, as C KCP users run it); ``check`` asks for it again one millisecond
    after the last call, because the binding's ``ikcp_check`` wrapper is unusable.
    """

    def __init__(self, mss: int, nodelay: int, interval: int, resend: int, nc: bool) -> None:
        self.k = kcp.KCP(
            CONV,
            max_transmission=mss + 24,
            no_delay=bool(nodelay),
            update_interval=interval,
            resend_count=resend,
            no_congestion_control=nc,
            send_window_size=128,
            receive_window_size=128,
        )
        self.mss = mss
        self.out: list[bytes] = []
        self.k.include_outbound_handler(lambda _, data: self.out.append(bytes(data)))
        self.inbox: deque[bytes] = deque()
        self.next_update = 0

    @property
    def pending_bytes(self) -> int:
        return self.k.get_outbound_packets() * self.mss

    def send(self, data: bytes) -> None:
        self.k.enqueue(bytes(data))

    def input(self, datagram: bytes, now: int) -> None:
        self.k.receive(datagram)

    def flush(self, now: int) -> None:
        self.k.update(now)
        self.next_update = now + 1

    def datagrams(self) -> list[bytes]:
        out, self.out = self.out, []
        return out

    def check(self, now: int) -> int:
        return self.next_update

    def _pull(self) -> None:
        self.inbox.extend(bytes(m) for m in self.k.get_all_received())

    def recv(self) -> bytes:
        self._pull()
        data = b"".join(self.inbox)
        self.inbox.clear()
        return data

    def recv_message(self) -> bytes | None:
        self._pull()
        return self.inbox.popleft() if self.inbox else None


def rudp_engine(arq_cls, mode: str, *, stream: bool, mtu: int = 1400, bundle: int = 0):
    nodelay, interval, resend, nc = MODES[mode]
    return arq_cls(
        CONV,
        mtu=mtu,
        snd_wnd=128,
        rcv_wnd=128,
        nodelay=nodelay,
        interval=interval,
        resend=resend,
        congestion="none" if nc else "reno",
        stream=stream,
        bundle=bundle,
    )


def c_engine(mode: str, mss: int) -> CKcp:
    return CKcp(mss, *MODES[mode])


def chunks(rng: random.Random, total: int, largest: int) -> list[bytes]:
    out, n = [], 0
    while n < total:
        size = min(total - n, rng.choice([1, 7, 500, 1376, 4000, largest]))
        out.append(rng.randbytes(size))
        n += size
    return out


@pytest.mark.parametrize("bundle", [0, 2], ids=["plain", "bundle2"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rudp_sends_forward", [True, False], ids=["rudp-client", "c-client"])
def test_stream_both_ways(arq_cls, mode, rudp_sends_forward, bundle):
    rng = random.Random(f"{mode}-{rudp_sends_forward}")
    ours = rudp_engine(arq_cls, mode, stream=True, bundle=bundle)
    theirs = c_engine(mode, ours.mss)
    to_c = chunks(rng, 200_000, 30_000)
    to_rudp = chunks(rng, 200_000, 100 * ours.mss)  # C fragments each into <= 127 segments
    link = netem.VirtualLink(LINK, seed=21)
    if rudp_sends_forward:
        got_c, got_rudp, _ = transfer(ours, theirs, link, to_c, to_rudp, message=False,
                                      require_idle=False)  # fmt: skip
    else:
        got_rudp, got_c, _ = transfer(theirs, ours, link, to_rudp, to_c, message=False,
                                      require_idle=False)  # fmt: skip
    assert b"".join(got_c) == b"".join(to_c)
    assert b"".join(got_rudp) == b"".join(to_rudp)
    fwd, rev = link.stats
    assert fwd.lost and rev.lost and fwd.reordered + rev.reordered


@pytest.mark.parametrize("bundle", [0, 2], ids=["plain", "bundle2"])
@pytest.mark.parametrize("mode", MODES)
def test_messages_both_ways(arq_cls, mode, bundle):
    rng = random.Random(mode)
    ours = rudp_engine(arq_cls, mode, stream=False, mtu=600, bundle=bundle)
    theirs = c_engine(mode, ours.mss)
    sizes = [1, 100, ours.mss, ours.mss + 1, 10 * ours.mss, 127 * ours.mss]
    to_c = [rng.randbytes(rng.choice(sizes)) for _ in range(80)]
    to_rudp = [rng.randbytes(rng.choice(sizes)) for _ in range(80)]
    link = netem.VirtualLink(LINK, seed=22)
    got_c, got_rudp, _ = transfer(
        ours, theirs, link, to_c, to_rudp, message=True, require_idle=False
    )
    assert got_c == to_c
    assert got_rudp == to_rudp


@pytest.mark.parametrize("mode", MODES)
def test_thin_streams_with_bundling(arq_cls, mode):
    """A small message every 20 ms each way (a game's traffic): rudp bundles copies of
    its unacknowledged messages, C KCP delivers every message once and in order."""
    ours = rudp_engine(arq_cls, mode, stream=False, bundle=2)
    theirs = c_engine(mode, ours.mss)
    link = netem.VirtualLink(LINK, seed=23)
    to_c, to_rudp = thin_stream(ours, theirs, link, count=400, interval=20)
    assert len(to_c) == len(to_rudp) == 400
    assert ours.stats()["bundled_segs"] > 200
    fwd, rev = link.stats
    assert fwd.lost and rev.lost and fwd.reordered + rev.reordered


def test_segments_are_what_c_kcp_emits(arq_cls):
    """Same sends, same clock: rudp's first datagram is byte-identical to C KCP's
    (nodelay mode, no congestion control, so both send at the first flush)."""
    ours = rudp_engine(arq_cls, "fast3", stream=False)
    theirs = c_engine("fast3", ours.mss)
    message = bytes(range(256)) * 10
    ours.send(message)
    theirs.send(message)
    ours.flush(1000)
    theirs.flush(1000)
    assert ours.datagrams() == theirs.datagrams()
