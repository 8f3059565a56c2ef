"""The kernel-netem tier: real Linux ``tc netem`` inside a qemu VM (``pytest -m kernel_netem``).

One VM boots per session (the ``netem_vm`` fixture) and serves every test here:
a boot costs 15-25 s of host time, a command a fraction of a second. The VM
runs in exact-timing mode, so the delays asserted below are exact even on a
loaded host. Skips only where qemu cannot run at all (``vm_available()`` says why).
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import netem
import netem.vm_probe
from netem import Impairment
from netem.vm import VM, VMCommandError, VMUnavailable, run_in_vm, vm_available
from netem.vm_fidelity import Comparison, format_table, measure, scenarios
from netem.vm_probe import flow_stats

# The module fixtures boot the VM and run whole plans; their first test carries that time.
pytestmark = [pytest.mark.kernel_netem, pytest.mark.timeout(900)]

PROBE = str(Path(netem.vm_probe.__file__).resolve())


@pytest.fixture(scope="session")
def netem_vm() -> Iterator[VM]:
    ok, reason = vm_available()
    if not ok:
        pytest.skip(f"kernel-netem tier: {reason}")
    vm = VM()
    try:
        vm.start()
    except VMUnavailable as exc:
        pytest.skip(f"kernel-netem tier: {exc}")
    yield vm
    vm.close()


def link(vm: VM, forward: str = "", reverse: str = "") -> None:
    vm.run([vm.python, PROBE, "link", "--forward", forward, "--reverse", reverse]).check()


def run_probe(vm: VM, count: int, interval: str = "2ms", *flows: str) -> dict:
    out = vm.workdir / f"probe-{uuid.uuid4().hex}.json"
    argv = [vm.python, PROBE, "probe", "--count", str(count), "--interval", interval]
    for flow in flows or ("forward",):
        argv += ["--flow", flow]
    vm.run([*argv, "--out", str(out)], timeout=600).check()
    return json.loads(out.read_text())


def binomial_band(p: float, n: int, sigmas: float = 4.0) -> tuple[float, float]:
    sd = math.sqrt(p * (1 - p) / n)
    return p - sigmas * sd, p + sigmas * sd


# --- the machine itself ------------------------------------------------------------------------


def test_guest_runs_a_real_kernel_with_netem_loaded(netem_vm: VM) -> None:
    out = netem_vm.run("uname -r; cat /proc/modules").check().stdout
    release, modules = out.split("\n", 1)
    assert release == netem_vm.kernel_release
    loaded = {line.split()[0] for line in modules.splitlines()}
    assert {"sch_netem", "veth", "9p", "overlay"} <= loaded


def test_host_root_is_read_only_and_workdir_is_shared(netem_vm: VM, tmp_path: Path) -> None:
    host_file = tmp_path / "host.txt"
    host_file.write_text("host\n")
    script = (
        f"cat {host_file}; echo guest > {host_file}; cat {host_file}; "
        f"echo from-guest > {netem_vm.workdir}/shared.txt"
    )
    assert netem_vm.run(script).check().stdout == "host\nguest\n"
    assert host_file.read_text() == "host\n"  # the write landed in the guest's tmpfs overlay
    assert (netem_vm.workdir / "shared.txt").read_text() == "from-guest\n"


def test_guest_runs_this_project_with_the_host_python(netem_vm: VM) -> None:
    code = "import netem, rudp, sys; print(sys.executable, netem.__file__)"
    out = netem_vm.run_python(code).check().stdout.split()
    assert out[0] == netem_vm.python
    assert out[1] == str(Path(netem.__file__).resolve())


def test_one_shot_vm_in_plain_tcg_mode(tmp_path: Path) -> None:
    """run_in_vm boots its own VM: here without exact timing, so with two vCPUs."""
    ok, reason = vm_available()
    if not ok:
        pytest.skip(f"kernel-netem tier: {reason}")
    script = f"nproc; tc qdisc add dev lo root netem delay 1ms && echo done > {tmp_path}/out"
    result = run_in_vm(script, exact_timing=False, workdir=tmp_path).check()
    assert result.stdout == "2\n"
    assert (tmp_path / "out").read_text() == "done\n"


def test_failing_guest_command_reports_its_stderr(netem_vm: VM) -> None:
    result = netem_vm.run("echo nope >&2; exit 3")
    assert (result.returncode, result.stderr) == (3, "nope\n")
    with pytest.raises(VMCommandError, match="nope"):
        result.check()
    assert netem_vm.alive


# --- real netem: the phase-1 proof -------------------------------------------------------------


def test_netem_delay_and_loss_measured_by_probes(netem_vm: VM) -> None:
    link(netem_vm, forward="delay 25ms loss 10%")
    result = run_probe(netem_vm, 2000)
    flow = result["forward"]
    stats = flow_stats(flow)
    lo, hi = binomial_band(0.10, stats.sent)
    assert lo < stats.loss < hi
    # Every missing probe is one netem dropped: nothing was lost anywhere else.
    assert result["rcvbuf_errors"] == {"rudp-a": 0, "rudp-b": 0}
    (qdisc,) = result["qdisc"]["forward"]
    total_sent = stats.sent + flow["warmup_sent"]
    assert qdisc["drops"] == total_sent - stats.received - flow["warmup_arrivals"]
    assert qdisc["packets"] + qdisc["drops"] == total_sent  # and netem saw nothing else
    # Exact timing: the one-way delay is netem's 25 ms plus microseconds of veth path.
    assert stats.delay_min >= 0.025 and stats.delay_max < 0.0252
    assert stats.duplicates == stats.reordered == 0


def test_netem_applies_each_direction_separately(netem_vm: VM) -> None:
    link(netem_vm, forward="delay 10ms", reverse="delay 30ms 5ms")
    result = run_probe(netem_vm, 300, "5ms", "forward", "reverse")
    fwd, rev = flow_stats(result["forward"]), flow_stats(result["reverse"])
    assert fwd.loss == rev.loss == 0
    assert fwd.delay_min >= 0.010 and fwd.delay_max < 0.0102
    # 30 ms +- 5 ms jitter (netem's default table is uniform over [delay-jitter, delay+jitter])
    assert rev.delay_min >= 0.025 and rev.delay_max < 0.0352
    assert abs(rev.delay_mean - 0.030) < 0.001


# --- every profile, as the real kernel sees it ---------------------------------------------------

SCENARIOS = {s.name: s for s in scenarios()}


@pytest.fixture(scope="module")
def accepted(netem_vm: VM) -> dict:
    """Each scenario's tc command applied in the guest; ``tc -s -j qdisc show`` of the result."""
    plan = {}
    for name, scenario in SCENARIOS.items():
        plan[name] = {"forward": [scenario.command], "count": 0}
        if scenario.shipped:  # a profile's reverse direction is its own command
            profile = netem.load_profile(name)
            plan[name]["reverse"] = [profile.tc_commands("veth-a", "veth-b")[1]]
    plan_file = netem_vm.workdir / "accept-plan.json"
    plan_file.write_text(json.dumps(plan))
    out = netem_vm.workdir / "accept.json"
    netem_vm.run([netem_vm.python, PROBE, "plan", str(plan_file), "--out", str(out)]).check()
    return json.loads(out.read_text())


