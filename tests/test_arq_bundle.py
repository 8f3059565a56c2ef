"""Redundant bundling for thin streams (``bundle=``), on every engine.

A flush that admits new data fills the room left in its last datagram with
copies of the oldest unacknowledged segments not sent at this millisecond,
oldest first, each segment at most ``bundle`` times, stopping at the first
one that does not fit whole. Copies carry the current ts/wnd/una and change
none of the segment's timers or counters. Expected datagrams are read back with
``rudp.wire.decode_kcp_segments`` or built by hand with ``struct``.
"""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import netem
from rudp.wire import KCP_CMD_ACK, KCP_CMD_PUSH, decode_kcp_segments

CONV = 0xB0D1E
HDR = struct.Struct("<IBBHIIII")
FAST3 = {"nodelay": 1, "interval": 10, "resend": 2, "congestion": "none"}


def segs(datagrams):
    return [s for d in datagrams for s in decode_kcp_segments(d)]


def ack(sn, ts, una=0, wnd=128):
    return HDR.pack(CONV, KCP_CMD_ACK, 0, wnd, ts, sn, una, 0)


def make(cls, **kw):
    return cls(CONV, **{"stream": False, **FAST3, **kw})


def pushes(datagrams):
    """(sn, ts, data) of every PUSH, in order."""
    return [(s.sn, s.ts, s.data) for s in segs(datagrams) if s.cmd == KCP_CMD_PUSH]


# ---------------------------------------------------------------------- configuration


@pytest.mark.parametrize("value", [-1, 9, True, 1.0, "2"])
def test_bad_bundle_names_the_argument(arq_cls, value):
    with pytest.raises(ValueError, match="bundle"):
        arq_cls(1, bundle=value)


def test_bundle_is_off_by_default(arq_cls):
    a = arq_cls(1)
    assert a.bundle == 0 and a.stats()["bundled_segs"] == 0
    assert arq_cls(1, bundle=8).bundle == 8
    a = make(arq_cls)
    a.send(b"m0")
    a.flush(0)
    a.datagrams()
    a.send(b"m1")
    a.flush(20)
    assert pushes(a.datagrams()) == [(1, 20, b"m1")], "no copies unless asked for"


# ---------------------------------------------------------------------- what is copied


def test_lost_message_is_repaired_by_the_next_datagram(arq_cls):
    a = make(arq_cls, bundle=1)
    b = make(arq_cls)
    a.send(b"m0")
    a.flush(0)
    assert len(a.datagrams()) == 1  # lost
    a.send(b"m1")
    a.flush(20)
    (d,) = a.datagrams()
    assert pushes([d]) == [(1, 20, b"m1"), (0, 20, b"m0")]
    assert {(s.wnd, s.una, s.frg) for s in segs([d])} == {(128, 0, 0)}
    b.input(d, 45)
    assert [b.recv_message(), b.recv_message(), b.recv_message()] == [b"m0", b"m1", None]
    b.flush(45)
    for reply in b.datagrams():
        a.input(reply, 70)
    st = a.stats()
    assert a.inflight == 0 and a.check(70) is None
    assert (st["retrans_segs"], st["bundled_segs"], st["out_segs"], st["out_bytes"]) == (0, 1, 3, 6)


@pytest.mark.parametrize(
    ("bundle", "expected"),
    [
        (1, [[1, 0], [2, 1], [3, 2], [4, 3], [5, 4]]),
        (2, [[1, 0], [2, 0, 1], [3, 1, 2], [4, 2, 3], [5, 3, 4]]),
        (8, [[1, 0], [2, 0, 1], [3, 0, 1, 2], [4, 0, 1, 2, 3], [5, 0, 1, 2, 3, 4]]),
    ],
)
def test_each_segment_is_copied_at_most_bundle_times_oldest_first(arq_cls, bundle, expected):
    a = make(arq_cls, bundle=bundle)
    a.send(b"m0")
    a.flush(0)
    a.datagrams()
    got = []
    for i in range(1, 6):  # nothing ever comes back
        a.send(b"m%d" % i)
        a.flush(20 * i)
        out = a.datagrams()
        assert len(out) == 1
        got.append([sn for sn, _, _ in pushes(out)])
    assert got == expected
    assert a.stats()["bundled_segs"] == sum(len(g) - 1 for g in got)
    assert a.stats()["retrans_segs"] == 0


