"""Run a workload's server and client across an emulated link and collect what happened.

A :class:`Job` names a protocol and a workload (see :mod:`netem.workloads`);
a link backend runs it on a fresh link built from the profile and seed, and
returns a :class:`JobResult`: the server's and the client's JSON reports and
the link's byte counts per direction (IP bytes, headers included).

Backends (``BACKENDS``):
- ``netns``: the namespace link (real ``tc netem`` or the TUN forwarder);
  carries TCP and UDP. Needs root.
- ``relay``: the UDP relay on loopback (a separate process, microsecond
  timers); UDP protocols only, unprivileged.
- another module may add one (``netem.vm`` adds ``vm``): a callable
  ``(profile, seed, job, progress) -> JobResult`` plus a description of
  what it carries, registered with :func:`register_backend`.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from netem.netns import NamespaceLink, capabilities
from netem.profile import Profile

__all__ = [
    "BACKENDS",
    "Backend",
    "Job",
    "JobResult",
    "Progress",
    "load_plugins",
    "register_backend",
    "workload_argv",
]

_UDP_HEADERS = 28  # IPv4 + UDP, what the relay's payload counts lack

Progress = Callable[[float], None]


@dataclass(frozen=True)
class Job:
    """One protocol running one workload (the arguments of netem.workloads)."""

    protocol: str
    workload: str
    count: int = 500
    size: int = 16
    interval: float = 0.02
    timeout: float = 120.0
    tcp_congestion: str | None = None
    config_toml: str | None = None
    kcp_interval: int = 10
    kcp_flush: str = "all"

    def argv(self, role: str) -> list[str]:
        return workload_argv(self, role)

    @property
    def expected_duration(self) -> float:
        return self.count * self.interval if self.workload != "bulk" else 0.0


def workload_argv(job: Job, role: str) -> list[str]:
    """``python -m netem.workloads ROLE ...`` for ``job`` (without --bind/--connect)."""
    argv = [sys.executable, "-m", "netem.workloads", role, "--protocol", job.protocol]
    argv += ["--workload", job.workload, "--count", str(job.count), "--size", str(job.size)]
    argv += ["--interval", f"{job.interval}s", "--timeout", f"{job.timeout}s"]
    argv += ["--kcp-interval", str(job.kcp_interval), "--kcp-flush", job.kcp_flush]
    if job.tcp_congestion:
        argv += ["--tcp-congestion", job.tcp_congestion]
    if job.config_toml:
        argv += ["--config-toml", job.config_toml]
    return argv


@dataclass
class JobResult:
    server: dict[str, Any]
    client: dict[str, Any]
    #: IP bytes and packets offered to the link per direction ("forward"/"reverse").
    wire: dict[str, dict[str, int]] = field(default_factory=dict)
    link: str = ""
    error: str | None = None


@dataclass(frozen=True)
class Backend:
    name: str
    run: Callable[[Profile, int, Job, Progress | None], JobResult]
    #: Protocols it can carry here, and why not the others.
    carries: Callable[[str], str | None]
    describe: Callable[[], str]


def _last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return {"error": f"no report (output: {text.strip()[-300:]!r})"}


def _wait(proc: subprocess.Popen[str], job: Job, started: float, progress: Progress | None) -> str:
    """Wait for a process to finish, reporting progress; kill it past the job's timeout."""
    deadline = started + job.timeout + 30
    while True:
        try:
            out, _ = proc.communicate(timeout=0.2)
            return out
        except subprocess.TimeoutExpired:
            if progress is not None:
                progress(time.monotonic() - started)
            if time.monotonic() > deadline:
                proc.kill()
                out, _ = proc.communicate()
                return out


