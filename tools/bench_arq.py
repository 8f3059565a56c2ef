"""ARQ engine throughput, engine only: a bulk transfer between two endpoints in memory.

No sockets and no loss: every round the sender flushes, its datagrams go
straight into the receiver, the receiver's ACKs straight back, the receiver's
application reads. The same loop drives rudp's pure-Python engine, its Cython
engine and the reference C KCP (PyPI ``kcp``, ikcp.c behind Cython bindings),
so the ratios compare engines, not harnesses. The engines take turns,
``--repeat`` rounds of one run each, so they sample the same moments of a
shared machine; each engine's best run counts.

    python tools/bench_arq.py                 # 128 MiB (Python: 1/16 of it)
    python tools/bench_arq.py --mb 256 --repeat 5 --message
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

CHUNK = 64 * 1024  # application write size (C KCP: one message of <= 127 fragments)
SEND_BUFFER = 1 << 20  # the writer keeps at most this much pending


def run_arq(cls: type, total: int, args: argparse.Namespace) -> float:
    """Seconds to move ``total`` bytes with an ``Arq`` class."""
    kw = dict(
        mtu=args.mtu, snd_wnd=args.window, rcv_wnd=args.window, nodelay=1, interval=10,
        resend=2, congestion="none", stream=not args.message,
    )  # fmt: skip
    a, b = cls(1, **kw), cls(1, **kw)
    data = bytes(range(256)) * (CHUNK // 256)
    sent = received = now = 0
    start = time.perf_counter()
    while received < total:
        while sent < total and a.pending_bytes < SEND_BUFFER:
            a.send(data)
            sent += CHUNK
        a.flush(now)
        for d in a.datagrams():
            b.input(d, now)
        b.flush(now)
        for d in b.datagrams():
            a.input(d, now)
        if args.message:
            while (m := b.recv_message()) is not None:
                received += len(m)
        else:
            while chunk := b.recv(CHUNK):  # read as C KCP delivers: 64 KiB at a time
                received += len(chunk)
        now += 1
    return time.perf_counter() - start


def run_ckcp(total: int, args: argparse.Namespace) -> float:
    """The same transfer with the reference C KCP (always message mode)."""
    from kcp import KCP

    def make(queue: list[bytes]) -> KCP:
        k = KCP(1, max_transmission=args.mtu, no_delay=True, update_interval=10,
                resend_count=2, no_congestion_control=True,
                send_window_size=args.window, receive_window_size=args.window)  # fmt: skip
        k.include_outbound_handler(lambda _, data: queue.append(data))
        return k

    qa: list[bytes] = []
    qb: list[bytes] = []
    a, b = make(qa), make(qb)
    mss = args.mtu - 24
    chunk = bytes(range(256)) * (CHUNK // 256)
    sent = received = now = 0
    a.update(0)
    b.update(0)
    start = time.perf_counter()
    while received < total:
        while sent < total and a.get_outbound_packets() * mss < SEND_BUFFER:
            a.enqueue(chunk)
            sent += CHUNK
        a.update(now)
        a.flush()
        for d in qa:
            b.receive(d)
        qa.clear()
        b.update(now)
        b.flush()
        for d in qb:
            a.receive(d)
        qb.clear()
        for m in b.get_all_received():
            received += len(m)
        now += 1
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=128, help="MiB moved per run (default 128)")
    parser.add_argument("--python-share", type=int, default=16,
                        help="the Python engine moves 1/N of it (default 16)")  # fmt: skip
    parser.add_argument("--mtu", type=int, default=1400)
    parser.add_argument("--window", type=int, default=1024, help="snd_wnd = rcv_wnd, segments")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--message", action="store_true", help="message mode (default stream)")
    args = parser.parse_args(argv)

    total = args.mb << 20
    mss = args.mtu - 24
    engines: dict[str, Callable[[], float]] = {}
    from rudp.arq import Arq as PyArq

    py_total = max(CHUNK, total // args.python_share // CHUNK * CHUNK)
    engines["python"] = lambda: run_arq(PyArq, py_total, args)
    try:
        from rudp._arq import Arq as CyArq

        engines["cython"] = lambda: run_arq(CyArq, total, args)
    except ImportError:
        print("cython engine not built (python setup.py build_ext --inplace)", file=sys.stderr)
    try:
        import kcp  # noqa: F401

        engines["c-kcp"] = lambda: run_ckcp(total, args)
    except ImportError:
        print("PyPI kcp not installed: no C KCP reference", file=sys.stderr)

    load = os.getloadavg()
    print(f"# ARQ engine throughput, in memory, no loss: mtu {args.mtu} (mss {mss}), "
          f"window {args.window}, {'message' if args.message else 'stream'} mode, "
          f"best of {args.repeat}")  # fmt: skip
    print(f"# load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs"
          f"{'  (measured under load)' if load[0] > 0.5 else ''}")  # fmt: skip
    best = dict.fromkeys(engines, float("inf"))
    for _ in range(args.repeat):
        for name, fn in engines.items():
            best[name] = min(best[name], fn())
    rates: dict[str, float] = {}
    print(f"{'engine':8s} {'MiB':>6s} {'seconds':>8s} {'MB/s':>9s} {'segments/s':>11s}")
    for name, seconds in best.items():
        moved = py_total if name == "python" else total
        rates[name] = moved / seconds
        print(f"{name:8s} {moved >> 20:6d} {seconds:8.3f} {moved / seconds / 1e6:9.1f} "
              f"{moved / mss / seconds:11,.0f}")  # fmt: skip
    if "cython" in rates:
        print(f"cython / python: {rates['cython'] / rates['python']:.1f}x")
        if "c-kcp" in rates:
            print(f"cython / c-kcp:  {rates['cython'] / rates['c-kcp']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
