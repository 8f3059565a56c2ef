"""Reassembly as a property: whatever order a sender's datagrams arrive in, with
duplicates, the receiver delivers exactly the bytes (or messages) that were sent,
in order, once every datagram has arrived at least once."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rudp.wire import KCP_CMD_WINS

PROPERTY = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
MTU = 100  # mss 76: messages of many fragments stay small
# the receiver's window (512), told to the sender before it sends (it assumes 128)
WINS_512 = struct.pack("<IBBHIIII", 1, KCP_CMD_WINS, 0, 512, 0, 0, 0, 0)


@st.composite
def arrival(draw, n: int):
    """An arrival order of ``n`` datagrams: every index at least once, some twice."""
    order = draw(st.permutations(range(n)))
    dups = draw(st.lists(st.integers(0, max(0, n - 1)), max_size=n // 2)) if n else []
    for d in dups:
        order.insert(draw(st.integers(0, len(order))), d)
    return order


@PROPERTY
@given(data=st.data(), sizes=st.lists(st.integers(0, 1000), min_size=1, max_size=12))
def test_any_arrival_order_delivers_the_messages(arq_cls, data, sizes):
    kw = {"mtu": MTU, "snd_wnd": 512, "rcv_wnd": 512, "congestion": "none", "stream": False}
    a, b = arq_cls(1, **kw), arq_cls(1, **kw)
    a.input(WINS_512, 0)
    sent = [bytes([i]) * n for i, n in enumerate(sizes)]
    for m in sent:
        a.send(m)
    a.flush(0)
    out = a.datagrams()
    assert a.waitsnd == a.inflight, "everything is in flight"
    got = []
    for i in data.draw(arrival(len(out))):
        assert b.input(out[i], 1) >= 1
        while (m := b.recv_message()) is not None:
            got.append(m)
    assert got == sent


@PROPERTY
@given(data=st.data(), total=st.integers(1, 20000), reads=st.integers(1, 3000))
def test_any_arrival_order_delivers_the_stream(arq_cls, data, total, reads):
    kw = {"mtu": MTU, "snd_wnd": 512, "rcv_wnd": 512, "congestion": "none", "stream": True}
    a, b = arq_cls(1, **kw), arq_cls(1, **kw)
    a.input(WINS_512, 0)
    sent = bytes(i * 31 & 0xFF for i in range(total))
    a.send(sent)
    a.flush(0)
    out = a.datagrams()
    assert a.waitsnd == a.inflight, "everything is in flight"
    got = b""
    for i in data.draw(arrival(len(out))):
        b.input(out[i], 1)
        got += b.recv(reads)
    got += b.recv()
    assert got == sent
