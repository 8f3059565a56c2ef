# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The ARQ engine compiled: ``rudp.arq`` (the specification) in C structures.

Byte for byte the same behaviour as ``rudp.arq.Arq`` (same datagrams,
deadlines, delivered bytes and counters); read that module for the algorithm.
This one only changes representation:

* segments are one ``malloc`` each (a ``Seg`` header with the payload right
  after it), held in rings indexed by ``sn`` (flight, receive buffer) and a
  ring of unread payloads; memory follows the data in flight and unread;
* unsent data is cut into segments at ``send`` (as ikcp does; the reference
  cuts when they enter the flight, with the same result), kept in a list;
* segments of about one MSS are recycled through a small process-wide pool:
  they are too large for glibc's fast per-thread cache;
* output datagrams are built back to back in one buffer; Python objects appear
  only at the API boundary (one ``bytes`` per datagram, one per ``recv``);
* a lower bound of the earliest retransmission timer lets ``flush`` skip the
  flight scan when nothing can be due.

The ``cdef`` entry points declared in ``_arq.pxd`` (``input_raw``,
``flush_c``, ``check_c``, ``recv_into``, ``out_datagram``...) give other
Cython code the same engine without any Python object per packet. None of
them raises: allocation failures degrade to loss (the peer retransmits).
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memset

from rudp import arq as spec
from rudp import wire

# ---------------------------------------------------------------------------- constants
# Read once from the reference modules, so there is one place for each value.

cdef int OVERHEAD = wire.KCP_OVERHEAD
cdef int CMD_PUSH = wire.KCP_CMD_PUSH
cdef int CMD_ACK = wire.KCP_CMD_ACK
cdef int CMD_WASK = wire.KCP_CMD_WASK
cdef int CMD_WINS = wire.KCP_CMD_WINS
cdef int RTO_INIT = spec.RTO_INIT
cdef int PROBE_INIT = spec.PROBE_INIT
cdef int PROBE_MAX = spec.PROBE_MAX
cdef int THRESH_INIT = spec.THRESH_INIT
cdef int THRESH_MIN = spec.THRESH_MIN
cdef int RMT_WND_INIT = spec.RMT_WND_INIT
cdef int DUP_SPAN = spec.DUP_SPAN
cdef int ASK_SEND = spec.ASK_SEND
cdef int ASK_TELL = spec.ASK_TELL
cdef int PACE_UNIT = spec.PACE_UNIT
cdef int PACE_GAIN_NUM = spec.PACE_GAIN_NUM
cdef int PACE_GAIN_DEN = spec.PACE_GAIN_DEN
cdef int PACE_BURST = spec.PACE_BURST
cdef int PACE_MIN_RTT = spec.PACE_MIN_RTT
cdef int ERR_SHORT = spec.ERR_SHORT
cdef int ERR_CONV = spec.ERR_CONV
cdef int ERR_TRUNCATED = spec.ERR_TRUNCATED
cdef int ERR_CMD = spec.ERR_CMD
cdef int NO_WINDOW_LIMIT = 0x7FFFFFFF  # what the "none" controller allows
cdef size_t KEEP_BYTES = 4096  # an output buffer larger than this is released when mostly unused

# counter indexes into Arq.st, in rudp.arq.STATS order
_STAT_NAMES = tuple(spec.STATS)
cdef int S_IN_PKTS = _STAT_NAMES.index("in_pkts")
cdef int S_OUT_PKTS = _STAT_NAMES.index("out_pkts")
cdef int S_IN_SEGS = _STAT_NAMES.index("in_segs")
cdef int S_OUT_SEGS = _STAT_NAMES.index("out_segs")
cdef int S_IN_BYTES = _STAT_NAMES.index("in_bytes")
cdef int S_OUT_BYTES = _STAT_NAMES.index("out_bytes")
cdef int S_RETRANS = _STAT_NAMES.index("retrans_segs")
cdef int S_FAST_RETRANS = _STAT_NAMES.index("fast_retrans_segs")
cdef int S_LOST = _STAT_NAMES.index("lost_segs")
cdef int S_BUNDLED = _STAT_NAMES.index("bundled_segs")
cdef int S_REPEAT = _STAT_NAMES.index("repeat_segs")
cdef int S_IN_ERRORS = _STAT_NAMES.index("in_errors")
cdef int S_OUT_OF_WINDOW = _STAT_NAMES.index("out_of_window")
cdef int S_ACK_IN = _STAT_NAMES.index("ack_segs_in")
cdef int S_ACK_OUT = _STAT_NAMES.index("ack_segs_out")
cdef int S_ACKS_DROPPED = _STAT_NAMES.index("acks_dropped")
cdef int S_PROBE = _STAT_NAMES.index("probe_segs")
cdef int S_WINS = _STAT_NAMES.index("wins_segs")
cdef int S_OVERSIZE = _STAT_NAMES.index("oversize_messages")
assert len(_STAT_NAMES) == 19, "rudp.arq.STATS and Arq.st[19] in rudp/_arq.pxd disagree"


# ---------------------------------------------------------------------------- helpers

cdef inline int32_t tdiff(uint32_t later, uint32_t earlier) noexcept:
    return <int32_t>(later - earlier)


cdef inline uint32_t rd32(const unsigned char *p) noexcept:
    return p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline void wr32(unsigned char *p, uint32_t v) noexcept:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = (v >> 24) & 0xFF


cdef inline unsigned char *seg_data(Seg *seg) noexcept:
    return <unsigned char *>seg + sizeof(Seg)


# Segments of about a full MSS are above glibc's fast per-thread cache (1032 bytes)
# and cost a slow-bin malloc/free each; a process-wide free list keeps up to
# POOL_MAX of them (a few hundred KB for the whole process, nothing per
# connection). Every call runs under the GIL, which guards the list.
cdef enum:
    POOL_CAP = 1472    # payload room of a pooled segment: the MSS of a 1500-byte path
    POOL_MIN = 960     # smaller segments are left to malloc's fast path
    POOL_MAX = 256

