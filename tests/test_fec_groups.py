"""FEC packet groups in virtual time: seeded lossy links, the latency bound, bounded memory, wrap."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fec import _require

from rudp import fec
from rudp.fec import FecController, FecDecoder, FecEncoder, ParityPacket


@pytest.fixture(params=["python", "cython"])
def fec_engine(request: pytest.FixtureRequest) -> str:
    return _require(request.param)


# --------------------------------------------------------------------------- a virtual link


@dataclass
class Transcript:
    """Everything that happened on one simulated run."""

    sent: dict[bytes, int] = field(default_factory=dict)  # payload -> send time
    groups: dict[int, dict] = field(default_factory=dict)  # group -> what the link did to it
    delivered: set[bytes] = field(default_factory=set)
    recovered: dict[bytes, int] = field(default_factory=dict)  # payload -> recovery time
    parity: list[ParityPacket] = field(default_factory=list)
    unprotected: int = 0

    def group(self, gid: int) -> dict:
        return self.groups.setdefault(
            gid,
            {
                "data": 0,
                "data_lost": set(),
                "parity": 0,
                "parity_lost": 0,
                "order": len(self.groups),
            },
        )


def simulate(
    enc: FecEncoder,
    dec: FecDecoder,
    schedule: list[tuple[int, bytes]],
    *,
    loss: float,
    seed: int,
    reorder: int = 0,
) -> Transcript:
    """Drive encoder -> link -> decoder in virtual time; the link drops packets at random
    (seeded) and, with ``reorder`` > 0, delivers each packet up to that many places late."""
    rnd = random.Random(seed)
    t = Transcript()
    in_flight: list[tuple[int, tuple]] = []  # (deliver after this many more packets, packet)

    def deliver(now: int, packet: tuple) -> None:
        if packet[0] == "data":
            _, tag, payload = packet
            t.delivered.add(payload)
            out = dec.on_data(tag.group, tag.index, payload)
        else:
            p = packet[1]
            out = dec.on_parity(p.group, p.index, p.count, p.parity, p.shard)
        for payload in out:  # never one the decoder has seen, never twice
            assert payload not in t.recovered and payload not in t.delivered
            t.recovered[payload] = now

    def transmit(now: int, packet: tuple) -> None:
        if packet[0] == "data":
            g = t.group(packet[1].group)
            g["data"] += 1
            lost = rnd.random() < loss
            if lost:
                g["data_lost"].add(packet[2])
        else:
            g = t.group(packet[1].group)
            g["parity"] += 1
            t.parity.append(packet[1])
            lost = rnd.random() < loss
            g["parity_lost"] += lost
        if not lost:
            in_flight.append((rnd.randint(0, reorder), packet))
        while in_flight:
            due = [i for i, (wait, _) in enumerate(in_flight) if wait <= 0]
            if not due:
                break
            deliver(now, in_flight.pop(due[0])[1])
        in_flight[:] = [(wait - 1, p) for wait, p in in_flight]

    i = 0
    while i < len(schedule) or enc.next_deadline() is not None:
        deadline = enc.next_deadline()
        if i < len(schedule) and (deadline is None or schedule[i][0] < deadline):
            now, payload = schedule[i]
            i += 1
            t.sent[payload] = now
            tag, parity = enc.add(payload, now)
            if tag is None:
                t.unprotected += 1
                t.delivered.add(payload)  # sent without FEC; loss does not matter here
            else:
                transmit(now, ("data", tag, payload))
        else:
            assert deadline is not None
            now, parity = deadline, enc.poll(deadline)
            assert parity, "poll at the deadline must close the group"
        for p in parity:
            transmit(now, ("parity", p))
    for _, packet in sorted(in_flight, key=lambda x: x[0]):
        deliver(now, packet)
    return t


def expected_recovery(t: Transcript) -> set[bytes]:
    """The lost data payloads the code can repair: those in groups that lost at most m."""
    out: set[bytes] = set()
    for g in t.groups.values():
        if len(g["data_lost"]) + g["parity_lost"] <= g["parity"]:
            out |= g["data_lost"]
    return out


def check_recovery(t: Transcript, *, reordered: bool) -> set[bytes]:
    """Every repairable loss was repaired, and nothing else except (on a reordering link)
    packets that were late rather than lost: recovery runs as soon as any k' are in."""
    expected = expected_recovery(t)
    if reordered:
        lost = set().union(*(g["data_lost"] for g in t.groups.values()))
        assert expected <= set(t.recovered)
        assert set(t.recovered) - expected <= t.delivered - lost
    else:
        assert set(t.recovered) == expected
        assert t.delivered.isdisjoint(t.recovered)
    return expected