def test_copies_fit_whole_and_stop_at_the_first_that_does_not(arq_cls):
    a = make(arq_cls, mtu=100, bundle=2)  # mss 76
    a.send(bytes(40))  # sn 0: a copy takes 64 bytes
    a.flush(0)
    a.datagrams()
    a.send(bytes(10))  # sn 1: 34 bytes, room 66: the copy of sn 0 fits
    a.flush(20)
    (d,) = a.datagrams()
    assert len(d) == 98 and [sn for sn, _, _ in pushes([d])] == [1, 0]
    a.send(bytes(30))  # sn 2: 54 bytes, room 46: sn 0 does not fit, so nothing is copied
    a.flush(40)
    (d,) = a.datagrams()
    assert len(d) == 54 and [sn for sn, _, _ in pushes([d])] == [2]


def test_no_copies_in_bulk_transfers(arq_cls):
    a = make(arq_cls, stream=True, snd_wnd=64, bundle=8)
    a.send(bytes(5 * a.mss))
    a.flush(0)
    a.send(bytes(5 * a.mss + 100))  # full datagrams, then a 124-byte one
    a.flush(10)
    out = a.datagrams()
    assert [len(d) for d in out] == [a.mtu] * 10 + [124]
    assert a.stats()["bundled_segs"] == 0, "the oldest segment never fits a partial datagram"


def test_no_copies_without_new_data(arq_cls):
    a = make(arq_cls, bundle=8)
    a.send(b"m0")
    a.send(b"m1")
    a.flush(0)
    assert [sn for sn, _, _ in pushes(a.datagrams())] == [0, 1], "no copy of what this flush sent"
    a.input(HDR.pack(CONV, KCP_CMD_PUSH, 0, 128, 3, 0, 0, 1) + b"x", 5)
    a.flush(5)  # an ACK alone
    assert [s.cmd for s in segs(a.datagrams())] == [KCP_CMD_ACK]
    a.flush(a.check(5))  # the timeout retransmits both: no copies either
    assert [sn for sn, _, _ in pushes(a.datagrams())] == [0, 1]
    assert a.stats()["bundled_segs"] == 0 and a.stats()["lost_segs"] == 2


# ---------------------------------------------------------------------- copies are not retransmissions


def drive_thin(a, until):
    """A message every 20 ms, nothing comes back; flush at sends and deadlines.
    Returns the engine's observable schedule after every flush."""
    trace = []
    now, nxt = 0, 0
    while now <= until:
        if now == nxt:
            a.send(b"msg")
            nxt += 20
        a.flush(now)
        a.datagrams()
        st = a.stats()
        trace.append((now, a.check(now), st["retrans_segs"], st["lost_segs"], a.dead, a.inflight))
        due = a.check(now)
        now = nxt if due is None else min(due, nxt)
    return trace


def test_copies_change_no_timer_and_do_not_count_towards_dead_link(arq_cls):
    plain = make(arq_cls, dead_link=3)
    bundled = make(arq_cls, dead_link=3, bundle=3)
    assert drive_thin(plain, 2000) == drive_thin(bundled, 2000)
    assert bundled.stats()["bundled_segs"] > 10 and bundled.dead


def test_copies_keep_the_skip_count_and_its_timestamp(arq_cls):
    """ACKs of segments sent after a segment's transmission but before its copy still
    count as skips, across the copy: a copy is not a transmission for fast retransmit."""
    a = make(arq_cls, snd_wnd=16, bundle=1)
    a.send(b"m0")
    a.flush(0)  # sn 0, lost
    a.send(bytes(a.mss))
    a.send(bytes(a.mss))
    a.flush(5)  # sn 1, 2: full datagrams, no room for a copy
    assert [sn for sn, _, _ in pushes(a.datagrams()[1:])] == [1, 2]
    a.input(ack(1, 5), 6)  # one skip of sn 0
    a.send(b"m3")
    a.flush(10)  # sn 3 with a copy of sn 0 (lost)
    assert [sn for sn, _, _ in pushes(a.datagrams())] == [3, 0]
    a.input(ack(2, 5), 11)  # the second skip: ts 5 is after sn 0's transmission at 0
    assert a.check(11) == 11
    a.flush(11)
    assert [sn for sn, _, _ in pushes(a.datagrams())] == [0]
    assert a.stats()["fast_retrans_segs"] == 1


