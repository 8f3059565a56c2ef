"""The asyncio API: ``open_connection``/``start_server`` shaped like asyncio's own.

Readers and writers here behave like :class:`asyncio.StreamReader` and
:class:`asyncio.StreamWriter` (same method names and semantics), over a rudp
connection instead of TCP. The protocol lives in the sans-I/O layer; this
module only wakes coroutines when the connection says something changed:

* the receive buffer *is* the ARQ engine's, so the receive window reopens
  only as the application reads;
* ``drain()`` waits while more than ``send_buffer`` bytes are unacknowledged;
* errors (reset, dead peer, refusal) surface as exceptions from every pending
  and later read, write or drain.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from rudp.config import Configuration
from rudp.connection import Connection, ConnectionState
from rudp.endpoint import Endpoint
from rudp.errors import ClosedError, RudpError
from rudp.events import Address, AddressChanged, Connected, DataReadable, EndOfData, Terminated
from rudp.listener import Listener

__all__ = ["Server", "StreamReader", "StreamWriter", "open_connection", "start_server"]

#: readline()/readuntil() give up past this many bytes without a separator (as asyncio's limit).
DEFAULT_LIMIT = 2**16


class _Waiter:
    """A set of futures woken together (readers or writers of one stream)."""

    __slots__ = ("_futures",)

    def __init__(self) -> None:
        self._futures: list[asyncio.Future[None]] = []

    async def wait(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._futures.append(fut)
        try:
            await fut
        finally:
            if fut in self._futures:
                self._futures.remove(fut)

    def wake(self) -> None:
        futures, self._futures = self._futures, []
        for fut in futures:
            if not fut.done():
                fut.set_result(None)

    def __bool__(self) -> bool:
        return bool(self._futures)


class _Driver:
    """Glue between one sans-I/O connection, its endpoint and its reader/writer."""

    def __init__(self, conn: Connection, endpoint: Endpoint, *, owns_endpoint: bool) -> None:
        self.conn = conn
        self.endpoint = endpoint
        self.owns_endpoint = owns_endpoint
        self.readable = _Waiter()
        self.writable = _Waiter()
        loop = asyncio.get_running_loop()
        self.connected: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.error: RudpError | None = None
        self.eof = False

    def on_event(self) -> None:
        conn = self.conn
        while (event := conn.next_event()) is not None:
            if isinstance(event, DataReadable):
                self.readable.wake()
            elif isinstance(event, EndOfData):
                self.eof = True
                self.readable.wake()
            elif isinstance(event, Connected):
                if not self.connected.done():
                    self.connected.set_result(None)
            elif isinstance(event, Terminated):
                self._terminated(event.error)
            elif isinstance(event, AddressChanged):
                pass  # the endpoint already sends to conn.peer_address
        if self.writable and conn.send_buffered <= conn.configuration.send_buffer:
            self.writable.wake()

    def _terminated(self, error: RudpError | None) -> None:
        self.error = error
        if not self.connected.done():
            self.connected.set_exception(
                error or ClosedError("connection closed during the handshake")
            )
            self.connected.exception()  # consumed by open_connection; avoid "never retrieved"
        self.readable.wake()
        self.writable.wake()
        if not self.closed.done():
            self.closed.set_result(None)
        if self.owns_endpoint:
            self.endpoint.loop.call_soon(self.endpoint.close)

    def touch(self) -> None:
        self.endpoint.touch(self.conn)


class StreamReader:
    """Reads a rudp byte stream; the same methods as :class:`asyncio.StreamReader`."""

    def __init__(self, driver: _Driver, limit: int = DEFAULT_LIMIT) -> None:
        self._driver = driver
        self._limit = limit
        self._buffer = bytearray()  # only what readline/readexactly pulled but did not return

    def _pull(self, n: int) -> bytes:
        data = self._driver.conn.read(n)
        if data:
            self._driver.touch()  # the receive window reopened: let the peer know
        return data

    def at_eof(self) -> bool:
        return not self._buffer and self._driver.conn.at_eof

    def _check_error(self) -> None:
        driver = self._driver
        if driver.error is not None and not driver.conn.readable:
            raise driver.error
        if (
            driver.conn.state is ConnectionState.TERMINATED
            and not driver.conn.readable
            and not driver.conn.at_eof
        ):
            raise ClosedError("the connection is closed")

    async def _fill(self) -> bool:
        """Append available bytes to the buffer, waiting for some; False at EOF."""
        while True:
            data = self._pull(-1)
            if data:
                self._buffer += data
                return True
            if self._driver.conn.at_eof:
                return False
            self._check_error()
            await self._driver.readable.wait()

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
        while True:
            data = self._pull(n)
            if data:
                return data
            if self._driver.conn.at_eof:
                return b""
            self._check_error()
            await self._driver.readable.wait()

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes; :class:`asyncio.IncompleteReadError` if EOF comes first."""
        if n < 0:
            raise ValueError("readexactly size can not be less than zero")
        while len(self._buffer) < n:
            if not await self._fill():
                partial, self._buffer = bytes(self._buffer), bytearray()
                raise asyncio.IncompleteReadError(partial, n)
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
    """Writes a rudp byte stream; the same methods as :class:`asyncio.StreamWriter`."""

    def __init__(self, driver: _Driver, reader: StreamReader) -> None:
        self._driver = driver
        self._reader = reader

    @property
    def transport(self) -> Any:  # asyncio compatibility: code that only checks it exists
        return self

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data``; never blocks. Follow with ``await drain()`` for backpressure."""
        driver = self._driver
        if driver.error is not None:
            raise driver.error
        driver.conn.send(bytes(data) if not isinstance(data, bytes) else data)
        driver.touch()

    def writelines(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    async def drain(self) -> None:
        """Wait while more than ``send_buffer`` bytes are sent but unacknowledged."""
        driver = self._driver
        conn = driver.conn
        while True:
            if driver.error is not None:
                raise driver.error
            if conn.state is ConnectionState.TERMINATED:
                raise ClosedError("the connection is closed")
            if conn.send_buffered <= conn.configuration.send_buffer:
                return
            await driver.writable.wait()

    def can_write_eof(self) -> bool:
        return self._driver.conn.configuration.framing == "rudp"

    def write_eof(self) -> None:
        """Half-close: the peer reads EOF after the data sent so far; reading continues."""
        if not self.can_write_eof():
            raise NotImplementedError("the kcp framings have no end-of-stream signal")
        self._driver.conn.write_eof()
        self._driver.touch()

    def close(self) -> None:
        """Graceful close: everything written is delivered, then the peer sees EOF."""
        driver = self._driver
        driver.conn.close(driver.endpoint.loop.time())
        driver.touch()

    def is_closing(self) -> bool:
        conn = self._driver.conn
        return conn._full_close or conn.state in (
            ConnectionState.TIME_WAIT,
            ConnectionState.TERMINATED,
        )

    async def wait_closed(self) -> None:
        """Wait until the close completed (or the connection failed; errors are not raised here)."""
        await asyncio.shield(self._driver.closed)

    def abort(self) -> None:
        """Reset: discard queued data; the peer sees a reset."""
        driver = self._driver
        driver.conn.reset("aborted", driver.endpoint.loop.time())
        driver.touch()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``peername``, ``sockname``, ``socket``, ``stats`` (counters), ``connection``."""
        driver = self._driver
        if name == "peername":
            return driver.conn.peer_address
        if name == "sockname":
            return driver.endpoint.sock.getsockname()
        if name == "socket":
            return driver.endpoint.sock
        if name == "stats":
            return driver.conn.stats()
        if name == "connection":
            return driver.conn
        return default

    def __repr__(self) -> str:
        return f"<rudp.StreamWriter peer={self._driver.conn.peer_address} state={self._driver.conn.state.value}>"


