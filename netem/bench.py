"""Benchmark: can the namespace link carry a given packet rate without distorting the profile?

A paced UDP stream (batched sends through ``rudp.udp``, so the load generator
is cheap) crosses a :class:`netem.netns.NamespaceLink` client → server; the
sink counts what arrives and how late. Reported: offered and delivered
packets/s and Mbit/s (IP bytes), loss, the delay the link added beyond the
profile's (p50/p99/max, from send time to the sink's batch), and the
forwarder's CPU per packet and lateness (time between a packet's release
time and its write).

    python -m netem.bench --pps 20000 --size 1400 --duration 3
    python -m netem.bench --pps 20000 --size 625 --duration 3 --profile lossy

Numbers depend on the machine and its load: repeat runs and report them as
measured under that load.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import statistics
import struct
import subprocess
import sys
import time
from typing import Any

from netem.netns import NamespaceLink
from netem.profile import Profile, load_profile
from rudp import units

__all__ = ["main", "run"]

_HEADER = struct.Struct("!IQ")
_PORT = 7100


def _blast(host: str, pps: int, size: int, duration: float) -> float:
    """Send the paced stream; returns how long sending took (s)."""
    from rudp import udp

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.configure(sock)
    padding = bytes(max(0, size - _HEADER.size))
    total = int(pps * duration)
    start = time.monotonic()
    seq = 0
    pending: list[bytes] = []
    while seq < total or pending:
        due = min(total, int((time.monotonic() - start) * pps) + 1)
        now = time.monotonic_ns()
        while seq < due:
            pending.append(_HEADER.pack(seq, now) + padding)
            seq += 1
        if pending:
            sent = udp.send_batch(sock, pending, (host, _PORT))
            del pending[:sent]
            if pending:
                select.select([], [sock], [], 0.01)
                continue
        time.sleep(0.0005)
    return time.monotonic() - start


def _sink(host: str, expected: int, idle: float) -> dict[str, Any]:
    from rudp import udp

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, _PORT))
    udp.configure(sock, buffer_size=16 * 1024 * 1024)
    print(json.dumps({"ready": True}), flush=True)
    seen = 0
    received_bytes = 0
    first = last = None
    delays: list[int] = []
    while seen < expected:
        ready, _, _ = select.select([sock], [], [], idle)
        if not ready:
            break
        batch = udp.recv_batch(sock)
        now = time.monotonic_ns()
        first = first if first is not None else now
        last = now
        for data, _ in batch:
            _, sent = _HEADER.unpack_from(data)
            delays.append(now - sent)
            received_bytes += len(data)
        seen += len(batch)
    return {
        "received": seen,
        "received_bytes": received_bytes,
        "span_s": (last - first) / 1e9 if first is not None and last is not None else 0.0,
        "delays_ms": [d / 1e6 for d in delays[:: max(1, len(delays) // 20000)]],
    }


def run(profile: Profile, pps: int, size: int, duration: float, seed: int = 0) -> dict[str, Any]:
    """One measurement: a paced stream across a fresh namespace link."""
    total = int(pps * duration)
    with NamespaceLink(profile, seed=seed) as link:
        server = link.addresses["server"]
        sink = link.popen(
            "server",
            [sys.executable, "-m", "netem.bench", "_sink", server, str(total)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert sink.stdout is not None
        sink.stdout.readline()
        blast = link.popen(
            "client",
            [
                sys.executable,
                "-m",
                "netem.bench",
                "_blast",
                server,
                str(pps),
                str(size),
                str(duration),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        send_time = float(blast.communicate(timeout=duration + 60)[0])
        out, _ = sink.communicate(timeout=duration + 60)
    result = json.loads(out)
    stats = link.final_stats or {}
    delays = sorted(result["delays_ms"])
    base = profile.forward.delay * 1e3
    ip_bytes = size + 28
    span = result["span_s"] or 1e-9
    offered = stats.get("forward", {}).get("offered", 0) + stats.get("reverse", {}).get(
        "offered", 0
    )
    cpu = stats.get("cpu_user_seconds", 0.0) + stats.get("cpu_system_seconds", 0.0)
    report = {
        "backend": link.backend,
        "profile": profile.name,
        "size": size,
        "offered_pps": total / send_time,
        "offered_mbit": total * ip_bytes * 8 / send_time / 1e6,
        "delivered_pps": result["received"] / span,
        "delivered_mbit": result["received"] * ip_bytes * 8 / span / 1e6,
        "loss": 1 - result["received"] / total,
        "forwarder_lateness_ms_mean": stats.get("lateness_ms_mean"),
        "forwarder_lateness_ms_max": stats.get("lateness_ms_max"),
        "forwarder_cpu_us_per_packet": cpu / offered * 1e6 if offered else None,
    }
    if delays:
        q = statistics.quantiles(delays, n=100) if len(delays) > 1 else delays * 99
        report.update(
            added_ms_p50=q[49] - base, added_ms_p99=q[98] - base, added_ms_max=delays[-1] - base
        )
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_blast":
        print(_blast(argv[1], int(argv[2]), int(argv[3]), float(argv[4])), flush=True)
        return 0
    if argv and argv[0] == "_sink":
        print(json.dumps(_sink(argv[1], int(argv[2]), idle=2.0)), flush=True)
        return 0
    parser = argparse.ArgumentParser(prog="python -m netem.bench", description=__doc__)
    parser.add_argument("--profile", default="lan")
    parser.add_argument("--pps", type=int, default=20000)
    parser.add_argument("--size", type=int, default=1400, help="UDP payload bytes")
    parser.add_argument(
        "--duration", type=lambda v: units.parse_duration(v, "duration"), default=3.0
    )
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    profile = load_profile(args.profile)
    for i in range(args.repeat):
        report = run(profile, args.pps, args.size, args.duration, seed=i)
        if args.json:
            print(json.dumps(report))
            continue
        print(
            f"[{report['backend']}] {report['profile']}, {report['size']} B: "
            f"offered {report['offered_pps']:.0f} pkt/s {report['offered_mbit']:.1f} Mbit/s, "
            f"delivered {report['delivered_pps']:.0f} pkt/s {report['delivered_mbit']:.1f} Mbit/s, "
            f"loss {report['loss']:.2%}; added delay p50 {report.get('added_ms_p50', 0):.3f} "
            f"p99 {report.get('added_ms_p99', 0):.3f} max {report.get('added_ms_max', 0):.3f} ms; "
            f"forwarder {report['forwarder_cpu_us_per_packet'] or 0:.1f} us CPU/pkt, "
            f"lateness mean {report['forwarder_lateness_ms_mean'] or 0:.3f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
