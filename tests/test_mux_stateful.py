"""Random API sequences and channel chunkings over two Sessions (hypothesis.stateful).

Checked after every step: no session fails (two correct ends never break the
protocol), every byte read is the byte written at that offset, and every
buffer stays within its documented bound. At the end every direction that
was not reset is ended and drained: all bytes arrive, then EOF.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from test_mux_support import Pipe

from rudp.errors import ClosedError, ConnectionReset
from rudp.mux import INITIAL_PEER_WINDOW, MIN_WINDOW, Session

INDEX = st.integers(0, 63)
SIDE = st.integers(0, 1)
POOL = random.Random(99).randbytes(1 << 20)
POOL2 = POOL + POOL[:65536]


def content(seed: int, offset: int, n: int) -> bytes:
    """Bytes ``offset .. offset+n`` of a stream direction (n ≤ 65536)."""
    start = (seed * 7919 + offset) % len(POOL)
    return POOL2[start : start + n]


class Direction:
    """One direction of one stream: what the writer got accepted, what the reader read."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.sent = 0
        self.got = 0
        self.ended = False  # writer called end_stream (or close_stream)
        self.eof = False
        self.unchecked = False  # reset, or its reader closed the stream: no completeness


class Stream:
    def __init__(self, opener: int, sid: int) -> None:
        self.opener = opener
        self.sid = sid
        self.accepted = False
        self.closed_by: set[int] = set()
        # dirs[w]: bytes written by side w
        self.dirs = {w: Direction(sid * 2 + w + opener * 1_000_003) for w in (0, 1)}

    def knows(self, side: int) -> bool:
        return side == self.opener or self.accepted


class MuxMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.streams: list[Stream] = []

    @initialize(
        version=st.sampled_from([1, 2]),
        extensions=st.booleans(),
        stream_buffer=st.sampled_from([2048, 65536, INITIAL_PEER_WINDOW]),
        pool_factor=st.sampled_from([1, 2, 4]),
        max_frame_size=st.sampled_from([64, 1000, 32768]),
        capacity=st.sampled_from([100, 3000, 70000]),
    )
    def setup(
        self,
        version: int,
        extensions: bool,
        stream_buffer: int,
        pool_factor: int,
        max_frame_size: int,
        capacity: int,
    ) -> None:
        self.p = Pipe(
            capacity=capacity,
            version=version,
            extensions=extensions,
            stream_buffer=stream_buffer,
            session_buffer=stream_buffer * pool_factor,
            max_frame_size=max_frame_size,
            keepalive=1000,
            idle_timeout=3000,
        )
        self.sides: tuple[Session, Session] = (self.p.a, self.p.b)

    def pick(self, i: int) -> Stream:
        return self.streams[i % len(self.streams)]

    # ------------------------------------------------------------ rules

    @rule(side=SIDE)
    def open_stream(self, side: int) -> None:
        sid = self.sides[side].open_stream()
        assert sid % 2 == (1 if side == 0 else 0)
        assert all(s.sid != sid for s in self.streams if s.opener == side)
        self.streams.append(Stream(side, sid))

    @rule()
    def accept(self) -> None:
        for side, s in enumerate(self.sides):
            while (sid := s.accept_stream()) is not None:
                match = [x for x in self.streams if x.sid == sid and x.opener != side]
                assert len(match) == 1 and not match[0].accepted
                match[0].accepted = True

    @precondition(lambda self: self.streams)
    @rule(
        i=INDEX,
        w=SIDE,
        n=st.one_of(st.integers(0, 100), st.sampled_from([3000, 20000, 65536])),
    )
    def send(self, i: int, w: int, n: int) -> None:
        stream = self.pick(i)
        d = stream.dirs[w]
        if not stream.knows(w) or d.ended or stream.closed_by or d.unchecked:
            return
        took = self.sides[w].send(stream.sid, content(d.seed, d.sent, n))
        assert 0 <= took <= n
        d.sent += took

    @precondition(lambda self: self.streams)
    @rule(i=INDEX, r=SIDE, max_bytes=st.sampled_from([-1, 1, 7, 1000, 100000]))
    def read(self, i: int, r: int, max_bytes: int) -> None:
        self._read(self.pick(i), r, max_bytes)  # r: the reading side

    def _read(self, stream: Stream, r: int, max_bytes: int) -> bool:
        """One read; True if it made progress."""
        if not stream.knows(r) or r in stream.closed_by:
            return False
        d = stream.dirs[1 - r]
        if d.eof:
            return False
        try:
            chunk = self.sides[r].read(stream.sid, max_bytes)
        except BlockingIOError:
            return False
        except (ConnectionReset, ClosedError):
            assert d.unchecked, "only a reset stream may fail a read"
            d.eof = True
            return True
        assert chunk == content(d.seed, d.got, len(chunk)), "corrupted or reordered bytes"
        d.got += len(chunk)
        assert d.got <= d.sent
        if not chunk:
            d.eof = True
            assert d.unchecked or (d.ended and d.got == d.sent), "EOF before all bytes"
        return True

    @precondition(lambda self: self.streams)
    @rule(i=INDEX, w=SIDE)
    def end_stream(self, i: int, w: int) -> None:
        stream = self.pick(i)
        if stream.knows(w) and not stream.closed_by and not stream.dirs[w].unchecked:
            self.sides[w].end_stream(stream.sid)
            stream.dirs[w].ended = True

    @precondition(lambda self: self.streams)
    @rule(i=INDEX, w=SIDE)
    def reset_stream(self, i: int, w: int) -> None:
        stream = self.pick(i)
        if stream.knows(w):
            self.sides[w].reset_stream(stream.sid)
            for d in stream.dirs.values():
                d.unchecked = True
            stream.closed_by.add(w)

    @precondition(lambda self: self.streams)
    @rule(i=INDEX, w=SIDE)
    def close_stream(self, i: int, w: int) -> None:
        stream = self.pick(i)
        if stream.knows(w) and w not in stream.closed_by:
            self.sides[w].close_stream(stream.sid)
            stream.closed_by.add(w)
            stream.dirs[w].ended = True  # its bytes still go out, then FIN
            stream.dirs[1 - w].unchecked = True  # it reads no more

    @rule(
        direction=st.integers(0, 1),
        limit=st.one_of(st.integers(1, 100), st.sampled_from([1000, 30000, 200000])),
        chunks=st.lists(st.integers(1, 5000), min_size=1, max_size=5),
    )
    def pump(self, direction: int, limit: int, chunks: list[int]) -> None:
        def chunker(n: int) -> list[int]:
            out, i = [], 0
            while n:
                k = min(n, chunks[i % len(chunks)])
                out.append(k)
                n -= k
                i += 1
            return out

        (self.p.ab if direction == 0 else self.p.ba).pump(self.p.now, chunker, limit)
        self.p.collect()

    @rule(ms=st.integers(0, 2500))
    def advance(self, ms: int) -> None:
        self.p.advance(ms)

    # ------------------------------------------------------------ invariants

    @invariant()
    def nobody_failed(self) -> None:
        for s in self.sides:
            assert not s.closed, s.error

    @invariant()
    def buffers_bounded(self) -> None:
        for s in self.sides:
            infos = [s.stream_info(sid) for sid in s.stream_ids()]
            total = 0
            for info in infos:
                assert info is not None
                assert info.send_buffered <= s.stream_buffer
                if s.version == 2:
                    assert info.recv_buffered <= max(INITIAL_PEER_WINDOW, s.stream_buffer)
                total += info.recv_buffered
            assert total == s.recv_buffered
            if s.version == 1:  # like smux's bucket: checked before a frame, not within
                assert total <= s.session_buffer + s.max_frame_size
            else:
                bound = s.session_buffer + len(infos) * MIN_WINDOW + s.stats.bytes_over_window
                assert total <= bound

    def teardown(self) -> None:
        if not hasattr(self, "p"):
            return
        for _ in range(100000):
            moved = self.p.pump()
            self.accept()
            for stream in self.streams:  # end every direction as soon as its writer knows it
                for w, d in stream.dirs.items():
                    if stream.knows(w) and not (d.ended or d.unchecked or stream.closed_by):
                        self.sides[w].end_stream(stream.sid)
                        d.ended = True
                        moved += 1
            progress = False
            for stream in self.streams:
                for r in (0, 1):
                    while self._read(stream, r, -1):
                        progress = True
            if not moved and not progress:
                break
        self.nobody_failed()
        for stream in self.streams:
            for w, d in stream.dirs.items():
                if not d.unchecked:
                    assert d.eof and d.got == d.sent, (stream.sid, w, d.got, d.sent)


MuxMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestMux = MuxMachine.TestCase
