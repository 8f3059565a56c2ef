"""The blocking API over real loopback sockets: the behaviours of a reliable byte stream.

Each test is a line of ``shared/reference/stream-semantics.md`` (connecting,
reading, writing, closing) for :mod:`rudp.sync`; the asyncio API has the same
in ``test_asyncio.py``. Threads wait on events the test causes; a timeout
appears only where the behaviour under test *is* waiting.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from test_semantics_support import FAST

import rudp
from rudp import Configuration
from rudp import sync as rsync

#: Small buffers so that backpressure shows with little data.
SMALL = FAST.replace(send_buffer=32 * 1024, stream_buffer=16 * 1024, sndwnd=16, rcvwnd=16)

pytestmark = pytest.mark.timeout(60)


class Harness:
    """A blocking server whose accepted connections each run ``handler`` in a thread."""

    def __init__(self, handler: Callable[[rsync.Connection], None] | None, config: Configuration):
        self.server = rsync.serve("127.0.0.1", 0, configuration=config)
        self.port = self.server.address[1]
        self.config = config
        self.errors: list[BaseException] = []
        self.threads: list[threading.Thread] = []
        self._acceptor: threading.Thread | None = None
        if handler is not None:
            self._acceptor = threading.Thread(
                target=self._accept_loop, args=(handler,), daemon=True
            )
            self._acceptor.start()

    def _accept_loop(self, handler: Callable[[rsync.Connection], None]) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except rudp.ClosedError:
                return
            thread = threading.Thread(target=self._run, args=(handler, conn), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _run(self, handler: Callable[[rsync.Connection], None], conn: rsync.Connection) -> None:
        try:
            handler(conn)
        except rudp.RudpError:
            pass  # the client went away or reset: the test looks at its own side
        except BaseException as exc:
            self.errors.append(exc)

    def connect(self, **kwargs) -> rsync.Connection:
        kwargs.setdefault("configuration", self.config)
        return rsync.connect("127.0.0.1", self.port, **kwargs)

    def close(self) -> None:
        self.server.close()
        if self._acceptor is not None:
            self._acceptor.join(10)
        for thread in self.threads:
            thread.join(10)
        assert not self.errors, self.errors


def echo(conn: rsync.Connection) -> None:
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


@pytest.fixture
def serve() -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(handler=echo, config: Configuration = FAST) -> Harness:
        made.append(Harness(handler, config))
        return made[-1]

    yield make
    for harness in made:
        harness.close()


def free_udp_port() -> int:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


def run_on_loop(fn: Callable[[], object]) -> object:
    """White box: run ``fn`` on the blocking API's event loop thread."""
    return rsync._LoopThread.get().run(fn)


# ------------------------------------------------------------------ connecting


def test_connect_where_nothing_listens_is_refused_fast():
    port = free_udp_port()  # the host answers with ICMP port unreachable
    start = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        rsync.connect("127.0.0.1", port, configuration=FAST)
    assert time.monotonic() - start < FAST.connect_timeout / 2


@pytest.mark.parametrize("how", ["timeout argument", "configuration"])
def test_connect_to_a_silent_peer_times_out(how):
    black_hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    black_hole.bind(("127.0.0.1", 0))  # bound, never answers
    port = black_hole.getsockname()[1]
    try:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            if how == "configuration":
                rsync.connect("127.0.0.1", port, configuration=FAST.replace(connect_timeout=0.5))
            else:
                rsync.connect("127.0.0.1", port, configuration=FAST, timeout=0.5)
        assert 0.5 <= time.monotonic() - start < 1.5
    finally:
        black_hole.close()


def test_connect_timeout_argument_becomes_the_connections_timeout(serve):
    harness = serve()
    with harness.connect(timeout=0.3) as conn:
        assert conn.gettimeout() == 0.3
        with pytest.raises(TimeoutError):
            conn.recv(10)  # the echo server has nothing to say


def test_full_accept_queue_refuses_new_clients_cleanly(serve):
    harness = serve(handler=None, config=FAST.replace(backlog=2))
    waiting = [harness.connect(), harness.connect()]  # the accept queue is now full
    start = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        harness.connect()  # refused: no session object at all, never a half-working one
    assert time.monotonic() - start < FAST.connect_timeout / 2
    assert harness.server.stats["accept_queue"] == 2
    assert harness.server.stats["refused"] >= 1

    accepted, address = harness.server.accept()  # a slot frees up...
    assert address == waiting[0].getsockname()
    late = harness.connect()  # ...and the next client gets in
    pairs = [(waiting[0], accepted)]
    pairs += [(client, harness.server.accept()[0]) for client in (waiting[1], late)]  # in order
    for client, server_side in pairs:
        client.sendall(b"hello")
        assert server_side.recv(5, socket.MSG_WAITALL) == b"hello"
        client.abort()


