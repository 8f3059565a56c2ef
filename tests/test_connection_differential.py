"""The compiled connection (``rudp._connection``) behaves exactly as ``rudp.connection``.

Each seed draws a configuration (the three framings, FEC off, auto or fixed,
stream or message mode, kcptun modes, small MTUs and windows, short connect,
idle and close timeouts) and runs a client and a server over a scripted link
that drops, duplicates, delays, damages and injects datagrams, through the
handshake (a listener creates the server side), data both ways, pings,
half-closes, closes, resets, silences long enough for the timeouts, and a
client that moves to another address. The same script drives a reference
pair and a compiled pair: every return value and exception, every datagram,
event and deadline, the state, the error and every counter must be equal
after every step.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from conftest import compiled, load_engine

from rudp import Configuration
from rudp.connection import Connection as PyConnection
from rudp.events import Terminated
from rudp.listener import Listener

CLIENT = ("10.0.0.1", 40000)
MOVED = ("10.0.0.9", 41000)
SERVER = ("10.0.0.2", 4000)


def comparable(value: Any) -> Any:
    """Exceptions (raised, or carried by Terminated) compare by type and message."""
    if isinstance(value, BaseException):
        return (type(value), str(value))
    if isinstance(value, Terminated):
        return (Terminated, comparable(value.error))
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


def outcome(fn: Any, *args: Any) -> tuple:
    try:
        return ("ok", comparable(fn(*args)))
    except Exception as exc:  # compared, never swallowed: both sides must raise alike
        return ("raised", comparable(exc))


PROPS = (
    "state",
    "peer_address",
    "params",
    "readable",
    "at_eof",
    "close_done",
    "send_buffered",
    "send_window_free",
    "has_events",
    "write_closed",
    "is_client",
    "cid",
)


class Twin:
    """One end in both implementations; every call goes to both and must agree."""

    def __init__(self, py: Any, cy: Any, log: list) -> None:
        self.py, self.cy, self.log = py, cy, log

    def call(self, name: str, *args: Any) -> Any:
        self.log.append((name, args))
        a = outcome(getattr(self.py, name), *args)
        b = outcome(getattr(self.cy, name), *args)
        assert a == b, f"{name}{args!r}: python {a!r} != compiled {b!r} after {self.log[-8:]!r}"
        return a[1] if a[0] == "ok" else None

    def same_state(self, now: float) -> None:
        tail = self.log[-8:]
        for name in PROPS:
            a, b = getattr(self.py, name), getattr(self.cy, name)
            assert a == b, f"{name}: python {a!r} != compiled {b!r} after {tail!r}"
        assert comparable(self.py.error) == comparable(self.cy.error), tail
        assert self.py.stats() == self.cy.stats(), tail
        a, b = self.py.get_timer(now), self.cy.get_timer(now)
        assert a == b or (a is not None and b is not None and abs(a - b) < 1e-9), (a, b, tail)


def config(rng: random.Random) -> Configuration:
    framing = rng.choice(["rudp", "rudp", "rudp", "kcp", "kcp-go"])
    message_mode = rng.random() < 0.2
    fec: Any = "off"
    if framing == "rudp":
        fec = rng.choice(["off", "auto", "auto", (4, 2), (10, 3)])
    return Configuration(
        framing=framing,
        mode=rng.choice(["normal", "fast", "fast3"]),
        mtu=rng.choice([200, 576, 1400]),
        sndwnd=rng.choice([8, 32, 128]),
        rcvwnd=rng.choice([8, 32, 128]),
        message_mode=message_mode,
        fec=fec,
        connect_timeout=rng.choice([0.5, 5.0, 10.0, 10.0]),
        idle_timeout=rng.choice([2.0, 10.0, 30.0, 30.0]),
        keepalive=rng.choice([0.3, 1.0]),
        close_timeout=rng.choice([1.0, 5.0]),
        dead_link=rng.choice([5, 20]),
    )


class Link:
    """Both directions of the scripted link: a seeded fate for every datagram."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.loss = rng.choice([0.0, 0.0, 0.05, 0.2])
        self.dup = rng.choice([0.0, 0.05])
        self.late = rng.choice([0.0, 0.1])
        self.bad = rng.choice([0.0, 0.02])
        self.held: list[tuple[float, int, bytes]] = []  # (due, direction, datagram)

    def carry(self, direction: int, datagrams: list[bytes], now: float) -> None:
        rng = self.rng
        for d in datagrams:
            if rng.random() < self.loss:
                continue
            if rng.random() < self.bad:
                b = bytearray(d)
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
                d = bytes(b[: rng.randrange(1, len(b) + 1)])
            for _ in range(2 if rng.random() < self.dup else 1):
                delay = 0.005 + (rng.random() * 0.05 if rng.random() < self.late else 0)
                self.held.append((now + delay, direction, d))

    def due(self, now: float) -> list[tuple[int, bytes]]:
        out = [(direction, d) for t, direction, d in self.held if t <= now]
        self.held = [item for item in self.held if item[0] > now]
        return out

    def next_time(self) -> float | None:
        return min((t for t, _, _ in self.held), default=None)


