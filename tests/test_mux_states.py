"""The stream state table, checked for every (state, input) pair.

Each case builds a stream in the given state through the real API and real
frames (a peer-opened stream with 2 unread bytes in and 3 unsent bytes out),
applies the input, and checks both the next state the table names and the
observable effect of the action it names.
"""

from __future__ import annotations

import itertools

import pytest
from test_mux_support import frame, upd_body

from rudp.errors import ClosedError, ConnectionReset
from rudp.mux import (
    TRANSITIONS,
    Action,
    Session,
    StreamEnded,
    StreamInput,
    StreamReset,
    StreamState,
)

SID = 3
SYN, FIN, PSH, UPD, RST = 0, 1, 2, 4, 0x80
S = StreamState
I = StreamInput  # noqa: E741


# The table as the design says it must be, written out independently of rudp.mux:
# one row per state, one column per input; "ACTION>STATE" when the state changes.
EXPECTED = """
state          send         read        end_stream           reset_stream  close_stream    PSH      FIN          RST              UPD
open           WRITE        READ        QUEUE_FIN>local-closed  ABORT>reset ABANDON>closed  DELIVER  EOF>remote-closed  PEER_RESET>reset UPDATE_WINDOW
local-closed   FAIL_CLOSED  READ        IGNORE               ABORT>reset   ABANDON>closed  DELIVER  EOF>closed   PEER_RESET>reset UPDATE_WINDOW
remote-closed  WRITE        READ        QUEUE_FIN>closed     ABORT>reset   ABANDON>closed  DROP     IGNORE       PEER_RESET>reset UPDATE_WINDOW
closed         FAIL_CLOSED  READ        IGNORE               ABORT>reset   ABANDON         DROP     IGNORE       PEER_RESET>reset UPDATE_WINDOW
reset          FAIL_RESET   FAIL_RESET  IGNORE               RELEASE       RELEASE         DROP     DROP         IGNORE           DROP
"""


def expected_table() -> dict[tuple[StreamState, StreamInput], tuple[StreamState, Action]]:
    rows = [line.split() for line in EXPECTED.strip().splitlines()]
    inputs = [StreamInput(name) for name in rows[0][1:]]
    table = {}
    for row in rows[1:]:
        state = StreamState(row[0])
        for inp, cell in zip(inputs, row[1:], strict=True):
            action, _, nxt = cell.partition(">")
            table[(state, inp)] = (StreamState(nxt) if nxt else state, Action[action])
    return table


def test_table_matches_the_design() -> None:
    assert expected_table() == TRANSITIONS


def test_table_is_total() -> None:
    assert set(TRANSITIONS) == set(itertools.product(StreamState, StreamInput))
    used = {action for _, action in TRANSITIONS.values()}
    assert used == set(Action)  # no action is dead