def test_many_clients_on_one_server_port(serve):
    harness = serve()
    results: dict[int, bool] = {}

    def client(i: int) -> None:
        with harness.connect() as conn:
            message = os.urandom(1000 + i)
            conn.sendall(message)
            results[i] = conn.recv(len(message), socket.MSG_WAITALL) == message

    threads = [threading.Thread(target=client, args=(i,)) for i in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == dict.fromkeys(range(30), True)


# ------------------------------------------------------------------ reading


def test_read_blocks_and_a_timed_out_read_loses_nothing(serve):
    gate = threading.Event()

    def late_writer(conn):
        gate.wait(10)
        conn.sendall(b"late data")
        conn.recv(1)

    harness = serve(late_writer)
    with harness.connect() as conn:
        conn.settimeout(0.2)
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            conn.recv(100)  # nothing there: the read blocks until its timeout
        assert time.monotonic() - start >= 0.2
        conn.setblocking(False)
        with pytest.raises(BlockingIOError):
            conn.recv(100)  # non-blocking: no wait at all
        conn.settimeout(None)
        gate.set()
        assert conn.recv(9, socket.MSG_WAITALL) == b"late data"  # nothing lost


def test_the_timeout_covers_waiting_for_the_clients_first_stream(serve):
    harness = serve(handler=None)

    async def asyncio_client() -> rudp.Session:
        return await rudp.connect("127.0.0.1", harness.port, configuration=FAST)

    session = run_on_loop(asyncio_client)  # a session that opens no stream
    accepted, _ = harness.server.accept()
    accepted.settimeout(0.2)
    with pytest.raises(TimeoutError):
        accepted.recv(10)
    with pytest.raises(rsync.SendTimeout):
        accepted.sendall(b"x")
    accepted.setblocking(False)
    with pytest.raises(BlockingIOError):
        accepted.recv(10)
    run_on_loop(session.abort)


def test_a_partial_waitall_read_that_times_out_keeps_its_bytes(serve):
    def half(conn):
        conn.sendall(b"12345")
        conn.recv(1)  # until the client is done

    harness = serve(half)
    with harness.connect() as conn:
        conn.settimeout(0.3)
        with pytest.raises(TimeoutError):
            conn.recv(10, socket.MSG_WAITALL)  # 5 of 10 bytes came, then time ran out
        assert conn.recv(10) == b"12345"  # the 5 bytes are still there


def test_read_returns_what_is_available_and_waitall_waits_for_all(serve):
    def parts(conn):
        for part in (b"ab", b"cd", b"ef"):
            conn.sendall(part)
        conn.recv(1)  # the client's go-ahead
        conn.sendall(b"0123456789")
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)

    harness = serve(parts)
    with harness.connect() as conn:
        got = conn.recv(1000)  # returns without waiting to fill 1000 bytes
        assert 0 < len(got) <= 6
        while len(got) < 6:
            got += conn.recv(1000)
        assert got == b"abcdef"
        conn.sendall(b"!")
        assert conn.recv(4, socket.MSG_WAITALL) == b"0123"
        buffer = bytearray(100)
        assert conn.recv_into(buffer, 3, socket.MSG_WAITALL) == 3
        assert buffer[:3] == b"456"
        assert conn.recv(10, socket.MSG_WAITALL) == b"789"  # fewer only because EOF came
        assert conn.recv(10) == b""


def test_a_byte_stream_keeps_no_boundaries(serve):
    payload = os.urandom(300_000)
    sent = threading.Event()

    def writer(conn):
        conn.sendall(payload)  # one call...
        for _ in range(100):
            conn.sendall(b"x")  # ...and many tiny ones
        conn.close()  # returns once the client acknowledged all of it
        sent.set()

    harness = serve(writer, config=SMALL)
    with harness.connect() as conn:
        sizes = []
        while sum(sizes) < len(payload):
            sizes.append(len(conn.recv(len(payload) - sum(sizes))))
        # One write arrives in several reads: the stream's window (16 KiB) is all that
        # can be buffered, so no single read can return all 300 kB.
        assert len(sizes) > 1 and max(sizes) <= SMALL.stream_buffer
        assert sent.wait(10)
        assert conn.recv(1000) == b"x" * 100  # several writes arrive in one read


