"""The workloads ``rudp sim`` runs over an emulated link, for TCP, the reference C KCP and rudp.

Each workload has a server and a client, run as separate processes (possibly
in different network namespaces, or inside a VM) and reporting JSON on
stdout. Times are CLOCK_MONOTONIC (``time.monotonic_ns``), one clock for the
whole machine, so a receiver can compute one-way latency from the sender's
timestamp.

- ``messages``: one ``size``-byte message every ``interval`` for ``count``
  messages; the server records each message's one-way latency.
- ``echo``: like KCP's own test, a small message every ``interval``; the
  server echoes it and the client records round-trip times.
- ``bulk``: ``size`` bytes as fast as the protocol goes; the server records
  when the last byte arrived (goodput = size / (last byte - first send)).

Protocols: ``tcp`` (Linux TCP, TCP_NODELAY, the kernel's congestion control
unless ``--tcp-congestion`` names one), ``kcp`` (PyPI ``kcp``, the reference
ikcp.c: fast3 = nodelay 1, interval 10 ms, resend 2, no congestion window,
windows 128/128 as in KCP's test; driven by ``ikcp_update``), ``rudp``
(``rudp.open_connection``/``rudp.start_server`` with a given configuration).

    python -m netem.workloads server --protocol tcp --workload messages --bind 10.201.0.2:0 --count 750
    python -m netem.workloads client --protocol tcp --workload messages --connect 10.201.0.2:PORT \\
        --count 750 --interval 20ms --size 16

The server prints ``{"ready": true, "port": P}`` once it listens, then its result.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import select
import socket
import struct
import sys
import time
import tomllib
from collections.abc import Callable
from typing import Any

from rudp import units

__all__ = ["ECHO", "KCP_CONV", "MESSAGE", "PROTOCOLS", "WORKLOADS", "Echoes", "main"]

PROTOCOLS = ("tcp", "kcp", "rudp")
WORKLOADS = ("messages", "echo", "bulk")
KCP_CONV = 0x52554450
#: Messages carry their sequence number and send time.
MESSAGE = struct.Struct("!IQ")
#: Echo messages carry their sequence number only.
ECHO = struct.Struct("!I")
#: A bulk transfer starts with its send time and length.
BULK = struct.Struct("!QQ")
_KCP_PUSH = 81
_CHUNK = 64 * 1024


def _now() -> int:
    return time.monotonic_ns()


def message(seq: int, size: int) -> bytes:
    return MESSAGE.pack(seq, _now()) + bytes(max(0, size - MESSAGE.size))


class Echoes:
    """Client side of the echo workload: numbered messages, round trips on its own clock.

    An echo message only carries its sequence number (4 bytes), so it can be
    as small as KCP's test's 8 bytes; the send times stay with the client.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.sent: dict[int, int] = {}
        self.rtts: list[tuple[int, int]] = []  # (send ns, echo received ns)

    def make(self, seq: int, now: int | None = None) -> bytes:
        self.sent[seq] = _now() if now is None else now
        return ECHO.pack(seq) + bytes(max(0, self.size - ECHO.size))

    def returned(self, data: bytes, now: int | None = None) -> None:
        (seq,) = ECHO.unpack_from(data)
        if seq in self.sent:
            self.rtts.append((self.sent.pop(seq), _now() if now is None else now))


def bulk_payload(size: int) -> bytes:
    """The bytes a bulk transfer sends (seeded, so the server can check them)."""
    return random.Random(size).randbytes(size)


class _Messages:
    """Server-side record of the messages workload (latency per message)."""

    def __init__(self) -> None:
        self.samples: list[tuple[int, int]] = []  # (send ns, receive ns)
        self.bytes = 0

    def add(self, data: bytes, received: int) -> int:
        seq, sent = MESSAGE.unpack_from(data)
        self.samples.append((sent, received))
        self.bytes += len(data)
        return seq

    def result(self) -> dict[str, Any]:
        return {"samples": self.samples, "bytes": self.bytes}


