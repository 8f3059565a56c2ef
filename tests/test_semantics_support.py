"""Helpers for the stream-semantics tests of both APIs (no tests here).

* :class:`Relay`: a loopback UDP relay between one client and a server that can
  drop everything the server sends back: with the replies gone, data that still
  reaches the server needed no round trip.
* :class:`TimerWakeups`: counts how often endpoints wake up for timers.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from rudp import Configuration
from rudp.endpoint import Endpoint

FAST = Configuration(keepalive=0.2, idle_timeout=1.5, connect_timeout=2.0, close_timeout=2.0)
#: Idle sessions: nothing is due for seconds (keepalive), so an idle window shows any tick.
IDLE = Configuration(keepalive=5.0, idle_timeout=30.0, sndwnd=32, rcvwnd=32)


class _Side(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Any) -> None:
        self.on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.on_datagram(data, addr)


class Relay:
    """Forwards datagrams between one client and ``server``; ``drop_replies`` cuts the way back."""

    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        self.drop_replies = False
        self.to_server = 0
        self.to_client = 0
        self.dropped = 0
        self._client: Any = None
        self._front: asyncio.DatagramTransport | None = None
        self._back: asyncio.DatagramTransport | None = None

    async def start(self) -> tuple[str, int]:
        """Start on the running loop; returns the address clients connect to."""
        loop = asyncio.get_running_loop()
        self._front, _ = await loop.create_datagram_endpoint(
            lambda: _Side(self._from_client), local_addr=("127.0.0.1", 0)
        )
        self._back, _ = await loop.create_datagram_endpoint(
            lambda: _Side(self._from_server), remote_addr=self.server
        )
        address: tuple[str, int] = self._front.get_extra_info("sockname")
        return address

    def _from_client(self, data: bytes, addr: Any) -> None:
        self._client = addr
        assert self._back is not None
        self._back.sendto(data)
        self.to_server += 1

    def _from_server(self, data: bytes, addr: Any) -> None:
        if self.drop_replies or self._client is None:
            self.dropped += 1
            return
        assert self._front is not None
        self._front.sendto(data, self._client)
        self.to_client += 1

    def close(self) -> None:
        for transport in (self._front, self._back):
            if transport is not None:
                transport.close()


class TimerWakeups:
    """Counts :class:`Endpoint` timer callbacks (each one is a loop wake-up for timers)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        original = Endpoint._on_timer

        def counting(endpoint: Endpoint) -> None:
            self.count += 1
            original(endpoint)

        monkeypatch.setattr(Endpoint, "_on_timer", counting)


def next_deadline(endpoints: list[Endpoint]) -> float | None:
    """The earliest deadline any of ``endpoints`` has armed (None: nothing armed)."""
    deadlines = [d for endpoint in endpoints for d in endpoint._armed.values()]
    return min(deadlines) if deadlines else None


def released(endpoint: Endpoint) -> bool:
    """The endpoint forgot every connection and keeps no timer for them."""
    return not endpoint.connections and not endpoint._armed and endpoint._timer is None
