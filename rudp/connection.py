"""The sans-I/O connection: framing, handshake, close, keepalive, dead-peer detection.

A :class:`Connection` wraps one ARQ engine (``rudp.engine.Arq``) in one of
three framings:

* ``rudp``: the envelope of :mod:`rudp.wire` with a connection id, a stateless
  cookie handshake (see :mod:`rudp.listener` for the server half), graceful
  close, reset, keepalive and address migration;
* ``kcp``: bare KCP segments, byte-compatible with the reference C KCP;
* ``kcp-go``: KCP segments behind kcp-go's 20-byte nonce + CRC32 header
  (kcptun's ``--crypt none``).

It never touches a socket or a clock: the caller passes datagrams and the time
in and takes datagrams, events and the next deadline out. Time is float
seconds at this API and integer milliseconds inside the engine.
"""

from __future__ import annotations

import enum
import random
import struct
from collections import deque
from typing import Any

from rudp import wire
from rudp.config import Configuration
from rudp.errors import (
    ClosedError,
    ConnectionRefused,
    ConnectionReset,
    DeadPeerError,
    ProtocolError,
    RudpError,
)
from rudp.events import (
    Address,
    AddressChanged,
    Connected,
    DataReadable,
    EndOfData,
    Event,
    PongReceived,
    Terminated,
)
from rudp.fec import FecController, FecDecoder, FecEncoder

__all__ = ["Connection", "ConnectionState", "local_params", "negotiate"]

_DATA_READABLE = DataReadable()  # it has no fields: one instance serves every signal

#: Handshake and close retransmissions start here and double up to the cap.
HANDSHAKE_RTO = 0.2
HANDSHAKE_RTO_MAX = 2.0
#: How long a closed connection lingers to answer a repeated CLOSE (TIME-WAIT).
LINGER_RTOS = 3
#: fec="auto": group size, the most parity per group, and how often loss is measured.
AUTO_DATA_SHARDS = 10
AUTO_MAX_PARITY = 8
FEC_MEASURE_INTERVAL = 0.5
FEC_MIN_SAMPLES = 20


class ConnectionState(enum.Enum):
    HANDSHAKE = "handshake"  # client: INIT sent, no RETRY yet
    ESTABLISHED = "established"
    TIME_WAIT = "time-wait"  # both sides closed; lingering to re-acknowledge a lost CLOSE_ACK
    TERMINATED = "terminated"


# The states by plain module names for the per-packet checks: reading a member through
# its class goes through the enum metaclass's __getattr__ hook, several times slower.
HANDSHAKE, ESTABLISHED, TIME_WAIT, TERMINATED = ConnectionState
# The same for what every rudp datagram needs from rudp.wire.
_RUDP_OVERHEAD = wire.RUDP_OVERHEAD
_unpack_rudp_header = wire.RUDP_HEADER.unpack_from


def local_params(config: Configuration) -> wire.Params:
    """What this side announces in INIT (client) or RETRY (server)."""
    flags = 0
    if config.message_mode:
        flags |= wire.FLAG_MESSAGE_MODE
    if config.mux_effective:
        flags |= wire.FLAG_MUX | wire.FLAG_MUX_EXTENSIONS
    fec_k = fec_m = 0
    if config.fec == "auto":
        flags |= wire.FLAG_FEC_AUTO
    elif isinstance(config.fec, tuple | list):
        fec_k, fec_m = config.fec
    return wire.Params(
        mtu=config.mtu,
        rcvwnd=config.rcvwnd,
        flags=flags,
        fec_k=fec_k,
        fec_m=fec_m,
        smux_version=config.smux_version if config.mux_effective else 0,
        stream_buffer=config.stream_buffer if config.mux_effective else 0,
    )


def negotiate(client: wire.Params, server: wire.Params) -> wire.Params:
    """The parameters both sides use, computed the same way on each side.

    Raises ``ValueError`` (the server answers with a refusal) when the two
    cannot talk: one side wants message mode or the mux and the other does not.
    """
    for flag, what in (
        (wire.FLAG_MESSAGE_MODE, "message mode"),
        (wire.FLAG_MUX, "stream multiplexing"),
    ):
        if (client.flags ^ server.flags) & flag:
            raise ValueError(f"{what} is enabled on one side only")
    flags = client.flags & server.flags
    client_fec = bool(client.fec_k or client.flags & wire.FLAG_FEC_AUTO)
    server_fec = bool(server.fec_k or server.flags & wire.FLAG_FEC_AUTO)
    fec_k = fec_m = 0
    if client_fec and server_fec:
        if (client.flags | server.flags) & wire.FLAG_FEC_AUTO:
            flags |= wire.FLAG_FEC_AUTO
        else:
            fec_k, fec_m = client.fec_k, client.fec_m
    else:
        flags &= ~wire.FLAG_FEC_AUTO
    return wire.Params(
        mtu=min(client.mtu, server.mtu),
        rcvwnd=server.rcvwnd,
        flags=flags,
        fec_k=fec_k,
        fec_m=fec_m,
        smux_version=min(client.smux_version, server.smux_version),
        stream_buffer=server.stream_buffer,
    )


