"""``rudp tunnel``: TCP forwarded over rudp streams, rudp at both ends, over real loopback sockets.

(kcptun at the other end is in ``test_kcptun.py``.) Nothing here asserts on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from rudp import Configuration, tunnel
from rudp.cli import main as cli_main
from rudp.tunnel import parse_address, start_tunnel_client, start_tunnel_server

LOCALHOST = "127.0.0.1"
TIMEOUT = 120.0


def run(main) -> None:
    asyncio.run(asyncio.wait_for(main(), TIMEOUT))


@asynccontextmanager
async def tcp_server(handler) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, LOCALHOST, 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


async def digest_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read everything until EOF, then answer with its SHA-256 (needs a working half-close)."""
    data = await reader.read()
    writer.write(hashlib.sha256(data).digest())
    await writer.drain()
    writer.close()


@asynccontextmanager
async def tunnel_pair(target_port: int, config: Configuration, **client_options):
    server = await start_tunnel_server(
        (LOCALHOST, 0), (LOCALHOST, target_port), configuration=config
    )
    async with server:
        client = await start_tunnel_client(
            (LOCALHOST, 0), server.address, configuration=config, **client_options
        )
        async with client:
            yield server, client


async def round_trip(port: int, size: int, seed: int) -> None:
    reader, writer = await asyncio.open_connection(LOCALHOST, port)
    data = random.Random(seed).randbytes(size)
    writer.write(data)
    echoed = await reader.readexactly(size)
    assert echoed == data
    writer.close()


FRAMINGS = pytest.mark.parametrize(
    "config",
    [
        Configuration(),
        Configuration(framing="kcp-go", smux_version=1),
        Configuration(framing="kcp-go", smux_version=2),
        Configuration(framing="kcp"),  # bare KCP: the tunnel switches the mux on
        Configuration(fec=(10, 3), smux_version=1),
    ],
    ids=["rudp", "kcp-go-v1", "kcp-go-v2", "kcp", "rudp-fec-v1"],
)


@FRAMINGS
def test_concurrent_connections_come_back_intact(config):
    async def main() -> None:
        async with (
            tcp_server(echo) as echo_port,
            tunnel_pair(echo_port, config) as (server, client),
        ):
            port = client.address[1]
            await asyncio.gather(*(round_trip(port, 400_000, seed) for seed in range(5)))
            up, down = server.stats(), client.stats()
        assert down["connections"] == up["connections"] == 5
        assert down["bytes_to_remote"] == up["bytes_from_remote"] == 5 * 400_000
        assert down["bytes_from_remote"] == up["bytes_to_remote"] == 5 * 400_000
        assert down["sessions"] == up["sessions"] == 1
        assert down["aborted"] == down["failed"] == up["aborted"] == up["failed"] == 0

    run(main)


def test_half_close_crosses_the_rudp_framing():
    """The client half-closes; the target reads EOF and still answers on the open direction."""

    async def main() -> None:
        async with (
            tcp_server(digest_after_eof) as port,
            tunnel_pair(port, Configuration()) as (_, client),
        ):
            reader, writer = await asyncio.open_connection(*client.address)
            request = os.urandom(300_000)
            writer.write(request)
            writer.write_eof()
            assert await reader.read() == hashlib.sha256(request).digest()
            writer.close()

    run(main)


def test_a_connection_whose_target_stops_reading_does_not_stall_the_others():
    """Per-stream windows: bytes for a target that stopped reading back up to their
    own TCP sender, while another connection through the same session completes."""
    hold = asyncio.Event()

    async def echo_or_stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await reader.readexactly(1) == b"S":
            await hold.wait()  # never read again
        else:
            await echo(reader, writer)
        writer.close()

    async def main() -> None:
        config = Configuration(stream_buffer=256 * 1024)
        async with (
            tcp_server(echo_or_stall) as port,
            tunnel_pair(port, config) as (_, client),
        ):
            stuck = socket.socket()
            stuck.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
            stuck.connect(client.address)
            stuck.setblocking(False)
            stuck.send(b"S")
            chunk = bytes(64 * 1024)
            sent = 0
            blocked_for = 0
            while blocked_for < 50:  # write until the sender has been blocked for a while
                try:
                    sent += stuck.send(chunk)
                    blocked_for = 0
                except BlockingIOError:
                    blocked_for += 1
                    await asyncio.sleep(0.01)
            assert sent < 32 * 1024 * 1024, "nothing pushed back on the stalled connection"
            for seed in range(3):
                reader, writer = await asyncio.open_connection(*client.address)
                data = random.Random(seed).randbytes(500_000)
                writer.write(b"E" + data)
                assert await reader.readexactly(len(data)) == data
                writer.close()
            with pytest.raises(BlockingIOError):
                stuck.send(chunk)  # still backed up: nothing was dropped to make room
            stuck.close()
            hold.set()

    run(main)


def test_target_refusing_fails_that_connection_only():
    async def main() -> None:
        with socket.socket() as placeholder:
            placeholder.bind((LOCALHOST, 0))
            closed_port = placeholder.getsockname()[1]  # bound, not listening: refused
            async with tunnel_pair(closed_port, Configuration()) as (server, client):
                reader, writer = await asyncio.open_connection(*client.address)
                writer.write(b"hello")
                with contextlib.suppress(ConnectionError):
                    assert await reader.read() == b""
                writer.close()
                assert server.stats()["failed"] == 1
                assert client.stats()["aborted"] == 1

    run(main)


