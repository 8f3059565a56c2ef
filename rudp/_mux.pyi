"""Type stub of the compiled mux; the contract is ``rudp.mux.Session``'s."""

from rudp.mux import Session as _Reference

class Session(_Reference):
    """``rudp.mux.Session`` compiled (byte-identical); ``stats`` is a snapshot."""
