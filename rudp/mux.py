"""Session layer: many independent byte streams over one reliable, ordered channel.

A :class:`Session` is a sans-I/O state machine speaking xtaci/smux's frames
(v1 and v2), so it can face a real smux peer (kcptun) as well as another rudp
end. Bytes and an integer clock in milliseconds go in; frames, events and a
deadline come out. Nothing here reads a clock, sleeps or touches a socket.

Frames (layout in :mod:`rudp.wire`): ``ver u8 | cmd u8 | length u16 | sid u32 | data``.

=====  =====================================================================
SYN    open stream ``sid`` (no payload). No reply: data may follow at once.
FIN    the sender will write no more on ``sid`` (EOF for the reader).
PSH    ``length`` bytes of stream data.
NOP    keepalive (sid 0, no payload).
UPD    v2 only, 8 bytes ``consumed u32 | window u32``: the receiver has read
       ``consumed`` bytes (mod 2**32) of the stream; the sender may have at
       most ``window`` bytes unread in flight. Before the first UPD a smux
       sender assumes a window of :data:`INITIAL_PEER_WINDOW`.
RST    rudp extension (cmd 0x80, only with ``extensions=True``, which the
       rudp handshake negotiates), 4 bytes ``code u32``: 0 reset (abort),
       1 refused. A plain smux peer has no reset: there a reset is a FIN
       plus dropping local state, and the peer just sees EOF.
=====  =====================================================================

Half-close: FIN ends one direction only; the other keeps flowing. A smux
peer older than ``CloseWrite`` (such as v1.5.16 in Debian's kcptun) only
sends FIN from ``Close``: it has forgotten the stream and drops what we send
after its FIN, and without UPDs our writer stalls once the window is used.

Stream ids: the client opens odd ids 3, 5, 7, ... and the server even ids
2, 4, 6, ... (as smux numbers them), so the two sides never collide. When
the u32 space is used up, :meth:`Session.open_stream` refuses.

Receive-side bounds (why no stream can stall the others):

* v2: every stream has its own window. The windows we grant come from one
  session pool of ``session_buffer`` bytes: a stream is granted
  ``min(its ambition, free pool)`` but never less than
  ``min(MIN_WINDOW, stream_buffer)``, so a stream whose reader stopped
  holds at most its window and every other stream keeps a window to make
  progress with. Ambition starts at ``min(stream_buffer, 256 KiB)`` and
  doubles (up to ``stream_buffer``) each time a reader drains a whole window,
  so idle streams do not hog the pool. A peer exceeding a window is a
  :class:`ProtocolError`. Bound: ``session_buffer`` + ``MIN_WINDOW`` per
  stream, plus, for a stream whose window we shrank below 256 KiB, what a
  smux peer may send on its initial 256 KiB guess before our first UPD
  reaches it. The session never stops parsing in v2
  (:meth:`Session.receive_capacity` is ``None``).
* v1 has no window update: like smux's token bucket, all streams share
  ``session_buffer`` and :meth:`Session.receive_capacity` tells the
  transport how many more channel bytes it may hand in. At 0 the transport
  stops pulling from the ARQ, whose receive window then closes and
  backpressures the peer. Bound: ``session_buffer`` plus the rest of at most
  one frame already begun (smux also checks between frames). This is
  head-of-line blocking across streams; it is the protocol's limit, and why
  v2 is the default. Time spent blocked this way never counts as the peer's
  silence for ``idle_timeout``.

Lifetime: a stream is forgotten once the application is done with it
(``close_stream``, ``reset_stream``, a reset it was told about, or EOF read
after our own FIN) *and* its last frame (FIN/RST) has been pulled; until
then it keeps its slot under ``max_streams``, which is what bounds the
control queue. Frames that arrive later for it are dropped and counted,
as smux does for unknown streams; frames for ids that were never opened
are a :class:`ProtocolError`.

Send side: each stream buffers at most ``stream_buffer`` bytes
(:meth:`Session.send` returns how much it took). The transport *pulls*
frames with :meth:`Session.data_to_send`, only as much as its own send
window can take, so the mux, not the ARQ queue, decides the order: control
frames (SYN/UPD/NOP/RST, and a FIN once its stream's data is out) first,
then one data frame per ready stream in round-robin.

Driving it from a transport:

1. After every input (``receive_data``, ``handle_timer``, any API call),
   pull while the ARQ has room: ``out = session.data_to_send(room, now)``,
   give ``out`` to the ARQ, repeat until ``out`` is empty. ``has_output()``
   says whether waking the sender is worth it. Frames never straddle two
   pulls, so pass a ``room`` of a few hundred bytes or more (an MSS).
2. Feed channel bytes with ``receive_data(chunk, now)``, any chunking; in v1
   first consult ``receive_capacity()`` and hand in no more than it says.
3. Arm one timer at ``get_timer()`` (``None``: nothing due) and call
   ``handle_timer(now)`` when it fires.
4. Drain ``next_event()`` after each of the above and wake tasks:
   :class:`StreamOpened` → an ``accept`` waiter (then ``accept_stream()``);
   :class:`StreamReadable`/:class:`StreamEnded` → that stream's reader;
   :class:`StreamWritable` → its ``drain()`` waiters; :class:`StreamReset` →
   both, with the error ``read``/``send`` now raise; :class:`SessionClosed`
   → everyone, with its ``error``.
5. Call ``read()`` only when the application reads: reading is what grants
   the peer more window. Buffering stream data elsewhere defeats flow control.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from dataclasses import dataclass, fields

from rudp.config import Configuration, check_bool, check_range
from rudp.errors import (
    ClosedError,
    ConnectionRefused,
    ConnectionReset,
    DeadPeerError,
    ProtocolError,
    RudpError,
)
from rudp.events import Event
from rudp.wire import (
    SMUX_FIN,
    SMUX_HEADER,
    SMUX_NOP,
    SMUX_OVERHEAD,
    SMUX_PSH,
    SMUX_RST,
    SMUX_RST_REFUSED,
    SMUX_RST_RESET,
    SMUX_SYN,
    SMUX_UPD,
    SMUX_UPD_BODY,
)

__all__ = [
    "INITIAL_PEER_WINDOW",
    "MIN_WINDOW",
    "MUX_RST",
    "RST_REFUSED",
    "RST_RESET",
    "TRANSITIONS",
    "Action",
    "MuxStats",
    "Session",
    "SessionClosed",
    "StreamEnded",
    "StreamInfo",
    "StreamInput",
    "StreamOpened",
    "StreamReadable",
    "StreamReset",
    "StreamState",
    "StreamWritable",
]

#: The window a smux sender assumes for a new stream before the first UPD (smux's constant).
INITIAL_PEER_WINDOW = 262144
#: The smallest window a v2 stream is granted however full the session pool is.
MIN_WINDOW = 16384
#: rudp extension command: reset a stream. Body: ``code u32``.
MUX_RST = SMUX_RST
RST_RESET = SMUX_RST_RESET
RST_REFUSED = SMUX_RST_REFUSED
_RST_BODY_SIZE = 4

_U32 = 0xFFFFFFFF
_MAX_STREAM_ID = _U32
_CMD_NAMES = {SMUX_SYN: "SYN", SMUX_FIN: "FIN", SMUX_PSH: "PSH", SMUX_NOP: "NOP", SMUX_UPD: "UPD"}


# ---------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamOpened(Event):
    """The peer opened a stream; :meth:`Session.accept_stream` returns it."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReadable(Event):
    """New bytes arrived since the last :meth:`Session.read` of this stream."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamEnded(Event):
    """The peer sent FIN: once the buffered bytes are read, ``read`` returns ``b""``."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamWritable(Event):
    """A send buffer that was full is at most half full again."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset(Event):
    """The peer reset the stream (``refused``: it never accepted it); data was discarded."""

    stream_id: int
    refused: bool = False


@dataclass(frozen=True, slots=True)
class SessionClosed(Event):
    """The session is over; ``error`` is None after a local :meth:`Session.close`."""

    error: RudpError | None


# ---------------------------------------------------------------------------
# The stream state table
# ---------------------------------------------------------------------------


class StreamState(enum.Enum):
    OPEN = "open"
    LOCAL_CLOSED = "local-closed"  # we ended our side (FIN); we still read
    REMOTE_CLOSED = "remote-closed"  # the peer ended its side; we still write
    CLOSED = "closed"  # both sides ended (or the application closed the stream)
    RESET = "reset"  # aborted by either side (a peer's reset is kept until the app learns)


class StreamInput(enum.Enum):
    SEND = "send"
    READ = "read"
    END = "end_stream"
    RESET = "reset_stream"
    CLOSE = "close_stream"
    RECV_DATA = "PSH"
    RECV_FIN = "FIN"
    RECV_RST = "RST"
    RECV_UPD = "UPD"


class Action(enum.Enum):
    WRITE = "buffer the bytes for sending"
    READ = "hand out buffered bytes, then EOF once the peer's FIN is reached"
    QUEUE_FIN = "send FIN after the buffered bytes"
    ABORT = "discard both buffers, send RST (FIN to a plain smux peer), release"
    ABANDON = "FIN if not yet, discard and drop all input from now on, release"
    DELIVER = "buffer the bytes for the reader (checking the window)"
    EOF = "mark end of input and tell the reader"
    PEER_RESET = "discard both buffers and tell the application"
    UPDATE_WINDOW = "store the peer's consumed count and window"
    DROP = "discard the frame and count it"
    IGNORE = "nothing to do (repeats are harmless)"
    FAIL_CLOSED = "raise ClosedError"
    FAIL_RESET = "raise ConnectionReset (ConnectionRefused if refused), then release"
    RELEASE = "forget the stream"


_S = StreamState
_I = StreamInput
_A = Action

#: (state, input) → (next state, action). Every pair is listed (and tested).
TRANSITIONS: dict[tuple[StreamState, StreamInput], tuple[StreamState, Action]] = {
    (_S.OPEN, _I.SEND): (_S.OPEN, _A.WRITE),
    (_S.OPEN, _I.READ): (_S.OPEN, _A.READ),
    (_S.OPEN, _I.END): (_S.LOCAL_CLOSED, _A.QUEUE_FIN),
    (_S.OPEN, _I.RESET): (_S.RESET, _A.ABORT),
    (_S.OPEN, _I.CLOSE): (_S.CLOSED, _A.ABANDON),
    (_S.OPEN, _I.RECV_DATA): (_S.OPEN, _A.DELIVER),
    (_S.OPEN, _I.RECV_FIN): (_S.REMOTE_CLOSED, _A.EOF),
    (_S.OPEN, _I.RECV_RST): (_S.RESET, _A.PEER_RESET),
    (_S.OPEN, _I.RECV_UPD): (_S.OPEN, _A.UPDATE_WINDOW),
    #
    (_S.LOCAL_CLOSED, _I.SEND): (_S.LOCAL_CLOSED, _A.FAIL_CLOSED),
    (_S.LOCAL_CLOSED, _I.READ): (_S.LOCAL_CLOSED, _A.READ),
    (_S.LOCAL_CLOSED, _I.END): (_S.LOCAL_CLOSED, _A.IGNORE),
    (_S.LOCAL_CLOSED, _I.RESET): (_S.RESET, _A.ABORT),
    (_S.LOCAL_CLOSED, _I.CLOSE): (_S.CLOSED, _A.ABANDON),
    (_S.LOCAL_CLOSED, _I.RECV_DATA): (_S.LOCAL_CLOSED, _A.DELIVER),
    (_S.LOCAL_CLOSED, _I.RECV_FIN): (_S.CLOSED, _A.EOF),
    (_S.LOCAL_CLOSED, _I.RECV_RST): (_S.RESET, _A.PEER_RESET),
    (_S.LOCAL_CLOSED, _I.RECV_UPD): (_S.LOCAL_CLOSED, _A.UPDATE_WINDOW),
    #
    (_S.REMOTE_CLOSED, _I.SEND): (_S.REMOTE_CLOSED, _A.WRITE),
    (_S.REMOTE_CLOSED, _I.READ): (_S.REMOTE_CLOSED, _A.READ),
    (_S.REMOTE_CLOSED, _I.END): (_S.CLOSED, _A.QUEUE_FIN),
    (_S.REMOTE_CLOSED, _I.RESET): (_S.RESET, _A.ABORT),
    (_S.REMOTE_CLOSED, _I.CLOSE): (_S.CLOSED, _A.ABANDON),
    (_S.REMOTE_CLOSED, _I.RECV_DATA): (_S.REMOTE_CLOSED, _A.DROP),
    (_S.REMOTE_CLOSED, _I.RECV_FIN): (_S.REMOTE_CLOSED, _A.IGNORE),
    (_S.REMOTE_CLOSED, _I.RECV_RST): (_S.RESET, _A.PEER_RESET),
    (_S.REMOTE_CLOSED, _I.RECV_UPD): (_S.REMOTE_CLOSED, _A.UPDATE_WINDOW),
    #
    (_S.CLOSED, _I.SEND): (_S.CLOSED, _A.FAIL_CLOSED),
    (_S.CLOSED, _I.READ): (_S.CLOSED, _A.READ),
    (_S.CLOSED, _I.END): (_S.CLOSED, _A.IGNORE),
    (_S.CLOSED, _I.RESET): (_S.RESET, _A.ABORT),
    (_S.CLOSED, _I.CLOSE): (_S.CLOSED, _A.ABANDON),
    (_S.CLOSED, _I.RECV_DATA): (_S.CLOSED, _A.DROP),
    (_S.CLOSED, _I.RECV_FIN): (_S.CLOSED, _A.IGNORE),
    (_S.CLOSED, _I.RECV_RST): (_S.RESET, _A.PEER_RESET),
    (_S.CLOSED, _I.RECV_UPD): (_S.CLOSED, _A.UPDATE_WINDOW),
    #
    (_S.RESET, _I.SEND): (_S.RESET, _A.FAIL_RESET),
    (_S.RESET, _I.READ): (_S.RESET, _A.FAIL_RESET),
    (_S.RESET, _I.END): (_S.RESET, _A.IGNORE),
    (_S.RESET, _I.RESET): (_S.RESET, _A.RELEASE),
    (_S.RESET, _I.CLOSE): (_S.RESET, _A.RELEASE),
    (_S.RESET, _I.RECV_DATA): (_S.RESET, _A.DROP),
    (_S.RESET, _I.RECV_FIN): (_S.RESET, _A.DROP),
    (_S.RESET, _I.RECV_RST): (_S.RESET, _A.IGNORE),
    (_S.RESET, _I.RECV_UPD): (_S.RESET, _A.DROP),
}


def _steady(inp: StreamInput, action: Action) -> tuple[StreamState, ...]:
    """The states in which ``inp`` keeps the state and runs ``action``, read off the table.

    The per-byte paths (send, read, data frames) test membership in these by
    identity instead of looking the pair up: the table stays the one definition.
    """
    return tuple(s for s in StreamState if TRANSITIONS[(s, inp)] == (s, action))


_SEND_STEADY = _steady(_I.SEND, _A.WRITE)
_READ_STEADY = _steady(_I.READ, _A.READ)
_DELIVER_STEADY = _steady(_I.RECV_DATA, _A.DELIVER)
#: Method names of the actions, so a step does not build them.
_HANDLERS = {action: "_do_" + action.name.lower() for action in Action}


# ---------------------------------------------------------------------------
# Inspection and counters
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """A snapshot of one stream, for tests, counters and debugging."""

    stream_id: int
    state: StreamState
    opened_locally: bool
    recv_buffered: int  # bytes received, not yet read
    send_buffered: int  # bytes accepted by send(), not yet framed
    recv_window: int | None  # v2: what our last UPD lets the peer still send; None in v1
    send_window: int | None  # bytes we may still send before an UPD (v2), None in v1
    eof_received: bool
    fin_sent: bool


@dataclass(slots=True)
class MuxStats:
    """Counters; every dropped or refused thing is counted somewhere here."""

    frames_sent: int = 0
    frames_received: int = 0
    data_bytes_sent: int = 0
    data_bytes_received: int = 0
    frames_dropped: int = 0  # frames for streams already closed, data after FIN
    duplicate_syns: int = 0
    streams_opened: int = 0
    streams_accepted: int = 0
    streams_refused: int = 0  # peer streams we turned away (limits)
    resets_sent: int = 0
    resets_received: int = 0
    window_updates_sent: int = 0
    window_updates_received: int = 0
    bytes_over_window: int = 0  # v2: sent on smux's 256 KiB guess beyond our first window
    keepalives_sent: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ---------------------------------------------------------------------------
# Internals
# ---------------------------------------------------------------------------


class _ByteQueue:
    """FIFO of bytes kept as the chunks they arrived in (no O(n) shifting)."""

    __slots__ = ("_chunks", "_head", "size")

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._head = 0
        self.size = 0

    def append(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)
            self.size += len(data)

    def take(self, n: int) -> bytes:
        n = min(n, self.size)
        self.size -= n
        parts = []
        while n:
            chunk = self._chunks[0]
            avail = len(chunk) - self._head
            if avail <= n:
                parts.append(memoryview(chunk)[self._head :] if self._head else chunk)
                self._chunks.popleft()
                self._head = 0
                n -= avail
            else:
                parts.append(memoryview(chunk)[self._head : self._head + n])
                self._head += n
                n = 0
        return parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) else b"".join(parts)

    def clear(self) -> int:
        dropped = self.size
        self._chunks.clear()
        self._head = 0
        self.size = 0
        return dropped


class _Stream:
    __slots__ = (
        "abandoned",
        "closing_frames",
        "consumed",
        "eof",
        "eof_delivered",
        "fin_committed",
        "fin_pending",
        "fin_sent",
        "grant",
        "grow_mark",
        "in_ready",
        "limit",
        "local",
        "peer_consumed",
        "peer_window",
        "read_armed",
        "received",
        "refused",
        "rx",
        "sent",
        "sid",
        "state",
        "syn_sent",
        "tx",
        "upd_queued",
        "want_writable",
    )

    def __init__(self, sid: int, local: bool, grant: int) -> None:
        self.sid = sid
        self.local = local
        self.state = StreamState.OPEN
        self.rx = _ByteQueue()
        self.tx = _ByteQueue()
        # receive side: byte offsets in the stream (Python ints, never wrap)
        self.received = 0
        self.consumed = 0  # read by the application (or discarded)
        self.limit = INITIAL_PEER_WINDOW  # highest offset we ever allowed (v2)
        self.grant = grant  # the window this stream is currently entitled to
        self.grow_mark = 0
        # send side
        self.sent = 0
        self.peer_consumed = 0  # u32, as the peer reported it
        self.peer_window = INITIAL_PEER_WINDOW
        # flags
        self.syn_sent = not local  # the peer's own streams are known to it
        self.fin_pending = False  # FIN wanted once tx drains
        self.fin_committed = False  # FIN is in the control queue (or out)
        self.closing_frames = 0  # its FIN/RST still queued: the stream keeps its slot
        self.fin_sent = False
        self.eof = False
        self.eof_delivered = False
        self.refused = False
        self.abandoned = False  # the application is done with it (closed, reset, told of a reset)
        self.read_armed = True
        self.want_writable = False
        self.in_ready = False
        self.upd_queued = False


# control queue items: (cmd, sid, argument)
_SYN, _FIN, _UPD, _NOP, _RST = "SYN", "FIN", "UPD", "NOP", "RST"
_CONTROL_SIZE = {
    _SYN: SMUX_OVERHEAD,
    _FIN: SMUX_OVERHEAD,
    _NOP: SMUX_OVERHEAD,
    _UPD: SMUX_OVERHEAD + SMUX_UPD_BODY.size,
    _RST: SMUX_OVERHEAD + _RST_BODY_SIZE,
}


# ---------------------------------------------------------------------------
# Session
# ---------------------------------------------------------------------------


class Session:
    """One side of a multiplexed session over a reliable, ordered byte channel.

    Times are integer milliseconds from any origin (the caller's clock).
    ``keepalive``: send a NOP after this long without sending anything.
    ``idle_timeout``: close with :class:`DeadPeerError` after this long
    without receiving anything (never while v1 backpressure is what stops
    the peer's frames). ``None`` disables either.
    """

    def __init__(
        self,
        *,
        client: bool,
        now: int,
        version: int = 2,
        max_frame_size: int = 32768,
        stream_buffer: int = 1 << 20,
        session_buffer: int = 4 << 20,
        max_streams: int = 1024,
        stream_backlog: int = 128,
        keepalive: int | None = 10000,
        idle_timeout: int | None = 30000,
        extensions: bool = False,
    ) -> None:
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
        self.keepalive = keepalive
        self.idle_timeout = idle_timeout
        self.extensions = extensions
        self.stats = MuxStats()

        self._parity = 1 if client else 0
        self._last_local_id = 1 if client else 0  # smux: first ids are 3 and 2
        self._max_peer_id = 0
        self._streams: dict[int, _Stream] = {}
        self._backlog: deque[int] = deque()
        self._control: deque[tuple[str, int, int]] = deque()
        self._ready: deque[_Stream] = deque()  # streams with data to frame, round-robin
        self._events: OrderedDict[tuple[type, int], Event] = OrderedDict()
        self._rx = bytearray()
        self._rx_buffered = 0  # payload bytes buffered in all streams
        self._credit = 0  # v2: sum over streams of (limit - consumed)
        self._refusals_queued = 0
        self._nop_queued = False
        self._rx_blocked = False  # v1: our backpressure held the peer back since _last_recv
        self._last_send = now
        self._last_recv = now
        self._closed = False
        self._error: RudpError | None = None

    @classmethod
    def from_config(
        cls, config: Configuration, *, client: bool, now: int, extensions: bool = False
    ) -> Session:
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
    def closed(self) -> bool:
        return self._closed

    @property
    def error(self) -> RudpError | None:
        """Why the session ended (None while open or after a local close)."""
        return self._error

    def stream_ids(self) -> list[int]:
        return list(self._streams)

    def stream_info(self, sid: int) -> StreamInfo | None:
        st = self._streams.get(sid)
        if st is None:
            return None
        v2 = self.version == 2
        return StreamInfo(
            stream_id=sid,
            state=st.state,
            opened_locally=st.local,
            recv_buffered=st.rx.size,
            send_buffered=st.tx.size,
            recv_window=max(0, st.limit - st.received) if v2 else None,
            send_window=self._send_window(st) if v2 else None,
            eof_received=st.eof,
            fin_sent=st.fin_sent,
        )

    @property
    def recv_buffered(self) -> int:
        """Payload bytes received on all streams and not read yet."""
        return self._rx_buffered

    # ------------------------------------------------------------ channel side

    def receive_capacity(self) -> int | None:
        """How many more channel bytes the transport may pass in now.

        ``None`` in v2: per-stream windows bound memory, so the transport
        should always pass everything (that is what keeps one slow reader
        from stalling the session). In v1, ``session_buffer`` minus what is
        buffered; at 0 the transport must stop pulling from its ARQ.
        """
        if self.version == 2 or self._closed:
            return None
        return max(0, self.session_buffer - self._rx_buffered)

    def receive_data(self, data: bytes | bytearray | memoryview, now: int) -> None:
        """Channel bytes, in order, split anywhere. Protocol errors close the session."""
        if self._closed or not data:
            return
        self._last_recv = now
        buf = self._rx
        buf += data
        pos = 0
        end = len(buf)
        view = memoryview(buf)
        error = None
        try:
            while end - pos >= SMUX_OVERHEAD:
                ver, cmd, length, sid = SMUX_HEADER.unpack_from(view, pos)
                if ver != self.version:
                    raise ProtocolError(f"smux version {ver} in a v{self.version} session")
                need = self._body_length(cmd, length)
                if end - pos - SMUX_OVERHEAD < need:
                    break
                start = pos + SMUX_OVERHEAD
                pos = start + need
                self._frame(cmd, sid, bytes(view[start:pos]))
        except ProtocolError as exc:
            error = exc
        finally:
            view.release()
        if error is not None:
            self._terminate(error)
            return
        del buf[:pos]
        if self.receive_capacity() == 0:
            self._rx_blocked = True

    def has_output(self) -> bool:
        """Would :meth:`data_to_send` return anything (given room)?"""
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

    def data_to_send(self, max_bytes: int, now: int) -> bytes:
        """Whole frames, at most ``max_bytes`` of them: control first, then data round-robin."""
        if self._closed:
            return b""
        out: list[bytes] = []
        room = max_bytes
        control = self._control
        ready = self._ready
        while True:
            if control:
                kind, sid, arg = control[0]
                size = _CONTROL_SIZE[kind]
                if size > room:
                    break
                control.popleft()
                frame = self._control_frame(kind, sid, arg)
                if frame:
                    out.append(frame)
                    room -= size
                continue
            if not ready or room <= SMUX_OVERHEAD:
                break
            st = ready.popleft()
            if not st.in_ready:
                continue
            sid = st.sid
            n = min(self.max_frame_size, st.tx.size, room - SMUX_OVERHEAD)
            if self.version == 2:
                n = min(n, self._send_window(st))
            if n <= 0:
                st.in_ready = False
                continue
            payload = st.tx.take(n)
            out.append(SMUX_HEADER.pack(self.version, SMUX_PSH, n, sid) + payload)
            room -= SMUX_OVERHEAD + n
            st.sent += n
            self.stats.frames_sent += 1
            self.stats.data_bytes_sent += n
            if self._sendable(st):
                ready.append(st)
            else:
                st.in_ready = False
            if st.want_writable and st.tx.size <= self.stream_buffer // 2:
                st.want_writable = False
                self._emit(StreamWritable(sid))
            if not st.tx.size and st.fin_pending:
                self._commit_fin(st)
        if not out:
            return b""
        self._last_send = now
        return b"".join(out)

    def get_timer(self) -> int | None:
        """The next time :meth:`handle_timer` must run, or None."""
        if self._closed:
            return None
        due = None
        if self.keepalive is not None and not self._nop_queued:
            due = self._last_send + self.keepalive
        if self.idle_timeout is not None:
            idle = self._last_recv + self.idle_timeout
            if due is None or idle < due:
                due = idle
        return due

    def handle_timer(self, now: int) -> None:
        if self._closed:
            return
        if self.idle_timeout is not None and now >= self._last_recv + self.idle_timeout:
            if self._rx_blocked:
                # We held the peer's frames back (v1 backpressure) for some of that
                # time: silence proves nothing, so start over (smux does the same).
                self._last_recv = now
                self._rx_blocked = self.receive_capacity() == 0
            else:
                self._terminate(DeadPeerError(f"no frame from the peer for {self.idle_timeout} ms"))
                return
        if (
            self.keepalive is not None
            and not self._nop_queued
            and now >= self._last_send + self.keepalive
        ):
            self._nop_queued = True
            self._control.append((_NOP, 0, 0))

    @property
    def has_events(self) -> bool:
        """Whether :meth:`next_event` has something (cheaper than asking it)."""
        return bool(self._events)

    def next_event(self) -> Event | None:
        if not self._events:
            return None
        return self._events.popitem(last=False)[1]

    # ------------------------------------------------------------ application side

    def open_stream(self) -> int:
        """A new stream id. No round trip: SYN is queued and data may follow at once."""
        self._check_open()
        if self._last_local_id + 2 > _MAX_STREAM_ID:
            raise ConnectionRefused("stream ids exhausted; open a new session")
        if len(self._streams) >= self.max_streams:
            raise ConnectionRefused(f"too many streams (max_streams={self.max_streams})")
        self._last_local_id += 2
        sid = self._last_local_id
        st = self._new_stream(sid, local=True)
        self._control.append((_SYN, sid, 0))
        self._initial_window(st)
        self.stats.streams_opened += 1
        return sid

    def accept_stream(self) -> int | None:
        """The next stream the peer opened, or None."""
        self._check_open()
        if not self._backlog:
            return None
        sid = self._backlog.popleft()
        self._events.pop((StreamOpened, sid), None)
        return sid

    def send(self, sid: int, data: bytes | bytearray | memoryview) -> int:
        """Queue bytes; returns how many fit in the stream's send buffer (maybe 0).

        When it took less than offered, a :class:`StreamWritable` follows once
        the buffer is half empty.
        """
        st = self._lookup(sid)
        if st.state not in _SEND_STEADY:
            self._step(st, StreamInput.SEND)  # raises unless the write side is open
        size = len(data)
        n = min(size, self.stream_buffer - st.tx.size)
        if n < size:
            st.want_writable = True
        if n > 0:
            st.tx.append(bytes(data[:n]) if n < size or type(data) is not bytes else data)
            self._schedule(st)
        return n

    def read(self, sid: int, max_bytes: int = -1) -> bytes:
        """Up to ``max_bytes`` (all if -1) buffered bytes; ``b""`` at EOF.

        Raises ``BlockingIOError`` when nothing is buffered yet (wait for
        :class:`StreamReadable` or :class:`StreamEnded`), ``ConnectionReset``
        after a peer reset, ``ClosedError`` for a closed or unknown stream.
        Reading is what opens the peer's window again.
        """
        data = self.try_read(sid, max_bytes)
        if data is None:
            raise BlockingIOError(f"stream {sid}: no data yet")
        return data

    def try_read(self, sid: int, max_bytes: int = -1) -> bytes | None:
        """:meth:`read`, but None instead of ``BlockingIOError`` when nothing is buffered yet
        (a transport polls this after every wake-up; an exception there costs more)."""
        if max_bytes == 0 or max_bytes < -1:
            raise ValueError(f"max_bytes must be -1 or positive, got {max_bytes!r}")
        st = self._lookup(sid)
        if st.state not in _READ_STEADY:
            self._step(st, StreamInput.READ)
        st.read_armed = True
        rx = st.rx
        if rx.size:
            data = rx.take(rx.size if max_bytes < 0 else max_bytes)
            self._consume(st, len(data))
            return data
        if st.eof:
            st.eof_delivered = True
            self._maybe_release(st)
            return b""
        return None

    def end_stream(self, sid: int) -> None:
        """Half-close: FIN after the buffered bytes; reading keeps working.

        Repeats, and ids already closed, are harmless (like the two below).
        """
        self._check_open()
        st = self._streams.get(sid)
        if st is not None and not st.abandoned:
            self._step(st, StreamInput.END)

    def reset_stream(self, sid: int) -> None:
        """Abort the stream: discard both directions' buffers and tell the peer.

        With ``extensions`` the peer gets RST and sees a reset; a plain smux
        peer gets FIN (smux has no reset) and sees EOF. Unknown ids are ignored.
        """
        if self._closed:
            return
        st = self._streams.get(sid)
        if st is not None and not st.abandoned:
            self._step(st, StreamInput.RESET)

    def close_stream(self, sid: int) -> None:
        """The application is done with the stream (like smux's ``Close``).

        Buffered outgoing bytes still go out, then FIN; unread and later
        incoming bytes are dropped. Unknown ids are ignored.
        """
        if self._closed:
            return
        st = self._streams.get(sid)
        if st is not None and not st.abandoned:
            self._step(st, StreamInput.CLOSE)

    def close(self, error: RudpError | None = None) -> None:
        """End the session at once (``error``: why the channel went away, if it did).

        Everything queued is discarded; for a graceful end, ``end_stream``
        the streams and let ``data_to_send`` drain them first. Idempotent.
        """
        if not self._closed:
            self._terminate(error)

    # ------------------------------------------------------------ state machine

    def _step(self, st: _Stream, inp: StreamInput, body: bytes | None = None) -> None:
        """Look the input up in :data:`TRANSITIONS`, move to the next state, run the action."""
        state, action = TRANSITIONS[(st.state, inp)]
        st.state = state
        getattr(self, _HANDLERS[action])(st, body)

    def _do_write(self, st: _Stream, body: bytes | None) -> None:
        """Done by :meth:`send` itself (it needs the caller's data)."""

    def _do_read(self, st: _Stream, body: bytes | None) -> None:
        """Done by :meth:`read` itself."""

    def _do_queue_fin(self, st: _Stream, body: bytes | None) -> None:
        if st.tx.size:
            st.fin_pending = True
        else:
            self._commit_fin(st)

    def _do_abort(self, st: _Stream, body: bytes | None) -> None:
        st.tx.clear()
        st.fin_pending = False
        if not st.syn_sent:
            # Its SYN is still queued: withdraw it (and its UPD, FIN); the peer never hears of it.
            kept = [item for item in self._control if item[1] != st.sid]
            self._control.clear()
            self._control.extend(kept)
            st.closing_frames = 0
        elif self.extensions:
            self._queue_closing(st, _RST, RST_RESET)
            self.stats.resets_sent += 1
        elif not st.fin_committed:
            self._queue_closing(st, _FIN, 0)
        self._finish(st)

    def _do_abandon(self, st: _Stream, body: bytes | None) -> None:
        self._discard_input(st)
        if not (st.fin_pending or st.fin_committed):
            self._do_queue_fin(st, None)
        self._finish(st)

    def _do_deliver(self, st: _Stream, body: bytes | None) -> None:
        assert body is not None
        n = len(body)
        if self.version == 2:
            end = st.received + n
            if end > self._allowed(st):
                raise ProtocolError(
                    f"stream {st.sid}: peer sent {end - self._allowed(st)} bytes "
                    "beyond the window we advertised"
                )
            if end > st.limit:  # sent on smux's initial guess before our first UPD arrived
                self.stats.bytes_over_window += end - st.limit
                self._set_limit(st, end)  # the pool must see what we really hold
        st.received += n
        st.rx.append(body)
        self._rx_buffered += n
        if st.read_armed:
            st.read_armed = False
            self._emit(StreamReadable(st.sid))

    def _do_eof(self, st: _Stream, body: bytes | None) -> None:
        st.eof = True
        if self.version == 2:
            self._set_limit(st, st.received)  # nothing more will come: free the credit
        self._emit(StreamEnded(st.sid))

    def _do_peer_reset(self, st: _Stream, body: bytes | None) -> None:
        assert body is not None
        st.refused = int.from_bytes(body, "little") == RST_REFUSED
        st.tx.clear()
        st.fin_pending = False
        self._discard_input(st)
        self.stats.resets_received += 1
        if st.sid in self._backlog:  # never accepted: the application never knew it
            self._finish(st)
            return
        self._events.pop((StreamReadable, st.sid), None)
        self._events.pop((StreamEnded, st.sid), None)
        self._events.pop((StreamWritable, st.sid), None)
        self._emit(StreamReset(st.sid, st.refused))

    def _do_update_window(self, st: _Stream, body: bytes | None) -> None:
        assert body is not None
        consumed, window = SMUX_UPD_BODY.unpack_from(body)
        if ((st.sent - consumed) & _U32) >= 1 << 31:
            raise ProtocolError(
                f"stream {st.sid}: peer claims {consumed} bytes consumed, more than we sent"
            )
        st.peer_consumed = consumed
        st.peer_window = min(window, (1 << 31) - 1)
        self.stats.window_updates_received += 1
        self._schedule(st)

    def _do_drop(self, st: _Stream, body: bytes | None) -> None:
        self.stats.frames_dropped += 1

    def _do_ignore(self, st: _Stream, body: bytes | None) -> None:
        pass

    def _do_fail_closed(self, st: _Stream, body: bytes | None) -> None:
        raise ClosedError(f"stream {st.sid} is closed for writing")

    def _do_fail_reset(self, st: _Stream, body: bytes | None) -> None:
        self._finish(st)
        if st.refused:
            raise ConnectionRefused(f"stream {st.sid} was refused by the peer")
        raise ConnectionReset(f"stream {st.sid} was reset by the peer")

    def _do_release(self, st: _Stream, body: bytes | None) -> None:
        self._finish(st)

    # ------------------------------------------------------------ frames in

    def _body_length(self, cmd: int, length: int) -> int:
        """The payload size a frame header announces; ProtocolError if it is malformed."""
        if cmd == SMUX_PSH:
            return length
        if cmd in (SMUX_SYN, SMUX_FIN, SMUX_NOP):
            if length:
                raise ProtocolError(f"{_CMD_NAMES[cmd]} frame with a {length}-byte payload")
            return 0
        if cmd == SMUX_UPD and self.version == 2:
            if length != SMUX_UPD_BODY.size:
                raise ProtocolError(f"UPD frame with a {length}-byte payload (must be 8)")
            return length
        if cmd == MUX_RST and self.extensions:
            if length != _RST_BODY_SIZE:
                raise ProtocolError(f"RST frame with a {length}-byte payload (must be 4)")
            return length
        raise ProtocolError(f"unknown smux command {cmd} (v{self.version})")

    def _frame(self, cmd: int, sid: int, body: bytes) -> None:
        self.stats.frames_received += 1
        if cmd == SMUX_NOP:
            return
        if cmd == SMUX_SYN:
            self._peer_syn(sid)
            return
        st = self._streams.get(sid)
        if st is None:
            self._unknown_stream(cmd, sid)
            return
        if cmd == SMUX_PSH:
            if body:
                self.stats.data_bytes_received += len(body)
                if st.state in _DELIVER_STEADY:
                    self._do_deliver(st, body)
                else:
                    self._step(st, StreamInput.RECV_DATA, body)
        elif cmd == SMUX_FIN:
            self._step(st, StreamInput.RECV_FIN, body)
        elif cmd == SMUX_UPD:
            self._step(st, StreamInput.RECV_UPD, body)
        else:
            self._step(st, StreamInput.RECV_RST, body)

    def _peer_syn(self, sid: int) -> None:
        if sid == 0 or sid & 1 == self._parity:
            raise ProtocolError(f"peer opened stream {sid}, an id of our side")
        if sid in self._streams:
            self.stats.duplicate_syns += 1
            return
        self._max_peer_id = max(self._max_peer_id, sid)
        if len(self._streams) >= self.max_streams or len(self._backlog) >= self.stream_backlog:
            self._refuse(sid)
            return
        st = self._new_stream(sid, local=False)
        self._backlog.append(sid)
        self._initial_window(st)
        self.stats.streams_accepted += 1
        self._emit(StreamOpened(sid))

    def _refuse(self, sid: int) -> None:
        if self._refusals_queued >= self.max_streams:
            raise ProtocolError("peer keeps opening streams beyond our limits")
        self._refusals_queued += 1
        self.stats.streams_refused += 1
        if self.extensions:
            self._control.append((_RST, sid, RST_REFUSED))
        else:
            self._control.append((_FIN, sid, 1))

    def _unknown_stream(self, cmd: int, sid: int) -> None:
        """A frame for a stream we do not have: closed earlier (drop) or never opened (error).

        smux writes a stream's SYN before any other frame of it, so an id above
        every SYN seen (or one of ours we never handed out) was never opened.
        """
        ours = sid & 1 == self._parity
        if (
            sid == 0
            or (ours and sid > self._last_local_id)
            or (not ours and sid > self._max_peer_id)
        ):
            raise ProtocolError(f"{self._cmd_name(cmd)} for stream {sid}, which was never opened")
        self.stats.frames_dropped += 1

    def _cmd_name(self, cmd: int) -> str:
        return "RST" if cmd == MUX_RST else _CMD_NAMES.get(cmd, str(cmd))

    # ------------------------------------------------------------ frames out

    def _control_frame(self, kind: str, sid: int, arg: int) -> bytes:
        """Encode a queued control item, or b"" when it no longer applies."""
        v = self.version
        st = self._streams.get(sid)
        if kind == _SYN:  # (a reset before this point withdrew it from the queue)
            if st is not None:
                st.syn_sent = True
            frame = SMUX_HEADER.pack(v, SMUX_SYN, 0, sid)
        elif kind == _FIN:
            if arg:  # a refusal: no stream behind it
                self._refusals_queued -= 1
            elif st is not None:
                st.fin_sent = True
                self._closing_frame_out(st)
            frame = SMUX_HEADER.pack(v, SMUX_FIN, 0, sid)
        elif kind == _NOP:
            self._nop_queued = False
            self.stats.keepalives_sent += 1
            frame = SMUX_HEADER.pack(v, SMUX_NOP, 0, 0)
        elif kind == _RST:
            if arg == RST_REFUSED:
                self._refusals_queued -= 1
            elif st is not None:
                self._closing_frame_out(st)
            frame = SMUX_HEADER.pack(v, MUX_RST, _RST_BODY_SIZE, sid) + arg.to_bytes(4, "little")
        else:  # _UPD
            if st is None:
                return b""
            st.upd_queued = False
            if st.eof or st.abandoned or st.state is StreamState.RESET:  # nothing more to read
                return b""
            target = self._target(st)
            self._set_limit(st, max(st.limit, st.consumed + target))
            window = st.limit - st.consumed
            frame = SMUX_HEADER.pack(v, SMUX_UPD, SMUX_UPD_BODY.size, sid) + SMUX_UPD_BODY.pack(
                st.consumed & _U32, window
            )
            self.stats.window_updates_sent += 1
        self.stats.frames_sent += 1
        return frame

    def _commit_fin(self, st: _Stream) -> None:
        st.fin_pending = False
        st.fin_committed = True
        self._queue_closing(st, _FIN, 0)

    def _queue_closing(self, st: _Stream, kind: str, arg: int) -> None:
        st.closing_frames += 1
        self._control.append((kind, st.sid, arg))

    def _closing_frame_out(self, st: _Stream) -> None:
        st.closing_frames -= 1
        self._maybe_release(st)

    def _sendable(self, st: _Stream) -> bool:
        return st.tx.size > 0 and (self.version == 1 or self._send_window(st) > 0)

    def _send_window(self, st: _Stream) -> int:
        inflight = (st.sent - st.peer_consumed) & _U32
        return max(0, st.peer_window - inflight)

    def _schedule(self, st: _Stream) -> None:
        if not st.in_ready and self._sendable(st):
            st.in_ready = True
            self._ready.append(st)

    # ------------------------------------------------------------ receive windows (v2)

    def _allowed(self, st: _Stream) -> int:
        """Highest stream offset the peer may legitimately send up to."""
        return max(INITIAL_PEER_WINDOW, st.limit)

    def _set_limit(self, st: _Stream, limit: int) -> None:
        self._credit += limit - st.limit
        st.limit = limit

    def _target(self, st: _Stream) -> int:
        """The window to grant this stream now: its ambition, capped by the session pool."""
        free = self.session_buffer - (self._credit - (st.limit - st.consumed))
        return min(st.grant, max(min(MIN_WINDOW, self.stream_buffer), free))

    def _initial_window(self, st: _Stream) -> None:
        """Tell the peer our window for a new stream unless smux's 256 KiB guess is right."""
        if self.version == 1:
            return
        self._credit += st.limit
        target = self._target(st)
        if target != INITIAL_PEER_WINDOW:
            self._set_limit(st, target)
            st.upd_queued = True
            self._control.append((_UPD, st.sid, 0))

    def _consume(self, st: _Stream, n: int) -> None:
        st.consumed += n
        self._rx_buffered -= n
        if self.version == 1:
            return
        self._credit -= n
        if st.eof:  # no more data will come: no window to open
            return
        if st.consumed - st.grow_mark >= st.grant:  # the reader keeps up: widen the window
            st.grant = min(2 * st.grant, self.stream_buffer)
            st.grow_mark = st.consumed
        target = self._target(st)
        if not st.upd_queued and st.consumed + target - st.limit >= max(1, target // 2):
            st.upd_queued = True
            self._control.append((_UPD, st.sid, 0))

    def _discard_input(self, st: _Stream) -> None:
        n = st.rx.clear()
        self._rx_buffered -= n
        st.consumed += n
        if self.version == 2:
            self._credit -= n
            self._set_limit(st, st.consumed)

    # ------------------------------------------------------------ bookkeeping

    def _new_stream(self, sid: int, local: bool) -> _Stream:
        st = _Stream(sid, local, min(self.stream_buffer, INITIAL_PEER_WINDOW))
        if self.version == 1:
            st.limit = 0
        self._streams[sid] = st
        return st

    def _finish(self, st: _Stream) -> None:
        """The application is done with the stream: hide it, release it once flushed."""
        st.abandoned = True
        for kind in (StreamOpened, StreamReadable, StreamEnded, StreamWritable):
            self._events.pop((kind, st.sid), None)
        if st.sid in self._backlog:
            self._backlog.remove(st.sid)
        self._maybe_release(st)

    def _maybe_release(self, st: _Stream) -> None:
        """Forget a stream once the application is done with it (closed, reset, or read
        to EOF after our FIN) and its last frame is out: until then it keeps its slot
        (which is what bounds the control queue by ``max_streams``)."""
        if st.closing_frames or st.fin_pending:
            return
        if st.abandoned or (st.eof_delivered and st.fin_sent):
            self._release(st)

    def _release(self, st: _Stream) -> None:
        sid = st.sid
        if self._streams.pop(sid, None) is None:
            return
        self._rx_buffered -= st.rx.clear()
        if self.version == 2:
            self._credit -= st.limit - st.consumed
        st.in_ready = False
        for kind in (StreamOpened, StreamReadable, StreamEnded, StreamWritable, StreamReset):
            self._events.pop((kind, sid), None)
        if sid in self._backlog:  # read to EOF and ended without ever being accepted
            self._backlog.remove(sid)

    def _emit(self, event: Event) -> None:
        self._events[(type(event), getattr(event, "stream_id", 0))] = event

    def _lookup(self, sid: int) -> _Stream:
        self._check_open()
        st = self._streams.get(sid)
        if st is None or st.abandoned:
            raise ClosedError(f"stream {sid} is closed")
        return st

    def _check_open(self) -> None:
        if self._closed:
            raise self._error or ClosedError("session closed")

    def _terminate(self, error: RudpError | None) -> None:
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
        self._emit(SessionClosed(error))
