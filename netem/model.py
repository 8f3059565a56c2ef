"""The impairment state machine: one ``tc netem`` qdisc, emulated step by step.

Every backend (the virtual-time link, the UDP relay, the TUN forwarder) feeds
packets through :class:`NetemQueue`, so they share one semantics, and that
semantics is the Linux kernel's ``sch_netem`` (as of 6.1, configured by
iproute2 6.1), reproduced decision by decision in integer nanoseconds:

On enqueue, in this order:
  1. duplicate?  (correlated draw) — the copy is enqueued as a separate packet
     that goes through loss, corruption, the limit and its own delay again;
  2. lost?       random (correlated), 4-state Markov or Gilbert-Elliott;
     a packet chosen for duplication *and* loss is delivered once;
  3. corrupt?    one random bit flipped in the bytes the backend carries;
  4. tail drop when ``limit`` packets are already queued;
  5. reorder?    after ``gap - 1`` delayed packets, each packet is sent at once
     (skipping the delay and the rate) with probability ``reorder``;
  6. otherwise   time_to_send = now + delay, where delay is drawn from the
     uniform or table distribution (``mu ± sigma``, may be < 0).
     With a ``rate``, time_to_send = max(now + delay, time_to_send of the
     last queued packet) + the packet's transmission time, so a rate makes
     the queue FIFO and serialises packets.

The time-ordered queue ("tfifo"): packets leave in time_to_send order, not
arrival order. So **jitter without a rate reorders packets** (a packet drawn
a short delay overtakes one drawn a long delay), exactly like real netem; a
rate, however high, restores FIFO order. Equal times leave in arrival order.

Dequeue happens when the kernel would run it: right after every enqueue and
when the qdisc watchdog fires (at the head packet's time_to_send, or at the
next slot). With ``slot``, packets are released only inside slots, and a new
slot is drawn whenever the head packet became ready after the slot opened.

Sizes: ``rate``, ``slot bytes`` and ``packetoverhead`` count what netem sees
on an Ethernet (veth) device: the frame without FCS. Backends pass the bytes
they carry plus ``frame_overhead``: :data:`UDP_FRAME_OVERHEAD` (Ethernet +
IPv4 + UDP headers) for a UDP payload, :data:`IP_FRAME_OVERHEAD` (Ethernet)
for an IP packet.

Corruption: the kernel flips a bit anywhere in the frame, and the receiving
kernel's IP/UDP/TCP checksums then drop nearly all such packets. The TUN
forwarder carries whole IP packets, so that is what happens there too. The
relay and the virtual link carry UDP payloads: they flip a bit of the payload
and deliver it, modelling the corruption an application sees when no checksum
catches it (use ``loss`` for the checksum-dropped kind).

Randomness: one seeded generator per purpose and direction (``random.Random``,
stable across Python versions), so runs replay exactly and, e.g., changing the
delay does not change which packets are lost. Correlation is netem's own
(``next = (1 - rho) * uniform + rho * previous``), which is known to pull a
correlated loss rate below its nominal value; it is reproduced as is. As in
iproute2, a duplicate correlation reaches the kernel only when another
correlation (delay, loss, reorder or corrupt) is also given.

Not emulated: ``ecn`` marking, GSO super-packets (real netem on a veth treats
a TSO/GSO burst as one packet; the namespace link turns offloads off), and
timer slack (the kernel releases packets a few microseconds late).
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from dataclasses import dataclass
from typing import Any

from netem.distributions import SCALE, table
from netem.profile import Impairment

__all__ = [
    "IP_FRAME_OVERHEAD",
    "UDP_FRAME_OVERHEAD",
    "NetemQueue",
    "QueueStats",
]

#: Ethernet header: what netem on a veth counts beyond an IP packet.
IP_FRAME_OVERHEAD = 14
#: Ethernet + IPv4 + UDP headers: what netem counts beyond a UDP payload.
UDP_FRAME_OVERHEAD = 14 + 20 + 8

_U32 = 0xFFFFFFFF
_INT_MAX = 2**31 - 1


def _u32_fraction(p: float) -> int:
    """A probability as tc sends it: rint(p * UINT32_MAX)."""
    return round(p * _U32)


def _ticks_ns(seconds: float) -> int:
    """A tc time (whole microseconds) through 64 ns scheduler ticks, as iproute2 6.1 does."""
    us = round(seconds * 1e6)
    return (us * 125 // 8) * 64


def _c_div(a: int, b: int) -> int:
    q = abs(a) // b
    return q if a >= 0 else -q


@dataclass
class QueueStats:
    """What one direction did to the packets offered to it."""

    offered: int = 0  # packets handed in (not counting duplicates)
    offered_bytes: int = 0  # their bytes (without frame overhead)
    lost: int = 0  # dropped by the loss model
    duplicated: int = 0  # extra copies made
    corrupted: int = 0
    overlimit: int = 0  # tail-dropped by ``limit`` (copies included)
    reordered: int = 0  # sent at once, skipping the delay
    delivered: int = 0
    delivered_bytes: int = 0  # bytes handed out (without frame overhead)


class _Correlated:
    """netem's correlated uniform u32 source (``get_crandom``)."""

    __slots__ = ("last", "rho", "rng")

    def __init__(self, rng: random.Random, correlation: float) -> None:
        self.rng = rng
        self.rho = _u32_fraction(correlation)
        self.last = rng.getrandbits(32)

    def next(self) -> int:
        value = self.rng.getrandbits(32)
        if not self.rho:
            return value
        rho = self.rho + 1
        self.last = (value * ((1 << 32) - rho) + self.last * rho) >> 32
        return self.last