def reported(options: dict) -> dict:
    """The kernel's view of a netem qdisc (tc's JSON) in :class:`netem.Impairment` fields."""
    delay = options.get("delay", {})
    loss = options.get("loss-random", {})
    rate = options.get("rate", {})
    fields = {
        "limit": options["limit"],
        "delay": delay.get("delay", 0.0),
        "jitter": delay.get("jitter", 0.0),
        "delay_correlation": delay.get("correlation", 0.0),
        "loss": loss.get("loss", 0.0),
        "loss_correlation": loss.get("correlation", 0.0),
        "gap": options["gap"],
        "rate": rate.get("rate", 0) * 8,
        "packet_overhead": rate.get("packetoverhead", 0),
        "cell_size": rate.get("cellsize", 0),
        "cell_overhead": rate.get("celloverhead", 0),
    }
    for key in ("duplicate", "reorder", "corrupt"):
        fields[key] = options.get(key, {}).get(key, 0.0)
        fields[f"{key}_correlation"] = options.get(key, {}).get("correlation", 0.0)
    state, ge = options.get("loss-state"), options.get("loss-gemodel")
    fields["loss_state"] = state and tuple(state[k] for k in ("p13", "p31", "p32", "p23", "p14"))
    fields["loss_gemodel"] = ge and tuple(ge[k] for k in ("p", "r", "1-h", "1-k"))
    slot = options.get("slot")
    fields["slot"] = slot and (
        slot["min-delay"],
        slot["max-delay"],
        slot.get("packets", 0),
        slot.get("bytes", 0),
    )
    return fields


