"""The netem state machine and the virtual-time link: semantics, statistics, determinism.

Statistical checks use fixed seeds (so they are deterministic) and tolerances
of about 4 standard deviations of the quantity measured (so they hold for any
seed, and fail when the mechanism is wrong).
"""

from __future__ import annotations

import itertools
import math
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import netem
from netem.distributions import SCALE, table
from netem.model import UDP_FRAME_OVERHEAD, NetemQueue
from netem.profile import Impairment, Profile, Slot

MS = 1_000_000  # ns


def run(imp: Impairment, n: int, spacing: float = 0.001, seed: int = 1, size: int = 8):
    """Send n numbered packets ``spacing`` s apart; return (arrivals, link).

    arrivals: list of (seq, one-way delay s, payload) in delivery order.
    """
    link = netem.VirtualLink(Profile("t", forward=imp, reverse=imp), seed=seed)
    for i in range(n):
        link.send(0, i.to_bytes(4, "big") + bytes(size - 4), i * spacing)
    out = []
    for t, direction, data in link.receive_timed(n * spacing + 600):
        assert direction == 0
        seq = int.from_bytes(data[:4], "big")
        out.append((seq, t - seq * spacing, data))
    return out, link


def binomial_ok(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def inversions(seqs: list[int]) -> int:
    return sum(1 for a, b in itertools.pairwise(seqs) if b < a)


def test_constant_delay_is_exact_and_in_order():
    arrivals, link = run(Impairment(delay=0.025), 500)
    assert [s for s, _, _ in arrivals] == list(range(500))
    assert {round(d, 9) for _, d, _ in arrivals} == {0.025}
    assert link.stats[0].delivered == 500


def test_random_loss_rate():
    n = 20000
    arrivals, link = run(Impairment(delay=0.01, loss=0.10), n)
    lost = n - len(arrivals)
    assert binomial_ok(lost, n, 0.10)
    assert link.stats[0].lost == lost


def test_uniform_jitter_mean_spread_and_bounds():
    arrivals, _ = run(Impairment(delay=0.046, jitter=0.016), 20000, spacing=0.02)
    delays = [d for _, d, _ in arrivals]
    assert min(delays) >= 0.030 and max(delays) < 0.062
    assert statistics.mean(delays) == pytest.approx(0.046, abs=0.0005)
    assert statistics.pstdev(delays) == pytest.approx(0.016 / math.sqrt(3), rel=0.03)


@pytest.mark.parametrize("dist", ["normal", "pareto", "paretonormal"])
def test_table_distributions_have_the_profile_mean_and_spread(dist):
    imp = Impairment(delay=0.100, jitter=0.020, distribution=dist)
    arrivals, _ = run(imp, 20000, spacing=0.5)  # far apart: no reordering effects
    delays = [d for _, d, _ in arrivals]
    # The tables are in units of sigma/8192; pareto's is clipped at +4 sigma, so its
    # mean and spread are the table's own, not exactly (0, 1).
    values = [v / SCALE for v in table(dist)]
    expected_mean = 0.100 + 0.020 * statistics.mean(values)
    expected_sd = 0.020 * statistics.pstdev(values)
    assert statistics.mean(delays) == pytest.approx(expected_mean, abs=4 * expected_sd / 141)
    assert statistics.pstdev(delays) == pytest.approx(expected_sd, rel=0.05)
    assert abs(expected_mean - 0.100) < 0.002
    if dist != "normal":  # right-skewed
        assert statistics.median(delays) < statistics.mean(delays)


def test_jitter_without_rate_reorders_like_netems_time_ordered_queue():
    arrivals, _ = run(Impairment(delay=0.005, jitter=0.002), 5000, spacing=0.001)
    seqs = [s for s, _, _ in arrivals]
    assert inversions(seqs) > 500  # packets 1 ms apart with ±2 ms jitter swap often
    delays = [d for _, d, _ in arrivals]
    assert max(delays) < 0.007  # each packet still gets its own delay


def test_a_rate_keeps_a_jittered_queue_fifo():
    imp = Impairment(delay=0.005, jitter=0.002, rate=10**10)
    arrivals, _ = run(imp, 5000, spacing=0.001)
    assert [s for s, _, _ in arrivals] == list(range(5000))
    delays = [d for _, d, _ in arrivals]
    assert statistics.mean(delays) > 0.005  # waiting behind slower packets adds delay


def test_rate_serialises_packets_with_frame_overhead():
    rate = 1_000_000  # bit/s
    imp = Impairment(rate=rate, packet_overhead=4)
    arrivals, _ = run(imp, 100, spacing=0.0, size=1000)  # a burst of 100 packets at t=0
    per_packet = (1000 + UDP_FRAME_OVERHEAD + 4) * 8 / rate
    times = [d for _, d, _ in arrivals]
    assert times[0] == pytest.approx(per_packet, abs=1e-9)
    assert times[-1] == pytest.approx(100 * per_packet, abs=1e-6)


def test_rate_with_cells():
    imp = Impairment(rate=8_000_000, cell_size=48, cell_overhead=5)  # 1 MB/s, ATM-like
    arrivals, _ = run(imp, 1, size=58)  # 58 + 42 = 100 bytes -> 3 cells of 53 bytes
    assert arrivals[0][1] == pytest.approx(3 * 53 / 1e6, abs=1e-9)


def test_limit_tail_drops_a_burst():
    imp = Impairment(rate=1_000_000, limit=100)
    arrivals, link = run(imp, 300, spacing=0.0, size=1000)
    assert len(arrivals) == 100
    assert [s for s, _, _ in arrivals] == list(range(100))  # the tail was dropped
    assert link.stats[0].overlimit == 200


def test_gilbert_elliott_loss_rate_and_burst_lengths():
    n = 100_000
    imp = netem.load_profile("burst").forward
    arrivals, _ = run(imp, n, spacing=0.0001)
    received = {s for s, _, _ in arrivals}
    bursts, run_length = [], 0
    for i in range(n):
        if i in received:
            if run_length:
                bursts.append(run_length)
            run_length = 0
        else:
            run_length += 1
    loss = 1 - len(received) / n
    assert loss == pytest.approx(0.01 / 0.21, abs=0.006)
    # The bad state lasts geometric(r = 20%) packets, all lost: mean burst 5
    # (two bad spells can touch, so allow a little above).
    assert statistics.mean(bursts) == pytest.approx(5.0, rel=0.08)


def test_gilbert_elliott_partial_loss_in_bad_state():
    # 1-h = 50%: half the packets in the bad state are lost; 1-k = 1% in the good one.
    imp = Impairment(loss_gemodel=(0.05, 0.25, 0.5, 0.01))
    arrivals, _ = run(imp, 50_000)
    bad = 0.05 / 0.30
    expected = bad * 0.5 + (1 - bad) * 0.01
    assert 1 - len(arrivals) / 50_000 == pytest.approx(expected, abs=0.01)


def test_four_state_model_stationary_loss():
    # p13=5%, p31=40%, p32=10%, p23=20%, p14=1% (tc order: p13 p31 p32 p23 p14)
    p13, p31, p32, p23, p14 = 0.05, 0.40, 0.10, 0.20, 0.01
    imp = Impairment(loss_state=(p13, p31, p32, p23, p14))
    n = 100_000
    arrivals, _ = run(imp, n, spacing=0.0001)
    # Stationary distribution of the chain (1 gap-tx, 2 burst-tx, 3 burst-loss, 4 isolated loss)
    # by power iteration.
    pi = [1.0, 0.0, 0.0, 0.0]
    for _ in range(2000):
        g, b, lb, li = pi
        pi = [
            g * (1 - p13 - p14) + lb * p31 + li,
            b * (1 - p23) + lb * p32,
            g * p13 + b * p23 + lb * (1 - p31 - p32),
            g * p14,
        ]
    expected = pi[2] + pi[3]
    assert 1 - len(arrivals) / n == pytest.approx(expected, abs=0.01)


def test_loss_state_with_only_p13_is_bernoulli():
    imp = Impairment.from_tc_args("loss state 7%")
    arrivals, _ = run(imp, 20000)
    assert binomial_ok(20000 - len(arrivals), 20000, 0.07)


def test_correlated_loss_behaves_like_netem_not_like_its_nominal_rate():
    # netem's correlation averages the uniform draws, which shrinks their spread:
    # with 10% loss and 50% correlation far fewer than 10% of packets are lost.
    arrivals, _ = run(Impairment(loss=0.10, loss_correlation=0.5), 20000)
    loss = 1 - len(arrivals) / 20000
    assert 0 < loss < 0.05


def test_duplication_rate_and_identical_copies():
    n = 20000
    arrivals, link = run(Impairment(delay=0.01, duplicate=0.05), n)
    seqs = [s for s, _, _ in arrivals]
    extra = len(seqs) - len(set(seqs))
    assert binomial_ok(extra, n, 0.05)
    assert link.stats[0].duplicated == extra
    by_seq: dict[int, set[bytes]] = {}
    for s, _, data in arrivals:
        by_seq.setdefault(s, set()).add(data)
    assert all(len(v) == 1 for v in by_seq.values())


def test_a_packet_chosen_to_be_duplicated_and_lost_arrives_once():
    arrivals, link = run(Impairment(loss=1.0, duplicate=1.0), 100)
    assert [s for s, _, _ in arrivals] == list(range(100))
    assert link.stats[0].duplicated == 0


def test_duplicates_get_their_own_loss_draw():
    n = 20000
    arrivals, _ = run(Impairment(loss=0.5, duplicate=1.0), n)
    # Half the originals draw a loss, which only cancels the copy (1 delivered); the
    # other half are kept and their copy faces the loss again (1.5): 1.25 per packet.
    assert len(arrivals) / n == pytest.approx(1.25, abs=0.03)


def test_corruption_flips_exactly_one_bit():
    n = 4000
    arrivals, link = run(Impairment(corrupt=0.10), n, size=64)
    assert len(arrivals) == n  # no delay, no loss: in order, so position = sequence
    flipped = 0
    for seq, (_, _, data) in enumerate(arrivals):
        original = seq.to_bytes(4, "big") + bytes(60)
        diff = sum(bin(a ^ b).count("1") for a, b in zip(data, original, strict=False))
        assert diff in (0, 1)
        flipped += diff
    assert flipped == link.stats[0].corrupted
    assert binomial_ok(flipped, n, 0.10)


def test_reorder_with_gap_sends_every_fifth_packet_at_once():
    arrivals, link = run(Impairment.from_tc_args("delay 10ms reorder 100% gap 5"), 50)
    immediate = sorted(s for s, d, _ in arrivals if abs(d) < 1e-9)
    assert immediate == list(range(4, 50, 5))
    assert all(round(d, 9) == 0.010 for s, d, _ in arrivals if s not in immediate)
    assert link.stats[0].reordered == 10


def test_reorder_probability():
    n = 20000
    arrivals, _ = run(Impairment.from_tc_args("delay 10ms reorder 25%"), n)
    immediate = sum(1 for _, d, _ in arrivals if abs(d) < 1e-9)
    assert binomial_ok(immediate, n, 0.25)
    seqs = [s for s, _, _ in arrivals]
    assert inversions(seqs) > 0


def test_slots_release_packets_in_bursts():
    imp = Impairment(slot=Slot(min_delay=0.010, max_delay=0.010, packets=3))
    arrivals, _ = run(imp, 200, spacing=0.001)
    times = sorted({round(seq * 0.001 + d, 9) for seq, d, _ in arrivals})
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.010 - 1e-9  # nothing between slots
    per_slot = statistics.mean(
        sum(1 for s, d, _ in arrivals if round(s * 0.001 + d, 9) == t) for t in times
    )
    assert 2.0 <= per_slot <= 3.0  # at most 3 per slot
    assert len(arrivals) == 200


def test_directions_are_independent():
    profile = Profile("asym", forward=Impairment(delay=0.010), reverse=Impairment(delay=0.030))
    link = netem.VirtualLink(profile, seed=3)
    link.send(0, b"f", 0.0)
    link.send(1, b"r", 0.0)
    assert link.next_delivery() == pytest.approx(0.010)
    assert link.receive(0.009) == []
    assert link.receive(0.010) == [(0, b"f")]
    assert link.next_delivery() == pytest.approx(0.030)
    assert link.receive(1.0) == [(1, b"r")]
    assert link.next_delivery() is None


def test_receive_merges_directions_in_time_order():
    link = netem.VirtualLink(netem.load_profile("lan"), seed=0)
    link.send(1, b"a", 0.0)
    link.send(0, b"b", 0.0001)
    link.send(1, b"c", 0.0002)
    assert link.receive(1.0) == [(1, b"a"), (0, b"b"), (1, b"c")]


def test_virtual_link_rejects_time_going_backwards_and_bad_directions():
    link = netem.VirtualLink(netem.load_profile("lan"))
    link.send(0, b"x", 1.0)
    with pytest.raises(ValueError, match="backwards"):
        link.send(0, b"x", 0.5)
    with pytest.raises(ValueError, match="direction"):
        link.send(2, b"x", 2.0)


def test_same_seed_replays_exactly_and_another_seed_differs():
    imp = netem.load_profile("weak-mobile").forward

    def trace(seed):
        arrivals, _ = run(imp, 2000, seed=seed)
        return [(s, round(d, 9)) for s, d, _ in arrivals]

    assert trace(7) == trace(7)
    assert trace(7) != trace(8)


def test_changing_the_delay_does_not_change_which_packets_are_lost():
    a, _ = run(Impairment(delay=0.010, loss=0.2), 2000)
    b, _ = run(Impairment(delay=0.050, jitter=0.005, loss=0.2), 2000)
    assert {s for s, _, _ in a} == {s for s, _, _ in b}


def test_queue_exposes_its_watchdog_and_length():
    q = NetemQueue(Impairment(delay=0.005), seed=1)
    q.enqueue(b"x", "meta", 0)
    assert len(q) == 1
    assert q.next_time() == 5 * MS
    q.advance(5 * MS - 1)
    assert q.take() == []
    q.advance(5 * MS)
    assert q.take() == [(5 * MS, b"x", "meta")]
    assert q.next_time() is None


@settings(max_examples=60, deadline=None)
@given(
    profile=st.sampled_from(netem.list_profiles()),
    seed=st.integers(0, 1000),
    gaps=st.lists(st.integers(0, 30_000_000), min_size=1, max_size=300),
    sizes=st.lists(st.integers(0, 1400), min_size=1, max_size=300),
)
def test_accounting_and_causality_hold_for_any_traffic(profile, seed, gaps, sizes):
    imp = netem.load_profile(profile).forward
    q = NetemQueue(imp, seed=seed)
    now, sent = 0, {}
    for i, gap in enumerate(gaps):
        now += gap
        data = i.to_bytes(4, "big") + bytes(sizes[i % len(sizes)])
        sent[i] = now
        q.enqueue(data, None, now)
    q.advance(now + 10**12)
    out = q.take()
    s = q.stats
    assert s.offered == len(gaps)
    assert s.delivered == len(out) == s.offered + s.duplicated - s.lost - s.overlimit
    assert len(q) == 0 and q.next_time() is None
    times = [t for t, _, _ in out]
    assert times == sorted(times)
    for t, data, _ in out:
        assert t >= sent[int.from_bytes(data[:4], "big")]
    if imp.rate:  # FIFO
        seqs = [int.from_bytes(d[:4], "big") for _, d, _ in out]
        assert seqs == sorted(seqs)
