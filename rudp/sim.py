"""Loss simulation: rudp, TCP and the reference C KCP over the same emulated link, side by side.

``rudp sim --profile lossy`` runs a workload (default: a 16-byte message every
20 ms for 10 s, one-way latency measured on the shared CLOCK_MONOTONIC)
through a link built from a netem profile, once per protocol, each time on a
fresh link with the same seed, and prints goodput, latency (mean, p50, p90,
p99, max), bytes on the wire per payload byte and retransmissions.

Links (``--backend``): ``netns`` (two network namespaces; real ``tc netem``
where the kernel has it, else the userspace TUN forwarder; carries TCP too,
needs root), ``relay`` (a UDP relay on loopback; rudp and KCP only),
``virtual`` (in-process virtual time; KCP), and any registered by other
modules (``vm``). ``auto`` picks ``netns`` when it can, else ``relay``, and
says which.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from netem.harness import BACKENDS, Job, JobResult, load_plugins
from netem.profile import Profile, load_profile
from netem.workloads import ECHO, MESSAGE
from rudp import units

__all__ = ["add_arguments", "run", "summarize"]

PROTOCOLS = ("rudp", "tcp", "kcp")
WORKLOADS = ("messages", "echo", "bulk")
DEFAULT_SIZE = {"messages": "16", "echo": "8", "bulk": "4M"}
#: netem options accepted inline (``--delay 40ms``), in tc's order.
INLINE_OPTIONS = (
    "delay",
    "jitter",
    "delay_correlation",
    "distribution",
    "loss",
    "loss_correlation",
    "duplicate",
    "corrupt",
    "reorder",
    "gap",
    "rate",
    "packet_overhead",
    "limit",
    "slot",
)
_LABELS = {"rudp": "rudp", "tcp": "TCP", "kcp": "KCP (ikcp.c)"}


# ---------------------------------------------------------------------------- arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``rudp sim`` flags: link, workload, output, and the shared rudp configuration."""
    from rudp.cli import add_configuration_arguments

    load_plugins()
    link = parser.add_argument_group("link (a netem profile, optionally adjusted inline)")
    link.add_argument(
        "--profile", default="lossy", help="profile name or .toml file (default: lossy)"
    )
    link.add_argument("--netem", metavar="TC_ARGS", help='tc netem options, e.g. "delay 40ms 10ms"')
    for name in INLINE_OPTIONS:
        link.add_argument(
            "--" + name.replace("_", "-"),
            dest=f"netem_{name}",
            metavar="VALUE",
            help=argparse.SUPPRESS,
        )
    link.add_argument(
        "--backend",
        default="auto",
        help=f"auto, {', '.join(BACKENDS)} (default: auto = netns if possible, else relay)",
    )
    link.add_argument("--seed", type=int, default=1, help="the link's random seed (default: 1)")
    link.add_argument(
        "--print-profile", action="store_true", help="print the tc commands of the link and exit"
    )
    work = parser.add_argument_group("workload")
    work.add_argument("--workload", choices=WORKLOADS, default="messages")
    work.add_argument("--size", help="message bytes (16, echo 8) or bulk bytes (4M)")
    work.add_argument("--duration", default="10s", help="messages/echo: how long (default 10s)")
    work.add_argument("--protocols", default=",".join(PROTOCOLS), help="default: rudp,tcp,kcp")
    work.add_argument("--tcp-congestion", help="TCP congestion control (default: the kernel's)")
    work.add_argument(
        "--sequential",
        action="store_true",
        help="run the protocols one after another (default for bulk; messages and echo "
        "run side by side, each on its own link with the same seed)",
    )
    work.add_argument(
        "--kcp-flush",
        choices=("tick", "send", "all"),
        default="all",
        help="when KCP sends: on its update tick only, also after each send, or also after "
        "each input (default: all, its fastest use)",
    )
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON object")
    out.add_argument("--plot", metavar="FILE.png", help="latency CDF and latency over time")
    # The workload's --interval (time between messages) takes the flag; the rudp
    # configuration's ARQ update interval moves to --arq-interval.
    add_configuration_arguments(parser, rename={"interval": "arq-interval"})
    parser.add_argument(
        "--interval", default="20ms", help="workload: time between messages (default 20ms)"
    )
    parser.epilog = (
        "Inline netem options: "
        + ", ".join("--" + n.replace("_", "-") for n in INLINE_OPTIONS)
        + " (tc syntax: --delay 40ms --jitter 10ms --loss 2%%)."
    )