def run_script(cy_cls: type, engine: type, seed: int, steps: int) -> None:
    rng = random.Random(seed)
    cfg = config(rng)
    log: list = []
    cid = rng.getrandbits(64)
    client = Twin(
        PyConnection(cfg, is_client=True, cid=cid, engine=engine),
        cy_cls(cfg, is_client=True, cid=cid, engine=engine),
        log,
    )
    listeners = (
        Listener(cfg, secret=bytes(32), engine=engine),
        Listener(cfg, secret=bytes(32), engine=engine, connection=cy_cls),
    )
    server: Twin | None = None
    link = Link(rng)
    now = rng.uniform(0, 1000)
    client_addr = CLIENT
    calm = rng.random() < 0.3  # no closes, resets, moves or garbage: long-lived sessions
    client.call("connect", SERVER, now)
    counter = 0

    def pump() -> None:
        out = client.call("datagrams_to_send", now)
        link.carry(0, out, now)
        if server is not None:
            link.carry(1, server.call("datagrams_to_send", now), now)
        a, b = (lst.datagrams_to_send() for lst in listeners)
        assert a == b, log[-8:]
        link.carry(1, [packet for packet, _ in a], now)

    for _ in range(steps):
        op = rng.random()
        ends = [t for t in (client, server) if t is not None]
        end = rng.choice(ends)
        if op < 0.4:  # time passes: deliveries and timers
            times = [t for t in (link.next_time(), *(e.py.get_timer(now) for e in ends)) if t]
            if times and rng.random() < 0.85:
                now = max(now, min(times))
            else:
                now += rng.choice([0.001, 0.01, 0.05, 0.2, 0.5] if calm else [0.01, 0.5, 3.0])
            for direction, data in link.due(now):
                if direction == 1:
                    client.call("receive_datagram", data, SERVER, now)
                elif server is None or not (
                    cfg.framing != "rudp" or data[2:10] == cid.to_bytes(8, "little")
                ):
                    made = [lst.receive_datagram(data, client_addr, now) for lst in listeners]
                    assert (made[0] is None) == (made[1] is None), log[-8:]
                    if made[0] is not None and server is None:
                        server = Twin(made[0], made[1], log)
                else:
                    server.call("receive_datagram", data, client_addr, now)
            for e in [t for t in (client, server) if t is not None]:
                e.call("handle_timer", now)
        elif op < 0.6:
            n = rng.choice([0, 1, 10, 300, 1400, 5000])
            data = bytes((counter + i) * 7 & 0xFF for i in range(n))
            counter += n
            kind = rng.randrange(3)
            end.call(
                "send", data if kind == 0 else bytearray(data) if kind == 1 else memoryview(data)
            )
        elif op < 0.72:
            if cfg.message_mode:
                end.call("read_message")
            else:
                end.call("read", rng.choice([-1, 1, 100, 3000]))
        elif op < 0.82:
            while end.call("next_event") is not None:
                pass
        elif op < 0.86:
            end.call("ping")
        elif calm:
            pass
        elif op < 0.87:
            end.call(rng.choice(["write_eof", "close", "close"]))
        elif op < 0.873:
            end.call("reset", rng.choice(["", "bye"]), now)
        elif op < 0.88:
            client_addr = MOVED if client_addr == CLIENT else CLIENT  # NAT rebinding
        elif op < 0.885:
            end.call("receive_unreachable", now)
        elif op < 0.9:
            garbage = rng.randbytes(rng.randrange(40))
            if cfg.framing == "rudp" and rng.random() < 0.5:
                garbage = bytes([1, rng.randrange(16)]) + cid.to_bytes(8, "little") + garbage
            end.call("receive_datagram", garbage, client_addr, now)
        pump()
        for e in (client, server):
            if e is not None:
                e.same_state(now)


def test_fresh_state_agrees() -> None:
    cy_cls = compiled("rudp._connection", "Connection")
    engine = load_engine("cython")
    cfg = Configuration()
    py, cy = (
        PyConnection(cfg, is_client=True, cid=7, engine=engine),
        cy_cls(cfg, is_client=True, cid=7, engine=engine),
    )
    Twin(py, cy, []).same_state(0.0)


@pytest.mark.parametrize("seed", range(120))
def test_connections_are_identical(seed: int) -> None:
    run_script(compiled("rudp._connection", "Connection"), load_engine("cython"), seed, steps=300)


@pytest.mark.parametrize("seed", range(4))
def test_with_the_reference_engine(seed: int) -> None:
    """The engine is the caller's: the compiled connection drives the Python one alike."""
    run_script(
        compiled("rudp._connection", "Connection"), load_engine("python"), 5000 + seed, steps=300
    )


def test_long_scripts() -> None:
    cy_cls, engine = compiled("rudp._connection", "Connection"), load_engine("cython")
    for seed in range(9000, 9004):
        run_script(cy_cls, engine, seed, steps=3000)
