"""Events a :class:`rudp.Connection` reports to the layer that drives it.

Frozen dataclasses, drained with ``Connection.next_event()`` after feeding a
datagram or a timer, in the style of aioquic and h11.
"""

from __future__ import annotations

from dataclasses import dataclass

from rudp.errors import RudpError

Address = tuple[str, int] | tuple[str, int, int, int]

__all__ = [
    "Address",
    "AddressChanged",
    "Connected",
    "DataReadable",
    "EndOfData",
    "Event",
    "PongReceived",
    "Terminated",
]


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of connection events."""


@dataclass(frozen=True, slots=True)
class Connected(Event):
    """Data can flow: the client got its cookie answered, or the server verified the client."""

    peer: Address


@dataclass(frozen=True, slots=True)
class DataReadable(Event):
    """New bytes (stream mode) or messages (message mode) can be read with ``read()``."""


@dataclass(frozen=True, slots=True)
class EndOfData(Event):
    """The peer will send nothing more; once ``read()`` has drained the buffer it returns EOF."""


@dataclass(frozen=True, slots=True)
class AddressChanged(Event):
    """The peer's packets now come from another address (NAT rebinding, a moved client)."""

    old: Address
    new: Address


@dataclass(frozen=True, slots=True)
class PongReceived(Event):
    """The peer answered the ping with this token (see ``Connection.ping``)."""

    token: int


@dataclass(frozen=True, slots=True)
class Terminated(Event):
    """The connection is over; ``error`` is None after a clean close on both sides."""

    error: RudpError | None
