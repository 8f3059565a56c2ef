"""rudp transfers across the VM's real-netem link, many per process (runs in the guest).

Every interpreter start in the guest costs seconds, so one run serves a whole
list of scenarios: a rudp server starts once in namespace B; this process
moves into namespace A and, for each scenario, replaces the qdiscs, opens a
connection and either

* ``bulk``: sends ``size`` seeded-random bytes; the server answers with the
  sha256 and length of what it received, or
* ``messages``: sends ``count`` messages ``interval`` apart, each carrying its
  send time (CLOCK_MONOTONIC, one clock for both namespaces); the server
  answers with each message's one-way latency.

    python -m netem.vm_transfer run PLAN.json --out RESULT.json

PLAN is ``{name: {"forward": [tc...], "reverse": [tc...], "workload": "bulk",
"size": N}}`` or ``{..., "workload": "messages", "count": N, "interval": s,
"size": N}``; RESULT has, per scenario, the server's answer, the client's
expectation, the rudp connection statistics and the qdisc counters.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import struct
import subprocess
import sys
import time
from typing import Any

import rudp
from netem.vm_probe import ADDR_B, NS_A, NS_B, Netns, make_link, qdisc_stats

__all__ = ["main", "payload"]

PORT = 47100
_HEAD = struct.Struct("!cQII")  # kind, bulk length, message count, message size
_MESSAGE = struct.Struct("!IQ")  # seq, send time (ns)
_DIGEST = struct.Struct("!32sQ")


def payload(size: int, seed: int = 7) -> bytes:
    """Deterministic incompressible bytes: a transfer's content and its expected digest."""
    return random.Random(seed).randbytes(size)


async def _serve(reader: Any, writer: Any) -> None:
    kind, length, count, size = _HEAD.unpack(await reader.readexactly(_HEAD.size))
    if kind == b"B":
        digest, got = hashlib.sha256(), 0
        while got < length:
            chunk = await reader.read(min(1 << 18, length - got))
            if not chunk:
                break
            digest.update(chunk)
            got += len(chunk)
        writer.write(_DIGEST.pack(digest.digest(), got))
    else:
        latencies = []
        for _ in range(count):
            seq, sent = _MESSAGE.unpack_from(await reader.readexactly(size))
            latencies.append([seq, time.monotonic_ns() - sent])
        body = json.dumps(latencies).encode()
        writer.write(struct.pack("!I", len(body)) + body)
    await writer.drain()
    writer.close()
    await writer.wait_closed()


def serve(bind: str, port: int) -> None:
    async def main() -> None:
        server = await rudp.start_server(_serve, bind, port)
        print(json.dumps({"ready": True}), flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


async def _client(spec: dict) -> dict:
    reader, writer = await rudp.open_connection(ADDR_B, PORT)
    started = time.monotonic()
    out: dict[str, Any] = {}
    if spec["workload"] == "bulk":
        data = payload(spec["size"])
        writer.write(_HEAD.pack(b"B", len(data), 0, 0))
        for i in range(0, len(data), 1 << 16):
            writer.write(data[i : i + (1 << 16)])
            await writer.drain()
        digest, got = _DIGEST.unpack(await reader.readexactly(_DIGEST.size))
        out.update(sha256=digest.hex(), bytes=got, expected_sha256=hashlib.sha256(data).hexdigest())
    else:
        count, size, interval = spec["count"], spec["size"], spec["interval"]
        writer.write(_HEAD.pack(b"M", 0, count, size))
        loop = asyncio.get_running_loop()
        base = loop.time()
        for seq in range(count):
            wait = base + seq * interval - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(_MESSAGE.pack(seq, time.monotonic_ns()).ljust(size, b"\0"))
            await writer.drain()
        (length,) = struct.unpack("!I", await reader.readexactly(4))
        out["latencies"] = json.loads(await reader.readexactly(length))
    out["seconds"] = time.monotonic() - started
    out["stats"] = writer.get_extra_info("stats") or {}
    writer.close()
    await writer.wait_closed()
    return out


def run(plan: dict, timeout: float) -> dict:
    make_link()
    with Netns(NS_B):
        server = subprocess.Popen(
            [sys.executable, "-m", "netem.vm_transfer", "serve", "--bind", ADDR_B],
            stdout=subprocess.PIPE,
            text=True,
        )
    try:
        assert server.stdout is not None
        if not server.stdout.readline():
            raise RuntimeError("the rudp server in namespace B did not start")
        results = {}
        with Netns(NS_A):
            for name, spec in plan.items():
                make_link(spec.get("forward", ()), spec.get("reverse", ()))
                try:
                    result = asyncio.run(asyncio.wait_for(_client(spec), timeout))
                except Exception as exc:  # reported per scenario, the others still run
                    result = {"error": repr(exc)}
                result["qdisc"] = {
                    "forward": qdisc_stats(NS_A, "veth-a"),
                    "reverse": qdisc_stats(NS_B, "veth-b"),
                }
                results[name] = result
        return results
    finally:
        server.kill()
        server.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m netem.vm_transfer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the plan's scenarios")
    r.add_argument("plan")
    r.add_argument("--out", required=True)
    r.add_argument("--timeout", type=float, default=120.0, help="per scenario (guest seconds)")
    s = sub.add_parser("serve", help="the server half (started by run, in namespace B)")
    s.add_argument("--bind", required=True)
    s.add_argument("--port", type=int, default=PORT)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.bind, args.port)
        return 0
    with open(args.plan) as f:
        plan = json.load(f)
    result = run(plan, args.timeout)
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