def parse(data: bytes) -> list[tuple[int, int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        length = int.from_bytes(data[pos + 2 : pos + 4], "little")
        sid = int.from_bytes(data[pos + 4 : pos + 8], "little")
        out.append((data[pos + 1], sid, data[pos + 8 : pos + 8 + length]))
        pos += 8 + length
    return out


def make(state: StreamState) -> Session:
    s = Session(client=False, now=0, extensions=True)
    s.receive_data(frame(2, SYN, SID) + frame(2, PSH, SID, b"in"), 0)
    assert s.accept_stream() == SID
    assert s.send(SID, b"out") == 3
    if state in (S.LOCAL_CLOSED, S.CLOSED):
        s.end_stream(SID)
    if state in (S.REMOTE_CLOSED, S.CLOSED):
        s.receive_data(frame(2, FIN, SID), 0)
    if state is S.RESET:
        s.receive_data(frame(2, RST, SID, b"\0\0\0\0"), 0)
    while s.next_event() is not None:
        pass
    info = s.stream_info(SID)
    assert info is not None and info.state is state
    return s


def apply(s: Session, inp: StreamInput) -> object:
    """Run the input; its return value, or the exception it raised."""
    calls = {
        I.SEND: lambda: s.send(SID, b"more"),
        I.READ: lambda: s.read(SID),
        I.END: lambda: s.end_stream(SID),
        I.RESET: lambda: s.reset_stream(SID),
        I.CLOSE: lambda: s.close_stream(SID),
        I.RECV_DATA: lambda: s.receive_data(frame(2, PSH, SID, b"new"), 0),
        I.RECV_FIN: lambda: s.receive_data(frame(2, FIN, SID), 0),
        I.RECV_RST: lambda: s.receive_data(frame(2, RST, SID, b"\0\0\0\0"), 0),
        I.RECV_UPD: lambda: s.receive_data(frame(2, UPD, SID, upd_body(0, 300000)), 0),
    }
    try:
        return calls[inp]()
    except Exception as exc:
        return exc


@pytest.mark.parametrize(
    ("state", "inp"),
    sorted(TRANSITIONS, key=lambda k: (list(S).index(k[0]), list(I).index(k[1]))),
    ids=lambda v: v.value,
)
def test_every_state_and_input(state: StreamState, inp: StreamInput) -> None:
    next_state, action = TRANSITIONS[(state, inp)]
    s = make(state)
    before = s.stream_info(SID)
    assert before is not None
    dropped = s.stats.frames_dropped
    result = apply(s, inp)
    assert not s.closed, s.error
    after = s.stream_info(SID)
    evs = []
    while (e := s.next_event()) is not None:
        evs.append(e)
    out = parse(s.data_to_send(1 << 20, 0))
    mine = [(cmd, body) for cmd, sid, body in out if sid == SID]
    released = s.stream_info(SID) is None

    if action in (Action.ABORT, Action.RELEASE, Action.FAIL_RESET, Action.ABANDON):
        assert released
    else:
        assert after is not None and after.state is next_state
        assert not released or action is Action.READ

    if action is Action.WRITE:
        assert result == 4
        assert after.send_buffered == before.send_buffered + 4  # type: ignore[union-attr]
        assert (PSH, b"outmore") in mine
    elif action is Action.READ:
        assert result == b"in"
    elif action is Action.QUEUE_FIN:
        assert [cmd for cmd, _ in mine][-1] == FIN
        assert mine.count((FIN, b"")) == 1
        assert mine.index((PSH, b"out")) < mine.index((FIN, b""))
    elif action is Action.ABORT:
        assert (RST, b"\0\0\0\0") in mine
        assert all(cmd != PSH for cmd, _ in mine)  # unsent data discarded
        assert isinstance(apply(s, I.READ), ClosedError)
    elif action is Action.ABANDON:
        assert isinstance(apply(s, I.READ), ClosedError)
        assert mine.count((FIN, b"")) == 1
        assert mine.index((PSH, b"out")) < mine.index((FIN, b""))
        s.receive_data(frame(2, PSH, SID, b"late"), 0)
        assert s.stats.frames_dropped == dropped + 1
    elif action is Action.DELIVER:
        assert after.recv_buffered == before.recv_buffered + 3  # type: ignore[union-attr]
    elif action is Action.EOF:
        assert StreamEnded(SID) in evs
        assert after.eof_received  # type: ignore[union-attr]
        assert s.read(SID) == b"in"
        assert s.read(SID) == b""
    elif action is Action.PEER_RESET:
        assert StreamReset(SID, refused=False) in evs
        assert after.recv_buffered == after.send_buffered == 0  # type: ignore[union-attr]
        assert all(cmd != PSH for cmd, _ in mine)
        assert isinstance(apply(s, I.READ), ConnectionReset)
    elif action is Action.UPDATE_WINDOW:
        assert after.send_window == 300000 - 0  # type: ignore[union-attr]
    elif action is Action.DROP:
        assert s.stats.frames_dropped == dropped + 1
        assert after == before
    elif action is Action.IGNORE:
        assert after == before
        assert evs == []
    elif action is Action.FAIL_CLOSED:
        assert isinstance(result, ClosedError)
        assert after == before
    elif action is Action.FAIL_RESET:
        assert isinstance(result, ConnectionReset)
        assert isinstance(apply(s, inp), ClosedError)  # told once, then forgotten
    elif action is Action.RELEASE:
        assert mine == []
    else:  # pragma: no cover
        raise AssertionError(f"no check for {action}")
