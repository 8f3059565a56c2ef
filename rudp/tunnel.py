"""``rudp tunnel``: forward TCP connections through one rudp session, as kcptun does.

::

    rudp tunnel server --listen :4000 --target 127.0.0.1:22
    rudp tunnel client --listen 127.0.0.1:2222 --remote vps:4000

The client accepts TCP connections and carries each one as a stream of its
session to the server (``--conn N`` spreads them over N sessions); the server
opens a TCP connection to the target for each stream and copies both ways.
Every rudp configuration flag applies (framing, mode, windows, FEC, buffers).

With ``--framing kcp-go --smux-version 1|2`` either end speaks to Debian's
kcptun run as ``--crypt none --nocomp --ds 0 --ps 0`` with the same
``--smuxver`` (add ``--mtu 1350`` to match its datagram size): a rudp client in
front of ``kcptun-server``, or ``kcptun-client`` in front of a rudp server.

Closing: with the ``rudp`` framing each direction ends on its own (TCP
half-close maps to the stream's FIN and back). smux peers cannot half-close
(kcptun closes both directions once either ends), so over the kcp framings the
peer's FIN ends the whole connection once its bytes are written out, as kcptun
does. An error on either side (a reset, a dead session) aborts both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import rudp
from rudp.cli import add_configuration_arguments, configuration_from_args, format_configuration
from rudp.config import Configuration
from rudp.errors import RudpError

__all__ = [
    "TunnelClient",
    "TunnelServer",
    "add_arguments",
    "parse_address",
    "run",
    "start_tunnel_client",
    "start_tunnel_server",
]

#: Bytes moved per read on either side.
COPY_CHUNK = 64 * 1024
#: TCP buffered towards a slow TCP peer before reading the stream pauses (and its window closes).
TCP_HIGH_WATER = 256 * 1024

#: How long closing the client waits for each session's graceful close.
CLOSE_WAIT = 2.0

Address = tuple[str, int]
Log = Callable[[str], None]


def parse_address(text: str, what: str, default_host: str) -> Address:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (``default_host``) → ``(host, port)``."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ValueError(f"{what}: expected HOST:PORT or :PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{what}: port must be an integer in [0, 65535], got {text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{what}: port must be in [0, 65535], got {port}")
    return (host or default_host, port)


def _format(addr: Any) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _tunnel_configuration(config: Configuration) -> Configuration:
    """Streams need the mux: switch it on unless the user switched it off (an error)."""
    if config.mux is None and not config.mux_effective:
        return config.replace(mux=True)
    if not config.mux_effective:
        raise ValueError("mux must be on: rudp tunnel carries each TCP connection as a mux stream")
    return config


def _nodelay(writer: asyncio.StreamWriter) -> None:
    """Small writes go out at once (Go, so kcptun, sets TCP_NODELAY on every connection)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Counters:
    """What a tunnel end counts (``stats()``)."""

    def __init__(self) -> None:
        self.values = dict.fromkeys(
            (
                "connections",  # TCP connections forwarded, ever
                "active",  # forwarded right now
                "bytes_to_remote",  # TCP → stream
                "bytes_from_remote",  # stream → TCP
                "aborted",  # ended by an error on either side
                "failed",  # never forwarded: no session, no stream, or the target refused
            ),
            0,
        )

    def add(self, key: str, n: int = 1) -> None:
        self.values[key] += n


async def _forward(
    tcp: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    stream: tuple[rudp.StreamReader, rudp.StreamWriter],
    *,
    half_close: bool,
    counters: _Counters,
) -> None:
    """Copy both ways until done (see the module docstring for when that is)."""
    tcp_reader, tcp_writer = tcp
    stream_reader, stream_writer = stream
    _nodelay(tcp_writer)
    tcp_writer.transport.set_write_buffer_limits(TCP_HIGH_WATER)

    async def to_remote() -> None:
        while data := await tcp_reader.read(COPY_CHUNK):
            stream_writer.write(data)
            counters.add("bytes_to_remote", len(data))
            await stream_writer.drain()
        stream_writer.write_eof()

    async def from_remote() -> None:
        while data := await stream_reader.read(COPY_CHUNK):
            tcp_writer.write(data)
            counters.add("bytes_from_remote", len(data))
            await tcp_writer.drain()
        if tcp_writer.can_write_eof():
            tcp_writer.write_eof()

    up = asyncio.ensure_future(to_remote())
    down = asyncio.ensure_future(from_remote())
    counters.add("connections")
    counters.add("active")
    failed = True
    try:
        waiting: set[asyncio.Future[None]] = {up, down}
        while waiting:
            done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # an error in either direction ends both
            if down in done and not half_close:
                break  # a smux peer that sent FIN has forgotten the stream
        failed = False
    except (RudpError, OSError):
        pass  # the connection or the stream broke: abort both (below)
    finally:
        counters.add("active", -1)
        for task in (up, down):
            task.cancel()
        if failed:
            counters.add("aborted")
            tcp_writer.transport.abort()
            stream_writer.abort()
        else:
            stream_writer.close()
            tcp_writer.close()
            with contextlib.suppress(OSError):
                await tcp_writer.wait_closed()


