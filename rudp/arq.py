"""The ARQ engine in pure Python: the readable specification of rudp's KCP core.

``rudp._arq.Arq`` (Cython) must behave byte for byte like this class: same
datagrams, same ``check()`` deadlines, same delivered bytes and the same
counters for the same call sequence (``tests/test_arq_differential.py``
holds them to it). Change the algorithm here first, then port it.

The engine is sans-I/O. It never reads a clock: every call that depends on
time takes ``now``, integer milliseconds handled as uint32 with wraparound
(KCP's ``_itimediff``); ``check()`` answers in the caller's own scale
(``now`` plus a delay), so a caller whose clock passes 2**32 ms sees no jump.

What follows KCP (``ikcp.c``) and what is rudp's own:

* Wire: exactly KCP's 24-byte segment header (``rudp.wire``), several
  segments packed per datagram up to ``mtu``.
* Selective repeat: cumulative UNA in every segment plus one ACK segment per
  received PUSH; RTT estimate, RTO formula and the ``rto_min`` slack of KCP.
* Timeout backoff of a segment's own RTO: exactly x1.5 with ``nodelay`` and
  x2 without, capped at ``rto_max`` (KCP never caps it).
* Fast retransmit: every ACK that newly acknowledges a segment counts as one
  skip for each unacknowledged segment below it that was last transmitted no
  later than the acknowledged one (KCP's conservative ``ts`` test, counted per
  ACK instead of per datagram so batching does not change the outcome);
  ``resend`` skips trigger it, at most ``fast_limit`` times per segment. A
  segment's skip count restarts at each of its transmissions.
* Redundant bundling for thin streams (``bundle``; Linux TCP's RDB idea, not
  in KCP): a flush that sends new data and leaves room in its last datagram
  fills that room with copies of the oldest unacknowledged segments, so a
  lost small message is usually repaired by the next one, one packet
  interval later instead of a round trip. See ``Arq._bundle_copies``.
* Congestion control: ``none`` (KCP ``nc=1``) or ``reno`` (KCP's, with its
  growth step applied per newly acknowledged segment rather than per input
  call, so ACK packing does not slow it); retransmissions go out before new
  data, and new data goes out under the window as the controller left it.
* Windows: the free receive window goes out in every segment; a zero remote
  window is probed (WASK) with a growing interval, and a receive window that
  was advertised as zero is announced (WINS) as soon as reading reopens it.
* Input is validated as a whole datagram before anything is applied (conv,
  cmd, lengths); then segments whose ``una``/``sn`` cannot be genuine are
  dropped one by one. Nothing raises, everything is counted, every buffer is
  bounded.
* Message mode: ``frg = min(fragments remaining, 255)`` and a message ends at
  its first ``frg == 0`` segment, so messages of any size up to
  ``max_message`` work between rudp engines (up to 127 fragments the C KCP
  understands them). Fragments of an incomplete message are assembled apart
  from the receive window, so a message larger than the window cannot
  deadlock.
* Idle costs nothing: ``check()`` derives the next deadline from the state and
  returns ``None`` when nothing can become due without new input or send.
"""

from __future__ import annotations

from collections import deque

from rudp.config import check_bool, check_choice, check_range
from rudp.wire import (
    KCP_CMD_ACK,
    KCP_CMD_PUSH,
    KCP_CMD_WASK,
    KCP_CMD_WINS,
    KCP_HEADER,
    KCP_OVERHEAD,
)

BytesLike = bytes | bytearray | memoryview

__all__ = [
    "CONGESTION_CONTROLS",
    "ERR_CMD",
    "ERR_CONV",
    "ERR_SHORT",
    "ERR_TRUNCATED",
    "STATS",
    "Arq",
    "NoCongestion",
    "Reno",
    "resolve_params",
]

# ---------------------------------------------------------------------------- constants

_MASK = 0xFFFFFFFF
RTO_INIT = 200  # ms, before the first RTT sample (KCP's IKCP_RTO_DEF)
PROBE_INIT = 500  # ms before the first zero-window probe (C KCP and the kcp-go in kcptun wait 7 s)
PROBE_MAX = 120_000  # ms, the probe interval grows x1.5 up to this
THRESH_INIT = 2  # initial slow-start threshold, segments
THRESH_MIN = 2
RMT_WND_INIT = 128  # the peer's window assumed until it tells us (KCP's IKCP_WND_RCV)
DUP_SPAN = 65536  # no genuine PUSH is this far from rcv_nxt (windows are u16)
ASK_SEND = 1  # probe flags: send WASK
ASK_TELL = 2  # send WINS
BUNDLE_MAX = 8  # copies of one segment that bundling may send in its life
# Pacing works in fixed point: one segment costs PACE_UNIT credit; credit is
# earned at PACE_GAIN x window / srtt segments per ms and capped at the larger
# of PACE_BURST segments and two milliseconds' worth.
# Paths under PACE_MIN_RTT ms are not paced: with 1 ms clock resolution srtt
# cannot tell them apart (loopback measures 0-2 ms) and they have no queue to spare.
PACE_UNIT = 1024
PACE_GAIN_NUM, PACE_GAIN_DEN = 5, 4
PACE_BURST = 4
PACE_MIN_RTT = 3

