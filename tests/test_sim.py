"""``rudp sim``: arguments, profile building, result summaries, and runs on each backend."""

from __future__ import annotations

import json
import re

import pytest

import netem
from netem.harness import BACKENDS, Job, JobResult, workload_argv
from netem.netns import capabilities
from rudp import sim


def parse(argv: list[str]):
    import argparse

    parser = argparse.ArgumentParser()
    sim.add_arguments(parser)
    return parser.parse_args(argv)


def run_json(argv: list[str], capsys) -> dict:
    assert sim.main([*argv, "--json"]) in (0, 1)
    return json.loads(capsys.readouterr().out)


def test_default_is_the_lossy_profile_and_inline_options_adjust_it():
    args = parse([])
    assert sim.build_profile(args) == netem.load_profile("lossy")
    args = parse(["--loss", "5%", "--jitter", "2ms", "--rate", "1mbit"])
    assert sim.build_profile(args).forward.tc_args() == "delay 25ms 2ms loss 5% rate 1mbit"
    args = parse(["--profile", "lan", "--netem", "delay 40ms 10ms loss 2%"])
    assert sim.build_profile(args).forward.tc_args() == "delay 40ms 10ms loss 2%"


def test_interval_is_the_workloads_and_the_arq_interval_keeps_its_own_flag():
    args = parse(["--interval", "5ms", "--arq-interval", "20ms", "--mode", "fast2"])
    assert args.interval == "5ms"
    from rudp.cli import configuration_from_args

    config = configuration_from_args(args)
    assert config.interval == pytest.approx(0.020)
    assert config.mode == "fast2"


def test_print_profile_prints_the_tc_commands(capsys):
    assert sim.main(["--profile", "burst", "--print-profile"]) == 0
    out = capsys.readouterr().out
    assert (
        "tc qdisc add dev DEV_CLIENT_SIDE root netem delay 25ms loss gemodel 1% 20% 100% 0%" in out
    )


def test_invalid_inline_option_is_a_usage_error_naming_the_field(capsys):
    assert sim.main(["--loss", "150%", "--print-profile"]) == 2
    assert "loss" in capsys.readouterr().err
    assert sim.main(["--backend", "pigeon"]) == 2
    assert "backend must be" in capsys.readouterr().err
    assert sim.main(["--protocols", "quic", "--backend", "virtual"]) == 2


def test_auto_backend_says_which_link_it_chose():
    name, note = sim.choose_backend("auto")
    assert name in ("netns", "relay")
    assert note
    if name == "relay":
        assert "because" in note


def test_summary_of_a_messages_run():
    job = Job("tcp", "messages", count=4, size=100, interval=0.01)
    ms = 1_000_000
    samples = [(0, 30 * ms), (10 * ms, 40 * ms), (20 * ms, 150 * ms), (30 * ms, 60 * ms)]
    result = JobResult(
        server={"samples": samples, "congestion": "bbr"},
        client={"retransmits": 3},
        wire={"forward": {"bytes": 600, "packets": 4}, "reverse": {"bytes": 200, "packets": 4}},
        link="test",
    )
    s = sim.summarize(job, result)
    assert s["delivered"] == "4/4"
    assert s["latency_ms"]["mean"] == pytest.approx((30 + 30 + 130 + 30) / 4)
    assert s["latency_ms"]["max"] == pytest.approx(130)
    assert s["latency_ms"]["p50"] == pytest.approx(30)
    assert s["overhead"] == pytest.approx(800 / 400)
    assert s["retransmissions"] == 3
    assert s["congestion_control"] == "bbr"
    assert s["goodput_bps"] == pytest.approx(400 * 8 / 0.150)


def test_summary_of_a_bulk_run_checks_integrity():
    import hashlib

    from netem.workloads import bulk_payload

    job = Job("kcp", "bulk", size=1000)
    good = hashlib.sha256(bulk_payload(1000)).hexdigest()
    ok = sim.summarize(
        job, JobResult({"bytes": 1000, "start": 0, "end": 10**9, "sha256": good}, {})
    )
    assert ok["intact"] is True
    assert ok["goodput_bps"] == pytest.approx(8000)
    bad = sim.summarize(job, JobResult({"bytes": 1000, "start": 0, "end": 1, "sha256": "x"}, {}))
    assert bad["intact"] is False


def test_workload_command_lines_carry_the_job():
    job = Job("kcp", "echo", count=10, size=8, interval=0.02, kcp_flush="tick")
    argv = workload_argv(job, "client")
    assert argv[argv.index("--protocol") + 1] == "kcp"
    assert argv[argv.index("--workload") + 1] == "echo"
    assert argv[argv.index("--kcp-flush") + 1] == "tick"
    assert "--tcp-congestion" not in argv


def test_virtual_backend_runs_rudp_and_kcp_deterministically(capsys):
    argv = ["--backend", "virtual", "--protocols", "rudp,kcp,tcp", "--duration", "3s"]
    first = run_json(argv, capsys)
    second = run_json(argv, capsys)
    for protocol in ("rudp", "kcp"):
        r = first["results"][protocol]
        assert r["delivered"] == "150/150"
        assert r["latency_ms"]["p50"] >= 25.0  # the profile's one-way delay
        assert (
            r["latency_ms"]["max"] > r["latency_ms"]["p50"]
        )  # 10% loss: some messages waited for repair
        assert r["retransmissions"] > 0
        assert 1 < r["overhead"] < 40  # 16-byte payloads: headers, ACKs and (rudp) FEC parity
    assert "TCP lives in the kernel" in first["skipped"]["tcp"]
    assert first["results"] == second["results"]  # virtual time: exactly replayable