def bulk(n: int, seed: int, interval: int = 1) -> list[tuple[int, bytes]]:
    rnd = random.Random(seed)
    return [
        (i * interval, i.to_bytes(4, "big") + rnd.randbytes(rnd.randint(0, 1396))) for i in range(n)
    ]


# --------------------------------------------------------------------------- recovery on a lossy link


@pytest.mark.parametrize(("seed", "reorder"), [(1, 0), (2, 0), (3, 4)])
def test_lossy_link_recovers_exactly_what_the_code_allows(
    fec_engine: str, seed: int, reorder: int
) -> None:
    enc = FecEncoder(10, 3, max_delay=50, engine=fec_engine)
    dec = FecDecoder(max_groups=16, max_data_shards=10, max_parity_shards=3, engine=fec_engine)
    t = simulate(enc, dec, bulk(3000, seed), loss=0.1, seed=seed, reorder=reorder)

    expected = check_recovery(t, reordered=reorder > 0)
    lost = set().union(*(g["data_lost"] for g in t.groups.values()))
    assert len(lost) > 200 and len(expected) > 0.8 * len(
        lost
    )  # 10% loss really happened, mostly repaired

    s = dec.stats()
    assert s["recovered"] == len(t.recovered)
    assert s["parity_received"] == sum(g["parity"] - g["parity_lost"] for g in t.groups.values())
    assert s["data_received"] == 3000 - len(lost)
    # groups that fell out of the window are accounted for exactly
    last = max(t.groups)
    evicted = [g for gid, g in t.groups.items() if last - gid >= 16]
    with_parity = [g for g in evicted if g["parity_lost"] < g["parity"]]
    assert s["shards_expected"] == sum(g["data"] + g["parity"] for g in with_parity)
    assert s["shards_lost"] == sum(len(g["data_lost"]) + g["parity_lost"] for g in with_parity)
    assert s["groups_unrecoverable"] == sum(
        1
        for g in with_parity
        if g["data_lost"] and len(g["data_lost"]) + g["parity_lost"] > g["parity"]
    )
    assert s["groups_in_flight"] <= 16


def test_engines_give_identical_parity_and_recovery() -> None:
    _require("cython")
    runs = []
    for engine in ("python", "cython"):
        enc = FecEncoder(7, 4, max_delay=5, engine=engine)
        dec = FecDecoder(engine=engine)
        t = simulate(enc, dec, bulk(400, 9, interval=2), loss=0.2, seed=9, reorder=2)
        runs.append((t.parity, t.recovered, dec.stats(), enc.stats()))
    assert runs[0] == runs[1]


def test_recovered_payloads_have_their_exact_length(fec_engine: str) -> None:
    enc = FecEncoder(4, 2, engine=fec_engine)
    dec = FecDecoder(engine=fec_engine)
    payloads = [b"", b"x", b"a longer payload", b"\x00\x00trailing zeros\x00\x00"]
    parity: list[ParityPacket] = []
    for p in payloads:
        parity += enc.add(p, 0)[1]
    assert [p.count for p in parity] == [4, 4] and len(parity[0].shard) == 2 + len(payloads[3])
    out = dec.on_parity(0, 0, 4, 2, parity[0].shard)
    out += dec.on_data(0, 1, payloads[1])
    out += dec.on_data(0, 2, payloads[2])
    assert out == []
    out += dec.on_parity(0, 1, 4, 2, parity[1].shard)
    assert out == [payloads[0], payloads[3]]


def test_decoder_copies_payloads_it_keeps(fec_engine: str) -> None:
    """A batched receive path reuses its buffer: what the decoder keeps must not change."""
    enc = FecEncoder(2, 1, engine=fec_engine)
    dec = FecDecoder(engine=fec_engine)
    enc.add(b"first", 0)
    (parity,) = enc.add(b"second", 0)[1]
    buffer = bytearray(b"first")
    dec.on_data(0, 0, memoryview(buffer))
    buffer[:] = b"XXXXX"
    assert dec.on_parity(0, 0, 2, 1, parity.shard) == [b"second"]


# --------------------------------------------------------------------------- the latency bound


