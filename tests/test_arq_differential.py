"""The Cython engine is byte-identical to the Python reference.

Each seed draws a configuration (stream or message mode, both congestion
controls, nodelay levels, pacing, redundant bundling, small windows, odd MTUs,
tight limits) and a random script of operations on two connected endpoints: sends of random sizes,
flushes, deliveries through a scripted link that drops, duplicates, reorders,
truncates, bit-flips and injects garbage, time steps (small, large, backwards
never), reads, and ``check()`` calls. The same script drives a Python pair and
a Cython pair; every return value, every datagram, every deadline and every
property and counter must be equal after every step. Along the way it checks
that ``flush`` leaves nothing due: ``check()`` right after it is later or None.
"""

from __future__ import annotations

import random

import pytest
from conftest import load_engine

from rudp.arq import Arq as PyArq

PROPS = (
    "bundle",
    "srtt",
    "rttvar",
    "rto",
    "cwnd",
    "snd_wnd",
    "rcv_wnd",
    "rmt_wnd",
    "inflight",
    "waitsnd",
    "pending_bytes",
    "buffered_bytes",
    "readable",
    "dead",
)


class Twin:
    """The same endpoint in both engines; every call goes to both and must agree."""

    def __init__(self, cy_cls, conv, **kw):
        self.py = PyArq(conv, **kw)
        self.cy = cy_cls(conv, **kw)
        self.log = []

    def call(self, name, *args):
        self.log.append((name, args))
        a = getattr(self.py, name)(*args)
        b = getattr(self.cy, name)(*args)
        assert a == b, f"{name}{args!r}: python {a!r} != cython {b!r} after {self.log[-8:]!r}"
        return a

    def same_state(self):
        for prop in PROPS:
            a, b = getattr(self.py, prop), getattr(self.cy, prop)
            assert a == b, f"{prop}: python {a!r} != cython {b!r} after {self.log[-8:]!r}"
        assert self.py.stats() == self.cy.stats()


def config(rng: random.Random, thin: bool = False) -> dict:
    nodelay = rng.choice([0, 1, 2])
    kw = {
        "mtu": rng.choice([50, 64, 200, 576, 1400]),
        "snd_wnd": rng.choice([1, 2, 4, 16, 64]),
        "rcv_wnd": rng.choice([1, 3, 8, 32, 128]),
        "nodelay": nodelay,
        "interval": rng.choice([1, 10, 40, 100]),
        "resend": rng.choice([0, 1, 2, 3]),
        "congestion": rng.choice(["none", "reno"]),
        "pacing": rng.random() < 0.4,
        "stream": rng.random() < 0.5,
        "rto_max": rng.choice([300, 2000, 60000]),
        "fast_limit": rng.choice([1, 2, 5]),
        "dead_link": rng.choice([5, 20, 1000]),
        "max_message": rng.choice([100, 5000, 1 << 20]),
        "bundle": rng.choice([1, 2, 3, 8] if thin else [0, 0, 1, 2, 8]),
    }
    if thin:  # room for copies, and something in flight to copy
        kw["mtu"] = rng.choice([100, 200, 1400])
        kw["snd_wnd"] = rng.choice([4, 16, 64])
    if rng.random() < 0.3:
        kw["rto_min"] = rng.choice([1, 10, 250])
        kw["rto_max"] = max(kw["rto_max"], kw["rto_min"])
    return kw


def mangle(rng: random.Random, d: bytes) -> bytes:
    """A damaged copy of a datagram."""
    kind = rng.randrange(4)
    if kind == 0 and len(d) > 1:
        return d[: rng.randrange(len(d))]
    if kind == 1:
        b = bytearray(d)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == 2:
        return rng.randbytes(rng.randrange(60))
    return d + rng.randbytes(rng.randrange(1, 30))


class Path:
    """One direction of the scripted link: a seeded fate for every datagram."""

    def __init__(self, rng: random.Random, loss: float, dup: float, reorder: float, bad: float):
        self.rng = rng
        self.loss, self.dup, self.reorder, self.bad = loss, dup, reorder, bad
        self.held: list[tuple[int, bytes]] = []  # (release time, datagram)

    def carry(self, datagrams: list[bytes], now: int) -> list[bytes]:
        rng = self.rng
        out = []
        for d in datagrams:
            if rng.random() < self.loss:
                continue
            if rng.random() < self.bad:
                out.append(mangle(rng, d))
            copies = 2 if rng.random() < self.dup else 1
            for _ in range(copies):
                if rng.random() < self.reorder:
                    self.held.append((now + rng.randint(1, 80), d))
                else:
                    out.append(d)
        due = [d for t, d in self.held if t <= now]
        self.held = [(t, d) for t, d in self.held if t > now]
        return due + out


