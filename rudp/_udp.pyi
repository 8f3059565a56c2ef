"""Type stub for the compiled Linux batched datagram I/O (see rudp/udp.py)."""

import socket
from collections.abc import Iterable

from rudp.udp import Address, Capabilities

class NativeDatagramIO:
    sock: socket.socket
    family: int
    gro: bool
    gso: bool
    max_datagrams: int
    recv_size: int
    rcvbuf: int
    sndbuf: int
    def __init__(
        self,
        sock: socket.socket,
        *,
        gso: bool,
        gro: bool,
        max_datagrams: int = 64,
        recv_size: int = 65536,
        rcvbuf: int = 0,
        sndbuf: int = 0,
    ) -> None: ...
    @property
    def capabilities(self) -> Capabilities: ...
    def stats(self) -> dict[str, int]: ...
    def recv_batch(self, max_datagrams: int | None = None) -> list[tuple[bytes, Address]]: ...
    def send_batch(self, datagrams: Iterable[bytes], addr: Address | None = None) -> int: ...
    def send_many(self, items: Iterable[tuple[bytes, Address]]) -> int: ...
