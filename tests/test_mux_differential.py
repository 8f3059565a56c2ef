"""The compiled mux (``rudp._mux``) is byte-identical to the reference ``rudp.mux``.

Each seed draws a configuration (smux v1 or v2, with or without the RST
extension, small buffers and frame sizes, few stream slots, keepalive and idle
timeout on or off) and a random script of operations on two connected
sessions: opens, accepts, sends of random sizes (bytes, bytearray, memoryview),
reads, half-closes, resets, closes, pulls with random room, deliveries of the
channel bytes cut anywhere, time steps with timers, and now and then a forged
frame (any command, version, length and id) or a local close. The same script
drives a reference pair and a compiled pair: every return value and exception
(type and message), every frame, event and deadline, every stream's info and
every counter must be equal after every step.
"""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest
from conftest import compiled

from rudp.errors import ClosedError
from rudp.mux import Session as PySession
from rudp.mux import SessionClosed


def comparable(value: Any) -> Any:
    """Exceptions (raised, or carried by SessionClosed) compare by type and message."""
    if isinstance(value, BaseException):
        return (type(value), str(value))
    if isinstance(value, SessionClosed):
        return (SessionClosed, comparable(value.error))
    return value


def outcome(fn: Any, *args: Any) -> tuple:
    try:
        return ("ok", comparable(fn(*args)))
    except Exception as exc:  # compared, never swallowed: both sides must raise alike
        return ("raised", comparable(exc))


class Twin:
    """The same session in both implementations; every call goes to both and must agree."""

    def __init__(self, cy_cls: type, **kw: Any) -> None:
        self.py = PySession(**kw)
        self.cy = cy_cls(**kw)
        self.log: list[tuple] = []
        self.sids: list[int] = []  # ids this side knows (opened or accepted), for the script

    def call(self, name: str, *args: Any) -> Any:
        self.log.append((name, args))
        a = outcome(getattr(self.py, name), *args)
        b = outcome(getattr(self.cy, name), *args)
        assert a == b, f"{name}{args!r}: python {a!r} != compiled {b!r} after {self.log[-8:]!r}"
        return a[1] if a[0] == "ok" else None

    def events(self) -> list:
        out = []
        while True:
            event = self.call("next_event")
            if event is None:
                return out
            out.append(event)

    def same_state(self) -> None:
        py, cy = self.py, self.cy
        tail = self.log[-8:]
        for name in ("closed", "recv_buffered", "has_events", "keepalive", "idle_timeout"):
            assert getattr(py, name) == getattr(cy, name), f"{name} differs after {tail!r}"
        assert comparable(py.error) == comparable(cy.error), tail
        assert py.stats.as_dict() == cy.stats.as_dict(), tail
        assert py.stream_ids() == cy.stream_ids(), tail
        for sid in py.stream_ids():
            assert py.stream_info(sid) == cy.stream_info(sid), f"stream {sid} after {tail!r}"
        for name in ("get_timer", "receive_capacity", "has_output"):
            self.call(name)


def config(rng: random.Random) -> dict:
    stream_buffer = rng.choice([1024, 4096, 65536, 1 << 20])
    keepalive = rng.choice([None, 50, 1000])
    return {
        "version": rng.choice([1, 2, 2]),
        "extensions": rng.random() < 0.6,
        "max_frame_size": rng.choice([1, 16, 100, 1024, 1400, 4096, 32768]),
        "stream_buffer": stream_buffer,
        "session_buffer": stream_buffer * rng.choice([1, 2, 4]),
        "max_streams": rng.choice([1, 2, 4, 16]),
        "stream_backlog": rng.choice([1, 2, 8]),
        "keepalive": keepalive,
        "idle_timeout": rng.choice([None, None, (keepalive or 1) * 3, 60_000]),
    }


def forged_frame(rng: random.Random, version: int, sids: list[int]) -> bytes:
    cmd = rng.choice([0, 1, 2, 3, 4, 0x80, rng.randrange(256)])
    sid = rng.choice([*sids, 0, 1, 2, 3, 4, rng.randrange(1 << 32)] if sids else [0, 1, 2, 3])
    length = rng.choice([0, 4, 8, rng.randrange(20)])
    ver = version if rng.random() < 0.9 else rng.randrange(4)
    body = rng.randbytes(length)
    if cmd == 4 and length == 8 and rng.random() < 0.7:  # a plausible UPD
        body = struct.pack(
            "<II", rng.randrange(1 << 16), rng.choice([0, 100, 1 << 18, 1 << 32 - 1])
        )
    return struct.pack("<BBHI", ver, cmd, length, sid) + body


#: Payload bytes: each send takes the next slice, so misplaced bytes show.
PATTERN = bytes(range(251)) * 1200


