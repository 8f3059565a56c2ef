"""Session (mux) behaviour, deterministic, in virtual time.

Golden frames are written out byte by byte here, never produced by the encoder.
"""

from __future__ import annotations

import random

import pytest
from test_mux_support import Pipe, bytewise, frame, read_all, upd_body

from rudp import Configuration
from rudp.errors import (
    ClosedError,
    ConnectionRefused,
    ConnectionReset,
    DeadPeerError,
    ProtocolError,
)
from rudp.mux import (
    INITIAL_PEER_WINDOW,
    MIN_WINDOW,
    Session,
    SessionClosed,
    StreamEnded,
    StreamOpened,
    StreamReadable,
    StreamReset,
    StreamState,
    StreamWritable,
)

SYN, FIN, PSH, NOP, UPD, RST = 0, 1, 2, 3, 4, 0x80


def parse(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(ver, cmd, sid, body) of each frame, decoded by hand."""
    out = []
    pos = 0
    while pos < len(data):
        ver, cmd = data[pos], data[pos + 1]
        length = int.from_bytes(data[pos + 2 : pos + 4], "little")
        sid = int.from_bytes(data[pos + 4 : pos + 8], "little")
        out.append((ver, cmd, sid, data[pos + 8 : pos + 8 + length]))
        pos += 8 + length
    assert pos == len(data)
    return out


def server(**kw: object) -> Session:
    return Session(client=False, now=0, **kw)  # type: ignore[arg-type]


def client(**kw: object) -> Session:
    return Session(client=True, now=0, **kw)  # type: ignore[arg-type]


def events(s: Session) -> list[object]:
    out = []
    while (e := s.next_event()) is not None:
        out.append(e)
    return out


# ---------------------------------------------------------------------------
# Golden frames: what goes on the wire
# ---------------------------------------------------------------------------


def test_client_syn_and_psh_golden_v2() -> None:
    c = client()
    sid = c.open_stream()
    assert sid == 3  # smux: the client's first id is 3
    assert c.send(sid, b"hello") == 5
    assert c.data_to_send(1000, 0) == (
        b"\x02\x00\x00\x00\x03\x00\x00\x00"  # ver 2, SYN, len 0, sid 3
        b"\x02\x02\x05\x00\x03\x00\x00\x00hello"  # PSH, len 5
    )
    assert c.open_stream() == 5


def test_server_ids_are_even_and_v1_golden() -> None:
    s = server(version=1)
    assert s.open_stream() == 2
    assert s.open_stream() == 4
    assert s.data_to_send(1000, 0) == (
        b"\x01\x00\x00\x00\x02\x00\x00\x00\x01\x00\x00\x00\x04\x00\x00\x00"
    )


def test_fin_golden_and_after_data() -> None:
    c = client(max_frame_size=4)
    sid = c.open_stream()
    c.send(sid, b"abcdef")
    c.end_stream(sid)
    assert c.data_to_send(1000, 0) == (
        b"\x02\x00\x00\x00\x03\x00\x00\x00"
        b"\x02\x02\x04\x00\x03\x00\x00\x00abcd"
        b"\x02\x02\x02\x00\x03\x00\x00\x00ef"
        b"\x02\x01\x00\x00\x03\x00\x00\x00"  # FIN only after the last data
    )


def test_initial_upd_golden_when_buffer_differs_from_smux_guess() -> None:
    # smux assumes 256 KiB before the first UPD; a 64 KiB buffer must say so at once.
    c = client(stream_buffer=65536, session_buffer=65536)
    c.open_stream()
    assert c.data_to_send(1000, 0) == (
        b"\x02\x00\x00\x00\x03\x00\x00\x00"
        b"\x02\x04\x08\x00\x03\x00\x00\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x01\x00"
    )


def test_no_initial_upd_when_smux_guess_is_right_and_never_in_v1() -> None:
    c = client(stream_buffer=INITIAL_PEER_WINDOW)
    c.open_stream()
    assert c.data_to_send(1000, 0) == b"\x02\x00\x00\x00\x03\x00\x00\x00"
    v1 = client(version=1, stream_buffer=65536, session_buffer=65536)
    v1.open_stream()
    assert v1.data_to_send(1000, 0) == b"\x01\x00\x00\x00\x03\x00\x00\x00"


def test_upd_sent_after_half_the_window_is_read() -> None:
    s = server(stream_buffer=65536, session_buffer=65536)
    s.receive_data(frame(2, SYN, 3), 0)
    assert s.accept_stream() == 3
    assert parse(s.data_to_send(1000, 0)) == [(2, UPD, 3, upd_body(0, 65536))]
    s.receive_data(frame(2, PSH, 3, b"x" * 40000), 0)
    assert len(s.read(3, 20000)) == 20000
    assert s.data_to_send(1000, 0) == b""  # less than half read: no UPD yet
    assert len(s.read(3, 20000)) == 20000
    assert s.data_to_send(1000, 0) == (
        b"\x02\x04\x08\x00\x03\x00\x00\x00" + b"\x40\x9c\x00\x00" + b"\x00\x00\x01\x00"
    )  # consumed 40000, window 65536


def test_no_window_update_after_the_application_closed_the_stream() -> None:
    s = server(stream_buffer=65536, session_buffer=65536)
    s.receive_data(frame(2, SYN, 3) + frame(2, PSH, 3, b"x" * 40000), 0)
    s.data_to_send(1000, 0)  # the initial UPD
    s.read(3)  # queues an UPD...
    s.close_stream(3)  # ...that must not open a window for bytes we now drop
    assert parse(s.data_to_send(1000, 0)) == [(2, FIN, 3, b"")]


def test_nop_golden_on_keepalive() -> None:
    c = client(keepalive=1000, idle_timeout=None)
    assert c.get_timer() == 1000
    c.handle_timer(999)
    assert not c.has_output()
    c.handle_timer(1000)
    assert c.data_to_send(100, 1000) == b"\x02\x03\x00\x00\x00\x00\x00\x00"
    assert c.get_timer() == 2000


def test_rst_extension_golden() -> None:
    c = client(extensions=True)
    sid = c.open_stream()
    c.data_to_send(1000, 0)
    c.reset_stream(sid)
    assert c.data_to_send(1000, 0) == b"\x02\x80\x04\x00\x03\x00\x00\x00\x00\x00\x00\x00"


def test_refusal_golden_plain_and_extension() -> None:
    s = server(max_streams=1)
    s.receive_data(frame(2, SYN, 3) + frame(2, SYN, 5), 0)
    assert s.data_to_send(1000, 0) == b"\x02\x01\x00\x00\x05\x00\x00\x00"  # FIN 5
    x = server(max_streams=1, extensions=True)
    x.receive_data(frame(2, SYN, 3) + frame(2, SYN, 5), 0)
    assert x.data_to_send(1000, 0) == b"\x02\x80\x04\x00\x05\x00\x00\x00\x01\x00\x00\x00"


# ---------------------------------------------------------------------------
# Parsing: frames split anywhere
# ---------------------------------------------------------------------------

PEER_SCRIPT = (
    frame(2, SYN, 3)
    + frame(2, PSH, 3, b"hello")
    + frame(2, SYN, 5)
    + frame(2, PSH, 5, b"world!")
    + frame(2, UPD, 3, upd_body(0, 300000))
    + frame(2, NOP, 0)
    + frame(2, PSH, 3, b"")
    + frame(2, FIN, 3)
    + frame(2, PSH, 5, b"more")
    + frame(2, FIN, 5)
)


def outcome(chunks: list[bytes]) -> tuple[object, ...]:
    s = server()
    for c in chunks:
        s.receive_data(c, 0)
    evs = events(s)
    ids = [s.accept_stream(), s.accept_stream(), s.accept_stream()]
    data = {sid: read_all(s, sid) for sid in (3, 5)}
    eof = {sid: s.read(sid) for sid in (3, 5)}
    return evs, ids, data, eof, s.stats.as_dict(), s.closed


def test_script_whole() -> None:
    evs, ids, data, eof, stats, closed = outcome([PEER_SCRIPT])
    assert evs == [
        StreamOpened(3),
        StreamReadable(3),
        StreamOpened(5),
        StreamReadable(5),
        StreamEnded(3),
        StreamEnded(5),
    ]
    assert ids == [3, 5, None]
    assert data == {3: b"hello", 5: b"world!more"}
    assert eof == {3: b"", 5: b""}
    assert not closed
    assert stats["frames_received"] == 10


def test_frames_split_at_every_byte_boundary() -> None:
    expected = outcome([PEER_SCRIPT])
    for k in range(len(PEER_SCRIPT) + 1):
        assert outcome([PEER_SCRIPT[:k], PEER_SCRIPT[k:]]) == expected, k
    assert outcome([PEER_SCRIPT[i : i + 1] for i in range(len(PEER_SCRIPT))]) == expected


def test_pipe_delivering_byte_by_byte() -> None:
    p = Pipe(chunker=bytewise, capacity=300)
    sids = [p.a.open_stream() for _ in range(3)]
    payloads = {sid: bytes([sid]) * 2000 for sid in sids}
    for sid in sids:
        p.a.send(sid, payloads[sid])
        p.a.end_stream(sid)
    p.pump()
    got = {}
    while (sid := p.b.accept_stream()) is not None:
        got[sid] = read_all(p.b, sid)
    assert got == payloads


# ---------------------------------------------------------------------------
# Bad input: closes the session with a clear reason, or is dropped and counted
# ---------------------------------------------------------------------------

BAD = {
    "version": (frame(1, SYN, 3), {}, "smux version 1"),
    "unknown command": (frame(2, 5, 3), {}, "unknown smux command 5"),
    "rst without extensions": (frame(2, RST, 3, b"\0" * 4), {}, "unknown smux command 128"),
    "syn with payload": (frame(2, SYN, 3, b"abcd"), {}, "SYN frame with a 4-byte payload"),
    "fin with payload": (frame(2, FIN, 3, b"a"), {}, "FIN frame with a 1-byte payload"),
    "nop with payload": (frame(2, NOP, 0, b"ab"), {}, "NOP frame with a 2-byte payload"),
    "upd in v1": (frame(1, UPD, 3, upd_body(0, 1)), {"version": 1}, "unknown smux command 4"),
    "upd short": (frame(2, SYN, 3) + frame(2, UPD, 3, b"\0" * 7), {}, "UPD frame with a 7-byte"),
    "rst long": (frame(2, RST, 3, b"\0" * 5), {"extensions": True}, "RST frame with a 5-byte"),
    "syn with our parity": (frame(2, SYN, 2), {}, "peer opened stream 2, an id of our side"),
    "syn sid 0": (frame(2, SYN, 0), {}, "peer opened stream 0"),
    "psh never opened (peer id)": (frame(2, PSH, 5, b"x"), {}, "PSH for stream 5, which was never"),
    "psh never opened (our id)": (frame(2, PSH, 2, b"x"), {}, "PSH for stream 2, which was never"),
    "fin on sid 0": (frame(2, FIN, 0), {}, "FIN for stream 0"),
    "upd above every syn": (
        frame(2, SYN, 3) + frame(2, UPD, 7, upd_body(0, 1)),
        {},
        "UPD for stream 7",
    ),
    "window exceeded": (
        frame(2, SYN, 3)
        + b"".join(frame(2, PSH, 3, b"x" * 32768) for _ in range(8))
        + frame(2, PSH, 3, b"x"),
        {},
        "1 bytes beyond the window",
    ),
}


@pytest.mark.parametrize("name", list(BAD))
def test_protocol_errors_close_the_session(name: str) -> None:
    data, kw, message = BAD[name]
    s = server(**kw)
    s.receive_data(data, 0)
    assert s.closed
    assert isinstance(s.error, ProtocolError)
    assert message in str(s.error)
    assert events(s)[-1] == SessionClosed(s.error)
    with pytest.raises(ProtocolError):
        s.open_stream()
    s.receive_data(frame(2, SYN, 9), 0)  # ignored, not a crash
    assert s.data_to_send(1000, 0) == b""
    assert s.get_timer() is None


def test_window_bound_is_our_smaller_window_once_advertised() -> None:
    s = server(stream_buffer=65536, session_buffer=65536)
    s.receive_data(frame(2, SYN, 3), 0)
    # Before the peer saw our UPD it may use smux's 256 KiB guess: accepted.
    s.receive_data(b"".join(frame(2, PSH, 3, b"y" * 32768) for _ in range(8)), 0)
    assert not s.closed
    assert s.recv_buffered == INITIAL_PEER_WINDOW
    assert s.stats.bytes_over_window == INITIAL_PEER_WINDOW - 65536  # counted, and pooled
    s.receive_data(frame(2, PSH, 3, b"y"), 0)
    assert isinstance(s.error, ProtocolError)


def test_peer_consuming_more_than_we_sent_is_an_error() -> None:
    s = server()
    sid = s.open_stream()
    s.send(sid, b"abc")
    s.data_to_send(1000, 0)
    s.receive_data(frame(2, UPD, sid, upd_body(3, 100)), 0)
    assert not s.closed
    s.receive_data(frame(2, UPD, sid, upd_body(4, 100)), 0)
    assert "more than we sent" in str(s.error)


def test_late_and_stray_frames_are_dropped_and_counted() -> None:
    s = server()
    s.receive_data(frame(2, SYN, 3) + frame(2, SYN, 3), 0)
    assert s.stats.duplicate_syns == 1
    assert s.accept_stream() == 3
    assert s.accept_stream() is None
    s.close_stream(3)
    s.data_to_send(1000, 0)  # our FIN
    assert s.stream_ids() == []
    s.receive_data(frame(2, PSH, 3, b"late") + frame(2, UPD, 3, upd_body(0, 9)), 0)
    s.receive_data(frame(2, FIN, 3), 0)
    assert s.stats.frames_dropped == 3
    s.receive_data(frame(2, SYN, 5) + frame(2, FIN, 5) + frame(2, PSH, 5, b"after fin"), 0)
    assert s.stats.frames_dropped == 4
    assert not s.closed


def test_partial_frame_waits_and_memory_stays_bounded() -> None:
    s = server()
    s.receive_data(frame(2, SYN, 3) + frame(2, PSH, 3, length=65535), 0)
    for _ in range(100):
        s.receive_data(b"z" * 600, 0)
    assert s.recv_buffered == 0  # nothing is delivered before the frame is whole
    assert events(s) == [StreamOpened(3)]
    s.receive_data(b"z" * 5535 + frame(2, NOP, 0), 0)
    assert s.read(3) == b"z" * 65535


# ---------------------------------------------------------------------------
# Data flow: many streams, fairness, independence
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
def test_many_streams_interleaved_both_directions(version: int) -> None:
    rng = random.Random(1234 + version)
    p = Pipe(
        capacity=20000,
        chunker=lambda n: _random_chunks(rng, n),
        version=version,
        stream_buffer=8192,
        session_buffer=1 << 20,
        max_frame_size=3000,
    )
    streams: dict[tuple[int, int], list[bytes]] = {}  # (opener index, sid) -> [data to send]
    sent: dict[tuple[int, int], bytes] = {}
    peers = [p.a, p.b]
    for _ in range(40):
        i = rng.randrange(2)
        sid = peers[i].open_stream()
        payload = rng.randbytes(rng.randrange(0, 50000))
        streams[(i, sid)] = [payload]
        sent[(i, sid)] = payload
    received: dict[tuple[int, int], bytearray] = {k: bytearray() for k in sent}
    eof: set[tuple[int, int]] = set()
    offsets = dict.fromkeys(sent, 0)
    for _ in range(10000):
        for key, off in offsets.items():
            i, sid = key
            data = sent[key]
            if off < len(data):
                offsets[key] += peers[i].send(sid, data[off : off + rng.randrange(1, 6000)])
            elif off == len(data):
                peers[i].end_stream(sid)
                offsets[key] += 1
        p.pump()
        for s in peers:
            while s.accept_stream() is not None:
                pass
        for key in sent:
            if key in eof:
                continue
            i, sid = key
            reader = peers[1 - i]
            if rng.random() < 0.7:
                try:
                    chunk = reader.read(sid, rng.randrange(1, 9000))
                except BlockingIOError:
                    continue
                if chunk:
                    received[key] += chunk
                else:
                    eof.add(key)
        if len(eof) == len(sent):
            break
    assert {k: bytes(v) for k, v in received.items()} == sent
    assert not p.a.closed and not p.b.closed


def _random_chunks(rng: random.Random, n: int) -> list[int]:
    out = []
    while n:
        k = min(n, rng.randrange(1, 3000))
        out.append(k)
        n -= k
    return out


def test_round_robin_between_streams_and_control_first() -> None:
    c = client(max_frame_size=100)
    sids = [c.open_stream() for _ in range(3)]
    for sid in sids:
        c.send(sid, bytes([sid]) * 1000)
    out = parse(c.data_to_send(3 * 8 + 6 * 108, 0))
    assert [(f[1], f[2]) for f in out] == [(SYN, 3), (SYN, 5), (SYN, 7)] + [
        (PSH, 3),
        (PSH, 5),
        (PSH, 7),
    ] * 2
    late = c.open_stream()  # its SYN overtakes the queued data
    c.end_stream(sids[0])  # but a FIN never overtakes its stream's data
    out = parse(c.data_to_send(8 + 3 * 108, 0))
    assert [(f[1], f[2]) for f in out] == [(SYN, late), (PSH, 3), (PSH, 5), (PSH, 7)]
    rest = parse(c.data_to_send(1 << 20, 0))
    fin_at = rest.index((2, FIN, 3, b""))
    assert all(f[2] != 3 for f in rest[fin_at + 1 :])
    assert sum(len(f[3]) for f in rest if f[2] == 3) == 1000 - 300


def test_frames_respect_max_frame_size_and_pull_size() -> None:
    c = client(max_frame_size=1000)
    sid = c.open_stream()
    c.send(sid, b"q" * 5000)
    assert c.data_to_send(7, 0) == b""  # not even the SYN fits
    out = c.data_to_send(8 + 8 + 10, 0)
    assert parse(out) == [(2, SYN, 3, b""), (2, PSH, 3, b"q" * 10)]
    frames = parse(c.data_to_send(1 << 20, 0))
    assert [len(f[3]) for f in frames] == [1000] * 4 + [990]


def test_stopped_reader_does_not_stall_other_streams_v2() -> None:
    p = Pipe(capacity=32768)
    stuck = p.a.open_stream()
    flowing = p.a.open_stream()
    p.pump()
    assert p.b.accept_stream() == stuck
    assert p.b.accept_stream() == flowing
    blob = bytes(range(256)) * 4096  # 1 MiB per round
    got = bytearray()
    for _ in range(8):
        p.a.send(stuck, blob)  # never read
        off = 0
        while off < len(blob):
            off += p.a.send(flowing, blob[off:])
            p.pump()
            got += read_all(p.b, flowing)
    p.pump()
    got += read_all(p.b, flowing)
    assert bytes(got) == blob * 8
    info = p.b.stream_info(stuck)
    assert info is not None
    assert info.recv_buffered == INITIAL_PEER_WINDOW  # its window, no more
    assert p.a.stream_info(stuck).send_window == 0  # type: ignore[union-attr]
    assert read_all(p.b, stuck) == (blob * 8)[:INITIAL_PEER_WINDOW]


def test_session_pool_bounds_memory_and_every_stream_keeps_a_window() -> None:
    kb = 1024
    p = Pipe(capacity=16 * kb, stream_buffer=64 * kb, session_buffer=128 * kb)
    sids = [p.a.open_stream() for _ in range(5)]
    p.pump()  # SYNs and the initial UPDs settle before any data
    for _ in sids:
        p.b.accept_stream()
    windows = [p.b.stream_info(s).recv_window for s in sids]  # type: ignore[union-attr]
    assert windows == [64 * kb, 64 * kb, MIN_WINDOW, MIN_WINDOW, MIN_WINDOW]
    blob = b"m" * (400 * kb)
    for s in sids:
        p.a.send(s, blob[: 64 * kb])
    got = bytearray()
    off = 0
    while len(got) < len(blob):  # only the last stream's reader works
        if off < len(blob):
            off += p.a.send(sids[-1], blob[off : off + 32 * kb])
        p.pump()
        got += read_all(p.b, sids[-1])
        assert p.b.recv_buffered <= 128 * kb + 5 * MIN_WINDOW
    assert len(got) == len(blob)
    assert p.b.recv_buffered == 64 * kb * 2 + MIN_WINDOW * 2


def test_window_grows_for_a_reader_that_keeps_up() -> None:
    p = Pipe(capacity=1 << 20)
    sid = p.a.open_stream()
    p.pump()
    b = p.b.accept_stream()
    assert b is not None
    assert p.b.stream_info(b).recv_window == INITIAL_PEER_WINDOW  # type: ignore[union-attr]
    blob = b"g" * (6 << 20)
    off = total = 0
    while total < len(blob):
        off += p.a.send(sid, blob[off:])
        p.pump()
        total += len(read_all(p.b, b))
        assert p.b.stream_info(b).recv_window <= p.b.stream_buffer  # type: ignore[union-attr]
    p.pump()
    # It grew from 256 KiB towards the 1 MiB stream buffer; the last quarter of the
    # bytes read is not reported yet (an UPD goes out once half a window is read).
    window = p.a.stream_info(sid).send_window  # type: ignore[union-attr]
    assert window == p.b.stream_info(b).recv_window == 786432  # type: ignore[union-attr]


def test_v1_shares_one_session_buffer_and_backpressures_the_channel() -> None:
    p = Pipe(capacity=8192, version=1, stream_buffer=4096, session_buffer=16384)
    x = p.a.open_stream()
    y = p.a.open_stream()
    p.pump()
    for _ in range(40):
        p.a.send(x, b"x" * 4096)
        p.pump()
        assert p.b.recv_buffered <= 16384
    assert p.b.receive_capacity() == 0
    assert p.b.recv_buffered == 16384
    p.a.send(y, b"y" * 100)
    p.pump()
    with pytest.raises(BlockingIOError):  # v1 head-of-line blocking: the protocol's limit
        p.b.read(y)
    assert len(read_all(p.b, x)) == 16384  # reading frees the session buffer...
    p.pump()
    assert p.b.recv_buffered <= 16384
    drained = 16384
    while True:
        drained += len(read_all(p.b, x))
        p.pump()
        try:
            assert p.b.read(y) == b"y" * 100  # ...and the other stream's bytes come through
            break
        except BlockingIOError:
            continue
    assert drained <= 40 * 4096


# ---------------------------------------------------------------------------
# Half-close, reset, teardown
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("first", ["opener", "acceptor"])
def test_half_close_either_order(first: str) -> None:
    p = Pipe()
    a_sid = p.a.open_stream()
    p.a.send(a_sid, b"request")
    p.pump()
    b_sid = p.b.accept_stream()
    assert b_sid == a_sid
    one, two = (p.a, p.b) if first == "opener" else (p.b, p.a)
    one.end_stream(a_sid)
    one.end_stream(a_sid)  # harmless twice
    with pytest.raises(ClosedError):
        one.send(a_sid, b"more")
    p.pump()
    assert StreamEnded(a_sid) in p.events[two]
    assert two.stream_info(a_sid).state is StreamState.REMOTE_CLOSED  # type: ignore[union-attr]
    # the other direction keeps working after the FIN
    assert two.send(a_sid, b"reply after your FIN") == 20
    p.pump()
    assert read_all(one, a_sid) == (b"request" if one is p.b else b"") + b"reply after your FIN"
    assert read_all(two, a_sid) == (b"request" if two is p.b else b"")
    assert two.read(a_sid) == b""  # EOF
    two.end_stream(a_sid)
    p.pump()
    assert one.read(a_sid) == b""
    assert p.a.stream_ids() == [] and p.b.stream_ids() == []  # all released
    with pytest.raises(ClosedError):
        p.a.read(a_sid)
    for s in (p.a, p.b):  # ending or closing again is harmless
        s.end_stream(a_sid)
        s.close_stream(a_sid)
        s.reset_stream(a_sid)
    assert not p.a.has_output() and not p.b.has_output()


def test_reset_with_extensions_peer_sees_reset() -> None:
    p = Pipe(extensions=True)
    sid = p.a.open_stream()
    p.a.send(sid, b"partial")
    p.pump()
    assert p.b.accept_stream() == sid
    p.b.send(sid, b"x" * 100000)
    p.a.reset_stream(sid)
    with pytest.raises(ClosedError):
        p.a.read(sid)  # gone for the application at once
    assert p.a.stream_ids() == [sid]  # the slot is freed once the RST is out
    p.pump()
    assert p.a.stream_ids() == []
    assert StreamReset(sid, refused=False) in p.events[p.b]
    assert p.b.stream_info(sid).state is StreamState.RESET  # type: ignore[union-attr]
    assert p.b.stream_info(sid).send_buffered == 0  # type: ignore[union-attr]
    with pytest.raises(ConnectionReset):
        p.b.read(sid)
    assert p.b.stream_ids() == []  # the application learned: released
    with pytest.raises(ClosedError):
        p.b.send(sid, b"x")
    assert p.a.stats.resets_sent == 1 and p.b.stats.resets_received == 1


def test_reset_without_extensions_is_fin_and_forget() -> None:
    p = Pipe()
    sid = p.a.open_stream()
    p.a.send(sid, b"partial")
    p.pump()
    assert p.b.accept_stream() == sid
    p.a.send(sid, b"z" * 100000)  # discarded by the reset
    p.a.reset_stream(sid)
    p.pump()
    assert read_all(p.b, sid) == b"partial"
    assert p.b.read(sid) == b""  # a smux peer just sees EOF
    p.b.send(sid, b"into the void")
    p.pump()
    assert p.a.stats.frames_dropped == 1
    assert not p.a.closed and not p.b.closed


def test_reset_before_syn_left_sends_nothing() -> None:
    for ext in (False, True):
        c = client(extensions=ext)
        sid = c.open_stream()
        c.send(sid, b"never sent")
        c.reset_stream(sid)
        assert not c.has_output()
        assert c.data_to_send(1000, 0) == b""
        assert c.stream_ids() == []


def test_reset_stream_in_backlog_vanishes_quietly() -> None:
    s = server(extensions=True)
    s.receive_data(frame(2, SYN, 3) + frame(2, PSH, 3, b"hi") + frame(2, RST, 3, b"\0" * 4), 0)
    assert events(s) == []  # it never reached the application
    assert s.accept_stream() is None
    assert s.stream_ids() == []


def test_close_stream_drains_output_then_forgets() -> None:
    p = Pipe(capacity=1000)
    sid = p.a.open_stream()
    p.a.send(sid, b"w" * 50000)
    p.a.close_stream(sid)
    p.a.close_stream(sid)  # harmless twice
    with pytest.raises(ClosedError):
        p.a.read(sid)  # gone for the application at once...
    assert p.a.stream_ids() == [sid]  # ...but its bytes still go out
    p.ab.pump(p.now, p.chunker, limit=500)
    assert p.b.accept_stream() == sid
    p.b.send(sid, b"reply nobody reads")
    p.pump()
    assert read_all(p.b, sid) == b"w" * 50000
    assert p.b.read(sid) == b""
    assert p.a.stream_ids() == []
    assert p.a.stats.frames_dropped == 1


def test_session_close_is_idempotent_and_final() -> None:
    c = client()
    sid = c.open_stream()
    c.close()
    c.close()
    assert events(c) == [SessionClosed(None)]
    for call in (c.open_stream, c.accept_stream, lambda: c.read(sid), lambda: c.send(sid, b"x")):
        with pytest.raises(ClosedError):
            call()
    c.reset_stream(sid)
    c.close_stream(sid)
    assert c.data_to_send(1000, 0) == b""
    assert not c.has_output()
    assert c.get_timer() is None
    c.receive_data(frame(2, SYN, 2), 0)
    assert events(c) == []


def test_close_with_channel_error_reports_it() -> None:
    c = client()
    sid = c.open_stream()
    err = DeadPeerError("the ARQ gave up")
    c.close(err)
    assert events(c) == [SessionClosed(err)]
    with pytest.raises(DeadPeerError):
        c.read(sid)


# ---------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [False, True])
def test_max_streams_refuses_cleanly(ext: bool) -> None:
    p = Pipe(client(extensions=ext), server(extensions=ext, max_streams=2))
    sids = [p.a.open_stream() for _ in range(3)]
    for sid in sids:
        p.a.send(sid, b"hello")
    p.pump()
    assert p.b.stats.streams_refused == 1
    assert [p.b.accept_stream() for _ in range(3)] == [3, 5, None]
    if ext:
        assert StreamReset(7, refused=True) in p.events[p.a]
        with pytest.raises(ConnectionRefused):
            p.a.read(7)
    else:
        assert StreamEnded(7) in p.events[p.a]
        assert p.a.read(7) == b""
    assert p.b.stats.frames_dropped == 1  # the refused stream's data
    assert not p.a.closed and not p.b.closed


def test_backlog_limit_refuses_until_the_application_accepts() -> None:
    p = Pipe(client(), server(stream_backlog=2))
    for _ in range(3):
        p.a.open_stream()
    p.pump()
    assert p.b.stats.streams_refused == 1
    assert p.b.accept_stream() == 3
    p.a.open_stream()
    p.pump()
    assert p.b.stats.streams_refused == 1
    assert [p.b.accept_stream() for _ in range(3)] == [5, 9, None]


def test_local_limits_raise() -> None:
    c = client(max_streams=2)
    c.open_stream()
    c.open_stream()
    with pytest.raises(ConnectionRefused, match="max_streams=2"):
        c.open_stream()


@pytest.mark.parametrize(("is_client", "last"), [(True, 0xFFFFFFFF), (False, 0xFFFFFFFE)])
def test_stream_id_exhaustion_refuses_new_streams(is_client: bool, last: int) -> None:
    s = client() if is_client else server()
    s._last_local_id = last - 2  # white box: walking 2**31 ids is not a unit test
    assert s.open_stream() == last
    with pytest.raises(ConnectionRefused, match="exhausted"):
        s.open_stream()
    assert not s.closed


def test_refusals_cannot_pile_up_while_nothing_is_pulled() -> None:
    s = server(max_streams=2)
    s.receive_data(b"".join(frame(2, SYN, 2 * i + 3) for i in range(4)), 0)
    assert not s.closed  # 2 accepted, 2 refusals queued
    s.receive_data(frame(2, SYN, 11), 0)
    assert "beyond our limits" in str(s.error)


@pytest.mark.parametrize("how", ["close_stream", "reset_stream"])
def test_closing_frames_keep_the_slot_so_the_control_queue_is_bounded(how: str) -> None:
    c = client(max_streams=4, extensions=True)
    sids = [c.open_stream() for _ in range(4)]
    assert len(c.data_to_send(4 * 8, 0)) == 32  # the SYNs leave; then the channel is stuck
    for sid in sids:
        getattr(c, how)(sid)
        getattr(c, how)(sid)  # twice is harmless
    with pytest.raises(ConnectionRefused):  # the FINs/RSTs are still queued
        c.open_stream()
    frames = parse(c.data_to_send(1 << 20, 0))
    assert [cmd for _, cmd, _, _ in frames] == [FIN if how == "close_stream" else RST] * 4
    assert c.stream_ids() == []
    c.open_stream()


def test_send_buffer_is_bounded_and_writable_follows() -> None:
    c = client(stream_buffer=4096, session_buffer=4096)
    sid = c.open_stream()
    assert c.send(sid, b"a" * 10000) == 4096
    assert c.send(sid, b"b") == 0
    c.data_to_send(8 + 16 + 8 + 1000, 0)  # SYN, UPD, 1000 bytes
    assert c.stream_info(sid).send_buffered == 3096  # type: ignore[union-attr]
    assert events(c) == []  # still more than half full
    c.data_to_send(8 + 1048, 0)
    assert events(c) == [StreamWritable(sid)]
    assert c.send(sid, b"c" * 10000) == 2048


# ---------------------------------------------------------------------------
# Keepalive and idle timeout
# ---------------------------------------------------------------------------


def test_idle_session_sends_keepalives_and_stays_up() -> None:
    p = Pipe(keepalive=1000, idle_timeout=3000)
    p.advance(10_000)
    assert p.a.stats.keepalives_sent == 10 and p.b.stats.keepalives_sent == 10
    assert not p.a.closed and not p.b.closed


def test_keepalive_only_when_nothing_else_was_sent() -> None:
    p = Pipe(keepalive=1000, idle_timeout=3000)
    sid = p.a.open_stream()
    for t in range(0, 5000, 500):
        p.now = t
        p.a.send(sid, b"tick")
        p.advance(0)
    assert p.a.stats.keepalives_sent == 0
    assert p.b.stats.keepalives_sent == 4


def test_silent_peer_times_out() -> None:
    a = client(keepalive=1000, idle_timeout=3000)
    b = server(keepalive=None, idle_timeout=None)
    p = Pipe(a, b)
    assert b.get_timer() is None
    p.advance(2999)
    assert not a.closed
    p.advance(1)
    assert isinstance(a.error, DeadPeerError)
    assert isinstance(p.closed_event(a).error, DeadPeerError)  # type: ignore[union-attr]
    assert a.get_timer() is None


def test_slow_reader_v2_never_times_out() -> None:
    p = Pipe(capacity=8192, keepalive=1000, idle_timeout=3000)
    sid = p.a.open_stream()
    blob = b"s" * (3 << 20)
    off = p.a.send(sid, blob)
    p.pump()
    p.b.accept_stream()
    got = bytearray()
    for _ in range(60):  # a minute of a reader that reads a little every 10 s
        p.advance(10_000, step=500)
        got += p.b.read(sid, 4096)
        off += p.a.send(sid, blob[off:])
    assert not p.a.closed and not p.b.closed
    p.advance(0)
    while len(got) < len(blob):
        off += p.a.send(sid, blob[off:])
        p.pump()
        got += read_all(p.b, sid)
    assert got == blob


def test_slow_reader_v1_backpressure_is_not_a_dead_peer() -> None:
    p = Pipe(
        capacity=8192,
        version=1,
        stream_buffer=16384,
        session_buffer=16384,
        keepalive=1000,
        idle_timeout=3000,
    )
    sid = p.a.open_stream()
    blob = b"v" * (10 * 16384)
    off = 0
    for _ in range(3):
        off += p.a.send(sid, blob[off:])
        p.pump()
    assert p.b.receive_capacity() == 0  # b holds a's frames (and its NOPs) back
    assert p.ab.in_flight
    p.advance(60_000, step=700)
    assert not p.a.closed and not p.b.closed
    total = 0
    while total < len(blob):
        total += len(read_all(p.b, sid))
        off += p.a.send(sid, blob[off:])
        p.pump()
    assert total == len(blob)


def test_v1_backpressure_lifted_just_before_the_deadline_is_not_silence() -> None:
    p = Pipe(capacity=8192, version=1, stream_buffer=4096, session_buffer=4096)
    sid = p.a.open_stream()
    p.a.send(sid, b"k" * 4096)
    p.pump()
    p.a.send(sid, b"k" * 4096)
    p.pump()
    assert p.b.receive_capacity() == 0
    p.b.read(sid)  # at t=29999 the reader catches up; no channel byte arrived since t=0
    p.b.handle_timer(30000)  # the transport has not fed it yet: still no timeout
    assert not p.b.closed
    p.pump()
    assert p.b.read(sid) == b"k" * 4096


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


def test_from_config_maps_seconds_to_ms() -> None:
    cfg = Configuration(smux_version=1, stream_buffer=65536, keepalive=2.5, idle_timeout=7.0)
    s = Session.from_config(cfg, client=True, now=5, extensions=True)
    assert (s.version, s.stream_buffer, s.keepalive, s.idle_timeout) == (1, 65536, 2500, 7000)
    assert s.extensions and s.client
    assert s.get_timer() == 2505


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"version": 3}, "version"),
        ({"version": True}, "version"),
        ({"max_frame_size": 0}, "max_frame_size"),
        ({"max_frame_size": 65536}, "max_frame_size"),
        ({"stream_buffer": 100}, "stream_buffer"),
        ({"session_buffer": 1 << 19}, "session_buffer"),
        ({"max_streams": 0}, "max_streams"),
        ({"stream_backlog": 0}, "stream_backlog"),
        ({"keepalive": 0}, "keepalive"),
        ({"keepalive": 5000, "idle_timeout": 4000}, "idle_timeout"),
        ({"extensions": 1}, "extensions"),
    ],
)
def test_bad_configuration_names_the_field(kw: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        client(**kw)


def test_read_argument_checked() -> None:
    c = client()
    sid = c.open_stream()
    with pytest.raises(ValueError, match="max_bytes"):
        c.read(sid, 0)
    with pytest.raises(BlockingIOError):
        c.read(sid)


def test_events_are_coalesced_and_bounded() -> None:
    s = server()
    s.receive_data(frame(2, SYN, 3), 0)
    for _ in range(100):
        s.receive_data(frame(2, PSH, 3, b"d"), 0)
    assert events(s) == [StreamOpened(3), StreamReadable(3)]
    s.receive_data(frame(2, PSH, 3, b"d"), 0)
    assert events(s) == []  # not read since: no new wake-up
    s.read(3)
    s.receive_data(frame(2, PSH, 3, b"d"), 0)
    assert events(s) == [StreamReadable(3)]


def test_deterministic_bytes() -> None:
    def run() -> tuple[bytes, bytes]:
        rng = random.Random(7)
        p = Pipe(capacity=5000)
        log_a = bytearray()
        for _ in range(50):
            sid = p.a.open_stream()
            p.a.send(sid, rng.randbytes(rng.randrange(10000)))
            if rng.random() < 0.5:
                p.a.end_stream(sid)
            log_a += p.a.data_to_send(rng.randrange(100, 5000), 0)
        return bytes(log_a), p.a.data_to_send(1 << 30, 0)

    assert run() == run()
