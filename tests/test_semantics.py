"""The asyncio API over real loopback sockets: the stream-semantics lines not in test_asyncio.py.

Mostly ``shared/reference/stream-semantics.md``'s "many streams on one session"
section, plus the accept queue, a timed-out drain and pending writes on a
vanished peer. ``test_sync_streams.py`` has the same for the blocking API.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
from collections.abc import AsyncIterator

import pytest
from test_asyncio import echo_server, run
from test_semantics_support import FAST, IDLE, Relay, TimerWakeups, next_deadline, released

import rudp
from rudp.connection import Connection
from rudp.events import Connected, Terminated
from rudp.mux import INITIAL_PEER_WINDOW, MIN_WINDOW


def mux_of(session: rudp.Session):
    """White box: the session's sans-I/O multiplexer."""
    return session._driver.mux


async def serve_sessions(config=FAST, **kwargs) -> tuple[rudp.Server, int, asyncio.Queue]:
    """A server that queues its sessions for the test to pick up."""
    sessions: asyncio.Queue[rudp.Session] = asyncio.Queue()
    server = await rudp.serve(
        "127.0.0.1", 0, connection_handler=sessions.put_nowait, configuration=config, **kwargs
    )
    return server, server.addresses()[0][1], sessions


@contextlib.asynccontextmanager
async def session_pair(
    config=FAST, client_config=None
) -> AsyncIterator[tuple[rudp.Session, rudp.Session]]:
    """(client session, the server's side of it); both are gone afterwards."""
    server, port, sessions = await serve_sessions(config)
    async with server:
        client = await rudp.connect("127.0.0.1", port, configuration=client_config or config)
        try:
            yield client, await sessions.get()
        finally:
            client.abort()


# ------------------------------------------------------------------ connecting


@run
async def test_an_application_accept_queue_refuses_clients_while_full():
    queue: asyncio.Queue[rudp.Session] = asyncio.Queue()
    server = await rudp.serve(
        "127.0.0.1",
        0,
        connection_handler=queue.put_nowait,
        configuration=FAST.replace(backlog=2),
        queued=queue.qsize,  # sessions the application has not taken count as backlog
    )
    async with server:
        port = server.addresses()[0][1]
        clients = [await rudp.connect("127.0.0.1", port, configuration=FAST) for _ in range(2)]
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(ConnectionRefusedError):
            await rudp.connect("127.0.0.1", port, configuration=FAST)  # no session at all
        assert loop.time() - start < FAST.connect_timeout / 2
        assert server.stats()["refused"] >= 1
        await queue.get()  # the application accepts one: a slot frees up
        clients.append(await rudp.connect("127.0.0.1", port, configuration=FAST))
        for client in clients:
            client.abort()


@run
async def test_configured_backlog_refuses_handshakes_beyond_it():
    """Two clients complete their handshakes in the same instant; backlog=1 admits one."""
    config = FAST.replace(backlog=1)
    server, port, sessions = await serve_sessions(config)
    loop = asyncio.get_running_loop()
    address = ("127.0.0.1", port)
    clients = []
    for cid in (1, 2):  # sans-I/O clients, so that the test decides when datagrams leave
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        conn = Connection(config, is_client=True, cid=cid)
        conn.connect(address, loop.time())
        for datagram in conn.datagrams_to_send(loop.time()):
            sock.sendto(datagram, address)
        retry, _ = await loop.sock_recvfrom(sock, 65536)  # the cookie
        conn.receive_datagram(retry, address, loop.time())
        clients.append((conn, sock))
    # Both cookie-carrying INITs reach the server's socket before it reads either.
    for conn, sock in clients:
        for datagram in conn.datagrams_to_send(loop.time()):
            sock.sendto(datagram, address)
    events = []
    for conn, sock in clients:
        reply, _ = await loop.sock_recvfrom(sock, 65536)
        conn.receive_datagram(reply, address, loop.time())
        events.append(list(iter(conn.next_event, None)))
        sock.close()
    # A client counts as connected once it has its cookie; the server's answer then
    # confirms it (the first) or refuses it (the second: the backlog was full).
    assert [type(e) for e in events[0]] == [Connected]
    assert [type(e) for e in events[1]] == [Connected, Terminated]
    assert isinstance(events[1][-1].error, ConnectionRefusedError)
    assert server.stats()["refused"] == 1
    assert sessions.qsize() == 1
    server.close()


# ------------------------------------------------------------------ reading