# ---------------------------------------------------------------------------- client


def _udp_socket(host: str, port: int, *, passive: bool) -> tuple[socket.socket, Address]:
    flags = socket.AI_PASSIVE if passive else 0
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=flags)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    return sock, addr


async def open_connection(
    host: str,
    port: int,
    *,
    configuration: Configuration | None = None,
    limit: int = DEFAULT_LIMIT,
    local_addr: tuple[str, int] | None = None,
) -> tuple[StreamReader, StreamWriter]:
    """Connect to a rudp server; returns ``(reader, writer)`` like :func:`asyncio.open_connection`.

    Raises :class:`rudp.ConnectionRefused` when the server refuses (or nothing
    listens and the host says so) and :class:`rudp.DeadPeerError` (a
    ``TimeoutError``) after ``connect_timeout`` without an answer.
    """
    config = configuration or Configuration()
    loop = asyncio.get_running_loop()
    sock, addr = await loop.run_in_executor(None, lambda: _udp_socket(host, port, passive=False))
    try:
        if local_addr is not None:
            sock.bind(local_addr)
        sock.connect(addr)
        addr = sock.getpeername()
    except OSError:
        sock.close()
        raise
    cid = int.from_bytes(os.urandom(8), "little")
    conn = Connection(config, is_client=True, cid=cid)
    holder: dict[str, _Driver] = {}
    endpoint = Endpoint(sock, config, on_event=lambda c: holder["driver"].on_event())
    endpoint.set_connected(True)
    driver = _Driver(conn, endpoint, owns_endpoint=True)
    holder["driver"] = driver
    conn.connect(addr, loop.time())
    endpoint.add(conn)
    try:
        await driver.connected
    except BaseException:
        conn.reset("connect cancelled", loop.time())
        endpoint.close()
        raise
    reader = StreamReader(driver, limit)
    return reader, StreamWriter(driver, reader)