def test_group_closes_when_full() -> None:
    enc = FecEncoder(3, 2, max_delay=1000)
    tags = []
    for i in range(3):
        tag, parity = enc.add(bytes([i]), now=i)
        tags.append((tag.group, tag.index))
        assert (parity == []) == (i < 2)
    assert tags == [(0, 0), (0, 1), (0, 2)]
    assert [(p.group, p.index, p.count, p.parity) for p in parity] == [(0, 0, 3, 2), (0, 1, 3, 2)]
    assert enc.add(b"next", 3)[0] == fec.FecTag(1, 0)
    assert enc.stats()["groups_full"] == 1


def test_deadline_follows_the_open_group() -> None:
    enc = FecEncoder(10, 3, max_delay=25)
    assert enc.next_deadline() is None  # idle: no timer at all
    enc.add(b"a", 100)
    enc.add(b"b", 110)
    assert enc.next_deadline() == 125
    assert enc.poll(124) == []
    parity = enc.poll(125)
    assert [p.count for p in parity] == [2, 2, 2]
    assert enc.next_deadline() is None
    assert enc.stats()["groups_timed"] == 1


def test_a_late_add_closes_the_expired_group_first() -> None:
    enc = FecEncoder(10, 1, max_delay=10)
    enc.add(b"a", 0)
    tag, parity = enc.add(b"b", 50)  # the caller never polled
    assert [(p.group, p.count) for p in parity] == [(0, 1)]
    assert tag == fec.FecTag(1, 0)
    assert enc.next_deadline() == 60


def test_zero_delay_protects_each_packet_alone() -> None:
    enc = FecEncoder(10, 2, max_delay=0)
    for i in range(3):
        tag, parity = enc.add(b"msg", i)
        assert tag == fec.FecTag(i, 0) and [p.count for p in parity] == [1, 1]


@pytest.mark.parametrize("max_delay", [20, 3_600_000])
def test_sparse_messages_are_protected_in_time(fec_engine: str, max_delay: int) -> None:
    """One message every 100 ms, every third one lost. With a 20 ms bound each group closes
    with what it has and every loss is repaired within 20 ms; a group that waits to fill
    (what kcp-go effectively does at low rates) repairs nothing while it matters."""
    enc = FecEncoder(10, 2, max_delay=max_delay, engine=fec_engine)
    dec = FecDecoder(engine=fec_engine)
    schedule = [(100 * i, f"message {i}".encode()) for i in range(30)]
    lost = {p for i, (_, p) in enumerate(schedule) if i % 3 == 0}
    repaired: dict[bytes, int] = {}

    def send_parity(now: int, parity: list[ParityPacket]) -> None:
        for p in parity:
            for payload in dec.on_parity(p.group, p.index, p.count, p.parity, p.shard):
                repaired[payload] = now

    for now, payload in schedule:
        deadline = enc.next_deadline()
        if deadline is not None and deadline <= now:
            send_parity(deadline, enc.poll(deadline))
        tag, parity = enc.add(payload, now)
        if payload not in lost:
            dec.on_data(tag.group, tag.index, payload)
        send_parity(now, parity)
    end = schedule[-1][0] + 100
    if (deadline := enc.next_deadline()) is not None and deadline <= end:
        send_parity(deadline, enc.poll(deadline))

    sent_at = dict((p, t) for t, p in schedule)
    if max_delay == 20:
        assert set(repaired) == lost
        assert all(repaired[p] - sent_at[p] <= 20 for p in lost)
    else:
        # groups of 10 at 100 ms per message: a loss waits up to 900 ms for its parity
        assert all(repaired[p] - sent_at[p] >= 100 for p in repaired)
        assert len([p for p in lost if repaired.get(p, end + 1) - sent_at[p] <= 100]) == 0


# --------------------------------------------------------------------------- wraparound and staleness


def test_group_ids_wrap(fec_engine: str) -> None:
    enc = FecEncoder(5, 2, first_group=2**32 - 3, engine=fec_engine)
    dec = FecDecoder(max_groups=8, engine=fec_engine)
    t = simulate(enc, dec, bulk(100, 4), loss=0.15, seed=4, reorder=3)
    assert sorted(t.groups) == [*range(0, 17), 2**32 - 3, 2**32 - 2, 2**32 - 1]
    assert check_recovery(t, reordered=True) and t.recovered
    assert dec.stats()["late"] == 0
    # across the wrap, group 2^32-1 is 8 groups behind group 7: stale
    assert dec.on_data(2**32 - 1, 0, b"late") == []
    assert dec.stats()["late"] == 1


