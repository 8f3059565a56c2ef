"""Exceptions. Each also derives from the builtin a socket user already catches.

``except ConnectionResetError`` or ``except TimeoutError`` keeps working when a
program moves from TCP to rudp; ``except rudp.RudpError`` catches them all.
"""

from __future__ import annotations

__all__ = [
    "ClosedError",
    "ConnectionRefused",
    "ConnectionReset",
    "DeadPeerError",
    "ProtocolError",
    "RudpError",
]


class RudpError(Exception):
    """Base of every rudp error."""


class ConnectionRefused(RudpError, ConnectionRefusedError):
    """The peer answered the handshake with a refusal (nothing listens, or its backlog is full)."""


class ConnectionReset(RudpError, ConnectionResetError):
    """The peer reset the connection or stream; queued data was discarded.

    ``reason`` carries the peer's reason text when it sent one.
    """

    def __init__(self, message: str = "connection reset by peer", reason: str = "") -> None:
        super().__init__(message if not reason else f"{message}: {reason}")
        self.reason = reason


class DeadPeerError(RudpError, TimeoutError):
    """The peer stopped answering: nothing heard within ``idle_timeout``, a segment
    was sent ``dead_link`` times without an acknowledgement, or the handshake
    did not complete within ``connect_timeout``."""


class ClosedError(RudpError, ConnectionError):
    """The connection or stream was closed locally; no more I/O is possible on it."""


class ProtocolError(RudpError):
    """The peer broke the protocol (the connection is reset)."""