def build_profile(args: argparse.Namespace) -> Profile:
    """The profile, with ``--netem`` and the inline options applied over it."""
    profile = load_profile(args.profile)
    options: dict[str, Any] = {}
    if args.netem:
        options["netem"] = args.netem
    for name in INLINE_OPTIONS:
        value = getattr(args, f"netem_{name}", None)
        if value is not None:
            options[name] = value
    return Profile.from_options(base=profile, **options)


def choose_backend(name: str) -> tuple[str, str]:
    """(backend name, a note saying why) for ``--backend``."""
    load_plugins()
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"backend must be auto or one of {', '.join(BACKENDS)}, got {name!r}")
        return name, BACKENDS[name].describe()
    reason = BACKENDS["netns"].carries("tcp")
    if reason is None:
        return "netns", BACKENDS["netns"].describe()
    return "relay", f"UDP relay on loopback, because {reason}"


def _rudp_missing() -> str | None:
    try:
        from netem.workloads import rudp_api

        rudp_api()
    except (ImportError, AttributeError):
        return "rudp.open_connection / rudp.start_server are not available in this build"
    return None


def _kcp_missing() -> str | None:
    try:
        import kcp  # noqa: F401
    except ImportError:
        return "the reference C KCP (PyPI 'kcp') is not installed"
    return None


# ---------------------------------------------------------------------------- results