@run
async def test_a_byte_stream_keeps_no_boundaries():
    config = FAST.replace(send_buffer=32 * 1024, stream_buffer=16 * 1024, sndwnd=16, rcvwnd=16)
    payload = os.urandom(300_000)
    acknowledged = asyncio.Event()

    async def handler(reader, writer):
        writer.write(payload)  # one write...
        for _ in range(100):
            writer.write(b"x")  # ...and many tiny ones
        await writer.get_extra_info("session").close()  # returns once all was acknowledged
        acknowledged.set()

    server = await rudp.start_server(handler, "127.0.0.1", 0, configuration=config)
    async with server:
        reader, _ = await rudp.open_connection(
            "127.0.0.1", server.addresses()[0][1], configuration=config
        )
        sizes = []
        while sum(sizes) < len(payload):
            sizes.append(len(await reader.read(len(payload) - sum(sizes))))
        # One write arrives in several reads: no more than the stream's window is buffered.
        assert len(sizes) > 1 and max(sizes) <= config.stream_buffer
        await acknowledged.wait()
        assert await reader.read(1000) == b"x" * 100  # several writes arrive in one read


@run
async def test_a_partial_readexactly_that_times_out_keeps_its_bytes():
    async def half(reader, writer):
        writer.write(b"12345")
        await reader.read(1)  # until the client is done

    server = await rudp.start_server(half, "127.0.0.1", 0, configuration=FAST)
    async with server:
        reader, writer = await rudp.open_connection(
            "127.0.0.1", server.addresses()[0][1], configuration=FAST
        )
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(10), 0.3)  # 5 of 10 came, then time ran out
        assert await reader.read(10) == b"12345"  # the 5 bytes are still there
        writer.close()


@pytest.mark.parametrize("mux", [None, False])
@run
async def test_message_mode_keeps_boundaries(mux):
    config = FAST.replace(message_mode=True, mux=mux)
    messages = [b"a", os.urandom(5000), os.urandom(300_000), b"0123456789", b"next"]
    done = asyncio.Event()

    async def handler(reader, writer):
        for message in messages:
            writer.write(message)  # one write, one message
        await writer.drain()
        await done.wait()
        writer.close()

    server = await rudp.start_server(handler, "127.0.0.1", 0, configuration=config)
    async with server:
        reader, writer = await rudp.open_connection(
            "127.0.0.1", server.addresses()[0][1], configuration=config
        )
        got = [await reader.read(1 << 20) for _ in messages[:3]]
        assert got == messages[:3]  # each read is exactly one message
        # A read smaller than the message: the rest comes next, never mixed with the next one.
        assert await reader.read(4) == b"0123"
        assert await reader.read(1000) == b"456789"
        assert await reader.read(1000) == b"next"
        done.set()
        assert await reader.read(1000) == b""
        writer.close()


# ------------------------------------------------------------------ writing and closing


@run
async def test_a_timed_out_drain_loses_nothing():
    """asyncio: write() queues the whole call; a drain() that times out only stops waiting."""
    config = FAST.replace(send_buffer=32 * 1024, stream_buffer=16 * 1024, sndwnd=16, rcvwnd=16)
    release = asyncio.Event()
    received = bytearray()
    finished = asyncio.Event()

    async def slow_reader(reader, writer):
        await release.wait()
        while data := await reader.read(65536):
            received.extend(data)
        finished.set()

    server = await rudp.start_server(slow_reader, "127.0.0.1", 0, configuration=config)
    async with server:
        _, writer = await rudp.open_connection(
            "127.0.0.1", server.addresses()[0][1], configuration=config
        )
        payload = os.urandom(500_000)
        writer.write(payload)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(writer.drain(), 0.3)  # cancelled, not shielded
        release.set()
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        await finished.wait()
        assert bytes(received) == payload


@run
async def test_the_smallest_send_buffer_still_moves_data():
    """Backpressure, not a stall: the mux is pulled even when the connection's buffer
    is smaller than the usual pull size."""
    config = FAST.replace(send_buffer=1024, stream_buffer=1024)
    server, port = await echo_server(config)
    async with server:
        reader, writer = await rudp.open_connection("127.0.0.1", port, configuration=config)
        payload = os.urandom(20_000)
        writer.write(payload)
        assert await asyncio.wait_for(reader.readexactly(len(payload)), 20) == payload
        writer.close()


@run
async def test_a_vanished_peer_fails_pending_writes_too():
    config = FAST.replace(send_buffer=32 * 1024, stream_buffer=16 * 1024)
    server, port, sessions = await serve_sessions(config)
    session = await rudp.connect("127.0.0.1", port, configuration=config)
    await sessions.get()
    _, writer = await session.open_stream()
    writer.write(bytes(10_000_000))
    drain = asyncio.ensure_future(writer.drain())
    await asyncio.sleep(0)
    server._endpoint.close()  # the server vanishes without a word
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises((TimeoutError, ConnectionError)):
        await drain
    assert loop.time() - start <= config.idle_timeout + 0.5
    with pytest.raises((TimeoutError, ConnectionError)):
        writer.write(b"more")