class _Tunnel:
    """What both ends share: the tasks that forward connections, counters, shutdown."""

    def __init__(self, configuration: Configuration, log: Log | None) -> None:
        self.configuration = _tunnel_configuration(configuration)
        self._log = log
        self._counters = _Counters()
        self._tasks: set[asyncio.Future[None]] = set()
        self._closing = False
        self._closed = asyncio.get_running_loop().create_future()
        # smux (kcptun) cannot half-close; rudp's own mux can.
        self._half_close = self.configuration.framing == "rudp"

    def log(self, text: str) -> None:
        if self._log is not None:
            self._log(text)

    def stats(self) -> dict[str, int]:
        """Connections forwarded, active, aborted, failed; bytes each way."""
        return dict(self._counters.values)

    async def _track(self, work: Coroutine[Any, Any, None]) -> None:
        """Run one connection's forwarding as a task that close() can cancel.

        The cancellation stops here: asyncio's own handler task (start_server's)
        must end normally, or Python 3.11 logs the cancellation as an error.
        """
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            await task
        except asyncio.CancelledError:
            if not self._closing:
                raise

    async def _cancel_tasks(self) -> None:
        self._closing = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    def _set_closed(self) -> None:
        if not self._closed.done():
            self._closed.set_result(None)


class TunnelServer(_Tunnel):
    """rudp streams in, one TCP connection to ``target`` out per stream."""

    def __init__(self, target: Address, configuration: Configuration, log: Log | None) -> None:
        super().__init__(configuration, log)
        self.target = target
        self._server: rudp.Server | None = None

    async def _start(self, host: str, port: int) -> None:
        self._server = await rudp.serve(
            host, port, stream_handler=self._on_stream, configuration=self.configuration
        )

    @property
    def address(self) -> Address:
        """The UDP address the server listens on."""
        assert self._server is not None
        return self._server.addresses()[0][:2]

    def stats(self) -> dict[str, int]:
        out = super().stats()
        if self._server is not None:
            out["sessions"] = self._server.stats()["connections"]
        return out

    async def _on_stream(self, reader: rudp.StreamReader, writer: rudp.StreamWriter) -> None:
        await self._track(self._serve_stream(reader, writer))

    async def _serve_stream(self, reader: rudp.StreamReader, writer: rudp.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        sid = writer.get_extra_info("stream_id")
        try:
            tcp = await asyncio.wait_for(
                asyncio.open_connection(*self.target), self.configuration.connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            self._counters.add("failed")
            self.log(f"stream {sid} from {_format(peer)}: target {_format(self.target)}: {exc}")
            writer.abort()
            return
        self.log(f"stream {sid} opened from {_format(peer)} to {_format(self.target)}")
        await _forward(tcp, (reader, writer), half_close=self._half_close, counters=self._counters)
        self.log(f"stream {sid} from {_format(peer)} closed")

    async def close(self) -> None:
        """Stop listening, end every forwarded connection and session."""
        if self._server is not None:
            self._server.close()
        await self._cancel_tasks()
        self._set_closed()

    async def __aenter__(self) -> TunnelServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class TunnelClient(_Tunnel):
    """TCP connections in, one stream of a session to ``remote`` out per connection."""

    def __init__(
        self, remote: Address, configuration: Configuration, connections: int, log: Log | None
    ) -> None:
        if not 1 <= connections <= 256:
            raise ValueError(f"connections must be in [1, 256], got {connections}")
        super().__init__(configuration, log)
        self.remote = remote
        self._sessions: list[rudp.Session | None] = [None] * connections
        self._locks = [asyncio.Lock() for _ in range(connections)]
        self._next = 0
        self._server: asyncio.Server | None = None

    async def _start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._on_tcp, host, port)

    @property
    def address(self) -> Address:
        """The TCP address the client listens on."""
        assert self._server is not None
        return self._server.sockets[0].getsockname()[:2]

    def stats(self) -> dict[str, int]:
        out = super().stats()
        out["sessions"] = sum(1 for s in self._sessions if s is not None and not s.is_closed)
        return out

    async def _session(self) -> rudp.Session:
        """The next session in turn, (re)connected if it is missing or over."""
        index = self._next
        self._next = (index + 1) % len(self._sessions)
        async with self._locks[index]:
            session = self._sessions[index]
            if session is None or session.is_closed:
                session = await rudp.connect(*self.remote, configuration=self.configuration)
                self._sessions[index] = session
                self.log(f"session {index} connected to {_format(self.remote)}")
            return session

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._track(self._serve_tcp(reader, writer))

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            stream = await (await self._session()).open_stream()
        except (RudpError, OSError) as exc:
            self._counters.add("failed")
            self.log(f"{_format(peer)}: no stream to {_format(self.remote)}: {exc}")
            writer.transport.abort()
            return
        sid = stream[1].get_extra_info("stream_id")
        self.log(f"{_format(peer)} opened stream {sid} to {_format(self.remote)}")
        await _forward(
            (reader, writer), stream, half_close=self._half_close, counters=self._counters
        )
        self.log(f"{_format(peer)} stream {sid} closed")

    async def close(self) -> None:
        """Stop listening, end every forwarded connection, close the sessions."""
        if self._server is not None:
            self._server.close()
        await self._cancel_tasks()
        sessions = [s for s in self._sessions if s is not None]
        self._sessions = [None] * len(self._sessions)
        for session in sessions:
            try:  # graceful: the server learns at once (rudp framing) instead of timing out
                await asyncio.wait_for(session.close(), CLOSE_WAIT)
            except (RudpError, OSError, TimeoutError):
                session.abort()
        self._set_closed()

    async def __aenter__(self) -> TunnelClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def start_tunnel_server(
    listen: Address,
    target: Address,
    *,
    configuration: Configuration | None = None,
    log: Log | None = None,
) -> TunnelServer:
    """Serve rudp on UDP ``listen``; each stream becomes a TCP connection to ``target``.

    ``log`` receives one line per event (stream opened, closed, failed).
    """
    server = TunnelServer(target, configuration or Configuration(), log)
    await server._start(*listen)
    return server


async def start_tunnel_client(
    listen: Address,
    remote: Address,
    *,
    configuration: Configuration | None = None,
    connections: int = 1,
    log: Log | None = None,
) -> TunnelClient:
    """Accept TCP on ``listen``; each connection becomes a stream to the rudp server ``remote``.

    ``connections`` sessions share the streams in turn (kcptun's ``--conn``);
    each connects on first use and again after it ended.
    """
    client = TunnelClient(remote, configuration or Configuration(), connections, log)
    await client._start(*listen)
    return client


# ---------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``rudp tunnel server|client`` and their flags (plus every configuration flag)."""
    roles = parser.add_subparsers(dest="tunnel_role", metavar="ROLE", required=True)
    server = roles.add_parser("server", help="rudp in, TCP to --target out")
    server.add_argument(
        "-l", "--listen", required=True, metavar="[HOST]:PORT", help="UDP address to serve on"
    )
    server.add_argument(
        "-t", "--target", required=True, metavar="HOST:PORT", help="TCP address to forward to"
    )
    client = roles.add_parser("client", help="TCP on --listen in, rudp to --remote out")
    client.add_argument(
        "-l", "--listen", required=True, metavar="[HOST]:PORT", help="TCP address to accept on"
    )
    client.add_argument(
        "-r", "--remote", required=True, metavar="HOST:PORT", help="the rudp tunnel server"
    )
    client.add_argument(
        "--conn", type=int, default=1, metavar="N", help="sessions to spread streams over (1)"
    )
    for sub in (server, client):
        sub.add_argument(
            "-v", "--verbose", action="count", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
        sub.add_argument("-q", "--quiet", action="store_true", help="no per-stream log lines")
        add_configuration_arguments(sub)


async def _run(
    args: argparse.Namespace, config: Configuration, listen: Address, peer: Address
) -> int:
    def log(text: str) -> None:
        print(f"rudp tunnel: {text}", file=sys.stderr, flush=True)

    quiet_log = None if args.quiet else log
    tunnel: TunnelServer | TunnelClient
    try:
        if args.tunnel_role == "server":
            tunnel = await start_tunnel_server(listen, peer, configuration=config, log=quiet_log)
            ready = f"server: udp {_format(tunnel.address)} -> tcp {_format(peer)}"
        else:
            tunnel = await start_tunnel_client(
                listen, peer, configuration=config, connections=args.conn, log=quiet_log
            )
            ready = f"client: tcp {_format(tunnel.address)} -> udp {_format(peer)}"
    except OSError as exc:
        log(f"cannot listen on {_format(listen)}: {exc}")
        return 1
    log(f"{ready} ({config.framing} framing, smux v{config.smux_version})")
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    try:
        await stop
    finally:
        await tunnel.close()
        if getattr(args, "verbose", 0):
            log(f"stats {tunnel.stats()}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run a tunnel end until SIGINT/SIGTERM: 0 on a clean stop, 1 when it cannot listen."""
    config = _tunnel_configuration(configuration_from_args(args))
    if args.print_config:
        print(format_configuration(config))
        return 0
    listen = parse_address(args.listen, "--listen", "0.0.0.0")
    if args.tunnel_role == "server":
        peer = parse_address(args.target, "--target", "127.0.0.1")
    else:
        peer = parse_address(args.remote, "--remote", "127.0.0.1")
        if not 1 <= args.conn <= 256:
            raise ValueError(f"--conn must be in [1, 256], got {args.conn}")
    return asyncio.run(_run(args, config, listen, peer))
