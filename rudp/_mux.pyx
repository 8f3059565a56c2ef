# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The stream multiplexer compiled: ``rudp.mux.Session`` (the specification) in C types.

Byte for byte the same behaviour as ``rudp.mux.Session``: same frames, events
(the same event classes), deadlines, return values, exceptions and counters
for the same calls; read that module for the protocol. This one only changes
representation, to take the Python overhead off the per-message path of the
asyncio driver:

* the stream state table is two C arrays filled from ``rudp.mux.TRANSITIONS``
  at import (the table stays the one definition), states and actions are small
  integers, and ``StreamInfo`` turns them back into the enums;
* streams are ``cdef`` objects with C integer fields; offsets are 64-bit
  (the reference's Python ints never wrap either, and 2**63 bytes is never reached);
* frames are parsed from the channel bytes in place (only a frame cut by the
  end of a chunk waits in a buffer) and built straight into one ``bytes``;
* the counters are C integers: ``stats`` returns a ``MuxStats`` snapshot;
* a stream makes its ``StreamReadable`` once and hands out that (immutable) event.
"""

from collections import OrderedDict, deque

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int64_t, uint8_t, uint32_t
from libc.string cimport memcpy

from rudp import mux as spec
from rudp import wire
from rudp.config import Configuration, check_bool, check_range
from rudp.errors import ClosedError, ConnectionRefused, ConnectionReset, DeadPeerError, ProtocolError
from rudp.mux import (
    MuxStats,
    SessionClosed,
    StreamEnded,
    StreamInfo,
    StreamOpened,
    StreamReadable,
    StreamReset,
    StreamWritable,
)

__all__ = ["Session"]

# ---------------------------------------------------------------------------- constants
# Read once from the reference modules, so there is one place for each value.

cdef int64_t INITIAL_PEER_WINDOW = spec.INITIAL_PEER_WINDOW
cdef int64_t MIN_WINDOW = spec.MIN_WINDOW
cdef int OVERHEAD = wire.SMUX_OVERHEAD
cdef int CMD_SYN = wire.SMUX_SYN
cdef int CMD_FIN = wire.SMUX_FIN
cdef int CMD_PSH = wire.SMUX_PSH
cdef int CMD_NOP = wire.SMUX_NOP
cdef int CMD_UPD = wire.SMUX_UPD
cdef int CMD_RST = spec.MUX_RST
cdef int UPD_BODY = wire.SMUX_UPD_BODY.size
cdef int RST_BODY = spec._RST_BODY_SIZE
cdef uint32_t RST_RESET = spec.RST_RESET
cdef uint32_t RST_REFUSED = spec.RST_REFUSED
cdef int64_t MAX_STREAM_ID = spec._MAX_STREAM_ID
cdef object CMD_NAMES = spec._CMD_NAMES
cdef int64_t U32 = 0xFFFFFFFF
cdef int64_t HALF_U32 = 0x80000000

# control queue kinds (the reference uses their names)
cdef enum:
    K_SYN = 0
    K_FIN = 1
    K_UPD = 2
    K_NOP = 3
    K_RST = 4

cdef int CONTROL_SIZE[5]
CONTROL_SIZE[K_SYN] = OVERHEAD
CONTROL_SIZE[K_FIN] = OVERHEAD
CONTROL_SIZE[K_UPD] = OVERHEAD + UPD_BODY
CONTROL_SIZE[K_NOP] = OVERHEAD
CONTROL_SIZE[K_RST] = OVERHEAD + RST_BODY

# ---------------------------------------------------------------------------- the state table

cdef tuple STATES = tuple(spec.StreamState)
cdef tuple INPUTS = tuple(spec.StreamInput)
cdef tuple ACTIONS = tuple(spec.Action)

cdef int S_OPEN = STATES.index(spec.StreamState.OPEN)
cdef int S_RESET = STATES.index(spec.StreamState.RESET)
cdef int I_SEND = INPUTS.index(spec.StreamInput.SEND)
cdef int I_READ = INPUTS.index(spec.StreamInput.READ)
cdef int I_END = INPUTS.index(spec.StreamInput.END)
cdef int I_RESET = INPUTS.index(spec.StreamInput.RESET)
cdef int I_CLOSE = INPUTS.index(spec.StreamInput.CLOSE)
cdef int I_DATA = INPUTS.index(spec.StreamInput.RECV_DATA)
cdef int I_FIN = INPUTS.index(spec.StreamInput.RECV_FIN)
cdef int I_RST = INPUTS.index(spec.StreamInput.RECV_RST)
cdef int I_UPD = INPUTS.index(spec.StreamInput.RECV_UPD)

cdef int A_WRITE = ACTIONS.index(spec.Action.WRITE)
cdef int A_READ = ACTIONS.index(spec.Action.READ)
cdef int A_QUEUE_FIN = ACTIONS.index(spec.Action.QUEUE_FIN)
cdef int A_ABORT = ACTIONS.index(spec.Action.ABORT)
cdef int A_ABANDON = ACTIONS.index(spec.Action.ABANDON)
cdef int A_DELIVER = ACTIONS.index(spec.Action.DELIVER)
cdef int A_EOF = ACTIONS.index(spec.Action.EOF)
cdef int A_PEER_RESET = ACTIONS.index(spec.Action.PEER_RESET)
cdef int A_UPDATE_WINDOW = ACTIONS.index(spec.Action.UPDATE_WINDOW)
cdef int A_DROP = ACTIONS.index(spec.Action.DROP)
cdef int A_IGNORE = ACTIONS.index(spec.Action.IGNORE)
cdef int A_FAIL_CLOSED = ACTIONS.index(spec.Action.FAIL_CLOSED)
cdef int A_FAIL_RESET = ACTIONS.index(spec.Action.FAIL_RESET)
cdef int A_RELEASE = ACTIONS.index(spec.Action.RELEASE)

cdef enum:
    NSTATES = 5
    NINPUTS = 9
cdef int NEXT[NSTATES][NINPUTS]
cdef int ACTION[NSTATES][NINPUTS]


def _fill_table():
    if len(STATES) != NSTATES or len(INPUTS) != NINPUTS:
        raise ImportError("rudp.mux's state table changed shape: rebuild rudp._mux")
    for (state, inp), (nxt, action) in spec.TRANSITIONS.items():
        NEXT[STATES.index(state)][INPUTS.index(inp)] = STATES.index(nxt)
        ACTION[STATES.index(state)][INPUTS.index(inp)] = ACTIONS.index(action)


_fill_table()


cdef inline bint steady(int state, int inp, int action) noexcept:
    """``inp`` keeps ``state`` and runs ``action`` (the hot paths skip the step then)."""
    return NEXT[state][inp] == state and ACTION[state][inp] == action


# ---------------------------------------------------------------------------- internals


cdef class _ByteQueue:
    """FIFO of bytes kept as the chunks they arrived in (no O(n) shifting)."""

    cdef object chunks  # deque of bytes
    cdef Py_ssize_t head
    cdef int64_t size

    def __cinit__(self):
        self.chunks = deque()
        self.head = 0
        self.size = 0

    cdef inline void append(self, bytes data):
        if PyBytes_GET_SIZE(data):
            self.chunks.append(data)
            self.size += PyBytes_GET_SIZE(data)

    cdef bytes take(self, int64_t n):
        """The next ``n`` bytes (at most what is held); a whole first chunk is not copied."""
        cdef bytes chunk, out
        cdef Py_ssize_t avail
        if n > self.size:
            n = self.size
        if n == 0:
            return b""
        chunk = self.chunks[0]
        if self.head == 0 and PyBytes_GET_SIZE(chunk) == n:
            self.chunks.popleft()
            self.size -= n
            return chunk
        out = PyBytes_FromStringAndSize(NULL, n)
        self.take_into(PyBytes_AS_STRING(out), n)
        return out

    cdef void take_into(self, char *dst, int64_t n):
        """Copy the next ``n`` bytes (``n`` <= size) to ``dst`` and drop them."""
        cdef bytes chunk
        cdef Py_ssize_t avail
        self.size -= n
        while n:
            chunk = self.chunks[0]
            avail = PyBytes_GET_SIZE(chunk) - self.head
            if avail <= n:
                memcpy(dst, PyBytes_AS_STRING(chunk) + self.head, avail)
                self.chunks.popleft()
                self.head = 0
                dst += avail
                n -= avail
            else:
                memcpy(dst, PyBytes_AS_STRING(chunk) + self.head, n)
                self.head += n
                n = 0

    cdef int64_t clear(self):
        cdef int64_t dropped = self.size
        self.chunks.clear()
        self.head = 0
        self.size = 0
        return dropped


cdef class _Stream:
    cdef int64_t sid
    cdef bint local
    cdef int state
    cdef _ByteQueue rx
    cdef _ByteQueue tx
    # receive side: byte offsets in the stream
    cdef int64_t received
    cdef int64_t consumed
    cdef int64_t limit
    cdef int64_t grant
    cdef int64_t grow_mark
    # send side
    cdef int64_t sent
    cdef int64_t peer_consumed
    cdef int64_t peer_window
    # flags
    cdef bint syn_sent
    cdef bint fin_pending
    cdef bint fin_committed
    cdef int closing_frames
    cdef bint fin_sent
    cdef bint eof
    cdef bint eof_delivered
    cdef bint refused
    cdef bint abandoned
    cdef bint read_armed
    cdef bint want_writable
    cdef bint in_ready
    cdef bint upd_queued
    cdef object readable_event  # its StreamReadable, made once: events are immutable

    def __cinit__(self, int64_t sid, bint local, int64_t grant):
        self.sid = sid
        self.local = local
        self.state = S_OPEN
        self.rx = _ByteQueue()
        self.tx = _ByteQueue()
        self.limit = INITIAL_PEER_WINDOW
        self.grant = grant
        self.peer_window = INITIAL_PEER_WINDOW
        self.syn_sent = not local
        self.read_armed = True


cdef inline void put_header(char *p, int version, int cmd, int length, uint32_t sid) noexcept:
    """``wire.SMUX_HEADER`` (``<BBHI``) at ``p``."""
    p[0] = <char> version
    p[1] = <char> cmd
    p[2] = <char> (length & 0xFF)
    p[3] = <char> ((length >> 8) & 0xFF)
    put_u32(p + 4, sid)


cdef inline void put_u32(char *p, uint32_t v) noexcept:
    p[0] = <char> (v & 0xFF)
    p[1] = <char> ((v >> 8) & 0xFF)
    p[2] = <char> ((v >> 16) & 0xFF)
    p[3] = <char> ((v >> 24) & 0xFF)


cdef inline uint32_t get_u32(const uint8_t *p) noexcept:
    return p[0] | (<uint32_t> p[1] << 8) | (<uint32_t> p[2] << 16) | (<uint32_t> p[3] << 24)


cdef bytes control_frame_bytes(int version, int cmd, uint32_t sid, int body_size,
                               uint32_t a, uint32_t b):
    cdef bytes frame = PyBytes_FromStringAndSize(NULL, OVERHEAD + body_size)
    cdef char *p = PyBytes_AS_STRING(frame)
    put_header(p, version, cmd, body_size, sid)
    if body_size >= 4:
        put_u32(p + OVERHEAD, a)
    if body_size >= 8:
        put_u32(p + OVERHEAD + 4, b)
    return frame


# ---------------------------------------------------------------------------- Session


cdef class Session:
    """One side of a multiplexed session; the contract is ``rudp.mux.Session``'s."""

    cdef readonly bint client
    cdef readonly int version
    cdef readonly int max_frame_size
    cdef readonly int64_t stream_buffer
    cdef readonly int64_t session_buffer
    cdef readonly int64_t max_streams
    cdef readonly int64_t stream_backlog
    cdef readonly bint extensions
    cdef bint _has_keepalive
    cdef int64_t _keepalive
    cdef bint _has_idle_timeout
    cdef int64_t _idle_timeout

    cdef int _parity
    cdef public int64_t _last_local_id  # public: a white-box test skips 2**31 ids
    cdef int64_t _max_peer_id
    cdef dict _streams
    cdef object _backlog  # deque of stream ids
    cdef object _control  # deque of (kind, sid, argument)
    cdef object _ready  # deque of _Stream, round-robin
    cdef object _events  # OrderedDict (type, sid) -> event
    cdef bytearray _rx
    cdef int64_t _rx_buffered
    cdef int64_t _credit
    cdef int64_t _refusals_queued
    cdef bint _nop_queued
    cdef bint _rx_blocked
    cdef int64_t _last_send
    cdef int64_t _last_recv
    cdef bint _closed
    cdef object _error

    # counters (MuxStats' fields)
    cdef int64_t frames_sent, frames_received, data_bytes_sent, data_bytes_received
    cdef int64_t frames_dropped, duplicate_syns, streams_opened, streams_accepted
    cdef int64_t streams_refused, resets_sent, resets_received, window_updates_sent
    cdef int64_t window_updates_received, bytes_over_window, keepalives_sent

    def __init__(
        self,
        *,
        client,
        now,
        version=2,
        max_frame_size=32768,
        stream_buffer=1 << 20,
        session_buffer=4 << 20,
        max_streams=1024,
        stream_backlog=128,
        keepalive=10000,
        idle_timeout=30000,
        extensions=False,
    ):
        check_bool("client", client)
        check_bool("extensions", extensions)
        check_range("version", version, 1, 2)
        check_range("now", now, -(1 << 62), 1 << 62)
        check_range("max_frame_size", max_frame_size, 1, 65535)
        check_range("stream_buffer", stream_buffer, 1024, 1 << 30)
        check_range("session_buffer", session_buffer, stream_buffer, 1 << 31)
        check_range("max_streams", max_streams, 1, 1 << 20)
        check_range("stream_backlog", stream_backlog, 1, 65535)
        if keepalive is not None:
            check_range("keepalive", keepalive, 1, 1 << 31)
        if idle_timeout is not None:
            check_range("idle_timeout", idle_timeout, keepalive or 1, 1 << 31)

        self.client = client
        self.version = version
        self.max_frame_size = max_frame_size
        self.stream_buffer = stream_buffer
        self.session_buffer = session_buffer
        self.max_streams = max_streams
        self.stream_backlog = stream_backlog
        self._has_keepalive = keepalive is not None
        self._keepalive = keepalive if keepalive is not None else 0
        self._has_idle_timeout = idle_timeout is not None
        self._idle_timeout = idle_timeout if idle_timeout is not None else 0
        self.extensions = extensions

        self._parity = 1 if client else 0
        self._last_local_id = 1 if client else 0
        self._max_peer_id = 0
        self._streams = {}
        self._backlog = deque()
        self._control = deque()
        self._ready = deque()
        self._events = OrderedDict()
        self._rx = bytearray()
        self._last_send = now
        self._last_recv = now
        self._closed = False
        self._error = None

    @classmethod
    def from_config(cls, config: Configuration, *, client, now, extensions=False):
        """A session with the mux fields of a :class:`~rudp.Configuration` (seconds → ms)."""
        return cls(
            client=client,
            now=now,
            version=config.smux_version,
            max_frame_size=config.max_frame_size,
            stream_buffer=config.stream_buffer,
            session_buffer=config.session_buffer,
            max_streams=config.max_streams,
            stream_backlog=config.stream_backlog,
            keepalive=max(1, round(config.keepalive * 1000)),
            idle_timeout=max(1, round(config.idle_timeout * 1000)),
            extensions=extensions,
        )

    # ------------------------------------------------------------ properties

    @property
    def keepalive(self):
        return self._keepalive if self._has_keepalive else None

    @property
    def idle_timeout(self):
        return self._idle_timeout if self._has_idle_timeout else None

    @property
    def stats(self):
        """A snapshot of the counters (the reference keeps a live ``MuxStats``)."""
        return MuxStats(
            frames_sent=self.frames_sent,
            frames_received=self.frames_received,
            data_bytes_sent=self.data_bytes_sent,
            data_bytes_received=self.data_bytes_received,
            frames_dropped=self.frames_dropped,
            duplicate_syns=self.duplicate_syns,
            streams_opened=self.streams_opened,
            streams_accepted=self.streams_accepted,
            streams_refused=self.streams_refused,
            resets_sent=self.resets_sent,
            resets_received=self.resets_received,
            window_updates_sent=self.window_updates_sent,
            window_updates_received=self.window_updates_received,
            bytes_over_window=self.bytes_over_window,
            keepalives_sent=self.keepalives_sent,
        )

    @property
    def closed(self):
        return self._closed

    @property
    def error(self):
        """Why the session ended (None while open or after a local close)."""
        return self._error

    def stream_ids(self):
        return list(self._streams)

    def stream_info(self, sid):
        cdef _Stream st = self._streams.get(sid)
        if st is None:
            return None
        cdef bint v2 = self.version == 2
        return StreamInfo(
            stream_id=sid,
            state=STATES[st.state],
            opened_locally=st.local,
            recv_buffered=st.rx.size,
            send_buffered=st.tx.size,
            recv_window=max(0, st.limit - st.received) if v2 else None,
            send_window=self._send_window(st) if v2 else None,
            eof_received=st.eof,
            fin_sent=st.fin_sent,
        )

    @property
    def recv_buffered(self):
        """Payload bytes received on all streams and not read yet."""
        return self._rx_buffered

    # ------------------------------------------------------------ channel side

    def receive_capacity(self):
        """How many more channel bytes the transport may pass in now (None: any)."""
        if self.version == 2 or self._closed:
            return None
        return max(0, self.session_buffer - self._rx_buffered)

    def receive_data(self, data, int64_t now):
        """Channel bytes, in order, split anywhere. Protocol errors close the session."""
        cdef bytearray buf = self._rx
        cdef Py_ssize_t pos
        if self._closed or not data:
            return
        self._last_recv = now
        try:
            if not PyByteArray_GET_SIZE(buf) and type(data) is bytes:
                # Nothing left over: parse the chunk in place, keep only a cut frame.
                pos = self._parse(<const uint8_t *> PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
                if pos < PyBytes_GET_SIZE(data):
                    buf += (<bytes> data)[pos:]
            else:
                buf += data
                pos = self._parse(<const uint8_t *> PyByteArray_AS_STRING(buf), PyByteArray_GET_SIZE(buf))
                del buf[:pos]
        except ProtocolError as exc:
            self._terminate(exc)
            return
        if self.version != 2 and self.session_buffer - self._rx_buffered <= 0:
            self._rx_blocked = True

    cdef Py_ssize_t _parse(self, const uint8_t *p, Py_ssize_t end) except -1:
        """Handle the whole frames in ``p[:end]``; returns where the first incomplete one starts."""
        cdef Py_ssize_t pos = 0, start, need
        cdef int ver, cmd, length
        cdef uint32_t sid
        while end - pos >= OVERHEAD:
            ver = p[pos]
            cmd = p[pos + 1]
            length = p[pos + 2] | (p[pos + 3] << 8)
            sid = get_u32(p + pos + 4)
            if ver != self.version:
                raise ProtocolError(f"smux version {ver} in a v{self.version} session")
            need = self._body_length(cmd, length)
            if end - pos - OVERHEAD < need:
                break
            start = pos + OVERHEAD
            pos = start + need
            self._frame(cmd, sid, PyBytes_FromStringAndSize(<const char *> p + start, need))
        return pos

    def has_output(self):
        """Would :meth:`data_to_send` return anything (given room)?"""
        return self._has_output()

    cdef bint _has_output(self) except -1:
        cdef _Stream st
        if self._closed:
            return False
        if self._control:
            return True
        ready = self._ready
        while ready:
            st = ready[0]
            if st.in_ready and self._sendable(st):
                return True
            st.in_ready = False
            ready.popleft()
        return False

    def data_to_send(self, int64_t max_bytes, int64_t now):
        """Whole frames, at most ``max_bytes`` of them: control first, then data round-robin."""
        cdef list out
        cdef int64_t room = max_bytes, n
        cdef int kind, size
        cdef int64_t sid
        cdef uint32_t arg
        cdef _Stream st
        cdef bytes frame
        if self._closed:
            return b""
        out = []
        control = self._control
        ready = self._ready
        while True:
            if control:
                kind, sid, arg = control[0]
                size = CONTROL_SIZE[kind]
                if size > room:
                    break
                control.popleft()
                frame = self._control_frame(kind, sid, arg)
                if frame:
                    out.append(frame)
                    room -= size
                continue
            if not ready or room <= OVERHEAD:
                break
            st = ready.popleft()
            if not st.in_ready:
                continue
            n = min(self.max_frame_size, st.tx.size, room - OVERHEAD)
            if self.version == 2:
                n = min(n, self._send_window(st))
            if n <= 0:
                st.in_ready = False
                continue
            frame = PyBytes_FromStringAndSize(NULL, OVERHEAD + n)
            put_header(PyBytes_AS_STRING(frame), self.version, CMD_PSH, <int> n, <uint32_t> st.sid)
            st.tx.take_into(PyBytes_AS_STRING(frame) + OVERHEAD, n)
            out.append(frame)
            room -= OVERHEAD + n
            st.sent += n
            self.frames_sent += 1
            self.data_bytes_sent += n
            if self._sendable(st):
                ready.append(st)
            else:
                st.in_ready = False
            if st.want_writable and st.tx.size <= self.stream_buffer // 2:
                st.want_writable = False
                self._emit(StreamWritable, st.sid, StreamWritable(st.sid))
            if not st.tx.size and st.fin_pending:
                self._commit_fin(st)
        if not out:
            return b""
        self._last_send = now
        return out[0] if len(out) == 1 else b"".join(out)

    def get_timer(self):
        """The next time :meth:`handle_timer` must run, or None."""
        cdef int64_t due = 0, idle
        cdef bint has = False
        if self._closed:
            return None
        if self._has_keepalive and not self._nop_queued:
            due = self._last_send + self._keepalive
            has = True
        if self._has_idle_timeout:
            idle = self._last_recv + self._idle_timeout
            if not has or idle < due:
                due = idle
                has = True
        return due if has else None

    def handle_timer(self, int64_t now):
        if self._closed:
            return
        if self._has_idle_timeout and now >= self._last_recv + self._idle_timeout:
            if self._rx_blocked:
                # We held the peer's frames back (v1 backpressure): silence proves nothing.
                self._last_recv = now
                self._rx_blocked = self.receive_capacity() == 0
            else:
                self._terminate(
                    DeadPeerError(f"no frame from the peer for {self._idle_timeout} ms")
                )
                return
        if (
            self._has_keepalive
            and not self._nop_queued
            and now >= self._last_send + self._keepalive
        ):
            self._nop_queued = True
            self._control.append((K_NOP, 0, 0))

    @property
    def has_events(self):
        """Whether :meth:`next_event` has something (cheaper than asking it)."""
        return bool(self._events)

    def next_event(self):
        if not self._events:
            return None
        return self._events.popitem(last=False)[1]

    # ------------------------------------------------------------ application side

    def open_stream(self):
        """A new stream id. No round trip: SYN is queued and data may follow at once."""
        self._check_open()
        if self._last_local_id + 2 > MAX_STREAM_ID:
            raise ConnectionRefused("stream ids exhausted; open a new session")
        if len(self._streams) >= self.max_streams:
            raise ConnectionRefused(f"too many streams (max_streams={self.max_streams})")
        self._last_local_id += 2
        sid = self._last_local_id
        st = self._new_stream(sid, True)
        self._control.append((K_SYN, sid, 0))
        self._initial_window(st)
        self.streams_opened += 1
        return sid

    def accept_stream(self):
        """The next stream the peer opened, or None."""
        self._check_open()
        if not self._backlog:
            return None
        sid = self._backlog.popleft()
        self._events.pop((StreamOpened, sid), None)
        return sid

    def send(self, sid, data):
        """Queue bytes; returns how many fit in the stream's send buffer (maybe 0)."""
        cdef _Stream st = self._lookup(sid)
        cdef Py_ssize_t size, n
        if not steady(st.state, I_SEND, A_WRITE):
            self._step(st, I_SEND, None)  # raises unless the write side is open
        size = len(data)
        n = min(size, self.stream_buffer - st.tx.size)
        if n < size:
            st.want_writable = True
        if n > 0:
            st.tx.append(data if n == size and type(data) is bytes else bytes(data[:n]))
            self._schedule(st)
        return n

    def read(self, sid, max_bytes=-1):
        """Up to ``max_bytes`` (all if -1) buffered bytes; ``b""`` at EOF (see the reference)."""
        data = self.try_read(sid, max_bytes)
        if data is None:
            raise BlockingIOError(f"stream {sid}: no data yet")
        return data

    def try_read(self, sid, max_bytes=-1):
        """:meth:`read`, but None instead of ``BlockingIOError`` when nothing is buffered yet."""
        cdef _Stream st
        cdef bytes data
        if max_bytes == 0 or max_bytes < -1:
            raise ValueError(f"max_bytes must be -1 or positive, got {max_bytes!r}")
        st = self._lookup(sid)
        if not steady(st.state, I_READ, A_READ):
            self._step(st, I_READ, None)
        st.read_armed = True
        if st.rx.size:
            data = st.rx.take(st.rx.size if max_bytes < 0 or max_bytes > st.rx.size else max_bytes)
            self._consume(st, PyBytes_GET_SIZE(data))
            return data
        if st.eof:
            st.eof_delivered = True
            self._maybe_release(st)
            return b""
        return None

    def end_stream(self, sid):
        """Half-close: FIN after the buffered bytes; reading keeps working."""
        self._check_open()
        cdef _Stream st = self._streams.get(sid)
        if st is not None and not st.abandoned:
            self._step(st, I_END, None)

    def reset_stream(self, sid):
        """Abort the stream: discard both directions' buffers and tell the peer."""
        if self._closed:
            return
        cdef _Stream st = self._streams.get(sid)
        if st is not None and not st.abandoned:
            self._step(st, I_RESET, None)

    def close_stream(self, sid):
        """The application is done with the stream (like smux's ``Close``)."""
        if self._closed:
            return
        cdef _Stream st = self._streams.get(sid)
        if st is not None and not st.abandoned:
            self._step(st, I_CLOSE, None)

    def close(self, error=None):
        """End the session at once (``error``: why the channel went away, if it did)."""
        if not self._closed:
            self._terminate(error)

    # ------------------------------------------------------------ state machine

    cdef int _step(self, _Stream st, int inp, bytes body) except -1:
        """Look the input up in the table, move to the next state, run the action."""
        cdef int action = ACTION[st.state][inp]
        st.state = NEXT[st.state][inp]
        if action == A_WRITE or action == A_READ or action == A_IGNORE:
            pass  # WRITE and READ are done by send() and read() themselves
        elif action == A_QUEUE_FIN:
            self._do_queue_fin(st)
        elif action == A_ABORT:
            self._do_abort(st)
        elif action == A_ABANDON:
            self._do_abandon(st)
        elif action == A_DELIVER:
            self._do_deliver(st, body)
        elif action == A_EOF:
            self._do_eof(st)
        elif action == A_PEER_RESET:
            self._do_peer_reset(st, body)
        elif action == A_UPDATE_WINDOW:
            self._do_update_window(st, body)
        elif action == A_DROP:
            self.frames_dropped += 1
        elif action == A_FAIL_CLOSED:
            raise ClosedError(f"stream {st.sid} is closed for writing")
        elif action == A_FAIL_RESET:
            self._finish(st)
            if st.refused:
                raise ConnectionRefused(f"stream {st.sid} was refused by the peer")
            raise ConnectionReset(f"stream {st.sid} was reset by the peer")
        elif action == A_RELEASE:
            self._finish(st)
        return 0

    cdef int _do_queue_fin(self, _Stream st) except -1:
        if st.tx.size:
            st.fin_pending = True
        else:
            self._commit_fin(st)
        return 0

    cdef int _do_abort(self, _Stream st) except -1:
        st.tx.clear()
        st.fin_pending = False
        if not st.syn_sent:
            # Its SYN is still queued: withdraw it (and its UPD, FIN); the peer never hears of it.
            kept = [item for item in self._control if item[1] != st.sid]
            self._control.clear()
            self._control.extend(kept)
            st.closing_frames = 0
        elif self.extensions:
            self._queue_closing(st, K_RST, RST_RESET)
            self.resets_sent += 1
        elif not st.fin_committed:
            self._queue_closing(st, K_FIN, 0)
        self._finish(st)
        return 0

    cdef int _do_abandon(self, _Stream st) except -1:
        self._discard_input(st)
        if not (st.fin_pending or st.fin_committed):
            self._do_queue_fin(st)
        self._finish(st)
        return 0

    cdef int _do_deliver(self, _Stream st, bytes body) except -1:
        cdef int64_t n = PyBytes_GET_SIZE(body), end
        if self.version == 2:
            end = st.received + n
            if end > self._allowed(st):
                raise ProtocolError(
                    f"stream {st.sid}: peer sent {end - self._allowed(st)} bytes "
                    "beyond the window we advertised"
                )
            if end > st.limit:  # sent on smux's initial guess before our first UPD arrived
                self.bytes_over_window += end - st.limit
                self._set_limit(st, end)  # the pool must see what we really hold
        st.received += n
        st.rx.append(body)
        self._rx_buffered += n
        if st.read_armed:
            st.read_armed = False
            if st.readable_event is None:
                st.readable_event = StreamReadable(st.sid)
            self._emit(StreamReadable, st.sid, st.readable_event)
        return 0

    cdef int _do_eof(self, _Stream st) except -1:
        st.eof = True
        if self.version == 2:
            self._set_limit(st, st.received)  # nothing more will come: free the credit
        self._emit(StreamEnded, st.sid, StreamEnded(st.sid))
        return 0

    cdef int _do_peer_reset(self, _Stream st, bytes body) except -1:
        st.refused = int.from_bytes(body, "little") == RST_REFUSED
        st.tx.clear()
        st.fin_pending = False
        self._discard_input(st)
        self.resets_received += 1
        if st.sid in self._backlog:  # never accepted: the application never knew it
            self._finish(st)
            return 0
        self._events.pop((StreamReadable, st.sid), None)
        self._events.pop((StreamEnded, st.sid), None)
        self._events.pop((StreamWritable, st.sid), None)
        self._emit(StreamReset, st.sid, StreamReset(st.sid, st.refused))
        return 0

    cdef int _do_update_window(self, _Stream st, bytes body) except -1:
        cdef const uint8_t *p = <const uint8_t *> PyBytes_AS_STRING(body)
        cdef uint32_t consumed = get_u32(p), window = get_u32(p + 4)
        if ((st.sent - consumed) & U32) >= HALF_U32:
            raise ProtocolError(
                f"stream {st.sid}: peer claims {consumed} bytes consumed, more than we sent"
            )
        st.peer_consumed = consumed
        st.peer_window = min(<int64_t> window, HALF_U32 - 1)
        self.window_updates_received += 1
        self._schedule(st)
        return 0

    # ------------------------------------------------------------ frames in

    cdef Py_ssize_t _body_length(self, int cmd, int length) except -1:
        """The payload size a frame header announces; ProtocolError if it is malformed."""
        if cmd == CMD_PSH:
            return length
        if cmd == CMD_SYN or cmd == CMD_FIN or cmd == CMD_NOP:
            if length:
                raise ProtocolError(f"{CMD_NAMES[cmd]} frame with a {length}-byte payload")
            return 0
        if cmd == CMD_UPD and self.version == 2:
            if length != UPD_BODY:
                raise ProtocolError(f"UPD frame with a {length}-byte payload (must be 8)")
            return length
        if cmd == CMD_RST and self.extensions:
            if length != RST_BODY:
                raise ProtocolError(f"RST frame with a {length}-byte payload (must be 4)")
            return length
        raise ProtocolError(f"unknown smux command {cmd} (v{self.version})")

    cdef int _frame(self, int cmd, int64_t sid, bytes body) except -1:
        cdef _Stream st
        self.frames_received += 1
        if cmd == CMD_NOP:
            return 0
        if cmd == CMD_SYN:
            self._peer_syn(sid)
            return 0
        st = self._streams.get(sid)
        if st is None:
            self._unknown_stream(cmd, sid)
            return 0
        if cmd == CMD_PSH:
            if PyBytes_GET_SIZE(body):
                self.data_bytes_received += PyBytes_GET_SIZE(body)
                if steady(st.state, I_DATA, A_DELIVER):
                    self._do_deliver(st, body)
                else:
                    self._step(st, I_DATA, body)
        elif cmd == CMD_FIN:
            self._step(st, I_FIN, body)
        elif cmd == CMD_UPD:
            self._step(st, I_UPD, body)
        else:
            self._step(st, I_RST, body)
        return 0

    cdef int _peer_syn(self, int64_t sid) except -1:
        if sid == 0 or (sid & 1) == self._parity:
            raise ProtocolError(f"peer opened stream {sid}, an id of our side")
        if sid in self._streams:
            self.duplicate_syns += 1
            return 0
        self._max_peer_id = max(self._max_peer_id, sid)
        if len(self._streams) >= self.max_streams or len(self._backlog) >= self.stream_backlog:
            self._refuse(sid)
            return 0
        st = self._new_stream(sid, False)
        self._backlog.append(sid)
        self._initial_window(st)
        self.streams_accepted += 1
        self._emit(StreamOpened, sid, StreamOpened(sid))
        return 0

    cdef int _refuse(self, int64_t sid) except -1:
        if self._refusals_queued >= self.max_streams:
            raise ProtocolError("peer keeps opening streams beyond our limits")
        self._refusals_queued += 1
        self.streams_refused += 1
        if self.extensions:
            self._control.append((K_RST, sid, RST_REFUSED))
        else:
            self._control.append((K_FIN, sid, 1))
        return 0

    cdef int _unknown_stream(self, int cmd, int64_t sid) except -1:
        """A frame for a stream we do not have: closed earlier (drop) or never opened (error)."""
        cdef bint ours = (sid & 1) == self._parity
        if (
            sid == 0
            or (ours and sid > self._last_local_id)
            or (not ours and sid > self._max_peer_id)
        ):
            name = "RST" if cmd == CMD_RST else CMD_NAMES.get(cmd, str(cmd))
            raise ProtocolError(f"{name} for stream {sid}, which was never opened")
        self.frames_dropped += 1
        return 0

    # ------------------------------------------------------------ frames out

    cdef bytes _control_frame(self, int kind, int64_t sid, uint32_t arg):
        """Encode a queued control item, or b"" when it no longer applies."""
        cdef int v = self.version
        cdef _Stream st = self._streams.get(sid)
        cdef bytes frame
        if kind == K_SYN:  # (a reset before this point withdrew it from the queue)
            if st is not None:
                st.syn_sent = True
            frame = control_frame_bytes(v, CMD_SYN, <uint32_t> sid, 0, 0, 0)
        elif kind == K_FIN:
            if arg:  # a refusal: no stream behind it
                self._refusals_queued -= 1
            elif st is not None:
                st.fin_sent = True
                self._closing_frame_out(st)
            frame = control_frame_bytes(v, CMD_FIN, <uint32_t> sid, 0, 0, 0)
        elif kind == K_NOP:
            self._nop_queued = False
            self.keepalives_sent += 1
            frame = control_frame_bytes(v, CMD_NOP, 0, 0, 0, 0)
        elif kind == K_RST:
            if arg == RST_REFUSED:
                self._refusals_queued -= 1
            elif st is not None:
                self._closing_frame_out(st)
            frame = control_frame_bytes(v, CMD_RST, <uint32_t> sid, RST_BODY, arg, 0)
        else:  # K_UPD
            if st is None:
                return b""
            st.upd_queued = False
            if st.eof or st.abandoned or st.state == S_RESET:  # nothing more to read
                return b""
            target = self._target(st)
            self._set_limit(st, max(st.limit, st.consumed + target))
            frame = control_frame_bytes(
                v, CMD_UPD, <uint32_t> sid, UPD_BODY,
                <uint32_t> (st.consumed & U32), <uint32_t> (st.limit - st.consumed)
            )
            self.window_updates_sent += 1
        self.frames_sent += 1
        return frame

    cdef int _commit_fin(self, _Stream st) except -1:
        st.fin_pending = False
        st.fin_committed = True
        self._queue_closing(st, K_FIN, 0)
        return 0

    cdef int _queue_closing(self, _Stream st, int kind, uint32_t arg) except -1:
        st.closing_frames += 1
        self._control.append((kind, st.sid, arg))
        return 0

    cdef int _closing_frame_out(self, _Stream st) except -1:
        st.closing_frames -= 1
        self._maybe_release(st)
        return 0

    cdef inline bint _sendable(self, _Stream st) noexcept:
        return st.tx.size > 0 and (self.version == 1 or self._send_window(st) > 0)

    cdef inline int64_t _send_window(self, _Stream st) noexcept:
        cdef int64_t inflight = (st.sent - st.peer_consumed) & U32
        return max(0, st.peer_window - inflight)

    cdef int _schedule(self, _Stream st) except -1:
        if not st.in_ready and self._sendable(st):
            st.in_ready = True
            self._ready.append(st)
        return 0

    # ------------------------------------------------------------ receive windows (v2)

    cdef inline int64_t _allowed(self, _Stream st) noexcept:
        """Highest stream offset the peer may legitimately send up to."""
        return max(INITIAL_PEER_WINDOW, st.limit)

    cdef inline void _set_limit(self, _Stream st, int64_t limit) noexcept:
        self._credit += limit - st.limit
        st.limit = limit

    cdef inline int64_t _target(self, _Stream st) noexcept:
        """The window to grant this stream now: its ambition, capped by the session pool."""
        cdef int64_t free = self.session_buffer - (self._credit - (st.limit - st.consumed))
        return min(st.grant, max(min(MIN_WINDOW, self.stream_buffer), free))

    cdef int _initial_window(self, _Stream st) except -1:
        """Tell the peer our window for a new stream unless smux's 256 KiB guess is right."""
        cdef int64_t target
        if self.version == 1:
            return 0
        self._credit += st.limit
        target = self._target(st)
        if target != INITIAL_PEER_WINDOW:
            self._set_limit(st, target)
            st.upd_queued = True
            self._control.append((K_UPD, st.sid, 0))
        return 0

    cdef int _consume(self, _Stream st, int64_t n) except -1:
        cdef int64_t target
        st.consumed += n
        self._rx_buffered -= n
        if self.version == 1:
            return 0
        self._credit -= n
        if st.eof:  # no more data will come: no window to open
            return 0
        if st.consumed - st.grow_mark >= st.grant:  # the reader keeps up: widen the window
            st.grant = min(2 * st.grant, self.stream_buffer)
            st.grow_mark = st.consumed
        target = self._target(st)
        if not st.upd_queued and st.consumed + target - st.limit >= max(1, target // 2):
            st.upd_queued = True
            self._control.append((K_UPD, st.sid, 0))
        return 0

    cdef int _discard_input(self, _Stream st) except -1:
        cdef int64_t n = st.rx.clear()
        self._rx_buffered -= n
        st.consumed += n
        if self.version == 2:
            self._credit -= n
            self._set_limit(st, st.consumed)
        return 0

    # ------------------------------------------------------------ bookkeeping

    cdef _Stream _new_stream(self, int64_t sid, bint local):
        cdef _Stream st = _Stream(sid, local, min(self.stream_buffer, INITIAL_PEER_WINDOW))
        if self.version == 1:
            st.limit = 0
        self._streams[sid] = st
        return st

    cdef int _finish(self, _Stream st) except -1:
        """The application is done with the stream: hide it, release it once flushed."""
        st.abandoned = True
        for kind in (StreamOpened, StreamReadable, StreamEnded, StreamWritable):
            self._events.pop((kind, st.sid), None)
        if st.sid in self._backlog:
            self._backlog.remove(st.sid)
        self._maybe_release(st)
        return 0

    cdef int _maybe_release(self, _Stream st) except -1:
        """Forget a stream once the application is done with it and its last frame is out."""
        if st.closing_frames or st.fin_pending:
            return 0
        if st.abandoned or (st.eof_delivered and st.fin_sent):
            self._release(st)
        return 0

    cdef int _release(self, _Stream st) except -1:
        sid = st.sid
        if self._streams.pop(sid, None) is None:
            return 0
        self._rx_buffered -= st.rx.clear()
        if self.version == 2:
            self._credit -= st.limit - st.consumed
        st.in_ready = False
        for kind in (StreamOpened, StreamReadable, StreamEnded, StreamWritable, StreamReset):
            self._events.pop((kind, sid), None)
        if sid in self._backlog:  # read to EOF and ended without ever being accepted
            self._backlog.remove(sid)
        return 0

    cdef inline int _emit(self, kind, int64_t sid, event) except -1:
        self._events[(kind, sid)] = event
        return 0

    cdef _Stream _lookup(self, sid):
        cdef _Stream st
        if self._closed:
            raise self._error or ClosedError("session closed")
        st = self._streams.get(sid)
        if st is None or st.abandoned:
            raise ClosedError(f"stream {sid} is closed")
        return st

    cdef int _check_open(self) except -1:
        if self._closed:
            raise self._error or ClosedError("session closed")
        return 0

    cdef int _terminate(self, error) except -1:
        self._closed = True
        self._error = error
        self._streams.clear()
        self._backlog.clear()
        self._control.clear()
        self._ready.clear()
        self._rx.clear()
        self._rx_buffered = 0
        self._credit = 0
        self._events.clear()
        self._emit(SessionClosed, 0, SessionClosed(error))
        return 0
