"""rudp: reliable UDP for Python (KCP-compatible ARQ, Reed-Solomon FEC, stream multiplexing)."""

from rudp.asyncio import (
    Server,
    Session,
    StreamReader,
    StreamWriter,
    connect,
    open_connection,
    serve,
    start_server,
)
from rudp.config import Configuration
from rudp.connection import Connection
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
    "Connection",
    "ConnectionRefused",
    "ConnectionReset",
    "DeadPeerError",
    "ProtocolError",
    "RudpError",
    "Server",
    "Session",
    "StreamReader",
    "StreamWriter",
    "__version__",
    "connect",
    "open_connection",
    "serve",
    "start_server",
]
