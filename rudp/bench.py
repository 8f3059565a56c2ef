"""Measure rudp against TCP and a raw UDP blast on loopback, sender and receiver in separate processes.

Every number is measured in the same run as its reference and reported as a
ratio to it, because absolute speeds on a shared machine mean little. Bulk
goodput counts what the *receiver* got, from the sender's first send to the
receiver's last byte (``time.monotonic`` is one system-wide clock on Linux);
CPU is the user+system time of both processes over the transfer
(``resource.getrusage`` in each child). The raw UDP blast has no reliability:
its receiver counts what arrived. ``udp-sendto`` (a plain Python ``sendto``
loop) is the reference; ``udp-sendmmsg`` and ``udp-gso`` show what batching
and segmentation offload add. Echo latency is a ping-pong of 64-byte messages
timed with ``perf_counter_ns`` on the client.

With ``--streams N`` (N > 1) two more rudp rows share one session among N
streams (``rudp.connect`` + ``open_stream`` N times), each stream sending
``size / N``: ``rudp-streams`` with every reader reading (aggregate goodput,
compared with the single-stream ``rudp`` row of the same run), and
``rudp-streams-stalled`` where the receiver never reads stream 0, so its
window fills and stays full while the other N - 1 streams go on (their
aggregate, compared with ``rudp-streams``). Per-stream goodput counts from
the first send to that stream's last byte.

MB and GB here are 10^6 and 10^9 bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import resource
import select
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from rudp import udp, units
from rudp.config import Configuration

__all__ = ["BenchParams", "add_arguments", "run", "run_bench"]

MB = 1e6
GB = 1e9
ECHO_SIZE = 64
UDP_VARIANTS = ("sendto", "sendmmsg", "gso")
TRANSPORTS = ("udp", "tcp", "rudp")
TESTS = ("bulk", "echo")
#: How long a receiver waits for stragglers after the sender said it is done.
DRAIN_GAP = 0.25
#: Extra time a child gets beyond ``duration`` before it is declared stuck.
GRACE = 30.0
LOCALHOST = "127.0.0.1"


@dataclass(frozen=True)
class BenchParams:
    """What one ``rudp bench`` run measures (the CLI flags, parsed)."""

    configuration: Configuration = field(default_factory=Configuration)
    size: int = 64 * 1024 * 1024
    duration: float = 10.0
    samples: int = 2000
    warmup: int = 100
    streams: int = 1
    engine: str | None = None
    transports: tuple[str, ...] = TRANSPORTS
    tests: tuple[str, ...] = TESTS
    udp_variants: tuple[str, ...] = UDP_VARIANTS
    idle: int = 0
    idle_time: float = 10.0
    repeat: int = 1
    loop: str = "auto"

    def __post_init__(self) -> None:
        if not 1024 <= self.size <= 1 << 40:
            raise ValueError(f"size must be in [1K, 1T], got {self.size}")
        if not 0.1 <= self.duration <= 3600:
            raise ValueError(f"duration must be in [0.1s, 1h], got {self.duration}")
        if not 10 <= self.samples <= 10_000_000:
            raise ValueError(f"samples must be in [10, 10000000], got {self.samples}")
        if not 0 <= self.warmup <= 1_000_000:
            raise ValueError(f"warmup must be in [0, 1000000], got {self.warmup}")
        if not 1 <= self.streams <= 65535:
            raise ValueError(f"streams must be in [1, 65535], got {self.streams}")
        if self.engine not in (None, "python", "cython"):
            raise ValueError(f"engine must be 'python' or 'cython', got {self.engine!r}")
        for name, values, allowed in (
            ("transports", self.transports, TRANSPORTS),
            ("tests", self.tests, TESTS),
            ("udp variants", self.udp_variants, UDP_VARIANTS),
        ):
            bad = [v for v in values if v not in allowed]
            if bad:
                raise ValueError(f"{name} must be among {', '.join(allowed)}, got {bad[0]!r}")
        if not 0 <= self.idle <= 100_000:
            raise ValueError(f"idle must be in [0, 100000] connections, got {self.idle}")
        if not 0.1 <= self.idle_time <= 3600:
            raise ValueError(f"idle time must be in [0.1s, 1h], got {self.idle_time}")
        if not 1 <= self.repeat <= 100:
            raise ValueError(f"repeat must be in [1, 100], got {self.repeat}")
        if self.loop not in ("auto", "asyncio", "uvloop"):
            raise ValueError(f"loop must be auto, asyncio or uvloop, got {self.loop!r}")

    @property
    def datagram_size(self) -> int:
        """The raw UDP blast uses rudp's datagram size (the MTU)."""
        return self.configuration.mtu


# ---------------------------------------------------------------------------- child side
#
# Each role runs in its own process and talks to the parent over a Pipe:
# it may send ("ready", address), then sends ("result", dict) or ("error", text).
# A receiver is told ("done",) when its sender has finished.


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(role: Callable[..., dict[str, Any]], conn: Any, params: BenchParams, *extra: Any):
    try:
        conn.send(("result", role(conn, params, *extra)))
    except BaseException as exc:  # reported to the parent, which decides the exit code
        conn.send(("error", f"{role.__name__}: {exc!r}"))
    finally:
        conn.close()


def _rudp_api() -> tuple[Any, Any]:
    import rudp

    return rudp.open_connection, rudp.start_server  # type: ignore[attr-defined]


def _loop_name(params: BenchParams) -> str:
    """The event loop the rudp roles run on: uvloop when installed (``auto``), else asyncio's."""
    if params.loop != "auto":
        return params.loop
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def _run_async(main: Callable[[], Any], params: BenchParams) -> Any:
    if _loop_name(params) == "uvloop":
        import uvloop

        return uvloop.run(main())
    return asyncio.run(main())