def test_stale_groups_are_dropped_and_counted() -> None:
    dec = FecDecoder(max_groups=4)
    for gid in range(10):
        dec.on_data(gid, 0, b"data without parity yet")
        assert dec.stats()["groups_in_flight"] <= 4
    assert dec.stats()["groups_expired"] == 6
    assert dec.on_data(5, 1, b"too late") == []
    assert dec.stats()["late"] == 1
    assert dec.on_data(6, 1, b"still in the window") == []
    assert dec.stats()["late"] == 1 and dec.stats()["data_received"] == 11


def test_more_losses_than_parity_is_counted_not_raised(fec_engine: str) -> None:
    enc = FecEncoder(4, 2, engine=fec_engine)
    dec = FecDecoder(max_groups=2, engine=fec_engine)
    parity = []
    for i in range(4):
        parity += enc.add(bytes([i]) * 10, 0)[1]
    assert dec.on_data(0, 0, bytes(10)) == []
    for p in parity:  # 1 data + 2 parity of 4 + 2: three lost, one more than m
        assert dec.on_parity(p.group, p.index, p.count, p.parity, p.shard) == []
    dec.on_data(2, 0, b"newer traffic")  # pushes group 0 out of the window
    s = dec.stats()
    assert s["groups_unrecoverable"] == 1 and s["groups_expired"] == 1 and s["recovered"] == 0
    assert s["shards_expected"] == 6 and s["shards_lost"] == 3


def test_byte_budget_drops_the_oldest_groups() -> None:
    dec = FecDecoder(max_bytes=5000)
    for gid in range(20):
        for index in range(3):
            dec.on_data(gid, index, bytes(1000))
            assert dec.stats()["bytes_buffered"] <= 5000
    assert dec.stats()["groups_in_flight"] <= 2 and dec.stats()["groups_expired"] >= 18


# --------------------------------------------------------------------------- bad input


def test_invalid_and_inconsistent_packets_are_counted(fec_engine: str) -> None:
    dec = FecDecoder(max_data_shards=10, max_parity_shards=3, max_payload=1400, engine=fec_engine)
    shard = bytes(50)
    assert dec.on_parity(0, 0, 11, 3, shard) == []  # more data shards than negotiated
    assert dec.on_parity(0, 0, 10, 4, shard) == []  # more parity than negotiated
    assert dec.on_parity(0, 3, 10, 3, shard) == []  # index beyond the parity count
    assert dec.on_parity(0, 0, 10, 3, b"\x00") == []  # shorter than a size field
    assert dec.on_data(2**32, 0, b"x") == []  # not a u32 group id
    assert dec.on_data(0, 0, bytes(1401)) == []  # longer than max_payload
    assert dec.stats()["invalid"] == 6 and dec.stats()["groups_in_flight"] == 0

    assert dec.on_parity(1, 0, 4, 2, shard) == []
    assert dec.on_parity(1, 1, 5, 2, shard) == []  # disagrees about k'
    assert dec.on_parity(1, 1, 4, 2, shard + b"\x00") == []  # disagrees about the length
    assert dec.on_data(1, 4, b"x") == []  # index past k'
    assert dec.on_data(1, 0, bytes(49)) == []  # longer than the group's shards allow
    dec.on_data(2, 7, b"x")
    assert dec.on_parity(2, 0, 4, 2, shard) == []  # says k' = 4 but data index 7 came
    assert dec.on_data(1, 0, b"ok") == [] and dec.on_data(1, 0, b"ok") == []
    s = dec.stats()
    assert s["invalid"] == 11 and s["duplicates"] == 1 and s["recovered"] == 0


def test_forged_parity_yields_nothing(fec_engine: str) -> None:
    dec = FecDecoder(engine=fec_engine)
    dec.on_data(0, 0, b"genuine")
    assert dec.on_parity(0, 0, 2, 1, b"\xff" * 12) == []
    assert dec.stats()["recovered_invalid"] == 1 and dec.stats()["recovered"] == 0