def _quantile(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summarize(job: Job, result: JobResult) -> dict[str, Any]:
    """One protocol's figures from its raw reports."""
    out: dict[str, Any] = {"link": result.link}
    for side in (result.server, result.client):
        if "error" in side:
            out["error"] = side["error"]
    if result.error:
        out["error"] = result.error
    retrans = [side.get("retransmits") for side in (result.client, result.server)]
    if any(r is not None for r in retrans):
        out["retransmissions"] = sum(r or 0 for r in retrans)
    congestion = result.client.get("congestion") or result.server.get("congestion")
    if congestion:
        out["congestion_control"] = congestion
    if "stats" in result.client:
        out["rudp_stats"] = result.client["stats"]
    payload = 0
    series: list[tuple[float, float]] = []  # (send time s since first, latency ms)
    if job.workload in ("messages", "echo"):
        # (sent ns, received ns) per message: one-way on the shared clock, or a round trip
        if job.workload == "messages":
            timed, copies = result.server.get("samples", []), 1
        else:
            timed, copies = result.client.get("rtts", []), 2
        payload = copies * len(timed) * job.size
        out["delivered"] = f"{len(timed)}/{job.count}"
        if timed:
            first = min(s for s, _ in timed)
            series = [((s - first) / 1e9, (r - s) / 1e6) for s, r in timed]
            span = (max(r for _, r in timed) - first) / 1e9
            out["goodput_bps"] = payload * 8 / span if span > 0 else None
    else:
        got = result.server.get("bytes", 0)
        payload = got
        start, end = result.server.get("start"), result.server.get("end")
        if start is not None and end and end > start:
            out["goodput_bps"] = got * 8 / ((end - start) / 1e9)
            out["elapsed_s"] = (end - start) / 1e9
        expected = hashlib.sha256(_bulk_bytes(job.size)).hexdigest()
        if "sha256" in result.server:
            out["intact"] = result.server["sha256"] == expected and got == job.size
        out["delivered"] = f"{got}/{job.size} B"
    if series:
        latencies = sorted(lat for _, lat in series)
        out["latency_ms"] = {
            "mean": statistics.fmean(latencies),
            "p50": _quantile(latencies, 50),
            "p90": _quantile(latencies, 90),
            "p99": _quantile(latencies, 99),
            "max": latencies[-1],
        }
        out["series"] = series
    wire = sum(d.get("bytes", 0) for d in result.wire.values())
    if wire and payload:
        out["wire_bytes"] = wire
        out["overhead"] = wire / payload
    return out


def _bulk_bytes(size: int) -> bytes:
    from netem.workloads import bulk_payload

    return bulk_payload(size)


# ---------------------------------------------------------------------------- running


def _job(args: argparse.Namespace, protocol: str, config_toml: str | None) -> Job:
    size = units.parse_size(args.size or DEFAULT_SIZE[args.workload], "size")
    interval = units.parse_duration(args.interval, "interval")
    duration = units.parse_duration(args.duration, "duration")
    smallest = {"messages": MESSAGE.size, "echo": ECHO.size}.get(args.workload)
    if smallest is not None and not smallest <= size <= 65536:
        raise ValueError(
            f"size: {args.workload} carry a {smallest}-byte header; use {smallest}..65536, got {size}"
        )
    if args.workload == "bulk" and not 1 <= size <= 1 << 34:
        raise ValueError(f"size: bulk transfers of 1 B..16 GiB, got {size}")
    if not 0.0001 <= interval <= 60:
        raise ValueError(f"interval must be in [100us, 60s], got {args.interval!r}")
    if not 0.1 <= duration <= 3600:
        raise ValueError(f"duration must be in [0.1s, 1h], got {args.duration!r}")
    count = max(1, round(duration / interval))
    timeout = duration + 60 if args.workload != "bulk" else max(120.0, size / 20_000)
    return Job(
        protocol=protocol,
        workload=args.workload,
        count=count,
        size=size,
        interval=interval,
        timeout=timeout,
        tcp_congestion=args.tcp_congestion,
        config_toml=config_toml,
        kcp_flush=args.kcp_flush,
    )


def simulate(args: argparse.Namespace, console: Any = None) -> dict[str, Any]:
    """Run the comparison; returns the report (also what ``--json`` prints)."""
    from rudp.cli import configuration_from_args, format_configuration

    profile = build_profile(args)
    backend_name, note = choose_backend(args.backend)
    backend = BACKENDS[backend_name]
    config = configuration_from_args(args)
    requested = [p.strip() for p in args.protocols.split(",") if p.strip()]
    for p in requested:
        if p not in PROTOCOLS:
            raise ValueError(f"protocols must be among {', '.join(PROTOCOLS)}, got {p!r}")
    report: dict[str, Any] = {
        "profile": profile.name,
        "description": profile.description,
        "tc": profile.tc_commands("<client-side dev>", "<server-side dev>"),
        "backend": backend_name,
        "link": note,
        "seed": args.seed,
        "workload": args.workload,
        "results": {},
        "skipped": {},
    }
    jobs = []
    for protocol in requested:
        reason = backend.carries(protocol)
        if reason is None and protocol == "rudp":
            reason = _rudp_missing()
        if reason is None and protocol == "kcp":
            reason = _kcp_missing()
        if reason is not None:
            report["skipped"][protocol] = reason
            continue
        jobs.append(
            _job(args, protocol, format_configuration(config) if protocol == "rudp" else None)
        )
    if jobs:
        report["job"] = {k: v for k, v in dataclasses.asdict(jobs[0]).items() if k != "config_toml"}
    progress = _Progress(console, jobs)
    concurrent = args.workload != "bulk" and not args.sequential and len(jobs) > 1
    report["concurrent"] = concurrent

    def one(job: Job) -> dict[str, Any]:
        task = progress.start(job)
        result = backend.run(profile, args.seed, job, lambda t: progress.update(task, t))
        progress.done(task)
        return summarize(job, result)

    with progress:
        if concurrent:  # light workloads: each protocol on its own link, at the same time
            with ThreadPoolExecutor(len(jobs)) as pool:
                summaries = list(pool.map(one, jobs))
        else:
            summaries = [one(job) for job in jobs]
    for job, summary in zip(jobs, summaries, strict=True):
        report["results"][job.protocol] = summary
    return report


class _Progress:
    """A rich progress bar (on stderr) while protocols run; silent without a console."""

    def __init__(self, console: Any, jobs: list[Job]) -> None:
        self.console = console
        self.jobs = jobs
        self._bar: Any = None

    def __enter__(self) -> _Progress:
        if self.console is not None and self.jobs:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def start(self, job: Job) -> Any:
        if self._bar is None:
            return None
        total = job.expected_duration or None
        return self._bar.add_task(f"{_LABELS[job.protocol]:>12}", total=total)

    def update(self, task: Any, elapsed: float) -> None:
        if self._bar is not None and task is not None:
            self._bar.update(task, completed=elapsed)

    def done(self, task: Any) -> None:
        if self._bar is not None and task is not None:
            total = self._bar.tasks[task].total or 1
            self._bar.update(task, completed=total, total=total)


# ---------------------------------------------------------------------------- output


def _fmt_rate(bps: float | None) -> str:
    if bps is None:
        return "-"
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.2f} {unit}"
    return f"{bps:.0f} bit/s"


