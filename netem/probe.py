"""Timestamped UDP probes: measure what a link does to packets (loss, delay, order, copies).

The sender stamps each probe with its sequence number and CLOCK_REALTIME
just before ``sendto``; the receiver takes the kernel's arrival timestamp
(``SO_TIMESTAMPNS``, same clock), so one-way delays exclude the receiver's
scheduling delay. Both ends may live in different processes or network
namespaces: the clock is system-wide.

    python -m netem.probe receive --bind 10.201.0.2:7000 --count 2000 --idle 2
    python -m netem.probe send --to 10.201.0.2:7000 --count 2000 --interval 1ms --size 64

``receive`` prints one JSON object: ``{"arrivals": [[seq, sent_ns, recv_ns], ...]}``
in arrival order. :func:`summarize` turns that into the link's figures.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import struct
import subprocess
import sys
import time
from typing import Any

from rudp import units

__all__ = ["probe_link", "receive", "send", "summarize"]

_HEADER = struct.Struct("!IQ")  # sequence, send time (ns, CLOCK_REALTIME)
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return (host, int(port))


def send(to: tuple[str, int], count: int, interval: float, size: int) -> None:
    """Send ``count`` probes of ``size`` bytes, one every ``interval`` seconds (paced, not bursty)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    padding = bytes(max(0, size - _HEADER.size))
    start = time.monotonic()
    for seq in range(count):
        wait = start + seq * interval - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        sock.sendto(_HEADER.pack(seq, time.clock_gettime_ns(time.CLOCK_REALTIME)) + padding, to)
    sock.close()


def receive(bind: tuple[str, int], count: int, idle: float, ready: Any = None) -> list[list[int]]:
    """Collect probes until ``count`` distinct ones arrived or none came for ``idle`` seconds."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    sock.bind(bind)
    if ready is not None:
        ready()
    sock.settimeout(idle)
    arrivals: list[list[int]] = []
    seen: set[int] = set()
    while len(seen) < count:
        try:
            data, ancillary, _, _ = sock.recvmsg(65536, 64)
        except TimeoutError:
            break
        recv_ns = time.clock_gettime_ns(time.CLOCK_REALTIME)
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
                sec, nsec = struct.unpack("qq", payload[:16])
                recv_ns = sec * 1_000_000_000 + nsec
        if len(data) >= _HEADER.size:
            seq, sent_ns = _HEADER.unpack_from(data)
            arrivals.append([seq, sent_ns, recv_ns])
            seen.add(seq)
    sock.close()
    return arrivals


def summarize(arrivals: list[list[int]], sent: int) -> dict[str, float]:
    """Loss, duplication, reordering and one-way delay statistics (delays in seconds)."""
    seqs = [a[0] for a in arrivals]
    unique = set(seqs)
    delays = sorted((recv - sent_ns) / 1e9 for _, sent_ns, recv in arrivals)
    highest = -1
    late = 0  # arrivals behind a higher sequence number already seen
    for s in seqs:
        if s < highest:
            late += 1
        highest = max(highest, s)
    out: dict[str, float] = {
        "sent": sent,
        "received": len(arrivals),
        "loss": 1 - len(unique) / sent if sent else 0.0,
        "duplicates": (len(seqs) - len(unique)) / sent if sent else 0.0,
        "reordered": late / len(seqs) if seqs else 0.0,
    }
    if delays:
        q = (
            statistics.quantiles(delays, n=100, method="inclusive")
            if len(delays) > 1
            else delays * 99
        )
        out.update(
            delay_mean=statistics.fmean(delays),
            delay_sd=statistics.pstdev(delays),
            delay_min=delays[0],
            delay_p50=q[49],
            delay_p99=q[98],
            delay_max=delays[-1],
        )
    return out


def probe_link(
    link: Any, count: int, interval: float, size: int = 64, idle: float = 1.0, port: int = 7000
) -> list[list[int]]:
    """Send ``count`` probes client → server across a :class:`netem.netns.NamespaceLink`.

    Returns the receiver's arrivals (``[seq, sent_ns, recv_ns]`` in arrival order).
    """
    server = link.addresses["server"]
    receiver = link.popen(
        "server",
        [
            sys.executable,
            "-m",
            "netem.probe",
            "receive",
            "--bind",
            f"{server}:{port}",
            "--count",
            str(count),
            "--idle",
            f"{idle}s",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        if not receiver.stdout or not receiver.stdout.readline():
            raise RuntimeError("probe receiver failed to start")
        sender = link.popen(
            "client",
            [
                sys.executable,
                "-m",
                "netem.probe",
                "send",
                "--to",
                f"{server}:{port}",
                "--count",
                str(count),
                "--interval",
                f"{interval}s",
                "--size",
                str(size),
            ],
        )
        if sender.wait() != 0:
            raise RuntimeError("probe sender failed")
        out, _ = receiver.communicate(timeout=count * interval + idle + 60)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    return json.loads(out)["arrivals"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m netem.probe", description=__doc__)
    sub = parser.add_subparsers(dest="role", required=True)
    s = sub.add_parser("send")
    s.add_argument("--to", type=_address, required=True)
    s.add_argument("--count", type=int, default=1000)
    s.add_argument("--interval", type=lambda v: units.parse_duration(v, "interval"), default=0.001)
    s.add_argument("--size", type=int, default=64)
    r = sub.add_parser("receive")
    r.add_argument("--bind", type=_address, required=True)
    r.add_argument("--count", type=int, default=1000)
    r.add_argument("--idle", type=lambda v: units.parse_duration(v, "idle"), default=2.0)
    args = parser.parse_args(argv)
    if args.role == "send":
        send(args.to, args.count, args.interval, args.size)
        return 0

    def ready() -> None:
        print(json.dumps({"ready": True}), flush=True)

    arrivals = receive(args.bind, args.count, args.idle, ready)
    print(json.dumps({"arrivals": arrivals}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