def _engine_name() -> str | None:
    try:
        from rudp.engine import ENGINE
    except ImportError:
        return None
    return ENGINE


def _udp_blast_receiver(conn: Any, params: BenchParams) -> dict[str, Any]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOCALHOST, 0))
        caps = udp.configure(sock)
        io = udp.datagram_io(sock)
        conn.send(("ready", sock.getsockname()))
        cpu0 = _cpu()
        received = datagrams = 0
        last = None
        done = False
        hard_stop = time.monotonic() + params.duration + GRACE
        while time.monotonic() < hard_stop:
            readable, _, _ = select.select([sock, conn], [], [], DRAIN_GAP if done else 1.0)
            if not readable and done:
                break
            if conn in readable:
                conn.recv()
                done = True
            if sock in readable:
                batch = io.recv_batch()
                if batch:
                    last = time.monotonic()
                    datagrams += len(batch)
                    received += sum(len(d) for d, _ in batch)
        return {
            "received": received,
            "datagrams": datagrams,
            "last": last,
            "cpu": _cpu() - cpu0,
            "io": asdict(caps),
        }


def _udp_blast_sender(conn: Any, params: BenchParams, addr: Any, variant: str) -> dict[str, Any]:
    size, dgram = params.size, params.datagram_size
    payload = os.urandom(dgram)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        caps: dict[str, Any] = {"native": False, "mmsg": False, "gso": False, "gro": False}
        if variant != "sendto":
            caps = asdict(udp.configure(sock, native=True, gso=variant == "gso", gro=False))
        cpu0 = _cpu()
        start = time.monotonic()
        deadline = start + params.duration
        sent = 0
        if variant == "sendto":
            count = 0
            sendto = sock.sendto
            while sent < size:
                sendto(payload, addr)
                sent += dgram
                count += 1
                if not count & 255 and time.monotonic() > deadline:
                    break
        else:
            batch = [payload] * 64
            while sent < size and time.monotonic() < deadline:
                n = udp.send_batch(sock, batch[: max(1, min(64, (size - sent) // dgram))], addr)
                sent += n * dgram
                if n == 0:
                    select.select([], [sock], [], 0.1)
        return {
            "sent": sent,
            "start": start,
            "end": time.monotonic(),
            "cpu": _cpu() - cpu0,
            "io": caps,
        }


def _tcp_bulk_receiver(conn: Any, params: BenchParams) -> dict[str, Any]:
    with socket.create_server((LOCALHOST, 0)) as server:
        conn.send(("ready", server.getsockname()))
        server.settimeout(params.duration + GRACE)
        peer, _ = server.accept()
        cpu0 = _cpu()
        buf = bytearray(1 << 20)
        received = 0
        with peer:
            peer.settimeout(params.duration + GRACE)
            while n := peer.recv_into(buf):
                received += n
        return {"received": received, "last": time.monotonic(), "cpu": _cpu() - cpu0}


def _tcp_bulk_sender(conn: Any, params: BenchParams, addr: Any) -> dict[str, Any]:
    chunk = memoryview(os.urandom(256 * 1024))
    with socket.create_connection(addr) as sock:
        cpu0 = _cpu()
        start = time.monotonic()
        deadline = start + params.duration
        sent = 0
        while sent < params.size and time.monotonic() < deadline:
            piece = chunk[: min(len(chunk), params.size - sent)]
            sock.sendall(piece)
            sent += len(piece)
        sock.shutdown(socket.SHUT_WR)
        return {"sent": sent, "start": start, "end": time.monotonic(), "cpu": _cpu() - cpu0}


def _rudp_bulk_receiver(conn: Any, params: BenchParams) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        _, start_server = _rudp_api()
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[dict[str, Any]] = loop.create_future()

        async def handle(reader: Any, writer: Any) -> None:
            received = 0
            try:
                while data := await reader.read(1 << 16):
                    received += len(data)
                result = {"received": received, "last": time.monotonic()}
                result["stats"] = writer.get_extra_info("stats")
                writer.close()
                if not finished.done():
                    finished.set_result(result)
            except Exception as exc:
                if not finished.done():
                    finished.set_exception(exc)

        server = await start_server(handle, LOCALHOST, 0, configuration=params.configuration)
        sock = server.sockets[0]
        conn.send(("ready", sock.getsockname()[:2]))
        cpu0 = _cpu()
        try:
            result = await asyncio.wait_for(finished, params.duration + GRACE)
        finally:
            io = _io_capabilities(sock)
            server.close()
        result.update(cpu=_cpu() - cpu0, engine=_engine_name(), io=io)
        return result

    return _run_async(main, params)


def _io_capabilities(sock: socket.socket) -> dict[str, Any] | None:
    try:
        return asdict(udp.datagram_io(sock).capabilities)
    except ValueError:
        return None


def _rudp_bulk_sender(conn: Any, params: BenchParams, addr: Any) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        open_connection, _ = _rudp_api()
        _, writer = await open_connection(*addr, configuration=params.configuration)
        chunk = os.urandom(64 * 1024)
        cpu0 = _cpu()
        start = time.monotonic()
        deadline = start + params.duration
        sent = 0
        while sent < params.size and time.monotonic() < deadline:
            piece = chunk[: min(len(chunk), params.size - sent)]
            writer.write(piece)
            await writer.drain()
            sent += len(piece)
        writer.write_eof()
        await writer.drain()
        stats = writer.get_extra_info("stats")
        end = time.monotonic()
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), params.configuration.close_timeout)
        return {
            "sent": sent,
            "start": start,
            "end": end,
            "cpu": _cpu() - cpu0,
            "stats": stats,
            "engine": _engine_name(),
        }

    return _run_async(main, params)


#: Each stream of a multi-stream run starts with its index and flags.
STREAM_HEADER = struct.Struct("<IB")
STREAM_STALL = 0x01  # the receiver must never read this stream


def _rudp_streams_receiver(conn: Any, params: BenchParams) -> dict[str, Any]:
    return _streams_receiver(conn, params, stalled=False)


def _rudp_stalled_receiver(conn: Any, params: BenchParams) -> dict[str, Any]:
    return _streams_receiver(conn, params, stalled=True)


def _streams_receiver(conn: Any, params: BenchParams, stalled: bool) -> dict[str, Any]:
    """Serve one session; read every stream to EOF, except the one marked to stall."""

    async def main() -> dict[str, Any]:
        import rudp

        loop = asyncio.get_running_loop()
        expected = params.streams - stalled
        per_stream: dict[int, dict[str, Any]] = {}
        ended: set[int] = set()  # streams read to EOF
        errors: list[str] = []
        finished: asyncio.Future[None] = loop.create_future()
        hold = asyncio.Event()
        stats: dict[str, Any] = {}

        async def handle(reader: Any, writer: Any) -> None:
            try:
                index, flags = STREAM_HEADER.unpack(await reader.readexactly(STREAM_HEADER.size))
                if flags & STREAM_STALL:
                    await hold.wait()  # never read: the stream's window fills and stays full
                    return
                row = per_stream[index] = {"received": 0, "last": None}
                while data := await reader.read(1 << 16):
                    row["received"] += len(data)
                    row["last"] = time.monotonic()
                stats.update(writer.get_extra_info("stats"))
                ended.add(index)
                if len(ended) == expected and not finished.done():
                    finished.set_result(None)
            except (rudp.RudpError, asyncio.IncompleteReadError) as exc:
                # The sender reports its own errors; this stream is just incomplete.
                errors.append(repr(exc))

        server = await rudp.serve(
            LOCALHOST, 0, stream_handler=handle, configuration=params.configuration
        )
        sock = server.sockets[0]
        conn.send(("ready", sock.getsockname()[:2]))
        cpu0 = _cpu()
        sender_done = loop.run_in_executor(None, conn.recv)  # ("done",) once the sender ended
        try:
            await asyncio.wait(
                {finished, sender_done},
                timeout=params.duration + GRACE,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not finished.done():  # the sender gave up (its time ran out): what arrived
                await asyncio.wait({finished}, timeout=DRAIN_GAP * 4)
        finally:
            io = _io_capabilities(sock)
            hold.set()
            server.close()
        rows = [per_stream[i] for i in sorted(per_stream)]
        lasts = [r["last"] for r in rows if r["last"]]
        return {
            "received": sum(r["received"] for r in rows),
            "last": max(lasts) if lasts else None,
            "per_stream": rows,
            "complete": finished.done(),
            "stream_errors": errors,
            "cpu": _cpu() - cpu0,
            "stats": stats,
            "engine": _engine_name(),
            "io": io,
        }

    return _run_async(main, params)


def _rudp_streams_sender(conn: Any, params: BenchParams, addr: Any) -> dict[str, Any]:
    return _streams_sender(params, addr, stalled=False)


def _rudp_stalled_sender(conn: Any, params: BenchParams, addr: Any) -> dict[str, Any]:
    return _streams_sender(params, addr, stalled=True)


def _streams_sender(params: BenchParams, addr: Any, stalled: bool) -> dict[str, Any]:
    """One session, ``streams`` streams written at once; stream 0 is the stalled one if asked."""

    async def main() -> dict[str, Any]:
        import rudp

        session = await rudp.connect(*addr, configuration=params.configuration)
        writers = [(await session.open_stream())[1] for _ in range(params.streams)]
        chunk = os.urandom(64 * 1024)
        per = params.size // params.streams
        sent = [0] * params.streams
        cpu0 = _cpu()
        start = time.monotonic()

        async def pump(index: int) -> None:
            writer = writers[index]
            stall = stalled and index == 0
            writer.write(STREAM_HEADER.pack(index, STREAM_STALL if stall else 0))
            while sent[index] < per:
                piece = chunk[: min(len(chunk), per - sent[index])]
                writer.write(piece)
                sent[index] += len(piece)  # accepted: a cancelled drain() loses nothing
                await writer.drain()
            writer.write_eof()
            await writer.drain()

        pumps = [asyncio.ensure_future(pump(i)) for i in range(params.streams)]
        counted = pumps[1:] if stalled else pumps
        _, late = await asyncio.wait(counted, timeout=params.duration)
        end = time.monotonic()
        for task in late:  # out of time (a drain() may wait forever under smux v1's blocking)
            task.cancel()
        if stalled:
            pumps[0].cancel()
            writers[0].abort()
        await asyncio.gather(*pumps, return_exceptions=True)
        for task in counted:
            if not task.cancelled():
                task.result()  # a stream's error ends the measurement
        for index, task in enumerate(pumps):
            if task in late:
                with contextlib.suppress(rudp.RudpError):
                    writers[index].write_eof()  # what was queued still arrives, then EOF
        stats = session.stats
        with contextlib.suppress(Exception):  # v1 with a stalled stream cannot close cleanly
            await asyncio.wait_for(session.close(), min(params.configuration.close_timeout, 2.0))
        session.abort()
        return {
            "sent": sum(sent[1:] if stalled else sent),
            "per_stream_sent": sent,
            "start": start,
            "end": end,
            "cpu": _cpu() - cpu0,
            "stats": stats,
            "engine": _engine_name(),
        }

    return _run_async(main, params)


def _stream_rows(sent: dict[str, Any], got: dict[str, Any], stalled: bool) -> dict[str, Any]:
    """Per-stream goodput (first send to the stream's last byte) and how evenly it is shared."""
    start = sent["start"]
    rates = [
        r["received"] / (r["last"] - start) / MB if r["last"] and r["last"] > start else 0.0
        for r in got["per_stream"]
    ]
    out: dict[str, Any] = {
        "streams": len(sent["per_stream_sent"]),
        "complete": got["complete"],
        "per_stream_mb_s": rates,
    }
    if rates:
        out.update(
            per_stream_min_mb_s=min(rates),
            per_stream_mean_mb_s=sum(rates) / len(rates),
            per_stream_max_mb_s=max(rates),
            # Jain's index: 1 when every stream got the same, 1/n when one got everything.
            fairness=sum(rates) ** 2 / (len(rates) * sum(r * r for r in rates))
            if any(rates)
            else 0.0,
        )
    if stalled:
        out["stalled_stream_sent_bytes"] = sent["per_stream_sent"][0]
    if got.get("stream_errors"):
        out["stream_errors"] = got["stream_errors"]
    return out


def _udp_echo_server(conn: Any, params: BenchParams) -> dict[str, Any]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOCALHOST, 0))
        conn.send(("ready", sock.getsockname()))
        while True:
            readable, _, _ = select.select([sock, conn], [], [])
            if conn in readable:
                return {}
            data, addr = sock.recvfrom(65536)
            sock.sendto(data, addr)


def _tcp_echo_server(conn: Any, params: BenchParams) -> dict[str, Any]:
    with socket.create_server((LOCALHOST, 0)) as server:
        conn.send(("ready", server.getsockname()))
        server.settimeout(params.duration + GRACE)
        peer, _ = server.accept()
        with peer:
            peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := peer.recv(65536):
                peer.sendall(data)
        return {}


def _rudp_echo_server(conn: Any, params: BenchParams) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        _, start_server = _rudp_api()
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[None] = loop.create_future()

        async def handle(reader: Any, writer: Any) -> None:
            try:
                while True:
                    data = await reader.readexactly(ECHO_SIZE)
                    writer.write(data)
                    await writer.drain()
            except asyncio.IncompleteReadError:
                pass
            finally:
                writer.close()
                if not finished.done():
                    finished.set_result(None)

        server = await start_server(handle, LOCALHOST, 0, configuration=params.configuration)
        conn.send(("ready", server.sockets[0].getsockname()[:2]))
        try:
            await asyncio.wait_for(finished, params.duration + GRACE + params.samples * 0.01)
        finally:
            server.close()
        return {}

    return _run_async(main, params)


def _echo_client(conn: Any, params: BenchParams, addr: Any, transport: str) -> dict[str, Any]:
    message = os.urandom(ECHO_SIZE)
    total = params.warmup + params.samples
    rtts: list[int] = []
    if transport == "rudp":

        async def main() -> dict[str, Any]:
            open_connection, _ = _rudp_api()
            reader, writer = await open_connection(*addr, configuration=params.configuration)
            for i in range(total):
                t0 = time.perf_counter_ns()
                writer.write(message)
                await reader.readexactly(ECHO_SIZE)
                if i >= params.warmup:
                    rtts.append(time.perf_counter_ns() - t0)
            writer.write_eof()
            writer.close()
            return {"rtt_ns": rtts, "lost": 0, "engine": _engine_name()}

        return _run_async(main, params)
    lost = 0
    if transport == "udp":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(addr)
            sock.settimeout(1.0)
            for i in range(total):
                t0 = time.perf_counter_ns()
                sock.send(message)
                try:
                    sock.recv(65536)
                except TimeoutError:
                    lost += 1
                    continue
                if i >= params.warmup:
                    rtts.append(time.perf_counter_ns() - t0)
        return {"rtt_ns": rtts, "lost": lost}
    with socket.create_connection(addr) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(total):
            t0 = time.perf_counter_ns()
            sock.sendall(message)
            got = 0
            while got < ECHO_SIZE:
                piece = sock.recv(ECHO_SIZE - got)
                if not piece:
                    raise ConnectionError("echo server closed the connection")
                got += len(piece)
            if i >= params.warmup:
                rtts.append(time.perf_counter_ns() - t0)
    return {"rtt_ns": rtts, "lost": 0}


def _idle_server(conn: Any, params: BenchParams) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        _, start_server = _rudp_api()
        writers: list[Any] = []
        server = await start_server(
            lambda r, w: writers.append(w), LOCALHOST, 0, configuration=params.configuration
        )
        await asyncio.sleep(0.2)  # let the loop settle before the baseline
        rss0 = _rss()
        conn.send(("ready", server.sockets[0].getsockname()[:2]))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, conn.recv)  # ("measure",): all clients connected
        rss1 = _rss()
        cpu0, t0 = _cpu(), time.monotonic()
        await asyncio.sleep(params.idle_time)
        cpu = _cpu() - cpu0
        elapsed = time.monotonic() - t0
        server.close()
        return {
            "connections": len(writers),
            "cpu_s": cpu,
            "seconds": elapsed,
            "cpu_fraction": cpu / elapsed,
            "rss_delta": rss1 - rss0,
            "bytes_per_connection": (rss1 - rss0) / max(1, len(writers)),
        }

    return _run_async(main, params)


