"""The blocking API: socket-like objects for threads, built on :mod:`rudp.asyncio`.

* ``conn = rudp.sync.connect(host, port)`` gives a :class:`Connection`. It
  behaves like a connected TCP socket on its first stream (``recv``,
  ``sendall``, ``shutdown``, ``settimeout``...), and ``open_stream()`` /
  ``accept_stream()`` give more :class:`Stream` objects with the same methods.
* ``server = rudp.sync.serve(host, port)``; ``conn, address = server.accept()``.

All protocol work runs on ONE event-loop thread per process (a daemon, started
on first use), the same code the asyncio API runs; a blocking call hands its
operation to that loop and waits for the answer. So the behaviour is exactly
the asyncio API's, and calling the blocking API from that loop's own thread
(inside an asyncio handler) raises :class:`RuntimeError` instead of deadlocking.

Timeouts follow :mod:`socket`: ``settimeout(None)`` blocks, ``settimeout(t)``
raises :class:`TimeoutError` after ``t`` seconds, ``settimeout(0)`` (or
``setblocking(False)``) raises :class:`BlockingIOError` instead of waiting.
A timeout never loses data:

* a read that times out consumed nothing; the bytes come with the next read;
* ``send()`` queues up to one buffer's worth and returns how much; one that
  times out queued nothing;
* ``sendall()`` queues the data a buffer's worth at a time as room frees up.
  When the time runs out it raises :class:`SendTimeout` (a ``TimeoutError``)
  whose ``bytes_sent`` says how many leading bytes of *this call* were queued:
  those will be delivered, the rest were not queued. Non-blocking, it raises
  ``BlockingIOError`` with ``characters_written`` likewise.

Writes from many threads on one stream are serialised per call: the bytes of
one ``send``/``sendall`` are never interleaved with another call's.

With ``Configuration(message_mode=True)`` boundaries are kept: each
``send``/``sendall`` is one message, and each ``recv`` returns at most one
(the next, or its next part when it is longer than asked).

``close()`` on a :class:`Connection` is graceful and waits until the peer has
acknowledged everything written (the loop thread is a daemon: a program that
exits without closing may lose what was still queued). ``close()`` on a
:class:`Stream` does not wait: its bytes still go out, then the peer reads EOF.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from rudp import asyncio as rudp_asyncio
from rudp.config import Configuration
from rudp.errors import ClosedError
from rudp.events import Address

__all__ = ["Connection", "SendTimeout", "Server", "Stream", "connect", "serve"]

T = TypeVar("T")
_UNSET: Any = object()


class SendTimeout(TimeoutError):
    """``sendall()`` ran out of time; ``bytes_sent`` leading bytes of the call were queued
    (and will be delivered unless the stream fails), the rest were not."""

    def __init__(self, bytes_sent: int) -> None:
        super().__init__(f"timed out after queueing {bytes_sent} bytes")
        self.bytes_sent = bytes_sent


# ---------------------------------------------------------------------------- the loop thread


class _Call:
    """One blocking call's result, handed from the loop thread to the caller.

    A pre-acquired lock is the cheapest one-shot wake-up between two threads.
    """

    __slots__ = ("_done", "_error", "_value", "task")

    def __init__(self) -> None:
        self._done = threading.Lock()
        self._done.acquire()
        self._value: Any = None
        self._error: BaseException | None = None
        self.task: asyncio.Task[Any] | None = None

    def set_result(self, value: Any) -> None:
        self._value = value
        self._done.release()

    def set_exception(self, error: BaseException) -> None:
        self._error = error
        self._done.release()

    def from_task(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            self.set_exception(ClosedError("the operation was cancelled"))
        elif (error := task.exception()) is not None:
            self.set_exception(error)
        else:
            self.set_result(task.result())

    def wait(self) -> Any:
        self._done.acquire()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self._value


class _LoopThread:
    """The process's one event loop for the blocking API, on a daemon thread."""

    _lock = threading.Lock()
    _current: _LoopThread | None = None

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(
            target=self._run, args=(ready,), name="rudp.sync loop", daemon=True
        )
        self.thread.start()
        ready.wait()

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(ready.set)
        self.loop.run_forever()

    @classmethod
    def get(cls) -> _LoopThread:
        """The running loop thread, started on first use (and again in a forked child)."""
        current = cls._current
        if current is None or current.pid != os.getpid():
            with cls._lock:
                current = cls._current
                if current is None or current.pid != os.getpid():
                    current = cls._current = cls()
        return current

    def run(self, fn: Callable[..., Coroutine[Any, Any, T] | T], *args: Any) -> T:
        """Run ``fn(*args)`` on the loop; if it returns a coroutine, run that to completion."""
        if threading.get_ident() == self.thread.ident:
            raise RuntimeError(
                "rudp.sync was called from its own event loop (inside an asyncio handler?): "
                "use the asyncio API there"
            )
        if self.pid != os.getpid():
            raise RuntimeError("rudp.sync objects do not survive fork(); connect again")
        call = _Call()
        self.loop.call_soon_threadsafe(self._start, call, fn, args)
        try:
            return call.wait()  # type: ignore[no-any-return]
        except KeyboardInterrupt:
            if call.task is not None:
                self.loop.call_soon_threadsafe(call.task.cancel)
            raise

    def _start(self, call: _Call, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            result = fn(*args)
        except Exception as exc:
            call.set_exception(exc)
            return
        if asyncio.iscoroutine(result):
            call.task = self.loop.create_task(result)
            call.task.add_done_callback(call.from_task)
        else:
            call.set_result(result)


class _Deadline:
    """``async with`` a socket-style timeout: None waits forever, 0 never waits.

    Expiry cancels the awaited operation, and every rudp wait is cancellation-safe
    (data is taken only in the step that returns it), so nothing is lost.
    """

    __slots__ = ("_cm", "timeout")

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self._cm = None if timeout is None else asyncio.timeout(timeout)

    @property
    def expired(self) -> bool:
        return self._cm is not None and self._cm.expired()

    async def __aenter__(self) -> _Deadline:
        if self._cm is not None:
            await self._cm.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        if self._cm is None:
            return None
        try:
            return await self._cm.__aexit__(*exc_info)
        except TimeoutError:
            if self._cm.expired():
                if self.timeout == 0:
                    raise BlockingIOError(errno.EAGAIN, "the operation would block") from None
                raise TimeoutError("timed out") from None
            raise


def _retrieved(future: asyncio.Future[Any]) -> None:
    """A background step's error reaches every caller that awaits it; when none is left
    waiting, asyncio must not log it as lost."""
    if not future.cancelled():
        future.exception()


def _check_timeout(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    if value < 0:
        raise ValueError("Timeout value out of range")
    return value


# ---------------------------------------------------------------------------- streams


class Stream:
    """One rudp byte stream with the methods of a connected TCP socket.

    Get one from :meth:`Connection.open_stream` or :meth:`Connection.accept_stream`.
    Safe to share between threads.
    """

    def __init__(
        self,
        portal: _LoopThread,
        pair: tuple[rudp_asyncio.StreamReader, rudp_asyncio.StreamWriter] | None,
        timeout: float | None,
        sockname: Address | None,
        peername: Address | None,
    ) -> None:
        self._portal = portal
        self._pair = pair
        self._timeout = timeout
        self._sockname = sockname
        self._peername = peername
        self._closed = False
        self._shut_rd = False
        self._readers: set[asyncio.Task[Any]] = set()  # blocked reads: shutdown(SHUT_RD) wakes them
        self._waiting: set[asyncio.Task[Any]] = set()  # every blocked call: close() wakes them
        self._write_lock: asyncio.Lock | None = None  # one writing call at a time
        self._chunk = 0  # the most one write hands the stream: its buffer size

    # ------------------------------------------------------------ loop side

    async def _streams(self) -> tuple[rudp_asyncio.StreamReader, rudp_asyncio.StreamWriter]:
        assert self._pair is not None
        return self._pair

    def _set_pair(self, pair: tuple[rudp_asyncio.StreamReader, rudp_asyncio.StreamWriter]) -> None:
        self._pair = pair
        writer = pair[1]
        config: Configuration = writer.get_extra_info("connection").configuration
        if writer.get_extra_info("stream_id") is not None:
            self._chunk = config.stream_buffer
        elif config.message_mode:
            self._chunk = config.max_message_size  # one call, one message: never split
        else:
            self._chunk = config.send_buffer

    async def _op(self, coro: Coroutine[Any, Any, T], reading: bool = False) -> T:
        """Run one blocking call so that close() (and, for reads, shutdown()) can wake it."""
        if self._closed:  # close() reached the loop first
            coro.close()
            raise ClosedError("the stream is closed")
        task = asyncio.current_task()
        assert task is not None
        self._waiting.add(task)
        if reading:
            self._readers.add(task)
        try:
            return await coro
        except asyncio.CancelledError:
            if self._closed:
                raise ClosedError("closed while the call waited") from None
            raise
        finally:
            self._waiting.discard(task)
            self._readers.discard(task)

    def _wake(self, tasks: set[asyncio.Task[Any]]) -> None:
        for task in list(tasks):
            task.cancel()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the stream is closed")

    async def _recv(self, n: int, waitall: bool, timeout: float | None) -> bytes:
        if self._shut_rd:
            return b""
        try:
            async with _Deadline(timeout):
                reader, _ = await self._streams()  # a server waits for the client's first
                if not waitall:
                    return await reader.read(n)
                try:
                    return await reader.readexactly(n)
                except asyncio.IncompleteReadError as exc:
                    return exc.partial  # EOF first: what there was, as recv(MSG_WAITALL) does
        except asyncio.CancelledError:
            if self._shut_rd and not self._closed:
                return b""
            raise

    async def _write(self, data: memoryview, timeout: float | None, whole: bool) -> int:
        """Queue ``data`` (all of it, or with ``whole`` False one buffer's worth) as room
        frees up, holding the stream's write lock so calls never interleave."""
        if self._write_lock is None:
            self._write_lock = asyncio.Lock()
        deadline = _Deadline(timeout)
        sent = 0
        try:
            async with deadline, self._write_lock:
                _, writer = await self._streams()
                while True:
                    await writer.drain()  # the only wait: nothing is queued before it returns
                    end = min(len(data), sent + self._chunk)
                    writer.write(data[sent:end])
                    sent = end
                    if sent == len(data) or not whole:
                        return sent
        except BlockingIOError:
            raise BlockingIOError(errno.EAGAIN, "the operation would block", sent) from None
        except TimeoutError:
            if deadline.expired and whole:
                raise SendTimeout(sent) from None
            raise

    # ------------------------------------------------------------ socket API

    def _run(self, fn: Callable[..., Coroutine[Any, Any, T] | T], *args: Any) -> T:
        return self._portal.run(fn, *args)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Up to ``bufsize`` bytes as soon as any are there; ``b""`` at EOF.

        ``flags=socket.MSG_WAITALL`` waits for all ``bufsize`` bytes (fewer only at EOF).
        """
        if bufsize < 0:
            raise ValueError("negative buffersize in recv")
        if flags & ~socket.MSG_WAITALL:
            raise ValueError(f"unsupported recv flags {flags:#x} (only MSG_WAITALL)")
        self._check_open()
        if bufsize == 0:
            return b""
        waitall = bool(flags & socket.MSG_WAITALL)
        return self._run(lambda: self._op(self._recv(bufsize, waitall, self._timeout), True))

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """Like :meth:`recv`, into ``buffer``; returns the number of bytes stored."""
        view = memoryview(buffer).cast("B")
        if nbytes < 0:
            raise ValueError("negative buffersize in recv_into")
        if nbytes > len(view):
            raise ValueError("buffer too small for requested bytes")
        data = self.recv(nbytes or len(view), flags)
        view[: len(data)] = data
        return len(data)

    def send(self, data: Any) -> int:
        """Queue up to one buffer's worth of ``data`` once there is room; return how much."""
        view = memoryview(data).cast("B")  # each piece is copied when it is queued
        self._check_open()
        if not view:
            return 0
        return self._run(lambda: self._op(self._write(view, self._timeout, whole=False)))

    def sendall(self, data: Any) -> None:
        """Queue all of ``data``, waiting for room as needed (see the module's notes on timeouts)."""
        view = memoryview(data).cast("B")  # each piece is copied when it is queued
        self._check_open()
        if not view:
            return
        self._run(lambda: self._op(self._write(view, self._timeout, whole=True)))

    def settimeout(self, value: float | None) -> None:
        self._timeout = _check_timeout(value)

    def gettimeout(self) -> float | None:
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        self._timeout = None if flag else 0.0

    def getblocking(self) -> bool:
        return self._timeout != 0.0

    def shutdown(self, how: int) -> None:
        """``SHUT_WR``: the peer reads EOF after what was sent; reading goes on.
        ``SHUT_RD``: reads return ``b""`` from now on (arriving bytes stay buffered,
        within the stream's window). ``SHUT_RDWR``: both."""
        if how not in (socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR):
            raise ValueError(f"invalid shutdown how {how!r}")
        self._check_open()
        self._run(self._shutdown_on_loop, how)

    async def _shutdown_on_loop(self, how: int) -> None:
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            _, writer = await self._streams()
            writer.write_eof()
        if how in (socket.SHUT_RD, socket.SHUT_RDWR):
            self._shut_rd = True
            self._wake(self._readers)

    def close(self) -> None:
        """Graceful and immediate: what was sent still goes out, then the peer reads EOF.
        Blocked calls on the stream raise :class:`ClosedError`. Closing twice is harmless."""
        if not self._closed:
            self._run(self._close_on_loop)

    def _close_on_loop(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake(self._waiting)
        if self._pair is not None:
            self._pair[1].close()

    def abort(self) -> None:
        """Reset the stream: queued data is discarded and the peer sees a reset."""
        if not self._closed:
            self._run(self._abort_on_loop)

    def _abort_on_loop(self) -> None:
        self._closed = True
        self._wake(self._waiting)
        if self._pair is not None:
            self._pair[1].abort()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stream_id(self) -> int | None:
        """The mux stream id (odd: opened by the client, even: by the server)."""
        if self._pair is None:
            return None
        sid: int | None = self._pair[1].get_extra_info("stream_id")
        return sid

    def getpeername(self) -> Address | None:
        return self._peername

    def getsockname(self) -> Address | None:
        return self._sockname

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<rudp.sync.Stream id={self.stream_id} peer={self._peername} {state}>"


# ---------------------------------------------------------------------------- connections


class Connection(Stream):
    """One rudp session, used directly as a socket on its first stream.

    The first stream is the one the client opens first (:func:`connect`
    opens it at once; it costs no round trip). On the server it is taken
    when first used, so :meth:`accept_stream` returns the streams after it.
    """

    def __init__(
        self,
        portal: _LoopThread,
        session: rudp_asyncio.Session,
        timeout: float | None,
        sockname: Address | None,
    ) -> None:
        super().__init__(portal, None, timeout, sockname, session.peer_address)
        self._session = session
        self._first: asyncio.Future[Any] | None = None
        self._closing: asyncio.Future[None] | None = None  # a non-blocking close() in progress

    async def _streams(self) -> tuple[rudp_asyncio.StreamReader, rudp_asyncio.StreamWriter]:
        if self._pair is not None:
            return self._pair
        if self._first is None:  # the first use on the server: take the client's first stream
            self._first = asyncio.ensure_future(self._take_first())
            self._first.add_done_callback(_retrieved)
        pair: tuple[rudp_asyncio.StreamReader, rudp_asyncio.StreamWriter]
        pair = await asyncio.shield(self._first)
        return pair

    async def _take_first(self) -> tuple[rudp_asyncio.StreamReader, rudp_asyncio.StreamWriter]:
        session = self._session
        try:
            pair = await session.accept_stream()
        except NotImplementedError:  # no mux: the connection's one stream
            pair = await session.open_stream()
        if self._closed:
            pair[1].close()
        self._set_pair(pair)
        return pair

    # ------------------------------------------------------------ more streams

    def open_stream(self) -> Stream:
        """A new stream to the peer; data may flow at once (no round trip).

        It starts with this connection's timeout.
        """
        self._check_open()
        return self._run(self._open_on_loop)

    async def _open_on_loop(self) -> Stream:
        pair = await self._session.open_stream()
        return self._new_stream(pair)

    def accept_stream(self) -> Stream:
        """The next stream the peer opens (after the first); honours the timeout.

        It starts with this connection's timeout.
        """
        self._check_open()
        return self._run(lambda: self._op(self._accept_on_loop(self._timeout)))

    async def _accept_on_loop(self, timeout: float | None) -> Stream:
        async with _Deadline(timeout):
            await self._streams()
            pair = await self._session.accept_stream()
        return self._new_stream(pair)

    def _new_stream(
        self, pair: tuple[rudp_asyncio.StreamReader, rudp_asyncio.StreamWriter]
    ) -> Stream:
        stream = Stream(self._portal, None, self._timeout, self._sockname, self._peername)
        stream._set_pair(pair)
        return stream

    # ------------------------------------------------------------ the session

    def ping(self) -> float:
        """The round-trip time to the peer in seconds (rudp framing); honours the timeout."""
        self._check_open()

        async def ping() -> float:
            async with _Deadline(self._timeout):
                return await self._session.ping()

        return self._run(lambda: self._op(ping()))

    @property
    def stats(self) -> dict[str, Any]:
        """Connection, ARQ, FEC and mux counters, RTT and windows."""
        return self._run(lambda: self._session.stats)

    @property
    def session(self) -> rudp_asyncio.Session:
        """The asyncio session underneath (use it only from the loop thread)."""
        return self._session

    def close(self) -> None:
        """Graceful: every stream's data is delivered, then the connection ends.

        Waits for the peer's acknowledgement, at most the timeout when one is
        set; then the connection is reset and :class:`TimeoutError` raised.
        Non-blocking (timeout 0), it starts the close and returns.
        """
        if not self._closed:
            self._run(self._close_session, self._timeout)

    async def _close_session(self, timeout: float | None) -> None:
        self._close_on_loop()
        if timeout == 0:
            self._closing = asyncio.ensure_future(self._session.close())
            self._closing.add_done_callback(_retrieved)
            return
        try:
            async with _Deadline(timeout):
                await self._session.close()
        except (TimeoutError, BlockingIOError):
            self._session.abort()
            raise

    def abort(self) -> None:
        """Reset the connection: queued data is discarded and the peer sees a reset."""
        if not self._closed:
            self._run(self._abort_session)

    def _abort_session(self) -> None:
        self._closed = True
        self._wake(self._waiting)
        self._session.abort()

    def __enter__(self) -> Connection:
        return self

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<rudp.sync.Connection peer={self._peername} {state}>"


def connect(
    host: str,
    port: int,
    *,
    configuration: Configuration | None = None,
    timeout: float | None = None,
    local_addr: tuple[str, int] | None = None,
) -> Connection:
    """Connect to a rudp server, like :func:`socket.create_connection`.

    ``timeout`` bounds the connect and becomes the connection's timeout;
    without it, ``configuration.connect_timeout`` still bounds the connect.
    Raises :class:`rudp.ConnectionRefused` when refused (nothing listens, or
    the server's accept queue is full) and :class:`TimeoutError` when nothing
    answers.
    """
    timeout = _check_timeout(timeout)
    portal = _LoopThread.get()

    async def open_() -> Connection:
        async with _Deadline(timeout):
            session = await rudp_asyncio.connect(
                host, port, configuration=configuration, local_addr=local_addr
            )
        try:
            pair = await session.open_stream()
        except BaseException:
            session.abort()
            raise
        conn = Connection(portal, session, timeout, pair[1].get_extra_info("sockname"))
        conn._set_pair(pair)
        return conn

    return portal.run(open_)


# ---------------------------------------------------------------------------- server


class Server:
    """Accepts rudp connections, like a listening socket (what :func:`serve` returns).

    Sessions wait in an accept queue of ``configuration.backlog`` entries;
    while it is full, new clients are refused (they get
    :class:`rudp.ConnectionRefused`, never a half-working session).
    Closing the server resets its connections: they share its socket.
    """

    def __init__(self, portal: _LoopThread) -> None:
        self._portal = portal
        self._queue: deque[rudp_asyncio.Session] = deque()
        self._arrived: asyncio.Event | None = None
        self._server: rudp_asyncio.Server | None = None
        self._address: Address | None = None
        self._timeout: float | None = None
        self._closed = False

    # ------------------------------------------------------------ loop side

    async def _start(self, host: str | None, port: int, configuration: Configuration) -> None:
        self._arrived = asyncio.Event()
        self._server = await rudp_asyncio.serve(
            host,
            port,
            connection_handler=self._on_session,
            configuration=configuration,
            queued=self._queue.__len__,  # counts against the backlog
        )
        self._address = self._server.addresses()[0]

    def _on_session(self, session: rudp_asyncio.Session) -> None:
        if self._closed:
            session.abort()
            return
        self._queue.append(session)
        assert self._arrived is not None
        self._arrived.set()

    async def _accept(self, timeout: float | None) -> rudp_asyncio.Session:
        assert self._arrived is not None
        async with _Deadline(timeout):
            while True:
                if self._closed:
                    raise ClosedError("the server is closed")
                while self._queue:
                    session = self._queue.popleft()
                    if not session.is_closed:  # gave up while it waited: skip it
                        return session
                self._arrived.clear()
                await self._arrived.wait()

    def _close_on_loop(self) -> None:
        if self._closed:
            return
        self._closed = True
        while self._queue:
            self._queue.popleft().abort()
        if self._server is not None:
            self._server.close()
        if self._arrived is not None:
            self._arrived.set()

    # ------------------------------------------------------------ socket API

    def accept(self) -> tuple[Connection, Address | None]:
        """The next connection and its peer address; honours the timeout."""
        if self._closed:
            raise ClosedError("the server is closed")
        session = self._portal.run(self._accept, self._timeout)
        conn = Connection(self._portal, session, None, self._address)
        return conn, conn.getpeername()

    def settimeout(self, value: float | None) -> None:
        self._timeout = _check_timeout(value)

    def gettimeout(self) -> float | None:
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        self._timeout = None if flag else 0.0

    def getsockname(self) -> Address | None:
        return self._address

    @property
    def address(self) -> Address | None:
        """The bound address (handy with port 0)."""
        return self._address

    @property
    def stats(self) -> dict[str, Any]:
        """Endpoint and listener counters, live connections, and the accept queue's length."""

        def stats() -> dict[str, Any]:
            assert self._server is not None
            return {**self._server.stats(), "accept_queue": len(self._queue)}

        return self._portal.run(stats)

    def close(self) -> None:
        """Stop serving: queued and live connections are reset. Closing twice is harmless."""
        if not self._closed:
            self._portal.run(self._close_on_loop)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<rudp.sync.Server address={self._address} {'closed' if self._closed else 'open'}>"


def serve(
    host: str | None = None, port: int = 0, *, configuration: Configuration | None = None
) -> Server:
    """Listen for rudp connections on ``host:port``; see :class:`Server`."""
    config = configuration or Configuration()
    portal = _LoopThread.get()
    server = Server(portal)
    portal.run(server._start, host, port, config)
    return server
