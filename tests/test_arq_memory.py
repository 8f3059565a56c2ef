"""Memory: proportional to the data held, small when idle.

``buffered_bytes`` (both engines) counts payload held; ``allocated_bytes``
(compiled engine) counts the C heap it holds. The project's target is at most
32 KB for an idle connection with the default configuration (512/512 windows).
"""

from __future__ import annotations

import random
import sys

from conftest import load_engine, transfer

import netem
from rudp import Configuration

IDLE_TARGET = 32 * 1024
CFG = Configuration()


def engine_kw(stream: bool = True) -> dict:
    return {
        "mtu": CFG.mtu,
        "snd_wnd": CFG.sndwnd,
        "rcv_wnd": CFG.rcvwnd,
        "nodelay": CFG.nodelay_effective,
        "interval": CFG.interval_ms,
        "resend": CFG.resend_effective,
        "congestion": CFG.congestion_effective,
        "pacing": CFG.pacing,
        "stream": stream,
    }


def footprint(arq) -> int:
    return sys.getsizeof(arq) + arq.allocated_bytes


def test_fresh_engine_is_small():
    cls = load_engine("cython")
    for stream in (True, False):
        assert footprint(cls(1, **engine_kw(stream))) <= IDLE_TARGET


def test_idle_after_a_lossy_transfer_is_small(arq_cls):
    kw = engine_kw()
    a, b = arq_cls(3, **kw), arq_cls(3, **kw)
    link = netem.VirtualLink(netem.load_profile("lossy"), seed=2)
    rng = random.Random(2)
    up = [rng.randbytes(50_000) for _ in range(40)]
    down = [rng.randbytes(20_000) for _ in range(10)]
    got_b, got_a, _ = transfer(a, b, link, up, down, message=False, send_buffer=1 << 20)
    assert b"".join(got_b) == b"".join(up) and b"".join(got_a) == b"".join(down)
    assert a.check(10**9) is None and b.check(10**9) is None
    assert a.buffered_bytes == b.buffered_bytes == 0
    if hasattr(a, "allocated_bytes"):
        assert footprint(a) <= IDLE_TARGET and footprint(b) <= IDLE_TARGET


def test_allocation_follows_the_data_held():
    """During a bulk transfer the heap held stays within a constant of what the engine
    holds for the application (queued, in flight, unread) plus one window of output."""
    cls = load_engine("cython")
    kw = engine_kw()
    a, b = cls(4, **kw), cls(4, **kw)
    chunk = bytes(range(256)) * 256
    fixed = 3 * 1024 * 8 + 4096  # three rings of 512 pointers, small arrays
    per_segment = 1600  # header + pooled payload room
    now = 0
    worst = 0
    for now in range(300):
        while a.pending_bytes < 4 << 20:
            a.send(chunk)
        a.flush(now)
        out = a.datagrams()
        for d in out[: len(out) * 3 // 4]:  # a quarter is lost
            b.input(d, now)
        b.flush(now)
        for d in b.datagrams():
            a.input(d, now)
        if now % 3 == 0:
            b.recv()
        segments = a.waitsnd + b.inflight + 2 * b.rcv_wnd
        bound = fixed + segments * per_segment + 2 * kw["snd_wnd"] * kw["mtu"]
        for arq in (a, b):
            assert arq.allocated_bytes <= bound
        worst = max(worst, a.allocated_bytes)
    assert worst > 1 << 20, "the transfer should have held megabytes: the test proves little"