def _idle_clients(conn: Any, params: BenchParams, addr: Any) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        open_connection, _ = _rudp_api()
        pairs = []
        for _ in range(params.idle):
            pairs.append(await open_connection(*addr, configuration=params.configuration))
        conn.send(("ready", len(pairs)))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, conn.recv)  # ("done",): measurement over
        for _, writer in pairs:
            writer.close()
        return {"opened": len(pairs)}

    return _run_async(main, params)


# ---------------------------------------------------------------------------- parent side


class _Child:
    """One role in its own process (spawned: nothing inherited but the environment)."""

    _ctx = multiprocessing.get_context("spawn")

    def __init__(self, role: Callable[..., dict[str, Any]], params: BenchParams, *extra: Any):
        self.conn, child_conn = self._ctx.Pipe()
        self.name = role.__name__.strip("_")
        self.process = self._ctx.Process(
            target=_child, args=(role, child_conn, params, *extra), daemon=True
        )
        self.process.start()
        child_conn.close()

    def expect(self, kind: str, timeout: float) -> Any:
        """The next message, which must be ``kind``; an error or a timeout raises."""
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{self.name}: no answer within {timeout:.0f} s")
        try:
            message = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"{self.name}: the process died") from None
        if message[0] == "error":
            raise RuntimeError(message[1])
        if message[0] != kind:
            raise RuntimeError(f"{self.name}: expected {kind!r}, got {message[0]!r}")
        return message[1]

    def tell(self, *message: Any) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(message)

    def stop(self) -> None:
        self.process.join(2.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


@contextlib.contextmanager
def _pair(
    server_role: Callable[..., dict[str, Any]],
    client_role: Callable[..., dict[str, Any]],
    params: BenchParams,
    *client_extra: Any,
) -> Iterator[tuple[_Child, _Child]]:
    server = _Child(server_role, params)
    client = None
    try:
        addr = server.expect("ready", GRACE)
        client = _Child(client_role, params, addr, *client_extra)
        yield server, client
    finally:
        for child in (client, server):
            if child is not None:
                child.stop()


def _limit(params: BenchParams) -> float:
    return params.duration + 2 * GRACE


def _bulk(
    receiver_role: Callable[..., dict[str, Any]],
    sender_role: Callable[..., dict[str, Any]],
    params: BenchParams,
    *sender_extra: Any,
) -> dict[str, Any]:
    with _pair(receiver_role, sender_role, params, *sender_extra) as (receiver, sender):
        sent = sender.expect("result", _limit(params))
        receiver.tell("done")
        got = receiver.expect("result", _limit(params))
    received = got["received"]
    seconds = (got["last"] - sent["start"]) if got.get("last") else 0.0
    cpu = sent["cpu"] + got["cpu"]
    out: dict[str, Any] = {
        "goodput_mb_s": received / seconds / MB if seconds > 0 else 0.0,
        "received_bytes": received,
        "sent_bytes": sent["sent"],
        "loss": 1 - received / sent["sent"] if sent["sent"] else 0.0,
        "seconds": seconds,
        "cpu_s": cpu,
        "cpu_s_per_gb": cpu / (received / GB) if received else None,
    }
    engine = got.get("engine") or sent.get("engine")
    if engine:
        out["engine"] = engine
    for key in ("io", "stats"):
        both = {"sender": sent.get(key), "receiver": got.get(key)}
        if any(both.values()):
            out[key] = both
    if "per_stream" in got:
        out.update(_stream_rows(sent, got, stalled=receiver_role is _rudp_stalled_receiver))
    return out


def _percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        raise ValueError("no samples")
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil(n * q / 100), at least 1
    return sorted_values[int(rank) - 1]


def _echo(server_role: Callable[..., dict[str, Any]], transport: str, params: BenchParams):
    limit = _limit(params) + (params.warmup + params.samples) * 0.01
    with _pair(server_role, _echo_client, params, transport) as (server, client):
        got = client.expect("result", limit)
        server.tell("done")
    rtts = sorted(got["rtt_ns"])
    out: dict[str, Any] = {
        "samples": len(rtts),
        "lost": got["lost"],
        "p50_us": _percentile(rtts, 50) / 1000,
        "p99_us": _percentile(rtts, 99) / 1000,
        "mean_us": sum(rtts) / len(rtts) / 1000,
    }
    if got.get("engine"):
        out["engine"] = got["engine"]
    return out


def _idle(params: BenchParams) -> dict[str, Any]:
    with _pair(_idle_server, _idle_clients, params) as (server, clients):
        clients.expect("ready", params.idle * 0.1 + GRACE)
        server.tell("measure")
        got = server.expect("result", params.idle_time + GRACE)
        clients.tell("done")
    return got


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _ratios(report: dict[str, Any]) -> dict[str, float | None]:
    bulk, echo = report.get("bulk", {}), report.get("echo", {})

    def good(name: str) -> float | None:
        return bulk.get(name, {}).get("goodput_mb_s")

    def lat(name: str, key: str) -> float | None:
        return echo.get(name, {}).get(key)

    ratios = {
        "rudp_goodput_vs_udp": _ratio(good("rudp"), good("udp-sendto")),
        "rudp_goodput_vs_tcp": _ratio(good("rudp"), good("tcp")),
        "tcp_goodput_vs_udp": _ratio(good("tcp"), good("udp-sendto")),
        "udp_sendmmsg_vs_sendto": _ratio(good("udp-sendmmsg"), good("udp-sendto")),
        "udp_gso_vs_sendto": _ratio(good("udp-gso"), good("udp-sendto")),
        "rudp_echo_p50_vs_udp": _ratio(lat("rudp", "p50_us"), lat("udp", "p50_us")),
        "rudp_echo_p99_vs_udp": _ratio(lat("rudp", "p99_us"), lat("udp", "p99_us")),
        "rudp_echo_p50_vs_tcp": _ratio(lat("rudp", "p50_us"), lat("tcp", "p50_us")),
        "tcp_echo_p50_vs_udp": _ratio(lat("tcp", "p50_us"), lat("udp", "p50_us")),
        # --streams N: N streams of one session against one stream, and N - 1 of them
        # while the receiver never reads the other one against all N read.
        "rudp_streams_vs_single": _ratio(good("rudp-streams"), good("rudp")),
        "rudp_stalled_others_vs_streams": _ratio(
            good("rudp-streams-stalled"), good("rudp-streams")
        ),
        "rudp_stalled_per_stream_vs_streams": _ratio(
            bulk.get("rudp-streams-stalled", {}).get("per_stream_mean_mb_s"),
            bulk.get("rudp-streams", {}).get("per_stream_mean_mb_s"),
        ),
    }
    return {k: v for k, v in ratios.items() if v is not None}


#: The project's targets: (name, where the value is, limit, True if the value must be at least it).
TARGETS: tuple[tuple[str, tuple[str, ...], float, bool], ...] = (
    ("bulk goodput >= 0.8 x raw UDP", ("ratios", "rudp_goodput_vs_udp"), 0.8, True),
    ("echo p50 <= 2 x raw UDP", ("ratios", "rudp_echo_p50_vs_udp"), 2.0, False),
    ("echo p99 <= 3 x raw UDP", ("ratios", "rudp_echo_p99_vs_udp"), 3.0, False),
    ("CPU <= 8 s per GB (both ends)", ("bulk", "rudp", "cpu_s_per_gb"), 8.0, False),
    ("idle CPU < 1% of a core", ("idle", "cpu_fraction"), 0.01, False),
    ("idle memory <= 32 KB per connection", ("idle", "bytes_per_connection"), 32 * 1024, False),
    ("--streams: aggregate >= 0.9 x one stream", ("ratios", "rudp_streams_vs_single"), 0.9, True),
    (
        "--streams: one reader stopped, the others keep >= 0.9 x",
        ("ratios", "rudp_stalled_others_vs_streams"),
        0.9,
        True,
    ),
)


def _targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, path, limit, at_least in TARGETS:
        value: Any = report
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, int | float):
            ok = value >= limit if at_least else value <= limit
            out.append({"name": name, "value": value, "limit": limit, "ok": ok})
    return out