def run_script(cy_cls: type, seed: int, steps: int, bulk: bool = False) -> None:
    """``bulk``: large sends, pulls and reads on 1 MiB stream buffers, so windows grow."""
    rng = random.Random(seed)
    kw = config(rng)
    if bulk:
        kw.update(stream_buffer=1 << 20, session_buffer=4 << 20, keepalive=None, idle_timeout=None)
        kw["max_frame_size"] = rng.choice([1400, 4096, 32768])
    now = rng.randrange(1 << 40)
    a = Twin(cy_cls, client=True, now=now, **kw)
    b = Twin(cy_cls, client=False, now=now, **kw)
    wire: dict[int, bytearray] = {id(a): bytearray(), id(b): bytearray()}  # bytes towards a twin
    counter = 0
    for _ in range(steps):
        side, other = (a, b) if rng.random() < 0.5 else (b, a)
        pick = rng.choice([*side.sids, rng.randrange(1, 12)]) if side.sids else rng.randrange(1, 12)
        op = rng.random()
        if op < 0.06:
            sid = side.call("open_stream")
            if sid is not None:
                side.sids.append(sid)
        elif op < 0.10:
            sid = side.call("accept_stream")
            if sid is not None:
                side.sids.append(sid)
        elif op < 0.25:
            n = rng.choice(
                [32768, 70000, 250_000]
                if bulk
                else [0, 1, 7, 100, 512, 1000, 1024, 4096, 5000, 16384, 32768, 70000]
            )
            data = PATTERN[counter % 251 : counter % 251 + n]
            counter += n
            kind = rng.randrange(3)
            side.call(
                "send",
                pick,
                data if kind == 0 else bytearray(data) if kind == 1 else memoryview(data),
            )
        elif op < 0.37:
            side.call(
                rng.choice(["read", "try_read"]),
                pick,
                rng.choice([-1, -1, 0, -2, 1, 50, 512, 1024, 3000, 4096]),
            )
        elif op < 0.41:
            side.call(
                rng.choice(["end_stream", "end_stream", "reset_stream", "close_stream"]), pick
            )
        elif op < 0.62:
            rooms = [65536, 1 << 18] if bulk else [0, 8, 12, 16, 20, 100, 1500, 65536]
            out = side.call("data_to_send", rng.choice(rooms), now)
            if out:
                wire[id(other)] += out
        elif op < 0.82:
            pending = wire[id(side)]
            if pending:
                cut = rng.choice([len(pending), rng.randrange(len(pending) + 1)])
                chunk = bytes(pending[:cut])
                del pending[:cut]
                kind = rng.randrange(4)
                arg = bytearray(chunk) if kind == 1 else memoryview(chunk) if kind == 2 else chunk
                side.call("receive_data", arg, now)
        elif op < 0.88:
            side.events()
        elif op < 0.96:
            now += rng.choice([0, 0, 1, 5, 10, 60, 300, 1000, 5000])
            for twin in (a, b):
                twin.call("handle_timer", now)
        elif bulk:
            pass
        elif op < 0.998:
            if rng.random() < 0.05:  # a forged frame among the real ones
                wire[id(side)] += forged_frame(rng, kw["version"], side.sids)
        else:
            side.call("close", rng.choice([None, ClosedError("gone")]))
        a.same_state()
        b.same_state()


def test_fresh_state_agrees() -> None:
    cy_cls = compiled("rudp._mux", "Session")
    for client in (True, False):
        py, cy = PySession(client=client, now=5), cy_cls(client=client, now=5)
        assert py.stats.as_dict() == cy.stats.as_dict()
        assert (py.get_timer(), py.receive_capacity(), py.closed) == (
            cy.get_timer(),
            cy.receive_capacity(),
            cy.closed,
        )


def test_invalid_configuration_is_refused_alike() -> None:
    cy_cls = compiled("rudp._mux", "Session")
    for bad in ({"version": 3}, {"stream_buffer": 10}, {"max_frame_size": 0}, {"keepalive": 0}):
        kw = {"client": True, "now": 0, **bad}
        with pytest.raises(ValueError) as py_error:
            PySession(**kw)
        with pytest.raises(ValueError) as cy_error:
            cy_cls(**kw)
        assert str(py_error.value) == str(cy_error.value)


@pytest.mark.parametrize("seed", range(150))
def test_sessions_are_byte_identical(seed: int) -> None:
    run_script(compiled("rudp._mux", "Session"), seed, steps=400)


def test_long_scripts() -> None:
    """Fewer seeds, longer scripts: the states that only build up over time."""
    cy_cls = compiled("rudp._mux", "Session")
    for seed in range(10_000, 10_004):
        run_script(cy_cls, seed, steps=5000)


@pytest.mark.parametrize("seed", range(6))
def test_bulk_scripts(seed: int) -> None:
    """Megabytes through 1 MiB stream buffers: windows grow as readers keep up."""
    run_script(compiled("rudp._mux", "Session"), 20_000 + seed, steps=1500, bulk=True)
