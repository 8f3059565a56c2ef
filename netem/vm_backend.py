"""``rudp sim --backend vm``: the sim's workloads under real ``tc netem`` in the qemu VM.

For machines whose kernel has no ``sch_netem`` (where ``--backend auto``
falls back to the userspace emulator): the profile's own ``tc`` commands run
on a veth pair between two namespaces inside the guest (:mod:`netem.vm`), the
workload's server in one and its client in the other. Exact (the guest's
clock is virtual, so latencies are netem's to the microsecond whatever the
host load) but slow: about 20 s to boot, once per process, and CPU-bound
code runs 8-15x slower than on the host, so bulk goodput measures the
emulated CPU rather than the protocol. The link's randomness is the kernel's:
``--seed`` does not apply. Jobs share one VM and run one after another.

Importing this module registers the backend with :mod:`netem.harness`.
"""

from __future__ import annotations

import atexit
import json
import threading
import uuid
from pathlib import Path
from typing import Any

from netem import harness
from netem.harness import Backend, Job, JobResult, Progress
from netem.profile import Profile
from netem.vm import VM, vm_available
from netem.vm_probe import DEV_A, DEV_B

__all__ = ["BACKEND", "run_job", "shared_vm"]

_PROBE = str(Path(__file__).with_name("vm_probe.py"))
_shared: VM | None = None
_shared_lock = threading.Lock()


def shared_vm() -> VM:
    """This process's VM, booted on first use and powered off at exit."""
    global _shared
    with _shared_lock:
        if _shared is None or not _shared.alive:
            _shared = VM().start()
            atexit.register(_shared.close)
        return _shared


def _last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.splitlines()):
        if line.strip().startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return {"error": f"no report (output: {text.strip()[-300:]!r})"}


def run_job(vm: VM, profile: Profile, job: Job) -> JobResult:
    """Run one job's server and client across ``profile``'s link inside ``vm``."""
    forward, reverse = profile.tc_commands(DEV_A, DEV_B)
    guest_timeout = job.timeout + 30
    spec = {
        "server": job.argv("server"),
        "client": job.argv("client"),
        "timeout": guest_timeout,
        "forward": [forward],
        "reverse": [reverse],
    }
    tag = uuid.uuid4().hex
    spec_file, out_file = vm.workdir / f"pair-{tag}.json", vm.workdir / f"pair-{tag}.out.json"
    spec_file.write_text(json.dumps(spec))
    # Host wall time: the guest clock runs near real time, but booting interpreters is slow.
    vm.run(
        [vm.python, _PROBE, "pair", str(spec_file), "--out", str(out_file)],
        timeout=3 * guest_timeout + 180,
    ).check()
    raw = json.loads(out_file.read_text())
    server, client = _last_json(raw["server_stdout"]), _last_json(raw["client_stdout"])
    for side, report in (("server", server), ("client", client)):
        if "error" in report and raw.get(f"{side}_stderr"):
            report["error"] += f"; stderr: {raw[f'{side}_stderr'][-500:]}"
    wire = {}
    for direction in ("forward", "reverse"):
        for qdisc in raw["qdisc"][direction]:  # what left the qdisc, less Ethernet headers
            wire[direction] = {
                "bytes": qdisc["bytes"] - 14 * qdisc["packets"],
                "packets": qdisc["packets"],
            }
    error = None
    if raw.get("client_timed_out") or raw.get("server_timed_out"):
        error = f"did not finish within {guest_timeout:g} s of guest time"
    link = f"real tc netem in a qemu VM (Linux {vm.kernel_release}, exact virtual clock)"
    return JobResult(server, client, wire, link, error)


def _run(profile: Profile, seed: int, job: Job, progress: Progress | None) -> JobResult:
    del seed  # netem draws from the kernel's randomness
    result = run_job(shared_vm(), profile, job)
    if progress is not None:
        progress(job.expected_duration)
    return result


def _carries(protocol: str) -> str | None:
    ok, reason = vm_available()
    return None if ok else f"the netem VM cannot run here: {reason}"


def _describe() -> str:
    return (
        "real tc netem inside a qemu VM (exact, for kernels without sch_netem; "
        "slow: ~20 s to boot, CPU-bound code 8-15x slower)"
    )


BACKEND = Backend("vm", _run, _carries, _describe)
harness.register_backend(BACKEND)
