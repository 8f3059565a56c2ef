"""Two network namespaces joined by an emulated link that carries every IP packet.

The client namespace (``CLIENT_ADDRESS``) and the server namespace
(``SERVER_ADDRESS``) see each other across one point-to-point link, so TCP
and UDP share exactly the same impairment. Two ways to build it, one
semantics (the profile's ``tc netem`` options):

- ``tc``: a veth pair with real ``tc qdisc ... netem`` on each end's egress
  (the exact :meth:`Profile.tc_commands`), where the kernel has ``sch_netem``.
  Offloads are turned down on the veths (transmit checksum off, which also
  stops UDP GSO and TSO; ``gso_max_segs 1``), because netem treats a GSO
  super-packet as one packet.
- ``tun``: TUN devices and the userspace forwarder (:mod:`netem.forwarder`)
  applying the same model the virtual link and the relay use.

``backend="auto"`` prefers real netem. Both need root and network
namespaces; :func:`capabilities` says what this machine can do and why not.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from netem.forwarder import CLIENT_ADDRESS, SERVER_ADDRESS
from netem.profile import Profile

__all__ = [
    "CLIENT_ADDRESS",
    "SERVER_ADDRESS",
    "Capabilities",
    "NamespaceLink",
    "capabilities",
    "prepare_veths_for_netem",
    "tc_setup_commands",
]

_counter = itertools.count()
#: Namespaces this module creates are named ``netem-<pid>-<n>-c|s``.
_PREFIX = "netem-"


def _remove_stale_namespaces() -> None:
    """Delete namespaces left behind by a NamespaceLink whose process has died."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        match = re.fullmatch(rf"{_PREFIX}(\d+)-\d+-[cs]", line.split()[0] if line.split() else "")
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            _run(["ip", "netns", "del", line.split()[0]], check=False)


def _run(args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True)


@dataclass(frozen=True)
class Capabilities:
    """What the namespace link can use here; ``reasons`` explains every ``False``."""

    root: bool
    netns: bool
    tun: bool
    veth: bool
    kernel_netem: bool
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def backends(self) -> list[str]:
        """Usable namespace-link backends, preferred first."""
        out = []
        if self.netns and self.veth and self.kernel_netem:
            out.append("tc")
        if self.netns and self.tun:
            out.append("tun")
        return out

    def describe(self) -> str:
        if self.backends:
            note = "; ".join(f"{k}: {v}" for k, v in self.reasons.items())
            return f"namespace link backends: {', '.join(self.backends)}" + (
                f" ({note})" if note else ""
            )
        return "no namespace link: " + "; ".join(f"{k}: {v}" for k, v in self.reasons.items())


@functools.cache
def capabilities() -> Capabilities:
    """Probe (once per process) for root, namespaces, TUN, veth and ``sch_netem``."""
    reasons: dict[str, str] = {}
    root = os.geteuid() == 0
    if not root:
        reasons["root"] = "not running as root (namespaces and TUN need it)"
        return Capabilities(False, False, False, False, False, reasons)
    probe = f"rudp-probe-{os.getpid()}-{next(_counter)}"
    netns = tun = veth = kernel_netem = False
    try:
        _run(["ip", "netns", "add", probe])
        netns = True
    except (OSError, subprocess.CalledProcessError) as exc:
        reasons["netns"] = f"cannot create a network namespace: {_why(exc)}"
    if netns:
        try:
            try:
                _run(["ip", "-n", probe, "link", "add", "pa", "type", "veth", "peer", "name", "pb"])
                veth = True
            except subprocess.CalledProcessError as exc:
                reasons["veth"] = f"cannot create a veth pair: {_why(exc)}"
            try:
                _run(["ip", "-n", probe, "link", "set", "dev", "lo", "up"])
                netem_on_lo = ["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"]
                _run(["ip", "netns", "exec", probe, *netem_on_lo])
                kernel_netem = True
            except (OSError, subprocess.CalledProcessError) as exc:
                reasons["kernel_netem"] = f"tc netem unavailable: {_why(exc)}"
        finally:
            _run(["ip", "netns", "del", probe], check=False)
    try:
        from netem.forwarder import open_tun

        os.close(open_tun(f"rp{os.getpid() % 100000}x"))
        tun = True
    except OSError as exc:
        reasons["tun"] = f"cannot create a TUN device: {exc}"
    return Capabilities(root, netns, tun, veth, kernel_netem, reasons)


