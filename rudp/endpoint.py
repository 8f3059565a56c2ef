"""One UDP socket serving many connections, driven by an asyncio event loop.

This is the thin I/O layer under the asyncio API: it moves datagrams between
the socket and the sans-I/O :class:`~rudp.connection.Connection` objects, and
keeps ONE timer heap for all of them (an idle connection has no entry at all,
a waiting one has one). It holds no protocol logic.

The socket is read with ``loop.add_reader`` and drained in batches
(``recvmmsg``/GRO via :mod:`rudp.udp`) instead of asyncio's datagram
transport, which reads one datagram per loop iteration.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import socket
from collections.abc import Callable
from typing import Any, Protocol

from rudp import udp, wire
from rudp.config import Configuration
from rudp.connection import TERMINATED, Connection
from rudp.events import Address
from rudp.listener import Listener

__all__ = ["Endpoint", "Handler"]

#: (version, type, connection id) of a rudp datagram: sessions are keyed by the id.
_cid_of = wire.RUDP_HEADER.unpack_from

#: Datagrams read per batch before other loop work gets a turn.
RECV_BATCH = 256
#: What the kernel charges per queued full-size datagram (its buffer, not just the payload).
DATAGRAM_TRUESIZE = 2304
#: The receive buffer stops growing with the number of connections here.
MAX_RECEIVE_BUFFER = 64 * 1024 * 1024


class Handler(Protocol):
    """What the layer above attaches to each connection (the asyncio driver)."""

    def on_event(self) -> None:
        """Drain the connection's events (called after input, timers and flushes) and
        hand the connection what the layers above have to send, until nothing is left:
        after it, only new connection events (``Connection.has_events``) need it again."""

    def get_timer(self, now: float) -> float | None:
        """The next deadline of the connection and of whatever sits on it."""

    def handle_timer(self, now: float) -> None:
        """Run what is due."""


class Endpoint:
    """A UDP socket plus the connections it carries, each with its :class:`Handler`.

    Servers pass a :class:`~rudp.listener.Listener` and ``on_accept(conn)``,
    which returns the new connection's handler; ``can_accept()`` False makes the
    listener refuse (the accept backlog is full).
    """

    def __init__(
        self,
        sock: socket.socket,
        configuration: Configuration,
        *,
        connected: bool = False,
        listener: Listener | None = None,
        on_accept: Callable[[Connection], Handler] | None = None,
        can_accept: Callable[[], bool] | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.configuration = configuration
        self.capabilities = udp.configure(sock)
        self._io = udp.datagram_io(sock)
        self.connected = connected  # connect()ed to its one peer (clients): send without an address
        self.listener = listener
        self._rudp = configuration.framing == "rudp"
        self._on_accept = on_accept
        self._can_accept = can_accept or (lambda: True)
        self.connections: dict[Any, Connection] = {}
        self.handlers: dict[Any, Handler] = {}
        # timer heap: (deadline, seq, key); a connection's live entry is in _armed[key]
        self._heap: list[tuple[float, int, Any]] = []
        self._armed: dict[Any, float] = {}
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._dirty: set[Any] = set()
        self._flush_scheduled = False
        self._flushed_in_pass = False  # a touch sent at once since the last _flush_dirty
        self._backlog: dict[Address, list[bytes]] = {}  # output waiting for the socket to drain
        self._writer_armed = False
        self.closed = False
        self.counters = dict.fromkeys(
            ("datagrams_in", "datagrams_out", "bytes_in", "bytes_out", "unknown"), 0
        )
        self.loop.add_reader(sock.fileno(), self._on_readable)

    # ------------------------------------------------------------------ keys

    def key_of(self, conn: Connection) -> Any:
        return conn.cid if self._rudp else conn.peer_address

    def add(self, conn: Connection, handler: Handler) -> None:
        key = self.key_of(conn)
        self.connections[key] = conn
        self.handlers[key] = handler
        self._size_receive_buffer()
        self.touch(conn)

    def _size_receive_buffer(self) -> None:
        """Room in the socket for what every connection's receive window allows in flight:
        many fast senders into one server socket must not overflow it (kcp-go's does)."""
        config = self.configuration
        per_connection = config.rcvwnd * DATAGRAM_TRUESIZE * max(1, config.mtu // 1400)
        udp.grow_receive_buffer(
            self.sock, min(MAX_RECEIVE_BUFFER, len(self.connections) * per_connection)
        )

    # ------------------------------------------------------------------ input

    def _on_readable(self) -> None:
        try:
            batch = self._io.recv_batch(RECV_BATCH)
        except ConnectionRefusedError:
            now = self.loop.time()
            for conn in list(self.connections.values()):
                conn.receive_unreachable(now)
                self.flush_now(conn, now)
            return
        except OSError:
            return
        if not batch:
            return
        now = self.loop.time()
        counters = self.counters
        counters["datagrams_in"] += len(batch)
        touched: dict[Any, Connection] = {}
        connections = self.connections
        rudp_framing = self._rudp
        size = 0
        for data, addr in batch:
            size += len(data)
            if rudp_framing:
                key = _cid_of(data)[2] if len(data) >= wire.RUDP_OVERHEAD else None
            else:
                key = addr
            conn = connections.get(key)
            if conn is None:
                conn = self._unknown(data, addr, now)
                if conn is None:
                    continue
                key = self.key_of(conn)
            else:
                conn.receive_datagram(data, addr, now)
            touched[key] = conn
        counters["bytes_in"] += size
        if self.listener is not None:
            for packet, addr in self.listener.datagrams_to_send():
                self._send([packet], addr)
        handlers, dirty = self.handlers, self._dirty
        for key in touched:
            # Wake readers now, but send (ACKs) at the end of the next loop pass: a reply
            # the woken task writes in that pass then leaves in the same datagram.
            handler = handlers.get(key)
            if handler is not None:
                handler.on_event()
            dirty.add(key)
        if touched and not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush_dirty)

    def _unknown(self, data: bytes, addr: Address, now: float) -> Connection | None:
        if self.listener is None or self._on_accept is None:
            self.counters["unknown"] += 1
            return None
        conn = self.listener.receive_datagram(data, addr, now, accepting=self._can_accept())
        if conn is None:
            return None
        key = self.key_of(conn)
        self.connections[key] = conn
        self.handlers[key] = self._on_accept(conn)
        self._size_receive_buffer()
        return conn

    # ------------------------------------------------------------------ output and timers

    def touch(self, conn: Connection, immediate: bool = True) -> None:
        """Something happened on ``conn`` (a write, a read): send what is due.

        The first touch of a loop pass sends at once (no tick, no added latency),
        with the ACKs that input left for the end of the pass: a reply written
        right after a request leaves at once and carries them. Later touches in
        the same pass are coalesced into one flush at its end, so a burst of small
        writes leaves in few datagrams.
        """
        key = conn.cid if self._rudp else conn.peer_address
        if immediate and not self._flushed_in_pass:
            self._flushed_in_pass = True
            self._dirty.discard(key)  # this flush sends what it was waiting for
            self.flush_now(conn)
        else:
            self._dirty.add(key)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush_dirty)

    def _flush_dirty(self) -> None:
        self._flush_scheduled = False
        self._flushed_in_pass = False
        dirty, self._dirty = self._dirty, set()
        now = self.loop.time()
        for key in dirty:
            conn = self.connections.get(key)
            if conn is not None:
                self.flush_now(conn, now)

    def flush_now(self, conn: Connection, now: float | None = None) -> None:
        """Drain a connection's events and datagrams, and re-arm its timer."""
        if now is None:
            now = self.loop.time()
        key = conn.cid if self._rudp else conn.peer_address
        handler = self.handlers.get(key)
        for _ in range(4):
            if handler is not None:
                handler.on_event()
            out = conn.datagrams_to_send(now)
            if not out:
                break
            if conn.peer_address is not None:
                self._send(out, conn.peer_address)
            if not conn.has_events:
                break  # the handler has nothing new to react to (it leaves no work behind)
        deadline = handler.get_timer(now) if handler is not None else conn.get_timer(now)
        if deadline is None:
            if conn.state is TERMINATED:
                self.connections.pop(key, None)
                self.handlers.pop(key, None)
            if self._armed.pop(key, None) is not None:
                self._arm_loop_timer()  # its entry is stale now: wake for the others only
            return
        armed = self._armed.get(key)
        if armed is None or deadline < armed:
            self._armed[key] = deadline
            heapq.heappush(self._heap, (deadline, next(self._seq), key))
            self._arm_loop_timer()

    def _arm_loop_timer(self) -> None:
        """Arm the loop timer for the earliest live deadline, or cancel it when there is none."""
        heap, armed = self._heap, self._armed
        while heap and armed.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)  # superseded, or its connection has nothing due any more
        first = heap[0][0] if heap else None
        if first == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timer_at = None
        if first is not None:
            self._timer_at = first
            self._timer = self.loop.call_at(first, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        now = self.loop.time()
        heap = self._heap
        due: list[Connection] = []
        while heap and heap[0][0] <= now:
            deadline, _, key = heapq.heappop(heap)
            if self._armed.get(key) != deadline:
                continue  # superseded by an earlier entry that already ran
            del self._armed[key]
            conn = self.connections.get(key)
            if conn is not None:
                due.append(conn)
        for conn in due:
            handler = self.handlers.get(self.key_of(conn))
            if handler is not None:
                handler.handle_timer(now)
            else:
                conn.handle_timer(now)
            self.flush_now(conn, now)
        self._arm_loop_timer()

    def _send(self, datagrams: list[bytes], addr: Address) -> None:
        if self.closed:
            return
        pending = self._backlog.get(addr)
        if pending is not None:  # keep order behind what is already waiting
            pending.extend(datagrams)
            return
        sent = self._send_now(datagrams, addr)
        if sent < len(datagrams):
            self._backlog[addr] = datagrams[sent:]
            self._arm_writer()

    def _send_now(self, datagrams: list[bytes], addr: Address) -> int:
        try:
            sent = self._io.send_batch(datagrams, None if self.connected else addr)
        except (ConnectionRefusedError, OSError):
            sent = len(datagrams)  # unreachable or a transient error: the ARQ repeats what matters
        counters = self.counters
        counters["datagrams_out"] += sent
        counters["bytes_out"] += sum(
            map(len, datagrams[:sent] if sent < len(datagrams) else datagrams)
        )
        return sent

    def _arm_writer(self) -> None:
        if not self._writer_armed:
            self._writer_armed = True
            self.loop.add_writer(self.sock.fileno(), self._on_writable)

    def _on_writable(self) -> None:
        for addr in list(self._backlog):
            datagrams = self._backlog[addr]
            sent = self._send_now(datagrams, addr)
            if sent < len(datagrams):
                del datagrams[:sent]
                return
            del self._backlog[addr]
        self._writer_armed = False
        self.loop.remove_writer(self.sock.fileno())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        self.loop.remove_reader(self.sock.fileno())
        if self._writer_armed:
            self.loop.remove_writer(self.sock.fileno())
        self.sock.close()
