"""Hostile input: ``input()`` never raises, memory stays bounded, the engine keeps working.

Datagrams are drawn by hypothesis: raw noise, and sequences of well-framed KCP
segments with arbitrary fields (right and wrong conv, every cmd, sn/una near
and far from the engine's own, lengths that lie). Segments with the right
conv and plausible numbers are indistinguishable from a real peer (KCP has no
authentication): they may inject data into the receive stream. So the checks
after the fuzz use the direction such input cannot corrupt: what it sends.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rudp.arq import ERR_CMD, ERR_CONV, ERR_SHORT, ERR_TRUNCATED

CONV = 77
HDR = struct.Struct("<IBBHIIII")
RCV_WND = 16
MAX_MESSAGE = 4096
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

u32 = st.integers(0, 2**32 - 1)
near = st.integers(-40, 40).map(lambda d: d & 0xFFFFFFFF)
number = st.one_of(near, u32)


@st.composite
def segment(draw):
    conv = draw(st.sampled_from([CONV, CONV, CONV, 0, CONV + 1]))
    cmd = draw(st.sampled_from([81, 81, 81, 82, 82, 83, 84, 0, 85, 255]))
    data = draw(st.binary(max_size=300))
    length = draw(st.one_of(st.just(len(data)), st.integers(0, 2**32 - 1)))
    header = HDR.pack(
        conv,
        cmd,
        draw(st.integers(0, 255)),
        draw(st.integers(0, 65535)),
        draw(number),
        draw(number),
        draw(number),
        length,
    )
    return header + data


datagram = st.one_of(
    st.binary(max_size=200),
    st.lists(segment(), min_size=1, max_size=5).map(b"".join),
    st.lists(segment(), min_size=1, max_size=3).map(b"".join).map(lambda d: d[: len(d) // 2]),
)

CODES = {ERR_SHORT, ERR_CONV, ERR_TRUNCATED, ERR_CMD}


def bound(arq) -> int:
    """Bytes the receive side may legitimately hold for the fuzz datagrams (at most
    RCV_WND segments out of order, as many unread, one partial message) plus what the
    test itself queued for sending."""
    return 2 * RCV_WND * 1500 + MAX_MESSAGE + arq.pending_bytes


def transfer_still_works(arq_cls, x, now):
    """``x`` sends fresh data to a fresh peer; every byte must arrive.

    Forged PUSH segments may have advanced x's rcv_nxt (what it acknowledges as una),
    and a peer drops segments acknowledging data it never sent; so the peer first
    queues 100 segments of its own, putting its snd_nxt past anything x accepted.
    """
    y = arq_cls(CONV, stream=True, snd_wnd=128, rcv_wnd=64, congestion="none")
    y.send(bytes(100 * y.mss))
    data = bytes(range(256)) * 30
    x.send(data)
    got = b""
    for step in range(2000):
        t = now + step
        y.flush(t)
        x.flush(t)
        for d in x.datagrams():
            y.input(d, t)
        for d in y.datagrams():
            x.input(d, t)
        got += y.recv()
        if got == data:
            return
    raise AssertionError(f"only {len(got)} of {len(data)} bytes arrived after the fuzz")


@FUZZ
@given(datagrams=st.lists(datagram, max_size=40), stream=st.booleans())
def test_fuzzed_input_is_harmless(arq_cls, datagrams, stream):
    x = arq_cls(CONV, stream=stream, rcv_wnd=RCV_WND, max_message=MAX_MESSAGE, resend=2)
    now = 1000
    for i, d in enumerate(datagrams):
        before = x.stats()["in_errors"]
        r = x.input(d, now + i)
        assert isinstance(r, int) and (r >= 0 or r in CODES)
        if r < 0:
            assert x.stats()["in_errors"] == before + 1
        assert x.buffered_bytes <= bound(x)
        if i % 3 == 0:
            x.flush(now + i)
            assert all(len(out) <= 1400 for out in x.datagrams())
        deadline = x.check(now + i)
        assert deadline is None or deadline >= now + i
        if i % 5 == 0:
            if stream:
                x.recv(1000)
            else:
                x.recv_message()
    assert x.stats()["in_pkts"] == len(datagrams)
    x.flush(now + len(datagrams))
    x.datagrams()
    if stream:
        transfer_still_works(arq_cls, x, now + len(datagrams) + 1)


@FUZZ
@given(noise=st.lists(datagram, min_size=1, max_size=30), seed=st.integers(0, 2**16))
def test_noise_beside_a_transfer_loses_nothing(arq_cls, noise, seed):
    """Datagrams that fail validation (wrong conv, bad framing) injected into both
    directions of a live transfer change nothing."""
    bad = [
        d
        for d in noise
        if arq_cls(CONV).input(d, 0) < 0  # rejected as a whole by a fresh engine
    ]
    a = arq_cls(CONV, stream=True, congestion="none", nodelay=1, resend=2)
    b = arq_cls(CONV, stream=True)
    data = bytes((seed + i) & 0xFF for i in range(20000))
    a.send(data)
    got = b""
    for now in range(500):
        a.flush(now)
        b.flush(now)
        for j, d in enumerate(a.datagrams()):
            if bad:
                b.input(bad[(now + j) % len(bad)], now)
            b.input(d, now)
        for j, d in enumerate(b.datagrams()):
            if bad:
                a.input(bad[(now * 7 + j) % len(bad)], now)
            a.input(d, now)
        got += b.recv()
        if got == data:
            break
    assert got == data
    assert a.stats()["in_errors"] + b.stats()["in_errors"] >= (len(bad) > 0)
