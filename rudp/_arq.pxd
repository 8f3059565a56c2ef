# C-level view of the compiled ARQ engine, for other Cython modules:
#
#     from rudp._arq cimport Arq
#     n = arq.input_raw(ptr, size, now, True)     # no bytes object needed
#     arq.flush_c(now)
#     for i in range(arq.out_count()):
#         p = arq.out_datagram(i, &length)        # points into the engine's buffer
#     arq.out_clear()                             # after the datagrams were sent
#     got = arq.recv_into(buf, cap)               # stream mode
#     delay = arq.check_c(now)                    # -1: idle (no timer)
#
# The layout below is private: use the methods. rudp/_arq.pyx documents them.

from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t


cdef struct Seg:
    Seg *next            # the unsent queue is a list
    uint32_t sn
    uint32_t ts          # time of the last transmission
    uint32_t resendts    # when the retransmission timer fires
    uint32_t rto         # this segment's own (backed-off) RTO
    uint32_t xmit        # transmissions so far
    uint32_t fastack     # skipping ACKs since the last transmission
    uint32_t fastx       # fast retransmissions so far
    uint32_t lastts      # time of the last emission, bundled copies included
    uint32_t len         # payload bytes, stored right after the struct
    uint32_t cap         # room for payload (stream mode fills the last unsent segment)
    uint8_t frg
    uint8_t bundled      # redundant copies bundled so far


cdef struct Msg:
    unsigned char *data
    size_t len
    size_t cap
    uint32_t segs


cdef class Congestion:
    cdef readonly int cwnd
    cdef int window(self) noexcept
    cdef void on_ack(self, int acked, int rmt_wnd) noexcept
    cdef void on_fast_retransmit(self, int inflight, int resend) noexcept
    cdef void on_timeout(self, int window) noexcept


cdef class Arq:
    # configuration
    cdef readonly uint32_t conv
    cdef readonly int mtu, mss, snd_wnd, rcv_wnd
    cdef int _bundle
    cdef int nodelay, interval, resend, rto_min, rto_max, fast_limit, dead_link
    cdef readonly bint stream, pacing
    cdef size_t max_message
    cdef Congestion cc

    # RTT estimator
    cdef bint has_rtt
    cdef int _srtt, _rttvar, _rto

    # send side: unsent segments (cut at send time), then the flight ring
    cdef Seg *q_head
    cdef Seg *q_tail
    cdef int64_t q_count, q_bytes
    cdef uint32_t snd_una, snd_nxt, snd_mask
    cdef Seg **flight
    cdef int nflight
    cdef int64_t flight_bytes
    cdef int _rmt_wnd
    cdef bint fast_due
    cdef uint32_t resend_min      # a lower bound of the earliest timer in flight
    cdef bint resend_exact        # ... and exact since no segment left the flight
    cdef int probe
    cdef uint32_t probe_wait, ts_probe
    cdef bint pace_started
    cdef uint32_t pace_last
    cdef int64_t pace_credit
    cdef bint _dead

    # receive side
    cdef uint32_t rcv_nxt, rcv_mask
    cdef Seg **rcvbuf
    cdef int64_t rcv_buf_bytes
    cdef int nready
    cdef uint32_t *acks
    cdef int nacks, acks_cap, ack_limit
    cdef bint adv_zero
    cdef Seg **ready              # stream mode: unread payloads, a ring
    cdef uint32_t ready_head, ready_count
    cdef size_t ready_off
    cdef int64_t ready_bytes
    cdef unsigned char *partial   # message mode: the message being assembled
    cdef size_t partial_len, partial_cap
    cdef uint32_t partial_segs
    cdef bint discarding
    cdef Msg *msgs                # message mode: complete messages, a ring
    cdef uint32_t msgs_head, msgs_count
    cdef int64_t msgs_bytes

    # output: datagrams back to back in one buffer, ends[i] = end offset of datagram i
    cdef unsigned char *out
    cdef size_t out_len, out_cap, cur_start
    cdef uint32_t *ends
    cdef Py_ssize_t nout, ends_cap

    cdef uint64_t st[19]

    # C-level entry points
    cdef int input_raw(self, const unsigned char *data, Py_ssize_t size, uint32_t now,
                       bint rtt_sample) noexcept
    cdef int send_raw(self, const unsigned char *data, Py_ssize_t size) except -1
    cdef void flush_c(self, uint32_t now) noexcept
    cdef int64_t check_c(self, uint32_t now) noexcept
    cdef Py_ssize_t recv_into(self, unsigned char *buf, Py_ssize_t size) noexcept
    cdef Py_ssize_t out_count(self) noexcept
    cdef const unsigned char *out_datagram(self, Py_ssize_t i, Py_ssize_t *length) noexcept
    cdef void out_clear(self) noexcept

    # internals
    cdef int validate(self, const unsigned char *data, Py_ssize_t size) noexcept
    cdef bint bad_segment(self, int cmd, uint32_t sn, uint32_t una) noexcept
    cdef void input_ack(self, uint32_t sn, uint32_t ts, uint32_t una, uint32_t now,
                        bint rtt_sample) noexcept
    cdef void count_skips(self, uint32_t sn, uint32_t ts) noexcept
    cdef void update_rtt(self, int64_t rtt) noexcept
    cdef void apply_una(self, uint32_t una) noexcept
    cdef void drop_flight(self, uint32_t sn) noexcept
    cdef void advance_una(self) noexcept
    cdef void input_push(self, uint32_t sn, uint32_t ts, int frg, const unsigned char *data,
                         uint32_t length) noexcept
    cdef void deliver(self) noexcept
    cdef void assemble(self, Seg *seg) noexcept
    cdef int wnd_unused(self) noexcept
    cdef bint queued(self) noexcept
    cdef void admit(self, uint32_t now, int limit, int wnd, uint32_t una) noexcept
    cdef void transmit(self, Seg *seg, uint32_t now, int wnd, uint32_t una) noexcept
    cdef void bundle_copies(self, uint32_t now, int wnd, uint32_t una) noexcept
    cdef int64_t pace_rate(self, int limit) noexcept
    cdef bint pace_update(self, uint32_t now, int limit) noexcept
    cdef int64_t pace_delay(self, uint32_t now, int limit) noexcept
    cdef int limit(self) noexcept
    cdef void emit(self, int cmd, int frg, int wnd, uint32_t ts, uint32_t sn, uint32_t una,
                   const unsigned char *data, uint32_t length) noexcept
    cdef void end_datagram(self) noexcept
    cdef uint32_t earliest_resend(self) noexcept
