"""Interoperability with Debian's kcptun (kcp-go 5.6 + smux 1.5), both directions, smux v1 and v2.

kcptun runs as ``--crypt none --nocomp --ds 0 --ps 0 --mode fast3``: kcp-go's
20-byte nonce + CRC32 header around plain KCP, which is rudp's ``kcp-go``
framing. The first part pins, without kcptun, the sans-I/O facts the
interoperation rests on; the rest runs the real binaries on loopback (skipped,
with the reason, where they cannot be installed):

(a) ``kcptun-client`` forwards a local TCP port to a rudp server, and a TCP
    client's bytes come back intact (a rudp stream echo, and ``rudp tunnel
    server`` in front of a TCP echo);
(b) a rudp client opens streams to ``kcptun-server``, which forwards them to a
    TCP echo server, and gets its bytes back intact (the session API, and
    ``rudp tunnel client`` in front of it);
and both again through a seeded lossy, delaying relay.

kcptun copies each forwarded connection until either direction ends, then
closes both, so every client here reads all of its echo before closing.
"""

from __future__ import annotations

import random

import pytest

from rudp import wire
from rudp.config import Configuration
from rudp.connection import Connection
from rudp.listener import Listener

KCPTUN_CLIENT = "kcptun-client"
KCPTUN_SERVER = "kcptun-server"
#: The kcptun options every test uses (and what rudp's kcp-go framing speaks).
KCPTUN_COMMON = ("--crypt", "none", "--nocomp", "--ds", "0", "--ps", "0", "--mode", "fast3")
LOCALHOST = "127.0.0.1"
#: Generous: CI shares two cores among many jobs. Nothing here asserts on time.
TIMEOUT = 120.0


def kcptun_config(smux_version: int, **changes: object) -> Configuration:
    """rudp's side of a kcptun link: kcp-go framing, kcptun's MTU, the same smux version."""
    return Configuration(
        framing="kcp-go", mode="fast3", mtu=1350, smux_version=smux_version, **changes
    )


# ---------------------------------------------------------------------------- sans-I/O facts


def kcpgo_datagram(conv: int, sn: int, data: bytes, *, wnd: int = 512) -> bytes:
    """What kcp-go sends first: one PUSH behind the ``none`` crypt header (built by hand)."""
    segment = wire.KcpSegment(conv, wire.KCP_CMD_PUSH, 0, wnd, 1000, sn, 0, data).encode()
    return wire.encode_kcpgo(segment, bytes(range(16)))


def smux_syn(version: int, sid: int) -> bytes:
    return bytes([version, wire.SMUX_SYN, 0, 0]) + sid.to_bytes(4, "little")


def segments_out(conn: Connection, now: float) -> list[wire.KcpSegment]:
    out = []
    for datagram in conn.datagrams_to_send(now):
        out.extend(wire.decode_kcp_segments(wire.decode_kcpgo(datagram)))
    return out


@pytest.mark.parametrize("conv", [0x9E3779B9, 1, 0xFFFFFFFF])
def test_listener_adopts_the_random_conv_of_a_kcpgo_client(arq_cls, conv):
    # kcp-go's Dial draws a random conv per session and its listener adopts it; so must we.
    listener = Listener(kcptun_config(2), secret=bytes(32), engine=arq_cls)
    addr = ("127.0.0.1", 40000)
    conn = listener.receive_datagram(kcpgo_datagram(conv, 0, smux_syn(2, 3)), addr, 1.0)
    assert conn is not None
    assert listener.counters["passive_opens"] == 1
    assert conn.readable == 8  # the SYN frame was delivered
    assert conn.read() == smux_syn(2, 3)
    replies = segments_out(conn, 1.0)
    assert replies, "the PUSH must be acknowledged"
    assert {s.conv for s in replies} == {conv}
    assert any(s.cmd == wire.KCP_CMD_ACK and s.sn == 0 for s in replies)
    # Later segments of that session (same conv) are accepted; a foreign conv is not.
    conn.receive_datagram(kcpgo_datagram(conv, 1, b"x"), addr, 1.01)
    assert conn.read() == b"x"
    errors = conn.stats()["in_errors"]
    conn.receive_datagram(kcpgo_datagram(conv ^ 1, 2, b"y"), addr, 1.02)
    assert conn.stats()["in_errors"] == errors + 1
    assert conn.read() == b""


