"""Is the userspace emulator faithful to real netem? Measure both on the same probe schedule.

Real netem is the reference. In the VM (:mod:`netem.vm`), each scenario's
``tc`` command is applied to a veth and N timestamped UDP probes cross it
(:mod:`netem.vm_probe`). The emulator's model (:class:`netem.NetemQueue`,
which every emulator backend runs) is then fed *the same packets at the
same send times* (the guest's own timestamps) in virtual time, with several
seeds. Comparing a model in virtual time with the kernel in exact guest time
isolates what matters, the model's decisions, from the host's scheduling
noise; the relay and TUN backends add their own real-time error on top,
which is theirs to measure.

Agreement, per scenario (netem's one run against the emulator's runs):

* loss, duplication and reordering rates: within 4 standard deviations of the
  emulator's run-to-run spread (+2 packets), i.e. within sampling noise, bursts
  and correlation included;
* delay mean within 5 % and delay spread (standard deviation) within 10 %,
  each also allowing 20 µs: the guest's veth path and timer granularity. Where
  one run's sampling noise is larger than that (4 standard deviations of the
  emulator's run-to-run spread), the noise is the bound: probes queued behind
  a slow one (weak-mobile's FIFO) are strongly correlated, so such scenarios
  get more probes, to keep the noise below the tolerance.

``python -m netem.vm_fidelity`` prints the table for every shipped profile.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import struct
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from netem.model import UDP_FRAME_OVERHEAD, NetemQueue
from netem.profile import Impairment, list_profiles, load_profile
from netem.vm import VM
from netem.vm_probe import DEV_A, DEV_B, ProbeStats, flow_stats, flow_times, probe_stats

__all__ = [
    "EXTRA_SCENARIOS",
    "Comparison",
    "Scenario",
    "compare",
    "emulate",
    "format_table",
    "measure",
    "scenarios",
]

PROBE_SIZE = 64
#: Absolute slack on delay statistics: the veth path (~6 µs) plus hrtimer granularity.
DELAY_FLOOR = 20e-6

#: Impairments no shipped profile uses, so the model is checked where profiles do not reach.
EXTRA_SCENARIOS = {
    "reorder-gap-dup": "delay 10ms reorder 25% 50% gap 5 duplicate 3%",
    "normal-correlated": "delay 20ms 10ms 25% distribution normal loss 5% 25%",
    "4-state-loss": "delay 5ms loss state 1% 30% 5% 1% 2%",
    "slot": "delay 1ms slot 2ms 4ms packets 4 bytes 3000",
    "rate-queue-limit": "limit 50 delay 5ms rate 1mbit 20 64 4",
}
#: Probe spacing per scenario: tight where a queue must build, 2 ms elsewhere.
_INTERVALS = {"rate-queue-limit": 0.0006, "slot": 0.0005}
#: Probe count multipliers where consecutive delays are strongly correlated (see above).
_MORE_PROBES = {"weak-mobile": 4}


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    impairment: Impairment
    command: str  # the tc command exactly as the profile prints it
    count: int
    interval: float
    shipped: bool


def scenarios(count: int = 2000, extras: bool = True) -> list[Scenario]:
    """Every shipped profile's forward direction, then the extra impairments."""
    out = []
    for name in list_profiles():
        profile = load_profile(name)
        command = profile.tc_commands(DEV_A, DEV_B)[0]
        n = count * _MORE_PROBES.get(name, 1)
        out.append(Scenario(name, profile.forward, command, n, 0.002, True))
    if extras:
        for name, args in EXTRA_SCENARIOS.items():
            imp = Impairment.from_tc_args(args)
            command = f"tc qdisc add dev {DEV_A} root netem {imp.tc_args()}"
            out.append(Scenario(name, imp, command, count, _INTERVALS.get(name, 0.002), False))
    return out


def emulate(
    impairment: Impairment, sent: Sequence[float], seed: int | str, size: int = PROBE_SIZE
) -> list[tuple[int, float]]:
    """The model's arrivals ``(seq, time)`` for probes sent at ``sent[seq]`` (seconds)."""
    queue = NetemQueue(impairment, seed, UDP_FRAME_OVERHEAD)
    pad = bytes(size - 8)
    for seq, t in enumerate(sent):
        queue.enqueue(struct.pack("!iI", seq, 1) + pad, seq, round(t * 1e9))
    queue.advance(2**62)
    return [(seq, when / 1e9) for when, _, seq in queue.take()]


@dataclasses.dataclass(frozen=True)
class Comparison:
    scenario: Scenario
    netem: ProbeStats
    emulator: list[ProbeStats]  # one per seed
    disagreements: list[str]

    def emulator_mean(self, metric: str) -> float:
        return statistics.fmean(_metric(s, metric) for s in self.emulator)


