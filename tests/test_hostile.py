"""Hostile input over real sockets: a legitimate transfer completes beside a flood of
malformed, truncated, oversized, replayed and spoofed datagrams crafted with scapy,
and the server drops and counts them without creating state."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import socket

import pytest
from scapy.packet import Raw

import rudp
from rudp import Configuration, wire
from tools.scapy_rudp import KcpGoHeader, KcpSegment, RudpHeader, RudpParams, SmuxFrame, bind

CONFIG = Configuration(keepalive=0.5, idle_timeout=5.0)


def hostile_datagrams(cid: int, rng: random.Random) -> list[bytes]:
    """One round of everything a hostile or broken sender might produce."""
    legit_header = RudpHeader(type="DATA", cid=cid)
    out = [
        b"",
        b"\x01",  # truncated header
        bytes(
            RudpHeader(version=9, type="DATA", cid=cid) / KcpSegment(sn=1, data=b"x")
        ),  # wrong version
        bytes(RudpHeader(type=200, cid=cid)),  # unknown type
        bytes(
            legit_header / KcpSegment(sn=5, len=10_000, data=b"short")
        ),  # len beyond the datagram
        bytes(legit_header / Raw(os.urandom(23))),  # truncated KCP header
        bytes(legit_header / KcpSegment(conv=(cid + 1) & 0xFFFFFFFF, sn=0, data=b"wrong conv")),
        bytes(legit_header / KcpSegment(cmd=99, sn=0)),  # unknown KCP command
        bytes(legit_header / KcpSegment(sn=0x7FFF_0000, frg=255, data=b"far outside the window")),
        bytes(
            RudpHeader(type="DATA", cid=rng.getrandbits(64)) / KcpSegment(sn=3, una=2)
        ),  # unknown session
        bytes(
            RudpHeader(type="INIT", cid=rng.getrandbits(64))
            / RudpParams(flags="mux+mux_ext")
            / Raw(b"\x14" + os.urandom(20))  # a forged cookie
        ),
        bytes(
            RudpHeader(type="INIT", cid=rng.getrandbits(64)) / RudpParams() / Raw(b"\x00")
        ),  # no mux
        bytes(RudpHeader(type="PARITY", cid=cid) / Raw(os.urandom(7))),  # FEC off: ignored
        bytes(KcpGoHeader() / KcpSegment(data=b"another framing")),
        bytes(SmuxFrame(cmd="PSH", sid=3, data=b"not inside KCP")),
        os.urandom(65_000),  # oversized garbage
    ]
    out += [os.urandom(rng.randrange(1, 1500)) for _ in range(20)]
    return out


def test_transfer_survives_a_flood_and_every_drop_is_counted():
    async def main():
        received = asyncio.get_running_loop().create_future()

        async def sink(reader, writer):
            data = await reader.read()
            writer.write(hashlib.sha256(data).digest())
            writer.close()
            received.set_result(len(data))

        server = await rudp.start_server(sink, "127.0.0.1", 0, configuration=CONFIG)
        port = server.addresses()[0][1]
        bind(port)
        reader, writer = await rudp.open_connection("127.0.0.1", port, configuration=CONFIG)
        cid = writer.get_extra_info("connection").cid
        payload = os.urandom(4_000_000)
        rng = random.Random(1)

        attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        attacker.setblocking(False)
        replay = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

        async def flood():
            sent = 0
            while not received.done():
                for datagram in hostile_datagrams(cid, rng):
                    try:
                        attacker.sendto(datagram, ("127.0.0.1", port))
                        sent += 1
                    except (BlockingIOError, OSError):
                        pass
                await asyncio.sleep(0)
            return sent

        flooding = asyncio.ensure_future(flood())
        for i in range(0, len(payload), 65536):
            writer.write(payload[i : i + 65536])
            await writer.drain()
        writer.write_eof()
        digest = await reader.readexactly(32)
        sent = await flooding

        # Replayed: datagrams the client really sent earlier, from another address.
        conn_stats_before = server._endpoint.connections[cid].stats()
        seen = server.stats()["datagrams_in"]
        replays = captured(cid, payload)
        for datagram in replays:
            replay.sendto(datagram, ("127.0.0.1", port))
        while server.stats()["datagrams_in"] < seen + len(
            replays
        ):  # dropped: nothing else to await
            await asyncio.sleep(0.01)

        assert digest == hashlib.sha256(payload).digest()
        assert await received == len(payload)
        stats = server.stats()
        conn = server._endpoint.connections.get(cid)
        assert sent > 500
        assert stats["passive_opens"] == 1  # the flood created no session
        assert stats["connections"] <= 1
        assert stats["garbage"] > 0 and stats["cookies_rejected"] > 0 and stats["refused"] > 0
        assert conn is not None  # the client has not closed yet
        conn_stats = conn.stats()
        assert conn_stats["in_errors"] > 0  # framing-level drops
        assert conn_stats["kcp_in_errors"] + conn_stats["out_of_window"] > 0

        def dropped(stats):  # a replay is a duplicate, or too old to be one (dropped as bad)
            return stats["repeat_segs"] + stats["kcp_in_errors"] + stats["in_errors"]

        assert dropped(conn_stats) >= dropped(conn_stats_before) + len(replays)
        assert conn_stats["migrations"] == 0  # replays from elsewhere did not move the session
        writer.close()
        attacker.close()
        replay.close()
        server.close()

    asyncio.run(asyncio.wait_for(main(), 120))


def captured(cid: int, payload: bytes) -> list[bytes]:
    """Datagrams as the client sent them at the start of the transfer (segments sn 0..4)."""
    out = []
    for sn in range(5):
        chunk = payload[sn * 1000 : (sn + 1) * 1000]
        frame = bytes(SmuxFrame(cmd="PSH", sid=3, data=chunk))
        seg = KcpSegment(conv=cid & 0xFFFFFFFF, sn=sn, una=0, ts=sn, data=frame)
        out.append(bytes(RudpHeader(type="DATA", cid=cid) / seg))
    return out


def test_the_dissector_reads_what_rudp_writes():
    params = wire.Params(mtu=1400, rcvwnd=512, flags=wire.FLAG_MUX, smux_version=2)
    init = RudpHeader(wire.encode_handshake(wire.PKT_INIT, 42, params, b"\x01" * 20))
    assert init.type == wire.PKT_INIT and init.cid == 42
    assert init[RudpParams].mtu == 1400 and init[RudpParams].flags.mux
    segs = wire.KcpSegment(7, wire.KCP_CMD_PUSH, 0, 32, 9, 1, 0, b"hello").encode()
    data = RudpHeader(wire.encode_header(wire.PKT_DATA, 42) + segs + segs)
    first = data[KcpSegment]
    assert first.data == b"hello" and first.sn == 1
    assert first.payload[KcpSegment].data == b"hello"  # several segments per datagram


@pytest.mark.skipif(os.geteuid() != 0, reason="spoofing a source address needs a raw socket (root)")
def test_spoofed_source_addresses_create_no_state():
    from scapy.config import conf
    from scapy.layers.inet import IP, UDP
    from scapy.sendrecv import send
    from scapy.supersocket import L3RawSocket

    conf.L3socket = L3RawSocket  # scapy's default L3 socket cannot send to loopback

    async def main():
        server = await rudp.start_server(lambda r, w: None, "127.0.0.1", 0, configuration=CONFIG)
        port = server.addresses()[0][1]
        packets = [
            IP(src=f"127.0.{i}.9", dst="127.0.0.1")
            / UDP(sport=40000 + i, dport=port)
            / RudpHeader(type="INIT", cid=i)
            / RudpParams(flags="mux+mux_ext")  # what the server accepts: only the cookie is forged
            / Raw(b"\x14" + os.urandom(20) + bytes(1300))
            for i in range(50)
        ]
        await asyncio.get_running_loop().run_in_executor(None, lambda: send(packets, verbose=False))
        for _ in range(50):
            if server.stats()["cookies_rejected"] >= 50:
                break
            await asyncio.sleep(0.02)
        stats = server.stats()
        assert stats["cookies_rejected"] == 50 and stats["passive_opens"] == 0
        assert stats["connections"] == 0
        server.close()

    asyncio.run(asyncio.wait_for(main(), 60))
