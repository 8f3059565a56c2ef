"""Where an echo round trip's time goes: the floors below rudp's echo, measured in one run.

* cross-process, 64-byte datagrams: a blocking socket server/client (what ``rudp
  bench`` calls raw UDP) against a bare uvloop ``DatagramProtocol`` on either
  side, with no protocol at all: the cost of the event loop alone;
* in one process (no wake-ups, warm caches): the bare uvloop echo against a rudp
  stream echo through the asyncio API: the CPU rudp adds per round trip, both
  ends together.

Each line gives p50 and p99 in microseconds and the p50 ratio to its reference.

    python tools/bench_echo_floor.py [--count 5000] [--repeat 3]    (needs uvloop: the fast extra)
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

import uvloop

import rudp

MESSAGE = 64
LOCALHOST = "127.0.0.1"


def _blocking_server(ready: Any) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOCALHOST, 0))
    ready.put(sock.getsockname())
    while True:
        data, addr = sock.recvfrom(65536)
        sock.sendto(data, addr)


def _uvloop_server(ready: Any) -> None:
    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: Any) -> None:
            self.transport.sendto(data, addr)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=(LOCALHOST, 0))
        ready.put(transport.get_extra_info("sockname"))
        await loop.create_future()

    uvloop.run(main())


def _blocking_client(addr: Any, count: int) -> list[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(addr)
    message, rtts = os.urandom(MESSAGE), []
    for _ in range(count):
        t0 = time.perf_counter_ns()
        sock.send(message)
        sock.recv(65536)
        rtts.append(time.perf_counter_ns() - t0)
    return rtts


async def _uvloop_round_trips(addr: Any, count: int) -> list[int]:
    loop = asyncio.get_running_loop()
    waiter: list[asyncio.Future[bytes]] = []

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, _: Any) -> None:
            waiter[0].set_result(data)

    transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=addr)
    message, rtts = os.urandom(MESSAGE), []
    for _ in range(count):
        t0 = time.perf_counter_ns()
        waiter[:] = [loop.create_future()]
        transport.sendto(message)
        await waiter[0]
        rtts.append(time.perf_counter_ns() - t0)
    transport.close()
    return rtts


def _cross_process(server: Callable[[Any], None], client: str, count: int) -> list[int]:
    ready: Any = mp.Queue()
    proc = mp.Process(target=server, args=(ready,), daemon=True)
    proc.start()
    try:
        addr = ready.get(timeout=10)
        if client == "blocking":
            return _blocking_client(addr, count)
        return uvloop.run(_uvloop_round_trips(addr, count))
    finally:
        proc.kill()
        proc.join()


async def _in_process_bare(count: int) -> list[int]:
    loop = asyncio.get_running_loop()

    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: Any) -> None:
            self.transport.sendto(data, addr)

    server, _ = await loop.create_datagram_endpoint(Echo, local_addr=(LOCALHOST, 0))
    try:
        return await _uvloop_round_trips(server.get_extra_info("sockname"), count)
    finally:
        server.close()


async def _in_process_rudp(count: int) -> list[int]:
    async def echo(reader: Any, writer: Any) -> None:
        try:
            while True:
                writer.write(await reader.readexactly(MESSAGE))
                await writer.drain()
        except asyncio.IncompleteReadError:
            writer.close()

    server = await rudp.start_server(echo, LOCALHOST, 0)
    async with server:
        reader, writer = await rudp.open_connection(*server.addresses()[0][:2])
        message, rtts = os.urandom(MESSAGE), []
        for _ in range(count):
            t0 = time.perf_counter_ns()
            writer.write(message)
            await reader.readexactly(MESSAGE)
            rtts.append(time.perf_counter_ns() - t0)
        writer.close()
    return rtts


def _p(rtts: list[int], q: int) -> float:
    return statistics.quantiles(rtts, n=100)[q - 1] / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=5000, help="round trips per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="runs, interleaved; median shown")
    args = parser.parse_args()
    measurements: dict[str, Callable[[], list[int]]] = {
        "cross-process  blocking server, blocking client": lambda: _cross_process(
            _blocking_server, "blocking", args.count
        ),
        "cross-process  uvloop server,   uvloop client": lambda: _cross_process(
            _uvloop_server, "uvloop", args.count
        ),
        "in-process     bare uvloop datagram echo": lambda: uvloop.run(
            _in_process_bare(args.count)
        ),
        "in-process     rudp stream echo (asyncio API)": lambda: uvloop.run(
            _in_process_rudp(args.count)
        ),
    }
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in measurements}
    for _ in range(args.repeat):
        for name, measure in measurements.items():
            rtts = measure()[args.count // 10 :]  # the first tenth warms up
            runs[name].append((_p(rtts, 50), _p(rtts, 99)))
    names = list(measurements)
    p50 = {name: statistics.median(r[0] for r in runs[name]) for name in names}
    p99 = {name: statistics.median(r[1] for r in runs[name]) for name in names}
    reference = {names[0]: names[0], names[1]: names[0], names[2]: names[2], names[3]: names[2]}
    print(f"echo of {MESSAGE} B, {args.count} round trips, median of {args.repeat} runs")
    for name in names:
        ratio = p50[name] / p50[reference[name]]
        print(f"{name:<48}  p50 {p50[name]:7.1f} us  p99 {p99[name]:7.1f} us  x{ratio:.2f}")
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