#: ``input()`` return codes for a rejected datagram (nothing in it was applied).
ERR_SHORT = -1  # empty, or shorter than one segment header
ERR_CONV = -2  # a segment carries another conversation id
ERR_TRUNCATED = -3  # a segment's len runs past the datagram, or trailing bytes
ERR_CMD = -4  # unknown cmd

CONGESTION_CONTROLS = ("none", "reno")

#: Every counter ``stats()`` returns, in order, with what it counts.
STATS: dict[str, str] = {
    "in_pkts": "datagrams passed to input(), accepted or not",
    "out_pkts": "datagrams emitted",
    "in_segs": "valid segments received (any cmd, duplicates included)",
    "out_segs": "segments emitted (any cmd, retransmissions included)",
    "in_bytes": "payload bytes of valid PUSH segments received (duplicates included)",
    "out_bytes": "payload bytes of PUSH segments emitted (retransmissions included)",
    "retrans_segs": "PUSH retransmissions of any kind (lost_segs + fast_retrans_segs)",
    "fast_retrans_segs": "PUSH retransmissions triggered by skipping ACKs",
    "lost_segs": "PUSH retransmissions triggered by a retransmission timeout",
    "bundled_segs": (
        "redundant PUSH copies bundled after new data (also counted in out_segs and"
        " out_bytes, never in retrans_segs)"
    ),
    "repeat_segs": "PUSH segments received that were already received (acknowledged again)",
    "in_errors": "rejected datagrams plus segments no genuine peer sends (bad una/sn/ACK)",
    "out_of_window": "PUSH segments beyond the receive window (dropped unacknowledged)",
    "ack_segs_in": "ACK segments received",
    "ack_segs_out": "ACK segments emitted",
    "acks_dropped": "ACKs not queued because the pending-ACK list was full",
    "probe_segs": "window probes (WASK) emitted",
    "wins_segs": "window announcements (WINS) emitted",
    "oversize_messages": "received messages discarded for exceeding max_message",
}


def _diff(later: int, earlier: int) -> int:
    """Signed distance between two uint32 times or sequence numbers (KCP's _itimediff)."""
    d = (later - earlier) & _MASK
    return d - 0x1_0000_0000 if d & 0x8000_0000 else d


def resolve_params(
    conv: int,
    mtu: int,
    snd_wnd: int,
    rcv_wnd: int,
    nodelay: int,
    interval: int,
    resend: int,
    congestion: str,
    pacing: bool,
    stream: bool,
    rto_min: int | None,
    rto_max: int,
    fast_limit: int,
    dead_link: int,
    max_message: int,
    bundle: int,
) -> int:
    """Validate the constructor arguments (both engines call this) and return rto_min.

    Raises ``ValueError`` naming the argument and its allowed range.
    """
    check_range("conv", conv, 0, _MASK)
    check_range("mtu", mtu, 50, 65507)
    check_range("snd_wnd", snd_wnd, 1, 65535)
    check_range("rcv_wnd", rcv_wnd, 1, 65535)
    check_range("nodelay", nodelay, 0, 2)
    check_range("interval", interval, 1, 5000)
    check_range("resend", resend, 0, 255)
    check_choice("congestion", congestion, CONGESTION_CONTROLS)
    check_bool("pacing", pacing)
    check_bool("stream", stream)
    if rto_min is None:
        rto_min = 30 if nodelay else 100
    check_range("rto_min", rto_min, 1, 60000)
    check_range("rto_max", rto_max, rto_min, 3_600_000)
    check_range("fast_limit", fast_limit, 1, 255)
    check_range("dead_link", dead_link, 1, 1000)
    check_range("max_message", max_message, 1, 1 << 30)
    check_range("bundle", bundle, 0, BUNDLE_MAX)
    return rto_min


def _pow2_at_least(n: int) -> int:
    return 1 << (n - 1).bit_length()


# ---------------------------------------------------------------------------- congestion


class NoCongestion:
    """KCP's ``nc=1``: only the send window and the peer's window limit the flight."""

    name = "none"

    def __init__(self, mss: int, snd_wnd: int) -> None:
        self._snd_wnd = snd_wnd

    @property
    def cwnd(self) -> int:
        return self._snd_wnd

    def window(self) -> int:
        """Segments the controller allows in flight."""
        return _MASK

    def on_ack(self, acked: int, rmt_wnd: int) -> None:
        """An input newly acknowledged ``acked`` segments."""

    def on_fast_retransmit(self, inflight: int, resend: int) -> None:
        """A flush fast-retransmitted at least one segment."""

    def on_timeout(self, window: int) -> None:
        """A flush retransmitted at least one segment on timeout."""