def _why(exc: BaseException) -> str:
    if isinstance(exc, subprocess.CalledProcessError):
        return (exc.stderr or exc.stdout or str(exc)).strip().splitlines()[-1]
    return str(exc)


_TC_STATS = re.compile(
    r"Sent (\d+) bytes (\d+) pkt \(dropped (\d+), overlimits (\d+) requeues (\d+)\)"
)


def tc_setup_commands(profile: Profile, client_ns: str, server_ns: str) -> list[list[str]]:
    """The commands that join two existing namespaces by a veth pair with real netem.

    The veth ends are ``veth-c`` (client side; its egress is the forward
    direction) and ``veth-s``; the last two commands are exactly
    ``profile.tc_commands("veth-c", "veth-s")`` run inside the namespaces.
    """
    tmp_c, tmp_s = f"nv{os.getpid() % 100000}c", f"nv{os.getpid() % 100000}s"
    forward, reverse = profile.tc_commands("veth-c", "veth-s")
    commands = [
        ["ip", "link", "add", tmp_c, "type", "veth", "peer", "name", tmp_s],
        ["ip", "link", "set", "dev", tmp_c, "netns", client_ns, "name", "veth-c"],
        ["ip", "link", "set", "dev", tmp_s, "netns", server_ns, "name", "veth-s"],
    ]
    for ns, dev, local, peer in (
        (client_ns, "veth-c", CLIENT_ADDRESS, SERVER_ADDRESS),
        (server_ns, "veth-s", SERVER_ADDRESS, CLIENT_ADDRESS),
    ):
        commands += [
            ["ip", "-n", ns, "link", "set", "dev", "lo", "up"],
            # netem would treat a GSO super-packet as one packet (one loss draw for 64 KB)
            ["ip", "-n", ns, "link", "set", "dev", dev, "gso_max_segs", "1"],
            ["ip", "-n", ns, "addr", "add", local, "peer", peer, "dev", dev],
            ["ip", "-n", ns, "link", "set", "dev", dev, "up"],
        ]
    commands += [
        ["ip", "netns", "exec", client_ns, *forward.split()],
        ["ip", "netns", "exec", server_ns, *reverse.split()],
    ]
    return commands


def prepare_veths_for_netem(client_ns: str, server_ns: str) -> None:
    """Turn transmit checksum offload off on both veth ends (``ethtool -K DEV tx off``).

    netem draws loss, delay and duplication once per packet it sees, and a UDP
    GSO send (rudp uses them) is one packet of up to 64 datagrams. Without
    checksum offload a GSO send fails with EIO, and senders fall back to one
    datagram per packet; TSO goes with it, so TCP sends MTU-sized packets too.
    (Linux 6.11 and later segment UDP GSO in software instead of failing, so
    there a GSO sender's bursts still reach netem whole.)
    """
    from netem.vm_probe import disable_tx_checksum

    disable_tx_checksum(client_ns, "veth-c")
    disable_tx_checksum(server_ns, "veth-s")


