"""The blocking API: many streams on one session, over real loopback sockets.

``shared/reference/stream-semantics.md``'s last section for :mod:`rudp.sync`
(``test_semantics.py`` has it for the asyncio API). Threads wait on events the
test causes; a timeout appears only where the behaviour under test is waiting.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from test_semantics_support import FAST, IDLE, Relay, TimerWakeups, next_deadline, released

import rudp
from rudp import Configuration
from rudp import sync as rsync
from rudp.mux import INITIAL_PEER_WINDOW

pytestmark = pytest.mark.timeout(90)


def on_loop(fn: Callable[[], Any]) -> Any:
    """White box: run ``fn`` on the blocking API's event loop thread."""
    return rsync._LoopThread.get().run(fn)


def mux_of(conn: rsync.Connection):
    return conn.session._driver.mux


@pytest.fixture
def pair() -> Iterator[Callable[..., tuple[rsync.Connection, rsync.Connection]]]:
    """``make(config)`` → (client connection, the server's side of it)."""
    servers: list[rsync.Server] = []
    conns: list[rsync.Connection] = []

    def make(
        config: Configuration = FAST, client_config: Configuration | None = None
    ) -> tuple[rsync.Connection, rsync.Connection]:
        server = rsync.serve("127.0.0.1", 0, configuration=config)
        servers.append(server)
        client = rsync.connect(
            "127.0.0.1", server.address[1], configuration=client_config or config
        )
        accepted, _ = server.accept()
        conns.extend((client, accepted))
        return client, accepted

    yield make
    for conn in conns:
        conn.abort()
    for server in servers:
        server.close()


def read_all(stream: rsync.Stream) -> bytes:
    data = bytearray()
    while chunk := stream.recv(1 << 20):
        data += chunk
    return bytes(data)


