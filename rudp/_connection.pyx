# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The connection compiled: ``rudp.connection.Connection`` (the specification) as a C type.

The same behaviour as ``rudp.connection.Connection`` for the same calls: the
same datagrams, events, deadlines, states, errors and counters; read that
module for the protocol. Only the representation changes, to take the
interpreter off the per-datagram path (input of a DATA packet, the flush that
follows a write, the deadline after every flush):

* fields are C members: flags are ``bint``, the clock and the timers that are
  always set are ``double``, the counters are C integers (``stats()`` builds the
  same dictionary); deadlines that may be unset stay Python objects (None or a
  float), as in the reference;
* internal methods are C functions;
* everything else is the reference's own: the ARQ engine, the FEC objects, the
  event classes and ``rudp.wire``'s encoders are called as Python objects.
"""

import random
import struct
from collections import deque

from rudp import wire
from rudp.connection import (
    AUTO_DATA_SHARDS,
    AUTO_MAX_PARITY,
    ESTABLISHED,
    FEC_MEASURE_INTERVAL,
    FEC_MIN_SAMPLES,
    HANDSHAKE,
    HANDSHAKE_RTO,
    HANDSHAKE_RTO_MAX,
    LINGER_RTOS,
    TERMINATED,
    TIME_WAIT,
    _DATA_READABLE,
    _framing_overhead,
    local_params,
    negotiate,
)
from rudp.errors import (
    ClosedError,
    ConnectionRefused,
    ConnectionReset,
    DeadPeerError,
    ProtocolError,
)
from rudp.events import (
    AddressChanged,
    Connected,
    DataReadable,
    EndOfData,
    PongReceived,
    Terminated,
)
from rudp.fec import FecController, FecDecoder, FecEncoder

from libc.stdint cimport int64_t

__all__ = ["Connection"]

cdef Py_ssize_t RUDP_OVERHEAD = wire.RUDP_OVERHEAD
cdef int RUDP_VERSION = wire.RUDP_VERSION
cdef int PKT_DATA = wire.PKT_DATA
cdef int PKT_DATA_FEC = wire.PKT_DATA_FEC
cdef int PKT_PARITY = wire.PKT_PARITY
cdef object PACKET_TYPES = wire.PACKET_TYPES
cdef object unpack_header = wire.RUDP_HEADER.unpack_from
cdef double HS_RTO = HANDSHAKE_RTO
cdef double HS_RTO_MAX = HANDSHAKE_RTO_MAX
cdef double MEASURE_INTERVAL = FEC_MEASURE_INTERVAL


cdef class Connection:
    """One reliable connection, any framing; the contract is ``rudp.connection.Connection``'s."""

    cdef public object configuration
    cdef readonly bint is_client
    cdef readonly object cid
    cdef public object peer_address
    cdef public object params
    cdef public object engine
    cdef public object state
    cdef public object error

    cdef object _engine_cls
    cdef str _framing
    cdef bint _rudp
    cdef bint _pings
    cdef double _idle_timeout
    cdef bytes _header
    cdef object _rng
    cdef object _events
    cdef list _out
    cdef list _prebuffer
    cdef bint _has_t0
    cdef double _t0
    cdef bint _needs_flush
    cdef bytes _cookie
    cdef double _hs_deadline
    cdef object _hs_next
    cdef double _hs_rto
    cdef bint _confirmed
    cdef readonly double _last_recv  # (readable: white-box tests of the reference use it)
    cdef object _ping_token
    cdef object _ping_next
    cdef bytes _last_ping_seen
    cdef bint _write_closed
    cdef bint _full_close
    cdef bint _close_sent
    cdef bint _close_acked
    cdef readonly bint _peer_closed  # (the same)
    cdef object _close_next
    cdef object _close_deadline
    cdef object _linger_until
    cdef double _close_rto
    cdef bint _eof_signalled
    cdef object _fec_enc
    cdef object _fec_dec
    cdef object _fec_ctl
    cdef double _fec_next_measure
    cdef object _bundle
    cdef object _bundle_with_fec
    cdef tuple _fec_marks
    cdef double _last_now
    # the reference's counters, in its order
    cdef long long packets_in, packets_out, bytes_in, bytes_out, in_errors, in_csum_errors
    cdef long long handshake_packets_out, pings_out, migrations

    def __init__(self, configuration, *, is_client, cid=0, peer=None, engine=None, seed=None):
        if engine is None:
            from rudp.engine import Arq as engine
        self.configuration = configuration
        self.is_client = is_client
        self.cid = cid & 0xFFFF_FFFF_FFFF_FFFF
        self.peer_address = peer
        self._engine_cls = engine
        self._framing = configuration.framing
        self._rudp = self._framing == "rudp"
        self._pings = self._rudp and is_client
        self._idle_timeout = configuration.idle_timeout
        self._header = wire.encode_header(wire.PKT_DATA, self.cid) if self._rudp else b""
        self._rng = random.Random(seed if seed is not None else self.cid)
        self.params = local_params(configuration)
        self.engine = None
        self.state = HANDSHAKE
        self._events = deque()
        self._out = []
        self._prebuffer = []
        self._has_t0 = False
        self._t0 = 0.0
        self._needs_flush = False
        self._cookie = b""
        self._hs_deadline = 0.0
        self._hs_next = None
        self._hs_rto = HS_RTO
        self._confirmed = not is_client
        self._last_recv = 0.0
        self._ping_token = None
        self._ping_next = None
        self._last_ping_seen = b""
        self._write_closed = False
        self._full_close = False
        self._close_sent = False
        self._close_acked = False
        self._peer_closed = False
        self._close_next = None
        self._close_deadline = None
        self._linger_until = None
        self._eof_signalled = False
        self.error = None
        self._fec_enc = None
        self._fec_dec = None
        self._fec_ctl = None
        self._fec_next_measure = 0.0
        self._bundle = configuration.bundle_effective
        self._bundle_with_fec = min(1, self._bundle)
        self._fec_marks = (0, 0, 0, 0)
        self._last_now = 0.0

    # ------------------------------------------------------------------ set-up

    def connect(self, peer, double now):
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

    cdef inline void _start_clock(self, double now) noexcept:
        if not self._has_t0:
            self._has_t0 = True
            self._t0 = now
            self._last_recv = now

    def accept(self, negotiated, peer, double now):
        """Server: the listener verified this client (or, for kcp framings, saw its first segment)."""
        self.peer_address = peer
        self._start_clock(now)
        self._establish(negotiated, now)
        if self._rudp:
            self._send_control(wire.encode_handshake(wire.PKT_ACCEPT, self.cid, negotiated))

    cdef int _establish(self, negotiated, double now) except -1:
        cfg = self.configuration
        self.params = negotiated
        mtu = negotiated.mtu - _framing_overhead(self._framing)
        if self._rudp and (negotiated.fec_k or negotiated.flags & wire.FLAG_FEC_AUTO):
            mtu -= wire.FEC_OVERHEAD
            self._start_fec(negotiated, now)
        self.engine = self._engine_cls(
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
        return 0

    # ------------------------------------------------------------------ time

    cpdef int64_t _ms(self, double now) except? -1:
        assert self._has_t0
        return (<int64_t> ((now - self._t0) * 1000 + 1e-6)) & 0xFFFFFFFF

    cdef double _from_ms(self, int64_t ms, double now, int64_t now_ms) except? -1.0:
        """Engine deadline (absolute engine ms) → seconds (``now_ms``: ``_ms(now)``)."""
        cdef int64_t delta = ((ms - now_ms + 0x80000000) & 0xFFFFFFFF) - 0x80000000
        return now + (delta if delta > 0 else 0) / 1000.0

    def get_timer(self, now=None):
        """The next time :meth:`handle_timer` must run, or None (nothing pending at all)."""
        cdef double ref, t, first_value
        cdef int64_t ref_ms
        state = self.state
        if state is TERMINATED or not self._has_t0:
            return None
        first = self._ping_next
        for t_obj in (self._hs_next, self._close_next, self._linger_until, self._close_deadline):
            if t_obj is not None and (first is None or t_obj < first):
                first = t_obj
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
        first_value = first
        if self._needs_flush or self._out:
            return ref if ref < first_value else first
        ref_ms = self._ms(ref)
        engine, fec = self.engine, self._fec_enc
        if engine is not None:
            due = engine.check(ref_ms)
            if due is not None:
                t = self._from_ms(due, ref, ref_ms)
                if t < first_value:
                    first = first_value = t
        if fec is not None:
            due = fec.next_deadline()
            if due is not None:
                t = self._from_ms(due, ref, ref_ms)
                if t < first_value:
                    first = t
        return first

    def handle_timer(self, double now):
        """Run whatever is due at ``now``."""
        self._last_now = now
        if self.state is TERMINATED or not self._has_t0:
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
            if due is not None and self._from_ms(due, now, self._ms(now)) <= now:
                self._needs_flush = True
            if self._fec_enc is not None:
                self._send_parity(self._fec_enc.poll(self._ms(now)))
        if self._hs_next is not None and now >= self._hs_next:
            self._retransmit_handshake(now)
        if self._ping_next is not None and now >= self._ping_next:
            self._send_ping(now)
        if self._close_next is not None and now >= self._close_next:
            self._send_close(now, False)

    # ------------------------------------------------------------------ input

    def receive_datagram(self, data, addr, double now):
        """Feed one datagram that arrived from ``addr``."""
        self._last_now = now
        if self.state is TERMINATED:
            return
        self._start_clock(now)
        self.packets_in += 1
        self.bytes_in += len(data)
        if self._rudp:
            self._receive_rudp(data, addr, now)
            return
        if self._framing == "kcp-go":
            try:
                payload = wire.decode_kcpgo(data)
            except ValueError:
                self.in_csum_errors += 1
                return
        else:
            payload = data
        self._receive_kcp(payload, addr, now, True)

    cdef int _receive_kcp(self, payload, addr, double now, bint rtt_sample) except -1:
        engine = self.engine
        if engine is None:
            return 0
        before = engine.readable
        cdef bint moved = addr != self.peer_address
        if moved:
            progress_before = self._progress()
        if engine.input(payload, self._ms(now), rtt_sample) < 0:
            self.in_errors += 1
            return 0
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
        return 0

    cdef inline int _heard_from(self, addr, double now) except -1:
        self._last_recv = now
        if self._pings:
            self._ping_next = now + self.configuration.keepalive
        return 0

    cdef tuple _progress(self):
        """What only a live peer can advance (see the reference)."""
        stats = self.engine.stats()
        fresh = (
            stats["in_segs"] - stats["ack_segs_in"] - stats["repeat_segs"] - stats["out_of_window"]
        )
        return fresh, self.engine.inflight

    cdef int _migrate(self, addr) except -1:
        if self.state is not ESTABLISHED or addr == self.peer_address:
            return 0
        old = self.peer_address
        self.peer_address = addr
        self.migrations += 1
        assert old is not None
        self._events.append(AddressChanged(old, addr))
        return 0

    cdef int _receive_rudp(self, data, addr, double now) except -1:
        if len(data) < RUDP_OVERHEAD:
            self.in_errors += 1
            return 0
        ver, ptype, cid = unpack_header(data)
        if ver != RUDP_VERSION or cid != self.cid or ptype not in PACKET_TYPES:
            self.in_errors += 1
            return 0
        body = memoryview(data)[RUDP_OVERHEAD:]
        try:
            if ptype == PKT_DATA and self.state is ESTABLISHED:  # as _dispatch does it
                if not self._confirmed:
                    self._confirm()
                self._receive_kcp(body, addr, now, True)
            else:
                self._dispatch(ptype, body, addr, now)
        except (ValueError, struct.error):  # a truncated or malformed body
            self.in_errors += 1
        return 0

    cdef int _dispatch(self, int ptype, body, addr, double now) except -1:
        if ptype == PKT_DATA:
            if self.state is ESTABLISHED:
                self._confirm()
                self._receive_kcp(body, addr, now, True)
            elif self.state is TIME_WAIT:
                self._heard_from(addr, now)
            return 0
        if ptype == PKT_DATA_FEC or ptype == PKT_PARITY:
            if self.state is ESTABLISHED and self._fec_dec is not None:
                self._confirm()
                self._receive_fec(ptype, body, addr, now)
            return 0
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
            return 0
        if self.is_client and ptype == wire.PKT_RETRY and self.state is HANDSHAKE:
            params, cookie = wire.decode_handshake(body, with_cookie=True)
            try:
                negotiated = negotiate(self.params, params)
            except ValueError as exc:
                self._terminate(ConnectionRefused(f"incompatible server: {exc}"))
                return 0
            self._cookie = cookie
            self._last_recv = now
            self._establish(negotiated, now)
            self._send_init(now)  # INIT with the cookie; repeated until confirmed
            return 0
        if self.is_client and ptype == wire.PKT_ACCEPT:
            if self.state is ESTABLISHED:
                self._confirm()
                self._heard_from(addr, now)
            return 0
        if not self.is_client and ptype == wire.PKT_INIT:
            # A repeated INIT (our ACCEPT was lost): answer again.
            if self.state is ESTABLISHED and addr == self.peer_address:
                self._send_control(wire.encode_handshake(wire.PKT_ACCEPT, self.cid, self.params))
            return 0
        if self.state is not ESTABLISHED and self.state is not TIME_WAIT:
            return 0
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
        return 0

    cdef inline void _confirm(self) noexcept:
        if not self._confirmed:
            self._confirmed = True
            self._hs_next = None

    def receive_unreachable(self, double now):
        """The I/O layer got ICMP port-unreachable for this peer (see the reference)."""
        if self.state is HANDSHAKE:
            self._terminate(ConnectionRefused(f"nothing listens at {self.peer_address}"))

    # ------------------------------------------------------------------ application

    def send(self, data):
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
    def send_buffered(self):
        """Bytes accepted by :meth:`send` and not yet acknowledged by the peer."""
        queued = sum(map(len, self._prebuffer)) if self._prebuffer else 0
        return queued + (self.engine.pending_bytes if self.engine is not None else 0)

    @property
    def send_window_free(self):
        """How many more bytes fit before the send buffer reaches ``send_buffer``."""
        return max(0, self.configuration.send_buffer - self.send_buffered)

    def read(self, limit=-1):
        """Stream mode: up to ``limit`` readable bytes (``b""`` when none or at EOF)."""
        if self.engine is None:
            return b""
        data = self.engine.recv(limit)
        if data:
            self._needs_flush = True
        return data

    def read_message(self):
        """Message mode: the next whole message, or None."""
        if self.engine is None:
            return None
        msg = self.engine.recv_message()
        if msg is not None:
            self._needs_flush = True
        return msg

    @property
    def readable(self):
        return self.engine.readable if self.engine is not None else 0

    @property
    def at_eof(self):
        """The peer closed its side and everything it sent has been read."""
        return self._peer_closed and (self.engine is None or self.engine.readable == 0)

    @property
    def write_closed(self):
        """write_eof() or close() was called: nothing more may be sent."""
        return self._write_closed

    def ping(self):
        """Ask the peer for an immediate answer (rudp framing); see the reference."""
        if not self._rudp:
            raise NotImplementedError(f"the {self._framing} framing has no ping")
        if self.state is not ESTABLISHED:
            raise ClosedError("the connection is not established")
        token = self._rng.getrandbits(32)
        self._send_control(wire.encode_header(wire.PKT_PING, self.cid) + wire.PING_BODY.pack(token))
        return token

    def write_eof(self):
        """Half-close: the peer reads EOF after everything sent so far; reading goes on."""
        if self._write_closed or self.state is TERMINATED:
            return
        self._write_closed = True
        if not self._rudp:
            return  # KCP has no FIN; close() ends the connection locally
        self._close_deadline = self._last_now + self.configuration.close_timeout
        self._maybe_send_close(self._last_now)

    def close(self, now=None):
        """Graceful close: deliver everything sent, then end; the peer sees EOF."""
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

    def reset(self, reason="", now=None):
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

    cdef int _abort(self, error) except -1:
        if self._rudp and self.peer_address is not None:
            code = wire.CODE_PROTOCOL if isinstance(error, ProtocolError) else wire.CODE_TIMEOUT
            self._send_control(wire.encode_reason(wire.PKT_RESET, self.cid, code, str(error)))
        self._terminate(error)
        return 0

    # ------------------------------------------------------------------ output

    def datagrams_to_send(self, double now):
        """Everything to transmit now, all addressed to :attr:`peer_address`."""
        cdef list out
        cdef bytes header
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
        self.packets_out += len(out)
        self.bytes_out += sum(map(len, out))
        return out

    def next_event(self):
        return self._events.popleft() if self._events else None

    @property
    def has_events(self):
        """Whether :meth:`next_event` has something (cheaper than asking it)."""
        return bool(self._events)

    # ------------------------------------------------------------------ internals

    cdef inline int _send_control(self, bytes packet) except -1:
        self._out.append(packet)
        return 0

    cdef int _send_init(self, double now) except -1:
        pad = self.configuration.mtu if not self._cookie else 0
        self._send_control(
            wire.encode_handshake(
                wire.PKT_INIT, self.cid, local_params(self.configuration), self._cookie, pad
            )
        )
        self.handshake_packets_out += 1
        self._hs_next = now + self._hs_rto
        return 0

    cdef int _retransmit_handshake(self, double now) except -1:
        self._hs_rto = min(self._hs_rto * 2, HS_RTO_MAX)
        self._send_init(now)
        return 0

    cdef int _schedule_ping(self, double now) except -1:
        if self._pings:
            self._ping_next = now + self.configuration.keepalive
        return 0

    cdef int _send_ping(self, double now) except -1:
        self._ping_token = self._rng.getrandbits(32)
        self._send_control(
            wire.encode_header(wire.PKT_PING, self.cid) + wire.PING_BODY.pack(self._ping_token)
        )
        self.pings_out += 1
        # Ask again sooner while unanswered, so a dead peer is noticed well before idle_timeout.
        self._ping_next = now + min(self.configuration.keepalive, max(self._rto(), 0.05) * 2)
        return 0

    cdef double _rto(self) except? -1.0:
        return (self.engine.rto if self.engine is not None else 200) / 1000.0

    cdef int _maybe_send_close(self, double now) except -1:
        if self._close_sent or self.engine is None or self.engine.pending_bytes or self._prebuffer:
            return 0
        self._close_sent = True
        self._close_rto = max(self._rto(), 0.05)
        self._send_close(now, True)
        return 0

    cdef int _send_close(self, double now, bint first) except -1:
        if not first:
            self._close_rto = min(self._close_rto * 1.5, HS_RTO_MAX)
        self._send_control(wire.encode_reason(wire.PKT_CLOSE, self.cid, wire.CODE_NORMAL))
        self._close_next = now + self._close_rto
        return 0

    cdef int _maybe_finish(self, double now) except -1:
        """Enter TIME-WAIT once both directions are closed (or ours is and close() asked to end)."""
        if self.state is not ESTABLISHED:
            return 0
        if not self._rudp:
            if self._full_close and (self.engine is None or not self.engine.pending_bytes):
                self._terminate(None)
            return 0
        if not (self._close_sent and self._close_acked):
            return 0
        self._close_deadline = None
        if self._peer_closed:
            self.state = TIME_WAIT
            self._ping_next = None
            self._linger_until = now + LINGER_RTOS * max(self._rto(), 0.05)
        elif self._full_close and self._linger_until is None:
            self._linger_until = now + self.configuration.close_timeout
        return 0

    @property
    def close_done(self):
        """close() was called and everything we sent, and our CLOSE, was acknowledged."""
        return self.state is TERMINATED or (
            self._full_close and (not self._rudp or (self._close_sent and self._close_acked))
        )

    cdef int _discard_input(self) except -1:
        """After close() nobody reads: drop what arrives so the peer is never stalled."""
        engine = self.engine
        if engine.stream:
            while engine.recv():
                pass
        else:
            while engine.recv_message() is not None:
                pass
        return 0

    cdef inline int _signal_readable(self) except -1:
        events = self._events
        if not (events and isinstance(events[len(events) - 1], DataReadable)):
            events.append(_DATA_READABLE)
        return 0

    cdef int _signal_eof(self) except -1:
        if not self._eof_signalled:
            self._eof_signalled = True
            self._events.append(EndOfData())
        return 0

    cdef int _terminate(self, error) except -1:
        if self.state is TERMINATED:
            return 0
        self.state = TERMINATED
        self.error = error
        self._hs_next = self._ping_next = self._close_next = self._linger_until = (
            self._close_deadline
        ) = None
        if error is not None:
            self._prebuffer.clear()
        self._events.append(Terminated(error))
        return 0

    # ------------------------------------------------------------------ FEC (rudp framing)

    cdef int _start_fec(self, negotiated, double now) except -1:
        auto = bool(negotiated.flags & wire.FLAG_FEC_AUTO)
        k = negotiated.fec_k or AUTO_DATA_SHARDS
        m = negotiated.fec_m or AUTO_MAX_PARITY
        self._fec_ctl = FecController(max_parity=m) if auto else None
        self._fec_enc = FecEncoder(k, self._fec_ctl or m, max_delay=self._fec_delay())
        self._fec_dec = FecDecoder(
            max_data_shards=k, max_parity_shards=m, max_payload=negotiated.mtu
        )
        self._fec_next_measure = now + MEASURE_INTERVAL
        return 0

    cdef object _fec_delay(self):
        """A group's time bound: half a round trip, so repair beats a retransmission."""
        srtt = self.engine.srtt if self.engine is not None else 0
        return max(5, min(100, srtt // 2)) if srtt else 20

    cdef list _protect(self, list payloads, double now):
        cdef bytes header
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

    cdef list _encode_parity(self, parity):
        header = wire.encode_header(wire.PKT_PARITY, self.cid)
        return [
            header + wire.FEC_PARITY.pack(p.group, p.index, p.count, p.parity) + p.shard
            for p in parity
        ]

    cdef int _send_parity(self, parity) except -1:
        if parity:
            self._out.extend(self._encode_parity(parity))
        return 0

    cdef int _receive_fec(self, int ptype, body, addr, double now) except -1:
        dec = self._fec_dec
        assert dec is not None
        if ptype == PKT_DATA_FEC:
            group, index = wire.FEC_DATA.unpack_from(body)
            payload = body[wire.FEC_DATA.size :]
            self._receive_kcp(payload, addr, now, True)
            recovered = dec.on_data(group, index, bytes(payload))
        else:
            group, index, count, m = wire.FEC_PARITY.unpack_from(body)
            recovered = dec.on_parity(group, index, count, m, bytes(body[wire.FEC_PARITY.size :]))
            self._heard_from(addr, now)
        for payload in recovered:
            self._receive_kcp(payload, addr, now, False)
        self._measure_loss(now)
        return 0

    cdef int _measure_loss(self, double now) except -1:
        """Every half second of activity: feed the auto controller, report our loss to the peer."""
        if now < self._fec_next_measure or self.engine is None or self._fec_dec is None:
            return 0
        self._fec_next_measure = now + MEASURE_INTERVAL
        stats = self.engine.stats()
        dec = self._fec_dec.stats()
        marks = (
            stats["lost_segs"] + stats["fast_retrans_segs"],
            stats["out_segs"] - stats["bundled_segs"],
            dec["shards_lost"],
            dec["shards_expected"],
        )
        retrans, sent, lost, expected = [a - b for a, b in zip(marks, self._fec_marks, strict=True)]
        if self._fec_ctl is not None and not self._fec_ctl.active and sent >= FEC_MIN_SAMPLES:
            self._fec_ctl.update(min(1.0, retrans / sent))
        if expected >= FEC_MIN_SAMPLES:
            report = round(0xFFFF * lost / expected)
            self._out.append(
                wire.encode_header(wire.PKT_FEC_REPORT, self.cid) + wire.FEC_REPORT.pack(report)
            )
        if sent >= FEC_MIN_SAMPLES or expected >= FEC_MIN_SAMPLES:
            self._fec_marks = marks
        return 0

    # ------------------------------------------------------------------ stats

    def stats(self):
        """Counters of this connection and of its engine, plus RTT and windows."""
        out = {
            "packets_in": self.packets_in,
            "packets_out": self.packets_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "in_errors": self.in_errors,
            "in_csum_errors": self.in_csum_errors,
            "handshake_packets_out": self.handshake_packets_out,
            "pings_out": self.pings_out,
            "migrations": self.migrations,
        }
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
