"""Per-datagram cost of the batched UDP I/O layer, send and receive measured apart.

One process, one loopback socket pair, no concurrency: a send phase fills the
receiver's buffer (loopback delivers during the send call, so the send phase
includes the kernel's delivery), then a receive phase drains it. Each
implementation and offload setting is compared with the plain Python
``sendto``/``recvfrom`` loop measured in the same run. For cross-process
goodput use ``rudp bench --transports udp --tests bulk``.

    python tools/bench_udp.py [--count 2000] [--size 1400] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import socket
import time

from rudp import udp


def _pair(native: bool | None, gso: bool, gro: bool) -> tuple[socket.socket, socket.socket]:
    r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    r.bind(("127.0.0.1", 0))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if native is None:  # the plain loop: only the buffers are sized
        for sock in (r, s):
            udp.configure(sock, native=False, gso=False, gro=False, buffer_size=64 << 20)
    else:
        udp.configure(r, native=native, gro=gro, buffer_size=64 << 20)
        udp.configure(s, native=native, gso=gso, buffer_size=64 << 20)
    return s, r


def _plain_round(s: socket.socket, r: socket.socket, data: list[bytes]) -> tuple[float, float, int]:
    addr = r.getsockname()
    t0 = time.perf_counter()
    for d in data:
        s.sendto(d, addr)
    t1 = time.perf_counter()
    got = 0
    while True:
        try:
            r.recvfrom(65536)
        except BlockingIOError:
            break
        got += 1
    return t1 - t0, time.perf_counter() - t1, got


def _batched_round(
    s: socket.socket, r: socket.socket, data: list[bytes]
) -> tuple[float, float, int]:
    addr = r.getsockname()
    t0 = time.perf_counter()
    sent = 0
    while sent < len(data):
        sent += udp.send_batch(s, data[sent : sent + 64], addr)
    t1 = time.perf_counter()
    got = 0
    while batch := udp.recv_batch(r):
        got += len(batch)
    return t1 - t0, time.perf_counter() - t1, got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="datagrams per round")
    parser.add_argument("--size", type=int, default=1400, help="datagram size")
    parser.add_argument("--repeat", type=int, default=5, help="rounds; the best is reported")
    args = parser.parse_args()
    data = [os.urandom(args.size) for _ in range(args.count)]
    variants: list[tuple[str, bool | None, bool, bool]] = [
        ("python sendto/recvfrom", None, False, False)
    ]
    variants += [("python fallback, gso+gro", False, True, True)]
    if udp.native_available():
        variants += [
            ("native mmsg", True, False, False),
            ("native mmsg + gro", True, False, True),
            ("native mmsg + gso + gro", True, True, True),
        ]
    print(f"{args.count} x {args.size} B, best of {args.repeat}; load {os.getloadavg()[0]:.2f}")
    print(f"{'variant':28} {'send ns/dgram':>14} {'x ref':>6} {'recv ns/dgram':>14} {'x ref':>6}")
    ref: tuple[float, float] | None = None
    for name, native, gso, gro in variants:
        s, r = _pair(native, gso, gro)
        rounds = []
        with s, r:
            for _ in range(args.repeat):
                send_t, recv_t, got = (_plain_round if native is None else _batched_round)(
                    s, r, data
                )
                if got != len(data):
                    raise SystemExit(
                        f"{name}: received {got} of {len(data)} (receive buffer too small?)"
                    )
                rounds.append((send_t, recv_t))
        send_ns = min(t for t, _ in rounds) / args.count * 1e9
        recv_ns = min(t for _, t in rounds) / args.count * 1e9
        ref = ref or (send_ns, recv_ns)
        print(
            f"{name:28} {send_ns:14.0f} {ref[0] / send_ns:6.2f} {recv_ns:14.0f} {ref[1] / recv_ns:6.2f}"
        )


if __name__ == "__main__":
    main()
