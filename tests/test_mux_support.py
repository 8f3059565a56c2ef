"""Two mux Sessions joined by an in-memory reliable pipe, in virtual time (no tests here).

Each direction holds at most ``capacity`` bytes in flight, like an ARQ send
window: the sender pulls only what fits, and the receiver takes only what its
``receive_capacity()`` allows, so backpressure behaves as it will over rudp.
A ``chunker`` decides how delivered bytes are split into ``receive_data`` calls.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from rudp.events import Event
from rudp.mux import Session, SessionClosed

Chunker = Callable[[int], list[int]]


def whole(n: int) -> list[int]:
    return [n]


def bytewise(n: int) -> list[int]:
    return [1] * n


def frame(ver: int, cmd: int, sid: int, body: bytes = b"", length: int | None = None) -> bytes:
    """A smux frame built field by field (independently of the encoder under test)."""
    n = len(body) if length is None else length
    return bytes([ver, cmd]) + n.to_bytes(2, "little") + sid.to_bytes(4, "little") + body


def upd_body(consumed: int, window: int) -> bytes:
    return struct.pack("<II", consumed, window)


class Direction:
    def __init__(self, src: Session, dst: Session, capacity: int) -> None:
        self.src = src
        self.dst = dst
        self.capacity = capacity
        self.in_flight = bytearray()
        self.delivered = 0

    def pump(self, now: int, chunker: Chunker, limit: int | None = None) -> int:
        """Move bytes once: pull what fits, deliver what the receiver takes. Bytes moved."""
        moved = 0
        room = self.capacity - len(self.in_flight)
        if room > 0 and self.src.has_output():
            out = self.src.data_to_send(room, now)
            assert len(out) <= room
            self.in_flight += out
            moved += len(out)
        cap = self.dst.receive_capacity()
        n = len(self.in_flight) if cap is None else min(cap, len(self.in_flight))
        if limit is not None:
            n = min(n, limit)
        if n:
            pos = 0
            for size in chunker(n):
                self.dst.receive_data(bytes(self.in_flight[pos : pos + size]), now)
                pos += size
            assert pos == n
            del self.in_flight[:n]
            self.delivered += n
            moved += n
        return moved


class Pipe:
    """Client ``a`` and server ``b`` over a bounded, reliable, ordered byte pipe."""

    def __init__(
        self,
        a: Session | None = None,
        b: Session | None = None,
        *,
        capacity: int = 65536,
        chunker: Chunker = whole,
        now: int = 0,
        **kwargs: object,
    ) -> None:
        self.now = now
        self.a = a or Session(client=True, now=now, **kwargs)  # type: ignore[arg-type]
        self.b = b or Session(client=False, now=now, **kwargs)  # type: ignore[arg-type]
        self.ab = Direction(self.a, self.b, capacity)
        self.ba = Direction(self.b, self.a, capacity)
        self.chunker = chunker
        self.events: dict[Session, list[Event]] = {self.a: [], self.b: []}

    def collect(self) -> None:
        for s in (self.a, self.b):
            while (ev := s.next_event()) is not None:
                self.events[s].append(ev)

    def pump(self, rounds: int = 10_000) -> int:
        """Pump both ways until nothing moves; total bytes moved."""
        total = 0
        for _ in range(rounds):
            moved = self.ab.pump(self.now, self.chunker) + self.ba.pump(self.now, self.chunker)
            self.collect()
            total += moved
            if not moved:
                return total
        raise AssertionError("pipe never went quiet")

    def advance(self, ms: int, step: int | None = None) -> None:
        """Let virtual time pass, firing timers when due and pumping after each."""
        end = self.now + ms
        while True:
            due = [t for s in (self.a, self.b) if (t := s.get_timer()) is not None]
            nxt = min(due) if due else None
            if step is not None:
                nxt = min(nxt, self.now + step) if nxt is not None else self.now + step
            if nxt is None or nxt > end:
                self.now = end
                self.pump()
                return
            self.now = max(self.now, nxt)
            for s in (self.a, self.b):
                t = s.get_timer()
                if t is not None and t <= self.now:
                    s.handle_timer(self.now)
            self.pump()

    def of(self, s: Session, kind: type) -> list[Event]:
        return [e for e in self.events[s] if isinstance(e, kind)]

    def closed_event(self, s: Session) -> SessionClosed | None:
        evs = self.of(s, SessionClosed)
        return evs[-1] if evs else None  # type: ignore[return-value]


def read_all(s: Session, sid: int) -> bytes:
    """Everything readable now (not waiting for EOF)."""
    out = bytearray()
    while True:
        try:
            data = s.read(sid)
        except BlockingIOError:
            return bytes(out)
        if not data:
            return bytes(out)
        out += data