# ---------------------------------------------------------------------------- server


class Server:
    """What :func:`start_server` returns; shaped like :class:`asyncio.Server`."""

    def __init__(self, endpoint: Endpoint, drivers: dict[Any, _Driver]) -> None:
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
        """Stop accepting and close the socket; live connections are reset."""
        if not self._serving:
            return
        self._serving = False
        now = self._endpoint.loop.time()
        for driver in list(self._drivers.values()):
            driver.conn.reset("server closed", now)
            self._endpoint._service(driver.conn, now)
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
        if self._endpoint._listener is not None:
            out.update(self._endpoint._listener.counters)
        out["connections"] = len(self._endpoint.connections)
        return out


ClientConnected = Callable[[StreamReader, StreamWriter], Awaitable[None] | None]


async def start_server(
    client_connected_cb: ClientConnected,
    host: str | None = None,
    port: int = 0,
    *,
    configuration: Configuration | None = None,
    limit: int = DEFAULT_LIMIT,
    reuse_port: bool = False,
) -> Server:
    """Serve rudp on ``host:port``; ``client_connected_cb(reader, writer)`` per connection."""
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
    drivers: dict[Any, _Driver] = {}
    pending: set[_Driver] = set()  # connected, handler not started: the accept backlog

    def on_event(conn: Connection) -> None:
        driver = drivers.get(id(conn))
        if driver is None:
            return
        driver.on_event()
        if conn.state is ConnectionState.TERMINATED and driver.closed.done():
            drivers.pop(id(conn), None)

    def on_accept(conn: Connection) -> bool:
        driver = _Driver(conn, endpoint, owns_endpoint=False)
        drivers[id(conn)] = driver
        pending.add(driver)
        loop.call_soon(start_handler, driver)
        return True

    def start_handler(driver: _Driver) -> None:
        pending.discard(driver)
        if driver.conn.state is ConnectionState.TERMINATED:
            return
        reader = StreamReader(driver, limit)
        writer = StreamWriter(driver, reader)
        result = client_connected_cb(reader, writer)
        if asyncio.iscoroutine(result):
            task = loop.create_task(result)
            task.add_done_callback(_log_handler_error)

    listener = Listener(config, secret=os.urandom(32))
    endpoint = Endpoint(
        sock,
        config,
        on_event=on_event,
        listener=listener,
        on_accept=on_accept,
        can_accept=lambda: len(pending) < config.backlog,
    )
    return Server(endpoint, drivers)


def _log_handler_error(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None and not isinstance(exc, RudpError | ConnectionError):
        print(f"rudp: unhandled error in client_connected_cb: {exc!r}", file=sys.stderr)