def _run_pair(
    job: Job,
    start: Callable[[str, list[str]], subprocess.Popen[str]],
    server_bind: str,
    target: Callable[[int], tuple[str, int]],
    progress: Progress | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    server = start("server", [*job.argv("server"), "--bind", f"{server_bind}:0"])
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line:
            out, _ = server.communicate(timeout=10)
            return {"error": f"server did not start: {out.strip()[-300:]}"}, {}
        port = json.loads(line)["port"]
        host, tport = target(port)
        started = time.monotonic()
        client = start("client", [*job.argv("client"), "--connect", f"{host}:{tport}"])
        client_out = _wait(client, job, started, progress)
        server_out = _wait(server, job, started, None)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    return _last_json(server_out), _last_json(client_out)


# ---------------------------------------------------------------------------- netns


def _netns_run(profile: Profile, seed: int, job: Job, progress: Progress | None) -> JobResult:
    with NamespaceLink(profile, seed=seed) as link:

        def start(side: str, argv: list[str]) -> subprocess.Popen[str]:
            return link.popen(side, argv, stdout=subprocess.PIPE, text=True)

        server_host = link.addresses["server"]
        server, client = _run_pair(job, start, server_host, lambda p: (server_host, p), progress)
        description = (
            f"namespace link ({'real tc netem' if link.backend == 'tc' else 'TUN forwarder'})"
        )
    stats = link.final_stats or {}
    wire = {}
    for direction in ("forward", "reverse"):
        d = stats.get(direction, {})
        if "offered" in d:  # forwarder: IP packets
            wire[direction] = {"bytes": d["offered_bytes"], "packets": d["offered"]}
        elif "sent_bytes" in d:  # tc: frames that left the qdisc (Ethernet header included)
            wire[direction] = {
                "bytes": d["sent_bytes"] - 14 * d["delivered"],
                "packets": d["delivered"],
            }
    return JobResult(server, client, wire, description)


def _netns_carries(protocol: str) -> str | None:
    caps = capabilities()
    return None if caps.backends else caps.describe()


def _netns_describe() -> str:
    caps = capabilities()
    if "tc" in caps.backends:
        return "namespace link with real tc netem"
    if caps.backends:
        return "namespace link through the userspace TUN forwarder (no sch_netem in this kernel)"
    return caps.describe()


# ---------------------------------------------------------------------------- relay


def _relay_run(profile: Profile, seed: int, job: Job, progress: Progress | None) -> JobResult:
    from netem.netns import _profile_toml

    relay: subprocess.Popen[str] | None = None
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as profile_file:
        profile_file.write(_profile_toml(profile))
        profile_file.flush()

        def start(side: str, argv: list[str]) -> subprocess.Popen[str]:
            return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)

        def target(port: int) -> tuple[str, int]:
            nonlocal relay
            relay = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "netem.relay",
                    "--profile",
                    profile_file.name,
                    "--server",
                    f"127.0.0.1:{port}",
                    "--seed",
                    str(seed),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert relay.stdout is not None
            host, rport = json.loads(relay.stdout.readline())["listen"]
            return host, rport

        try:
            server, client = _run_pair(job, start, "127.0.0.1", target, progress)
        finally:
            stats: dict[str, Any] = {}
            if relay is not None:
                relay.terminate()
                out, _ = relay.communicate(timeout=10)
                stats = _last_json(out)
    wire = {
        direction: {
            "bytes": stats[direction]["offered_bytes"] + _UDP_HEADERS * stats[direction]["offered"],
            "packets": stats[direction]["offered"],
        }
        for direction in ("forward", "reverse")
        if direction in stats
    }
    return JobResult(server, client, wire, "UDP relay on loopback")


def _relay_carries(protocol: str) -> str | None:
    if protocol == "tcp":
        return "the UDP relay carries only UDP; TCP needs the namespace link (root)"
    return None


# ---------------------------------------------------------------------------- virtual


def _virtual_run(profile: Profile, seed: int, job: Job, progress: Progress | None) -> JobResult:
    if job.protocol == "rudp":
        return _virtual_rudp(profile, seed, job, progress)
    return _virtual_kcp(profile, seed, job, progress)