def test_message_mode_keeps_boundaries(serve):
    config = FAST.replace(message_mode=True, send_buffer=64 * 1024)
    messages = [b"a", os.urandom(5000), os.urandom(300_000), b"0123456789", b"next"]

    def sender(conn):
        for message in messages:
            conn.sendall(message)  # one call, one message (even beyond the send buffer)
        conn.recv(1)

    harness = serve(sender, config=config)
    with harness.connect() as conn:
        assert [conn.recv(1 << 20) for _ in messages[:3]] == messages[:3]
        assert conn.recv(4) == b"0123"  # the rest of a message comes next, alone
        assert conn.recv(1000) == b"456789"
        assert conn.recv(1000) == b"next"


def test_eof_after_peer_close_drains_everything_first(serve):
    payload = os.urandom(2_000_000)

    def send_and_close(conn):
        conn.sendall(payload)
        conn.close()  # graceful: all of it, then EOF

    harness = serve(send_and_close)
    with harness.connect() as conn:
        data = bytearray()
        while chunk := conn.recv(1 << 20):
            data += chunk
        assert hashlib.sha256(data).digest() == hashlib.sha256(payload).digest()
        assert conn.recv(10) == b""  # EOF again, never an error
        assert conn.recv(10) == b""


def test_read_on_a_locally_closed_connection_raises_closed(serve):
    harness = serve()
    conn = harness.connect()
    conn.close()
    with pytest.raises(rudp.ClosedError):
        conn.recv(10)
    with pytest.raises(rudp.ClosedError):
        conn.sendall(b"x")


@pytest.fixture
def blocked_reads(monkeypatch) -> threading.Semaphore:
    """Released each time a blocking read is about to wait on the loop.

    The loop runs one call at a time, so a close() or shutdown() issued after
    the release reaches the loop only once that read is waiting.
    """
    entered = threading.Semaphore(0)
    original = rsync.Stream._recv

    async def spy(self, *args):
        entered.release()
        return await original(self, *args)

    monkeypatch.setattr(rsync.Stream, "_recv", spy)
    return entered


def test_close_wakes_a_blocked_reader(serve, blocked_reads):
    harness = serve()
    with harness.connect() as conn:
        stream = conn.open_stream()
        errors: list[BaseException] = []

        def reader():
            try:
                stream.recv(10)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=reader)
        thread.start()
        assert blocked_reads.acquire(timeout=10)
        stream.close()
        thread.join(10)
        assert not thread.is_alive() and isinstance(errors[0], rudp.ClosedError)


def test_close_racing_a_read_on_its_way_to_the_loop_still_wins():
    conn = rsync.Connection(rsync._LoopThread.get(), _NoSession(), None, None)
    conn._closed = True  # as if close() ran on the loop just before this read got there
    with pytest.raises(rudp.ClosedError):
        run_on_loop(lambda: conn._op(conn._recv(10, False, None), True))


class _NoSession:
    peer_address = None


# ------------------------------------------------------------------ writing


def test_sendall_blocks_while_the_peer_does_not_read_and_a_timeout_says_how_much(serve):
    release = threading.Event()
    received = bytearray()
    finished = threading.Event()

    def slow_reader(conn):
        release.wait(20)
        while data := conn.recv(65536):
            received.extend(data)
        finished.set()

    harness = serve(slow_reader, config=SMALL)
    payload = os.urandom(1_000_000)
    with harness.connect() as conn:
        conn.settimeout(0.5)
        with pytest.raises(rsync.SendTimeout) as info:
            conn.sendall(payload)  # the peer reads nothing: its window closes, sendall blocks
        sent = info.value.bytes_sent
        assert isinstance(info.value, TimeoutError)
        # Bounded: what was queued is the stream's buffers plus the windows, not 1 MB.
        assert 0 < sent <= 4 * SMALL.stream_buffer + SMALL.rcvwnd * SMALL.mtu + 256 * 1024
        assert not received
        release.set()  # resumes as the peer reads
        conn.settimeout(None)
        conn.sendall(payload[sent:])  # the rest, exactly once
    assert finished.wait(20)
    assert bytes(received) == payload


