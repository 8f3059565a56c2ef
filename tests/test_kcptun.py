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

import asyncio
import contextlib
import hashlib
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

import rudp
from netem import Impairment, Profile
from netem.relay import Relay
from rudp import wire
from rudp.config import Configuration
from rudp.connection import Connection, ConnectionState
from rudp.errors import DeadPeerError
from rudp.listener import Listener
from rudp.tunnel import start_tunnel_client, start_tunnel_server

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


def test_kcpgo_client_outlives_connect_timeout_once_the_server_answers(arq_cls):
    """KCP has no handshake: the first valid segment from the server confirms the client,
    which then lives as long as traffic flows (not just ``connect_timeout``)."""
    config = kcptun_config(2, connect_timeout=1.0, conv=5)
    client = Connection(config, is_client=True, engine=arq_cls)
    saddr = ("127.0.0.1", 29900)
    client.connect(saddr, 0.0)
    ack = wire.KcpSegment(5, wire.KCP_CMD_WINS, 0, 1024, 0, 0, 0).encode()
    now = 0.0
    while now < 5.0:  # the server speaks every half second; time passes connect_timeout
        client.receive_datagram(wire.encode_kcpgo(ack, bytes(16)), saddr, now)
        end = now + 0.5
        while (t := client.get_timer(now)) is not None and t <= end:
            now = max(now, t)
            client.handle_timer(now)
            client.datagrams_to_send(now)
        now = end
    assert client.state is ConnectionState.ESTABLISHED, client.error


def test_kcpgo_client_that_hears_nothing_dies_after_connect_timeout(arq_cls):
    client = Connection(kcptun_config(2, connect_timeout=1.0), is_client=True, engine=arq_cls)
    client.connect(("127.0.0.1", 29900), 0.0)
    client.send(b"hello")
    now = 0.0
    while client.state is not ConnectionState.TERMINATED and now < 5.0:
        now = max(now, client.get_timer(now) or now + 0.1)
        client.handle_timer(now)
        client.datagrams_to_send(now)
    assert isinstance(client.error, DeadPeerError)
    assert now == pytest.approx(1.0, abs=0.05)


# ---------------------------------------------------------------------------- the real kcptun


@pytest.fixture
def kcptun_installed() -> None:
    missing = [b for b in (KCPTUN_CLIENT, KCPTUN_SERVER) if shutil.which(b) is None]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} not found: install Debian's kcptun package "
            "(`apt-get install kcptun`; .ci/run does, where apt is reachable)"
        )