@run
async def test_close_gives_up_after_close_timeout_when_the_peer_never_reads():
    config = FAST.replace(close_timeout=0.5, stream_buffer=64 * 1024)
    async with session_pair(config) as (client, _):  # the peer lives on but never reads
        _, writer = await client.open_stream()
        writer.write(bytes(3_000_000))
        await asyncio.wait_for(client.close(), config.close_timeout + 3)


# ------------------------------------------------------------------ many streams on one session


@run
async def test_a_stopped_reader_does_not_delay_the_other_streams():
    config = FAST.replace(stream_buffer=128 * 1024, session_buffer=512 * 1024)
    async with session_pair(config) as (client, peer):
        stopped_writer = (await client.open_stream())[1]
        stopped_writer.write(os.urandom(3_000_000))
        blocked = asyncio.ensure_future(stopped_writer.drain())
        stopped_reader = (await peer.accept_stream())[0]  # accepted, never read

        async def transfer() -> bool:
            reader, writer = await client.open_stream()
            payload = os.urandom(1_000_000)
            writer.write(payload)
            writer.write_eof()
            peer_reader, peer_writer = await peer.accept_stream()
            data = await peer_reader.read()
            peer_writer.write(hashlib.sha256(data).digest())
            peer_writer.close()
            return await reader.read() == hashlib.sha256(payload).digest()

        assert await asyncio.gather(transfer(), transfer()) == [True, True]
        # The others finished while the stopped stream's writer is still blocked.
        assert not blocked.done()
        # ...and what the stopped stream holds at the receiver is bounded by its window.
        info = mux_of(peer).stream_info(stopped_writer.get_extra_info("stream_id"))
        assert 0 < info.recv_buffered <= max(config.stream_buffer, INITIAL_PEER_WINDOW)
        data = await stopped_reader.readexactly(3_000_000)  # the reader resumes: so does the writer
        await blocked
        assert len(data) == 3_000_000


@run
async def test_opening_a_stream_needs_no_round_trip():
    server, port, sessions = await serve_sessions()
    relay = Relay(("127.0.0.1", port))
    relay_address = await relay.start()
    try:
        client = await rudp.connect(*relay_address, configuration=FAST)
        peer = await sessions.get()
        relay.drop_replies = True  # from now on the client hears nothing from the server
        heard = relay.to_client
        _, writer = await client.open_stream()
        writer.write(b"first flight")
        reader, _ = await peer.accept_stream()
        assert await reader.readexactly(12) == b"first flight"
        assert relay.to_client == heard  # nothing came back, yet the data arrived
        client.abort()
        server.close()
    finally:
        relay.close()


@run
async def test_stream_ids_never_collide_between_the_two_sides():
    async with session_pair() as (client, peer):

        async def open_many(session: rudp.Session, side: str) -> list[int]:
            ids = []
            for _ in range(10):
                _, writer = await session.open_stream()
                sid = writer.get_extra_info("stream_id")
                writer.write(f"{side} {sid}".encode())
                writer.close()
                ids.append(sid)
            return ids

        async def accept_many(session: rudp.Session, side: str) -> list[bool]:
            ok = []
            for _ in range(10):
                reader, writer = await session.accept_stream()
                sid = writer.get_extra_info("stream_id")
                ok.append(await reader.read() == f"{side} {sid}".encode())
            return ok

        client_ids, server_ids, at_server, at_client = await asyncio.gather(
            open_many(client, "client"),  # both sides open at the same time
            open_many(peer, "server"),
            accept_many(peer, "client"),
            accept_many(client, "server"),
        )
        assert all(sid % 2 == 1 for sid in client_ids)
        assert all(sid % 2 == 0 for sid in server_ids)
        assert len(set(client_ids) | set(server_ids)) == 20
        assert at_server == at_client == [True] * 10  # every stream carried its own bytes


@run
async def test_a_session_out_of_stream_ids_refuses_new_streams_cleanly():
    async with session_pair() as (client, peer):
        mux_of(client)._last_local_id = 0xFFFFFFFF - 2  # white box: 2**31 opens is not a test
        reader, writer = await client.open_stream()
        assert writer.get_extra_info("stream_id") == 0xFFFFFFFF  # the last id works
        with pytest.raises(rudp.ConnectionRefused, match="exhausted"):
            await client.open_stream()
        writer.write(b"still fine")
        peer_reader, peer_writer = await peer.accept_stream()
        assert await peer_reader.readexactly(10) == b"still fine"
        peer_writer.write(b"both ways")
        assert await reader.readexactly(9) == b"both ways"
        assert not client.is_closed