def test_the_ack_of_a_copy_is_a_correct_rtt_sample(arq_cls):
    a = make(arq_cls, bundle=1)
    a.send(b"m0")
    a.flush(0)
    a.send(b"m1")
    a.flush(20)
    a.datagrams()
    a.input(ack(0, 20), 70)  # the copy sent at 20 came back: 50 ms, not 70
    assert (a.srtt, a.rttvar) == (50, 25)
    c = make(arq_cls, bundle=1)
    c.send(b"m0")
    c.flush(0)
    c.send(b"m1")
    c.flush(20)
    c.input(ack(0, 30), 70)  # nothing of sn 0 was sent at 30: not a sample
    assert c.srtt == 0 and c.inflight == 1


# ---------------------------------------------------------------------- the receiver


def test_late_duplicate_costs_no_window_and_no_memory(arq_cls):
    b = make(arq_cls, rcv_wnd=4)
    m0 = HDR.pack(CONV, KCP_CMD_PUSH, 0, 128, 0, 0, 0, 5) + b"first"
    b.input(m0, 0)
    b.flush(0)
    (first_ack,) = segs(b.datagrams())
    assert first_ack.wnd == 3 and b.buffered_bytes == 5  # delivered, not read yet
    alloc = getattr(b, "allocated_bytes", None)
    for now in range(1, 300):  # the original was delivered; copies keep coming
        b.input(m0, now)
        b.flush(now)
        (again,) = segs(b.datagrams())
        assert (again.cmd, again.sn, again.una, again.wnd) == (KCP_CMD_ACK, 0, 1, 3)
        assert b.buffered_bytes == 5
    if alloc is not None:
        assert b.allocated_bytes == alloc
    assert b.recv_message() == b"first" and b.recv_message() is None
    assert b.stats()["repeat_segs"] == 299


# ---------------------------------------------------------------------- properties

STEP = st.tuples(st.integers(0, 120), st.integers(0, 25), st.booleans())


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(STEP, min_size=1, max_size=40), bundle=st.integers(1, 8), stream=st.booleans()
)
def test_copies_are_faithful_bounded_and_ride_with_new_data(arq_cls, steps, bundle, stream):
    """Random sends, clock steps and losses. Every datagram fits the mtu. A flush emits
    retransmissions, then new segments, then copies (old segments after the first new
    one), so the copies can be told apart: they are byte-exact, ride only in the
    flush's last datagram, are counted in ``bundled_segs``, never copy a segment
    transmitted at the same millisecond, and no segment is copied more than
    ``bundle`` times. The receiver gets exactly what was sent."""
    a = make(arq_cls, mtu=120, snd_wnd=32, stream=stream, bundle=bundle)
    b = make(arq_cls, mtu=120, rcv_wnd=256, stream=stream)
    data_of: dict[int, bytes] = {}
    last_tx: dict[int, int] = {}  # sn -> time of its last (re)transmission
    copies: dict[int, int] = {}
    now, total, got = 0, b"", b""

    def step(now: int, lose: bool) -> None:
        before = a.stats()["bundled_segs"]
        a.flush(now)
        out = a.datagrams()
        seen_new = False
        copied = 0
        for i, d in enumerate(out):
            assert len(d) <= a.mtu
            for s in decode_kcp_segments(d):
                if s.cmd != KCP_CMD_PUSH:
                    continue
                if s.sn not in data_of:
                    data_of[s.sn] = s.data
                    last_tx[s.sn] = now
                    seen_new = True
                    continue
                assert s.data == data_of[s.sn]
                if not seen_new:
                    last_tx[s.sn] = now  # a retransmission
                    continue
                assert i == len(out) - 1, "a copy outside the flush's last datagram"
                assert last_tx[s.sn] != now, "a copy of a segment sent this millisecond"
                copies[s.sn] = copies.get(s.sn, 0) + 1
                copied += 1
        assert a.stats()["bundled_segs"] - before == copied
        if not lose:
            for d in out:
                b.input(d, now)
            b.flush(now)
            for d in b.datagrams():
                a.input(d, now)

    def read() -> bytes:
        return b.recv() if stream else b"".join(iter(b.recv_message, None))

    for size, dt, lose in steps:
        now += dt
        data = bytes((len(total) + i) & 0xFF for i in range(size))
        total += data
        a.send(data)
        step(now, lose)
        got += read()
    for _ in range(300):  # finish losslessly, by the sender's deadlines
        if a.waitsnd == 0:  # empty messages hold no bytes but are segments
            break
        now = max(now + 1, a.check(now) or 0)
        step(now, False)
        got += read()
    assert got == total
    assert all(n <= bundle for n in copies.values())