def render(report: dict[str, Any], console: Any, verbose: int = 0) -> None:
    """The side-by-side table (``verbose``: every rudp counter too)."""
    from rich.table import Table

    results = report["results"]
    console.print(f"[bold]profile[/bold] {report['profile']}: {report['description']}")
    for line in report["tc"]:
        console.print(f"  {line}", highlight=False)
    console.print(f"[bold]link[/bold] {report['link']} (seed {report['seed']})")
    job = report.get("job")
    if job:
        what = (
            f"{job['size']} B messages every {job['interval'] * 1e3:g} ms, {job['count']} of them"
            if job["workload"] != "bulk"
            else f"{units.format_size(job['size'])} transfer"
        )
        console.print(f"[bold]workload[/bold] {job['workload']}: {what}")
    for protocol, reason in report["skipped"].items():
        console.print(f"[yellow]{_LABELS[protocol]} not run:[/yellow] {reason}")
    if not results:
        return
    table = Table(show_header=True, header_style="bold")
    table.add_column("")
    for protocol in results:
        table.add_column(_LABELS[protocol], justify="right")
    latency_name = "round trip" if report["workload"] == "echo" else "one-way latency"

    def row(label: str, get: Any) -> None:
        table.add_row(label, *(get(r) for r in results.values()))

    def latency(key: str) -> Any:
        return lambda r: f"{r['latency_ms'][key]:.1f} ms" if "latency_ms" in r else "-"

    row("delivered", lambda r: r.get("delivered", "-"))
    row("goodput", lambda r: _fmt_rate(r.get("goodput_bps")))
    if report["workload"] != "bulk":
        for key in ("mean", "p50", "p90", "p99", "max"):
            row(f"{latency_name} {key}", latency(key))
    else:
        row("intact (sha256)", lambda r: {True: "yes", False: "NO"}.get(r.get("intact"), "-"))
    row("wire bytes / payload byte", lambda r: f"{r['overhead']:.2f}" if "overhead" in r else "-")
    row("retransmissions", lambda r: str(r.get("retransmissions", "-")))
    row("congestion control", lambda r: r.get("congestion_control", "-"))

    def counter(name: str) -> Any:
        return lambda r: str(r["rudp_stats"].get(name, 0)) if r.get("rudp_stats") else "-"

    if any(r.get("rudp_stats") for r in results.values()):
        row("FEC parity packets sent", counter("fec_parity_sent"))
        row("bundled copies sent", counter("bundled_segs"))
    console.print(table)
    for protocol, r in results.items():
        if "error" in r:
            console.print(f"[red]{_LABELS[protocol]}: {r['error']}[/red]")
        if verbose and r.get("rudp_stats"):
            stats = ", ".join(f"{k} {v}" for k, v in sorted(r["rudp_stats"].items()))
            console.print(f"[dim]rudp counters: {stats}[/dim]")


