"""The asyncio API over real loopback sockets: the behaviours of a reliable byte stream.

Each test is one line of ``shared/reference/stream-semantics.md`` (connecting,
reading, writing, closing). Waiting is always on an event the test causes; a
timeout appears only where the behaviour under test *is* waiting.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import socket

import pytest

import rudp
from rudp import Configuration

FAST = Configuration(keepalive=0.2, idle_timeout=1.5, connect_timeout=2.0, close_timeout=2.0)


def run(coro_fn):
    """Run an async test body in a fresh loop, bounded so a hang fails instead of blocking."""

    @functools.wraps(coro_fn)
    def wrapper(*args, **kwargs):
        asyncio.run(asyncio.wait_for(coro_fn(*args, **kwargs), 60))

    return wrapper


async def echo_server(config: Configuration = FAST, handler=None):
    async def echo(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()
        except rudp.RudpError:
            pass

    server = await rudp.start_server(handler or echo, "127.0.0.1", 0, configuration=config)
    return server, server.addresses()[0][1]


# ------------------------------------------------------------------ connecting


@run
async def test_connect_where_nothing_listens_is_refused_fast():
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now: the host answers with ICMP port unreachable
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(ConnectionRefusedError):
        await rudp.open_connection("127.0.0.1", port, configuration=FAST)
    assert loop.time() - start < FAST.connect_timeout / 2


@run
async def test_connect_to_a_silent_peer_times_out():
    black_hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    black_hole.bind(("127.0.0.1", 0))  # bound, never answers
    try:
        loop = asyncio.get_running_loop()
        start = loop.time()
        config = FAST.replace(connect_timeout=0.5)
        with pytest.raises(TimeoutError):
            await rudp.open_connection(
                "127.0.0.1", black_hole.getsockname()[1], configuration=config
            )
        assert 0.5 <= loop.time() - start < 1.5
    finally:
        black_hole.close()


@run
async def test_many_clients_on_one_server_port():
    server, port = await echo_server()
    async with server:

        async def client(i: int) -> bool:
            reader, writer = await rudp.open_connection("127.0.0.1", port, configuration=FAST)
            message = os.urandom(1000 + i)
            writer.write(message)
            back = await reader.readexactly(len(message))
            writer.close()
            await writer.wait_closed()
            return back == message

        results = await asyncio.gather(*(client(i) for i in range(40)))
        assert all(results)


# ------------------------------------------------------------------ reading


@run
async def test_read_waits_for_data_and_a_timed_out_read_loses_nothing():
    gate = asyncio.Event()

    async def handler(reader, writer):
        await gate.wait()
        writer.write(b"late data")

    server, port = await echo_server(handler=handler)
    async with server:
        reader, writer = await rudp.open_connection("127.0.0.1", port, configuration=FAST)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(100), 0.2)  # nothing there: the read waits
        gate.set()
        assert await reader.readexactly(9) == b"late data"  # nothing lost by the timeout
        writer.close()


@run
async def test_read_returns_what_is_available_and_boundaries_are_not_kept():
    async def handler(reader, writer):
        for part in (b"ab", b"cd", b"ef"):
            writer.write(part)
        await writer.drain()
        await reader.read(1)  # wait for the client's go-ahead before closing
        writer.close()

    server, port = await echo_server(handler=handler)
    async with server:
        reader, writer = await rudp.open_connection("127.0.0.1", port, configuration=FAST)
        got = await reader.read(1000)  # returns without waiting to fill 1000 bytes
        while len(got) < 6:
            got += await reader.read(1000)
        assert got == b"abcdef"
        writer.write(b"!")
        assert await reader.read(10) == b""  # then EOF


@run
async def test_readexactly_readline_and_incomplete_read():
    async def handler(reader, writer):
        writer.write(b"line one\nline two\n" + b"x" * 10_000 + b"tail")
        writer.close()

    server, port = await echo_server(handler=handler)
    async with server:
        reader, _ = await rudp.open_connection("127.0.0.1", port, configuration=FAST)
        assert await reader.readline() == b"line one\n"
        assert [line async for line in _lines(reader, 1)] == [b"line two\n"]
        assert await reader.readexactly(10_000) == b"x" * 10_000
        with pytest.raises(asyncio.IncompleteReadError) as exc:
            await reader.readexactly(10)
        assert exc.value.partial == b"tail"
        assert reader.at_eof()


async def _lines(reader, n):
    async for line in reader:
        yield line
        n -= 1
        if not n:
            return


@run
async def test_eof_after_peer_close_drains_everything_first():
    payload = os.urandom(2_000_000)

    async def handler(reader, writer):
        writer.write(payload)
        writer.close()  # graceful: all of it, then EOF

    server, port = await echo_server(handler=handler)
    async with server:
        reader, writer = await rudp.open_connection("127.0.0.1", port, configuration=FAST)
        data = await reader.read()  # -1: until EOF
        assert hashlib.sha256(data).digest() == hashlib.sha256(payload).digest()
        assert await reader.read(10) == b""  # EOF again, never an error
        writer.close()


@run
async def test_read_after_local_close_raises_closed():
    server, port = await echo_server()
    async with server:
        reader, writer = await rudp.open_connection("127.0.0.1", port, configuration=FAST)
        writer.abort()
        with pytest.raises(rudp.ClosedError):
            await reader.read(10)
        with pytest.raises(rudp.ClosedError):
            writer.write(b"x")


# ------------------------------------------------------------------ writing


@run
async def test_drain_applies_backpressure_until_the_peer_reads():
    config = FAST.replace(send_buffer=64 * 1024, stream_buffer=64 * 1024, rcvwnd=16, sndwnd=16)
    release = asyncio.Event()
    received = bytearray()
    finished = asyncio.Event()

    async def slow_reader(reader, writer):
        await release.wait()
        while data := await reader.read(65536):
            received.extend(data)
        finished.set()

    server, port = await echo_server(config, handler=slow_reader)
    async with server:
        _reader, writer = await rudp.open_connection("127.0.0.1", port, configuration=config)
        payload = os.urandom(1_000_000)
        writer.write(payload)
        drain = asyncio.ensure_future(writer.drain())
        with pytest.raises(TimeoutError):
            # The peer reads nothing: its window closes and drain() must keep waiting.
            await asyncio.wait_for(asyncio.shield(drain), 0.5)
        assert not received
        release.set()
        await drain  # resumes as the peer reads
        writer.close()
        await writer.wait_closed()
        await finished.wait()
        assert bytes(received) == payload


@run
async def test_concurrent_writers_never_interleave_within_a_write():
    server, port = await echo_server()
    async with server:
        reader, writer = await rudp.open_connection("127.0.0.1", port, configuration=FAST)
        blocks = [bytes([i]) * 5000 for i in range(20)]

        async def write(block):
            await asyncio.sleep(0)
            writer.write(block)
            await writer.drain()

        await asyncio.gather(*(write(b) for b in blocks))
        echoed = await reader.readexactly(5000 * len(blocks))
        chunks = [echoed[i : i + 5000] for i in range(0, len(echoed), 5000)]
        assert sorted(chunks) == sorted(blocks)  # each write arrived whole
        writer.close()


@run
async def test_write_after_peer_reset_fails_clearly():
    reset_done = asyncio.Event()

    async def resetter(reader, writer):
        await reader.read(1)
        writer.abort()
        reset_done.set()

    server, port = await echo_server(handler=resetter)
    async with server:
        reader, writer = await rudp.open_connection("127.0.0.1", port, configuration=FAST)
        writer.write(b"x")
        with pytest.raises(ConnectionResetError):
            await reader.read(10)
        with pytest.raises(ConnectionResetError):
            writer.write(b"more")
        with pytest.raises(ConnectionResetError):
            await writer.drain()


@run
async def test_write_eof_half_closes():
    async def handler(reader, writer):
        request = await reader.read()  # until EOF
        writer.write(request.upper())  # the other direction still works
        writer.close()

    server, port = await echo_server(handler=handler)
    async with server:
        reader, writer = await rudp.open_connection("127.0.0.1", port, configuration=FAST)
        writer.write(b"hello over a half-closed stream")
        writer.write_eof()
        assert await reader.read() == b"HELLO OVER A HALF-CLOSED STREAM"
        with pytest.raises(rudp.ClosedError):
            writer.write(b"late")


# ------------------------------------------------------------------ closing


@run
async def test_vanished_peer_is_detected_in_bounded_time():
    server, port = await echo_server()
    reader, writer = await rudp.open_connection("127.0.0.1", port, configuration=FAST)
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    server._endpoint.close()  # the server vanishes without a word (crash, cable pulled)
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(TimeoutError):
        await reader.read(10)
    assert loop.time() - start <= FAST.idle_timeout + 0.5


@run
async def test_close_twice_is_harmless_and_releases_everything():
    server, port = await echo_server()
    async with server:
        for _ in range(3):
            reader, writer = await rudp.open_connection("127.0.0.1", port, configuration=FAST)
            writer.write(b"abc")
            assert await reader.readexactly(3) == b"abc"
            writer.close()
            writer.close()
            await writer.wait_closed()
            await writer.wait_closed()
            assert writer.is_closing()
        # The server forgets its connections once they are closed (after TIME-WAIT).
        endpoint = server._endpoint
        for _ in range(100):
            if not endpoint.connections:
                break
            await asyncio.sleep(0.05)
        assert not endpoint.connections
        assert not endpoint._armed


@run
async def test_server_close_resets_clients_and_wait_closed_returns():
    server, port = await echo_server()
    reader, writer = await rudp.open_connection("127.0.0.1", port, configuration=FAST)
    writer.write(b"x")
    await reader.readexactly(1)
    server.close()
    await server.wait_closed()
    assert not server.is_serving() and server.sockets == ()
    with pytest.raises(ConnectionResetError):
        await reader.read(10)
