"""Unit behaviour of the ARQ engine, on every engine (the ``arq_cls`` fixture).

Everything runs in virtual time: each test says what ``now`` is. Expected
datagrams are read back with ``rudp.wire.decode_kcp_segments`` or built by
hand with ``struct``, never with the engine's own encoder.
"""

from __future__ import annotations

import struct

import pytest

from rudp.arq import (
    ERR_CMD,
    ERR_CONV,
    ERR_SHORT,
    ERR_TRUNCATED,
    PROBE_INIT,
    STATS,
)
from rudp.wire import KCP_CMD_ACK, KCP_CMD_PUSH, KCP_CMD_WASK, KCP_CMD_WINS, decode_kcp_segments

CONV = 0x11223344
HDR = struct.Struct("<IBBHIIII")


def segs(datagrams):
    """All segments of a list of datagrams, in order."""
    return [s for d in datagrams for s in decode_kcp_segments(d)]


def raw(cmd, sn=0, una=0, ts=0, wnd=128, frg=0, data=b"", conv=CONV):
    """A hand-built segment."""
    return HDR.pack(conv, cmd, frg, wnd, ts, sn, una, len(data)) + data


def make(cls, **kw):
    kw.setdefault("stream", True)
    return cls(CONV, **kw)


def pump(a, b, now, rounds=1000):
    """Lossless, instant exchange at time ``now`` until both sides are quiet."""
    for _ in range(rounds):
        a.flush(now)
        b.flush(now)
        da, db = a.datagrams(), b.datagrams()
        if not da and not db:
            return
        for d in da:
            b.input(d, now)
        for d in db:
            a.input(d, now)
    raise AssertionError("exchange did not settle")


def transmissions(arq, until, sn=0):
    """Drive ``arq`` alone by its own deadlines; the times it (re)sent PUSH ``sn``."""
    times = []
    now = 0
    while True:
        now = arq.check(now)
        if now is None or now > until:
            return times
        arq.flush(now)
        if any(s.cmd == KCP_CMD_PUSH and s.sn == sn for s in segs(arq.datagrams())):
            times.append(now)


