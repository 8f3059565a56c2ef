"""rudp: reliable UDP for Python (KCP-compatible ARQ, Reed-Solomon FEC, stream multiplexing)."""

from rudp.config import Configuration
from rudp.errors import (
    ClosedError,
    ConnectionRefused,
    ConnectionReset,
    DeadPeerError,
    ProtocolError,
    RudpError,
)

__version__ = "0.1.0"

__all__ = [
    "ClosedError",
    "Configuration",
    "ConnectionRefused",
    "ConnectionReset",
    "DeadPeerError",
    "ProtocolError",
    "RudpError",
    "__version__",
]