@pytest.mark.parametrize("profile", ["lossy", "kcp-sim"])
def test_fec_shortens_the_thin_stream_tail(profile, capsys):
    """16-byte messages every 20 ms, FEC "auto" (the default) against FEC off (fast3's
    bundling stays on), same seeds: parity repairs most losses, and the one copy that
    still rides along covers the groups parity cannot rebuild, so no RTO sets the tail."""
    p99 = {"auto": 0.0, "off": 0.0}
    worst = {"auto": 0.0, "off": 0.0}
    for seed in ("1", "2", "3"):
        for fec in p99:
            argv = ["--backend", "virtual", "--profile", profile, "--protocols", "rudp"]
            argv += ["--duration", "30s", "--seed", seed, "--fec", fec]
            r = run_json(argv, capsys)["results"]["rudp"]
            assert r["delivered"] == "1500/1500"
            p99[fec] += r["latency_ms"]["p99"]
            worst[fec] += r["latency_ms"]["max"]
            if fec == "auto":
                assert r["rudp_stats"]["fec_parity_sent"] > 0
                assert r["rudp_stats"]["bundled_segs"] > 0
    assert p99["auto"] < p99["off"], p99
    assert worst["auto"] <= worst["off"], worst


def test_virtual_echo_uses_kcps_8_byte_messages(capsys):
    report = run_json(
        [
            "--backend",
            "virtual",
            "--protocols",
            "rudp,kcp",
            "--workload",
            "echo",
            "--duration",
            "2s",
        ],
        capsys,
    )
    for r in report["results"].values():
        assert r["delivered"] == "100/100"
        assert r["latency_ms"]["p50"] >= 50.0  # a round trip of 25 ms each way
    assert report["job"]["size"] == 8


def test_virtual_kcp_sim_reproduces_kcps_own_simulator():
    # KCP's test.cpp: 30-62 ms each way, 5% loss each way, FIFO, 8-byte echo every 20 ms.
    # Its README-era figures for its fast mode: average RTT 136-145 ms, max 382-547 ms.
    job = Job("kcp", "echo", count=1000, size=8, interval=0.02, kcp_flush="tick")
    result = BACKENDS["virtual"].run(netem.load_profile("kcp-sim"), 1, job, None)
    s = sim.summarize(job, result)
    assert s["delivered"] == "1000/1000"
    assert 100 < s["latency_ms"]["mean"] < 200
    assert 200 < s["latency_ms"]["max"] < 900


def test_relay_backend_compares_udp_protocols_and_explains_tcp(capsys):
    report = run_json(
        ["--backend", "relay", "--protocols", "kcp,tcp", "--duration", "2s", "--seed", "3"],
        capsys,
    )
    assert report["link"]
    kcp = report["results"]["kcp"]
    assert kcp["delivered"] == "100/100"
    assert kcp["latency_ms"]["p50"] >= 25.0
    assert "retransmissions" in kcp
    assert re.search("only UDP", report["skipped"]["tcp"])


def test_relay_echo_round_trips(capsys):
    report = run_json(
        [
            "--backend",
            "relay",
            "--protocols",
            "kcp",
            "--workload",
            "echo",
            "--duration",
            "1s",
            "--profile",
            "lan",
        ],
        capsys,
    )
    kcp = report["results"]["kcp"]
    assert kcp["delivered"] == "50/50"
    assert kcp["latency_ms"]["p50"] >= 1.0  # 0.5 ms each way


def test_relay_bulk_arrives_intact(capsys):
    report = run_json(
        [
            "--backend",
            "relay",
            "--protocols",
            "kcp",
            "--workload",
            "bulk",
            "--size",
            "200K",
            "--loss",
            "2%",
            "--delay",
            "5ms",
        ],
        capsys,
    )
    kcp = report["results"]["kcp"]
    assert kcp["intact"] is True
    assert kcp["goodput_bps"] > 0


@pytest.mark.netns
@pytest.mark.slow
def test_netns_backend_runs_tcp_and_kcp_over_the_same_link(capsys):
    if not capabilities().backends:
        pytest.skip(capabilities().describe())
    report = run_json(["--backend", "netns", "--protocols", "tcp,kcp", "--duration", "2s"], capsys)
    for protocol in ("tcp", "kcp"):
        r = report["results"][protocol]
        assert r["delivered"] == "100/100", r
        assert r["latency_ms"]["p50"] >= 25.0
        assert r["overhead"] > 1
    assert report["results"]["tcp"]["congestion_control"]


def test_plot_draws_a_png(tmp_path, capsys):
    path = tmp_path / "latency.png"
    code = sim.main(
        ["--backend", "virtual", "--protocols", "kcp", "--duration", "2s", "--plot", str(path)]
    )
    assert code == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plot written" in capsys.readouterr().out


def test_table_output_names_the_profile_and_link(capsys):
    assert sim.main(["--backend", "virtual", "--protocols", "kcp", "--duration", "1s"]) == 0
    out = capsys.readouterr().out
    assert "profile lossy" in out
    assert "tc qdisc add dev" in out
    assert "virtual time" in out
    assert "one-way latency mean" in out


def test_rudp_column_runs_when_the_asyncio_api_exists(capsys):
    missing = sim._rudp_missing()
    if missing:
        pytest.skip(missing)
    report = run_json(["--backend", "relay", "--protocols", "rudp", "--duration", "2s"], capsys)
    r = report["results"]["rudp"]
    assert r["delivered"] == "100/100", r
    assert r["latency_ms"]["p50"] >= 25.0


def test_sim_is_a_rudp_subcommand_once_registered(capsys):
    from rudp import cli

    if "sim" not in cli.SUBCOMMANDS:
        pytest.skip("rudp.cli does not register 'sim' yet")
    assert cli.main(["sim", "--print-profile"]) == 0
    assert "netem delay 25ms loss 10%" in capsys.readouterr().out