def payload(rng: random.Random, n: int, counter: list[int]) -> bytes:
    start = counter[0]
    counter[0] += n
    return bytes((start + i) * 7 & 0xFF for i in range(n))


def run_script(cy_cls, seed: int, steps: int, thin: bool = False) -> None:
    """``thin``: small sends and bundling always on (a thin stream's datagrams have room)."""
    rng = random.Random(seed)
    kw = config(rng, thin)
    a = Twin(cy_cls, 0xC0FFEE, **kw)
    b = Twin(cy_cls, 0xC0FFEE, **{**kw, **config(rng, thin), "stream": kw["stream"]})
    loss = rng.choice([0.0, 0.05, 0.2, 0.5])
    ab = Path(rng, loss, rng.choice([0, 0.05]), rng.choice([0, 0.1, 0.3]), rng.choice([0, 0.05]))
    ba = Path(rng, loss, rng.choice([0, 0.05]), rng.choice([0, 0.1, 0.3]), rng.choice([0, 0.05]))
    if rng.random() < 0.3:  # sequence numbers about to wrap
        sa, sb = (2**32 - rng.randrange(1, 200) for _ in range(2))
        for twin, snd, rcv in ((a, sa, sb), (b, sb, sa)):
            twin.call("_start_sequence", snd, rcv)
    counter = [0]
    now = rng.randrange(2**32)  # start anywhere: the clock wraps
    for _ in range(steps):
        op = rng.random()
        side, path, other = (a, ab, b) if rng.random() < 0.5 else (b, ba, a)
        if op < 0.15:
            if thin:
                n = rng.choice([0, 1, 10, 16, 40, 100])
            elif kw["stream"]:
                n = rng.choice([0, 1, 10, 100, 1000, 5000])
            else:
                n = rng.choice([0, 1, 10, 100, 1000, 5000, 20000])
                n = min(n, side.py._max_message)
            data = payload(rng, n, counter)
            kind = rng.randrange(3)
            arg = data if kind == 0 else bytearray(data) if kind == 1 else memoryview(data)
            side.call("send", arg)
        elif op < 0.45:
            side.call("flush", now)
            after = side.call("check", now)
            assert after is None or after > now, "flush left something due"
            out = side.call("datagrams")
            for d in path.carry(out, now):
                arg = d if rng.random() < 0.8 else bytearray(d)
                other.call("input", arg, now, rng.random() < 0.9)
        elif op < 0.6:
            if kw["stream"]:
                side.call("recv", rng.choice([-1, 0, 1, 100, 3000]))
            else:
                side.call("recv_message")
        elif op < 0.75:
            deadline = side.call("check", now)
            if deadline is not None and rng.random() < 0.7:
                now = max(now, deadline)
                side.call("flush", now)
                for d in path.carry(side.call("datagrams"), now):
                    other.call("input", d, now)
        elif op < 0.97:
            now += rng.choice([0, 1, 1, 2, 5, 20, 100])
        else:
            now += rng.choice([1000, 8000, 70000])
        a.same_state()
        b.same_state()


def test_fresh_state_agrees():
    """Both engines start from the same state and name the same counters."""
    cy = load_engine("cython")
    a, b = PyArq(1), cy(1)
    assert (a.rto, a.rmt_wnd, a.cwnd, a.mss) == (b.rto, b.rmt_wnd, b.cwnd, b.mss)
    assert list(a.stats()) == list(b.stats())


@pytest.mark.parametrize("seed", range(60))
def test_engines_are_byte_identical(seed):
    run_script(load_engine("cython"), seed, steps=600)


@pytest.mark.parametrize("seed", range(40))
def test_thin_streams_are_byte_identical(seed):
    """Small sends with bundling on, so copies fill the room datagrams leave."""
    run_script(load_engine("cython"), 5000 + seed, steps=3000, thin=True)


def test_long_lossy_script():
    """Fewer seeds, longer scripts: the states that only build up over time."""
    cy = load_engine("cython")
    for seed in range(1000, 1004):
        run_script(cy, seed, steps=5000)