def test_listener_with_a_fixed_conv_accepts_only_that_conv(arq_cls):
    listener = Listener(kcptun_config(1, conv=77), secret=bytes(32), engine=arq_cls)
    assert listener.receive_datagram(kcpgo_datagram(78, 0, b"a"), ("127.0.0.1", 1), 0.0) is None
    assert listener.counters["garbage"] == 1
    conn = listener.receive_datagram(kcpgo_datagram(77, 0, b"a"), ("127.0.0.1", 1), 0.0)
    assert conn is not None and conn.read() == b"a"


def test_listener_drops_bad_crc_and_non_kcp_first_datagrams(arq_cls):
    listener = Listener(kcptun_config(2), secret=bytes(32), engine=arq_cls)
    good = bytearray(kcpgo_datagram(5, 0, b"abc"))
    good[-1] ^= 1  # CRC no longer matches
    assert listener.receive_datagram(bytes(good), ("127.0.0.1", 2), 0.0) is None
    not_kcp = wire.encode_kcpgo(bytes(24), bytes(16))  # cmd 0
    assert listener.receive_datagram(not_kcp, ("127.0.0.1", 2), 0.0) is None
    assert listener.counters["garbage"] == 2
    assert listener.counters["passive_opens"] == 0


def test_first_ack_already_advertises_the_configured_window(arq_cls):
    """kcp-go's listener starts a session at 32 segments and kcptun enlarges it only after
    accepting it; a burst that fills the 32 before that waits for a zero-window probe (the
    7-second stalls). A rudp listener has its configured window from the first datagram."""
    listener = Listener(kcptun_config(2, rcvwnd=1024), secret=bytes(32), engine=arq_cls)
    conn = listener.receive_datagram(kcpgo_datagram(9, 0, b"z" * 1000), ("127.0.0.1", 3), 0.0)
    assert conn is not None
    acks = [s for s in segments_out(conn, 0.0) if s.cmd == wire.KCP_CMD_ACK]
    assert acks and all(s.wnd >= 1024 - 1 for s in acks)


def test_kcpgo_client_and_server_connections_talk(arq_cls):
    """A client Connection with kcptun's random-looking conv, a listener-made server: bytes
    cross both ways on a clean virtual link (the same path the real kcptun takes)."""
    client = Connection(kcptun_config(1, conv=0x1234ABCD), is_client=True, engine=arq_cls)
    listener = Listener(kcptun_config(1), secret=bytes(32), engine=arq_cls)
    caddr, saddr = ("127.0.0.1", 50000), ("127.0.0.1", 29900)
    client.connect(saddr, 0.0)
    up = random.Random(1).randbytes(200_000)
    down = random.Random(2).randbytes(150_000)
    client.send(up)
    server = None
    got_up, got_down = bytearray(), bytearray()
    now = 0.0
    for _ in range(20_000):
        for datagram in client.datagrams_to_send(now):
            if server is None:
                server = listener.receive_datagram(datagram, caddr, now)
                assert server is not None
                server.send(down)
            else:
                server.receive_datagram(datagram, caddr, now)
        if server is not None:
            for datagram in server.datagrams_to_send(now):
                client.receive_datagram(datagram, saddr, now)
            got_up += server.read()
        got_down += client.read()
        if len(got_up) == len(up) and len(got_down) == len(down):
            break
        now += 0.001
        for conn in (client, server):
            if conn is not None and (t := conn.get_timer(now)) is not None and t <= now:
                conn.handle_timer(now)
    assert bytes(got_up) == up
    assert bytes(got_down) == down
    assert server is not None and server.engine.conv == 0x1234ABCD