class Reno(NoCongestion):
    """KCP's built-in controller, in segments (``ikcp_input``/``ikcp_flush``).

    Slow start adds one segment per acknowledged segment; congestion avoidance
    grows by roughly one segment per window; fast retransmit halves to the
    flight size plus ``resend``; a timeout drops to one segment. The window
    never exceeds what the peer advertises. One change from KCP: KCP applies
    its growth step once per input call that advances UNA, so a receiver that
    packs many ACKs into one datagram (C KCP acknowledges on its tick, batched
    I/O does too) slows the sender down; here the step runs once per newly
    acknowledged segment, whatever the packing.
    """

    name = "reno"

    def __init__(self, mss: int, snd_wnd: int) -> None:
        super().__init__(mss, snd_wnd)
        self._mss = mss
        self._cwnd = 1
        self._ssthresh = THRESH_INIT
        self._incr = mss

    @property
    def cwnd(self) -> int:
        return self._cwnd

    def window(self) -> int:
        return self._cwnd

    def on_ack(self, acked: int, rmt_wnd: int) -> None:
        mss = self._mss
        for _ in range(acked):
            if self._cwnd >= rmt_wnd:
                return
            if self._cwnd < self._ssthresh:
                self._cwnd += 1
                self._incr += mss
            else:
                self._incr = max(self._incr, mss)
                self._incr += mss * mss // self._incr + mss // 16
                if (self._cwnd + 1) * mss <= self._incr:
                    self._cwnd = (self._incr + mss - 1) // mss
            if self._cwnd > rmt_wnd:
                self._cwnd = rmt_wnd
                self._incr = rmt_wnd * mss

    def on_fast_retransmit(self, inflight: int, resend: int) -> None:
        self._ssthresh = max(inflight // 2, THRESH_MIN)
        self._cwnd = self._ssthresh + resend
        self._incr = self._cwnd * self._mss

    def on_timeout(self, window: int) -> None:
        self._ssthresh = max(window // 2, THRESH_MIN)
        self._cwnd = 1
        self._incr = self._mss


_CONTROLLERS = {"none": NoCongestion, "reno": Reno}

# ---------------------------------------------------------------------------- the engine


class _Seg:
    """A data segment in flight (sender side)."""

    __slots__ = (
        "bundled", "data", "fastack", "fastx", "frg", "lastts", "resendts", "rto", "sn", "ts",
        "xmit",
    )  # fmt: skip

    def __init__(self, sn: int, frg: int, data: bytes) -> None:
        self.sn = sn
        self.frg = frg
        self.data = data
        self.ts = 0  # time of the last transmission
        self.resendts = 0  # when the retransmission timer fires
        self.rto = 0  # this segment's own (backed-off) RTO
        self.xmit = 0  # transmissions so far
        self.fastack = 0  # skipping ACKs since the last transmission
        self.fastx = 0  # fast retransmissions so far
        self.bundled = 0  # redundant copies bundled so far
        self.lastts = 0  # time of the last emission, copies included (bounds ACK ts)


class Arq:
    """A KCP-compatible ARQ endpoint. See the module docstring and ``STATS``.

    Drive it with ``send``/``input`` and call ``flush(now)`` right after them
    and whenever ``check(now)`` says; send what ``datagrams()`` returns; read
    with ``recv``/``recv_message``.
    """

    def __init__(
        self,
        conv: int,
        *,
        mtu: int = 1400,
        snd_wnd: int = 32,
        rcv_wnd: int = 128,
        nodelay: int = 0,
        interval: int = 100,
        resend: int = 0,
        congestion: str = "reno",
        pacing: bool = False,
        stream: bool = False,
        rto_min: int | None = None,
        rto_max: int = 60000,
        fast_limit: int = 5,
        dead_link: int = 20,
        max_message: int = 4 << 20,
        bundle: int = 0,
    ) -> None:
        rto_min = resolve_params(
            conv, mtu, snd_wnd, rcv_wnd, nodelay, interval, resend, congestion, pacing,
            stream, rto_min, rto_max, fast_limit, dead_link, max_message, bundle,
        )  # fmt: skip
        self._conv = conv
        self._mtu = mtu
        self._mss = mtu - KCP_OVERHEAD
        self._snd_wnd = snd_wnd
        self._rcv_wnd = rcv_wnd
        self._nodelay = nodelay
        self._interval = interval
        self._resend = resend
        self._pacing = pacing
        self._stream = stream
        self._rto_min = rto_min
        self._rto_max = rto_max
        self._fast_limit = fast_limit
        self._dead_link = dead_link
        self._max_message = max_message
        self._bundle = bundle
        self._cc = _CONTROLLERS[congestion](self._mss, snd_wnd)

        # RTT estimator
        self._has_rtt = False
        self._srtt = 0
        self._rttvar = 0
        self._rto = min(max(RTO_INIT, rto_min), rto_max)

        # send side: the unsent bytes, cut into segments when they enter the flight
        self._sndq = bytearray()
        self._msg_lens: deque[int] = deque()  # message mode: remaining length per message
        self._msg_segs = 0  # message mode: segments the queued messages will take
        self._snd_una = 0
        self._snd_nxt = 0
        self._snd_mask = _pow2_at_least(snd_wnd) - 1
        self._flight: list[_Seg | None] = [None] * (self._snd_mask + 1)  # indexed by sn
        self._nflight = 0
        self._flight_bytes = 0
        self._rmt_wnd = RMT_WND_INIT
        self._fast_due = False
        self._probe = 0
        self._probe_wait = 0
        self._ts_probe = 0
        self._pace_started = False
        self._pace_last = 0
        self._pace_credit = PACE_BURST * PACE_UNIT
        self._dead = False

        # receive side
        self._rcv_nxt = 0
        self._rcv_mask = _pow2_at_least(rcv_wnd) - 1
        self._rcv_buf: list[tuple[int, bytes] | None] = [None] * (self._rcv_mask + 1)
        self._rcv_buf_bytes = 0
        self._nready = 0  # segments counted against the window: delivered, not yet read
        self._acks: list[tuple[int, int]] = []  # (sn, ts) to acknowledge at the next flush
        self._ack_cap = max(128, 2 * rcv_wnd)
        self._adv_zero = False  # the last segment we sent advertised a zero window
        # stream mode: payloads ready to read, and the read offset in the first one
        self._ready: deque[bytes] = deque()
        self._ready_off = 0
        self._ready_bytes = 0
        # message mode: the message being assembled, and complete ones (payload, segments)
        self._partial = bytearray()
        self._partial_segs = 0
        self._discarding = False
        self._messages: deque[tuple[bytes, int]] = deque()
        self._messages_bytes = 0

        # output
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._cur = bytearray()
        self._stats = dict.fromkeys(STATS, 0)

    # ------------------------------------------------------------------ application side

    def send(self, data: BytesLike) -> None:
        """Queue bytes (stream mode) or one message (message mode). Nothing is transmitted."""
        n = memoryview(data).nbytes
        if self._stream:
            self._sndq += data
            return
        if n > self._max_message:
            raise ValueError(f"message of {n} bytes exceeds max_message ({self._max_message})")
        self._sndq += data
        self._msg_lens.append(n)
        self._msg_segs += max(1, -(-n // self._mss))

    def recv(self, limit: int = -1) -> bytes:
        """Stream mode: up to ``limit`` bytes (all when negative), ``b""`` when none."""
        if not self._stream:
            raise ValueError("recv() needs stream mode; use recv_message()")
        n = self._ready_bytes if limit < 0 else min(limit, self._ready_bytes)
        if n == 0:
            return b""
        parts = []
        left = n
        while left:
            head = self._ready[0]
            take = min(left, len(head) - self._ready_off)
            parts.append(head[self._ready_off : self._ready_off + take])
            self._ready_off += take
            left -= take
            if self._ready_off == len(head):
                self._ready.popleft()
                self._ready_off = 0
                self._nready -= 1
        self._ready_bytes -= n
        self._deliver()
        return b"".join(parts)

    def recv_message(self) -> bytes | None:
        """Message mode: the next whole message, or ``None``."""
        if self._stream:
            raise ValueError("recv_message() needs message mode; use recv()")
        if not self._messages:
            return None
        data, segs = self._messages.popleft()
        self._nready -= segs
        self._messages_bytes -= len(data)
        self._deliver()
        return data

    # ------------------------------------------------------------------ network side

    def input(self, datagram: BytesLike, now: int, rtt_sample: bool = True) -> int:
        """Apply one datagram of KCP segments; return segments accepted or an ``ERR_*`` code."""
        now &= _MASK
        st = self._stats
        st["in_pkts"] += 1
        view = memoryview(datagram).cast("B")
        size = len(view)
        code = self._validate(view, size)
        if code < 0:
            st["in_errors"] += 1
            return code
        flight_before = self._nflight
        accepted = 0
        pos = 0
        while pos < size:
            _, cmd, frg, wnd, ts, sn, una, length = KCP_HEADER.unpack_from(view, pos)
            pos += KCP_OVERHEAD
            payload = view[pos : pos + length]
            pos += length
            if self._bad_segment(cmd, sn, una):
                st["in_errors"] += 1
                continue
            accepted += 1
            st["in_segs"] += 1
            self._rmt_wnd = wnd
            if cmd == KCP_CMD_ACK:
                st["ack_segs_in"] += 1
                self._input_ack(sn, ts, una, now, rtt_sample)
                continue
            self._apply_una(una)
            if cmd == KCP_CMD_PUSH:
                st["in_bytes"] += length
                self._input_push(sn, ts, frg, payload)
            elif cmd == KCP_CMD_WASK:
                self._probe |= ASK_TELL
            # WINS: the window it carries is all it says
        if self._nflight < flight_before:
            self._cc.on_ack(flight_before - self._nflight, self._rmt_wnd)
        return accepted

    def _validate(self, view: memoryview, size: int) -> int:
        """Check the framing of the whole datagram before anything is applied."""
        if size < KCP_OVERHEAD:
            return ERR_SHORT
        pos = 0
        while pos < size:
            if size - pos < KCP_OVERHEAD:
                return ERR_TRUNCATED
            conv, cmd, _, _, _, _, _, length = KCP_HEADER.unpack_from(view, pos)
            if conv != self._conv:
                return ERR_CONV
            if not KCP_CMD_PUSH <= cmd <= KCP_CMD_WINS:
                return ERR_CMD
            pos += KCP_OVERHEAD
            if length > size - pos:
                return ERR_TRUNCATED
            pos += length
        return 0

    def _bad_segment(self, cmd: int, sn: int, una: int) -> bool:
        """A segment no genuine peer sends: it acknowledges what we never sent, or its
        sn is further from ours than any window allows."""
        if _diff(una, self._snd_nxt) > 0:
            return True
        if cmd == KCP_CMD_ACK:
            return _diff(sn, self._snd_nxt) >= 0
        if cmd == KCP_CMD_PUSH:
            return abs(_diff(sn, self._rcv_nxt)) >= DUP_SPAN
        return False

    def _input_ack(self, sn: int, ts: int, una: int, now: int, rtt_sample: bool) -> None:
        seg = self._flight[sn & self._snd_mask] if _diff(sn, self._snd_una) >= 0 else None
        if seg is not None and rtt_sample:
            rtt = _diff(now, ts)
            if rtt >= 0 and _diff(seg.lastts, ts) >= 0:
                self._update_rtt(rtt)
        self._apply_una(una)
        if seg is None or self._flight[sn & self._snd_mask] is not seg:
            return  # a duplicate, or already covered by una
        self._drop_flight(sn)
        self._advance_una()
        if self._resend:
            self._count_skips(sn, ts)

    def _count_skips(self, sn: int, ts: int) -> None:
        """The ACK of ``sn`` skipped every unacknowledged segment below it that was last
        sent no later than ``sn`` was."""
        flight, mask = self._flight, self._snd_mask
        k = self._snd_una  # may already be past sn: then nothing below it is unacknowledged
        while _diff(sn, k) > 0:
            seg = flight[k & mask]
            if seg is not None and _diff(ts, seg.ts) >= 0:
                seg.fastack += 1
                if seg.fastack >= self._resend and seg.fastx < self._fast_limit:
                    self._fast_due = True
            k = (k + 1) & _MASK

    def _update_rtt(self, rtt: int) -> None:
        if not self._has_rtt:
            self._has_rtt = True
            self._srtt = rtt
            self._rttvar = rtt // 2
        else:
            delta = abs(rtt - self._srtt)
            self._rttvar = (3 * self._rttvar + delta) // 4
            self._srtt = max(1, (7 * self._srtt + rtt) // 8)
        rto = self._srtt + max(self._interval, 4 * self._rttvar)
        self._rto = min(max(rto, self._rto_min), self._rto_max)

    def _apply_una(self, una: int) -> None:
        while _diff(una, self._snd_una) > 0:
            self._drop_flight(self._snd_una)
            self._snd_una = (self._snd_una + 1) & _MASK
        self._advance_una()

    def _drop_flight(self, sn: int) -> None:
        i = sn & self._snd_mask
        seg = self._flight[i]
        if seg is not None:
            self._flight[i] = None
            self._nflight -= 1
            self._flight_bytes -= len(seg.data)

    def _advance_una(self) -> None:
        while (
            self._snd_una != self._snd_nxt and self._flight[self._snd_una & self._snd_mask] is None
        ):
            self._snd_una = (self._snd_una + 1) & _MASK

    def _input_push(self, sn: int, ts: int, frg: int, payload: memoryview) -> None:
        if _diff(sn, self._rcv_nxt) >= self._rcv_wnd:
            self._stats["out_of_window"] += 1
            return
        if len(self._acks) < self._ack_cap:
            self._acks.append((sn, ts))
        else:
            self._stats["acks_dropped"] += 1
        i = sn & self._rcv_mask
        if _diff(sn, self._rcv_nxt) < 0 or self._rcv_buf[i] is not None:
            self._stats["repeat_segs"] += 1
            return
        self._rcv_buf[i] = (frg, bytes(payload))
        self._rcv_buf_bytes += len(payload)
        if sn == self._rcv_nxt:
            self._deliver()

    def _deliver(self) -> None:
        """Move in-order segments to the application while the window has room."""
        buf, mask = self._rcv_buf, self._rcv_mask
        while self._nready < self._rcv_wnd:
            i = self._rcv_nxt & mask
            item = buf[i]
            if item is None:
                return
            buf[i] = None
            self._rcv_buf_bytes -= len(item[1])
            self._rcv_nxt = (self._rcv_nxt + 1) & _MASK
            frg, data = item
            if self._stream:
                if data:
                    self._ready.append(data)
                    self._ready_bytes += len(data)
                    self._nready += 1
            else:
                self._assemble(frg, data)

    def _assemble(self, frg: int, data: bytes) -> None:
        """Message mode: add a fragment; a message ends at the first ``frg == 0``."""
        if not self._discarding:
            if len(self._partial) + len(data) > self._max_message:
                self._stats["oversize_messages"] += 1
                self._partial.clear()
                self._partial_segs = 0
                self._discarding = True
            else:
                self._partial += data
                self._partial_segs += 1
        if frg:
            return
        if self._discarding:
            self._discarding = False
            return
        self._messages.append((bytes(self._partial), self._partial_segs))
        self._messages_bytes += len(self._partial)
        self._nready += self._partial_segs
        self._partial.clear()
        self._partial_segs = 0

    def _wnd_unused(self) -> int:
        return max(0, self._rcv_wnd - self._nready)

    # ------------------------------------------------------------------ output

    def flush(self, now: int) -> None:
        """Emit everything due now into the output queue (see ``datagrams()``)."""
        if self._dead:
            return
        now &= _MASK
        st = self._stats
        wnd = self._wnd_unused()
        una = self._rcv_nxt
        conv = self._conv
        pack = KCP_HEADER.pack
        emitted = st["out_segs"]

        for sn, ts in self._acks:
            self._emit(pack(conv, KCP_CMD_ACK, 0, wnd, ts, sn, una, 0), b"")
        st["ack_segs_out"] += len(self._acks)
        self._acks.clear()

        if self._rmt_wnd == 0 and self._queued():
            if self._probe_wait == 0:
                self._probe_wait = PROBE_INIT
                self._ts_probe = (now + PROBE_INIT) & _MASK
            elif _diff(now, self._ts_probe) >= 0:
                self._probe_wait = min(self._probe_wait + self._probe_wait // 2, PROBE_MAX)
                self._ts_probe = (now + self._probe_wait) & _MASK
                self._probe |= ASK_SEND
        else:
            self._probe_wait = 0
        if self._probe & ASK_SEND:
            self._emit(pack(conv, KCP_CMD_WASK, 0, wnd, now, 0, una, 0), b"")
            st["probe_segs"] += 1
        if self._probe & ASK_TELL or (self._adv_zero and wnd > 0):
            self._emit(pack(conv, KCP_CMD_WINS, 0, wnd, now, 0, una, 0), b"")
            st["wins_segs"] += 1
        self._probe = 0

        # retransmissions first; the congestion controller reacts to them; then new
        # data goes out under the window as it is now, so nothing is left due
        limit = self._window()
        lost = change = False
        flight, mask = self._flight, self._snd_mask
        sn = self._snd_una
        while sn != self._snd_nxt:
            seg = flight[sn & mask]
            sn = (sn + 1) & _MASK
            if seg is None:
                continue
            if _diff(now, seg.resendts) >= 0:
                grown = seg.rto + seg.rto // 2 if self._nodelay else seg.rto * 2
                seg.rto = min(grown, self._rto_max)
                seg.resendts = (now + seg.rto) & _MASK
                lost = True
                st["lost_segs"] += 1
            elif self._resend and seg.fastack >= self._resend and seg.fastx < self._fast_limit:
                seg.fastx += 1
                seg.resendts = (now + seg.rto) & _MASK
                change = True
                st["fast_retrans_segs"] += 1
            else:
                continue
            st["retrans_segs"] += 1
            self._transmit(seg, now, wnd, una)
        self._fast_due = False
        if change:
            self._cc.on_fast_retransmit(_diff(self._snd_nxt, self._snd_una), self._resend)
        if lost:
            self._cc.on_timeout(limit)
        if not self._dead:
            admitted = self._snd_nxt
            self._admit(now, self._window(), wnd, una)
            if self._bundle and admitted != self._snd_nxt and not self._dead:
                self._bundle_copies(now, wnd, una)
        self._end_datagram()
        if st["out_segs"] != emitted:
            self._adv_zero = wnd == 0

    def _window(self) -> int:
        """Segments the flight may span: send window, peer's window, congestion window."""
        return min(self._snd_wnd, self._rmt_wnd, self._cc.window())

    def _transmit(self, seg: _Seg, now: int, wnd: int, una: int) -> None:
        seg.xmit += 1
        seg.ts = seg.lastts = now
        seg.fastack = 0
        hdr = KCP_HEADER.pack(
            self._conv, KCP_CMD_PUSH, seg.frg, wnd, now, seg.sn, una, len(seg.data)
        )
        self._emit(hdr, seg.data)
        self._stats["out_bytes"] += len(seg.data)
        if seg.xmit >= self._dead_link:
            self._dead = True

    def _bundle_copies(self, now: int, wnd: int, una: int) -> None:
        """Fill the room left in the open datagram with copies of the oldest
        unacknowledged segments not transmitted at ``now``, oldest first, each at
        most ``bundle`` times; stop at the first one that does not fit whole.

        A thin stream (one small message per datagram) loses a message to one
        dropped datagram; the next message's datagram then repairs it one send
        interval later, with no round trip and nothing the peer must understand.
        Bulk transfers fill their datagrams and get no copies. A copy changes
        none of the segment's timers or counters (xmit, rto, resendts, ts, fastack):
        it is not a retransmission. It carries ``now`` as its ts, so the ACK it
        provokes is a correct RTT sample (``lastts`` bounds the plausible ones).
        """
        room = self._mtu - len(self._cur)
        flight, mask, limit = self._flight, self._snd_mask, self._bundle
        st = self._stats
        sn = self._snd_una
        while sn != self._snd_nxt and room >= KCP_OVERHEAD:
            seg = flight[sn & mask]
            sn = (sn + 1) & _MASK
            if seg is None or seg.ts == now or seg.bundled >= limit:
                continue
            need = KCP_OVERHEAD + len(seg.data)
            if need > room:
                return
            hdr = KCP_HEADER.pack(
                self._conv, KCP_CMD_PUSH, seg.frg, wnd, now, seg.sn, una, len(seg.data)
            )
            self._emit(hdr, seg.data)
            room -= need
            seg.bundled += 1
            seg.lastts = now
            st["out_bytes"] += len(seg.data)
            st["bundled_segs"] += 1

    def _admit(self, now: int, limit: int, wnd: int, una: int) -> None:
        """Cut queued bytes into new segments and send them, while the windows and the
        pacer allow. A first timer gets KCP's rto/8 slack in normal mode."""
        pacing = self._pacing and self._pace_update(now, limit)
        mss = self._mss
        slack = self._rto >> 3 if self._nodelay == 0 else 0
        while self._queued() and _diff(self._snd_nxt, self._snd_una) < limit:
            if pacing:
                if self._pace_credit < PACE_UNIT:
                    break
                self._pace_credit -= PACE_UNIT
            if self._stream:
                size, frg = min(len(self._sndq), mss), 0
            else:
                left = self._msg_lens[0]
                size = min(left, mss)
                frg = min(max(1, -(-left // mss)) - 1, 255)
                if left == size:
                    self._msg_lens.popleft()
                else:
                    self._msg_lens[0] = left - size
                self._msg_segs -= 1
            seg = _Seg(self._snd_nxt, frg, bytes(self._sndq[:size]))
            del self._sndq[:size]
            seg.rto = self._rto
            seg.resendts = (now + seg.rto + slack) & _MASK
            self._flight[self._snd_nxt & self._snd_mask] = seg
            self._nflight += 1
            self._flight_bytes += size
            self._snd_nxt = (self._snd_nxt + 1) & _MASK
            self._transmit(seg, now, wnd, una)

    def _queued(self) -> bool:
        """Anything waiting to enter the flight (message mode may queue empty messages)."""
        return bool(self._sndq) if self._stream else bool(self._msg_lens)

    def _pace_rate(self, limit: int) -> int:
        """Pacing credit earned per ms, or 0 when the path is too short to pace."""
        rtt = self._srtt if self._has_rtt else self._rto
        if rtt < PACE_MIN_RTT:
            return 0
        return max(1, max(1, limit) * PACE_UNIT * PACE_GAIN_NUM // (PACE_GAIN_DEN * rtt))

    def _pace_update(self, now: int, limit: int) -> bool:
        """Accrue pacing credit up to ``now``; False when pacing does not throttle."""
        rate = self._pace_rate(limit)
        if self._pace_started:
            elapsed = _diff(now, self._pace_last)
            if elapsed > 0:
                cap = max(PACE_BURST * PACE_UNIT, 2 * rate)
                self._pace_credit = min(cap, self._pace_credit + elapsed * rate)
        self._pace_started = True
        self._pace_last = now
        return rate != 0

    def _emit(self, header: bytes, data: bytes) -> None:
        need = len(header) + len(data)
        if self._cur and len(self._cur) + need > self._mtu:
            self._end_datagram()
        self._cur += header
        self._cur += data
        self._stats["out_segs"] += 1

    def _end_datagram(self) -> None:
        if self._cur:
            self._out.append(bytes(self._cur))
            self._out_bytes += len(self._cur)
            self._cur.clear()
            self._stats["out_pkts"] += 1

    def datagrams(self) -> list[bytes]:
        """Drain the output queue; each datagram is at most ``mtu`` bytes."""
        out, self._out = self._out, []
        self._out_bytes = 0
        return out

    # ------------------------------------------------------------------ scheduling

    def check(self, now: int) -> int | None:
        """When ``flush`` must next run (``now`` if due), or ``None`` when idle.

        The answer is in the caller's scale: ``now`` plus a non-negative delay.
        """
        if self._dead:
            return None
        t = now & _MASK
        if (
            self._acks
            or self._probe
            or self._fast_due
            or (self._adv_zero and self._wnd_unused() > 0)
        ):
            return now
        best: int | None = None
        if self._queued():
            limit = self._window()
            if self._rmt_wnd == 0:
                if self._probe_wait == 0:
                    return now
                best = _diff(self._ts_probe, t)
            elif _diff(self._snd_nxt, self._snd_una) < limit:
                best = self._pace_delay(t, limit)
        flight, mask = self._flight, self._snd_mask
        sn = self._snd_una
        while sn != self._snd_nxt:
            seg = flight[sn & mask]
            if seg is not None:
                d = _diff(seg.resendts, t)
                if best is None or d < best:
                    best = d
            sn = (sn + 1) & _MASK
        if best is None:
            return None
        return now + max(0, best)

    def _pace_delay(self, now: int, limit: int) -> int:
        """Milliseconds until the pacer releases the next new segment (0: at once)."""
        if not self._pacing or not self._pace_started:
            return 0
        rate = self._pace_rate(limit)
        if rate == 0:
            return 0
        need = PACE_UNIT - self._pace_credit
        if need <= 0:
            return 0
        return max(0, _diff(self._pace_last, now) + -(-need // rate))

    def _start_sequence(self, snd_nxt: int, rcv_nxt: int) -> None:
        """Tests only: start both sequence spaces elsewhere (to cross 2**32 soon).

        KCP peers start at 0, so a real connection never calls this.
        """
        if self._snd_nxt or self._rcv_nxt or self._queued() or self._stats["in_pkts"]:
            raise RuntimeError("_start_sequence() needs a fresh engine")
        self._snd_una = self._snd_nxt = snd_nxt & _MASK
        self._rcv_nxt = rcv_nxt & _MASK

    # ------------------------------------------------------------------ state

    @property
    def conv(self) -> int:
        return self._conv

    @property
    def mtu(self) -> int:
        """Byte budget of one output datagram."""
        return self._mtu

    @property
    def mss(self) -> int:
        """Payload bytes per segment: mtu - 24."""
        return self._mss

    @property
    def stream(self) -> bool:
        return self._stream

    @property
    def pacing(self) -> bool:
        return self._pacing

    @property
    def bundle(self) -> int:
        """Redundant copies bundling may send of each segment (0: off); settable, so a
        connection can stop bundling while FEC parity does the job."""
        return self._bundle

    @bundle.setter
    def bundle(self, value: int) -> None:
        check_range("bundle", value, 0, BUNDLE_MAX)
        self._bundle = value

    @property
    def srtt(self) -> int:
        """Smoothed RTT, ms (0 before the first sample)."""
        return self._srtt

    @property
    def rttvar(self) -> int:
        return self._rttvar

    @property
    def rto(self) -> int:
        """The RTO a new segment starts with, ms."""
        return self._rto

    @property
    def cwnd(self) -> int:
        """Congestion window, segments (``snd_wnd`` when congestion control is off)."""
        return self._cc.cwnd

    @property
    def snd_wnd(self) -> int:
        return self._snd_wnd

    @property
    def rcv_wnd(self) -> int:
        return self._rcv_wnd

    @property
    def rmt_wnd(self) -> int:
        """The peer's free receive window as it last advertised it, segments."""
        return self._rmt_wnd

    @property
    def inflight(self) -> int:
        """Segments transmitted and not yet acknowledged."""
        return self._nflight

    @property
    def waitsnd(self) -> int:
        """Segments queued plus in flight."""
        queued = -(-len(self._sndq) // self._mss) if self._stream else self._msg_segs
        return queued + self._nflight

    @property
    def pending_bytes(self) -> int:
        """Bytes accepted by send() and not yet acknowledged."""
        return len(self._sndq) + self._flight_bytes

    @property
    def buffered_bytes(self) -> int:
        """Bytes the engine holds: queued and in-flight data, out-of-order and unread
        received data, a message being assembled, and undrained output."""
        return (
            len(self._sndq)
            + self._flight_bytes
            + self._rcv_buf_bytes
            + self._ready_bytes
            + self._messages_bytes
            + len(self._partial)
            + self._out_bytes
        )

    @property
    def readable(self) -> int:
        """Stream mode: bytes ready for recv(); message mode: whole messages ready."""
        return self._ready_bytes if self._stream else len(self._messages)

    @property
    def dead(self) -> bool:
        """A segment was transmitted ``dead_link`` times without an ACK; nothing more is sent."""
        return self._dead

    def stats(self) -> dict[str, int]:
        """Counters, described in ``STATS``."""
        return dict(self._stats)