cdef Seg *pool = NULL
cdef int pool_count = 0


cdef inline Seg *seg_new(uint32_t length, uint32_t cap) noexcept:
    global pool, pool_count
    cdef Seg *seg
    if POOL_MIN < cap <= POOL_CAP:
        cap = POOL_CAP
        if pool != NULL:
            seg = pool
            pool = seg.next
            pool_count -= 1
        else:
            seg = <Seg *>malloc(sizeof(Seg) + POOL_CAP)
    else:
        seg = <Seg *>malloc(sizeof(Seg) + cap)
    if seg != NULL:
        seg.next = NULL
        seg.sn = seg.ts = seg.resendts = seg.rto = seg.lastts = 0
        seg.xmit = seg.fastack = seg.fastx = 0
        seg.bundled = 0
        seg.len = length
        seg.cap = cap
        seg.frg = 0
    return seg


cdef inline void seg_free(Seg *seg) noexcept:
    global pool, pool_count
    if seg == NULL:
        return
    if seg.cap == POOL_CAP and pool_count < POOL_MAX:
        seg.next = pool
        pool = seg
        pool_count += 1
    else:
        free(seg)


cdef void seg_free_list(Seg *seg) noexcept:
    cdef Seg *nxt
    while seg != NULL:
        nxt = seg.next
        seg_free(seg)
        seg = nxt


cdef inline uint32_t pow2_at_least(uint32_t n) noexcept:
    cdef uint32_t p = 1
    while p < n:
        p <<= 1
    return p


cdef inline int64_t imax(int64_t a, int64_t b) noexcept:
    return a if a > b else b


cdef inline int64_t imin(int64_t a, int64_t b) noexcept:
    return a if a < b else b


# ---------------------------------------------------------------------------- congestion

cdef class Congestion:
    """KCP's ``nc=1``: only the send window and the peer's window limit the flight.

    The base of the pluggable controllers: a controller answers ``window()``
    (segments it allows in flight) and hears of acknowledged segments, fast
    retransmissions and timeouts (see ``rudp.arq.NoCongestion``). Controllers
    are ``cdef`` classes: the engine calls them through their C vtable.
    """

    def __cinit__(self, int mss, int snd_wnd):
        self.cwnd = snd_wnd

    cdef int window(self) noexcept:
        return NO_WINDOW_LIMIT

    cdef void on_ack(self, int acked, int rmt_wnd) noexcept:
        pass

    cdef void on_fast_retransmit(self, int inflight, int resend) noexcept:
        pass

    cdef void on_timeout(self, int window) noexcept:
        pass