def expected(imp: Impairment) -> dict:
    fields = {name: getattr(imp, name) for name in reported({"limit": 0, "gap": 0})}
    if imp.slot is not None:
        slot = imp.slot
        fields["slot"] = (slot.min_delay, slot.max_delay, slot.packets, slot.bytes)
    # The kernel keeps a duplicate correlation only when tc sends the correlation block.
    if not (imp.delay_correlation or imp.loss_correlation or imp.reorder_correlation):
        fields["duplicate_correlation"] = 0.0
    return fields


def flat(fields: dict) -> dict:
    """Tuple fields spread into one key per element (pytest.approx compares flat mappings)."""
    out = {}
    for key, value in fields.items():
        if isinstance(value, tuple):
            out.update({f"{key}[{i}]": v for i, v in enumerate(value)})
        else:
            out[key] = value
    return out


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_kernel_accepts_profile_and_reports_what_it_says(accepted: dict, name: str) -> None:
    scenario = SCENARIOS[name]
    directions = [("forward", scenario.impairment)]
    if scenario.shipped:
        directions.append(("reverse", netem.load_profile(name).reverse))
    for direction, imp in directions:
        (qdisc,) = accepted[name]["qdisc"][direction]
        assert qdisc["kind"] == "netem"
        # tc keeps times in 64 ns ticks and prints whole microseconds: 500us reads back 499us.
        got, want = flat(reported(qdisc["options"])), flat(expected(imp))
        assert got == pytest.approx(want, abs=1.5e-6), direction


# --- fidelity: the same probes through real netem and through the emulator's model -------------


@pytest.fixture(scope="module")
def fidelity(netem_vm: VM) -> dict[str, Comparison]:
    comparisons = measure(netem_vm, list(SCENARIOS.values()))
    print("\n" + format_table(comparisons))  # shown with -s, and in the log of a failure
    return {c.scenario.name: c for c in comparisons}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_emulator_agrees_with_real_netem(fidelity: dict[str, Comparison], name: str) -> None:
    comparison = fidelity[name]
    assert comparison.netem.received > 0
    assert not comparison.disagreements, format_table([comparison])


# --- rudp under real netem -----------------------------------------------------------------------


def _directions(name: str) -> dict[str, list[str]]:
    forward, reverse = netem.load_profile(name).tc_commands("veth-a", "veth-b")
    return {"forward": [forward], "reverse": [reverse]}