def _load() -> dict[str, Any]:
    return {"loadavg": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}


def _rudp_missing() -> str | None:
    try:
        _rudp_api()
    except (ImportError, AttributeError):
        return "rudp.open_connection / rudp.start_server are not available in this build"
    return None


def _steps(params: BenchParams) -> list[tuple[str, str, Callable[[], dict[str, Any]]]]:
    """(section, name, measurement) for everything this run measures, in order."""
    steps: list[tuple[str, str, Callable[[], dict[str, Any]]]] = []
    if "bulk" in params.tests:
        if "udp" in params.transports:
            for variant in params.udp_variants:
                steps.append(
                    (
                        "bulk",
                        f"udp-{variant}",
                        lambda v=variant: _bulk(_udp_blast_receiver, _udp_blast_sender, params, v),
                    )
                )
        if "tcp" in params.transports:
            steps.append(
                ("bulk", "tcp", lambda: _bulk(_tcp_bulk_receiver, _tcp_bulk_sender, params))
            )
        if "rudp" in params.transports:
            steps.append(
                ("bulk", "rudp", lambda: _bulk(_rudp_bulk_receiver, _rudp_bulk_sender, params))
            )
            if params.streams > 1:
                steps.append(
                    (
                        "bulk",
                        "rudp-streams",
                        lambda: _bulk(_rudp_streams_receiver, _rudp_streams_sender, params),
                    )
                )
                steps.append(
                    (
                        "bulk",
                        "rudp-streams-stalled",
                        lambda: _bulk(_rudp_stalled_receiver, _rudp_stalled_sender, params),
                    )
                )
    if "echo" in params.tests:
        servers = {"udp": _udp_echo_server, "tcp": _tcp_echo_server, "rudp": _rudp_echo_server}
        for transport in TRANSPORTS:
            if transport in params.transports:
                steps.append(
                    (
                        "echo",
                        transport,
                        lambda t=transport: _echo(servers[t], t, params),
                    )
                )
    if params.idle:
        steps.append(("idle", "rudp", lambda: _idle(params)))
    return steps