class NamespaceLink:
    """A client and a server namespace joined by ``profile``'s link.

    ``with NamespaceLink(profile, seed=1) as link:`` then start programs with
    :meth:`popen` (``link.popen("client", [...])``) and reach the server at
    ``SERVER_ADDRESS``. Everything is removed on exit, also after errors.
    """

    def __init__(self, profile: Profile, *, backend: str = "auto", seed: int = 0) -> None:
        caps = capabilities()
        usable = caps.backends
        if backend == "auto":
            if not usable:
                raise RuntimeError(caps.describe())
            backend = usable[0]
        elif backend not in ("tc", "tun"):
            raise ValueError(f"backend must be auto, tc or tun, got {backend!r}")
        elif backend not in usable:
            raise RuntimeError(f"namespace link backend {backend!r} unavailable: {caps.describe()}")
        self.profile = profile
        self.backend = backend
        self.seed = seed
        tag = f"{os.getpid()}-{next(_counter)}"
        self.namespaces = {"client": f"{_PREFIX}{tag}-c", "server": f"{_PREFIX}{tag}-s"}
        self.addresses = {"client": CLIENT_ADDRESS, "server": SERVER_ADDRESS}
        self._forwarder: subprocess.Popen[str] | None = None
        self._up = False

    # ------------------------------------------------------------ life cycle

    def start(self) -> NamespaceLink:
        _remove_stale_namespaces()
        try:
            for ns in self.namespaces.values():
                _run(["ip", "netns", "add", ns])
            self._up = True
            if self.backend == "tc":
                client, server = self.namespaces["client"], self.namespaces["server"]
                commands = tc_setup_commands(self.profile, client, server)
                for cmd in commands[:-2]:
                    _run(cmd)
                prepare_veths_for_netem(client, server)
                for cmd in commands[-2:]:
                    _run(cmd)
            else:
                self._start_forwarder()
        except BaseException:
            self.close()
            raise
        return self

    def _start_forwarder(self) -> None:
        toml = _profile_toml(self.profile)
        self._forwarder = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "netem.forwarder",
                "--client-ns",
                self.namespaces["client"],
                "--server-ns",
                self.namespaces["server"],
                "--profile-toml",
                toml,
                "--seed",
                str(self.seed),
                "--device-prefix",
                f"rt{os.getpid() % 100000}x{next(_counter)}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self._forwarder.stdout.readline() if self._forwarder.stdout else ""
        if not line:
            err = self._forwarder.stderr.read() if self._forwarder.stderr else ""
            self._forwarder.wait()
            raise RuntimeError(f"netem forwarder failed to start: {err.strip()}")

    def close(self) -> dict[str, Any] | None:
        """Tear everything down; returns the link's final statistics when it has them."""
        stats = None
        if self.backend == "tc" and self._up:
            with contextlib.suppress(Exception):
                stats = self.stats()
        if self._forwarder is not None:
            with contextlib.suppress(ProcessLookupError):
                self._forwarder.send_signal(signal.SIGTERM)
            try:
                out, _ = self._forwarder.communicate(timeout=10)
                lines = [ln for ln in out.splitlines() if ln.strip()]
                if lines:
                    stats = json.loads(lines[-1])
            except subprocess.TimeoutExpired:
                self._forwarder.kill()
                self._forwarder.communicate()
            self._forwarder = None
        if self._up:
            for ns in self.namespaces.values():
                _run(["ip", "netns", "del", ns], check=False)
            self._up = False
        self.final_stats = stats
        return stats

    def __enter__(self) -> NamespaceLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ use

    def command(self, side: str, argv: list[str]) -> list[str]:
        """``argv`` wrapped to run inside ``side``'s namespace ("client" or "server")."""
        return ["ip", "netns", "exec", self.namespaces[side], *argv]

    def popen(self, side: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the client's or the server's namespace."""
        return subprocess.Popen(self.command(side, argv), **kwargs)

    def stats(self) -> dict[str, Any]:
        """Cumulative per-direction statistics of the link (format depends on the backend)."""
        if self.backend == "tc":
            out = {}
            for direction, side, dev in (
                ("forward", "client", "veth-c"),
                ("reverse", "server", "veth-s"),
            ):
                ns = self.namespaces[side]
                show = ["ip", "netns", "exec", ns, "tc", "-s", "qdisc", "show", "dev", dev]
                text = _run(show).stdout
                match = _TC_STATS.search(text)
                if match:
                    sent, pkts, dropped, _, _ = map(int, match.groups())
                    out[direction] = {"sent_bytes": sent, "delivered": pkts, "dropped": dropped}
            return out
        proc = self._forwarder
        if proc is None or proc.stdout is None:
            raise RuntimeError("link not running")
        proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.strip():
                return json.loads(line)
        raise RuntimeError("netem forwarder did not report its statistics")


def _profile_toml(profile: Profile) -> str:
    """A profile as TOML the forwarder can load (both directions spelled out)."""
    lines = [f"name = {json.dumps(profile.name)}"]
    for direction, imp in (("forward", profile.forward), ("reverse", profile.reverse)):
        lines.append(f"[{direction}]")
        lines.append(f"netem = {json.dumps(imp.tc_args())}")
    return "\n".join(lines) + "\n"