groups_near = st.integers(0, 40).map(lambda d: (2**32 - 20 + d) % 2**32)
data_op = st.tuples(
    st.just("data"),
    groups_near | st.integers(0, 2**32 - 1),
    st.integers(0, 254),
    st.integers(0, 300),
)
parity_op = st.tuples(
    st.just("parity"),
    groups_near | st.integers(0, 2**32 - 1),
    st.integers(0, 254),
    st.integers(1, 254),
    st.integers(1, 254),
    st.integers(0, 300),
)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(data_op | parity_op, max_size=120), seed=st.integers(0, 2**16))
def test_adversarial_input_keeps_memory_bounded(ops: list[tuple], seed: int) -> None:
    rnd = random.Random(seed)
    dec = FecDecoder(
        max_groups=6, max_bytes=3000, max_data_shards=12, max_parity_shards=6, max_payload=400
    )
    for op in ops:
        if op[0] == "data":
            out = dec.on_data(op[1], op[2], rnd.randbytes(op[3]))
        else:
            out = dec.on_parity(*op[1:5], rnd.randbytes(op[5]))
        assert all(isinstance(p, bytes) and len(p) <= 400 for p in out)
        s = dec.stats()
        assert s["groups_in_flight"] <= 6
        assert s["bytes_buffered"] <= 3000
        held = sum(
            len(p) for g in dec._groups.values() for p in (*g.data.values(), *g.parities.values())
        )
        assert s["bytes_buffered"] == held


# --------------------------------------------------------------------------- the controller


def residual(n: int, p: float, m: int) -> float:
    """P(more than m of n lost), by direct summation (independent of the module)."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(m + 1, n + 1))


def test_controller_is_off_on_a_clean_link_and_costs_nothing() -> None:
    controller = FecController()
    controller.update(0.0)
    enc = FecEncoder(10, controller)
    dec = FecDecoder()
    t = simulate(enc, dec, bulk(1000, 5), loss=0.0, seed=5)
    assert enc.stats()["parity_bytes"] == 0 and not t.parity
    assert t.unprotected == 1000  # no FEC header either


@pytest.mark.parametrize("loss", [0.01, 0.05, 0.10, 0.20])
def test_controller_picks_the_least_parity_meeting_the_target(loss: float) -> None:
    controller = FecController(max_parity=10, target=0.01)
    controller.update(loss)
    for count in (1, 5, 10):
        m = controller.parity_for(count)
        assert residual(count + m, loss, m) <= 0.01 * (1 + 1e-9)
        assert m == 1 or residual(count + m - 1, loss, m - 1) > 0.01 * (1 - 1e-9)


def test_controller_limits_and_hysteresis() -> None:
    controller = FecController(max_parity=3, on_above=0.01, off_below=0.002)
    controller.update(0.5)
    assert controller.parity_for(10) == 3 and controller.parity_for(253) == 2
    for rate, active in ((0.005, True), (0.0019, False), (0.005, False), (0.01, True)):
        controller.update(rate)
        assert controller.active is active
    with pytest.raises(ValueError, match="loss_rate"):
        controller.update(1.5)
    with pytest.raises(ValueError, match="max_parity"):
        FecController(max_parity=0)


def test_controller_protects_a_ten_percent_loss_link(fec_engine: str) -> None:
    controller = FecController()
    controller.update(0.10)
    enc = FecEncoder(10, controller, engine=fec_engine)
    dec = FecDecoder(engine=fec_engine)
    t = simulate(enc, dec, bulk(5000, 6), loss=0.10, seed=6)
    lost = set().union(*(g["data_lost"] for g in t.groups.values()))
    unrepaired = lost - set(t.recovered)
    assert len(lost) > 400  # about 10% of 5000
    assert len(unrepaired) / 5000 < 0.01
    assert {p.parity for p in t.parity} == {controller.parity_for(10)} == {4}


# --------------------------------------------------------------------------- configuration errors


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"data_shards": 0}, "data_shards"),
        ({"parity": 255}, "parity"),
        ({"max_delay": -1}, "max_delay"),
        ({"first_group": 2**32}, "first_group"),
        ({"engine": "nope"}, "engine"),
    ],
)
def test_encoder_rejects_bad_settings(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        FecEncoder(**kwargs)


@pytest.mark.parametrize(
    "field", ["max_groups", "max_bytes", "max_data_shards", "max_parity_shards", "max_payload"]
)
def test_decoder_rejects_bad_settings(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        FecDecoder(**{field: 0})


def test_encoder_rejects_oversized_payloads() -> None:
    with pytest.raises(ValueError, match="at most 65533"):
        FecEncoder().add(bytes(65534), 0)