def _skip_reason(params: BenchParams, section: str, name: str) -> str | None:
    if name.startswith("udp-") and name != "udp-sendto" and not udp.native_available():
        return "needs the compiled rudp._udp extension (Linux)"
    if name.startswith("rudp"):
        return _rudp_missing()
    return None


@contextlib.contextmanager
def _engine_env(engine: str | None) -> Iterator[None]:
    """Children inherit ``RUDP_ENGINE``; restore the parent's value afterwards."""
    if engine is None:
        yield
        return
    old = os.environ.get("RUDP_ENGINE")
    os.environ["RUDP_ENGINE"] = engine
    try:
        yield
    finally:
        if old is None:
            del os.environ["RUDP_ENGINE"]
        else:
            os.environ["RUDP_ENGINE"] = old


#: The value that ranks repeated runs of each kind of measurement.
_MEDIAN_OF = {"bulk": "goodput_mb_s", "echo": "p50_us", "idle": "cpu_fraction"}


def run_bench(
    params: BenchParams, on_step: Callable[[str, str], None] | None = None
) -> dict[str, Any]:
    """Measure everything ``params`` asks for; returns the report (what ``--json`` prints).

    A measurement that fails is reported under ``errors`` and the run goes on.
    ``on_step(section, name)`` is called before each measurement (progress display).
    With ``repeat > 1`` the whole sequence runs that many times, interleaved so
    that a change in the machine's load hits every transport alike, and each
    entry is the median run (by goodput, p50 or idle CPU) with the values of
    all runs under ``repeats``.
    """
    report: dict[str, Any] = {
        "load_before": _load(),
        "params": {
            "size": params.size,
            "duration": params.duration,
            "datagram_size": params.datagram_size,
            "samples": params.samples,
            "mode": params.configuration.mode,
            "sndwnd": params.configuration.sndwnd,
            "rcvwnd": params.configuration.rcvwnd,
            "streams": params.streams,
            "repeat": params.repeat,
        },
        "errors": [],
        "skipped": {},
    }
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with _engine_env(params.engine):
        for _ in range(params.repeat):
            for section, name, measure in _steps(params):
                if on_step is not None:
                    on_step(section, name)
                reason = _skip_reason(params, section, name)
                if reason:
                    report["skipped"][f"{section}/{name}"] = reason
                    continue
                try:
                    result = measure()
                except Exception as exc:
                    report["errors"].append(f"{section}/{name}: {exc}")
                    continue
                runs.setdefault((section, name), []).append(result)
    for (section, name), results in runs.items():
        key = _MEDIAN_OF[section]
        results.sort(key=lambda r: r[key])
        result = results[(len(results) - 1) // 2]
        if params.repeat > 1:
            result["repeats"] = [r[key] for r in results]
        if section == "idle":
            report["idle"] = result
        else:
            report.setdefault(section, {})[name] = result
    report["load_after"] = _load()
    engines = [r.get("engine") for s in ("bulk", "echo") for r in report.get(s, {}).values()]
    report["engine"] = next((e for e in engines if e), params.engine or _engine_name())
    report["loop"] = _loop_name(params)
    rudp_io = report.get("bulk", {}).get("rudp", {}).get("io", {}).get("receiver")
    report["io"] = rudp_io or _probe_io()
    report["ratios"] = _ratios(report)
    report["targets"] = _targets(report)
    return report


def _probe_io() -> dict[str, Any]:
    """What the I/O layer would use on a fresh loopback socket."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        return asdict(udp.configure(sock))


# ---------------------------------------------------------------------------- CLI


def _csv(allowed: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(v.strip() for v in text.split(",") if v.strip())
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {','.join(allowed)}, got {text!r}"
            )
        return values

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``rudp bench`` flags, plus the shared rudp configuration flags."""
    from rudp.cli import add_configuration_arguments

    group = parser.add_argument_group("benchmark")
    group.add_argument("--size", default="64M", help="bytes per bulk transfer (default: 64M)")
    group.add_argument(
        "--duration", default="10s", help="time limit per bulk transfer (default: 10s)"
    )
    group.add_argument("--samples", type=int, default=2000, help="echo round trips (default: 2000)")
    group.add_argument("--streams", type=int, default=1, help="mux streams for rudp bulk")
    group.add_argument("--engine", choices=("python", "cython"), help="force the rudp engine")
    group.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop for the rudp side (default: uvloop when installed)",
    )
    group.add_argument(
        "--transports",
        type=_csv(TRANSPORTS),
        default=TRANSPORTS,
        help="which of udp,tcp,rudp to measure (default: all)",
    )
    group.add_argument(
        "--tests", type=_csv(TESTS), default=TESTS, help="which of bulk,echo (default: both)"
    )
    group.add_argument(
        "--udp-variants",
        type=_csv(UDP_VARIANTS),
        default=UDP_VARIANTS,
        help="raw UDP senders: sendto (the reference), sendmmsg, gso (default: all)",
    )
    group.add_argument(
        "--idle", type=int, default=0, metavar="N", help="also measure N idle rudp connections"
    )
    group.add_argument("--idle-time", default="10s", help="idle measurement time (default: 10s)")
    group.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run everything N times, interleaved, and report the median run (default: 1)",
    )
    group.add_argument("--json", action="store_true", help="print one JSON object")
    group.add_argument(
        "--check", action="store_true", help="exit 1 when a project target is missed"
    )
    add_configuration_arguments(parser)


