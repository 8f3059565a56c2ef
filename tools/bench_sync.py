"""What the blocking API costs over the asyncio API it runs on, measured in one run.

* hop: one blocking call that does nothing on the loop, against the standard
  library's ``asyncio.run_coroutine_threadsafe(...).result()``;
* echo: small-message round trips over one rudp stream (client and server in
  this process), blocking threads against asyncio tasks;
* bulk: one stream's goodput, ``sendall``/``recv`` against ``write``/``drain``/``read``.

Each line reports the blocking figure, the reference's, and their ratio.
Runs alternate between the two so both see the same machine load.

    python tools/bench_sync.py [--hops 20000] [--echoes 2000] [--size 32M] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time

import rudp
from rudp import sync as rsync

CONFIG = rudp.Configuration()


def bench_hops(n: int) -> tuple[float, float]:
    """Seconds per call: rudp.sync's hop, and run_coroutine_threadsafe's."""
    portal = rsync._LoopThread.get()

    async def noop() -> None:
        return None

    t0 = time.perf_counter()
    for _ in range(n):
        portal.run(noop)
    ours = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(n):
        asyncio.run_coroutine_threadsafe(noop(), portal.loop).result()
    reference = (time.perf_counter() - t0) / n
    return ours, reference


def bench_sync_echo(n: int) -> float:
    server = rsync.serve("127.0.0.1", 0, configuration=CONFIG)

    def echo() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    thread = threading.Thread(target=echo)
    thread.start()
    with rsync.connect("127.0.0.1", server.address[1], configuration=CONFIG) as conn:
        message = bytes(64)
        t0 = time.perf_counter()
        for _ in range(n):
            conn.sendall(message)
            conn.recv(64, 0x100)  # MSG_WAITALL
        elapsed = time.perf_counter() - t0
    thread.join()
    server.close()
    return elapsed / n


async def _async_echo(n: int) -> float:
    async def echo(reader: rudp.StreamReader, writer: rudp.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await rudp.start_server(echo, "127.0.0.1", 0, configuration=CONFIG)
    reader, writer = await rudp.open_connection(
        "127.0.0.1", server.addresses()[0][1], configuration=CONFIG
    )
    message = bytes(64)
    t0 = time.perf_counter()
    for _ in range(n):
        writer.write(message)
        await writer.drain()
        await reader.readexactly(64)
    elapsed = time.perf_counter() - t0
    writer.close()
    await writer.wait_closed()
    server.close()
    return elapsed / n


def bench_sync_bulk(size: int) -> float:
    server = rsync.serve("127.0.0.1", 0, configuration=CONFIG)
    received = [0]

    def sink() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(1 << 20):
                received[0] += len(data)

    thread = threading.Thread(target=sink)
    thread.start()
    block = bytes(1 << 20)
    t0 = time.perf_counter()
    with rsync.connect("127.0.0.1", server.address[1], configuration=CONFIG) as conn:
        for _ in range(size >> 20):
            conn.sendall(block)
    thread.join()
    elapsed = time.perf_counter() - t0
    server.close()
    assert received[0] == size
    return size / elapsed


async def _async_bulk(size: int) -> float:
    done = asyncio.Event()
    received = [0]

    async def sink(reader: rudp.StreamReader, writer: rudp.StreamWriter) -> None:
        while data := await reader.read(1 << 20):
            received[0] += len(data)
        writer.close()
        done.set()

    server = await rudp.start_server(sink, "127.0.0.1", 0, configuration=CONFIG)
    block = bytes(1 << 20)
    t0 = time.perf_counter()
    session = await rudp.connect("127.0.0.1", server.addresses()[0][1], configuration=CONFIG)
    _, writer = await session.open_stream()
    for _ in range(size >> 20):
        writer.write(block)
        await writer.drain()
    await session.close()
    await done.wait()
    elapsed = time.perf_counter() - t0
    server.close()
    assert received[0] == size
    return size / elapsed


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    if text[-1:] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hops", type=int, default=20000)
    parser.add_argument("--echoes", type=int, default=2000)
    parser.add_argument("--size", type=_size, default=_size("32M"), help="bulk bytes (whole MiB)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows: dict[str, list[tuple[float, float]]] = {"hop": [], "echo": [], "bulk": []}
    for _ in range(args.repeat):
        rows["hop"].append(bench_hops(args.hops))
        rows["echo"].append((bench_sync_echo(args.echoes), asyncio.run(_async_echo(args.echoes))))
        rows["bulk"].append((bench_sync_bulk(args.size), asyncio.run(_async_bulk(args.size))))
    print(f"median of {args.repeat} runs (blocking API vs reference, same run)")
    hop = [statistics.median(x) for x in zip(*rows["hop"], strict=True)]
    print(
        f"  hop   {hop[0] * 1e6:8.1f} us/call   run_coroutine_threadsafe {hop[1] * 1e6:8.1f} us"
        f"   ratio {hop[0] / hop[1]:.2f}"
    )
    echo = [statistics.median(x) for x in zip(*rows["echo"], strict=True)]
    print(
        f"  echo  {echo[0] * 1e6:8.1f} us/round  asyncio                  {echo[1] * 1e6:8.1f} us"
        f"   ratio {echo[0] / echo[1]:.2f}"
    )
    bulk = [statistics.median(x) for x in zip(*rows["bulk"], strict=True)]
    print(
        f"  bulk  {bulk[0] / 1e6:8.1f} MB/s      asyncio                  {bulk[1] / 1e6:8.1f} MB/s"
        f"   ratio {bulk[0] / bulk[1]:.2f}"
    )


if __name__ == "__main__":
    main()