cdef class Reno(Congestion):
    """KCP's built-in controller, in segments, grown per acknowledged segment
    (see ``rudp.arq.Reno``)."""

    cdef int64_t mss, ssthresh, incr

    def __cinit__(self, int mss, int snd_wnd):
        self.mss = mss
        self.cwnd = 1
        self.ssthresh = THRESH_INIT
        self.incr = mss

    cdef int window(self) noexcept:
        return self.cwnd

    cdef void on_ack(self, int acked, int rmt_wnd) noexcept:
        cdef int64_t mss = self.mss
        cdef int i
        for i in range(acked):
            if self.cwnd >= rmt_wnd:
                return
            if self.cwnd < self.ssthresh:
                self.cwnd += 1
                self.incr += mss
            else:
                self.incr = imax(self.incr, mss)
                self.incr += mss * mss // self.incr + mss // 16
                if (self.cwnd + 1) * mss <= self.incr:
                    self.cwnd = <int>((self.incr + mss - 1) // mss)
            if self.cwnd > rmt_wnd:
                self.cwnd = rmt_wnd
                self.incr = rmt_wnd * mss

    cdef void on_fast_retransmit(self, int inflight, int resend) noexcept:
        self.ssthresh = imax(inflight // 2, THRESH_MIN)
        self.cwnd = <int>(self.ssthresh + resend)
        self.incr = self.cwnd * self.mss

    cdef void on_timeout(self, int window) noexcept:
        self.ssthresh = imax(window // 2, THRESH_MIN)
        self.cwnd = 1
        self.incr = self.mss


# ---------------------------------------------------------------------------- the engine

cdef class Arq:
    """A KCP-compatible ARQ endpoint; the contract is ``rudp.arq.Arq``'s."""

    def __cinit__(self, *args, **kwargs):
        self.flight = NULL
        self.rcvbuf = NULL
        self.ready = NULL
        self.msgs = NULL
        self.acks = NULL
        self.out = NULL
        self.ends = NULL
        self.partial = NULL
        self.q_head = self.q_tail = NULL

    def __init__(
        self,
        conv,
        *,
        mtu=1400,
        snd_wnd=32,
        rcv_wnd=128,
        nodelay=0,
        interval=100,
        resend=0,
        congestion="reno",
        pacing=False,
        stream=False,
        rto_min=None,
        rto_max=60000,
        fast_limit=5,
        dead_link=20,
        max_message=4 << 20,
        bundle=0,
    ):
        cdef uint32_t cap
        if self.flight != NULL:
            raise RuntimeError("Arq.__init__ called twice")
        rto_min = spec.resolve_params(
            conv, mtu, snd_wnd, rcv_wnd, nodelay, interval, resend, congestion, pacing,
            stream, rto_min, rto_max, fast_limit, dead_link, max_message, bundle,
        )
        self.conv = conv
        self.mtu = mtu
        self.mss = mtu - OVERHEAD
        self.snd_wnd = snd_wnd
        self.rcv_wnd = rcv_wnd
        self.nodelay = nodelay
        self.interval = interval
        self.resend = resend
        self.pacing = pacing
        self.stream = stream
        self.rto_min = rto_min
        self.rto_max = rto_max
        self.fast_limit = fast_limit
        self.dead_link = dead_link
        self.max_message = max_message
        self._bundle = bundle
        self.cc = Reno(self.mss, snd_wnd) if congestion == "reno" else Congestion(self.mss, snd_wnd)

        self.has_rtt = False
        self._srtt = self._rttvar = 0
        self._rto = <int>imin(imax(RTO_INIT, rto_min), rto_max)

        self.snd_una = self.snd_nxt = 0
        cap = pow2_at_least(snd_wnd)
        self.snd_mask = cap - 1
        self.flight = <Seg **>calloc(cap, sizeof(Seg *))
        cap = pow2_at_least(rcv_wnd)
        self.rcv_mask = cap - 1
        self.rcvbuf = <Seg **>calloc(cap, sizeof(Seg *))
        if stream:
            self.ready = <Seg **>calloc(cap, sizeof(Seg *))
        else:
            self.msgs = <Msg *>calloc(cap, sizeof(Msg))
        if self.flight == NULL or self.rcvbuf == NULL or (self.ready == NULL and self.msgs == NULL):
            raise MemoryError()
        self.nflight = 0
        self.flight_bytes = 0
        self._rmt_wnd = RMT_WND_INIT
        self.fast_due = False
        self.resend_min = 0
        self.resend_exact = True
        self.probe = 0
        self.probe_wait = self.ts_probe = 0
        self.pace_started = False
        self.pace_last = 0
        self.pace_credit = PACE_BURST * PACE_UNIT
        self._dead = False

        self.rcv_nxt = 0
        self.rcv_buf_bytes = 0
        self.nready = 0
        self.nacks = self.acks_cap = 0
        self.ack_limit = max(128, 2 * rcv_wnd)
        self.adv_zero = False
        self.ready_head = self.ready_count = 0
        self.ready_off = 0
        self.ready_bytes = 0
        self.partial_len = self.partial_cap = 0
        self.partial_segs = 0
        self.discarding = False
        self.msgs_head = self.msgs_count = 0
        self.msgs_bytes = 0

        self.out_len = self.out_cap = self.cur_start = 0
        self.nout = self.ends_cap = 0
        memset(self.st, 0, sizeof(self.st))

    def __dealloc__(self):
        cdef uint32_t i
        if self.flight != NULL:
            for i in range(self.snd_mask + 1):
                seg_free(self.flight[i])
            free(self.flight)
        if self.rcvbuf != NULL:
            for i in range(self.rcv_mask + 1):
                seg_free(self.rcvbuf[i])
            free(self.rcvbuf)
        if self.ready != NULL:
            for i in range(self.ready_count):
                seg_free(self.ready[(self.ready_head + i) & self.rcv_mask])
            free(self.ready)
        if self.msgs != NULL:
            for i in range(self.msgs_count):
                free(self.msgs[(self.msgs_head + i) & self.rcv_mask].data)
            free(self.msgs)
        free(self.partial)
        free(self.acks)
        free(self.out)
        free(self.ends)
        seg_free_list(self.q_head)

    # ------------------------------------------------------------------ application side

    def send(self, data):
        """Queue bytes (stream mode) or one message (message mode). Nothing is transmitted."""
        cdef Py_buffer view
        if type(data) is bytes:
            self.send_raw(<const unsigned char *>PyBytes_AS_STRING(data), len(<bytes>data))
            return
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            self.send_raw(<const unsigned char *>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    cdef int send_raw(self, const unsigned char *data, Py_ssize_t size) except -1:
        """``send`` for C callers; raises ValueError (message too large) or MemoryError.

        Data is cut into segments here, as ikcp does: stream mode first fills the
        last unsent segment (allocated with room for a whole one), message mode
        gives every fragment its frg. Cutting here or when segments enter the
        flight (the reference) yields the same segments.
        """
        cdef Seg *first = NULL
        cdef Seg *last = NULL
        cdef Seg *seg
        cdef Py_ssize_t fill = 0, take, count, i
        cdef uint32_t mss = self.mss
        if self.stream:
            if self.q_tail != NULL and self.q_tail.len < mss:
                fill = <Py_ssize_t>imin(size, mss - self.q_tail.len)
            count = (size - fill + mss - 1) // mss
        else:
            if <size_t>size > self.max_message:
                raise ValueError(f"message of {size} bytes exceeds max_message ({self.max_message})")
            count = imax(1, (size + mss - 1) // mss)
        for i in range(count):  # allocate everything first: a failure changes nothing
            take = <Py_ssize_t>imin(size - fill - i * mss, mss)
            seg = seg_new(<uint32_t>take, mss if self.stream else <uint32_t>take)
            if seg == NULL:
                seg_free_list(first)
                raise MemoryError()
            if take:
                memcpy(seg_data(seg), data + fill + i * mss, take)
            seg.frg = 0 if self.stream else <uint8_t>imin(count - 1 - i, 255)
            if last == NULL:
                first = seg
            else:
                last.next = seg
            last = seg
        if fill:
            memcpy(seg_data(self.q_tail) + self.q_tail.len, data, fill)
            self.q_tail.len += <uint32_t>fill
        if first != NULL:
            if self.q_tail == NULL:
                self.q_head = first
            else:
                self.q_tail.next = first
            self.q_tail = last
        self.q_count += count
        self.q_bytes += size
        return 0

    def recv(self, Py_ssize_t limit=-1):
        """Stream mode: up to ``limit`` bytes (all when negative), ``b""`` when none."""
        cdef Py_ssize_t n
        cdef bytes out
        if not self.stream:
            raise ValueError("recv() needs stream mode; use recv_message()")
        n = <Py_ssize_t>self.ready_bytes if limit < 0 else <Py_ssize_t>imin(limit, self.ready_bytes)
        if n == 0:
            return b""
        out = PyBytes_FromStringAndSize(NULL, n)
        self.recv_into(<unsigned char *>PyBytes_AS_STRING(out), n)
        return out

    cdef Py_ssize_t recv_into(self, unsigned char *buf, Py_ssize_t size) noexcept:
        """Stream mode: copy up to ``size`` ready bytes into ``buf``; returns the count."""
        cdef Py_ssize_t n, left, take
        cdef Seg *head
        if not self.stream or size <= 0:
            return 0
        n = <Py_ssize_t>imin(size, self.ready_bytes)
        left = n
        while left:
            head = self.ready[self.ready_head]
            take = <Py_ssize_t>imin(left, head.len - self.ready_off)
            memcpy(buf, seg_data(head) + self.ready_off, take)
            buf += take
            self.ready_off += take
            left -= take
            if self.ready_off == head.len:
                seg_free(head)
                self.ready_head = (self.ready_head + 1) & self.rcv_mask
                self.ready_count -= 1
                self.ready_off = 0
                self.nready -= 1
        self.ready_bytes -= n
        if n:
            self.deliver()
        return n

    def recv_message(self):
        """Message mode: the next whole message, or ``None``."""
        cdef Msg *m
        cdef bytes out
        if self.stream:
            raise ValueError("recv_message() needs message mode; use recv()")
        if self.msgs_count == 0:
            return None
        m = &self.msgs[self.msgs_head]
        out = PyBytes_FromStringAndSize(<char *>m.data, m.len)
        free(m.data)
        self.nready -= m.segs
        self.msgs_bytes -= m.len
        self.msgs_head = (self.msgs_head + 1) & self.rcv_mask
        self.msgs_count -= 1
        self.deliver()
        return out

    # ------------------------------------------------------------------ network side

    def input(self, datagram, long long now, bint rtt_sample=True):
        """Apply one datagram of KCP segments; return segments accepted or an ``ERR_*`` code."""
        cdef Py_buffer view
        cdef int r
        if type(datagram) is bytes:
            return self.input_raw(<const unsigned char *>PyBytes_AS_STRING(datagram),
                                  len(<bytes>datagram), <uint32_t>now, rtt_sample)
        PyObject_GetBuffer(datagram, &view, PyBUF_SIMPLE)
        r = self.input_raw(<const unsigned char *>view.buf, view.len, <uint32_t>now, rtt_sample)
        PyBuffer_Release(&view)
        return r

    cdef int input_raw(self, const unsigned char *data, Py_ssize_t size, uint32_t now,
                       bint rtt_sample) noexcept:
        """``input`` for C callers: the datagram is read in place, never kept."""
        cdef int code, accepted = 0, cmd, frg
        cdef Py_ssize_t pos = 0
        cdef uint32_t ts, sn, una, length
        cdef int flight_before = self.nflight
        cdef const unsigned char *p
        self.st[S_IN_PKTS] += 1
        code = self.validate(data, size)
        if code < 0:
            self.st[S_IN_ERRORS] += 1
            return code
        while pos < size:
            p = data + pos
            cmd = p[4]
            frg = p[5]
            ts = rd32(p + 8)
            sn = rd32(p + 12)
            una = rd32(p + 16)
            length = rd32(p + 20)
            pos += OVERHEAD + length
            if self.bad_segment(cmd, sn, una):
                self.st[S_IN_ERRORS] += 1
                continue
            accepted += 1
            self.st[S_IN_SEGS] += 1
            self._rmt_wnd = p[6] | (p[7] << 8)
            if cmd == CMD_ACK:
                self.st[S_ACK_IN] += 1
                self.input_ack(sn, ts, una, now, rtt_sample)
                continue
            self.apply_una(una)
            if cmd == CMD_PUSH:
                self.st[S_IN_BYTES] += length
                self.input_push(sn, ts, frg, p + OVERHEAD, length)
            elif cmd == CMD_WASK:
                self.probe |= ASK_TELL
        if self.nflight < flight_before:
            self.cc.on_ack(flight_before - self.nflight, self._rmt_wnd)
        return accepted

    cdef int validate(self, const unsigned char *data, Py_ssize_t size) noexcept:
        cdef Py_ssize_t pos = 0
        cdef int cmd
        cdef uint32_t length
        if size < OVERHEAD:
            return ERR_SHORT
        while pos < size:
            if size - pos < OVERHEAD:
                return ERR_TRUNCATED
            if rd32(data + pos) != self.conv:
                return ERR_CONV
            cmd = data[pos + 4]
            if cmd < CMD_PUSH or cmd > CMD_WINS:
                return ERR_CMD
            length = rd32(data + pos + 20)
            pos += OVERHEAD
            if length > <size_t>(size - pos):
                return ERR_TRUNCATED
            pos += length
        return 0

    cdef bint bad_segment(self, int cmd, uint32_t sn, uint32_t una) noexcept:
        cdef int32_t d
        if tdiff(una, self.snd_nxt) > 0:
            return True
        if cmd == CMD_ACK:
            return tdiff(sn, self.snd_nxt) >= 0
        if cmd == CMD_PUSH:
            d = tdiff(sn, self.rcv_nxt)
            return d >= DUP_SPAN or d <= -DUP_SPAN
        return False

    cdef void input_ack(self, uint32_t sn, uint32_t ts, uint32_t una, uint32_t now,
                        bint rtt_sample) noexcept:
        cdef Seg *seg = NULL
        cdef int32_t rtt
        if tdiff(sn, self.snd_una) >= 0:
            seg = self.flight[sn & self.snd_mask]
        if seg != NULL and rtt_sample:
            rtt = tdiff(now, ts)
            if rtt >= 0 and tdiff(seg.lastts, ts) >= 0:
                self.update_rtt(rtt)
        self.apply_una(una)
        if seg == NULL or self.flight[sn & self.snd_mask] == NULL:
            return  # a duplicate, or already covered by una
        self.drop_flight(sn)
        self.advance_una()
        if self.resend:
            self.count_skips(sn, ts)

    cdef void count_skips(self, uint32_t sn, uint32_t ts) noexcept:
        cdef uint32_t k = self.snd_una  # may already be past sn: nothing to count then
        cdef Seg *seg
        while tdiff(sn, k) > 0:
            seg = self.flight[k & self.snd_mask]
            if seg != NULL and tdiff(ts, seg.ts) >= 0:
                seg.fastack += 1
                if seg.fastack >= <uint32_t>self.resend and seg.fastx < <uint32_t>self.fast_limit:
                    self.fast_due = True
            k += 1

    cdef void update_rtt(self, int64_t rtt) noexcept:
        cdef int64_t delta, rto
        if not self.has_rtt:
            self.has_rtt = True
            self._srtt = <int>rtt
            self._rttvar = <int>(rtt // 2)
        else:
            delta = rtt - self._srtt
            if delta < 0:
                delta = -delta
            self._rttvar = <int>((3 * <int64_t>self._rttvar + delta) // 4)
            self._srtt = <int>imax(1, (7 * <int64_t>self._srtt + rtt) // 8)
        rto = self._srtt + imax(self.interval, 4 * <int64_t>self._rttvar)
        self._rto = <int>imin(imax(rto, self.rto_min), self.rto_max)

    cdef void apply_una(self, uint32_t una) noexcept:
        while tdiff(una, self.snd_una) > 0:
            self.drop_flight(self.snd_una)
            self.snd_una += 1
        self.advance_una()

    cdef void drop_flight(self, uint32_t sn) noexcept:
        cdef uint32_t i = sn & self.snd_mask
        cdef Seg *seg = self.flight[i]
        if seg != NULL:
            self.flight[i] = NULL
            self.nflight -= 1
            self.flight_bytes -= seg.len
            self.resend_exact = False
            seg_free(seg)

    cdef void advance_una(self) noexcept:
        while self.snd_una != self.snd_nxt and self.flight[self.snd_una & self.snd_mask] == NULL:
            self.snd_una += 1

    cdef void input_push(self, uint32_t sn, uint32_t ts, int frg, const unsigned char *data,
                         uint32_t length) noexcept:
        cdef uint32_t i, cap
        cdef uint32_t *grown
        cdef Seg *seg
        if tdiff(sn, self.rcv_nxt) >= self.rcv_wnd:
            self.st[S_OUT_OF_WINDOW] += 1
            return
        i = sn & self.rcv_mask
        if tdiff(sn, self.rcv_nxt) < 0 or self.rcvbuf[i] != NULL:
            seg = NULL  # a duplicate: acknowledged again, nothing stored
        else:
            seg = seg_new(length, length)
            if seg == NULL:
                return  # as if lost: not acknowledged, the peer sends it again
        if self.nacks < self.ack_limit:
            if self.nacks == self.acks_cap:
                cap = self.acks_cap * 2 if self.acks_cap else 16
                grown = <uint32_t *>realloc(self.acks, cap * 2 * sizeof(uint32_t))
                if grown != NULL:
                    self.acks, self.acks_cap = grown, cap
            if self.nacks < self.acks_cap:
                self.acks[2 * self.nacks] = sn
                self.acks[2 * self.nacks + 1] = ts
                self.nacks += 1
            else:
                self.st[S_ACKS_DROPPED] += 1
        else:
            self.st[S_ACKS_DROPPED] += 1
        if seg == NULL:
            self.st[S_REPEAT] += 1
            return
        seg.sn = sn
        seg.frg = <uint8_t>frg
        if length:
            memcpy(seg_data(seg), data, length)
        self.rcvbuf[i] = seg
        self.rcv_buf_bytes += length
        if sn == self.rcv_nxt:
            self.deliver()

    cdef void deliver(self) noexcept:
        cdef uint32_t i
        cdef Seg *seg
        while self.nready < self.rcv_wnd:
            i = self.rcv_nxt & self.rcv_mask
            seg = self.rcvbuf[i]
            if seg == NULL:
                return
            self.rcvbuf[i] = NULL
            self.rcv_buf_bytes -= seg.len
            self.rcv_nxt += 1
            if self.stream:
                if seg.len:
                    self.ready[(self.ready_head + self.ready_count) & self.rcv_mask] = seg
                    self.ready_count += 1
                    self.ready_bytes += seg.len
                    self.nready += 1
                else:
                    seg_free(seg)
            else:
                self.assemble(seg)
                seg_free(seg)

    cdef void assemble(self, Seg *seg) noexcept:
        cdef size_t need, cap
        cdef unsigned char *grown
        cdef Msg *m
        if not self.discarding:
            need = self.partial_len + seg.len
            if need <= self.max_message and need > self.partial_cap:
                cap = <size_t>imin(imax(need, 2 * self.partial_cap), self.max_message)
                grown = <unsigned char *>realloc(self.partial, cap)
                if grown == NULL:
                    need = self.max_message + 1  # cannot hold it: lose it as if oversize
                else:
                    self.partial, self.partial_cap = grown, cap
            if need > self.max_message:
                self.st[S_OVERSIZE] += 1
                free(self.partial)
                self.partial = NULL
                self.partial_len = self.partial_cap = 0
                self.partial_segs = 0
                self.discarding = True
            else:
                if seg.len:
                    memcpy(self.partial + self.partial_len, seg_data(seg), seg.len)
                self.partial_len = need
                self.partial_segs += 1
        if seg.frg:
            return
        if self.discarding:
            self.discarding = False
            return
        m = &self.msgs[(self.msgs_head + self.msgs_count) & self.rcv_mask]
        m.data, m.len, m.cap, m.segs = self.partial, self.partial_len, self.partial_cap, self.partial_segs
        self.msgs_count += 1
        self.msgs_bytes += self.partial_len
        self.nready += self.partial_segs
        self.partial = NULL
        self.partial_len = self.partial_cap = 0
        self.partial_segs = 0

    cdef int wnd_unused(self) noexcept:
        return self.rcv_wnd - self.nready if self.nready < self.rcv_wnd else 0

    # ------------------------------------------------------------------ output

    def flush(self, long long now):
        """Emit everything due now into the output queue (see ``datagrams()``)."""
        self.flush_c(<uint32_t>now)

    cdef void flush_c(self, uint32_t now) noexcept:
        """``flush`` for C callers."""
        cdef int wnd, limit, i
        cdef uint32_t una, sn, end, grown, earliest = 0, admitted
        cdef uint64_t emitted
        cdef bint lost = False, change = False, have_min = False
        cdef Seg *seg
        if self._dead:
            return
        wnd = self.wnd_unused()
        una = self.rcv_nxt
        emitted = self.st[S_OUT_SEGS]

        for i in range(self.nacks):
            self.emit(CMD_ACK, 0, wnd, self.acks[2 * i + 1], self.acks[2 * i], una, NULL, 0)
        self.st[S_ACK_OUT] += self.nacks
        self.nacks = 0
        if self.acks_cap > 256:
            free(self.acks)
            self.acks, self.acks_cap = NULL, 0

        if self._rmt_wnd == 0 and self.queued():
            if self.probe_wait == 0:
                self.probe_wait = PROBE_INIT
                self.ts_probe = now + PROBE_INIT
            elif tdiff(now, self.ts_probe) >= 0:
                self.probe_wait = <uint32_t>imin(self.probe_wait + self.probe_wait // 2, PROBE_MAX)
                self.ts_probe = now + self.probe_wait
                self.probe |= ASK_SEND
        else:
            self.probe_wait = 0
        if self.probe & ASK_SEND:
            self.emit(CMD_WASK, 0, wnd, now, 0, una, NULL, 0)
            self.st[S_PROBE] += 1
        if self.probe & ASK_TELL or (self.adv_zero and wnd > 0):
            self.emit(CMD_WINS, 0, wnd, now, 0, una, NULL, 0)
            self.st[S_WINS] += 1
        self.probe = 0

        # retransmissions first; the congestion controller reacts to them; then new
        # data goes out under the window as it is now, so nothing is left due.
        # The flight is scanned only when a timer (resend_min is a lower bound of
        # them all) or a fast retransmission can be due; the scan makes it exact.
        limit = self.limit()
        if self.nflight and (self.fast_due or tdiff(now, self.resend_min) >= 0):
            sn = self.snd_una
            end = self.snd_nxt
            while sn != end:
                seg = self.flight[sn & self.snd_mask]
                sn += 1
                if seg == NULL:
                    continue
                if tdiff(now, seg.resendts) >= 0:
                    grown = seg.rto + seg.rto // 2 if self.nodelay else seg.rto * 2
                    seg.rto = <uint32_t>imin(grown, self.rto_max)
                    seg.resendts = now + seg.rto
                    lost = True
                    self.st[S_LOST] += 1
                elif (self.resend and seg.fastack >= <uint32_t>self.resend
                      and seg.fastx < <uint32_t>self.fast_limit):
                    seg.fastx += 1
                    seg.resendts = now + seg.rto
                    change = True
                    self.st[S_FAST_RETRANS] += 1
                else:
                    if not have_min or tdiff(seg.resendts, earliest) < 0:
                        earliest, have_min = seg.resendts, True
                    continue
                self.st[S_RETRANS] += 1
                self.transmit(seg, now, wnd, una)
                if not have_min or tdiff(seg.resendts, earliest) < 0:
                    earliest, have_min = seg.resendts, True
            self.resend_min, self.resend_exact = earliest, True
        self.fast_due = False
        if change:
            self.cc.on_fast_retransmit(tdiff(self.snd_nxt, self.snd_una), self.resend)
        if lost:
            self.cc.on_timeout(limit)
        if not self._dead:
            admitted = self.snd_nxt
            self.admit(now, self.limit(), wnd, una)
            if self._bundle and admitted != self.snd_nxt and not self._dead:
                self.bundle_copies(now, wnd, una)
        self.end_datagram()
        if self.st[S_OUT_SEGS] != emitted:
            self.adv_zero = wnd == 0

    cdef void transmit(self, Seg *seg, uint32_t now, int wnd, uint32_t una) noexcept:
        seg.xmit += 1
        seg.ts = seg.lastts = now
        seg.fastack = 0
        self.emit(CMD_PUSH, seg.frg, wnd, now, seg.sn, una, seg_data(seg), seg.len)
        self.st[S_OUT_BYTES] += seg.len
        if seg.xmit >= <uint32_t>self.dead_link:
            self._dead = True

    cdef void bundle_copies(self, uint32_t now, int wnd, uint32_t una) noexcept:
        """Copies of the oldest unacknowledged segments into the open datagram's room
        (see ``rudp.arq.Arq._bundle_copies``): not a retransmission, no timer changes."""
        cdef size_t room = <size_t>self.mtu - (self.out_len - self.cur_start), need
        cdef uint32_t sn = self.snd_una
        cdef Seg *seg
        while sn != self.snd_nxt and room >= <size_t>OVERHEAD:
            seg = self.flight[sn & self.snd_mask]
            sn += 1
            if seg == NULL or seg.ts == now or seg.bundled >= self._bundle:
                continue
            need = OVERHEAD + seg.len
            if need > room:
                return
            self.emit(CMD_PUSH, seg.frg, wnd, now, seg.sn, una, seg_data(seg), seg.len)
            room -= need
            seg.bundled += 1
            seg.lastts = now
            self.st[S_OUT_BYTES] += seg.len
            self.st[S_BUNDLED] += 1

    cdef int limit(self) noexcept:
        return <int>imin(imin(self.snd_wnd, self._rmt_wnd), self.cc.window())

    cdef bint queued(self) noexcept:
        return self.q_head != NULL

    cdef void admit(self, uint32_t now, int limit, int wnd, uint32_t una) noexcept:
        """Cut queued bytes into new segments and send them while the windows and the
        pacer allow; a first timer gets KCP's rto/8 slack in normal mode."""
        cdef bint pacing = self.pacing and self.pace_update(now, limit)
        cdef Seg *seg
        cdef uint32_t slack = <uint32_t>(self._rto >> 3) if self.nodelay == 0 else 0
        while self.q_head != NULL and tdiff(self.snd_nxt, self.snd_una) < limit:
            if pacing:
                if self.pace_credit < PACE_UNIT:
                    break
                self.pace_credit -= PACE_UNIT
            seg = self.q_head
            self.q_head = seg.next
            if self.q_head == NULL:
                self.q_tail = NULL
            seg.next = NULL
            self.q_count -= 1
            self.q_bytes -= seg.len
            seg.sn = self.snd_nxt
            seg.rto = self._rto
            seg.resendts = now + seg.rto + slack
            if self.nflight == 0:
                self.resend_min, self.resend_exact = seg.resendts, True
            elif tdiff(seg.resendts, self.resend_min) < 0:
                self.resend_min = seg.resendts
            self.flight[self.snd_nxt & self.snd_mask] = seg
            self.nflight += 1
            self.flight_bytes += seg.len
            self.snd_nxt += 1
            self.transmit(seg, now, wnd, una)

    cdef int64_t pace_rate(self, int limit) noexcept:
        cdef int64_t rtt = self._srtt if self.has_rtt else self._rto
        if rtt < PACE_MIN_RTT:
            return 0
        return imax(1, imax(1, limit) * PACE_UNIT * PACE_GAIN_NUM // (PACE_GAIN_DEN * rtt))

    cdef bint pace_update(self, uint32_t now, int limit) noexcept:
        cdef int64_t rate = self.pace_rate(limit), elapsed, cap
        if self.pace_started:
            elapsed = tdiff(now, self.pace_last)
            if elapsed > 0:
                cap = imax(PACE_BURST * PACE_UNIT, 2 * rate)
                self.pace_credit = imin(cap, self.pace_credit + elapsed * rate)
        self.pace_started = True
        self.pace_last = now
        return rate != 0

    cdef void emit(self, int cmd, int frg, int wnd, uint32_t ts, uint32_t sn, uint32_t una,
                   const unsigned char *data, uint32_t length) noexcept:
        cdef size_t need = OVERHEAD + length, cap
        cdef unsigned char *p
        if self.out_len > self.cur_start and self.out_len - self.cur_start + need > <size_t>self.mtu:
            self.end_datagram()
        if self.out_len + need > self.out_cap:
            cap = <size_t>imax(2 * self.out_cap, imax(self.out_len + need, 2 * self.mtu))
            p = <unsigned char *>realloc(self.out, cap)
            if p == NULL:
                return  # as if lost on the way: timers and the peer recover it
            self.out, self.out_cap = p, cap
        p = self.out + self.out_len
        wr32(p, self.conv)
        p[4] = <uint8_t>cmd
        p[5] = <uint8_t>frg
        p[6] = wnd & 0xFF
        p[7] = (wnd >> 8) & 0xFF
        wr32(p + 8, ts)
        wr32(p + 12, sn)
        wr32(p + 16, una)
        wr32(p + 20, length)
        if length:
            memcpy(p + OVERHEAD, data, length)
        self.out_len += need
        self.st[S_OUT_SEGS] += 1

    cdef void end_datagram(self) noexcept:
        cdef Py_ssize_t cap
        cdef uint32_t *grown
        if self.out_len == self.cur_start:
            return
        if self.nout == self.ends_cap:
            cap = self.ends_cap * 2 if self.ends_cap else 16
            grown = <uint32_t *>realloc(self.ends, cap * sizeof(uint32_t))
            if grown == NULL:
                self.out_len = self.cur_start  # drop this datagram: as if lost
                return
            self.ends, self.ends_cap = grown, cap
        self.ends[self.nout] = <uint32_t>self.out_len
        self.nout += 1
        self.cur_start = self.out_len
        self.st[S_OUT_PKTS] += 1

    def datagrams(self):
        """Drain the output queue; each datagram is at most ``mtu`` bytes."""
        cdef Py_ssize_t i, start = 0
        cdef list out = []
        for i in range(self.nout):
            out.append(PyBytes_FromStringAndSize(<char *>self.out + start, self.ends[i] - start))
            start = self.ends[i]
        self.out_clear()
        return out

    cdef Py_ssize_t out_count(self) noexcept:
        """Datagrams waiting in the output queue."""
        return self.nout

    cdef const unsigned char *out_datagram(self, Py_ssize_t i, Py_ssize_t *length) noexcept:
        """Datagram ``i`` of the output queue, in place (valid until out_clear or flush)."""
        cdef size_t start = self.ends[i - 1] if i else 0
        length[0] = self.ends[i] - start
        return self.out + start

    cdef void out_clear(self) noexcept:
        """Forget the queued datagrams (the caller has sent them).

        The buffer is kept for the next flush unless this drain used less than an
        eighth of it: busy connections do not reallocate, idle ones shrink.
        """
        if self.out_cap > KEEP_BYTES and self.out_len < self.out_cap // 8:
            free(self.out)
            self.out, self.out_cap = NULL, 0
        if self.ends_cap > 64 and self.nout < self.ends_cap // 8:
            free(self.ends)
            self.ends, self.ends_cap = NULL, 0
        self.nout = 0
        self.out_len = self.cur_start = 0
        if self.ends_cap > 256:
            free(self.ends)
            self.ends, self.ends_cap = NULL, 0

    # ------------------------------------------------------------------ scheduling

    def check(self, long long now):
        """When ``flush`` must next run (``now`` if due), or ``None`` when idle."""
        cdef int64_t delay = self.check_c(<uint32_t>now)
        return None if delay < 0 else now + delay

    cdef int64_t check_c(self, uint32_t now) noexcept:
        """``check`` for C callers: milliseconds until flush is due (0: now), -1 when idle."""
        cdef int64_t best = 0, d
        cdef bint found = False
        cdef int limit
        if self._dead:
            return -1
        if self.nacks or self.probe or self.fast_due or (self.adv_zero and self.wnd_unused() > 0):
            return 0
        if self.queued():
            limit = self.limit()
            if self._rmt_wnd == 0:
                if self.probe_wait == 0:
                    return 0
                best, found = tdiff(self.ts_probe, now), True
            elif tdiff(self.snd_nxt, self.snd_una) < limit:
                best, found = self.pace_delay(now, limit), True
        if self.nflight:
            d = tdiff(self.earliest_resend(), now)
            if not found or d < best:
                best, found = d, True
        return imax(0, best) if found else -1

    cdef uint32_t earliest_resend(self) noexcept:
        """The exact earliest retransmission timer of the flight (nflight > 0)."""
        cdef uint32_t sn, best = 0
        cdef bint found = False
        cdef Seg *seg
        if not self.resend_exact:
            sn = self.snd_una
            while sn != self.snd_nxt:
                seg = self.flight[sn & self.snd_mask]
                if seg != NULL and (not found or tdiff(seg.resendts, best) < 0):
                    best = seg.resendts
                    found = True
                sn += 1
            self.resend_min = best
            self.resend_exact = True
        return self.resend_min

    cdef int64_t pace_delay(self, uint32_t now, int limit) noexcept:
        cdef int64_t rate, need
        if not self.pacing or not self.pace_started:
            return 0
        rate = self.pace_rate(limit)
        if rate == 0:
            return 0
        need = PACE_UNIT - self.pace_credit
        if need <= 0:
            return 0
        return imax(0, tdiff(self.pace_last, now) + (need + rate - 1) // rate)

    def _start_sequence(self, uint32_t snd_nxt, uint32_t rcv_nxt):
        """Tests only: start both sequence spaces elsewhere (see ``rudp.arq``)."""
        if self.snd_nxt or self.rcv_nxt or self.q_head != NULL or self.st[S_IN_PKTS]:
            raise RuntimeError("_start_sequence() needs a fresh engine")
        self.snd_una = self.snd_nxt = snd_nxt
        self.rcv_nxt = rcv_nxt

    # ------------------------------------------------------------------ state

    @property
    def bundle(self):
        """Redundant copies bundling may send of each segment (0: off); settable, so a
        connection can stop bundling while FEC parity does the job."""
        return self._bundle

    @bundle.setter
    def bundle(self, value):
        spec.check_range("bundle", value, 0, spec.BUNDLE_MAX)
        self._bundle = value

    @property
    def srtt(self):
        """Smoothed RTT, ms (0 before the first sample)."""
        return self._srtt

    @property
    def rttvar(self):
        return self._rttvar

    @property
    def rto(self):
        """The RTO a new segment starts with, ms."""
        return self._rto

    @property
    def cwnd(self):
        """Congestion window, segments (``snd_wnd`` when congestion control is off)."""
        return self.cc.cwnd

    @property
    def rmt_wnd(self):
        """The peer's free receive window as it last advertised it, segments."""
        return self._rmt_wnd

    @property
    def inflight(self):
        """Segments transmitted and not yet acknowledged."""
        return self.nflight

    @property
    def waitsnd(self):
        """Segments queued plus in flight."""
        return self.q_count + self.nflight

    @property
    def pending_bytes(self):
        """Bytes accepted by send() and not yet acknowledged."""
        return self.q_bytes + self.flight_bytes

    @property
    def buffered_bytes(self):
        """Bytes the engine holds: queued and in-flight data, out-of-order and unread
        received data, a message being assembled, and undrained output."""
        return (self.q_bytes + self.flight_bytes + self.rcv_buf_bytes + self.ready_bytes
                + self.msgs_bytes + self.partial_len + self.cur_start)

    @property
    def allocated_bytes(self):
        """C heap memory this engine holds right now (rings, segments, buffers)."""
        cdef uint32_t i
        cdef size_t total = 0
        cdef size_t ring = self.rcv_mask + 1
        cdef Seg *seg = self.q_head
        while seg != NULL:
            total += sizeof(Seg) + seg.cap
            seg = seg.next
        total += (self.snd_mask + 1) * sizeof(Seg *) + ring * sizeof(Seg *)
        total += ring * sizeof(Seg *) if self.stream else ring * sizeof(Msg)
        for i in range(self.snd_mask + 1):
            if self.flight[i] != NULL:
                total += sizeof(Seg) + self.flight[i].cap
        for i in range(ring):
            if self.rcvbuf[i] != NULL:
                total += sizeof(Seg) + self.rcvbuf[i].cap
        if self.stream:
            for i in range(self.ready_count):
                total += sizeof(Seg) + self.ready[(self.ready_head + i) & self.rcv_mask].cap
        else:
            for i in range(self.msgs_count):
                total += self.msgs[(self.msgs_head + i) & self.rcv_mask].cap
        total += self.partial_cap
        total += self.acks_cap * 2 * sizeof(uint32_t) + self.out_cap + self.ends_cap * sizeof(uint32_t)
        return total

    @property
    def readable(self):
        """Stream mode: bytes ready for recv(); message mode: whole messages ready."""
        return self.ready_bytes if self.stream else self.msgs_count

    @property
    def dead(self):
        """A segment was transmitted ``dead_link`` times without an ACK; nothing more is sent."""
        return self._dead

    def stats(self):
        """Counters, described in ``rudp.arq.STATS``."""
        return {name: self.st[i] for i, name in enumerate(_STAT_NAMES)}