def test_client_reconnects_after_the_server_restarts():
    async def main() -> None:
        async with tcp_server(echo) as port:
            config = Configuration()
            server = await start_tunnel_server(
                (LOCALHOST, 0), (LOCALHOST, port), configuration=config
            )
            address = server.address
            client = await start_tunnel_client((LOCALHOST, 0), address, configuration=config)
            async with client:
                await round_trip(client.address[1], 10_000, 1)
                await server.close()
                server = await start_tunnel_server(address, (LOCALHOST, port), configuration=config)
                async with server:
                    # The old session learns from the new server that it is gone: the
                    # connection that finds out fails, and the next one reconnects.
                    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                        await round_trip(client.address[1], 10_000, 2)
                    await round_trip(client.address[1], 10_000, 3)
                    assert server.stats()["connections"] >= 1

    run(main)


def test_conn_spreads_streams_over_sessions():
    async def main() -> None:
        async with (
            tcp_server(echo) as port,
            tunnel_pair(port, Configuration(), connections=3) as (server, client),
        ):
            await asyncio.gather(*(round_trip(client.address[1], 50_000, s) for s in range(6)))
            assert client.stats()["sessions"] == 3
            assert server.stats()["sessions"] == 3

    run(main)


# ---------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (":4000", ("0.0.0.0", 4000)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("example.org:65535", ("example.org", 65535)),
        ("[::1]:22", ("::1", 22)),
    ],
)
def test_parse_address(text, expected):
    assert parse_address(text, "--listen", "0.0.0.0") == expected


@pytest.mark.parametrize("text", ["4000", "host:", "host:http", "host:65536", ":-1"])
def test_parse_address_rejects_with_the_flag_name(text):
    with pytest.raises(ValueError, match="--target"):
        parse_address(text, "--target", "127.0.0.1")


def test_the_kcp_framing_gets_the_mux_and_refuses_to_go_without():
    async def main() -> None:
        client = await start_tunnel_client(
            (LOCALHOST, 0), (LOCALHOST, 9), configuration=Configuration(framing="kcp")
        )
        async with client:
            assert client.configuration.mux_effective
        with pytest.raises(ValueError, match="mux"):
            await start_tunnel_server(
                (LOCALHOST, 0), (LOCALHOST, 9), configuration=Configuration(mux=False)
            )

    run(main)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["server", "--listen", "4000", "--target", "127.0.0.1:22"], "--listen"),
        (["server", "--listen", ":0", "--target", "127.0.0.1:99999"], "--target"),
        (["client", "--listen", ":0", "--remote", "h:1", "--conn", "0"], "--conn"),
        (["client", "--listen", ":0", "--remote", "h:1", "--no-mux"], "mux"),
        (["server", "--listen", ":0", "--target", "h:1", "--mtu", "10"], "mtu"),
    ],
)
def test_bad_arguments_exit_2_naming_them(argv, match, capsys):
    assert cli_main(["tunnel", *argv]) == 2
    assert match in capsys.readouterr().err


def test_print_config_shows_the_mux_on(capsys):
    argv = ["tunnel", "client", "-l", ":0", "-r", "h:1", "--framing", "kcp", "--print-config"]
    assert cli_main(argv) == 0
    assert "mux = true" in capsys.readouterr().out


def test_module_exposes_the_cli_contract():
    assert callable(tunnel.add_arguments) and callable(tunnel.run)


# ---------------------------------------------------------------------------- the command


def spawn(*argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "rudp.cli", "tunnel", *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def ready_address(proc: subprocess.Popen[str], kind: str) -> tuple[str, int]:
    """The address from the command's first line (``... tcp|udp HOST:PORT -> ...``)."""
    assert proc.stderr is not None
    line = proc.stderr.readline()
    match = re.search(rf"{kind} ([\d.]+):(\d+) ->", line)
    assert match, f"unexpected first line: {line!r}"
    return match.group(1), int(match.group(2))


@pytest.mark.parametrize("framing", ["rudp", "kcp-go"])
def test_command_end_to_end(framing):
    async def main() -> None:
        async with tcp_server(echo) as port:
            server = spawn(
                "server", "-l", "127.0.0.1:0", "-t", f"127.0.0.1:{port}", "--framing", framing
            )
            client = None
            try:
                loop = asyncio.get_running_loop()
                host, udp_port = await loop.run_in_executor(None, ready_address, server, "udp")
                client = spawn(
                    "client", "-l", "127.0.0.1:0", "-r", f"{host}:{udp_port}", "--framing", framing
                )
                _, tcp_port = await loop.run_in_executor(None, ready_address, client, "tcp")
                await asyncio.gather(*(round_trip(tcp_port, 200_000, s) for s in range(3)))
                for proc in (client, server):
                    proc.send_signal(signal.SIGTERM)
                    code = await loop.run_in_executor(None, proc.wait, 30)
                    assert code == 0
            finally:
                for proc in (client, server):
                    if proc is not None and proc.poll() is None:
                        proc.kill()
                        proc.wait()

    run(main)