# ---------------------------------------------------------------------- a thin stream over a lossy link


def thin_stream(a, b, link, count, interval, size=16):
    """Both ends send ``count`` messages of ``size`` bytes, one every ``interval`` ms (b
    answers a's traffic with its own, as a game does), over ``link`` in virtual
    milliseconds. Flushes after input, after sends and at ``check()`` deadlines.
    Returns each direction's one-way latencies (ms, in send order); the messages must
    arrive intact and in order."""
    ends = (a, b)
    latencies: tuple[list[int], list[int]] = ([], [])  # a -> b, b -> a
    sent = [0, 0]
    now = 0
    touched = [False, False]
    while min(len(latencies[0]), len(latencies[1])) < count:
        for direction, datagram in link.receive(now / 1000):
            ends[1 - direction].input(datagram, now)
            touched[1 - direction] = True
        for i, end in enumerate(ends):
            if sent[i] < count and now >= sent[i] * interval:
                end.send(struct.pack("<II", sent[i], now) + bytes(size - 8))
                sent[i] += 1
                touched[i] = True
            while (m := end.recv_message()) is not None:
                seq, at = struct.unpack_from("<II", m)
                lat = latencies[1 - i]
                assert seq == len(lat) and len(m) == size, "out of order or damaged"
                lat.append(now - at)
        for i, end in enumerate(ends):
            due = end.check(now)
            if touched[i] or (due is not None and due <= now):
                end.flush(now)
                for datagram in end.datagrams():
                    link.send(i, datagram, now / 1000)
            touched[i] = False
        times = [t for t in (a.check(now), b.check(now)) if t is not None]
        times += [s * interval for s in sent if s < count]
        if (arrival := link.next_delivery()) is not None:
            times.append(math.ceil(arrival * 1000 - 1e-6))
        assert times, f"stalled at {now} ms"
        now = max(now + 1, min(times))  # everything due at ``now`` was done
        assert now < count * interval + 60_000, "thin stream did not finish"
    return latencies


@pytest.mark.parametrize("profile", ["lossy", "kcp-sim"])
def test_bundling_cuts_thin_stream_latency_on_lossy_links(arq_cls, profile):
    results = {}
    for bundle in (0, 2):
        a = make(arq_cls, snd_wnd=128, rcv_wnd=128, bundle=bundle)
        b = make(arq_cls, snd_wnd=128, rcv_wnd=128, bundle=bundle)
        link = netem.VirtualLink(netem.load_profile(profile), seed=3)
        fwd, rev = thin_stream(a, b, link, count=500, interval=20)
        lat = fwd + rev
        stats = (a.stats(), b.stats())
        results[bundle] = (sum(lat) / len(lat), max(lat), sum(s["retrans_segs"] for s in stats))
        if bundle:
            assert all(s["bundled_segs"] > 500 for s in stats)
        else:
            assert all(s["bundled_segs"] == 0 for s in stats)
        assert link.stats[0].lost > 10 and link.stats[1].lost > 10
    (mean0, max0, re0), (mean2, max2, re2) = results[0], results[2]
    assert mean2 < 0.8 * mean0 and max2 < max0 / 2, results
    # copies do not stop timers: a copy's ACK often comes after the original's RTO
    assert re2 <= re0, "copies never add retransmissions"
