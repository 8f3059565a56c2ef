"""Type stub of the compiled connection; the contract is ``rudp.connection.Connection``'s."""

from rudp.connection import Connection as _Reference

class Connection(_Reference):
    """``rudp.connection.Connection`` compiled (the same behaviour, see tests/test_connection_differential.py)."""