TRANSFERS = {
    "lossy": _directions("lossy"),  # 10% random loss each way
    "burst": _directions("burst"),  # Gilbert-Elliott bursts
    "duplicate": {  # duplication, with some loss
        "forward": ["tc qdisc add dev veth-a root netem delay 10ms duplicate 10% loss 2%"],
        "reverse": ["tc qdisc add dev veth-b root netem delay 10ms duplicate 10%"],
    },
    "reorder": {  # gap reordering on top of jitter reordering
        "forward": ["tc qdisc add dev veth-a root netem delay 10ms 5ms reorder 25% gap 5"],
        "reverse": ["tc qdisc add dev veth-b root netem delay 10ms 5ms"],
    },
}
LATENCY = ("lossy", "4g")
TRANSFER_SIZE = 1_000_000


@pytest.fixture(scope="module")
def transfers(netem_vm: VM) -> dict:
    """Every rudp scenario in one guest run (one server process, one client process)."""
    plan = {
        f"bulk-{name}": {**link, "workload": "bulk", "size": TRANSFER_SIZE}
        for name, link in TRANSFERS.items()
    }
    for name in LATENCY:
        plan[f"messages-{name}"] = {
            **_directions(name),
            "workload": "messages",
            "count": 200,
            "size": 16,
            "interval": 0.02,
        }
    plan_file = netem_vm.workdir / "transfer-plan.json"
    plan_file.write_text(json.dumps(plan))
    out = netem_vm.workdir / "transfers.json"
    argv = [netem_vm.python, "-m", "netem.vm_transfer", "run", str(plan_file), "--out", str(out)]
    netem_vm.run(argv, timeout=900).check()
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", sorted(TRANSFERS))
def test_rudp_bulk_arrives_intact_under_real_netem(transfers: dict, name: str) -> None:
    result = transfers[f"bulk-{name}"]
    assert "error" not in result, result.get("error")
    assert result["bytes"] == TRANSFER_SIZE
    assert result["sha256"] == result["expected_sha256"]
    (forward,) = result["qdisc"]["forward"]
    assert forward["packets"] > TRANSFER_SIZE / 1500  # the data crossed netem
    if name != "reorder":  # every other scenario loses packets: netem dropped datagrams
        # (the kernel's random is not seeded: a Gilbert-Elliott run of 750 packets may see
        # a single short burst, so only "some" is certain; the rates are checked by fidelity)
        assert forward["drops"] > 0
        assert result["stats"]["retrans_segs"] > 0


@pytest.mark.parametrize("name", LATENCY)
def test_rudp_messages_show_the_profiles_latency(transfers: dict, name: str) -> None:
    result = transfers[f"messages-{name}"]
    assert "error" not in result, result.get("error")
    assert [seq for seq, _ in result["latencies"]] == list(range(200))  # all, in order
    latencies = sorted(ns / 1e9 for _, ns in result["latencies"])
    imp = netem.load_profile(name).forward
    # Nothing can beat netem's shortest delay; the median message is not hit by loss, so it
    # sees the profile's delay plus the guest's processing (well under 3 ms here).
    assert latencies[0] >= imp.delay - imp.jitter
    median = latencies[len(latencies) // 2]
    assert imp.delay - imp.jitter <= median <= imp.delay + imp.jitter + 0.003


# --- rudp sim --backend vm ----------------------------------------------------------------------


def test_sim_vm_backend_runs_a_workload_under_real_netem(netem_vm: VM) -> None:
    from netem import harness
    from netem.harness import Job
    from netem.vm_backend import BACKEND, run_job
    from rudp.sim import summarize

    assert harness.BACKENDS["vm"] is BACKEND
    assert BACKEND.carries("tcp") is None and BACKEND.carries("rudp") is None
    job = Job("rudp", "messages", count=50, size=16, interval=0.02, timeout=60)
    summary = summarize(job, run_job(netem_vm, netem.load_profile("lossy"), job))
    assert "error" not in summary, summary
    assert summary["delivered"] == "50/50"
    assert "real tc netem in a qemu VM" in summary["link"]
    assert summary["latency_ms"]["p50"] >= 25.0
    assert summary["wire_bytes"] > 50 * 16
