"""Drive sans-I/O connections over a netem virtual link, in virtual time.

The link is :class:`netem.VirtualLink` (the same profiles as every other
backend); this module only plays the event loop: deliver what is due, fire
timers, collect output. Nothing sleeps, and a seed fixes every outcome.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import netem
from rudp import Configuration, wire
from rudp.connection import Connection
from rudp.events import Event
from rudp.listener import Listener

CLIENT = ("10.0.0.1", 40000)
SERVER = ("10.0.0.2", 4000)


def lossless() -> netem.Profile:
    return netem.Profile.from_options(delay="5ms")


class Net:
    """One client, one server (listener + the connection it creates), one link."""

    def __init__(
        self,
        client_config: Configuration | None = None,
        server_config: Configuration | None = None,
        *,
        profile: netem.Profile | None = None,
        seed: int = 1,
        engine: Any = None,
        cid: int = 0x1234_5678_9ABC_DEF0,
    ) -> None:
        self.client_config = client_config or Configuration()
        self.server_config = server_config or self.client_config
        self.engine = engine
        self.link = netem.VirtualLink(profile or lossless(), seed=seed)
        self.listener = Listener(self.server_config, secret=bytes(32), engine=engine)
        self.client = Connection(self.client_config, is_client=True, cid=cid, engine=engine)
        self.server: Connection | None = None
        self.client_addr = CLIENT
        self.now = 0.0
        self.accepting = True
        self.drop_all = False  # a cable pulled: every datagram vanishes
        self.events: dict[str, list[Event]] = {"client": [], "server": []}
        self.wire_bytes = [0, 0]  # bytes sent client→server, server→client
        self.listener_in = 0
        self.listener_out = 0
        self.rng = random.Random(seed)

    # -------------------------------------------------------------- plumbing

    def start(self) -> None:
        self.client.connect(SERVER, self.now)
        self._pump()

    def _send(self, direction: int, datagrams: list[bytes]) -> None:
        for d in datagrams:
            self.wire_bytes[direction] += len(d)
            if not self.drop_all:
                self.link.send(direction, d, self.now)

    def _pump(self) -> None:
        """Move every output of the current instant onto the link; collect events."""
        for _ in range(100):
            moved = False
            out = self.client.datagrams_to_send(self.now)
            if out:
                moved = True
                self._send(0, out)
            if self.server is not None:
                out = self.server.datagrams_to_send(self.now)
                if out:
                    moved = True
                    self._send(1, out)
            for packet, _addr in self.listener.datagrams_to_send():
                moved = True
                self.listener_out += len(packet)
                self._send(1, [packet])
            for name, conn in (("client", self.client), ("server", self.server)):
                while conn is not None and (event := conn.next_event()) is not None:
                    self.events[name].append(event)
            if not moved:
                return

    def deliver(self, direction: int, data: bytes) -> None:
        if direction == 0:
            if self.server is None or self._cid_of(data) not in (None, self.server.cid):
                self.listener_in += len(data)
                conn = self.listener.receive_datagram(
                    data, self.client_addr, self.now, accepting=self.accepting
                )
                if conn is not None:
                    self.server = conn
            else:
                self.server.receive_datagram(data, self.client_addr, self.now)
        else:
            self.client.receive_datagram(data, SERVER, self.now)

    def _cid_of(self, data: bytes) -> int | None:
        if self.server_config.framing != "rudp" or len(data) < wire.RUDP_OVERHEAD:
            return None
        return int.from_bytes(data[2:10], "little")

    def next_time(self) -> float | None:
        times = [
            t for t in (self.link.next_delivery(), self.client.get_timer(self.now)) if t is not None
        ]
        if self.server is not None and (t := self.server.get_timer(self.now)) is not None:
            times.append(t)
        return min(times) if times else None

    def step(self) -> bool:
        """Advance to the next thing that happens; False when nothing ever will."""
        t = self.next_time()
        if t is None:
            return False
        self.now = max(self.now, t)
        for direction, data in self.link.receive(self.now):
            self.deliver(direction, data)
        self.client.handle_timer(self.now)
        if self.server is not None:
            self.server.handle_timer(self.now)
        self._pump()
        return True

    def run_until(self, condition: Callable[[], bool], limit: float = 120.0) -> bool:
        """Step until ``condition()`` holds (True) or virtual time passes ``limit`` (False)."""
        deadline = self.now + limit
        while not condition():
            if self.now > deadline or not self.step():
                return condition()
        return True

    def run_for(self, seconds: float) -> None:
        end = self.now + seconds
        while (t := self.next_time()) is not None and t <= end:
            self.step()
        self.now = end

    # -------------------------------------------------------------- helpers

    def established(self) -> bool:
        return self.server is not None and self.client.engine is not None

    def transfer(self, c2s: bytes, s2c: bytes, limit: float = 300.0) -> tuple[bytes, bytes]:
        """Send both payloads (respecting a send-buffer bound) and read until all arrived."""
        assert self.run_until(self.established, 30), "handshake did not complete"
        assert self.server is not None
        got = {"client": bytearray(), "server": bytearray()}
        todo = {"client": memoryview(c2s), "server": memoryview(s2c)}
        ends = {"client": self.client, "server": self.server}

        def progress() -> bool:
            for name, conn in ends.items():
                while chunk := conn.read():
                    got[name] += chunk
                room = conn.send_window_free
                if todo[name] and room:
                    conn.send(bytes(todo[name][:room]))
                    todo[name] = todo[name][room:]
            return len(got["server"]) >= len(c2s) and len(got["client"]) >= len(s2c)

        assert self.run_until(progress, limit), (
            f"transfer incomplete at t={self.now:.1f}: server got {len(got['server'])}/{len(c2s)}, "
            f"client got {len(got['client'])}/{len(s2c)}"
        )
        return bytes(got["server"]), bytes(got["client"])
