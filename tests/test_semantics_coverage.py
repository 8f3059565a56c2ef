"""Every line of ``shared/reference/stream-semantics.md`` has tests, for both APIs.

:data:`COVERAGE` names, per section and line (in our own short words, in the
reference's order), the tests that check it for the asyncio API and for the
blocking API. The tests below fail when a named test disappears, and, when
the reference is at hand (it lives beside the repository, not in it), when
the number of lines per section no longer matches.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "stream-semantics.md"

A = "test_asyncio"
S = "test_semantics"
B = "test_sync"
BS = "test_sync_streams"

#: section → [(line, {"asyncio": [module::test], "sync": [module::test]})]
COVERAGE: dict[str, list[tuple[str, dict[str, list[str]]]]] = {
    "Connecting": [
        (
            "refused fast on a reset, timeout on silence, a connect timeout always exists",
            {
                "asyncio": [
                    f"{A}::test_connect_where_nothing_listens_is_refused_fast",
                    f"{A}::test_connect_to_a_silent_peer_times_out",
                ],
                "sync": [
                    f"{B}::test_connect_where_nothing_listens_is_refused_fast",
                    f"{B}::test_connect_to_a_silent_peer_times_out",
                    f"{B}::test_connect_timeout_argument_becomes_the_connections_timeout",
                ],
            },
        ),
        (
            "a full accept queue refuses, never half-works; the backlog is configurable",
            {
                "asyncio": [
                    f"{S}::test_an_application_accept_queue_refuses_clients_while_full",
                    f"{S}::test_configured_backlog_refuses_handshakes_beyond_it",
                ],
                "sync": [f"{B}::test_full_accept_queue_refuses_new_clients_cleanly"],
            },
        ),
        (
            "many clients on one server port",
            {
                "asyncio": [f"{A}::test_many_clients_on_one_server_port"],
                "sync": [f"{B}::test_many_clients_on_one_server_port"],
            },
        ),
    ],
    "Reading": [
        (
            "a read with no data waits (blocking: or times out, consuming nothing)",
            {
                "asyncio": [f"{A}::test_read_waits_for_data_and_a_timed_out_read_loses_nothing"],
                "sync": [
                    f"{B}::test_read_blocks_and_a_timed_out_read_loses_nothing",
                    f"{B}::test_the_timeout_covers_waiting_for_the_clients_first_stream",
                ],
            },
        ),
        (
            "a read returns what is there, up to the size; readexactly waits for n",
            {
                "asyncio": [
                    f"{A}::test_read_returns_what_is_available_and_boundaries_are_not_kept",
                    f"{A}::test_readexactly_readline_and_incomplete_read",
                ],
                "sync": [f"{B}::test_read_returns_what_is_available_and_waitall_waits_for_all"],
            },
        ),
        (
            "no message boundaries in a byte stream; message mode keeps them",
            {
                "asyncio": [
                    f"{S}::test_a_byte_stream_keeps_no_boundaries",
                    f"{S}::test_message_mode_keeps_boundaries",
                ],
                "sync": [
                    f"{B}::test_a_byte_stream_keeps_no_boundaries",
                    f"{B}::test_message_mode_keeps_boundaries",
                ],
            },
        ),
        (
            "after the peer closes: every byte, then EOF, never an error",
            {
                "asyncio": [f"{A}::test_eof_after_peer_close_drains_everything_first"],
                "sync": [f"{B}::test_eof_after_peer_close_drains_everything_first"],
            },
        ),
        (
            "a read timeout loses no data",
            {
                "asyncio": [
                    f"{A}::test_read_waits_for_data_and_a_timed_out_read_loses_nothing",
                    f"{S}::test_a_partial_readexactly_that_times_out_keeps_its_bytes",
                ],
                "sync": [
                    f"{B}::test_read_blocks_and_a_timed_out_read_loses_nothing",
                    f"{B}::test_a_partial_waitall_read_that_times_out_keeps_its_bytes",
                ],
            },
        ),
        (
            "reading on a locally closed connection raises 'closed'",
            {
                "asyncio": [f"{A}::test_read_after_local_close_raises_closed"],
                "sync": [
                    f"{B}::test_read_on_a_locally_closed_connection_raises_closed",
                    f"{B}::test_close_wakes_a_blocked_reader",
                    f"{B}::test_close_racing_a_read_on_its_way_to_the_loop_still_wins",
                ],
            },
        ),
    ],
    "Writing": [
        (
            "writes queue; drain/sendall wait above the limit: bounded memory",
            {
                "asyncio": [
                    f"{A}::test_drain_applies_backpressure_until_the_peer_reads",
                    f"{S}::test_the_smallest_send_buffer_still_moves_data",
                ],
                "sync": [
                    f"{B}::test_sendall_blocks_while_the_peer_does_not_read_and_a_timeout_says_how_much",
                    f"{BS}::test_send_buffers_are_bounded_per_stream",
                ],
            },
        ),
        (
            "when the peer stops reading the writer blocks, and resumes as it reads",
            {
                "asyncio": [f"{A}::test_drain_applies_backpressure_until_the_peer_reads"],
                "sync": [
                    f"{B}::test_sendall_blocks_while_the_peer_does_not_read_and_a_timeout_says_how_much"
                ],
            },
        ),
        (
            "a write timeout: how much went, or all-or-nothing, documented",
            {
                "asyncio": [f"{S}::test_a_timed_out_drain_loses_nothing"],
                "sync": [
                    f"{B}::test_sendall_blocks_while_the_peer_does_not_read_and_a_timeout_says_how_much",
                    f"{B}::test_send_returns_how_much_it_took_and_non_blocking_send_says_when_full",
                ],
            },
        ),
        (
            "concurrent writers never interleave within one call",
            {
                "asyncio": [f"{A}::test_concurrent_writers_never_interleave_within_a_write"],
                "sync": [f"{B}::test_concurrent_threads_never_interleave_bytes_within_one_call"],
            },
        ),
        (
            "writing after the peer went away fails clearly; after a local close at once",
            {
                "asyncio": [
                    f"{A}::test_write_after_peer_reset_fails_clearly",
                    f"{A}::test_read_after_local_close_raises_closed",
                    f"{S}::test_a_vanished_peer_fails_pending_writes_too",
                ],
                "sync": [
                    f"{B}::test_write_after_peer_reset_fails_clearly_and_after_local_close_at_once"
                ],
            },
        ),
        (
            "write_eof / shutdown(SHUT_WR) half-closes",
            {
                "asyncio": [f"{A}::test_write_eof_half_closes"],
                "sync": [
                    f"{B}::test_shutdown_wr_half_closes_and_the_other_direction_keeps_working",
                    f"{B}::test_shutdown_rd_ends_reads_and_wakes_a_blocked_reader",
                ],
            },
        ),
    ],
    "Closing": [
        (
            "a graceful close delivers everything, then EOF",
            {
                "asyncio": [f"{A}::test_eof_after_peer_close_drains_everything_first"],
                "sync": [f"{B}::test_graceful_close_delivers_everything_then_eof"],
            },
        ),
        (
            "an abort discards queued data; the peer sees a reset",
            {
                "asyncio": [f"{A}::test_write_after_peer_reset_fails_clearly"],
                "sync": [f"{B}::test_abort_discards_queued_data_and_the_peer_sees_a_reset"],
            },
        ),
        (
            "a vanished peer is detected in bounded time; pending reads and writes fail",
            {
                "asyncio": [
                    f"{A}::test_vanished_peer_is_detected_in_bounded_time",
                    f"{S}::test_a_vanished_peer_fails_pending_writes_too",
                ],
                "sync": [f"{B}::test_vanished_peer_fails_pending_reads_and_writes_in_bounded_time"],
            },
        ),
        (
            "closing twice is harmless; everything is released after close",
            {
                "asyncio": [
                    f"{A}::test_close_twice_is_harmless_and_releases_everything",
                    f"{A}::test_server_close_resets_clients_and_wait_closed_returns",
                ],
                "sync": [
                    f"{B}::test_close_twice_is_harmless_and_releases_everything",
                    f"{B}::test_server_close_resets_its_connections_and_wakes_accept",
                ],
            },
        ),
    ],
    "Many streams on one session": [
        (
            "a slow or stopped reader does not delay the other streams",
            {
                "asyncio": [f"{S}::test_a_stopped_reader_does_not_delay_the_other_streams"],
                "sync": [f"{BS}::test_a_stopped_reader_does_not_delay_the_other_streams"],
            },
        ),
        (
            "opening a stream needs no round trip",
            {
                "asyncio": [f"{S}::test_opening_a_stream_needs_no_round_trip"],
                "sync": [f"{BS}::test_opening_a_stream_needs_no_round_trip"],
            },
        ),
        (
            "stream ids never collide; running out of ids refuses cleanly",
            {
                "asyncio": [
                    f"{S}::test_stream_ids_never_collide_between_the_two_sides",
                    f"{S}::test_a_session_out_of_stream_ids_refuses_new_streams_cleanly",
                ],
                "sync": [
                    f"{BS}::test_stream_ids_never_collide_between_the_two_sides",
                    f"{BS}::test_a_session_out_of_stream_ids_refuses_new_streams_cleanly",
                ],
            },
        ),
        (
            "streams and their buffers are bounded per session",
            {
                "asyncio": [
                    f"{S}::test_streams_per_session_are_bounded_on_both_sides",
                    f"{S}::test_receive_buffers_are_bounded_per_session",
                ],
                "sync": [
                    f"{BS}::test_streams_per_session_are_bounded_on_both_sides",
                    f"{BS}::test_send_buffers_are_bounded_per_stream",
                ],
            },
        ),
        (
            "a handler may call any API from a callback, even on its own session",
            {
                "asyncio": [
                    f"{S}::test_handlers_may_use_any_api_on_their_own_session_without_deadlock"
                ],
                "sync": [
                    f"{BS}::test_handlers_may_use_any_api_on_their_own_session_without_deadlock",
                    f"{BS}::test_blocking_calls_from_a_loop_callback_fail_fast_instead_of_deadlocking",
                ],
            },
        ),
        (
            "thousands of idle sessions cost nothing until a timer is due; close cancels",
            {
                "asyncio": [
                    f"{S}::test_thousands_of_idle_sessions_cost_nothing_until_a_timer_is_due"
                ],
                "sync": [
                    f"{BS}::test_thousands_of_idle_sessions_cost_nothing_until_a_timer_is_due"
                ],
            },
        ),
    ],
}


def _entries() -> list[tuple[str, str, str, str]]:
    return [
        (section, line, api, test)
        for section, lines in COVERAGE.items()
        for line, tests in lines
        for api, names in tests.items()
        for test in names
    ]


@pytest.mark.parametrize(("section", "line", "api", "test"), _entries())
def test_each_named_test_exists(section: str, line: str, api: str, test: str) -> None:
    module_name, name = test.split("::")
    module = importlib.import_module(module_name)
    assert callable(getattr(module, name, None)), f"{section} / {line} ({api}): {test} is gone"


def test_every_line_has_tests_for_both_apis() -> None:
    for section, lines in COVERAGE.items():
        for line, tests in lines:
            assert tests.get("asyncio") and tests.get("sync"), f"{section} / {line}"


def test_one_entry_per_line_of_the_reference() -> None:
    if not REFERENCE.exists():
        pytest.skip(f"the reference is not beside this checkout ({REFERENCE})")
    counts: dict[str, int] = {}
    section = None
    for text in REFERENCE.read_text().splitlines():
        if match := re.match(r"## (.+)", text):
            section = match.group(1).strip()
            counts[section] = 0
        elif text.startswith("- ") and section is not None:
            counts[section] += 1
    assert counts == {section: len(lines) for section, lines in COVERAGE.items()}