@run
async def test_streams_per_session_are_bounded_on_both_sides():
    async with session_pair(
        FAST.replace(max_streams=2), client_config=FAST.replace(max_streams=3)
    ) as (client, peer):
        pairs = [await client.open_stream() for _ in range(3)]
        with pytest.raises(rudp.ConnectionRefused, match="max_streams=3"):
            await client.open_stream()  # our own limit
        for _, writer in pairs:
            writer.write(b"hello")
        # The server takes two; the third is refused, and its opener is told so.
        with pytest.raises(ConnectionRefusedError):
            await pairs[2][0].read(10)
        for _ in range(2):
            reader, _ = await peer.accept_stream()
            assert await reader.readexactly(5) == b"hello"
        assert mux_of(peer).stats.streams_refused == 1
        assert not client.is_closed and not peer.is_closed


@run
async def test_receive_buffers_are_bounded_per_session():
    """Many streams whose readers stopped hold at most the session pool (+ a minimum window each)."""
    config = FAST.replace(stream_buffer=64 * 1024, session_buffer=128 * 1024)
    async with session_pair(config) as (client, peer):
        writers = [(await client.open_stream())[1] for _ in range(6)]
        drains = []
        for writer in writers:
            writer.write(bytes(1_000_000))
            drains.append(asyncio.ensure_future(writer.drain()))
        pool = mux_of(peer)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        # Until the senders are stuck: all they sent was acknowledged and the windows
        # let nothing more out, so nothing is in flight and the receiver holds the most.
        while client._driver.conn.send_buffered or mux_of(client).has_output():
            await asyncio.sleep(0.05)
            assert loop.time() < deadline, "the senders never got stuck"
        bound = config.session_buffer + len(writers) * max(MIN_WINDOW, INITIAL_PEER_WINDOW)
        assert 0 < pool.recv_buffered <= bound
        assert not any(d.done() for d in drains)


@run
async def test_handlers_may_use_any_api_on_their_own_session_without_deadlock():
    """A stream handler opens, writes and closes another stream of its own session,
    and the last one closes the session from inside, with tight stream limits."""
    config = FAST.replace(max_streams=8, stream_backlog=2)
    finished: asyncio.Queue[str] = asyncio.Queue()

    async def handler(reader, writer):
        session = writer.get_extra_info("session")
        request = await reader.read()
        _, back = await session.open_stream()  # from inside the callback, same session
        back.write(request[::-1])
        back.close()
        writer.write(b"ok")
        writer.close()
        if request == b"bye":
            await session.close()  # even the whole session, from one of its own handlers
        await finished.put(request.decode())

    server = await rudp.serve("127.0.0.1", 0, stream_handler=handler, configuration=config)
    async with server:
        client = await rudp.connect("127.0.0.1", server.addresses()[0][1], configuration=config)
        answers = []
        for word in ("one", "two", "three", "bye"):
            reader, writer = await client.open_stream()
            writer.write(word.encode())
            writer.write_eof()
            assert await reader.read() == b"ok"
            back_reader, _ = await client.accept_stream()
            answers.append(await back_reader.read())
            writer.close()
        assert answers == [b"eno", b"owt", b"eerht", b"eyb"]
        assert [await finished.get() for _ in range(4)] == ["one", "two", "three", "bye"]
        await client.wait_closed()  # the server's handler closed the session


@run
async def test_thousands_of_idle_sessions_cost_nothing_until_a_timer_is_due(monkeypatch):
    wakeups = TimerWakeups(monkeypatch)
    server, port, _ = await serve_sessions(IDLE)
    loop = asyncio.get_running_loop()
    sessions: list[rudp.Session] = []
    for _ in range(10):  # in waves, inside the default accept backlog
        sessions += await asyncio.gather(
            *(rudp.connect("127.0.0.1", port, configuration=IDLE) for _ in range(100))
        )
    endpoints = [server._endpoint] + [s._driver.endpoint for s in sessions]
    # The handshakes' last ACKs settle within a few ms; then only keepalives are armed.
    deadline = loop.time() + 10
    while (due := next_deadline(endpoints)) is None or due < loop.time() + IDLE.keepalive / 2:
        await asyncio.sleep(0.05)
        assert loop.time() < deadline, "sessions did not go idle"
    wakeups.count = 0
    sent = sum(e.counters["datagrams_out"] for e in endpoints)
    await asyncio.sleep(1.0)  # idle: the behaviour under test is waiting
    assert wakeups.count == 0
    assert sum(e.counters["datagrams_out"] for e in endpoints) == sent
    # Closing releases every timer (the server after its short TIME-WAIT).
    await asyncio.gather(*(s.close() for s in sessions))
    deadline = loop.time() + 10
    while not all(released(e) or e.closed for e in endpoints):  # after a short TIME-WAIT
        await asyncio.sleep(0.05)
        assert loop.time() < deadline, "timers kept for closed sessions"
    server.close()