def test_send_returns_how_much_it_took_and_non_blocking_send_says_when_full(serve):
    release = threading.Event()

    def stalled(conn):
        release.wait(20)
        while conn.recv(65536):
            pass

    harness = serve(stalled, config=SMALL)
    with harness.connect() as conn:
        n = conn.send(bytes(100_000))
        assert 0 < n <= SMALL.stream_buffer  # one buffer's worth at most
        conn.setblocking(False)
        total = n
        with pytest.raises(BlockingIOError):
            while True:
                total += conn.send(bytes(100_000))
        assert total < 1_000_000  # it stopped taking bytes: bounded
        with pytest.raises(BlockingIOError) as info:
            conn.sendall(bytes(100_000))
        assert info.value.characters_written == 0
        release.set()


def test_concurrent_threads_never_interleave_bytes_within_one_call(serve):
    # Tiny buffers and windows: every call spans many buffers' worth and has to wait
    # for the network between them, so the calls overlap.
    config = FAST.replace(stream_buffer=1024, send_buffer=4096, sndwnd=2, rcvwnd=2)
    size = 40_000
    harness = serve(config=config)
    blocks = [bytes([i]) * size for i in range(8)]
    with harness.connect() as conn:
        threads = [threading.Thread(target=conn.sendall, args=(block,)) for block in blocks]
        for thread in threads:
            thread.start()
        echoed = conn.recv(size * len(blocks), socket.MSG_WAITALL)
        for thread in threads:
            thread.join(10)
    chunks = [echoed[i : i + size] for i in range(0, len(echoed), size)]
    assert sorted(chunks) == sorted(blocks)  # each call arrived whole


def test_write_after_peer_reset_fails_clearly_and_after_local_close_at_once(serve):
    def resetter(conn):
        conn.recv(1)
        conn.abort()

    harness = serve(resetter)
    conn = harness.connect()
    conn.sendall(b"x")
    with pytest.raises(ConnectionResetError):
        conn.recv(10)
    with pytest.raises(ConnectionResetError):
        conn.sendall(b"more")
    conn.close()
    other = harness.connect()
    other.close()
    with pytest.raises(rudp.ClosedError):
        other.sendall(b"late")  # at once, without asking the network


def test_shutdown_wr_half_closes_and_the_other_direction_keeps_working(serve):
    def upper(conn):
        request = bytearray()
        while data := conn.recv(1000):  # until EOF
            request += data
        conn.sendall(bytes(request).upper())
        conn.close()

    harness = serve(upper)
    with harness.connect() as conn:
        conn.sendall(b"hello over a half-closed stream")
        conn.shutdown(socket.SHUT_WR)
        answer = b""
        while data := conn.recv(1000):
            answer += data
        assert answer == b"HELLO OVER A HALF-CLOSED STREAM"
        with pytest.raises(rudp.ClosedError):
            conn.sendall(b"late")


def test_shutdown_rd_ends_reads_and_wakes_a_blocked_reader(serve, blocked_reads):
    harness = serve()
    with harness.connect() as conn:
        results: list[bytes] = []
        thread = threading.Thread(target=lambda: results.append(conn.recv(10)))
        thread.start()
        assert blocked_reads.acquire(timeout=10)
        conn.shutdown(socket.SHUT_RD)
        thread.join(10)
        assert results == [b""]
        conn.sendall(b"still writable")
        assert conn.recv(10) == b""
        with pytest.raises(ValueError):
            conn.shutdown(7)


# ------------------------------------------------------------------ closing


def test_graceful_close_delivers_everything_then_eof(serve):
    payload = os.urandom(1_500_000)
    digests: list[bytes] = []
    done = threading.Event()

    def sink(conn):
        data = bytearray()
        while chunk := conn.recv(1 << 20):
            data += chunk
        digests.append(hashlib.sha256(data).digest())
        done.set()
        conn.close()

    harness = serve(sink)
    conn = harness.connect()
    conn.sendall(payload)
    conn.close()  # returns once the server acknowledged everything
    assert done.wait(20)
    assert digests == [hashlib.sha256(payload).digest()]


def test_abort_discards_queued_data_and_the_peer_sees_a_reset(serve):
    outcome: list[object] = []
    got_first = threading.Event()
    aborted = threading.Event()

    def reader(conn):
        conn.recv(1)
        got_first.set()
        aborted.wait(10)  # stop reading so that the client's data stays queued
        try:
            while conn.recv(65536):
                pass
            outcome.append("eof")
        except ConnectionResetError as exc:
            outcome.append(exc)

    harness = serve(reader, config=SMALL)
    conn = harness.connect()
    conn.sendall(b"!")
    assert got_first.wait(10)
    conn.settimeout(0.3)
    with pytest.raises(rsync.SendTimeout):
        conn.sendall(bytes(1_000_000))  # the peer reads nothing: most of it stays queued
    conn.abort()
    aborted.set()
    for thread in harness.threads:
        thread.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], ConnectionResetError)