def _virtual_rudp(profile: Profile, seed: int, job: Job, progress: Progress | None) -> JobResult:
    """rudp's sans-I/O connection and listener over a VirtualLink, driven by their deadlines."""
    import random

    from netem.virtual import VirtualLink
    from netem.workloads import BULK, MESSAGE, Echoes, _configuration, bulk_payload
    from rudp.connection import Connection, ConnectionState
    from rudp.listener import Listener

    client_addr, server_addr = ("10.0.0.1", 40000), ("10.0.0.2", 4000)
    config = _configuration(job.config_toml)
    link = VirtualLink(profile, seed)
    rng = random.Random(seed)
    listener = Listener(config, secret=rng.randbytes(32))
    client = Connection(config, is_client=True, cid=rng.getrandbits(64))
    server: Connection | None = None
    now = 0.0

    def ns(t: float) -> int:
        return round(t * 1e9)

    def pump() -> None:
        nonlocal server
        for _ in range(1000):
            moved = False
            for direction, conn in ((0, client), (1, server)):
                if conn is None:
                    continue
                for datagram in conn.datagrams_to_send(now):
                    link.send(direction, datagram, now)
                    moved = True
                while conn.next_event() is not None:
                    pass
            for packet, _ in listener.datagrams_to_send():
                link.send(1, packet, now)
                moved = True
            if not moved:
                return

    samples: list[tuple[int, int]] = []
    echoes = Echoes(job.size)
    rtts = echoes.rtts
    inbox = {0: bytearray(), 1: bytearray()}  # bytes read by client (0) and server (1)
    payload = BULK.pack(0, job.size) + bulk_payload(job.size) if job.workload == "bulk" else b""
    sent_bytes = got = end_ns = seq = 0
    base: float | None = None
    client.connect(server_addr, now)
    pump()
    limit = job.timeout

    def finished() -> bool:
        if job.workload == "messages":
            return len(samples) >= job.count
        if job.workload == "echo":
            return len(rtts) >= job.count
        return got >= len(payload)

    while now < limit and not finished():
        if base is None and client.state is ConnectionState.ESTABLISHED:
            base = now
        app_due = None
        if base is not None and job.workload != "bulk" and seq < job.count:
            app_due = base + seq * job.interval
        times = [link.next_delivery(), client.get_timer(now), app_due]
        if server is not None:
            times.append(server.get_timer(now))
        due = [t for t in times if t is not None]
        if not due:
            break
        now = max(now, min(due))
        for direction, data in link.receive(now):
            if direction == 1:
                client.receive_datagram(data, server_addr, now)
            elif server is not None and server.state is not ConnectionState.TERMINATED:
                server.receive_datagram(data, client_addr, now)
                if server.state is ConnectionState.TERMINATED:
                    server = None
            if direction == 0 and server is None:
                server = listener.receive_datagram(data, client_addr, now) or server
        client.handle_timer(now)
        if server is not None:
            server.handle_timer(now)
        if app_due is not None and now >= app_due:
            if job.workload == "echo":
                client.send(echoes.make(seq, ns(now)))
            else:
                client.send(MESSAGE.pack(seq, ns(now)) + bytes(max(0, job.size - MESSAGE.size)))
            seq += 1
        if base is not None and job.workload == "bulk" and sent_bytes < len(payload):
            room = client.send_window_free
            if room:
                piece = payload[sent_bytes : sent_bytes + min(room, 65536)]
                client.send(piece)
                sent_bytes += len(piece)
        for side, conn in ((0, client), (1, server)):
            while conn is not None and conn.readable:
                inbox[side] += conn.read()
        box = inbox[1]
        if job.workload == "bulk":
            got += len(box)
            box.clear()
            end_ns = ns(now)
        else:
            while len(box) >= job.size:
                message, box[:] = bytes(box[: job.size]), box[job.size :]
                if job.workload == "messages":
                    samples.append((MESSAGE.unpack_from(message)[1], ns(now)))
                elif server is not None:
                    server.send(message)
            while len(inbox[0]) >= job.size:
                echoes.returned(bytes(inbox[0][: job.size]), ns(now))
                del inbox[0][: job.size]
        pump()
        if progress is not None:
            progress(now)
    stats = link.stats
    wire = {
        name: {"bytes": st.offered_bytes + _UDP_HEADERS * st.offered, "packets": st.offered}
        for name, st in (("forward", stats[0]), ("reverse", stats[1]))
    }
    client_report: dict[str, Any] = {"stats": client.stats()}
    client_report["retransmits"] = client_report["stats"].get("retrans_segs")
    server_report: dict[str, Any] = {}
    if server is not None:
        server_report["retransmits"] = server.stats().get("retrans_segs")
    if job.workload == "messages":
        server_report.update(samples=samples, bytes=len(samples) * job.size)
    elif job.workload == "echo":
        client_report["rtts"] = rtts
    else:
        server_report.update(start=0, end=end_ns, bytes=max(0, got - BULK.size))
    error = None if finished() else f"did not finish within {job.timeout:g}s of virtual time"
    return JobResult(server_report, client_report, wire, "virtual time (in process)", error)