def free_port(kind: int) -> int:
    """A port nothing on 127.0.0.1 uses right now (kcptun binds it a moment later)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


def listening(proto: str, port: int) -> bool:
    """Whether a socket is bound (UDP) or listening (TCP) on ``port``, from /proc/net."""
    for table in (f"/proc/net/{proto}", f"/proc/net/{proto}6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local, state = fields[1], fields[3]
                if int(local.rsplit(":", 1)[1], 16) == port and (proto == "udp" or state == "0A"):
                    return True
    return False


@asynccontextmanager
async def kcptun(binary: str, *args: str, ready: tuple[str, int]) -> AsyncIterator[Path]:
    """Run a kcptun binary until the block ends (killed on any failure); yields its log file.

    ``ready``: (``udp``|``tcp``, port) it must bind before the block starts.
    """
    log = Path(tempfile.mkstemp(prefix=f"{binary}-", suffix=".log")[1])
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [binary, *args], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 30
        while not listening(*ready):
            if proc.poll() is not None:
                raise RuntimeError(f"{binary} exited with {proc.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{binary} did not bind {ready} within 30 s")
            await asyncio.sleep(0.05)
        yield log
    except BaseException:
        print(f"--- {binary} {' '.join(args)}\n{log.read_text()}")
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.unlink(missing_ok=True)


def kcptun_server(port: int, target: int, smux_version: int):
    return kcptun(
        KCPTUN_SERVER,
        *("--listen", f"{LOCALHOST}:{port}", "--target", f"{LOCALHOST}:{target}"),
        *KCPTUN_COMMON,
        *("--smuxver", str(smux_version), "--quiet"),
        ready=("udp", port),
    )


def kcptun_client(port: int, remote: tuple[str, int], smux_version: int):
    return kcptun(
        KCPTUN_CLIENT,
        *("--localaddr", f"{LOCALHOST}:{port}", "--remoteaddr", f"{remote[0]}:{remote[1]}"),
        *KCPTUN_COMMON,
        *("--smuxver", str(smux_version), "--quiet"),
        ready=("tcp", port),
    )


@asynccontextmanager
async def tcp_echo_server() -> AsyncIterator[int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, LOCALHOST, 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def rudp_stream_echo(reader: rudp.StreamReader, writer: rudp.StreamWriter) -> None:
    with contextlib.suppress(rudp.RudpError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


async def round_trip(reader, writer, size: int, seed: int) -> None:
    """Write ``size`` seeded bytes while reading their echo; all must come back, in order."""
    data = random.Random(seed).randbytes(size)

    async def send() -> None:
        for i in range(0, size, 50_000):
            writer.write(data[i : i + 50_000])
            await writer.drain()

    sending = asyncio.ensure_future(send())
    try:
        echoed = await reader.readexactly(size)
    finally:
        sending.cancel()
    assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(data).hexdigest(), (
        f"stream {seed}: the echo differs from what was sent"
    )
    writer.close()


async def tcp_round_trips(port: int, count: int, size: int) -> None:
    """``count`` TCP connections to ``port`` at once, each a ``size``-byte round trip."""

    async def one(seed: int) -> None:
        reader, writer = await asyncio.open_connection(LOCALHOST, port)
        await round_trip(reader, writer, size, seed)

    await asyncio.gather(*(one(seed) for seed in range(count)))


def run(main) -> None:
    asyncio.run(asyncio.wait_for(main(), TIMEOUT))


SMUX = pytest.mark.parametrize("smux_version", [1, 2])


@pytest.mark.kcptun
@pytest.mark.usefixtures("kcptun_installed")
@SMUX
def test_kcptun_client_to_rudp_server(smux_version):
    """(a) TCP → kcptun-client → rudp server (a stream echo): every byte comes back."""

    async def main() -> None:
        server = await rudp.serve(
            LOCALHOST,
            0,
            stream_handler=rudp_stream_echo,
            configuration=kcptun_config(smux_version),
        )
        async with server:
            tcp_port = free_port(socket.SOCK_STREAM)
            async with kcptun_client(tcp_port, server.addresses()[0], smux_version):
                await tcp_round_trips(tcp_port, count=3, size=600_000)
            stats = server.stats()
        assert stats["passive_opens"] == 1  # one kcp-go session carried every connection

    run(main)


@pytest.mark.kcptun
@pytest.mark.usefixtures("kcptun_installed")
@SMUX
def test_kcptun_client_through_rudp_tunnel_server(smux_version):
    """(a) TCP → kcptun-client → ``rudp tunnel server`` → TCP echo: every byte comes back."""

    async def main() -> None:
        async with tcp_echo_server() as echo_port:
            tunnel = await start_tunnel_server(
                (LOCALHOST, 0), (LOCALHOST, echo_port), configuration=kcptun_config(smux_version)
            )
            async with tunnel:
                tcp_port = free_port(socket.SOCK_STREAM)
                async with kcptun_client(tcp_port, tunnel.address, smux_version):
                    await tcp_round_trips(tcp_port, count=3, size=600_000)
                stats = tunnel.stats()
        assert stats["connections"] == 3
        assert stats["bytes_to_remote"] == stats["bytes_from_remote"] == 3 * 600_000
        assert stats["aborted"] == stats["failed"] == 0

    run(main)


@pytest.mark.kcptun
@pytest.mark.usefixtures("kcptun_installed")
@SMUX
def test_rudp_client_to_kcptun_server(smux_version):
    """(b) rudp session → kcptun-server → TCP echo: streams opened at once all come back."""

    async def main() -> None:
        async with tcp_echo_server() as echo_port:
            udp_port = free_port(socket.SOCK_DGRAM)
            async with kcptun_server(udp_port, echo_port, smux_version):
                session = await rudp.connect(
                    LOCALHOST, udp_port, configuration=kcptun_config(smux_version)
                )
                streams = [await session.open_stream() for _ in range(4)]
                await asyncio.gather(
                    *(round_trip(r, w, 500_000, seed) for seed, (r, w) in enumerate(streams))
                )
                stats = session.stats
                await session.close()
        assert stats["mux_streams_opened"] == 4
        assert stats["mux_data_bytes_received"] == 4 * 500_000

    run(main)


@pytest.mark.kcptun
@pytest.mark.usefixtures("kcptun_installed")
@SMUX
def test_rudp_tunnel_client_to_kcptun_server(smux_version):
    """(b) TCP → ``rudp tunnel client`` → kcptun-server → TCP echo: every byte comes back."""

    async def main() -> None:
        async with tcp_echo_server() as echo_port:
            udp_port = free_port(socket.SOCK_DGRAM)
            async with kcptun_server(udp_port, echo_port, smux_version):
                tunnel = await start_tunnel_client(
                    (LOCALHOST, 0), (LOCALHOST, udp_port), configuration=kcptun_config(smux_version)
                )
                async with tunnel:
                    await tcp_round_trips(tunnel.address[1], count=3, size=600_000)
                    stats = tunnel.stats()
        assert stats["connections"] == 3 and stats["sessions"] == 1
        assert stats["bytes_to_remote"] == stats["bytes_from_remote"] == 3 * 600_000

    run(main)


#: A link that loses, delays and reorders: retransmissions and out-of-order KCP both ways.
LOSSY = Profile(
    "kcptun-lossy",
    forward=Impairment.from_tc_args("delay 5ms 2ms loss 3%"),
    reverse=Impairment.from_tc_args("delay 5ms 2ms loss 3%"),
)


@pytest.mark.kcptun
@pytest.mark.usefixtures("kcptun_installed")
@SMUX
def test_both_directions_through_a_lossy_link(smux_version):
    """(a) and (b) with a seeded relay dropping 3% and jittering each way: still intact."""

    async def main() -> None:
        async with tcp_echo_server() as echo_port:
            # (b) rudp client → relay → kcptun-server
            udp_port = free_port(socket.SOCK_DGRAM)
            async with (
                kcptun_server(udp_port, echo_port, smux_version),
                Relay(LOSSY, (LOCALHOST, udp_port), seed=smux_version) as relay,
            ):
                session = await rudp.connect(
                    *relay.address, configuration=kcptun_config(smux_version)
                )
                streams = [await session.open_stream() for _ in range(2)]
                await asyncio.gather(
                    *(round_trip(r, w, 300_000, seed) for seed, (r, w) in enumerate(streams))
                )
                retransmitted = session.stats["retrans_segs"]
                await session.close()
                lost = relay.stats[0].lost + relay.stats[1].lost
            assert lost > 0 and retransmitted > 0
            # (a) kcptun-client → relay → rudp server
            server = await rudp.serve(
                LOCALHOST,
                0,
                stream_handler=rudp_stream_echo,
                configuration=kcptun_config(smux_version),
            )
            async with (
                server,
                Relay(LOSSY, server.addresses()[0], seed=10 + smux_version) as relay,
            ):
                tcp_port = free_port(socket.SOCK_STREAM)
                async with kcptun_client(tcp_port, relay.address, smux_version):
                    await tcp_round_trips(tcp_port, count=2, size=300_000)
                assert relay.stats[0].lost + relay.stats[1].lost > 0

    run(main)


@pytest.mark.kcptun
@pytest.mark.usefixtures("kcptun_installed")
@SMUX
def test_idle_sessions_live_on_keepalives_both_ways(smux_version):
    """With 1 s keepalives each side and a 3 s idle timeout on ours, sessions that carry
    nothing for 5 s are still alive: kcptun's NOPs count as life here, and ours are valid
    frames there (a malformed one would end its session at once)."""
    keep = {"keepalive": 1.0, "idle_timeout": 3.0}

    async def main() -> None:
        async with tcp_echo_server() as echo_port:
            udp_port = free_port(socket.SOCK_DGRAM)
            server = await rudp.serve(
                LOCALHOST,
                0,
                stream_handler=rudp_stream_echo,
                configuration=kcptun_config(smux_version, **keep),
            )
            tcp_port = free_port(socket.SOCK_STREAM)
            async with (
                kcptun(
                    KCPTUN_SERVER,
                    *(
                        "--listen",
                        f"{LOCALHOST}:{udp_port}",
                        "--target",
                        f"{LOCALHOST}:{echo_port}",
                    ),
                    *KCPTUN_COMMON,
                    *("--smuxver", str(smux_version), "--keepalive", "1", "--quiet"),
                    ready=("udp", udp_port),
                ),
                server,
                kcptun(
                    KCPTUN_CLIENT,
                    *("--localaddr", f"{LOCALHOST}:{tcp_port}"),
                    *("--remoteaddr", "{}:{}".format(*server.addresses()[0])),
                    *KCPTUN_COMMON,
                    *("--smuxver", str(smux_version), "--keepalive", "1", "--quiet"),
                    ready=("tcp", tcp_port),
                ),
            ):
                session = await rudp.connect(
                    LOCALHOST, udp_port, configuration=kcptun_config(smux_version, **keep)
                )
                reader, writer = await session.open_stream()
                tcp_reader, tcp_writer = await asyncio.open_connection(LOCALHOST, tcp_port)
                for probe in (b"a", b"b"):  # before and after the silence
                    writer.write(probe)
                    assert await reader.readexactly(1) == probe
                    tcp_writer.write(probe)
                    assert await tcp_reader.readexactly(1) == probe
                    if probe == b"a":
                        await asyncio.sleep(5.0)
                assert session.stats["mux_keepalives_sent"] >= 3
                tcp_writer.close()
                writer.close()
                await session.close()

    run(main)