def test_vanished_peer_fails_pending_reads_and_writes_in_bounded_time(serve):
    harness = serve(handler=None, config=SMALL)
    conn = harness.connect()
    accepted, _ = harness.server.accept()
    accepted.sendall(b"ping")
    assert conn.recv(4, socket.MSG_WAITALL) == b"ping"
    writer_stream = conn.open_stream()
    errors: dict[str, BaseException] = {}

    def attempt(name: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except BaseException as exc:
            errors[name] = exc

    threads = [
        threading.Thread(target=attempt, args=("read", lambda: conn.recv(10))),
        threading.Thread(
            target=attempt, args=("write", lambda: writer_stream.sendall(bytes(10**7)))
        ),
    ]
    for thread in threads:
        thread.start()
    # The server vanishes without a word (crash, cable pulled).
    run_on_loop(lambda: harness.server._server._endpoint.close())
    start = time.monotonic()
    for thread in threads:
        thread.join(SMALL.idle_timeout + 5)
    assert time.monotonic() - start <= SMALL.idle_timeout + 1.0
    assert set(errors) == {"read", "write"}
    for exc in errors.values():
        assert isinstance(exc, rudp.RudpError) and isinstance(exc, TimeoutError | ConnectionError)
    conn.close()


def test_close_twice_is_harmless_and_releases_everything(serve):
    harness = serve()
    for _ in range(3):
        conn = harness.connect()
        conn.sendall(b"abc")
        assert conn.recv(3, socket.MSG_WAITALL) == b"abc"
        conn.close()
        conn.close()
        assert conn.closed
    endpoint = harness.server._server._endpoint

    def released() -> bool:
        return not endpoint.connections and not endpoint._armed

    deadline = time.monotonic() + 10
    while not run_on_loop(released):  # the server forgets them once TIME-WAIT is over
        assert time.monotonic() < deadline, "connections not released"
        time.sleep(0.05)
    harness.server.close()
    harness.server.close()


def test_server_close_resets_its_connections_and_wakes_accept(serve):
    harness = serve(handler=None)
    conn = harness.connect()
    harness.server.accept()
    errors: list[BaseException] = []

    def acceptor():
        try:
            harness.server.accept()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=acceptor)
    thread.start()
    harness.server.close()
    thread.join(10)
    assert isinstance(errors[0], rudp.ClosedError)
    with pytest.raises(ConnectionResetError):
        conn.recv(10)
    with pytest.raises(rudp.ClosedError):
        harness.server.accept()


# ------------------------------------------------------------------ the blocking API itself


def test_blocking_calls_from_the_loop_thread_raise_instead_of_deadlocking(serve):
    harness = serve()
    conn = harness.connect()

    async def inside_the_loop() -> None:
        conn.recv(1)

    with pytest.raises(RuntimeError, match="its own event loop"):
        run_on_loop(inside_the_loop)
    conn.close()


def test_socket_like_surface(serve):
    harness = serve()
    with harness.connect() as conn:
        assert conn.getpeername() == harness.server.getsockname()
        assert conn.getsockname()[0] == "127.0.0.1"
        assert conn.stream_id == 3  # the client's first stream
        assert conn.getblocking() and conn.gettimeout() is None
        with pytest.raises(ValueError):
            conn.settimeout(-1)
        with pytest.raises(ValueError):
            conn.recv(-1)
        with pytest.raises(ValueError):
            conn.recv(10, socket.MSG_PEEK)
        assert conn.recv(0) == b"" and conn.send(b"") == 0
        assert conn.ping() > 0
        assert conn.stats["mux_streams_opened"] == 1
        buffer = bytearray(b"......")
        conn.sendall(memoryview(b"abcdef")[1:4])
        assert conn.recv_into(buffer, 3, socket.MSG_WAITALL) == 3
        assert buffer == b"bcd..."
    assert "closed" in repr(conn)


def test_asyncio_clients_can_talk_to_a_blocking_server(serve):
    harness = serve()

    async def client() -> bytes:
        reader, writer = await rudp.open_connection("127.0.0.1", harness.port, configuration=FAST)
        writer.write(b"from asyncio")
        data = await reader.readexactly(12)
        writer.close()
        await writer.wait_closed()
        return data

    assert asyncio.run(client()) == b"from asyncio"