def _minor_label(value: float, _pos: int) -> str:
    """Label 20, 30, 50 (and 200, 300, 500...) between the decades, leave the rest blank."""
    lead = value / 10 ** int(f"{value:e}".split("e")[1])
    return f"{value:g}" if round(lead) in (2, 3, 5) and abs(lead - round(lead)) < 1e-6 else ""


def plot(report: dict[str, Any], path: str) -> None:
    """Latency CDF (left) and latency over time (right), one colour per protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    results = {p: r for p, r in report["results"].items() if r.get("series")}
    if not results:
        raise ValueError("plot: no latency samples to draw (the bulk workload has none)")
    kind = "round-trip time" if report["workload"] == "echo" else "one-way latency"
    fig, (cdf, over_time) = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    colours = {"rudp": "tab:green", "tcp": "tab:blue", "kcp": "tab:orange"}
    for protocol, r in results.items():
        lat = sorted(x for _, x in r["series"])
        frac = [(i + 1) / len(lat) for i in range(len(lat))]
        m = r["latency_ms"]
        label = (
            f"{_LABELS[protocol]}: mean {m['mean']:.0f}, p99 {m['p99']:.0f}, max {m['max']:.0f} ms"
        )
        cdf.step(lat, frac, where="post", color=colours[protocol], label=label, linewidth=1.8)
        t, y = zip(*sorted(r["series"]), strict=True)
        over_time.plot(
            t, y, color=colours[protocol], linewidth=0.9, alpha=0.85, label=_LABELS[protocol]
        )
    base = report.get("base_delay_ms")
    cdf.set_xscale("log")
    cdf.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    cdf.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(_minor_label))
    cdf.set_xlabel(f"{kind} (ms, log scale)")
    cdf.set_ylabel("fraction of messages at or below")
    cdf.set_title(f"{kind}: distribution")
    cdf.grid(True, which="both", alpha=0.3)
    cdf.legend(loc="lower right", fontsize=9)
    over_time.set_xlabel("send time (s)")
    over_time.set_ylabel(f"{kind} (ms)")
    over_time.set_title(f"{kind} over time")
    over_time.grid(True, alpha=0.3)
    over_time.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=9)
    if base:
        over_time.axhline(base, color="grey", linestyle="--", linewidth=0.8)
        cdf.axvline(base, color="grey", linestyle="--", linewidth=0.8)
        over_time.annotate(
            "profile delay", (0, base), textcoords="offset points", xytext=(4, -12),
            fontsize=8, color="grey",
        )  # fmt: skip
    fig.suptitle(
        f"rudp sim: profile {report['profile']} ({report['tc'][0].split(' netem ', 1)[-1]}), "
        f"{report['link']}, seed {report['seed']}",
        fontsize=11,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """``rudp sim``: 0 when every protocol ran cleanly, 1 on a failure, 2 on bad usage."""
    from rich.console import Console

    if getattr(args, "print_config", False):
        from rudp.cli import configuration_from_args, format_configuration

        print(format_configuration(configuration_from_args(args)))
        return 0
    if args.print_profile:
        profile = build_profile(args)
        print(f"# {profile.name}: {profile.description}")
        for line in profile.tc_commands("DEV_CLIENT_SIDE", "DEV_SERVER_SIDE"):
            print(line)
        return 0
    err = Console(stderr=True)
    report = simulate(args, console=None if args.json else err)
    profile = build_profile(args)
    report["base_delay_ms"] = profile.forward.delay * 1e3 + (
        profile.reverse.delay * 1e3 if args.workload == "echo" else 0
    )
    if args.plot:
        plot(report, args.plot)
    if args.json:
        for r in report["results"].values():
            r.pop("series", None)
        print(json.dumps(report, indent=None, default=str))
    else:
        render(report, Console(), getattr(args, "verbose", 0))
        if args.plot:
            Console().print(f"plot written to {args.plot}")
    failed = any("error" in r for r in report["results"].values())
    return 1 if failed or not report["results"] else 0


def main(argv: list[str] | None = None) -> int:
    """Run ``rudp sim`` without the ``rudp`` command (until cli.py registers it)."""
    parser = argparse.ArgumentParser(prog="rudp sim", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as exc:
        print(f"rudp sim: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