class Background:
    """Run a call in a thread; ``result()`` re-raises what it raised."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            self._value = fn(*args)
        except BaseException as exc:
            self._error = exc

    def done(self) -> bool:
        return not self.thread.is_alive()

    def result(self, timeout: float = 30) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "still running"
        if self._error is not None:
            raise self._error
        return self._value


# ------------------------------------------------------------------ independence


def test_a_stopped_reader_does_not_delay_the_other_streams(pair):
    config = FAST.replace(stream_buffer=128 * 1024, session_buffer=512 * 1024)
    client, server = pair(config)
    stopped = client.open_stream()
    blocked_writer = Background(stopped.sendall, os.urandom(3_000_000))
    stopped_peer = server.accept_stream()  # accepted, never read (for now)

    def serve_one() -> None:
        with server.accept_stream() as stream:
            stream.sendall(hashlib.sha256(read_all(stream)).digest())

    def transfer() -> bool:
        with client.open_stream() as stream:
            payload = os.urandom(1_000_000)
            stream.sendall(payload)
            stream.shutdown(socket.SHUT_WR)
            return read_all(stream) == hashlib.sha256(payload).digest()

    servers = [Background(serve_one) for _ in range(2)]
    transfers = [Background(transfer) for _ in range(2)]
    assert [t.result() for t in transfers] == [True, True]
    for s in servers:
        s.result()
    # The others finished while the stopped stream's writer is still blocked...
    assert not blocked_writer.done()
    # ...and what the stopped stream holds at the receiver is bounded by its window.
    info = on_loop(lambda: mux_of(server).stream_info(stopped.stream_id))
    assert 0 < info.recv_buffered <= max(config.stream_buffer, INITIAL_PEER_WINDOW)
    assert len(stopped_peer.recv(3_000_000, socket.MSG_WAITALL)) == 3_000_000  # reader resumes
    blocked_writer.result()  # and so does the writer


def test_opening_a_stream_needs_no_round_trip():
    server = rsync.serve("127.0.0.1", 0, configuration=FAST)
    relay = Relay(server.address)
    try:
        address = on_loop(relay.start)
        client = rsync.connect(*address, configuration=FAST)
        accepted, _ = server.accept()
        relay.drop_replies = True  # from now on the client hears nothing from the server
        heard = on_loop(lambda: relay.to_client)  # read on the relay's thread: none in flight
        stream = client.open_stream()
        stream.sendall(b"first flight")
        accepted.settimeout(5)
        assert accepted.accept_stream().recv(12, socket.MSG_WAITALL) == b"first flight"
        assert relay.to_client == heard  # nothing came back, yet the data arrived
        client.abort()
    finally:
        on_loop(relay.close)
        server.close()


# ------------------------------------------------------------------ ids and limits


def test_stream_ids_never_collide_between_the_two_sides(pair):
    client, server = pair()

    def open_many(conn: rsync.Connection, side: str) -> list[int]:
        ids = []
        for _ in range(10):
            with conn.open_stream() as stream:
                stream.sendall(f"{side} {stream.stream_id}".encode())
                ids.append(stream.stream_id)
        return ids

    def accept_many(conn: rsync.Connection, side: str) -> list[bool]:
        ok = []
        for _ in range(10):
            with conn.accept_stream() as stream:
                ok.append(read_all(stream) == f"{side} {stream.stream_id}".encode())
        return ok

    with ThreadPoolExecutor(4) as pool:  # both sides open at the same time
        client_ids = pool.submit(open_many, client, "client")
        server_ids = pool.submit(open_many, server, "server")
        at_server = pool.submit(accept_many, server, "client")
        at_client = pool.submit(accept_many, client, "server")
        assert at_server.result(30) == at_client.result(30) == [True] * 10
    assert all(sid % 2 == 1 for sid in client_ids.result())
    assert all(sid % 2 == 0 for sid in server_ids.result())
    assert len(set(client_ids.result()) | set(server_ids.result())) == 20
    assert client.stream_id == 3  # the connection's own stream is the client's first


def test_a_session_out_of_stream_ids_refuses_new_streams_cleanly(pair):
    client, server = pair()

    def near_the_end() -> None:
        mux_of(client)._last_local_id = 0xFFFFFFFF - 2  # white box: 2**31 opens is not a test

    on_loop(near_the_end)
    last = client.open_stream()
    assert last.stream_id == 0xFFFFFFFF  # the last id works
    with pytest.raises(rudp.ConnectionRefused, match="exhausted"):
        client.open_stream()
    last.sendall(b"still fine")
    peer = server.accept_stream()
    assert peer.recv(10, socket.MSG_WAITALL) == b"still fine"
    client.sendall(b"and the first stream too")
    assert server.recv(24, socket.MSG_WAITALL) == b"and the first stream too"


def test_streams_per_session_are_bounded_on_both_sides(pair):
    client, server = pair(FAST.replace(max_streams=3), client_config=FAST.replace(max_streams=4))
    streams = [client.open_stream() for _ in range(3)]  # with the connection's own: 4
    with pytest.raises(rudp.ConnectionRefused, match="max_streams=4"):
        client.open_stream()  # our own limit
    for stream in streams[:2]:
        stream.sendall(b"hello")
    # The server holds three (its own limit): the client's third extra stream is refused,
    # which the next call on it reports (the refusal may already be there).
    with pytest.raises(ConnectionRefusedError):
        streams[2].sendall(b"hello")
        streams[2].recv(10)
    for _ in range(2):
        assert server.accept_stream().recv(5, socket.MSG_WAITALL) == b"hello"
    assert on_loop(lambda: mux_of(server).stats.streams_refused) == 1
    client.sendall(b"the session is fine")
    assert server.recv(19, socket.MSG_WAITALL) == b"the session is fine"


def test_send_buffers_are_bounded_per_stream(pair):
    config = FAST.replace(stream_buffer=64 * 1024, session_buffer=128 * 1024)
    client, _server = pair(config)
    streams = [client.open_stream() for _ in range(4)]
    queued = []
    for stream in streams:
        stream.settimeout(0.5)
        with pytest.raises(rsync.SendTimeout) as info:
            stream.sendall(bytes(2_000_000))  # nobody reads on the other side
        queued.append(info.value.bytes_sent)
    # Each stream took its buffers and window, and then nothing more.
    bound = 2 * config.stream_buffer + max(config.stream_buffer, INITIAL_PEER_WINDOW)
    assert all(0 < q <= bound for q in queued), queued


# ------------------------------------------------------------------ re-entrancy


def test_handlers_may_use_any_api_on_their_own_session_without_deadlock(pair):
    """A server thread handling a stream opens a stream back, writes and closes it,
    and the last one closes the whole session from inside, with tight stream limits."""
    config = FAST.replace(max_streams=8, stream_backlog=2)
    client, server = pair(config)
    handled: list[str] = []

    def handle(stream: rsync.Stream) -> None:
        with stream:
            request = read_all(stream)
            with server.open_stream() as back:  # from inside the handler, same session
                back.sendall(request[::-1])
            stream.sendall(b"ok")
        handled.append(request.decode())
        if request == b"bye":
            server.close()  # even the whole session, from one of its own handlers

    def dispatcher() -> None:
        while True:
            try:
                stream = server.accept_stream()
            except rudp.RudpError:
                return
            threading.Thread(target=handle, args=(stream,), daemon=True).start()

    dispatch = Background(dispatcher)
    answers = []
    for word in ("one", "two", "three", "bye"):
        with client.open_stream() as stream:
            stream.sendall(word.encode())
            stream.shutdown(socket.SHUT_WR)
            assert read_all(stream) == b"ok"
            answers.append(read_all(client.accept_stream()))
    assert answers == [b"eno", b"owt", b"eerht", b"eyb"]
    dispatch.result()
    assert handled == ["one", "two", "three", "bye"]
    assert client.recv(10) == b""  # the server closed the session: EOF on the first stream


def test_blocking_calls_from_a_loop_callback_fail_fast_instead_of_deadlocking(pair):
    client, _server = pair()

    def callback() -> None:
        client.open_stream()  # would wait for the loop it is running on

    with pytest.raises(RuntimeError, match="its own event loop"):
        on_loop(callback)
    client.sendall(b"fine")


# ------------------------------------------------------------------ idle sessions


def test_thousands_of_idle_sessions_cost_nothing_until_a_timer_is_due(monkeypatch):
    wakeups = TimerWakeups(monkeypatch)
    # Eight threads connect faster than one accepts: a backlog for all of them.
    server = rsync.serve("127.0.0.1", 0, configuration=IDLE.replace(backlog=1000))
    port = server.address[1]
    accepted: list[rsync.Connection] = []
    acceptor = Background(lambda: [accepted.append(server.accept()[0]) for _ in range(1000)])
    with ThreadPoolExecutor(8) as pool:
        clients = list(
            pool.map(lambda _: rsync.connect("127.0.0.1", port, configuration=IDLE), range(1000))
        )
    acceptor.result()

    def endpoints() -> list:
        return [server._server._endpoint] + [c.session._driver.endpoint for c in clients]

    every = on_loop(endpoints)
    deadline = time.monotonic() + 10
    while (due := on_loop(lambda: next_deadline(every))) is None or due < on_loop(
        lambda: rsync._LoopThread.get().loop.time() + IDLE.keepalive / 2
    ):
        time.sleep(0.05)  # the handshakes' last ACKs settle; then only keepalives are armed
        assert time.monotonic() < deadline, "sessions did not go idle"
    wakeups.count = 0
    sent = on_loop(lambda: sum(e.counters["datagrams_out"] for e in every))
    time.sleep(1.0)  # idle: the behaviour under test is waiting
    assert on_loop(lambda: wakeups.count) == 0
    assert on_loop(lambda: sum(e.counters["datagrams_out"] for e in every)) == sent
    # Closing releases every timer (the server after its short TIME-WAIT).
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(rsync.Connection.close, clients))
    deadline = time.monotonic() + 10
    while not on_loop(lambda: all(released(e) or e.closed for e in every)):
        time.sleep(0.05)
        assert time.monotonic() < deadline, "timers kept for closed sessions"
    assert len(accepted) == 1000
    server.close()