class NetemQueue:
    """One direction of an emulated link: a netem qdisc in virtual or real time.

    Sans-I/O: :meth:`enqueue` takes a packet and the time (integer
    nanoseconds, any epoch, never decreasing); :meth:`advance` runs the queue
    up to a time; delivered packets collect in :attr:`out` as
    ``(time_ns, packet, meta)`` in delivery order for the caller to take.
    ``meta`` travels with the packet untouched (an address, a direction).
    """

    def __init__(
        self,
        impairment: Impairment,
        seed: int | str = 0,
        frame_overhead: int = UDP_FRAME_OVERHEAD,
    ) -> None:
        imp = impairment
        self.impairment = imp
        self.frame_overhead = frame_overhead
        self.stats = QueueStats()
        self.out: list[tuple[int, bytes, Any]] = []

        def rng(purpose: str) -> random.Random:
            return random.Random(f"netem:{seed}:{purpose}")

        self._latency = _ticks_ns(imp.delay)
        self._jitter = min(_ticks_ns(imp.jitter), _INT_MAX)
        self._table = table(imp.distribution)
        self._delay_rnd = _Correlated(rng("delay"), imp.delay_correlation)
        self._loss = _u32_fraction(imp.loss)
        self._loss_rnd = _Correlated(rng("loss"), imp.loss_correlation)
        self._loss_rng = self._loss_rnd.rng
        self._loss_model = self._loss_random
        self._clg_state = 1  # TX_IN_GAP_PERIOD (4-state) / GOOD_STATE (Gilbert-Elliott)
        if imp.loss_state is not None:
            p13, p31, p32, p23, p14 = map(_u32_fraction, imp.loss_state)
            self._a = (p13, p31, p32, p14, p23)
            self._loss_model = self._loss_4state
        elif imp.loss_gemodel is not None:
            p, r, one_minus_h, one_minus_k = map(_u32_fraction, imp.loss_gemodel)
            self._a = (p, r, _U32 - one_minus_h, one_minus_k)  # the kernel keeps h
            self._loss_model = self._loss_gilbert_elliott
        elif not self._loss:
            self._loss_model = None
        other_correlation = (
            imp.delay_correlation
            or imp.loss_correlation
            or imp.reorder_correlation
            or imp.corrupt_correlation
        )
        self._duplicate = _u32_fraction(imp.duplicate)
        self._dup_rnd = _Correlated(
            rng("duplicate"), imp.duplicate_correlation if other_correlation else 0.0
        )
        self._corrupt = _u32_fraction(imp.corrupt)
        self._corrupt_rnd = _Correlated(rng("corrupt"), imp.corrupt_correlation)
        self._reorder = _u32_fraction(imp.reorder) if imp.reorder else 0
        self._reorder_rnd = _Correlated(rng("reorder"), imp.reorder_correlation)
        self._gap = imp.gap
        self._counter = 0
        self._rate = imp.rate // 8  # bytes per second, as the kernel holds it
        self._limit = imp.limit

        self._slot = imp.slot
        self._slot_rng = rng("slot")
        self._slot_table = (
            table(imp.slot.distribution) if imp.slot and imp.slot.distribution else None
        )
        self._slot_next: int | None = None  # opened at the first packet
        self._slot_packets = 0
        self._slot_bytes = 0

        # The queue: reordered packets go to the head (netem's sch->q); the
        # tfifo is a linear list for in-order arrivals plus a heap for the rest,
        # like the kernel's list + rbtree (ties favour the list's head).
        self._head: deque[tuple[int, bytes, Any]] = deque()
        self._linear: deque[tuple[int, bytes, Any]] = deque()
        self._heap: list[tuple[int, int, bytes, Any]] = []
        self._heap_max: int | None = None
        self._seq = 0
        self._watchdog: int | None = None

    # ------------------------------------------------------------ public API

    def __len__(self) -> int:
        return len(self._head) + len(self._linear) + len(self._heap)

    def next_time(self) -> int | None:
        """When the queue next releases something by itself (the watchdog), or None."""
        return self._watchdog

    def advance(self, now: int) -> None:
        """Run the queue up to ``now``: fire every watchdog due by then."""
        while self._watchdog is not None and self._watchdog <= now:
            self._dequeue(self._watchdog)

    def enqueue(self, packet: bytes, meta: Any, now: int) -> None:
        """Offer ``packet`` to the link at ``now`` (ns)."""
        self.advance(now)
        if self._slot is not None and self._slot_next is None:
            self._slot_next = now
            self._slot_packets = self._slot.packets or _INT_MAX
            self._slot_bytes = self._slot.bytes or _INT_MAX
        self.stats.offered += 1
        self.stats.offered_bytes += len(packet)
        self._enqueue(packet, meta, now, False)
        self._dequeue(now)

    def take(self) -> list[tuple[int, bytes, Any]]:
        """Hand over (and forget) what was delivered so far."""
        out, self.out = self.out, []
        return out

    # ------------------------------------------------------------ enqueue

    def _enqueue(self, packet: bytes, meta: Any, now: int, is_copy: bool) -> None:
        stats = self.stats
        count = 1
        if not is_copy and self._duplicate and self._duplicate >= self._dup_rnd.next():
            count = 2
        if self._loss_model is not None and self._loss_model():
            count -= 1
            if not count:
                stats.lost += 1
                return
        copy = packet if count > 1 else None
        if self._corrupt and self._corrupt >= self._corrupt_rnd.next() and packet:
            rng = self._corrupt_rnd.rng
            index = rng.randrange(len(packet))
            flipped = bytearray(packet)
            flipped[index] ^= 1 << rng.randrange(8)
            packet = bytes(flipped)
            stats.corrupted += 1
        if len(self) >= self._limit:
            stats.overlimit += 2 if copy is not None else 1
            return
        if copy is not None:
            stats.duplicated += 1
            self._enqueue(copy, meta, now, True)
        if (
            not self._gap
            or self._counter < self._gap - 1
            or self._reorder < self._reorder_rnd.next()
        ):
            delay = self._draw_delay()
            start = now
            if self._rate:
                last = self._last_time()
                if last is not None:
                    delay = max(0, delay - (last - now))
                    start = last
                delay += self._transmit_time(len(packet) + self.frame_overhead)
            self._counter += 1
            self._tfifo_add(start + delay, packet, meta)
        else:
            self._counter = 0
            stats.reordered += 1
            self._head.appendleft((now, packet, meta))

    def _draw_delay(self) -> int:
        sigma = self._jitter
        if not sigma:
            return self._latency
        rnd = self._delay_rnd.next()
        return self._tabledist(self._latency, sigma, rnd, self._table)

    @staticmethod
    def _tabledist(mu: int, sigma: int, rnd: int, dist: tuple[int, ...] | None) -> int:
        if dist is None:
            return (rnd % (2 * sigma)) + mu - sigma
        t = dist[rnd % len(dist)]
        x = (sigma % SCALE) * t
        x += SCALE // 2 if x >= 0 else -(SCALE // 2)
        return _c_div(x, SCALE) + (sigma // SCALE) * t + mu

    def _transmit_time(self, size: int) -> int:
        imp = self.impairment
        size = max(0, size + imp.packet_overhead)
        if imp.cell_size:
            cells = -(-size // imp.cell_size)
            size = cells * (imp.cell_size + imp.cell_overhead)
        return size * 1_000_000_000 // self._rate

    def _last_time(self) -> int | None:
        """The latest time_to_send still queued (the rate's reference point)."""
        last = self._head[-1][0] if self._head else None
        if self._heap_max is not None and (last is None or self._heap_max > last):
            last = self._heap_max
        if self._linear and (last is None or self._linear[-1][0] > last):
            last = self._linear[-1][0]
        return last

    def _tfifo_add(self, when: int, packet: bytes, meta: Any) -> None:
        if not self._linear or when >= self._linear[-1][0]:
            self._linear.append((when, packet, meta))
        else:
            self._seq += 1
            heapq.heappush(self._heap, (when, self._seq, packet, meta))
            if self._heap_max is None or when > self._heap_max:
                self._heap_max = when

    # ------------------------------------------------------------ loss models

    def _loss_random(self) -> bool:
        return self._loss >= self._loss_rnd.next()

    def _loss_4state(self) -> bool:
        a1, a2, a3, a4, a5 = self._a  # p13, p31, p32, p14, p23
        rnd = self._loss_rng.getrandbits(32)
        state = self._clg_state
        if state == 1:  # transmitting, gap period
            if rnd < a4:
                self._clg_state = 3  # isolated loss
                return True
            if rnd < a1 + a4:
                self._clg_state = 4  # burst loss
                return True
        elif state == 2:  # transmitting, burst period
            if rnd < a5:
                self._clg_state = 4
                return True
        elif state == 4:  # lost, burst period
            if rnd < a3:
                self._clg_state = 2
            elif rnd < a2 + a3:
                self._clg_state = 1
            else:
                return True
        else:  # state 3: an isolated loss is always followed by a transmission
            self._clg_state = 1
        return False

    def _loss_gilbert_elliott(self) -> bool:
        p, r, h, one_minus_k = self._a
        getrandbits = self._loss_rng.getrandbits
        if self._clg_state == 1:  # good
            if getrandbits(32) < p:
                self._clg_state = 2
            return getrandbits(32) < one_minus_k
        if getrandbits(32) < r:  # bad
            self._clg_state = 1
        return getrandbits(32) > h

    # ------------------------------------------------------------ dequeue

    def _new_slot(self, now: int) -> None:
        slot = self._slot
        assert slot is not None
        if self._slot_table is None:
            lo, hi = round(slot.min_delay * 1e9), round(slot.max_delay * 1e9)
            wait = lo + (((hi - lo) * self._slot_rng.getrandbits(32)) >> 32)
        else:
            wait = self._tabledist(
                round(slot.delay * 1e9),
                min(round(slot.jitter * 1e9), _INT_MAX),
                self._slot_rng.getrandbits(32),
                self._slot_table,
            )
        self._slot_next = now + wait
        self._slot_packets = slot.packets or _INT_MAX
        self._slot_bytes = slot.bytes or _INT_MAX

    def _dequeue(self, now: int) -> None:
        """What netem_dequeue does when the device asks for packets at ``now``."""
        out = self.out
        stats = self.stats
        head, linear, heap = self._head, self._linear, self._heap
        while True:
            if head:
                _, packet, meta = head.popleft()
                out.append((now, packet, meta))
                stats.delivered += 1
                stats.delivered_bytes += len(packet)
                continue
            if heap and (not linear or heap[0][0] < linear[0][0]):
                when = heap[0][0]
                from_heap = True
            elif linear:
                when = linear[0][0]
                from_heap = False
            else:
                self._watchdog = None
                return
            slot_next = self._slot_next
            if slot_next is not None and slot_next < when:
                self._new_slot(now)
                slot_next = self._slot_next
            if when > now or (slot_next is not None and slot_next > now):
                self._watchdog = when if slot_next is None else max(when, slot_next)
                return
            if from_heap:
                _, _, packet, meta = heapq.heappop(heap)
                if not heap:
                    self._heap_max = None
            else:
                _, packet, meta = linear.popleft()
            out.append((now, packet, meta))
            stats.delivered += 1
            stats.delivered_bytes += len(packet)
            if slot_next is not None:
                self._slot_packets -= 1
                self._slot_bytes -= len(packet) + self.frame_overhead
                if self._slot_packets <= 0 or self._slot_bytes <= 0:
                    self._new_slot(now)