# ---------------------------------------------------------------------- construction


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"mtu": 49}, "mtu"),
        ({"mtu": 70000}, "mtu"),
        ({"snd_wnd": 0}, "snd_wnd"),
        ({"rcv_wnd": 65536}, "rcv_wnd"),
        ({"nodelay": 3}, "nodelay"),
        ({"interval": 0}, "interval"),
        ({"resend": -1}, "resend"),
        ({"congestion": "bbr"}, "congestion"),
        ({"pacing": 1}, "pacing"),
        ({"stream": "yes"}, "stream"),
        ({"rto_min": 0}, "rto_min"),
        ({"rto_min": 500, "rto_max": 400}, "rto_max"),
        ({"fast_limit": 0}, "fast_limit"),
        ({"dead_link": 0}, "dead_link"),
        ({"max_message": 0}, "max_message"),
        ({"snd_wnd": True}, "snd_wnd"),
    ],
)
def test_bad_arguments_name_the_argument(arq_cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        arq_cls(1, **kwargs)


def test_bad_conv(arq_cls):
    with pytest.raises(ValueError, match="conv"):
        arq_cls(2**32)


def test_defaults_and_fresh_state(arq_cls):
    a = arq_cls(7)
    assert (a.snd_wnd, a.rcv_wnd, a.rto, a.srtt, a.rttvar) == (32, 128, 200, 0, 0)
    assert (a.cwnd, a.inflight, a.waitsnd, a.pending_bytes, a.readable) == (1, 0, 0, 0, 0)
    assert a.mss == 1376 and a.rmt_wnd == 128 and not a.dead
    assert list(a.stats()) == list(STATS) and set(a.stats().values()) == {0}
    assert a.check(0) is None, "a fresh engine arms no timer"
    a.flush(0)
    assert a.datagrams() == []


# ---------------------------------------------------------------------- wire format


def test_first_push_is_exactly_kcp_bytes(arq_cls):
    a = make(arq_cls, rcv_wnd=100)
    a.send(b"hello")
    a.flush(1234)
    assert a.datagrams() == [HDR.pack(CONV, 81, 0, 100, 1234, 0, 0, 5) + b"hello"]


def test_stream_mode_fills_the_last_unsent_segment(arq_cls):
    a = make(arq_cls, mtu=100, congestion="none")  # mss 76
    a.send(b"a" * 10)
    a.send(b"b" * 10)
    a.send(b"c" * 70)
    assert a.waitsnd == 2 and a.pending_bytes == 90
    a.flush(0)
    out = segs(a.datagrams())
    assert [len(s.data) for s in out] == [76, 14]
    assert b"".join(s.data for s in out) == b"a" * 10 + b"b" * 10 + b"c" * 70
    assert all(s.frg == 0 for s in out)


def test_message_fragments_count_down(arq_cls):
    a = make(arq_cls, mtu=100, stream=False, snd_wnd=1000, congestion="none")
    a.send(bytes(3 * 76 + 1))
    a.flush(0)
    assert [(s.frg, len(s.data)) for s in segs(a.datagrams())] == [
        (3, 76),
        (2, 76),
        (1, 76),
        (0, 1),
    ]


def test_message_of_more_than_256_fragments_caps_frg_at_255(arq_cls):
    a = make(arq_cls, mtu=100, stream=False, snd_wnd=1000, rcv_wnd=1000, congestion="none")
    a.input(raw(KCP_CMD_WINS, wnd=1000), 0)  # let it send them all at once
    a.send(bytes(300 * 76))
    a.flush(0)
    frgs = [s.frg for s in segs(a.datagrams())]
    assert frgs == [min(299 - i, 255) for i in range(300)]


def test_empty_message_is_one_segment(arq_cls):
    a = make(arq_cls, stream=False)
    b = make(arq_cls, stream=False)
    a.send(b"")
    a.send(b"x")
    assert a.waitsnd == 2
    pump(a, b, 0)
    assert b.recv_message() == b""
    assert b.recv_message() == b"x"
    assert b.recv_message() is None


def test_datagrams_never_exceed_mtu_and_pack_acks(arq_cls):
    a = make(arq_cls, mtu=200, snd_wnd=64, rcv_wnd=64, congestion="none")
    b = make(arq_cls, mtu=200, snd_wnd=64, rcv_wnd=64, congestion="none")
    a.send(bytes(176 * 40))
    a.flush(0)
    out = a.datagrams()
    assert len(out) == 40 and all(len(d) <= 200 for d in out)
    for d in out:
        b.input(d, 1)
    b.flush(1)
    acks = b.datagrams()
    assert all(len(d) <= 200 for d in acks)
    assert len(acks) == 5, "8 ACKs of 24 bytes fit in a 200-byte datagram"
    assert [s.sn for s in segs(acks)] == list(range(40))
    assert all(s.cmd == KCP_CMD_ACK and s.una == 40 and s.ts == 0 for s in segs(acks))


# ---------------------------------------------------------------------- acknowledgement


def test_ack_and_una_release_the_flight(arq_cls):
    a = make(arq_cls, congestion="none")
    b = make(arq_cls)
    a.send(bytes(5000))
    a.flush(0)
    assert a.inflight == 4 and a.pending_bytes == 5000
    for d in a.datagrams()[:2]:
        b.input(d, 0)
    b.flush(0)
    (ack,) = b.datagrams()
    got = segs([ack])
    assert [(s.cmd, s.sn, s.una, s.wnd) for s in got] == [(82, 0, 2, 126), (82, 1, 2, 126)]
    assert a.input(ack, 10) == 2
    assert a.inflight == 2 and a.pending_bytes == 5000 - 2 * 1376
    # una alone (carried by any segment) acknowledges everything below it
    assert a.input(raw(KCP_CMD_WINS, una=4), 10) == 1
    assert a.inflight == 0 and a.pending_bytes == 0 and a.waitsnd == 0
    assert a.check(10) is None


def test_duplicate_push_is_acked_again_and_counted(arq_cls):
    b = make(arq_cls)
    seg = raw(KCP_CMD_PUSH, sn=0, ts=5, data=b"xy")
    assert b.input(seg, 0) == 1
    assert b.input(seg, 1) == 1
    b.flush(1)
    assert [(s.cmd, s.sn, s.ts) for s in segs(b.datagrams())] == [(82, 0, 5), (82, 0, 5)]
    assert b.recv() == b"xy"
    assert b.stats()["repeat_segs"] == 1
    # a retransmission of something already delivered is acknowledged too
    b.input(seg, 2)
    b.flush(2)
    assert [(s.cmd, s.sn, s.una) for s in segs(b.datagrams())] == [(82, 0, 1)]
    assert b.stats()["repeat_segs"] == 2


def test_out_of_order_data_waits_for_the_gap(arq_cls):
    b = make(arq_cls)
    b.input(raw(KCP_CMD_PUSH, sn=1, data=b"world"), 0)
    assert b.readable == 0 and b.recv() == b""
    b.input(raw(KCP_CMD_PUSH, sn=0, data=b"hello "), 0)
    assert b.readable == 11 and b.recv(4) == b"hell" and b.recv() == b"o world"


# ---------------------------------------------------------------------- RTT and RTO


def test_rtt_estimate_follows_the_rfc6298_style_formula(arq_cls):
    a = make(arq_cls, interval=100)  # rto_min 100
    b = make(arq_cls)
    a.send(b"x")
    a.flush(0)
    b.input(a.datagrams()[0], 0)
    b.flush(0)
    a.input(b.datagrams()[0], 50)
    assert (a.srtt, a.rttvar, a.rto) == (50, 25, 150)
    a.send(b"y")
    a.flush(100)
    b.input(a.datagrams()[0], 100)
    b.flush(100)
    a.input(b.datagrams()[0], 170)  # rtt 70
    assert (a.srtt, a.rttvar) == ((7 * 50 + 70) // 8, (3 * 25 + 20) // 4)
    assert a.rto == 52 + max(100, 4 * 23)


def test_rto_is_clamped_to_rto_min_and_rto_max(arq_cls):
    a = make(arq_cls, nodelay=1, interval=10)
    a.send(b"x")
    a.flush(0)
    a.input(raw(KCP_CMD_ACK, sn=0, ts=0, una=1), 1)
    assert a.rto == 30, "1 ms RTT + interval 10 is clamped up to rto_min 30"
    c = make(arq_cls, rto_max=500)
    c.send(b"x")
    c.flush(0)
    c.input(raw(KCP_CMD_ACK, sn=0, ts=0, una=1), 5000)
    assert c.rto == 500


def test_rtt_sample_false_does_not_feed_the_estimator(arq_cls):
    a = make(arq_cls)
    a.send(b"x")
    a.flush(0)
    assert a.input(raw(KCP_CMD_ACK, sn=0, ts=0, una=1), 80, rtt_sample=False) == 1
    assert (a.srtt, a.rto, a.inflight) == (0, 200, 0)


def test_implausible_ack_timestamps_are_not_rtt_samples(arq_cls):
    a = make(arq_cls)
    a.send(b"x")
    a.flush(100)
    a.send(b"y")
    a.flush(100)
    a.input(raw(KCP_CMD_ACK, sn=0, ts=500, una=0), 120)  # from the future
    a.input(raw(KCP_CMD_ACK, sn=1, ts=200, una=0), 300)  # newer than its transmission
    assert (a.srtt, a.rto, a.inflight) == (0, 200, 0)


def test_backoff_is_exactly_1_5x_with_nodelay_and_capped(arq_cls):
    a = make(arq_cls, nodelay=1, rto_max=1000)
    a.send(b"x")
    # rto 200 -> 300 -> 450 -> 675 -> 1000 (1012 capped) -> 1000
    assert transmissions(a, 5000) == [0, 200, 500, 950, 1625, 2625, 3625, 4625]
    assert a.stats()["lost_segs"] == 7 and a.stats()["retrans_segs"] == 7


def test_backoff_is_exactly_2x_without_nodelay_and_capped(arq_cls):
    a = make(arq_cls, nodelay=0, rto_max=1000)
    a.send(b"x")
    # first timer: rto 200 plus KCP's rto/8 slack; then 400, 800, 1000 (capped)
    assert transmissions(a, 4000) == [0, 225, 625, 1425, 2425, 3425]


def test_backoff_uses_the_measured_rto(arq_cls):
    a = make(arq_cls, nodelay=1, interval=10)
    a.send(b"x")
    a.flush(0)
    a.input(raw(KCP_CMD_ACK, sn=0, ts=0, una=1), 40)
    rto = a.rto
    assert rto == 40 + max(10, 4 * 20)
    a.send(b"y")
    a.flush(1000)
    a.datagrams()
    assert a.check(1000) == 1000 + rto
    a.flush(1000 + rto)
    assert a.check(1000 + rto) == 1000 + rto + rto * 3 // 2


# ---------------------------------------------------------------------- fast retransmit


def five_in_flight(cls, **kw):
    a = make(cls, nodelay=1, resend=2, congestion="none", **kw)
    b = make(cls)
    a.send(bytes(5 * a.mss))
    a.flush(0)
    out = a.datagrams()
    assert len(out) == 5
    acks = []
    for d in out[1:]:  # segment 0 is lost
        b.input(d, 1)
        b.flush(1)
        acks.append(b.datagrams()[0])
    return a, acks


def test_fast_retransmit_after_resend_skipping_acks(arq_cls):
    a, acks = five_in_flight(arq_cls)
    a.input(acks[0], 2)
    assert a.check(2) > 2, "one skip is not enough with resend=2"
    a.input(acks[1], 2)
    assert a.check(2) == 2
    a.flush(2)
    assert [s.sn for s in segs(a.datagrams())] == [0]
    assert a.stats()["fast_retrans_segs"] == 1 and a.stats()["lost_segs"] == 0


def test_fast_retransmit_counts_only_acks_of_later_transmissions(arq_cls):
    a, acks = five_in_flight(arq_cls)
    a.input(acks[0], 2)
    a.input(acks[1], 2)
    a.flush(3)  # segment 0 retransmitted at t=3
    a.datagrams()
    # ACKs of segments 3 and 4, sent at t=0, say nothing about the copy sent at t=3
    a.input(acks[2], 4)
    a.input(acks[3], 4)
    assert a.check(4) == 3 + 200
    assert a.stats()["fast_retrans_segs"] == 1


def test_fast_retransmit_is_limited_per_segment(arq_cls):
    a = make(arq_cls, nodelay=1, resend=1, fast_limit=3, congestion="none", snd_wnd=256)
    b = make(arq_cls, rcv_wnd=256)
    for now in range(1, 30):
        a.send(bytes(a.mss))
        a.flush(now)
        for d in a.datagrams():
            if not any(s.sn == 0 for s in decode_kcp_segments(d)):
                b.input(d, now)
        b.flush(now)
        for d in b.datagrams():
            a.input(d, now)
    st = a.stats()
    assert st["fast_retrans_segs"] == 3 and st["lost_segs"] == 0
    assert a.check(29) == 5 + 200  # only the timer is left: last fast retransmit at t=5


def test_ack_of_the_oldest_segment_without_una_moves_on(arq_cls):
    """An ACK that removes the first unacknowledged segment (its una lagging behind)
    moves snd_una past it; skip counting must not walk the whole sequence space."""
    a = make(arq_cls, nodelay=1, resend=2, congestion="none")
    a.send(bytes(3 * a.mss))
    a.flush(0)
    a.datagrams()
    assert a.input(raw(KCP_CMD_ACK, sn=0, ts=0, una=0), 1) == 1
    assert a.input(raw(KCP_CMD_ACK, sn=2, ts=0, una=0), 1) == 1
    assert a.inflight == 1 and a.check(1) == 200


def test_no_fast_retransmit_when_resend_is_zero(arq_cls):
    _, acks = five_in_flight(arq_cls)
    c = make(arq_cls, nodelay=1, resend=0, congestion="none")
    c.send(bytes(5 * c.mss))
    c.flush(0)
    c.datagrams()
    for ack in acks:
        c.input(ack, 2)
    assert c.check(2) == 200 and c.stats()["fast_retrans_segs"] == 0


# ---------------------------------------------------------------------- windows


def test_send_window_limits_the_flight(arq_cls):
    a = make(arq_cls, snd_wnd=3, congestion="none")
    a.send(bytes(10 * a.mss))
    a.flush(0)
    assert len(a.datagrams()) == 3 and a.inflight == 3 and a.waitsnd == 10


def test_remote_window_limits_the_flight(arq_cls):
    a = make(arq_cls, snd_wnd=100, congestion="none")
    a.input(raw(KCP_CMD_WINS, wnd=5), 0)
    assert a.rmt_wnd == 5
    a.send(bytes(10 * a.mss))
    a.flush(0)
    assert a.inflight == 5


def test_every_segment_advertises_the_free_receive_window(arq_cls):
    b = make(arq_cls, rcv_wnd=10, congestion="none")
    for sn in range(3):
        b.input(raw(KCP_CMD_PUSH, sn=sn, data=b"z"), 0)
    b.send(b"q")
    b.flush(0)
    assert {s.wnd for s in segs(b.datagrams())} == {7}
    b.recv()
    b.send(b"r")
    b.flush(1)
    assert {s.wnd for s in segs(b.datagrams())} == {10}


def zero_window(cls):
    """b (window 4) stops reading; a has more to send than fits."""
    a = make(cls, snd_wnd=32, congestion="none")
    b = make(cls, rcv_wnd=4)
    a.input(raw(KCP_CMD_WINS, wnd=4), 0)
    data = bytes(range(256)) * 40
    a.send(data)
    for now in range(0, 20):
        pump(a, b, now)
    assert b.readable == 4 * a.mss and a.rmt_wnd == 0 and a.inflight == 0
    return a, b, data


def test_zero_window_probe_interval_grows(arq_cls):
    a, _, _ = zero_window(arq_cls)
    # the probe timer started at the flush that learnt of the zero window (t=0)
    probes = []
    now = 19
    while len(probes) < 4:
        now = a.check(now)
        a.flush(now)
        assert [s.cmd for s in segs(a.datagrams())] == [KCP_CMD_WASK]
        probes.append(now)
    assert PROBE_INIT == 500
    assert probes == [500, 500 + 750, 500 + 750 + 1125, 500 + 750 + 1125 + 1687]
    assert a.stats()["probe_segs"] == 4


def test_probe_is_answered_with_the_window(arq_cls):
    a, b, _ = zero_window(arq_cls)
    now = a.check(19)
    a.flush(now)
    for d in a.datagrams():
        b.input(d, now)
    assert b.check(now) == now
    b.flush(now)
    (wins,) = segs(b.datagrams())
    assert (wins.cmd, wins.wnd) == (KCP_CMD_WINS, 0)


def test_reading_reopens_the_window_at_once(arq_cls):
    a, b, data = zero_window(arq_cls)
    got = b.recv(100)
    assert b.check(20) is None, "still less than a segment free: nothing to announce"
    got += b.recv()
    assert b.check(20) == 20, "the window reopened: tell the peer now"
    b.flush(20)
    (wins,) = segs(b.datagrams())
    assert (wins.cmd, wins.wnd) == (KCP_CMD_WINS, 4)
    a.input(wins.encode(), 20)
    assert a.check(20) == 20
    now = 20
    while len(got) < len(data):
        pump(a, b, now)
        got += b.recv()
        now += 1
    assert got == data
    assert now < 20 + PROBE_INIT, "the transfer never waited for a probe"
    assert a.stats()["probe_segs"] == 0


def test_message_larger_than_the_receive_window_gets_through(arq_cls):
    a = make(arq_cls, stream=False, mtu=100, snd_wnd=16, congestion="none")
    b = make(arq_cls, stream=False, mtu=100, rcv_wnd=8)
    big = bytes(range(256)) * 120  # 30720 bytes: 405 fragments of 76 bytes
    a.send(big)
    a.send(b"after")
    now = 0
    got = []
    while len(got) < 2 and now < 2000:
        pump(a, b, now)
        while (m := b.recv_message()) is not None:
            got.append(m)
        now += 1
    assert got == [big, b"after"]
    assert b.stats()["oversize_messages"] == 0


def test_oversize_message_is_discarded_and_the_next_one_delivered(arq_cls):
    a = make(arq_cls, stream=False, mtu=100, congestion="none")
    b = make(arq_cls, stream=False, mtu=100, max_message=200)
    a.send(bytes(500))
    a.send(b"fine")
    for now in range(10):
        pump(a, b, now)
    assert b.recv_message() == b"fine" and b.recv_message() is None
    assert b.stats()["oversize_messages"] == 1


def test_send_rejects_a_message_over_max_message(arq_cls):
    a = make(arq_cls, stream=False, max_message=10)
    with pytest.raises(ValueError, match="max_message"):
        a.send(bytes(11))
    assert a.waitsnd == 0


def test_read_calls_of_the_wrong_mode_raise(arq_cls):
    with pytest.raises(ValueError, match="recv_message"):
        make(arq_cls, stream=True).recv_message()
    with pytest.raises(ValueError, match="recv"):
        make(arq_cls, stream=False).recv()


# ---------------------------------------------------------------------- congestion control


def round_trip(a, b, now, drop=()):
    """One flush of ``a``, its datagrams (minus the indexes in ``drop``) to ``b``, ``b``'s
    answer back; returns the PUSH sns ``a`` sent."""
    a.flush(now)
    out = a.datagrams()
    for i, d in enumerate(out):
        if i not in drop:
            b.input(d, now)
    b.flush(now)
    for d in b.datagrams():
        a.input(d, now)
    return [s.sn for s in segs(out) if s.cmd == KCP_CMD_PUSH]


def test_reno_starts_at_one_segment_and_grows_per_ack(arq_cls):
    a = make(arq_cls, snd_wnd=64, congestion="reno")
    b = make(arq_cls)
    a.send(bytes(20 * a.mss))
    assert round_trip(a, b, 0) == [0]
    assert a.cwnd == 2, "slow start: one more segment per acknowledged segment"
    assert round_trip(a, b, 1) == [1, 2]
    # ssthresh starts at 2 (KCP), so both ACKs (one datagram) grow in congestion
    # avoidance, KCP's step once per segment: incr (bytes) 2752 -> 2752 + 1376**2 // 2752
    # + 1376 // 16 = 3526 -> 3526 + 536 + 86 = 4148 >= 3 * 1376: cwnd = ceil(4148 / 1376)
    assert a.cwnd == 4
    assert round_trip(a, b, 2) == [3, 4, 5, 6]


def test_reno_growth_does_not_depend_on_ack_packing(arq_cls):
    """Four ACKs in one datagram grow the window as much as four datagrams of one."""
    cwnds = []
    for packed in (True, False):
        a = make(arq_cls, snd_wnd=64, congestion="reno")
        a.input(raw(KCP_CMD_WINS, wnd=128), 0)
        a.send(bytes(40 * a.mss))
        for now in range(4):  # grow to 4 segments in flight
            a.flush(now)
            sent = [s.sn for s in segs(a.datagrams())]
            for sn in sent:
                a.input(raw(KCP_CMD_ACK, sn=sn, ts=now, una=0), now)
        a.flush(4)
        sent = [s.sn for s in segs(a.datagrams())]
        acks = [raw(KCP_CMD_ACK, sn=sn, ts=4, una=0) for sn in sent]
        for d in [b"".join(acks)] if packed else acks:
            a.input(d, 5)
        cwnds.append(a.cwnd)
    assert cwnds[0] == cwnds[1] > 4


def grown_reno(cls, target):
    a = make(cls, snd_wnd=64, congestion="reno", nodelay=1, resend=2)
    b = make(cls, rcv_wnd=256)
    a.send(bytes(1000 * a.mss))
    now = 0
    while a.cwnd < target:
        round_trip(a, b, now)
        now += 1
    return a, b, now


def test_reno_timeout_collapses_to_one(arq_cls):
    a, _, now = grown_reno(arq_cls, 8)
    a.flush(now)
    assert len(a.datagrams()) == a.cwnd  # all lost
    while a.stats()["lost_segs"] == 0:
        now = a.check(now)
        a.flush(now)
        a.datagrams()
    assert a.cwnd == 1


def test_reno_fast_retransmit_halves_to_the_flight(arq_cls):
    a, b, now = grown_reno(arq_cls, 8)
    k = a.cwnd
    sent = round_trip(a, b, now, drop={0})
    assert len(sent) == k and a.inflight == 1
    a.flush(now)
    assert [s.sn for s in segs(a.datagrams())] == sent[:1]
    assert a.stats()["fast_retrans_segs"] == 1
    # ssthresh = (snd_nxt - snd_una) / 2, cwnd = ssthresh + resend
    assert a.cwnd == max(k // 2, 2) + 2


def test_no_congestion_control_sends_the_whole_window(arq_cls):
    a = make(arq_cls, snd_wnd=64, congestion="none")
    a.send(bytes(100 * a.mss))
    a.flush(0)
    assert a.inflight == 64 and a.cwnd == 64


# ---------------------------------------------------------------------- pacing


@pytest.mark.parametrize("rtt", [0, 1, 2])
def test_pacing_does_not_throttle_a_loopback_path(arq_cls, rtt):
    """Loopback RTTs measure 0-2 ms (srtt is floored at 1 ms) while many round trips
    fit in one millisecond: pacing must let the window run at the ACK clock."""
    a = make(arq_cls, snd_wnd=32, congestion="none", pacing=True, nodelay=1)
    b = make(arq_cls, rcv_wnd=256)
    for i in range(3):
        a.send(b"x")
        a.flush(i * 10)
        a.datagrams()
        a.input(raw(KCP_CMD_ACK, sn=i, ts=i * 10, una=i + 1, wnd=256), i * 10 + rtt)
    b._start_sequence(0, 3)
    assert 0 < a.srtt <= 2 or rtt == 0
    a.send(bytes(500 * a.mss))
    got = 0
    for _ in range(100):  # round trips within the same millisecond
        a.flush(100)
        for d in a.datagrams():
            b.input(d, 100)
        b.flush(100)
        for d in b.datagrams():
            a.input(d, 100)
        got += len(b.recv())
    assert got == 500 * a.mss


def test_pacing_spreads_a_large_window_over_the_rtt(arq_cls):
    a = make(arq_cls, snd_wnd=128, congestion="none", pacing=True, nodelay=1)
    a.send(b"x")
    a.flush(0)
    a.datagrams()
    a.input(raw(KCP_CMD_ACK, sn=0, ts=0, una=1, wnd=128), 100)  # srtt 100
    a.send(bytes(128 * a.mss))
    now = 100
    a.flush(now)
    burst = len(a.datagrams())
    assert 1 <= burst <= 4
    assert a.check(now) > now, "the next release is in the future"
    sent, released = burst, [now]
    while sent < 128:
        now = a.check(now)
        a.flush(now)
        n = len(a.datagrams())
        assert n >= 1, "check() promised a release"
        sent += n
        released.append(now)
    # 128 segments per 100 ms at gain 1.25: about 80 ms, never all at once
    assert 60 <= released[-1] - 100 <= 110


def test_without_pacing_the_window_leaves_at_once(arq_cls):
    a = make(arq_cls, snd_wnd=128, congestion="none", nodelay=1)
    a.send(b"x")
    a.flush(0)
    a.datagrams()
    a.input(raw(KCP_CMD_ACK, sn=0, ts=0, una=1, wnd=128), 100)
    a.send(bytes(128 * a.mss))
    a.flush(100)
    assert len(a.datagrams()) == 128


# ---------------------------------------------------------------------- dead link, idle


def test_dead_link_after_dead_link_transmissions(arq_cls):
    a = make(arq_cls, nodelay=1, dead_link=4)
    a.send(b"x")
    assert transmissions(a, 10**6) == [0, 200, 500, 950]
    assert a.dead
    assert a.check(10**6) is None
    a.send(b"more")
    a.flush(10**6)
    assert a.datagrams() == []


def test_check_is_none_when_idle(arq_cls):
    a = make(arq_cls)
    b = make(arq_cls)
    a.send(bytes(3000))
    assert a.check(0) == 0
    pump(a, b, 0)
    assert b.recv() == bytes(3000)
    assert a.check(0) is None and b.check(0) is None
    b.input(raw(KCP_CMD_PUSH, sn=1, data=b"x"), 1)
    assert b.check(1) == 1, "a pending ACK is due at once"


def test_check_answers_in_the_callers_scale_across_wraparound(arq_cls):
    a = make(arq_cls, nodelay=1)
    b = make(arq_cls)
    base = 2**32 - 50  # virtual clock about to wrap as uint32
    a.send(b"x")
    a.flush(base)
    a.datagrams()
    assert a.check(base) == base + 200
    assert a.check(base + 100) == base + 200
    data = bytes(range(256)) * 100
    a.send(data)
    got = b""
    now = base + 200
    while len(got) < len(data) + 1:
        pump(a, b, now)
        got += b.recv()
        now += 7
    assert got == b"x" + data


# ---------------------------------------------------------------------- bad input


def test_rejected_datagrams_change_nothing(arq_cls):
    b = make(arq_cls)
    good = raw(KCP_CMD_PUSH, sn=0, data=b"ok")
    cases = {
        b"": ERR_SHORT,
        good[:23]: ERR_SHORT,
        raw(KCP_CMD_PUSH, conv=CONV + 1, data=b"x"): ERR_CONV,
        good + raw(KCP_CMD_ACK, conv=5): ERR_CONV,
        good[:-1]: ERR_TRUNCATED,
        good + b"\0" * 5: ERR_TRUNCATED,
        raw(99): ERR_CMD,
        good + raw(80): ERR_CMD,
    }
    for i, (datagram, code) in enumerate(cases.items()):
        assert b.input(datagram, 0) == code
        assert b.stats()["in_errors"] == i + 1
    assert b.readable == 0 and b.check(0) is None and b.stats()["in_segs"] == 0
    assert b.input(good, 0) == 1 and b.recv() == b"ok"


def test_segments_no_peer_sends_are_dropped_and_counted(arq_cls):
    a = make(arq_cls)
    a.send(bytes(3000))
    a.flush(0)
    a.datagrams()
    before = a.pending_bytes
    assert a.input(raw(KCP_CMD_ACK, sn=0, una=1000), 1) == 0, "una beyond snd_nxt"
    assert a.input(raw(KCP_CMD_ACK, sn=5, una=0), 1) == 0, "ACK of a never-sent sn"
    assert a.input(raw(KCP_CMD_PUSH, sn=70000, data=b"x"), 1) == 0, "sn far outside any window"
    assert a.input(raw(KCP_CMD_PUSH, sn=2**32 - 70000, data=b"x"), 1) == 0
    assert a.stats()["in_errors"] == 4 and a.pending_bytes == before
    assert a.rmt_wnd == 128 and a.readable == 0


def test_push_beyond_the_window_is_dropped_unacknowledged(arq_cls):
    b = make(arq_cls, rcv_wnd=8)
    assert b.input(raw(KCP_CMD_PUSH, sn=8, data=b"x"), 0) == 1
    assert b.stats()["out_of_window"] == 1 and b.check(0) is None
    assert b.buffered_bytes == 0


def test_garbage_between_real_traffic_loses_nothing(arq_cls):
    a = make(arq_cls, congestion="none")
    b = make(arq_cls)
    data = bytes(range(256)) * 200
    a.send(data)
    got = b""
    now = 0
    junk = [b"\xff" * 30, raw(KCP_CMD_ACK, sn=9999), raw(KCP_CMD_PUSH, sn=3, data=b"EVIL" * 3)[:-2]]
    while len(got) < len(data):
        a.flush(now)
        b.flush(now)
        for d in a.datagrams():
            b.input(junk[now % 3], now)
            b.input(d, now)
        for d in b.datagrams():
            a.input(junk[(now + 1) % 3], now)
            a.input(d, now)
        got += b.recv()
        now += 1
    assert got == data