def _virtual_kcp(profile: Profile, seed: int, job: Job, progress: Progress | None) -> JobResult:
    """KCP in virtual time over a VirtualLink: KCP's own test.cpp loop, milliseconds exact."""
    from kcp import KCP

    from netem.virtual import VirtualLink
    from netem.workloads import BULK, KCP_CONV, MESSAGE, Echoes, bulk_payload

    link = VirtualLink(profile, seed)
    now_ms = 0
    pushes = [0, 0]
    sns: list[set[int]] = [set(), set()]

    def make(side: int) -> Any:
        kcp = KCP(KCP_CONV, no_delay=True, update_interval=job.kcp_interval, resend_count=2)
        kcp.set_performance_options(True, job.kcp_interval, 2, True)
        kcp.set_window_size(128, 128)

        def output(_k: Any, data: bytes) -> None:
            offset = 0
            while offset + 24 <= len(data):
                cmd = data[offset + 4]
                sn = int.from_bytes(data[offset + 12 : offset + 16], "little")
                if cmd == 81:
                    pushes[side] += 1
                    sns[side].add(sn)
                offset += 24 + int.from_bytes(data[offset + 20 : offset + 24], "little")
            link.send(side, data, now_ms / 1000)

        kcp.include_outbound_handler(output)
        return kcp

    ends = (make(0), make(1))  # client, server
    flush_send = job.kcp_flush in ("send", "all")
    flush_input = job.kcp_flush == "all"

    def send(side: int, data: bytes) -> None:
        ends[side].enqueue(data)
        if flush_send:
            ends[side].update(now_ms)
            ends[side].flush()

    samples: list[tuple[int, int]] = []
    echoes = Echoes(job.size)
    rtts = echoes.rtts
    payload = BULK.pack(0, job.size) + bulk_payload(job.size) if job.workload == "bulk" else b""
    sent_bytes = got_bytes = 0
    end_ns = 0
    seq = 0
    limit_ms = int(job.timeout * 1000)
    while now_ms < limit_ms:
        for direction, data in link.receive(now_ms / 1000):
            receiver = 1 - direction  # forward (0) arrives at the server (1)
            ends[receiver].receive(data)
            if flush_input:
                ends[receiver].update(now_ms)
                ends[receiver].flush()
        if job.workload == "bulk":
            while sent_bytes < len(payload) and ends[0].get_outbound_packets() < 256:
                send(0, payload[sent_bytes : sent_bytes + 65536])
                sent_bytes += len(payload[sent_bytes : sent_bytes + 65536])
        elif seq < job.count and now_ms >= round(seq * job.interval * 1000):
            if job.workload == "echo":
                send(0, echoes.make(seq, now_ms * 1_000_000))
            else:
                now_ns = now_ms * 1_000_000
                send(0, MESSAGE.pack(seq, now_ns) + bytes(max(0, job.size - MESSAGE.size)))
            seq += 1
        for m in ends[1].get_all_received():
            if job.workload == "messages":
                samples.append((MESSAGE.unpack_from(m)[1], now_ms * 1_000_000))
            elif job.workload == "echo":
                send(1, bytes(m))
            else:
                got_bytes += len(m)
                end_ns = now_ms * 1_000_000
        for m in ends[0].get_all_received():
            echoes.returned(bytes(m), now_ms * 1_000_000)
        for kcp in ends:
            kcp.update(now_ms)
        finished = (
            len(samples) >= job.count
            if job.workload == "messages"
            else len(rtts) >= job.count
            if job.workload == "echo"
            else got_bytes >= len(payload)
        )
        if finished:
            break
        now_ms += 1
        if progress is not None and now_ms % 1000 == 0:
            progress(now_ms / 1000)
    stats = link.stats
    wire = {
        name: {"bytes": st.offered_bytes + _UDP_HEADERS * st.offered, "packets": st.offered}
        for name, st in (("forward", stats[0]), ("reverse", stats[1]))
    }
    client = {"retransmits": pushes[0] - len(sns[0]), "data_segments_out": pushes[0]}
    server = {"retransmits": pushes[1] - len(sns[1]), "data_segments_out": pushes[1]}
    if job.workload == "messages":
        server.update(samples=samples, bytes=len(samples) * job.size)
    elif job.workload == "echo":
        client["rtts"] = rtts
    else:
        server.update(start=0, end=end_ns, bytes=got_bytes - BULK.size)
    error = None if finished else f"did not finish within {job.timeout:g}s of virtual time"
    return JobResult(server, client, wire, "virtual time (in process)", error)


def _virtual_carries(protocol: str) -> str | None:
    if protocol == "tcp":
        return "TCP lives in the kernel: it cannot run in virtual time"
    return None


BACKENDS: dict[str, Backend] = {
    "netns": Backend("netns", _netns_run, _netns_carries, _netns_describe),
    "relay": Backend(
        "relay", _relay_run, _relay_carries, lambda: "UDP relay on loopback (unprivileged)"
    ),
    "virtual": Backend(
        "virtual", _virtual_run, _virtual_carries, lambda: "virtual time, in process (no sockets)"
    ),
}


def register_backend(backend: Backend) -> None:
    """Add a link backend (e.g. ``vm``) for ``rudp sim --backend NAME``."""
    BACKENDS[backend.name] = backend


#: Modules that register backends when imported (missing ones are skipped).
PLUGINS = ("netem.vm_backend",)
#: Why a plugin could not be loaded, by module name.
PLUGIN_ERRORS: dict[str, str] = {}


def load_plugins() -> None:
    """Import the backend plugins that exist here (each registers itself)."""
    for name in PLUGINS:
        if name in PLUGIN_ERRORS or any(b.run.__module__ == name for b in BACKENDS.values()):
            continue
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                PLUGIN_ERRORS[name] = repr(exc)
            else:
                PLUGIN_ERRORS[name] = "not installed"
        except Exception as exc:  # a broken plugin must not break the other backends
            PLUGIN_ERRORS[name] = repr(exc)
