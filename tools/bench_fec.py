#!/usr/bin/env python3
"""Reed-Solomon FEC speed, one thread: rudp's kernels against reedsolo, in the same run.

Throughput counts data bytes (k shards per group), for encode and for decoding a group
that lost ``--erasures`` data shards. reedsolo, the code's definition, runs on a small
sample because it is about four orders of magnitude slower; every other figure is also
printed as a ratio to it. Targets (10+3, 1400-byte shards): encode >= 1 GB/s, decode with
3 erasures >= 500 MB/s. The packet-group layer (FecEncoder/FecDecoder, pure Python
around the kernel) is measured too, in packets per second.

Timings are the best of ``--repeat`` runs; on a shared machine repeat them and say so.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Callable

import reedsolo

from rudp import fec

ENCODE_TARGET = 1000.0  # MB/s of data, 10+3, 1400-byte shards
DECODE_TARGET = 500.0


def best_rate(fn: Callable[[], object], nbytes: int, seconds: float, repeat: int) -> float:
    """MB/s (10^6 bytes) of the fastest of ``repeat`` runs of about ``seconds`` each."""
    fn()  # warm caches (decode matrices, lazily built tables)
    calls = 1
    while True:  # calibrate the number of calls per run
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds / 10 or calls >= 1 << 24:
            break
        calls *= 4
    calls = max(1, int(calls * seconds / max(elapsed, 1e-9)))
    best = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = max(best, calls * nbytes / (time.perf_counter() - start) / 1e6)
    return best


def reedsolo_rates(
    k: int, m: int, erasures: int, columns: int, rnd: random.Random
) -> tuple[float, float]:
    """reedsolo itself, column by column, on ``columns`` bytes per shard."""
    rs = reedsolo.RSCodec(nsym=m, nsize=k + m)
    cols = [rnd.randbytes(k) for _ in range(columns)]
    start = time.perf_counter()
    coded = [rs.encode(c) for c in cols]
    encode = columns * k / (time.perf_counter() - start) / 1e6
    lost = list(range(erasures))
    damaged = []
    for c in coded:
        c = bytearray(c)
        for i in lost:
            c[i] = 0
        damaged.append(c)
    start = time.perf_counter()
    for c, original in zip(damaged, cols, strict=True):
        assert bytes(rs.decode(c, erase_pos=lost)[0]) == original
    decode = columns * k / (time.perf_counter() - start) / 1e6
    return encode, decode


def codec_rates(
    codec: fec.RSCodec, data: list[bytes], erasures: int, seconds: float, repeat: int
) -> tuple[float, float]:
    k = codec.k
    parity = codec.encode(data)
    full = [*data, *parity]
    rnd = random.Random(1)
    patterns = []
    for _ in range(16):  # a few erasure patterns in turn, as a lossy link would give
        shards: list[bytes | None] = list(full)
        for i in rnd.sample(range(k), erasures):
            shards[i] = None
        assert codec.decode(shards) == data
        patterns.append(shards)
    turn = iter(range(1 << 62))
    nbytes = k * len(data[0])
    encode = best_rate(lambda: codec.encode(data), nbytes, seconds, repeat)
    decode = best_rate(lambda: codec.decode(patterns[next(turn) % 16]), nbytes, seconds, repeat)
    return encode, decode


def group_rates(
    k: int, m: int, size: int, engine: str, seconds: float, repeat: int
) -> tuple[float, float]:
    """Packets/s through FecEncoder.add, and through FecDecoder on a 10%-loss link."""
    rnd = random.Random(2)
    payloads = [rnd.randbytes(size) for _ in range(100 * k)]
    enc = fec.FecEncoder(k, m, engine=engine)
    packets = []
    for i, p in enumerate(payloads):
        tag, parity = enc.add(p, i)
        packets.append(("d", tag.group, tag.index, p))
        packets += [("p", q.group, q.index, q.count, q.parity, q.shard) for q in parity]
    received = [p for p in packets if rnd.random() >= 0.1]
    clock = iter(range(1 << 62))

    def encode_all() -> None:
        enc = fec.FecEncoder(k, m, engine=engine)
        for p in payloads:
            enc.add(p, next(clock))

    def decode_all() -> None:
        dec = fec.FecDecoder(engine=engine)
        for p in received:
            if p[0] == "d":
                dec.on_data(p[1], p[2], p[3])
            else:
                dec.on_parity(*p[1:])

    enc_pps = best_rate(encode_all, len(payloads), seconds, repeat) * 1e6
    dec_pps = best_rate(decode_all, len(received), seconds, repeat) * 1e6
    return enc_pps, dec_pps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", type=int, default=10, help="data shards (default 10)")
    parser.add_argument("-m", type=int, default=3, help="parity shards (default 3)")
    parser.add_argument("--size", type=int, default=1400, help="shard bytes (default 1400)")
    parser.add_argument(
        "--erasures", type=int, default=None, help="lost data shards to decode (default m)"
    )
    parser.add_argument("--seconds", type=float, default=0.5, help="length of one timed run")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs; the best counts")
    parser.add_argument(
        "--reedsolo-columns", type=int, default=200, help="reedsolo's sample, bytes per shard"
    )
    parser.add_argument("--cpu", type=int, default=None, help="pin the process to this CPU")
    parser.add_argument("--no-groups", action="store_true", help="skip the packet-group layer")
    args = parser.parse_args(argv)
    erasures = args.m if args.erasures is None else args.erasures
    if not 0 < erasures <= min(args.k, args.m):
        parser.error("--erasures must be in [1, min(k, m)]")
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})

    rnd = random.Random(0)
    data = [rnd.randbytes(args.size) for _ in range(args.k)]
    load = os.getloadavg()[0]
    print(
        f"FEC {args.k}+{args.m}, {args.size}-byte shards, decode with {erasures} lost data shards; "
        f"one thread; load average {load:.2f} on {os.cpu_count()} CPUs"
        + (" (measured under load: repeat before trusting)" if load > 0.5 else "")
    )
    ref_enc, ref_dec = reedsolo_rates(args.k, args.m, erasures, args.reedsolo_columns, rnd)
    rows = [("reedsolo (the definition)", ref_enc, ref_dec)]

    kernels: list[tuple[str, str, str | None]] = [("python", "pure-Python reference", None)]
    if "cython" in fec.ENGINES:
        from rudp import _rs

        default_isa = _rs.isa()
        kernels += [
            ("cython", f"cython {isa}" + (" (default)" if isa == default_isa else ""), isa)
            for isa in _rs.available_isas()
        ]
    else:
        print("rudp._rs is not built: only the pure-Python kernel is measured", file=sys.stderr)
    default = None
    for engine, label, isa in kernels:
        if isa is not None:
            previous = _rs.set_isa(isa)
        codec = fec.RSCodec(args.k, args.m, engine=engine)
        enc, dec = codec_rates(codec, data, erasures, args.seconds, args.repeat)
        rows.append((label, enc, dec))
        if isa is not None:
            _rs.set_isa(previous)
            if isa == default_isa:
                default = (enc, dec)
    if default is None:
        default = rows[-1][1:]

    print(
        f"\n{'kernel':30} {'encode MB/s':>12} {'x reedsolo':>11} {'decode MB/s':>12} {'x reedsolo':>11}"
    )
    for label, enc, dec in rows:
        print(f"{label:30} {enc:12.2f} {enc / ref_enc:11.0f} {dec:12.2f} {dec / ref_dec:11.0f}")

    ok = True
    if (args.k, args.m, args.size, erasures) == (10, 3, 1400, 3):
        for what, got, target in (
            ("encode", default[0], ENCODE_TARGET),
            ("decode", default[1], DECODE_TARGET),
        ):
            met = got >= target
            ok &= met
            print(
                f"target {what} >= {target:.0f} MB/s: {got:.0f} MB/s, {'met' if met else 'MISSED'}"
            )

    if not args.no_groups:
        print(
            f"\npacket groups ({args.k}+{args.m}, {args.size}-byte payloads; decoder on a 10%-loss link)"
        )
        for engine in fec.ENGINES:
            enc_pps, dec_pps = group_rates(
                args.k, args.m, args.size, engine, args.seconds, args.repeat
            )
            print(
                f"  {engine:8} FecEncoder.add {enc_pps:12,.0f} packets/s   FecDecoder {dec_pps:12,.0f} packets/s"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
