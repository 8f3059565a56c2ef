"""``rudp bench``: a real (tiny) run for the report's shape, and the pure parts exactly.

No timing assertions: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

import rudp
from rudp import bench, udp


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("-v", "--verbose", action="count", default=0)
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def rudp_api_available() -> bool:
    return hasattr(rudp, "open_connection") and hasattr(rudp, "start_server")


TINY = ["--size", "2M", "--duration", "5s", "--samples", "50", "--json"]


def test_smoke_json_report(capsys):
    assert bench.run(parse(TINY)) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["errors"] == []
    assert report["params"]["size"] == 2 * 1024 * 1024
    assert report["params"]["datagram_size"] == rudp.Configuration().mtu
    expected_bulk = {"udp-sendto", "tcp"}
    if udp.native_available():
        expected_bulk |= {"udp-sendmmsg", "udp-gso"}
    if rudp_api_available():
        expected_bulk.add("rudp")
    else:
        assert "bulk/rudp" in report["skipped"] and "echo/rudp" in report["skipped"]
    assert set(report["bulk"]) == expected_bulk
    for name, row in report["bulk"].items():
        assert row["goodput_mb_s"] > 0, name
        assert row["received_bytes"] > 0, name
        assert row["cpu_s"] >= 0 and row["cpu_s_per_gb"] is not None, name
        assert 0 <= row["loss"] <= 1, name
    assert report["bulk"]["tcp"]["received_bytes"] == 2 * 1024 * 1024  # reliable: all of it
    assert set(report["echo"]) == (
        {"udp", "tcp", "rudp"} if rudp_api_available() else {"udp", "tcp"}
    )
    for name, row in report["echo"].items():
        assert row["samples"] + row["lost"] == 50, name
        assert 0 < row["p50_us"] <= row["p99_us"], name
    assert report["ratios"]["tcp_goodput_vs_udp"] > 0
    assert report["ratios"]["tcp_echo_p50_vs_udp"] > 0
    assert set(report["io"]) >= {"native", "mmsg", "gso", "gro"}
    assert report["engine"] in ("python", "cython", None)
    assert len(report["load_before"]["loadavg"]) == 3


def test_udp_variants_report_their_io(capsys):
    if not udp.native_available():
        pytest.skip("the batched variants need rudp._udp")
    args = parse([*TINY, "--transports", "udp", "--tests", "bulk"])
    assert bench.run(args) == 0
    bulk = json.loads(capsys.readouterr().out)["bulk"]
    assert bulk["udp-sendto"]["io"]["sender"]["mmsg"] is False
    assert bulk["udp-sendmmsg"]["io"]["sender"]["mmsg"] is True
    assert bulk["udp-sendmmsg"]["io"]["sender"]["gso"] is False
    assert bulk["udp-gso"]["io"]["sender"]["gso"] is True
    for row in bulk.values():  # every blast is received the same (best available) way
        assert row["io"]["receiver"] == bulk["udp-sendto"]["io"]["receiver"]


def test_table_output(capsys):
    args = parse([*TINY[:-1], "--transports", "tcp", "--tests", "echo"])
    assert bench.run(args) == 0
    out = capsys.readouterr().out
    assert "echo latency" in out and "tcp" in out


def test_a_failed_measurement_is_reported_and_exits_1(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("sender_role: boom")

    monkeypatch.setattr(bench, "_bulk", broken)
    args = parse([*TINY, "--transports", "tcp", "--tests", "bulk"])
    assert bench.run(args) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["errors"] == ["bulk/tcp: sender_role: boom"]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--size", "12"], "size"),
        (["--size", "10 parsecs"], "size"),
        (["--duration", "0"], "duration"),
        (["--samples", "1"], "samples"),
        (["--streams", "0"], "streams"),
        (["--idle-time", "0"], "idle time"),
        (["--repeat", "0"], "repeat"),
        (["--mtu", "10"], "mtu"),
    ],
)
def test_bad_options_raise_value_error_naming_them(argv, match):
    with pytest.raises(ValueError, match=match):
        bench.run(parse([*argv, "--json"]))


def test_bad_choices_are_usage_errors():
    with pytest.raises(SystemExit) as exc:
        parse(["--transports", "udp,carrier-pigeon"])
    assert exc.value.code == 2


def test_module_entry_point_exits_2_on_bad_size():
    done = subprocess.run(
        [sys.executable, "-m", "rudp.bench", "--size", "nope"], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "size" in done.stderr


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert bench._percentile(values, 50) == 50
    assert bench._percentile(values, 99) == 99
    assert bench._percentile(values, 100) == 100
    assert bench._percentile([7], 99) == 7
    assert bench._percentile([1, 2, 3], 50) == 2
    with pytest.raises(ValueError):
        bench._percentile([], 50)


def test_ratios_and_targets():
    report = {
        "bulk": {
            "udp-sendto": {"goodput_mb_s": 200.0},
            "tcp": {"goodput_mb_s": 400.0},
            "rudp": {"goodput_mb_s": 170.0, "cpu_s_per_gb": 9.0},
        },
        "echo": {
            "udp": {"p50_us": 20.0, "p99_us": 30.0},
            "rudp": {"p50_us": 30.0, "p99_us": 100.0},
        },
        "idle": {"cpu_fraction": 0.002, "bytes_per_connection": 40_000},
    }
    report["ratios"] = bench._ratios(report)
    assert report["ratios"]["rudp_goodput_vs_udp"] == pytest.approx(0.85)
    assert report["ratios"]["rudp_goodput_vs_tcp"] == pytest.approx(0.425)
    assert "udp_gso_vs_sendto" not in report["ratios"]  # not measured: no ratio
    results = {t["name"]: t["ok"] for t in bench._targets(report)}
    assert results == {
        "bulk goodput >= 0.8 x raw UDP": True,
        "echo p50 <= 2 x raw UDP": True,
        "echo p99 <= 3 x raw UDP": False,
        "CPU <= 8 s per GB (both ends)": False,
        "idle CPU < 1% of a core": True,
        "idle memory <= 32 KB per connection": False,
    }


def test_check_turns_missed_targets_into_exit_1(monkeypatch, capsys):
    def fake_bench(params, on_step=None):
        return {"errors": [], "targets": [{"name": "x", "value": 2, "limit": 1, "ok": False}]}

    monkeypatch.setattr(bench, "run_bench", fake_bench)
    assert bench.run(parse(["--json"])) == 0
    assert bench.run(parse(["--json", "--check"])) == 1
    capsys.readouterr()


def test_repeat_reports_the_median_run_and_all_values(monkeypatch):
    goodputs = iter([5.0, 1.0, 3.0])

    def fake_bulk(receiver, sender, params, *extra):
        return {"goodput_mb_s": next(goodputs)}

    monkeypatch.setattr(bench, "_bulk", fake_bulk)
    params = bench.BenchParams(transports=("tcp",), tests=("bulk",), repeat=3)
    report = bench.run_bench(params)
    assert report["bulk"]["tcp"] == {"goodput_mb_s": 3.0, "repeats": [1.0, 3.0, 5.0]}


def test_engine_choice_reaches_the_children(monkeypatch):
    seen = {}

    def fake_bulk(receiver, sender, params, *extra):
        seen["engine"] = os.environ.get("RUDP_ENGINE")
        return {"goodput_mb_s": 1.0}

    monkeypatch.setattr(bench, "_bulk", fake_bulk)
    monkeypatch.delenv("RUDP_ENGINE", raising=False)
    params = bench.BenchParams(engine="python", transports=("tcp",), tests=("bulk",))
    bench.run_bench(params)
    assert seen["engine"] == "python"
    assert "RUDP_ENGINE" not in os.environ  # restored


# ---------------------------------------------------------------------------- --streams


def test_streams_rows_real_run(capsys):
    """--streams 4 on a tiny transfer: every stream counted, and the stalled one held back
    by its window (small buffers) while the other three completed."""
    argv = ["--size", "2M", "--duration", "20s", "--transports", "rudp", "--tests", "bulk"]
    assert bench.run(parse([*argv, "--streams", "4", "--stream-buffer", "64K", "--json"])) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["errors"] == []
    bulk = report["bulk"]
    assert set(bulk) == {"rudp", "rudp-streams", "rudp-streams-stalled"}
    size, per = 2 * 1024 * 1024, 2 * 1024 * 1024 // 4
    every = bulk["rudp-streams"]
    assert every["complete"] and every["streams"] == 4
    assert every["received_bytes"] == every["sent_bytes"] == size
    assert len(every["per_stream_mb_s"]) == 4 and min(every["per_stream_mb_s"]) > 0
    assert 0.25 <= every["fairness"] <= 1.0
    stalled = bulk["rudp-streams-stalled"]
    assert stalled["complete"] and len(stalled["per_stream_mb_s"]) == 3
    assert stalled["received_bytes"] == stalled["sent_bytes"] == 3 * per
    assert 0 < stalled["stalled_stream_sent_bytes"] < per  # its window held it back
    ratios = report["ratios"]
    for key in (
        "rudp_streams_vs_single",
        "rudp_stalled_others_vs_streams",
        "rudp_stalled_per_stream_vs_streams",
    ):
        assert ratios[key] > 0, key
    names = {t["name"] for t in report["targets"]}
    assert {n for n in names if n.startswith("--streams")} == {
        "--streams: aggregate >= 0.9 x one stream",
        "--streams: one reader stopped, the others keep >= 0.9 x",
    }


def test_streams_v1_head_of_line_blocking_is_reported_not_hung(capsys):
    """smux v1 has one session-wide buffer: a stopped reader stalls every stream. The run
    ends at --duration and says the others did not complete (v2 above: they do)."""
    argv = ["--size", "16M", "--duration", "1s", "--transports", "rudp", "--tests", "bulk"]
    extra = ["--streams", "2", "--smux-version", "1", "--session-buffer", "1M"]
    extra += ["--stream-buffer", "256K", "--json"]
    assert bench.run(parse([*argv, *extra])) == 0
    stalled = json.loads(capsys.readouterr().out)["bulk"]["rudp-streams-stalled"]
    assert stalled["complete"] is False
    assert stalled["received_bytes"] < stalled["sent_bytes"]


def test_stream_rows_per_stream_goodput_and_fairness():
    sent = {"start": 100.0, "per_stream_sent": [4_000_000, 2_000_000, 2_000_000]}
    got = {
        "complete": True,
        "per_stream": [
            {"received": 2_000_000, "last": 101.0},
            {"received": 2_000_000, "last": 102.0},
        ],
    }
    rows = bench._stream_rows(sent, got, stalled=True)
    assert rows["per_stream_mb_s"] == [2.0, 1.0]
    assert rows["per_stream_min_mb_s"] == 1.0 and rows["per_stream_max_mb_s"] == 2.0
    assert rows["per_stream_mean_mb_s"] == 1.5
    assert rows["fairness"] == pytest.approx(9 / 10)  # (2+1)^2 / (2 * (4+1))
    assert rows["stalled_stream_sent_bytes"] == 4_000_000
    assert rows["streams"] == 3


def test_streams_ratios_and_targets():
    report = {
        "bulk": {
            "rudp": {"goodput_mb_s": 100.0},
            "rudp-streams": {"goodput_mb_s": 95.0, "per_stream_mean_mb_s": 95.0 / 8},
            "rudp-streams-stalled": {"goodput_mb_s": 80.0, "per_stream_mean_mb_s": 80.0 / 7},
        }
    }
    report["ratios"] = bench._ratios(report)
    assert report["ratios"]["rudp_streams_vs_single"] == pytest.approx(0.95)
    assert report["ratios"]["rudp_stalled_others_vs_streams"] == pytest.approx(80 / 95)
    assert report["ratios"]["rudp_stalled_per_stream_vs_streams"] == pytest.approx(
        (80 / 7) / (95 / 8)
    )
    results = {t["name"]: t["ok"] for t in bench._targets(report)}
    assert results == {
        "--streams: aggregate >= 0.9 x one stream": True,
        "--streams: one reader stopped, the others keep >= 0.9 x": False,
    }


def test_streams_table_output(capsys):
    argv = ["--size", "1M", "--transports", "rudp", "--tests", "bulk", "--streams", "2"]
    assert bench.run(parse(argv)) == 0
    out = capsys.readouterr().out
    assert "streams of one rudp session" in out
    assert "others with one reader stopped / all reading" in out