def _metric(stats: ProbeStats, name: str) -> float:
    return float(getattr(stats, name))


def compare(netem: ProbeStats, emulator: Sequence[ProbeStats]) -> list[str]:
    """How netem's run and the emulator's runs disagree (empty when they agree)."""
    problems = []
    n = netem.sent
    for metric in ("loss", "duplicate_rate", "reorder_rate"):
        values = [_metric(s, metric) for s in emulator]
        mean, sd = statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
        got = _metric(netem, metric)
        bound = 4 * sd + 2 / n
        if abs(got - mean) > bound:
            problems.append(
                f"{metric}: netem {got:.4f}, emulator {mean:.4f} ± {sd:.4f} (allowed ± {bound:.4f})"
            )
    for metric, tolerance in (("delay_mean", 0.05), ("delay_std", 0.10)):
        values = [_metric(s, metric) for s in emulator]
        mean, sd = statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
        got = _metric(netem, metric)
        bound = max(tolerance * abs(mean), 4 * sd) + DELAY_FLOOR
        if not abs(got - mean) <= bound:  # also catches NaN (nothing arrived)
            problems.append(
                f"{metric}: netem {got * 1e3:.4f} ms, emulator {mean * 1e3:.4f} ms "
                f"(allowed ± {bound * 1e3:.4f} ms)"
            )
    return problems


def measure(vm: VM, chosen: Sequence[Scenario], seeds: int = 20) -> list[Comparison]:
    """Probe every scenario through real netem (one guest process) and through the model."""
    plan = {
        s.name: {"forward": [s.command], "count": s.count, "interval": s.interval} for s in chosen
    }
    tag = uuid.uuid4().hex
    plan_file = vm.workdir / f"plan-{tag}.json"
    out_file = vm.workdir / f"results-{tag}.json"
    plan_file.write_text(json.dumps(plan))
    probe = str(Path(__file__).with_name("vm_probe.py"))
    budget = 120 + sum(s.count * 0.01 for s in chosen)
    vm.run(
        [vm.python, probe, "plan", str(plan_file), "--out", str(out_file)], timeout=budget
    ).check()
    results = json.loads(out_file.read_text())
    comparisons = []
    for s in chosen:
        result = results[s.name]
        if any(result["rcvbuf_errors"].values()):
            raise RuntimeError(f"{s.name}: probes dropped by the receiver, not by netem: {result}")
        flow = result["forward"]
        sent, _ = flow_times(flow)
        real = flow_stats(flow)
        emulated = [probe_stats(sent, emulate(s.impairment, sent, seed)) for seed in range(seeds)]
        comparisons.append(Comparison(s, real, emulated, compare(real, emulated)))
    return comparisons


def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 1e3:.2f}"


def format_table(comparisons: Sequence[Comparison]) -> str:
    """Markdown: netem vs emulator (mean over seeds) per scenario."""
    head = (
        "| scenario | side | loss % | delay mean ms | p50 ms | p99 ms | std ms "
        "| reorder % | dup % | verdict |"
    )
    lines = [head, "|" + "---|" * 10]
    for c in comparisons:
        verdict = "agree" if not c.disagreements else "DISAGREE: " + "; ".join(c.disagreements)
        emu = {
            m: c.emulator_mean(m)
            for m in (
                "loss",
                "delay_mean",
                "delay_p50",
                "delay_p99",
                "delay_std",
                "reorder_rate",
                "duplicate_rate",
            )
        }
        real = {m: _metric(c.netem, m) for m in emu}
        for side, v, note in (("netem", real, verdict), ("emulator", emu, "")):
            lines.append(
                f"| {c.scenario.name if side == 'netem' else ''} | {side} "
                f"| {v['loss'] * 100:.2f} | {_ms(v['delay_mean'])} | {_ms(v['delay_p50'])} "
                f"| {_ms(v['delay_p99'])} | {_ms(v['delay_std'])} | {v['reorder_rate'] * 100:.2f} "
                f"| {v['duplicate_rate'] * 100:.2f} | {note} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m netem.vm_fidelity",
        description="Emulator vs real netem (in a qemu VM) for every shipped profile.",
    )
    parser.add_argument("--count", type=int, default=2000, help="probes per scenario")
    parser.add_argument("--seeds", type=int, default=20, help="emulator runs per scenario")
    parser.add_argument("--no-extras", action="store_true", help="shipped profiles only")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with VM() as vm:
        booted = time.monotonic()
        comparisons = measure(vm, scenarios(args.count, not args.no_extras), args.seeds)
    print(format_table(comparisons))
    print(
        f"\n{args.count} probes per scenario; boot {booted - started:.0f} s, "
        f"total {time.monotonic() - started:.0f} s (host wall time)"
    )
    return 1 if any(c.disagreements for c in comparisons) else 0


if __name__ == "__main__":
    sys.exit(main())