def _framing_overhead(framing: str) -> int:
    return {"rudp": wire.RUDP_OVERHEAD, "kcp": 0, "kcp-go": wire.KCPGO_OVERHEAD}[framing]


class Connection:
    """One reliable connection, any framing. See the module docstring.

    Client (rudp framing)::

        conn = Connection(config, is_client=True, cid=random_u64)
        conn.connect(server_address, now)

    Servers get their connections from :class:`rudp.listener.Listener`.
    ``engine`` selects the ARQ implementation class (default: the compiled one
    when available, see :mod:`rudp.engine`).
    """

    def __init__(
        self,
        configuration: Configuration,
        *,
        is_client: bool,
        cid: int = 0,
        peer: Address | None = None,
        engine: Any = None,
        seed: int | None = None,
    ) -> None:
        if engine is None:
            from rudp.engine import Arq as engine
        self.configuration = configuration
        self.is_client = is_client
        self.cid = cid & 0xFFFF_FFFF_FFFF_FFFF
        self.peer_address: Address | None = peer
        self._engine_cls = engine
        self._framing = configuration.framing
        self._rudp = self._framing == "rudp"
        # Only clients ping (servers answer): an idle server costs one reply per client per interval.
        self._pings = self._rudp and is_client
        self._idle_timeout = configuration.idle_timeout
        self._header = wire.encode_header(wire.PKT_DATA, self.cid) if self._rudp else b""
        self._rng = random.Random(seed if seed is not None else self.cid)
        self.params: wire.Params = local_params(configuration)
        self.engine: Any = None
        self.state = HANDSHAKE
        self._events: deque[Event] = deque()
        self._out: list[bytes] = []
        self._prebuffer: list[bytes] = []  # writes before the engine exists (client handshake)
        self._t0: float | None = None
        self._needs_flush = False
        self._cookie = b""
        # handshake / close retransmission
        self._hs_deadline = 0.0
        self._hs_next: float | None = None
        self._hs_rto = HANDSHAKE_RTO
        self._confirmed = not is_client  # client: ACCEPT (or any server packet) seen
        # liveness
        self._last_recv = 0.0
        self._ping_token: int | None = None
        self._ping_next: float | None = None
        self._last_ping_seen = b""
        # closing
        self._write_closed = False  # write_eof()/close() called
        self._full_close = False  # close() called: tear down once our side is done
        self._close_sent = False
        self._close_acked = False
        self._peer_closed = False
        self._close_next: float | None = None
        self._close_deadline: float | None = None
        self._linger_until: float | None = None
        self._eof_signalled = False
        self.error: RudpError | None = None
        self._fec_enc: FecEncoder | None = None
        self._fec_dec: FecDecoder | None = None
        self._fec_ctl: FecController | None = None
        self._fec_next_measure = 0.0
        self._bundle = configuration.bundle_effective  # the engine's bundling while FEC is off
        self._bundle_with_fec = min(1, self._bundle)  # ... and while parity is sent
        self._fec_marks = (0, 0, 0, 0)  # retransmitted, sent, shards lost, shards expected
        self._last_now = 0.0
        self._counters = dict.fromkeys(
            (
                "packets_in",
                "packets_out",
                "bytes_in",
                "bytes_out",
                "in_errors",
                "in_csum_errors",
                "handshake_packets_out",
                "pings_out",
                "migrations",
            ),
            0,
        )

    # ------------------------------------------------------------------ set-up

    def connect(self, peer: Address, now: float) -> None:
        """Client: start the handshake (rudp framing) or just start (kcp framings)."""
        if not self.is_client:
            raise RuntimeError("connect() is for client connections")
        self.peer_address = peer
        self._start_clock(now)
        self._hs_deadline = now + self.configuration.connect_timeout
        if self._rudp:
            self._send_init(now)
        else:
            self._establish(self.params, now)

    def _start_clock(self, now: float) -> None:
        if self._t0 is None:
            self._t0 = now
            self._last_recv = now

    def accept(self, negotiated: wire.Params, peer: Address, now: float) -> None:
        """Server: the listener verified this client (or, for kcp framings, saw its first segment)."""
        self.peer_address = peer
        self._start_clock(now)
        self._establish(negotiated, now)
        if self._rudp:
            self._send_control(wire.encode_handshake(wire.PKT_ACCEPT, self.cid, negotiated))

    def _establish(self, negotiated: wire.Params, now: float) -> None:
        cfg = self.configuration
        self.params = negotiated
        mtu = negotiated.mtu - _framing_overhead(self._framing)
        if self._rudp and (negotiated.fec_k or negotiated.flags & wire.FLAG_FEC_AUTO):
            mtu -= wire.FEC_OVERHEAD
            self._start_fec(negotiated, now)
        self.engine = self._engine_cls(
            # rudp: the low bits of the connection id. KCP framings: the configured conv,
            # or (conv=0, as kcp-go does) a random one per client session, so a server
            # tells a restarted client on the same port from its old session.
            self.cid & 0xFFFFFFFF if self._rudp or not cfg.conv else cfg.conv,
            mtu=mtu,
            snd_wnd=cfg.sndwnd,
            rcv_wnd=cfg.rcvwnd,
            nodelay=cfg.nodelay_effective,
            interval=cfg.interval_ms,
            resend=cfg.resend_effective,
            congestion=cfg.congestion_effective,
            pacing=cfg.pacing,
            stream=not cfg.message_mode,
            rto_min=round(cfg.rto_min_effective * 1000),
            rto_max=round(cfg.rto_max * 1000),
            fast_limit=cfg.fast_limit,
            dead_link=cfg.dead_link,
            max_message=cfg.max_message_size,
            bundle=cfg.bundle_effective,
        )
        for chunk in self._prebuffer:
            self.engine.send(chunk)
        self._prebuffer.clear()
        self.state = ESTABLISHED
        self._needs_flush = True
        self._schedule_ping(now)
        assert self.peer_address is not None
        self._events.append(Connected(self.peer_address))

    # ------------------------------------------------------------------ time

    def _ms(self, now: float) -> int:
        assert self._t0 is not None
        return int((now - self._t0) * 1000 + 1e-6) & 0xFFFFFFFF

    def _from_ms(self, ms: int, now: float, now_ms: int | None = None) -> float:
        """Engine deadline (absolute engine ms) → seconds, robust to uint32 wrap.
        ``now_ms``: ``_ms(now)`` when the caller has it already."""
        if now_ms is None:
            now_ms = self._ms(now)
        delta = ((ms - now_ms + 0x80000000) & 0xFFFFFFFF) - 0x80000000
        return now + max(delta, 0) / 1000.0

    def get_timer(self, now: float | None = None) -> float | None:
        """The next time :meth:`handle_timer` must run, or None (nothing pending at all)."""
        state = self.state
        if state is TERMINATED or self._t0 is None:
            return None
        # The earliest of the deadlines that are set (this runs after every flush).
        first = self._ping_next
        for t in (self._hs_next, self._close_next, self._linger_until, self._close_deadline):
            if t is not None and (first is None or t < first):
                first = t
        if (state is HANDSHAKE or not self._confirmed) and (
            first is None or self._hs_deadline < first
        ):
            first = self._hs_deadline
        if state is not ESTABLISHED:
            return first
        ref = self._last_now if now is None else now
        t = self._last_recv + self._idle_timeout
        if first is None or t < first:
            first = t
        if self._needs_flush or self._out:
            return ref if ref < first else first  # (FEC's deadlines are never before now)
        ref_ms = self._ms(ref)
        engine, fec = self.engine, self._fec_enc
        if (
            engine is not None
            and (due := engine.check(ref_ms)) is not None
            and (t := self._from_ms(due, ref, ref_ms)) < first
        ):
            first = t
        if (
            fec is not None
            and (due := fec.next_deadline()) is not None
            and (t := self._from_ms(due, ref, ref_ms)) < first
        ):
            first = t
        return first

    def handle_timer(self, now: float) -> None:
        """Run whatever is due at ``now``."""
        self._last_now = now
        if self.state is TERMINATED or self._t0 is None:
            return
        if self._linger_until is not None and now >= self._linger_until:
            self._terminate(None)
            return
        if (self.state is HANDSHAKE or not self._confirmed) and now >= self._hs_deadline:
            self._terminate(
                DeadPeerError(f"no answer from {self.peer_address} within the connect timeout")
            )
            return
        if self.state is ESTABLISHED:
            if now >= self._last_recv + self.configuration.idle_timeout:
                self._abort(
                    DeadPeerError(
                        f"nothing heard from the peer for {self.configuration.idle_timeout:g} s"
                    )
                )
                return
            if self._close_deadline is not None and now >= self._close_deadline:
                self._abort(DeadPeerError("close did not complete within close_timeout"))
                return
            due = self.engine.check(self._ms(now))
            if due is not None and self._from_ms(due, now) <= now:
                self._needs_flush = True
            if self._fec_enc is not None:
                self._send_parity(self._fec_enc.poll(self._ms(now)))
        if self._hs_next is not None and now >= self._hs_next:
            self._retransmit_handshake(now)
        if self._ping_next is not None and now >= self._ping_next:
            self._send_ping(now)
        if self._close_next is not None and now >= self._close_next:
            self._send_close(now)

    # ------------------------------------------------------------------ input

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        """Feed one datagram that arrived from ``addr``."""
        self._last_now = now
        if self.state is TERMINATED:
            return
        if self._t0 is None:
            self._start_clock(now)
        counters = self._counters
        counters["packets_in"] += 1
        counters["bytes_in"] += len(data)
        if self._rudp:
            self._receive_rudp(data, addr, now)
            return
        if self._framing == "kcp-go":
            try:
                payload = wire.decode_kcpgo(data)
            except ValueError:
                self._counters["in_csum_errors"] += 1
                return
        else:
            payload = data
        self._receive_kcp(payload, addr, now)

    def _receive_kcp(
        self, payload: bytes | memoryview, addr: Address, now: float, rtt_sample: bool = True
    ) -> None:
        engine = self.engine
        if engine is None:
            return
        before = engine.readable
        moved = addr != self.peer_address
        if moved:
            progress_before = self._progress()
        if engine.input(payload, self._ms(now), rtt_sample) < 0:
            self._counters["in_errors"] += 1
            return
        if not self._confirmed:
            self._confirm()  # kcp framings have no handshake: the first valid segment confirms
        self._heard_from(addr, now)
        if moved and self._progress() != progress_before:
            self._migrate(addr)
        self._needs_flush = True
        if self._full_close:
            self._discard_input()
        elif engine.readable > before:
            self._signal_readable()
        if engine.dead:
            self._abort(DeadPeerError("a segment went unacknowledged dead_link times"))

    def _heard_from(self, addr: Address, now: float) -> None:
        self._last_recv = now
        if self._pings:  # (_schedule_ping, inline: this runs for every datagram)
            self._ping_next = now + self.configuration.keepalive

    def _progress(self) -> tuple[int, int]:
        """What only a live peer can advance: data we had not seen, and our unacked data.

        A datagram from a new address moves the session there (NAT rebinding, a
        moved client) only if it advanced this: a replayed old datagram does not.
        (Without authentication an on-path observer can still forge one; AEAD will
        close that.)
        """
        stats = self.engine.stats()
        fresh = (
            stats["in_segs"] - stats["ack_segs_in"] - stats["repeat_segs"] - stats["out_of_window"]
        )
        return fresh, self.engine.inflight

    def _migrate(self, addr: Address) -> None:
        if self.state is not ESTABLISHED or addr == self.peer_address:
            return
        old = self.peer_address
        self.peer_address = addr
        self._counters["migrations"] += 1
        assert old is not None
        self._events.append(AddressChanged(old, addr))

    def _receive_rudp(self, data: bytes, addr: Address, now: float) -> None:
        if len(data) < _RUDP_OVERHEAD:
            self._counters["in_errors"] += 1
            return
        ver, ptype, cid = _unpack_rudp_header(data)
        if ver != wire.RUDP_VERSION or cid != self.cid or ptype not in wire.PACKET_TYPES:
            self._counters["in_errors"] += 1
            return
        body = memoryview(data)[_RUDP_OVERHEAD:]
        try:
            if ptype == wire.PKT_DATA and self.state is ESTABLISHED:  # as _dispatch does it
                if not self._confirmed:
                    self._confirm()
                self._receive_kcp(body, addr, now)
            else:
                self._dispatch(ptype, body, addr, now)
        except (ValueError, struct.error):  # a truncated or malformed body
            self._counters["in_errors"] += 1

    def _dispatch(self, ptype: int, body: memoryview, addr: Address, now: float) -> None:
        if ptype == wire.PKT_DATA:
            if self.state is ESTABLISHED:
                self._confirm()
                self._receive_kcp(body, addr, now)
            elif self.state is TIME_WAIT:
                self._heard_from(addr, now)
            return
        if ptype in (wire.PKT_DATA_FEC, wire.PKT_PARITY):
            if self.state is ESTABLISHED and self._fec_dec is not None:
                self._confirm()
                self._receive_fec(ptype, body, addr, now)
            return
        if ptype == wire.PKT_RESET:
            code, reason = wire.decode_reason(body)
            if self.state is TIME_WAIT or (self._close_acked and self._peer_closed):
                self._terminate(None)
            elif code == wire.CODE_REFUSED:
                self._terminate(
                    ConnectionRefused(f"connection refused by {addr}: {reason or 'refused'}")
                )
            else:
                self._terminate(ConnectionReset(reason=reason))
            return
        if self.is_client and ptype == wire.PKT_RETRY and self.state is HANDSHAKE:
            params, cookie = wire.decode_handshake(body, with_cookie=True)
            try:
                negotiated = negotiate(self.params, params)
            except ValueError as exc:
                self._terminate(ConnectionRefused(f"incompatible server: {exc}"))
                return
            self._cookie = cookie
            self._last_recv = now
            self._establish(negotiated, now)
            self._send_init(now)  # INIT with the cookie; repeated until confirmed
            return
        if self.is_client and ptype == wire.PKT_ACCEPT:
            if self.state is ESTABLISHED:
                self._confirm()
                self._heard_from(addr, now)
            return
        if not self.is_client and ptype == wire.PKT_INIT:
            # A repeated INIT (our ACCEPT was lost): answer again.
            if self.state is ESTABLISHED and addr == self.peer_address:
                self._send_control(wire.encode_handshake(wire.PKT_ACCEPT, self.cid, self.params))
            return
        if self.state not in (ESTABLISHED, TIME_WAIT):
            return
        self._confirm()
        self._heard_from(addr, now)
        if ptype == wire.PKT_PING:
            if (
                addr != self.peer_address
                and bytes(body[: wire.PING_BODY.size]) != self._last_ping_seen
            ):
                self._migrate(addr)  # an idle client's keepalive from its new address
            self._last_ping_seen = bytes(body[: wire.PING_BODY.size])
            self._send_control(
                wire.encode_header(wire.PKT_PONG, self.cid) + bytes(body[: wire.PING_BODY.size])
            )
        elif ptype == wire.PKT_PONG and len(body) >= wire.PING_BODY.size:
            (token,) = wire.PING_BODY.unpack_from(body)
            if token == self._ping_token:
                self._ping_token = None  # a keepalive answered
            else:
                self._events.append(PongReceived(token))
        elif ptype == wire.PKT_CLOSE:
            wire.decode_reason(body)
            self._send_control(wire.encode_header(wire.PKT_CLOSE_ACK, self.cid))
            if not self._peer_closed:
                self._peer_closed = True
                self._signal_eof()
                self._maybe_finish(now)
        elif ptype == wire.PKT_FEC_REPORT and self._fec_ctl is not None and self._fec_ctl.active:
            (loss,) = wire.FEC_REPORT.unpack_from(body)
            self._fec_ctl.update(loss / 0xFFFF)
        elif ptype == wire.PKT_CLOSE_ACK and self._close_sent and not self._close_acked:
            self._close_acked = True
            self._close_next = None
            self._maybe_finish(now)

    def _confirm(self) -> None:
        if not self._confirmed:
            self._confirmed = True
            self._hs_next = None

    def receive_unreachable(self, now: float) -> None:
        """The I/O layer got ICMP port-unreachable for this peer.

        During the handshake nothing listens there: refuse at once. Later it is
        ignored (it may be transient); dead-peer detection covers a real loss.
        """
        if self.state is HANDSHAKE:
            self._terminate(ConnectionRefused(f"nothing listens at {self.peer_address}"))

    # ------------------------------------------------------------------ application

    def send(self, data: bytes) -> None:
        """Queue bytes (stream mode) or one message (message mode) for the peer."""
        if self._write_closed or self.state is TERMINATED or self.state is TIME_WAIT:
            if self.error is not None and not isinstance(self.error, ClosedError):
                raise self.error
            raise ClosedError("the connection is closed for writing")
        if not data:
            return
        if self.engine is None:
            self._prebuffer.append(bytes(data))
        else:
            self.engine.send(data)
            self._needs_flush = True

    @property
    def send_buffered(self) -> int:
        """Bytes accepted by :meth:`send` and not yet acknowledged by the peer."""
        queued = sum(map(len, self._prebuffer)) if self._prebuffer else 0
        return queued + (self.engine.pending_bytes if self.engine is not None else 0)

    @property
    def send_window_free(self) -> int:
        """How many more bytes fit before the send buffer reaches ``send_buffer``."""
        return max(0, self.configuration.send_buffer - self.send_buffered)

    def read(self, limit: int = -1) -> bytes:
        """Stream mode: up to ``limit`` readable bytes (``b""`` when none or at EOF)."""
        if self.engine is None:
            return b""
        data = self.engine.recv(limit)
        if data:
            self._needs_flush = True  # the window may have reopened: tell the peer now
        return data

    def read_message(self) -> bytes | None:
        """Message mode: the next whole message, or None."""
        if self.engine is None:
            return None
        msg = self.engine.recv_message()
        if msg is not None:
            self._needs_flush = True
        return msg

    @property
    def readable(self) -> int:
        return self.engine.readable if self.engine is not None else 0

    @property
    def write_closed(self) -> bool:
        """write_eof() or close() was called: nothing more may be sent."""
        return self._write_closed

    @property
    def at_eof(self) -> bool:
        """The peer closed its side and everything it sent has been read."""
        return self._peer_closed and (self.engine is None or self.engine.readable == 0)

    def ping(self) -> int:
        """Ask the peer for an immediate answer (rudp framing); a :class:`PongReceived`
        with the returned token follows. The caller times the round trip."""
        if not self._rudp:
            raise NotImplementedError(f"the {self._framing} framing has no ping")
        if self.state is not ESTABLISHED:
            raise ClosedError("the connection is not established")
        token = self._rng.getrandbits(32)
        self._send_control(wire.encode_header(wire.PKT_PING, self.cid) + wire.PING_BODY.pack(token))
        return token

    def write_eof(self) -> None:
        """Half-close: the peer reads EOF after everything sent so far; reading goes on."""
        if self._write_closed or self.state is TERMINATED:
            return
        self._write_closed = True
        if not self._rudp:
            return  # KCP has no FIN; close() ends the connection locally
        self._close_deadline = self._last_now + self.configuration.close_timeout
        self._maybe_send_close(self._last_now)

    def close(self, now: float | None = None) -> None:
        """Graceful close: deliver everything sent, then end; the peer sees EOF.

        Gives up with a reset after ``close_timeout``. Closing twice is harmless.
        """
        if now is not None:
            self._last_now = now
        if self.state is TERMINATED:
            return
        if self.state is HANDSHAKE:
            self._terminate(None)
            return
        self._full_close = True
        self.write_eof()
        self._close_deadline = (
            self._close_deadline or self._last_now + self.configuration.close_timeout
        )
        self._maybe_finish(self._last_now)

    def reset(self, reason: str = "", now: float | None = None) -> None:
        """Abort: discard queued data; the peer sees a reset."""
        if now is not None:
            self._last_now = now
        if self.state is TERMINATED:
            return
        if self._rudp and self.peer_address is not None:
            self._send_control(
                wire.encode_reason(wire.PKT_RESET, self.cid, wire.CODE_ABORT, reason)
            )
        self._terminate(ClosedError("connection reset locally" + (f": {reason}" if reason else "")))

    def _abort(self, error: RudpError) -> None:
        if self._rudp and self.peer_address is not None:
            code = wire.CODE_PROTOCOL if isinstance(error, ProtocolError) else wire.CODE_TIMEOUT
            self._send_control(wire.encode_reason(wire.PKT_RESET, self.cid, code, str(error)))
        self._terminate(error)

    # ------------------------------------------------------------------ output

    def datagrams_to_send(self, now: float) -> list[bytes]:
        """Everything to transmit now, all addressed to :attr:`peer_address`."""
        self._last_now = now
        engine = self.engine
        if self._needs_flush and engine is not None and self.state is not TERMINATED:
            self._needs_flush = False
            engine.flush(self._ms(now))
            produced = engine.datagrams()
            if produced:
                if self._fec_enc is not None:  # (rudp framing only)
                    produced = self._protect(produced, now)
                elif self._rudp:
                    header = self._header
                    produced = [header + d for d in produced]
                elif self._framing == "kcp-go":
                    produced = [
                        wire.encode_kcpgo(d, self._rng.randbytes(wire.KCPGO_NONCE))
                        for d in produced
                    ]
                self._out.extend(produced)
            if engine.dead:
                self._abort(DeadPeerError("a segment went unacknowledged dead_link times"))
            elif self._write_closed:
                self._maybe_send_close(now)
        out = self._out
        if not out:
            return []
        self._out = []
        counters = self._counters
        counters["packets_out"] += len(out)
        counters["bytes_out"] += sum(map(len, out))
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    @property
    def has_events(self) -> bool:
        """Whether :meth:`next_event` has something (cheaper than asking it)."""
        return bool(self._events)

    # ------------------------------------------------------------------ internals

    def _send_control(self, packet: bytes) -> None:
        self._out.append(packet)

    def _send_init(self, now: float) -> None:
        pad = self.configuration.mtu if not self._cookie else 0
        self._send_control(
            wire.encode_handshake(
                wire.PKT_INIT, self.cid, local_params(self.configuration), self._cookie, pad
            )
        )
        self._counters["handshake_packets_out"] += 1
        self._hs_next = now + self._hs_rto

    def _retransmit_handshake(self, now: float) -> None:
        self._hs_rto = min(self._hs_rto * 2, HANDSHAKE_RTO_MAX)
        self._send_init(now)

    def _schedule_ping(self, now: float) -> None:
        if self._pings:
            self._ping_next = now + self.configuration.keepalive

    def _send_ping(self, now: float) -> None:
        self._ping_token = self._rng.getrandbits(32)
        self._send_control(
            wire.encode_header(wire.PKT_PING, self.cid) + wire.PING_BODY.pack(self._ping_token)
        )
        self._counters["pings_out"] += 1
        # Ask again sooner while unanswered, so a dead peer is noticed well before idle_timeout.
        self._ping_next = now + min(self.configuration.keepalive, max(self._rto(), 0.05) * 2)

    def _rto(self) -> float:
        return (self.engine.rto if self.engine is not None else 200) / 1000.0

    def _maybe_send_close(self, now: float) -> None:
        if self._close_sent or self.engine is None or self.engine.pending_bytes or self._prebuffer:
            return
        self._close_sent = True
        self._close_rto = max(self._rto(), 0.05)
        self._send_close(now, first=True)

    def _send_close(self, now: float, first: bool = False) -> None:
        if not first:
            self._close_rto = min(self._close_rto * 1.5, HANDSHAKE_RTO_MAX)
        self._send_control(wire.encode_reason(wire.PKT_CLOSE, self.cid, wire.CODE_NORMAL))
        self._close_next = now + self._close_rto

    def _maybe_finish(self, now: float) -> None:
        """Enter TIME-WAIT once both directions are closed (or ours is and close() asked to end)."""
        if self.state is not ESTABLISHED:
            return
        if not self._rudp:
            if self._full_close and (self.engine is None or not self.engine.pending_bytes):
                self._terminate(None)
            return
        if not (self._close_sent and self._close_acked):
            return
        self._close_deadline = None
        if self._peer_closed:
            self.state = TIME_WAIT
            self._ping_next = None
            self._linger_until = now + LINGER_RTOS * max(self._rto(), 0.05)
        elif self._full_close and self._linger_until is None:
            # Like TCP's FIN-WAIT-2: the application is done, but stay to acknowledge
            # (and discard) what the peer still sends, and its CLOSE, for a while.
            self._linger_until = now + self.configuration.close_timeout

    @property
    def close_done(self) -> bool:
        """close() was called and everything we sent, and our CLOSE, was acknowledged."""
        return self.state is TERMINATED or (
            self._full_close and (not self._rudp or (self._close_sent and self._close_acked))
        )

    def _discard_input(self) -> None:
        """After close() nobody reads: drop what arrives so the peer is never stalled."""
        engine = self.engine
        if engine.stream:
            while engine.recv():
                pass
        else:
            while engine.recv_message() is not None:
                pass

    def _signal_readable(self) -> None:
        if not (self._events and isinstance(self._events[-1], DataReadable)):
            self._events.append(_DATA_READABLE)

    def _signal_eof(self) -> None:
        if not self._eof_signalled:
            self._eof_signalled = True
            self._events.append(EndOfData())

    def _terminate(self, error: RudpError | None) -> None:
        if self.state is TERMINATED:
            return
        self.state = TERMINATED
        self.error = error
        self._hs_next = self._ping_next = self._close_next = self._linger_until = (
            self._close_deadline
        ) = None
        if error is not None:
            self._prebuffer.clear()
        self._events.append(Terminated(error))

    # ------------------------------------------------------------------ FEC (rudp framing)

    def _start_fec(self, negotiated: wire.Params, now: float) -> None:
        auto = bool(negotiated.flags & wire.FLAG_FEC_AUTO)
        k = negotiated.fec_k or AUTO_DATA_SHARDS
        m = negotiated.fec_m or AUTO_MAX_PARITY
        self._fec_ctl = FecController(max_parity=m) if auto else None
        self._fec_enc = FecEncoder(k, self._fec_ctl or m, max_delay=self._fec_delay())
        self._fec_dec = FecDecoder(
            max_data_shards=k, max_parity_shards=m, max_payload=negotiated.mtu
        )
        self._fec_next_measure = now + FEC_MEASURE_INTERVAL

    def _fec_delay(self) -> int:
        """A group's time bound: half a round trip, so repair beats a retransmission."""
        srtt = self.engine.srtt if self.engine is not None else 0
        return max(5, min(100, srtt // 2)) if srtt else 20

    def _protect(self, payloads: list[bytes], now: float) -> list[bytes]:
        enc = self._fec_enc
        assert enc is not None
        if now >= self._fec_next_measure:
            self._measure_loss(now)
        if self._fec_ctl is not None and not self._fec_ctl.active and enc.next_deadline() is None:
            if self.engine.bundle != self._bundle:  # (the setter validates: not every flush)
                self.engine.bundle = self._bundle
            header = self._header
            return [header + d for d in payloads]  # auto mode, clean link: no FEC at all
        # Parity repairs most losses; one copy still rides along for the groups it
        # cannot rebuild, which would otherwise wait for an RTO (the tail).
        if self.engine.bundle != self._bundle_with_fec:
            self.engine.bundle = self._bundle_with_fec
        enc.max_delay = self._fec_delay()
        ms = self._ms(now)
        data_header = wire.encode_header(wire.PKT_DATA_FEC, self.cid)
        out = []
        for d in payloads:
            tag, parity = enc.add(d, ms)
            out.append(
                self._header + d
                if tag is None
                else data_header + wire.FEC_DATA.pack(tag.group, tag.index) + d
            )
            if parity:
                out.extend(self._encode_parity(parity))
        if self.engine.waitsnd == self.engine.inflight:
            # Nothing more is queued: the application paused, so the group will not
            # fill soon. Protect it now; waiting only delays the repair.
            out.extend(self._encode_parity(enc.flush()))
        return out

    def _encode_parity(self, parity: list) -> list[bytes]:
        header = wire.encode_header(wire.PKT_PARITY, self.cid)
        return [
            header + wire.FEC_PARITY.pack(p.group, p.index, p.count, p.parity) + p.shard
            for p in parity
        ]

    def _send_parity(self, parity: list) -> None:
        if parity:
            self._out.extend(self._encode_parity(parity))

    def _receive_fec(self, ptype: int, body: memoryview, addr: Address, now: float) -> None:
        dec = self._fec_dec
        assert dec is not None
        if ptype == wire.PKT_DATA_FEC:
            group, index = wire.FEC_DATA.unpack_from(body)
            payload = body[wire.FEC_DATA.size :]
            self._receive_kcp(payload, addr, now)
            recovered = dec.on_data(group, index, bytes(payload))
        else:
            group, index, count, m = wire.FEC_PARITY.unpack_from(body)
            recovered = dec.on_parity(group, index, count, m, bytes(body[wire.FEC_PARITY.size :]))
            self._heard_from(addr, now)
        for payload in recovered:
            self._receive_kcp(payload, addr, now, rtt_sample=False)
        self._measure_loss(now)

    def _measure_loss(self, now: float) -> None:
        """Every half second of activity: feed the auto controller, report our loss to the peer.

        The raw loss rate is the ARQ's retransmission rate while parity is off, and
        the peer's report while it is on (repaired packets are never retransmitted,
        so the ARQ would see a clean link and switch FEC off again).
        """
        if now < self._fec_next_measure or self.engine is None or self._fec_dec is None:
            return
        self._fec_next_measure = now + FEC_MEASURE_INTERVAL
        stats = self.engine.stats()
        dec = self._fec_dec.stats()
        marks = (
            stats["lost_segs"] + stats["fast_retrans_segs"],
            stats["out_segs"] - stats["bundled_segs"],
            dec["shards_lost"],
            dec["shards_expected"],
        )
        retrans, sent, lost, expected = (a - b for a, b in zip(marks, self._fec_marks, strict=True))
        if self._fec_ctl is not None and not self._fec_ctl.active and sent >= FEC_MIN_SAMPLES:
            self._fec_ctl.update(min(1.0, retrans / sent))
        if expected >= FEC_MIN_SAMPLES:
            report = round(0xFFFF * lost / expected)
            self._out.append(
                wire.encode_header(wire.PKT_FEC_REPORT, self.cid) + wire.FEC_REPORT.pack(report)
            )
        if sent >= FEC_MIN_SAMPLES or expected >= FEC_MIN_SAMPLES:
            self._fec_marks = marks

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict[str, Any]:
        """Counters of this connection and of its engine, plus RTT and windows."""
        out: dict[str, Any] = dict(self._counters)
        engine = self.engine
        if engine is not None:
            arq = engine.stats()
            arq["kcp_in_errors"] = arq.pop("in_errors", 0)  # kcp-go's name; ours is framing-level
            out.update(arq)
            out.update(
                srtt=engine.srtt,
                rttvar=engine.rttvar,
                rto=engine.rto,
                cwnd=engine.cwnd,
                snd_wnd=engine.snd_wnd,
                rcv_wnd=engine.rcv_wnd,
                rmt_wnd=engine.rmt_wnd,
                inflight=engine.inflight,
            )
        if self._fec_enc is not None and self._fec_dec is not None:
            out.update({f"fec_{k}": v for k, v in self._fec_enc.stats().items()})
            out.update({f"fec_{k}": v for k, v in self._fec_dec.stats().items()})
            if self._fec_ctl is not None:
                out["fec_loss_estimate"] = self._fec_ctl.loss_rate
        return out
