"""The emulated link in virtual time: no sockets, no clock, no sleeping.

For sans-I/O protocol tests and fast simulations: the caller owns the clock,
hands datagrams in with :meth:`VirtualLink.send` and takes what has arrived
with :meth:`VirtualLink.receive`. Same profile + seed + calls → the same
deliveries, bit for bit, every run.
"""

from __future__ import annotations

from netem.model import UDP_FRAME_OVERHEAD, NetemQueue, QueueStats
from netem.profile import Profile

__all__ = ["FORWARD", "REVERSE", "VirtualLink"]

#: Client → server.
FORWARD = 0
#: Server → client.
REVERSE = 1


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)


class VirtualLink:
    """Both directions of ``profile``'s link, driven by the caller's clock.

    Times are float seconds on any epoch and must never go backwards.
    Datagrams are UDP payloads; rates count them with Ethernet + IPv4 + UDP
    headers (``frame_overhead``), as netem on a veth would.
    """

    def __init__(
        self, profile: Profile, seed: int = 0, frame_overhead: int = UDP_FRAME_OVERHEAD
    ) -> None:
        self.profile = profile
        self.seed = seed
        self._queues = (
            NetemQueue(profile.forward, f"{seed}:forward", frame_overhead),
            NetemQueue(profile.reverse, f"{seed}:reverse", frame_overhead),
        )
        self._now = -(2**63)

    @property
    def stats(self) -> tuple[QueueStats, QueueStats]:
        """Per direction (forward, reverse): what the link did to the packets."""
        return (self._queues[0].stats, self._queues[1].stats)

    def _clock(self, now: float) -> int:
        t = _ns(now)
        if t < self._now:
            raise ValueError(f"time went backwards: {now} s after {self._now / 1e9} s")
        self._now = t
        return t

    def send(self, direction: int, datagram: bytes, now: float) -> None:
        """Put ``datagram`` on the link at ``now``; 0 = forward, 1 = reverse."""
        if direction not in (FORWARD, REVERSE):
            raise ValueError(f"direction must be 0 (forward) or 1 (reverse), got {direction!r}")
        self._queues[direction].enqueue(bytes(datagram), direction, self._clock(now))

    def receive_timed(self, now: float) -> list[tuple[float, int, bytes]]:
        """Everything delivered by ``now`` as ``(arrival time, direction, datagram)``."""
        t = self._clock(now)
        arrivals: list[tuple[int, int, bytes]] = []
        for direction, queue in enumerate(self._queues):
            queue.advance(t)
            arrivals.extend((when, direction, packet) for when, packet, _ in queue.take())
        arrivals.sort(key=lambda a: (a[0], a[1]))  # stable: each direction stays in order
        return [(when / 1e9, direction, packet) for when, direction, packet in arrivals]

    def receive(self, now: float) -> list[tuple[int, bytes]]:
        """Everything delivered by ``now``, in delivery order, as ``(direction, datagram)``."""
        return [(direction, packet) for _, direction, packet in self.receive_timed(now)]

    def next_delivery(self) -> float | None:
        """The time of the next delivery (maybe already due), or None if the link is empty."""
        times = []
        for queue in self._queues:
            if queue.out:
                times.append(queue.out[0][0])
            nxt = queue.next_time()
            if nxt is not None:
                times.append(nxt)
        return min(times) / 1e9 if times else None