# ---------------------------------------------------------------------------- TCP

_TCP_INFO_LEN = 232


def _tcp_info(sock: socket.socket) -> dict[str, int]:
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    unacked, total_retrans = (
        struct.unpack_from("I", raw, 24)[0],
        struct.unpack_from("I", raw, 100)[0],
    )
    out = {"unacked": unacked, "retransmits": total_retrans}
    if len(raw) >= 160:
        out["data_segments_out"] = struct.unpack_from("I", raw, 156)[0]
    return out


def _tcp_congestion(sock: socket.socket) -> str:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).split(b"\0")[0].decode()


def _tcp_setup(sock: socket.socket, congestion: str | None) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if congestion:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion.encode())


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return bytes(buf)


def _wait_acked(sock: socket.socket, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _tcp_info(sock)["unacked"] and time.monotonic() < deadline:
        time.sleep(0.005)


def tcp_server(args: argparse.Namespace, ready: Callable[[int], None]) -> dict[str, Any]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if args.tcp_congestion:
        _tcp_setup(listener, args.tcp_congestion)
    listener.bind(args.bind)
    listener.listen(1)
    ready(listener.getsockname()[1])
    conn, _ = listener.accept()
    _tcp_setup(conn, args.tcp_congestion)
    out: dict[str, Any] = {"congestion": _tcp_congestion(conn)}
    if args.workload == "messages":
        record = _Messages()
        for _ in range(args.count):
            data = _read_exactly(conn, args.size)
            record.add(data, _now())
        out.update(record.result())
    elif args.workload == "echo":
        for _ in range(args.count):
            conn.sendall(_read_exactly(conn, args.size))
        _wait_acked(conn, 30)
        out.update(_tcp_info(conn))
    else:
        start, length = BULK.unpack(_read_exactly(conn, BULK.size))
        digest, got = hashlib.sha256(), 0
        while got < length:
            chunk = conn.recv(min(_CHUNK * 4, length - got))
            if not chunk:
                break
            digest.update(chunk)
            got += len(chunk)
        out.update(start=start, end=_now(), bytes=got, sha256=digest.hexdigest())
    conn.close()
    return out


def tcp_client(args: argparse.Namespace) -> dict[str, Any]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    _tcp_setup(sock, args.tcp_congestion)
    sock.settimeout(args.timeout)
    started = _now()
    sock.connect(args.connect)
    out: dict[str, Any] = {"congestion": _tcp_congestion(sock)}
    if args.workload == "bulk":
        payload = bulk_payload(args.size)
        sock.sendall(BULK.pack(started, len(payload)))
        sock.sendall(payload)
    else:
        echoes = Echoes(args.size)
        base = time.monotonic()
        for seq in range(args.count):
            _sleep_until(base + seq * args.interval)
            if args.workload == "echo":
                sock.sendall(echoes.make(seq))
                echoes.returned(_read_exactly(sock, args.size))
            else:
                sock.sendall(message(seq, args.size))
        if args.workload == "echo":
            out["rtts"] = echoes.rtts
    _wait_acked(sock, args.timeout)
    out.update(_tcp_info(sock))
    sock.close()
    return out


def _sleep_until(deadline: float) -> None:
    wait = deadline - time.monotonic()
    if wait > 0:
        time.sleep(wait)


# ---------------------------------------------------------------------------- KCP


class KcpPeer:
    """One end of the reference C KCP (PyPI ``kcp``) over a UDP socket, single-threaded.

    Driven the way KCP's own test drives it: ``ikcp_update`` every
    millisecond (it flushes on its ``interval``), ``ikcp_input`` for every
    datagram. Counts data segments sent and how many were retransmissions.
    """

    def __init__(self, sock: socket.socket, peer: Any, args: argparse.Namespace) -> None:
        from kcp import KCP

        self.sock = sock
        self.peer = peer
        self.kcp = KCP(
            KCP_CONV,
            max_transmission=args.kcp_mtu,
            no_delay=True,
            update_interval=args.kcp_interval,
            resend_count=2,
            no_congestion_control=True,
            send_window_size=args.kcp_window,
            receive_window_size=args.kcp_window,
        )
        self.kcp.include_outbound_handler(self._output)
        self.flush_mode = args.kcp_flush
        self.pushes = 0
        self.sequence_numbers: set[int] = set()
        self.start = time.monotonic_ns()

    def _output(self, _kcp: Any, data: bytes) -> None:
        offset = 0
        while offset + 24 <= len(data):
            _conv, cmd, _frg, _wnd, _ts, sn, _una, length = struct.unpack_from(
                "<IBBHIIII", data, offset
            )
            if cmd == _KCP_PUSH:
                self.pushes += 1
                self.sequence_numbers.add(sn)
            offset += 24 + length
        if self.peer is not None:
            with contextlib.suppress(OSError):
                self.sock.sendto(data, self.peer)

    @property
    def retransmits(self) -> int:
        return self.pushes - len(self.sequence_numbers)

    def clock(self) -> int:
        return ((time.monotonic_ns() - self.start) // 1_000_000) & 0xFFFFFFFF

    def pump(self, timeout: float) -> list[bytes]:
        """Wait up to ``timeout`` for datagrams, feed them in, update; returns received messages."""
        ready, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if ready:
            while True:
                try:
                    data, addr = self.sock.recvfrom(65536)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    continue
                if self.peer is None:
                    self.peer = addr
                try:
                    self.kcp.receive(data)
                except Exception:  # a malformed or foreign datagram: KCP drops it
                    continue
            if self.flush_mode == "all":
                self.kcp.update(self.clock())
                self.kcp.flush()
        self.kcp.update(self.clock())
        return [bytes(m) for m in self.kcp.get_all_received()]

    def send(self, data: bytes) -> None:
        for i in range(0, len(data), _CHUNK):
            self.kcp.enqueue(data[i : i + _CHUNK])
        if self.flush_mode in ("send", "all"):
            self.kcp.update(self.clock())
            self.kcp.flush()

    def backlog(self) -> int:
        return self.kcp.get_outbound_packets()

    def stats(self) -> dict[str, int]:
        return {"retransmits": self.retransmits, "data_segments_out": self.pushes}


def _kcp_socket(bind: Any) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.bind(bind)
    sock.setblocking(False)
    return sock


_TICK = 0.001


def kcp_server(args: argparse.Namespace, ready: Callable[[int], None]) -> dict[str, Any]:
    sock = _kcp_socket(args.bind)
    ready(sock.getsockname()[1])
    peer = KcpPeer(sock, None, args)
    out: dict[str, Any] = {}
    deadline = time.monotonic() + args.timeout
    if args.workload == "messages":
        record = _Messages()
        while len(record.samples) < args.count and time.monotonic() < deadline:
            for m in peer.pump(_TICK):
                record.add(m, _now())
        out.update(record.result())
        _kcp_linger(peer, 1.0)  # let the last ACKs go out
    elif args.workload == "echo":
        echoed = 0
        while echoed < args.count and time.monotonic() < deadline:
            for m in peer.pump(_TICK):
                peer.send(m)
                echoed += 1
        _kcp_drain(peer, deadline)
    else:
        buf = bytearray()
        digest, got, length, start = hashlib.sha256(), 0, None, 0
        while (length is None or got < length) and time.monotonic() < deadline:
            for m in peer.pump(_TICK):
                if length is None:
                    buf += m
                    if len(buf) < BULK.size:
                        continue
                    start, length = BULK.unpack_from(buf)
                    m = bytes(buf[BULK.size :])
                digest.update(m)
                got += len(m)
        out.update(start=start, end=_now(), bytes=got, sha256=digest.hexdigest())
        _kcp_linger(peer, 1.0)
    out.update(peer.stats())
    return out


def _kcp_drain(peer: KcpPeer, deadline: float) -> None:
    """Keep KCP running until everything sent is acknowledged."""
    while peer.backlog() and time.monotonic() < deadline:
        peer.pump(_TICK)


def _kcp_linger(peer: KcpPeer, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        peer.pump(_TICK)


def kcp_client(args: argparse.Namespace) -> dict[str, Any]:
    sock = _kcp_socket(("0.0.0.0", 0))
    peer = KcpPeer(sock, args.connect, args)
    deadline = time.monotonic() + args.timeout
    out: dict[str, Any] = {}
    if args.workload == "bulk":
        payload = BULK.pack(_now(), args.size) + bulk_payload(args.size)
        sent = 0
        window = args.kcp_window * 2
        while sent < len(payload) and time.monotonic() < deadline:
            while peer.backlog() < window and sent < len(payload):
                piece = payload[sent : sent + _CHUNK]
                peer.send(piece)
                sent += len(piece)
            peer.pump(_TICK)
    else:
        echoes = Echoes(args.size)
        echo = args.workload == "echo"
        base = time.monotonic()
        seq = 0
        while (seq < args.count or (echo and len(echoes.rtts) < args.count)) and (
            time.monotonic() < deadline
        ):
            due = base + seq * args.interval
            if seq < args.count and time.monotonic() >= due:
                peer.send(echoes.make(seq) if echo else message(seq, args.size))
                seq += 1
                continue
            wait = min(_TICK, due - time.monotonic()) if seq < args.count else _TICK
            for m in peer.pump(wait):
                echoes.returned(m)
        if echo:
            out["rtts"] = echoes.rtts
    _kcp_drain(peer, deadline)
    out.update(peer.stats())
    return out


# ---------------------------------------------------------------------------- rudp


def rudp_api() -> tuple[Any, Any]:
    """``rudp.open_connection`` and ``rudp.start_server``, or ImportError/AttributeError."""
    import rudp

    return rudp.open_connection, rudp.start_server  # type: ignore[attr-defined]


def _configuration(text: str | None) -> Any:
    from rudp.config import Configuration

    if not text:
        return Configuration()
    values = tomllib.loads(text)
    if isinstance(values.get("fec"), list):
        values["fec"] = tuple(values["fec"])
    return Configuration(**values)


def _rudp_stats(writer: Any) -> dict[str, Any]:
    stats = writer.get_extra_info("stats") or {}
    out: dict[str, Any] = {"stats": stats}
    for key in ("retrans_segs", "retransmits", "retransmissions"):
        if key in stats:
            out["retransmits"] = stats[key]
            break
    return out


def rudp_server(args: argparse.Namespace, ready: Callable[[int], None]) -> dict[str, Any]:
    _, start_server = rudp_api()
    config = _configuration(args.config_toml)

    async def main() -> dict[str, Any]:
        done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

        async def handle(reader: Any, writer: Any) -> None:
            out: dict[str, Any] = {}
            try:
                if args.workload == "messages":
                    record = _Messages()
                    for _ in range(args.count):
                        record.add(await reader.readexactly(args.size), _now())
                    out.update(record.result())
                elif args.workload == "echo":
                    for _ in range(args.count):
                        writer.write(await reader.readexactly(args.size))
                        await writer.drain()
                else:
                    start, length = BULK.unpack(await reader.readexactly(BULK.size))
                    digest, got = hashlib.sha256(), 0
                    while got < length:
                        chunk = await reader.read(min(_CHUNK * 4, length - got))
                        if not chunk:
                            break
                        digest.update(chunk)
                        got += len(chunk)
                    out.update(start=start, end=_now(), bytes=got, sha256=digest.hexdigest())
                out.update(_rudp_stats(writer))
                writer.close()
                await writer.wait_closed()
            except Exception as exc:  # reported, not raised: the harness shows it
                out["error"] = repr(exc)
            if not done.done():
                done.set_result(out)

        server = await start_server(handle, args.bind[0], args.bind[1], configuration=config)
        ready(server.sockets[0].getsockname()[1])
        try:
            return await asyncio.wait_for(done, args.timeout)
        finally:
            server.close()

    return asyncio.run(main())


def rudp_client(args: argparse.Namespace) -> dict[str, Any]:
    open_connection, _ = rudp_api()
    config = _configuration(args.config_toml)

    async def main() -> dict[str, Any]:
        started = _now()
        reader, writer = await open_connection(*args.connect, configuration=config)
        out: dict[str, Any] = {}
        if args.workload == "bulk":
            writer.write(BULK.pack(started, args.size))
            payload = bulk_payload(args.size)
            for i in range(0, len(payload), _CHUNK):
                writer.write(payload[i : i + _CHUNK])
                await writer.drain()
        else:
            echoes = Echoes(args.size)
            echo = args.workload == "echo"

            async def read_echoes() -> None:
                for _ in range(args.count):
                    echoes.returned(await reader.readexactly(args.size))

            reading = asyncio.ensure_future(read_echoes()) if echo else None
            loop = asyncio.get_running_loop()
            base = loop.time()
            for seq in range(args.count):
                wait = base + seq * args.interval - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(echoes.make(seq) if echo else message(seq, args.size))
                await writer.drain()
            if reading is not None:
                await reading
                out["rtts"] = echoes.rtts
        await writer.drain()
        out.update(_rudp_stats(writer))
        writer.close()
        await writer.wait_closed()
        return out

    return asyncio.run(asyncio.wait_for(main(), args.timeout))


# ---------------------------------------------------------------------------- CLI

SERVERS = {"tcp": tcp_server, "kcp": kcp_server, "rudp": rudp_server}
CLIENTS = {"tcp": tcp_client, "kcp": kcp_client, "rudp": rudp_client}


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return (host, int(port))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m netem.workloads", description=__doc__)
    parser.add_argument("role", choices=("server", "client"))
    parser.add_argument("--protocol", choices=PROTOCOLS, required=True)
    parser.add_argument("--workload", choices=WORKLOADS, default="messages")
    parser.add_argument("--bind", type=_address, default=("0.0.0.0", 0))
    parser.add_argument("--connect", type=_address)
    parser.add_argument("--count", type=int, default=500, help="messages (messages/echo)")
    parser.add_argument("--size", type=lambda v: units.parse_size(v, "size"), default=16)
    parser.add_argument(
        "--interval", type=lambda v: units.parse_duration(v, "interval"), default=0.02
    )
    parser.add_argument("--timeout", type=lambda v: units.parse_duration(v, "timeout"), default=120)
    parser.add_argument("--tcp-congestion", default=None)
    parser.add_argument("--kcp-interval", type=int, default=10, help="ms (fast3: 10)")
    parser.add_argument("--kcp-window", type=int, default=128)
    parser.add_argument("--kcp-mtu", type=int, default=1400)
    parser.add_argument(
        "--kcp-flush",
        choices=("tick", "send", "all"),
        default="tick",
        help="when KCP sends: only on its update tick (the reference loop), also right "
        "after each send (as kcp-go does), or also after each input (immediate ACKs)",
    )
    parser.add_argument("--config-toml", default=None, help="rudp Configuration as TOML text")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.role == "server":

            def ready(port: int) -> None:
                print(json.dumps({"ready": True, "port": port}), flush=True)

            result = SERVERS[args.protocol](args, ready)
        else:
            if args.connect is None:
                raise ValueError("client needs --connect HOST:PORT")
            result = CLIENTS[args.protocol](args)
    except Exception as exc:
        print(json.dumps({"error": f"{args.protocol} {args.role}: {exc!r}"}), flush=True)
        return 1
    result["pid"] = os.getpid()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
