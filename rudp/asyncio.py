"""The asyncio API: sessions of multiplexed streams, and asyncio-shaped shortcuts.

* ``session = await rudp.connect(host, port)`` (or ``async with``) gives a
  :class:`Session`: ``open_stream()``/``accept_stream()`` return
  ``(reader, writer)`` pairs, ``ping()`` measures the round trip, ``stats``
  holds the counters.
* ``await rudp.serve(host, port, stream_handler=..., connection_handler=...)``
  serves sessions.
* ``rudp.open_connection``/``rudp.start_server`` are shaped exactly like
  asyncio's: one stream per connection.

Readers and writers have the methods and semantics of
:class:`asyncio.StreamReader`/:class:`asyncio.StreamWriter`. The protocol lives
in the sans-I/O layers (:class:`rudp.Connection`, :class:`rudp.mux.Session`);
this module only moves bytes between them and wakes coroutines:

* a stream's receive buffer *is* the mux's (or, without the mux, the ARQ
  engine's), so the peer's window reopens only as the application reads;
* ``write()`` never blocks; ``drain()`` waits while the stream's send buffer is
  full (a bounded buffer per stream, and a bounded amount unacknowledged per
  connection);
* errors (reset, dead peer, refusal) surface from every pending and later read,
  write or drain of the affected streams.

``write()`` queues a whole call or raises: a cancelled ``drain()`` loses
nothing, the bytes stay queued and are sent.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import socket
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Generator, Iterable
from typing import Any

from rudp import engine, wire
from rudp import mux as muxlib
from rudp.config import Configuration
from rudp.connection import ESTABLISHED, TERMINATED, Connection
from rudp.endpoint import Endpoint
from rudp.errors import ClosedError, ConnectionRefused, ConnectionReset, RudpError
from rudp.events import (
    Address,
    Connected,
    DataReadable,
    EndOfData,
    PongReceived,
    Terminated,
)
from rudp.listener import Listener
from rudp.mux import (
    SessionClosed,
    StreamEnded,
    StreamOpened,
    StreamReadable,
    StreamReset,
    StreamWritable,
)

__all__ = [
    "Server",
    "Session",
    "StreamReader",
    "StreamWriter",
    "connect",
    "open_connection",
    "serve",
    "start_server",
]

#: readline()/readuntil() give up past this many bytes without a separator (as asyncio's limit).
DEFAULT_LIMIT = 2**16
#: Pull mux frames in chunks of at least this (frames never straddle two pulls).
_MIN_PULL = 2048


def _compiled(module: str, name: str, reference: type) -> type:
    """The compiled twin of ``reference`` (``rudp._mux.Session``, ``rudp._connection.Connection``:
    the same behaviour, checked by differential tests) when the compiled engine runs, the
    reference otherwise: ``RUDP_ENGINE=python`` runs the whole stack in Python."""
    if engine.ENGINE == "cython":
        try:
            return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]
        except ImportError:  # built without it: the reference does the same, slower
            pass
    return reference


_MuxSession: type[muxlib.Session] = _compiled("rudp._mux", "Session", muxlib.Session)
_Connection: type[Connection] = _compiled("rudp._connection", "Connection", Connection)


class _Waiter:
    """Futures woken together (a stream's readers, or its writers)."""

    __slots__ = ("_futures", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop  # not get_running_loop(): that costs a getpid() system call per wait
        self._futures: list[asyncio.Future[None]] = []

    def wait(self) -> asyncio.Future[None]:
        """A future for the caller to await: a plain future, not a coroutine around one,
        saves a frame on every wake-up. A cancelled wait leaves its future done; the
        next wait() or wake() drops it."""
        fut = self._loop.create_future()
        futures = self._futures
        if futures:
            futures[:] = [f for f in futures if not f.done()]
        futures.append(fut)
        return fut

    def wake(self) -> None:
        futures, self._futures = self._futures, []
        for fut in futures:
            if not fut.done():
                fut.set_result(None)

    def __bool__(self) -> bool:
        return any(not f.done() for f in self._futures)


# ---------------------------------------------------------------------------- streams


class _Stream:
    """One byte stream as a reader/writer pair sees it."""

    def __init__(self, driver: _Driver) -> None:
        self.driver = driver
        self.readable = _Waiter(driver.loop)
        self.writable = _Waiter(driver.loop)
        self.error: RudpError | None = None
        self.eof = False  # EOF was returned once: keep returning it
        self.write_closed = False
        self.closing = False
        self.done: asyncio.Future[None] = driver.loop.create_future()

    # the operations each kind provides
    def read_now(self, n: int) -> bytes | None:
        """Up to ``n`` bytes (-1: all buffered), ``b""`` at EOF, None when nothing yet."""
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def must_wait(self) -> bool:
        """drain() must wait: the send buffer is full."""
        raise NotImplementedError

    def write_eof(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def fail(self, error: RudpError | None) -> None:
        """The stream is over (``error`` None: it ended cleanly)."""
        if error is not None and self.error is None:
            self.error = error
        self.readable.wake()
        self.writable.wake()
        if not self.done.done():
            self.done.set_result(None)

    async def wait_done(self) -> None:
        if self is self.driver.owner:  # open_connection(): closing the stream ends the connection
            await asyncio.shield(self.driver.local_closed)
        else:
            await asyncio.shield(self.done)


class _RawStream(_Stream):
    """The connection's own stream, no mux (the ``kcp`` framing, ``mux=False``, message mode).

    In message mode a read returns at most one message: the next one, or, when
    it is longer than asked, its next part (the rest follows, alone).
    """

    def __init__(self, driver: _Driver) -> None:
        super().__init__(driver)
        self.messages = driver.config.message_mode
        self.rest = b""  # message mode: the unread part of the current message

    def _next(self, n: int) -> bytes:
        conn = self.driver.conn
        if not self.messages:
            return conn.read(n)
        data = self.rest or conn.read_message() or b""
        if 0 <= n < len(data):
            data, self.rest = data[:n], data[n:]
        else:
            self.rest = b""
        return data

    def read_now(self, n: int) -> bytes | None:
        conn = self.driver.conn
        if self.eof:
            return b""
        data = self._next(n)
        if data:
            self.driver.touch()  # the receive window reopened: tell the peer
            return data
        if conn.at_eof:
            self.eof = True
            return b""
        self.check()
        if conn.state is TERMINATED:
            raise ClosedError("the connection is closed")
        return None

    def write(self, data: bytes) -> None:
        self.check()
        self.driver.conn.send(data)
        self.driver.touch()

    def must_wait(self) -> bool:
        conn = self.driver.conn
        if conn.state is TERMINATED:
            self.check()
            raise ClosedError("the connection is closed")
        return conn.send_buffered > conn.configuration.send_buffer

    def write_eof(self) -> None:
        if self.driver.conn.configuration.framing != "rudp":
            raise NotImplementedError("the kcp framings have no end-of-stream signal")
        self.write_closed = True
        self.driver.conn.write_eof()
        self.driver.touch()

    def close(self) -> None:
        self.closing = True
        self.driver.close_connection()

    def abort(self) -> None:
        self.closing = True
        self.driver.abort("aborted")


class _MuxStream(_Stream):
    """One stream of the session's multiplexer."""

    def __init__(self, driver: _Driver, sid: int) -> None:
        super().__init__(driver)
        self.sid = sid
        self.pending: deque[bytes | memoryview] = deque()  # written, not yet taken by the mux
        self.eof_after_pending = False

    @property
    def mux(self) -> muxlib.Session:
        assert self.driver.mux is not None
        return self.driver.mux

    def read_now(self, n: int) -> bytes | None:
        if self.eof:
            return b""
        mux = self.driver.mux
        try:
            data = mux.try_read(self.sid, n)
        except RudpError as exc:
            self.error = self.error or exc
            raise self.error from None
        if data is None:
            if self.error is not None:  # the session ended: after the buffered bytes, the error
                raise self.error
            return None
        if not data:
            self.eof = True
            self.driver.stream_finished(self)
            return b""
        if mux.has_output() or mux.receive_capacity() is not None:
            self.driver.touch()  # a window update to send, or (v1) room to take more bytes in
        return data

    def write(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        if self.write_closed or self.closing:
            raise ClosedError("the stream is closed for writing")
        if not data:
            return
        self.pending.append(data)
        self.push()
        self.driver.touch()

    def push(self) -> None:
        """Hand pending bytes to the mux as its stream buffer frees up."""
        pending = self.pending
        mux, sid = self.driver.mux, self.sid
        while pending:
            chunk = pending[0]
            try:
                taken = mux.send(sid, chunk)
            except RudpError as exc:
                pending.clear()
                self.fail(exc)
                return
            if taken == 0:
                return  # the mux says StreamWritable when it has room again
            if taken == len(chunk):
                pending.popleft()
            else:
                pending[0] = memoryview(chunk)[taken:]
        if self.eof_after_pending:
            self.eof_after_pending = False
            self.mux.end_stream(self.sid)
            if self.closing:
                self.mux.close_stream(self.sid)
                self.driver.stream_finished(self)
        self.writable.wake()

    def must_wait(self) -> bool:
        if self.error is not None:
            raise self.error
        return bool(self.pending)

    def write_eof(self) -> None:
        self.check()
        if self.write_closed:
            return
        self.write_closed = True
        self.eof_after_pending = True
        self.push()
        self.driver.touch()

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self.error is None and not self.mux.closed:
            if not self.write_closed:
                self.write_closed = True
                self.eof_after_pending = True
            if self.eof_after_pending:
                self.push()
            else:
                self.mux.close_stream(self.sid)
        self.driver.stream_finished(self)
        self.driver.touch()

    def abort(self) -> None:
        self.closing = True
        self.pending.clear()
        if not self.mux.closed:
            self.mux.reset_stream(self.sid)
        self.fail(ClosedError("the stream was aborted"))
        self.driver.stream_finished(self)
        self.driver.touch()


class StreamReader:
    """Reads a rudp byte stream; the methods of :class:`asyncio.StreamReader`."""

    def __init__(self, stream: _Stream, limit: int = DEFAULT_LIMIT) -> None:
        self._stream = stream
        self._limit = limit
        self._buffer = bytearray()  # only what readline/readexactly pulled but did not return

    def at_eof(self) -> bool:
        return not self._buffer and self._stream.eof

    async def _fill(self) -> bool:
        """Append available bytes to the buffer, waiting for some; False at EOF."""
        stream = self._stream
        while True:
            data = stream.read_now(-1)
            if data:
                self._buffer += data
                return True
            if data == b"":
                return False
            await stream.readable.wait()

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes as soon as any are available; ``n=-1`` reads until EOF."""
        if n == 0:
            return b""
        if n < 0:
            while await self._fill():
                pass
            data, self._buffer = bytes(self._buffer), bytearray()
            return data
        if self._buffer:
            data = bytes(self._buffer[:n])
            del self._buffer[:n]
            return data
        stream = self._stream
        while (data := stream.read_now(n)) is None:
            await stream.readable.wait()
        return data

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes; :class:`asyncio.IncompleteReadError` if EOF comes first."""
        if n < 0:
            raise ValueError("readexactly size can not be less than zero")
        stream = self._stream
        while len(self._buffer) < n:
            data = stream.read_now(-1)
            if data is None:
                await stream.readable.wait()
            elif not data:
                partial, self._buffer = bytes(self._buffer), bytearray()
                raise asyncio.IncompleteReadError(partial, n)
            elif not self._buffer and len(data) == n:
                return data  # exactly what was asked for: no copy through the buffer
            else:
                self._buffer += data
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        """Bytes up to and including ``separator`` (asyncio's errors on EOF and over-limit)."""
        if not separator:
            raise ValueError("Separator should be at least one-byte string")
        start = 0
        while True:
            index = self._buffer.find(separator, start)
            if index >= 0:
                end = index + len(separator)
                if end > self._limit:
                    raise asyncio.LimitOverrunError(
                        "Separator is found, but chunk is longer than limit", index
                    )
                data = bytes(self._buffer[:end])
                del self._buffer[:end]
                return data
            if len(self._buffer) > self._limit:
                raise asyncio.LimitOverrunError(
                    "Separator is not found, and chunk exceed the limit", len(self._buffer)
                )
            start = max(0, len(self._buffer) - len(separator) + 1)
            if not await self._fill():
                partial, self._buffer = bytes(self._buffer), bytearray()
                raise asyncio.IncompleteReadError(partial, None)

    async def readline(self) -> bytes:
        """A line ending in ``\\n``, or the remaining bytes at EOF."""
        try:
            return await self.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            return exc.partial
        except asyncio.LimitOverrunError as exc:
            if self._buffer.startswith(b"\n", exc.consumed):
                del self._buffer[: exc.consumed + 1]
            else:
                self._buffer.clear()
            raise ValueError(exc.args[0]) from None

    def __aiter__(self) -> StreamReader:
        return self

    async def __anext__(self) -> bytes:
        line = await self.readline()
        if line == b"":
            raise StopAsyncIteration
        return line


class StreamWriter:
    """Writes a rudp byte stream; the methods of :class:`asyncio.StreamWriter`."""

    def __init__(self, stream: _Stream, reader: StreamReader) -> None:
        self._stream = stream
        self._reader = reader

    @property
    def transport(self) -> Any:  # asyncio compatibility: code that only checks it exists
        return self

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue all of ``data`` (never blocks); ``await drain()`` for backpressure."""
        self._stream.write(bytes(data))

    def writelines(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    async def drain(self) -> None:
        """Wait while the send buffer is full; raises if the stream failed."""
        stream = self._stream
        while stream.must_wait():
            await stream.writable.wait()

    def can_write_eof(self) -> bool:
        return (
            isinstance(self._stream, _MuxStream)
            or self._stream.driver.conn.configuration.framing == "rudp"
        )

    def write_eof(self) -> None:
        """Half-close: the peer reads EOF after the data sent so far; reading continues."""
        self._stream.write_eof()

    def close(self) -> None:
        """Graceful close: everything written is delivered, then the peer sees EOF."""
        self._stream.close()

    def is_closing(self) -> bool:
        return self._stream.closing

    async def wait_closed(self) -> None:
        """Wait until the close completed (errors are not raised here)."""
        await self._stream.wait_done()

    def abort(self) -> None:
        """Reset: discard queued data; the peer sees a reset."""
        self._stream.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``peername``, ``sockname``, ``socket``, ``stats`` (counters), ``session``,
        ``connection`` (the sans-I/O :class:`rudp.Connection`), ``stream_id``."""
        driver = self._stream.driver
        if name == "peername":
            return driver.conn.peer_address
        if name == "sockname":
            return driver.endpoint.sock.getsockname()
        if name == "socket":
            return driver.endpoint.sock
        if name == "stats":
            return driver.stats()
        if name == "session":
            return driver.session
        if name == "connection":
            return driver.conn
        if name == "stream_id":
            return getattr(self._stream, "sid", None)
        return default

    def __repr__(self) -> str:
        driver = self._stream.driver
        return (
            f"<rudp.StreamWriter peer={driver.conn.peer_address} state={driver.conn.state.value}>"
        )


# ---------------------------------------------------------------------------- the driver


class _Driver:
    """Glue for one connection: its endpoint, its mux session, its streams and waiters."""

    def __init__(
        self, conn: Connection, endpoint: Endpoint, *, owns_endpoint: bool, limit: int
    ) -> None:
        self.conn = conn
        self.endpoint = endpoint
        self.loop = endpoint.loop
        self.owns_endpoint = owns_endpoint
        self.limit = limit
        self.config = conn.configuration
        self.mux: muxlib.Session | None = None
        self.raw: _RawStream | None = None
        self.streams: dict[int, _MuxStream] = {}
        self.accepting = _Waiter(self.loop)
        self.pings: dict[int, asyncio.Future[None]] = {}
        self.connected: asyncio.Future[None] = self.loop.create_future()
        self.closed: asyncio.Future[None] = self.loop.create_future()  # the connection ended
        self.local_closed: asyncio.Future[None] = self.loop.create_future()  # our close() completed
        self.error: RudpError | None = None
        self.owner: _Stream | None = (
            None  # open_connection(): the session lives as long as this stream
        )
        self.closing = False
        self.on_stream: Callable[[StreamReader, StreamWriter], Any] | None = None
        self.session = Session(self)
        self._least_pull = min(_MIN_PULL, self.config.send_buffer // 2)  # a small buffer pulls less

    # ---------------------------------------------------------------- endpoint hooks

    def touch(self) -> None:
        self.endpoint.touch(self.conn)

    def on_event(self) -> None:
        conn = self.conn
        while conn.has_events:
            event = conn.next_event()
            kind = type(event)
            if kind is DataReadable or kind is EndOfData:
                if self.raw is not None:
                    self.raw.readable.wake()
            elif kind is Connected:
                self._connected()
            elif kind is PongReceived:
                fut = self.pings.pop(event.token, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)
            elif kind is Terminated:
                self._terminated(event.error)
        if self.mux is not None:
            self._pump_mux()
        elif (
            self.raw is not None
            and self.raw.writable
            and conn.send_buffered <= self.config.send_buffer
        ):
            self.raw.writable.wake()
        if not self.local_closed.done() and conn.close_done:
            self.local_closed.set_result(None)

    def get_timer(self, now: float) -> float | None:
        timer = self.conn.get_timer(now)
        if timer is None and self.conn.state is TERMINATED:
            return None
        mux = self.mux
        if mux is not None and (ms := mux.get_timer()) is not None:  # None once closed
            mux_timer = ms / 1000.0
            timer = mux_timer if timer is None or mux_timer < timer else timer
        return timer

    def handle_timer(self, now: float) -> None:
        self.conn.handle_timer(now)
        if self.mux is not None and not self.mux.closed:
            self.mux.handle_timer(int(now * 1000))

    # ---------------------------------------------------------------- session life

    def _connected(self) -> None:
        conn, config = self.conn, self.config
        if config.mux_effective:
            rudp_framing = config.framing == "rudp"
            self.mux = _MuxSession(
                client=conn.is_client,
                now=int(self.loop.time() * 1000),
                version=conn.params.smux_version or config.smux_version,
                max_frame_size=config.max_frame_size,
                stream_buffer=config.stream_buffer,
                session_buffer=config.session_buffer,
                max_streams=config.max_streams,
                stream_backlog=config.stream_backlog,
                # The rudp framing has its own keepalive; a smux peer expects NOPs.
                keepalive=None if rudp_framing else round(config.keepalive * 1000),
                idle_timeout=None if rudp_framing else round(config.idle_timeout * 1000),
                extensions=bool(conn.params.flags & wire.FLAG_MUX_EXTENSIONS) and rudp_framing,
            )
        else:
            self.raw = _RawStream(self)
        if not self.connected.done():
            self.connected.set_result(None)

    def _terminated(self, error: RudpError | None) -> None:
        self.error = error
        if not self.connected.done():
            self.connected.set_exception(
                error or ClosedError("connection closed during the handshake")
            )
            self.connected.exception()  # retrieved by whoever awaits it; silence the warning
        mux = self.mux
        if mux is not None and not mux.closed:
            if error is None:
                # A clean end: what arrived stays readable; streams the peer did not
                # finish then report the session's end instead of EOF.
                self._pump_mux()
            else:
                mux.close(error)
        if self.raw is not None:
            self.raw.fail(error)
        for stream in self.streams.values():
            info = mux.stream_info(stream.sid) if mux is not None and error is None else None
            finished = info is not None and info.eof_received
            stream.fail(
                None if finished or stream.eof else error or ClosedError("the session is closed")
            )
        self.accepting.wake()
        for fut in self.pings.values():
            if not fut.done():
                fut.set_exception(error or ClosedError("the session is closed"))
        self.pings.clear()
        for fut in (self.closed, self.local_closed):
            if not fut.done():
                fut.set_result(None)
        if self.owns_endpoint:
            self.loop.call_soon(self.endpoint.close)

    def close_connection(self) -> None:
        """Graceful close of the whole connection: its streams end, their bytes go out, then it ends."""
        if self.closing:
            return
        self.closing = True
        if self.mux is not None and not self.mux.closed:
            for stream in list(self.streams.values()):
                stream.close()
        # The whole close is bounded, including the time streams wait for a peer that
        # stopped reading to open its window: after close_timeout it becomes a reset.
        self.loop.call_later(self.config.close_timeout, self._close_expired)
        self._close_when_flushed()
        self.touch()

    def _close_expired(self) -> None:
        if not self.local_closed.done():
            self.abort("close did not complete within close_timeout")

    def _close_when_flushed(self) -> None:
        """Close the connection once every stream's bytes are framed and handed to it
        (a stream may wait for the peer's window first)."""
        mux = self.mux
        if mux is not None and not mux.closed and not self._mux_flushed(mux):
            return
        self.conn.close(self.loop.time())

    def _mux_flushed(self, mux: muxlib.Session) -> bool:
        if mux.has_output() or any(s.pending or s.eof_after_pending for s in self.streams.values()):
            return False
        return not any(
            (info := mux.stream_info(sid)) and info.send_buffered for sid in mux.stream_ids()
        )

    def abort(self, reason: str) -> None:
        if self.mux is not None and not self.mux.closed:
            self.mux.close(ClosedError(reason))
        self.conn.reset(reason, self.loop.time())
        self.touch()

    def stream_finished(self, stream: _Stream) -> None:
        """A stream the application closed has handed all its bytes to the mux."""
        if not stream.closing or (
            isinstance(stream, _MuxStream) and (stream.pending or stream.eof_after_pending)
        ):
            return
        if stream is self.owner:
            self.close_connection()
        if isinstance(stream, _MuxStream):
            self.streams.pop(stream.sid, None)
            stream.fail(None)

    # ---------------------------------------------------------------- the mux pump

    def _pump_mux(self) -> None:
        """Channel bytes into the mux, its events out, stream writes in, frames out.

        Runs after every input and API call, so each step first checks cheaply
        whether it has anything to do.
        """
        mux, conn = self.mux, self.conn
        assert mux is not None
        if not mux.closed:
            while conn.readable and (capacity := mux.receive_capacity()) != 0:
                data = conn.read(-1 if capacity is None else capacity)
                if not data:
                    break
                mux.receive_data(data, int(self.loop.time() * 1000))
                if capacity is None:
                    break  # (v2) that read took everything
            if not self.closing and conn.at_eof:
                # The peer closed the whole connection: finish our side of every stream
                # (what arrived stays readable), then close once it is all out.
                for stream in self.streams.values():
                    if not stream.write_closed:
                        stream.write_eof()
                self.closing = True
        # Pulling frames frees stream buffers: their writers (StreamWritable) push more,
        # which is pulled in turn, so nothing is left for another call to find.
        for _ in range(4):
            if mux.has_events:
                self._mux_events()
            if mux.closed:
                return
            if not mux.has_output() or not self._pull_mux() or not mux.has_events:
                break
        if self.closing:
            self._close_when_flushed()

    def _pull_mux(self) -> bool:
        """Frames from the mux (which has output) into the connection while it has room;
        True if any moved."""
        mux, conn = self.mux, self.conn
        assert mux is not None
        if conn.state is not ESTABLISHED or conn.write_closed:
            return False
        room = self.config.send_buffer - conn.send_buffered
        ms = int(self.loop.time() * 1000)
        least = self._least_pull
        pulled = False
        while room >= least:
            out = mux.data_to_send(room, ms)
            if not out:
                break
            conn.send(out)
            room -= len(out)
            pulled = True
            if not mux.has_output():
                break
        return pulled

    def _mux_events(self) -> None:
        mux = self.mux
        assert mux is not None
        while mux.has_events:
            event = mux.next_event()
            kind = type(event)
            if kind is StreamReadable or kind is StreamEnded:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.readable.wake()
            elif kind is StreamWritable:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.push()
            elif kind is StreamOpened:
                if self.on_stream is not None:
                    self._dispatch_accepted()
                else:
                    self.accepting.wake()
            elif kind is StreamReset:
                stream = self.streams.pop(event.stream_id, None)
                if stream is not None:
                    stream.fail(
                        ConnectionRefused("the peer refused the stream")
                        if event.refused
                        else ConnectionReset("stream reset by peer")
                    )
            elif kind is SessionClosed:
                if event.error is not None and self.conn.state is ESTABLISHED:
                    self.abort(str(event.error))
                for stream in self.streams.values():
                    stream.fail(event.error or ClosedError("the session is closed"))
                self.accepting.wake()

    def _dispatch_accepted(self) -> None:
        assert self.mux is not None and self.on_stream is not None
        while (sid := self.mux.accept_stream()) is not None:
            reader, writer = self.new_stream(sid)
            _start(self.on_stream, reader, writer)

    # ---------------------------------------------------------------- streams

    def new_stream(self, sid: int | None) -> tuple[StreamReader, StreamWriter]:
        if sid is None:
            assert self.raw is not None
            stream: _Stream = self.raw
        else:
            stream = self.streams[sid] = _MuxStream(self, sid)
        reader = StreamReader(stream, self.limit)
        return reader, StreamWriter(stream, reader)

    def stats(self) -> dict[str, Any]:
        out = self.conn.stats()
        if self.mux is not None:
            out.update({f"mux_{k}": v for k, v in self.mux.stats.as_dict().items()})
        return out


def _start(callback: Callable[..., Any], *args: Any) -> None:
    """Run a user callback (function or coroutine function) without awaiting it."""
    result = callback(*args)
    if asyncio.iscoroutine(result):
        asyncio.ensure_future(result).add_done_callback(_report_handler_error)


def _report_handler_error(task: asyncio.Future[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None and not isinstance(
        exc, RudpError | ConnectionError | asyncio.IncompleteReadError
    ):
        print(f"rudp: unhandled error in a handler: {exc!r}", file=sys.stderr)


# ---------------------------------------------------------------------------- session


class Session:
    """One rudp connection carrying streams (what :func:`connect` returns)."""

    def __init__(self, driver: _Driver) -> None:
        self._driver = driver

    @property
    def peer_address(self) -> Address | None:
        return self._driver.conn.peer_address

    @property
    def stats(self) -> dict[str, Any]:
        """Connection, ARQ, FEC and mux counters, RTT and windows."""
        return self._driver.stats()

    @property
    def is_closed(self) -> bool:
        return self._driver.closed.done()

    def _check(self) -> None:
        driver = self._driver
        if driver.closed.done():
            raise driver.error or ClosedError("the session is closed")

    async def open_stream(self) -> tuple[StreamReader, StreamWriter]:
        """A new stream; data may flow at once (no round trip)."""
        self._check()
        driver = self._driver
        if driver.mux is None:
            if driver.raw is None or driver.raw.closing or driver.owner is not None:
                raise ClosedError("without the mux a connection carries exactly one stream")
            driver.owner = driver.raw
            return driver.new_stream(None)
        sid = driver.mux.open_stream()
        pair = driver.new_stream(sid)
        driver.touch()
        return pair

    async def accept_stream(self) -> tuple[StreamReader, StreamWriter]:
        """The next stream the peer opens."""
        driver = self._driver
        if driver.mux is None:
            raise NotImplementedError("without the mux the one stream comes from open_stream()")
        while True:
            self._check()
            if driver.mux.closed:
                raise driver.mux.error or ClosedError("the session is closed")
            sid = driver.mux.accept_stream()
            if sid is not None:
                return driver.new_stream(sid)
            await driver.accepting.wait()

    async def ping(self) -> float:
        """The round-trip time to the peer, in seconds (rudp framing)."""
        self._check()
        driver = self._driver
        loop = driver.loop
        token = driver.conn.ping()
        fut = driver.pings[token] = loop.create_future()
        start = loop.time()
        driver.touch()
        await fut
        return loop.time() - start

    async def close(self) -> None:
        """Graceful: every stream's data is delivered, then the connection ends."""
        self._driver.close_connection()
        await asyncio.shield(self._driver.local_closed)

    def abort(self) -> None:
        """Reset the connection: queued data is discarded, the peer sees a reset."""
        self._driver.abort("aborted")

    async def wait_closed(self) -> None:
        await asyncio.shield(self._driver.closed)

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        conn = self._driver.conn
        return f"<rudp.Session peer={conn.peer_address} state={conn.state.value}>"


# ---------------------------------------------------------------------------- client


def _udp_socket(host: str, port: int, *, passive: bool) -> tuple[socket.socket, Address]:
    flags = socket.AI_PASSIVE if passive else 0
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=flags)[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    return sock, addr


async def _connect(
    host: str,
    port: int,
    configuration: Configuration | None,
    limit: int,
    local_addr: tuple[str, int] | None,
) -> _Driver:
    config = configuration or Configuration()
    loop = asyncio.get_running_loop()
    sock, addr = await loop.run_in_executor(None, lambda: _udp_socket(host, port, passive=False))
    try:
        if local_addr is not None:
            sock.bind(local_addr)
        sock.connect(addr)  # the kernel filters other senders and reports ICMP errors
        addr = sock.getpeername()
    except OSError:
        sock.close()
        raise
    conn = _Connection(config, is_client=True, cid=int.from_bytes(os.urandom(8), "little"))
    endpoint = Endpoint(sock, config, connected=True)
    driver = _Driver(conn, endpoint, owns_endpoint=True, limit=limit)
    conn.connect(addr, loop.time())
    endpoint.add(conn, driver)
    try:
        await driver.connected
    except BaseException:
        conn.reset("connect cancelled", loop.time())
        endpoint.close()
        raise
    return driver


class _Connecting:
    """``await connect(...)`` gives the session; ``async with connect(...)`` also closes it."""

    def __init__(self, coro: Awaitable[_Driver]) -> None:
        self._coro = coro
        self._session: Session | None = None

    def __await__(self) -> Generator[Any, None, Session]:
        driver = yield from self._coro.__await__()
        return driver.session

    async def __aenter__(self) -> Session:
        self._session = (await self._coro).session
        return self._session

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._session is not None
        await self._session.close()


def connect(
    host: str,
    port: int,
    *,
    configuration: Configuration | None = None,
    limit: int = DEFAULT_LIMIT,
    local_addr: tuple[str, int] | None = None,
) -> _Connecting:
    """Connect to a rudp server: ``session = await connect(...)`` or ``async with connect(...)``.

    Raises :class:`rudp.ConnectionRefused` when the server refuses (or nothing
    listens and the host says so) and :class:`rudp.DeadPeerError` (a
    ``TimeoutError``) after ``connect_timeout`` without an answer.
    """
    return _Connecting(_connect(host, port, configuration, limit, local_addr))


async def open_connection(
    host: str,
    port: int,
    *,
    configuration: Configuration | None = None,
    limit: int = DEFAULT_LIMIT,
    local_addr: tuple[str, int] | None = None,
) -> tuple[StreamReader, StreamWriter]:
    """Like :func:`asyncio.open_connection`: one stream on its own connection.

    Closing the writer closes the connection.
    """
    driver = await _connect(host, port, configuration, limit, local_addr)
    reader, writer = await driver.session.open_stream()
    driver.owner = writer._stream
    return reader, writer


# ---------------------------------------------------------------------------- server


class Server:
    """What :func:`serve` and :func:`start_server` return; shaped like :class:`asyncio.Server`."""

    def __init__(self, endpoint: Endpoint, drivers: dict[int, _Driver]) -> None:
        self._endpoint = endpoint
        self._drivers = drivers
        self._closed = asyncio.get_running_loop().create_future()
        self._serving = True

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._endpoint.closed else (self._endpoint.sock,)

    def addresses(self) -> list[Address]:
        """Bound addresses (handy with port 0)."""
        return [s.getsockname() for s in self.sockets]

    def is_serving(self) -> bool:
        return self._serving

    def close(self) -> None:
        """Stop serving and close the socket; live connections are reset."""
        if not self._serving:
            return
        self._serving = False
        for driver in list(self._drivers.values()):
            driver.abort("server closed")
            self._endpoint.flush_now(driver.conn)
        self._endpoint.close()
        if not self._closed.done():
            self._closed.set_result(None)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    async def start_serving(self) -> None:
        """Already serving once created (asyncio compatibility)."""

    async def serve_forever(self) -> None:
        try:
            await self._closed
        except asyncio.CancelledError:
            self.close()
            raise

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()

    def stats(self) -> dict[str, Any]:
        """Endpoint and listener counters, and the number of live connections."""
        out: dict[str, Any] = dict(self._endpoint.counters)
        if self._endpoint.listener is not None:
            out.update(self._endpoint.listener.counters)
        out["connections"] = len(self._endpoint.connections)
        return out


StreamHandler = Callable[[StreamReader, StreamWriter], Awaitable[None] | None]
ConnectionHandler = Callable[[Session], Awaitable[None] | None]


async def serve(
    host: str | None = None,
    port: int = 0,
    *,
    stream_handler: StreamHandler | None = None,
    connection_handler: ConnectionHandler | None = None,
    configuration: Configuration | None = None,
    limit: int = DEFAULT_LIMIT,
    reuse_port: bool = False,
    queued: Callable[[], int] | None = None,
) -> Server:
    """Serve rudp sessions on ``host:port``.

    ``connection_handler(session)`` runs for each new connection;
    ``stream_handler(reader, writer)`` for each stream a peer opens (without
    it, streams wait for ``session.accept_stream()``). Sessions whose handler
    has not started yet, plus ``queued()`` (those the application holds in an
    accept queue of its own), count against ``Configuration.backlog``: while
    it is reached, new clients are refused cleanly.
    """
    config = configuration or Configuration()
    loop = asyncio.get_running_loop()
    sock, addr = await loop.run_in_executor(
        None, lambda: _udp_socket(host or "0.0.0.0", port, passive=True)
    )
    try:
        if reuse_port and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    drivers: dict[int, _Driver] = {}
    pending: set[_Driver] = set()  # connected, handlers not started yet: the accept backlog

    def on_accept(conn: Connection) -> _Driver:
        driver = _Driver(conn, endpoint, owns_endpoint=False, limit=limit)
        driver.on_stream = stream_handler
        drivers[id(conn)] = driver
        driver.closed.add_done_callback(lambda _: drivers.pop(id(conn), None))
        pending.add(driver)
        loop.call_soon(start, driver)
        return driver

    def start(driver: _Driver) -> None:
        pending.discard(driver)
        if driver.closed.done():
            return
        if connection_handler is not None:
            _start(connection_handler, driver.session)
        if driver.raw is not None and stream_handler is not None:
            _start(stream_handler, *driver.new_stream(None))
            driver.owner = driver.raw

    listener = Listener(config, secret=os.urandom(32), connection=_Connection)
    endpoint = Endpoint(
        sock,
        config,
        listener=listener,
        on_accept=on_accept,
        can_accept=lambda: len(pending) + (queued() if queued else 0) < config.backlog,
    )
    return Server(endpoint, drivers)


async def start_server(
    client_connected_cb: StreamHandler,
    host: str | None = None,
    port: int = 0,
    *,
    configuration: Configuration | None = None,
    limit: int = DEFAULT_LIMIT,
    reuse_port: bool = False,
) -> Server:
    """Like :func:`asyncio.start_server`: ``client_connected_cb(reader, writer)`` per stream."""
    return await serve(
        host,
        port,
        stream_handler=client_connected_cb,
        configuration=configuration,
        limit=limit,
        reuse_port=reuse_port,
    )