def params_from_args(args: argparse.Namespace) -> BenchParams:
    from rudp.cli import configuration_from_args

    return BenchParams(
        configuration=configuration_from_args(args),
        size=units.parse_size(args.size, "size"),
        duration=units.parse_duration(args.duration, "duration"),
        samples=args.samples,
        streams=args.streams,
        engine=args.engine,
        loop=args.loop,
        transports=args.transports,
        tests=args.tests,
        udp_variants=args.udp_variants,
        idle=args.idle,
        idle_time=units.parse_duration(args.idle_time, "idle time"),
        repeat=args.repeat,
    )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark: 0 all measured, 1 a measurement failed (or ``--check`` missed), 2 usage."""
    params = params_from_args(args)
    if getattr(args, "print_config", False):
        from rudp.cli import format_configuration

        print(format_configuration(params.configuration))
        return 0
    if args.json:
        report = run_bench(params)
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        report = _run_with_progress(params)
        _print_report(report, verbose=getattr(args, "verbose", 0))
    failed = bool(report["errors"])
    if args.check and not all(t["ok"] for t in report["targets"]):
        failed = True
    return 1 if failed else 0


def _run_with_progress(params: BenchParams) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import Progress

    steps = len(_steps(params)) * params.repeat
    console = Console(stderr=True)
    with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("rudp bench", total=steps)
        done = iter(range(steps))

        def on_step(section: str, name: str) -> None:
            progress.update(task, completed=next(done), description=f"{section}: {name}")

        report = run_bench(params, on_step)
        progress.update(task, completed=steps)
    return report


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print_streams(console: Any, bulk: dict[str, Any], ratios: dict[str, float]) -> None:
    """The --streams rows: per-stream goodput, and the two ratios the targets judge."""
    from rich.table import Table

    rows = {k: bulk[k] for k in ("rudp-streams", "rudp-streams-stalled") if k in bulk}
    if not rows:
        return
    table = Table(title="streams of one rudp session, goodput MB/s (aggregate and per stream)")
    for column in ("run", "readers", "aggregate", "min", "mean", "max", "fairness"):
        table.add_column(column, justify="right" if column != "run" else "left")
    for name, row in rows.items():
        table.add_row(
            name,
            str(len(row.get("per_stream_mb_s", []))),
            _fmt(row["goodput_mb_s"], ".1f"),
            _fmt(row.get("per_stream_min_mb_s"), ".1f"),
            _fmt(row.get("per_stream_mean_mb_s"), ".1f"),
            _fmt(row.get("per_stream_max_mb_s"), ".1f"),
            _fmt(row.get("fairness"), ".3f"),
        )
    console.print(table)
    stalled = rows.get("rudp-streams-stalled", {})
    if "stalled_stream_sent_bytes" in stalled:
        console.print(
            f"stalled stream: {units.format_size(stalled['stalled_stream_sent_bytes'])} accepted "
            "from its writer, then held back by its window"
        )
    for key, text in (
        ("rudp_streams_vs_single", "aggregate of all streams / one stream"),
        ("rudp_stalled_others_vs_streams", "others with one reader stopped / all reading"),
        ("rudp_stalled_per_stream_vs_streams", "per other stream, stopped / all reading"),
    ):
        if key in ratios:
            console.print(f"{text}: {ratios[key]:.2f}")


def _print_report(report: dict[str, Any], verbose: int = 0) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    bulk, echo, ratios = report.get("bulk", {}), report.get("echo", {}), report["ratios"]
    ref = bulk.get("udp-sendto", {}).get("goodput_mb_s")
    table = Table(title="rudp bench (loopback, separate processes)")
    for column in ("transport", "goodput MB/s", "x udp-sendto", "CPU s/GB", "loss"):
        table.add_column(column, justify="right" if column != "transport" else "left")
    for name, row in bulk.items():
        table.add_row(
            name,
            _fmt(row["goodput_mb_s"], ".1f"),
            _fmt(_ratio(row["goodput_mb_s"], ref), ".2f"),
            _fmt(row["cpu_s_per_gb"], ".2f"),
            _fmt(row["loss"], ".1%"),
        )
    if bulk:
        console.print(table)
    _print_streams(console, bulk, ratios)
    if echo:
        ref50, ref99 = echo.get("udp", {}).get("p50_us"), echo.get("udp", {}).get("p99_us")
        table = Table(title=f"echo latency, {ECHO_SIZE}-byte messages")
        for column in ("transport", "p50 µs", "x udp", "p99 µs", "x udp", "samples"):
            table.add_column(column, justify="right" if column != "transport" else "left")
        for name, row in echo.items():
            table.add_row(
                name,
                _fmt(row["p50_us"], ".1f"),
                _fmt(_ratio(row["p50_us"], ref50), ".2f"),
                _fmt(row["p99_us"], ".1f"),
                _fmt(_ratio(row["p99_us"], ref99), ".2f"),
                str(row["samples"]),
            )
        console.print(table)
    if "idle" in report:
        idle = report["idle"]
        console.print(
            f"idle: {idle['connections']} connections, server CPU "
            f"{idle['cpu_fraction']:.2%} of a core over {idle['seconds']:.1f} s, "
            f"{units.format_size(idle['bytes_per_connection'])} per connection (RSS delta)"
        )
    for target in report["targets"]:
        mark = "[green]ok[/green]" if target["ok"] else "[red]missed[/red]"
        console.print(f"target {target['name']}: {target['value']:.3g} {mark}")
    io = report["io"]
    console.print(
        f"engine: {report['engine'] or 'n/a'}; loop: {report.get('loop')}; I/O: "
        + ", ".join(k for k in ("mmsg", "gso", "gro") if io.get(k))
        + f"; load {report['load_before']['loadavg']} -> {report['load_after']['loadavg']}"
        f" on {report['load_before']['cpus']} CPUs"
    )
    if verbose and ratios:
        console.print(ratios)
    for where, reason in report["skipped"].items():
        console.print(f"[yellow]skipped[/yellow] {where}: {reason}")
    for error in report["errors"]:
        console.print(f"[red]error[/red] {error}")


if __name__ == "__main__":  # until `rudp bench` is wired into rudp.cli
    _parser = argparse.ArgumentParser(prog="python -m rudp.bench", description=__doc__)
    _parser.add_argument("-v", "--verbose", action="count", default=0)
    add_arguments(_parser)
    try:
        sys.exit(run(_parser.parse_args()))
    except ValueError as exc:
        print(f"rudp bench: {exc}", file=sys.stderr)
        sys.exit(2)
