"""A two-namespace veth link with real ``tc netem``, and timestamped UDP probes across it.

Runs inside the netem VM (see :mod:`netem.vm`), as root, under the host's
python3; standard library only, so it also works as a plain script
(``python3 netem/vm_probe.py link|probe|plan|pair|qdisc|unlink ...``): ``plan``
runs many link + probe scenarios in one process, ``pair`` runs a workload's
server and client across the link (``rudp sim --backend vm``). The statistics
(:func:`probe_stats`) are shared with the host, which computes the same
numbers for the userspace emulator fed the same probe schedule.

The link is quiet: no IPv6, static neighbours (no ARP), and transmit checksum
offload off so that UDP GSO sends reach netem as single datagrams. Every
packet netem counts is the test's own.

Why probes measure what netem does and nothing else: both namespaces share the
guest's one clock; the send time is read just before ``send()`` and the arrival
time is the kernel's receive timestamp (``SO_TIMESTAMPNS``, taken when the veth
peer hands the packet to the stack), so how late the receiving process wakes
up does not count. Warm-up probes run first, because a cold interpreter and
first-touch file I/O make the (virtual) guest clock jump.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import fcntl
import json
import math
import os
import select
import shlex
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence

__all__ = [
    "ADDR_A",
    "ADDR_B",
    "DEV_A",
    "DEV_B",
    "NS_A",
    "NS_B",
    "Netns",
    "ProbeStats",
    "disable_tx_checksum",
    "flow_stats",
    "flow_times",
    "make_link",
    "probe",
    "probe_stats",
    "qdisc_stats",
    "remove_link",
    "run_pair",
    "run_scenario",
    "udp_rcvbuf_errors",
]

#: Namespace A sends the forward direction through DEV_A; B the reverse direction through DEV_B.
NS_A, NS_B = "rudp-a", "rudp-b"
DEV_A, DEV_B = "veth-a", "veth-b"
#: Documentation addresses (RFC 5737): they exist only inside the guest's two namespaces.
ADDR_A, ADDR_B = "192.0.2.1", "192.0.2.2"
MAC_A, MAC_B = "02:72:75:64:70:0a", "02:72:75:64:70:0b"
PORT = 47000

_CLONE_NEWNET = 0x40000000
_SO_TIMESTAMPNS = 35  # also SCM_TIMESTAMPNS
_SIOCETHTOOL, _ETHTOOL_STXCSUM = 0x8946, 0x17


def _sh(argv: Sequence[str]) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{shlex.join(argv)}` failed: {proc.stderr.strip()}")
    return proc.stdout


def remove_link() -> None:
    for ns in (NS_A, NS_B):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _link_exists() -> bool:
    try:
        for ns, dev in ((NS_A, DEV_A), (NS_B, DEV_B)):
            with Netns(ns):
                socket.if_nametoindex(dev)
    except OSError:
        return False
    return True


def _create_link() -> None:
    """The namespaces and veth pair; quiet, so that every packet netem sees is the test's.

    No IPv6 (router solicitations, MLD reports) and no ARP (static neighbours):
    otherwise netem's counters and losses would include the odd stray packet.
    """
    remove_link()
    for ns in (NS_A, NS_B):
        _sh(["ip", "netns", "add", ns])
        with Netns(ns):
            for conf in ("all", "default"):
                with open(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6", "w") as f:
                    f.write("1")
    veth = ["ip", "link", "add", DEV_A, "address", MAC_A, "netns", NS_A, "type", "veth"]
    _sh([*veth, "peer", "name", DEV_B, "address", MAC_B, "netns", NS_B])
    ends = ((NS_A, DEV_A, ADDR_A, ADDR_B, MAC_B), (NS_B, DEV_B, ADDR_B, ADDR_A, MAC_A))
    for ns, dev, addr, peer, peer_mac in ends:
        _sh(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev])
        _sh(["ip", "-n", ns, "neigh", "add", peer, "lladdr", peer_mac, "dev", dev])
        _sh(["ip", "-n", ns, "link", "set", dev, "up"])
        _sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        disable_tx_checksum(ns, dev)


def disable_tx_checksum(ns: str, dev: str) -> None:
    """Turn a device's transmit checksum offload off (``ethtool -K DEV tx off``).

    Why: netem draws loss, delay and duplication once per skb, and a UDP GSO
    send is one skb of up to 64 datagrams, so "10% loss" would drop whole
    bursts. Without checksum offload a GSO send fails with EIO and rudp falls
    back to one datagram per skb. (``gso_max_segs 1`` does not do it: the GSO
    skb still passes the qdisc whole and is split only when transmitted.)
    """
    value = ctypes.create_string_buffer(struct.pack("II", _ETHTOOL_STXCSUM, 0))
    request = struct.pack("16sP", dev.encode(), ctypes.addressof(value)).ljust(40, b"\0")
    with Netns(ns), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock, _SIOCETHTOOL, request)


def make_link(forward: str | Sequence[str] = (), reverse: str | Sequence[str] = ()) -> None:
    """Namespaces A and B joined by veth, with fresh netem qdiscs on each side's egress.

    ``forward``/``reverse`` are netem option strings (``"delay 25ms loss 10%"``,
    applied as ``tc qdisc add dev DEV root netem ...``) or lists of complete
    ``tc`` command lines, run as given inside the sending side's namespace. The
    namespaces and veth are made once and kept (every process spawned in the
    guest costs a good fraction of a second); each call replaces the qdiscs.
    """
    if _link_exists():
        for ns, dev in ((NS_A, DEV_A), (NS_B, DEV_B)):
            subprocess.run(
                ["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], capture_output=True
            )
    else:
        _create_link()
    for ns, dev, spec in ((NS_A, DEV_A, forward), (NS_B, DEV_B, reverse)):
        if isinstance(spec, str):
            commands = [f"tc qdisc add dev {dev} root netem {spec}"] if spec.strip() else []
        else:
            commands = list(spec)
        with Netns(ns):  # children inherit the namespace
            for command in commands:
                _sh(shlex.split(command))


def qdisc_stats(ns: str, dev: str) -> list[dict]:
    """``tc -s -j qdisc show`` for one device, parsed."""
    return json.loads(_sh(["tc", "-n", ns, "-s", "-j", "qdisc", "show", "dev", dev]) or "[]")


def udp_rcvbuf_errors(ns: str) -> int:
    """UDP receive-buffer drops in a namespace (a probe lost there is not netem's doing)."""
    with Netns(ns), open("/proc/self/net/snmp") as f:
        lines = [ln.split() for ln in f]
    udp = [ln for ln in lines if ln and ln[0] == "Udp:"]
    row = dict(zip(udp[0][1:], udp[1][1:], strict=True))
    return int(row.get("RcvbufErrors", 0))


class Netns:
    """Enter a named network namespace for the calling thread (sockets keep theirs)."""

    _libc = ctypes.CDLL(None, use_errno=True)

    def __init__(self, name: str) -> None:
        self.name = name

    def _set(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            if self._libc.setns(fd, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns({path})")
        finally:
            os.close(fd)

    def __enter__(self) -> None:
        self._home = os.open("/proc/self/ns/net", os.O_RDONLY)
        self._set(f"/run/netns/{self.name}")

    def __exit__(self, *exc: object) -> None:
        try:
            if self._libc.setns(self._home, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns(home)")
        finally:
            os.close(self._home)


_FLOWS = {  # name: (sender ns, sender addr, receiver ns, receiver addr)
    "forward": (NS_A, ADDR_A, NS_B, ADDR_B),
    "reverse": (NS_B, ADDR_B, NS_A, ADDR_A),
}


def probe(
    count: int,
    interval: float,
    size: int = 64,
    flows: Iterable[str] = ("forward",),
    settle: float = 2.0,
    warmup: int = 20,
) -> dict:
    """Send ``count`` probes per flow, one every ``interval`` seconds; return raw times.

    Result: ``{flow: {"sent": [t_ns, ...] (index = seq), "arrivals": [[seq, t_ns], ...],
    "warmup_sent": n, "warmup_arrivals": n}}`` plus ``"rcvbuf_errors"``. Times are
    the guest's CLOCK_REALTIME in ns (see :func:`flow_stats`).
    """
    if size < 8:
        raise ValueError(f"size must be >= 8 bytes, got {size}")
    flows = list(flows)
    errors_before = {ns: udp_rcvbuf_errors(ns) for ns in (NS_A, NS_B)}
    senders, receivers = {}, {}
    for i, flow in enumerate(flows):
        tx_ns, tx_addr, rx_ns, rx_addr = _FLOWS[flow]
        with Netns(rx_ns):
            rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            rx.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
            rx.bind((rx_addr, PORT + i))
            rx.setblocking(False)
        with Netns(tx_ns):
            tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tx.bind((tx_addr, 0))
            tx.connect((rx_addr, PORT + i))
        senders[flow], receivers[rx.fileno()] = tx, (flow, rx)
    results = {
        flow: {"sent": [], "arrivals": [], "warmup_sent": warmup, "warmup_arrivals": 0}
        for flow in flows
    }
    pad = bytes(size - 8)

    def drain(until_ns: int) -> None:
        while True:
            wait = (until_ns - time.time_ns()) / 1e9
            ready, _, _ = select.select(list(receivers), [], [], max(wait, 0.0))
            for fd in ready:
                flow, rx = receivers[fd]
                while True:
                    try:
                        data, anc, _, _ = rx.recvmsg(2048, 64)
                    except BlockingIOError:
                        break
                    stamp = next(
                        (
                            struct.unpack("qq", c[2][:16])
                            for c in anc
                            if c[0] == socket.SOL_SOCKET and c[1] == _SO_TIMESTAMPNS
                        ),
                        None,
                    )
                    seq, phase = struct.unpack_from("!iI", data)
                    if phase == 0:
                        results[flow]["warmup_arrivals"] += 1
                    elif stamp is not None:
                        results[flow]["arrivals"].append([seq, stamp[0] * 10**9 + stamp[1]])
            if wait <= 0:
                return

    for phase, n in ((0, warmup), (1, count)):
        start = time.time_ns() + 10_000_000
        for seq in range(n):
            drain(start + int(seq * interval * 1e9))
            for flow, tx in senders.items():
                payload = struct.pack("!iI", seq, phase) + pad
                stamp = time.time_ns()
                tx.send(payload)
                if phase == 1:
                    results[flow]["sent"].append(stamp)
        drain(time.time_ns() + int(settle * 1e9))
    out: dict = dict(results)
    out["rcvbuf_errors"] = {ns: udp_rcvbuf_errors(ns) - errors_before[ns] for ns in (NS_A, NS_B)}
    for sock in senders.values():
        sock.close()
    for _, rx in receivers.values():
        rx.close()
    return out


@dataclasses.dataclass(frozen=True)
class ProbeStats:
    """What a probe run saw on one flow. Delays in seconds; rates are fractions."""

    sent: int
    received: int  # distinct probes that arrived
    duplicates: int  # extra copies
    reordered: int  # probes that arrived before some probe sent earlier
    delay_mean: float
    delay_std: float
    delay_min: float
    delay_p50: float
    delay_p99: float
    delay_max: float

    @property
    def loss(self) -> float:
        return 1.0 - self.received / self.sent if self.sent else 0.0

    @property
    def duplicate_rate(self) -> float:
        return self.duplicates / self.sent if self.sent else 0.0

    @property
    def reorder_rate(self) -> float:
        return self.reordered / self.received if self.received else 0.0


def _quantile(ordered: Sequence[float], q: float) -> float:
    if not ordered:
        return math.nan
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def probe_stats(sent: Sequence[float], arrivals: Iterable[tuple[int, float]]) -> ProbeStats:
    """Loss, duplication, reordering and one-way delay from send times and arrivals.

    ``sent[seq]`` is the send time of probe ``seq``; ``arrivals`` are
    ``(seq, time)`` in any order; delays come out in the unit of the inputs.
    A probe counts as reordered when it arrives before a probe that was sent
    earlier than it (and arrives too): netem's ``reorder`` percentage.
    """
    ordered = sorted(arrivals, key=lambda a: (a[1], a[0]))
    first: dict[int, float] = {}
    copies = 0
    for seq, t in ordered:
        if seq in first:
            copies += 1
        else:
            first[seq] = t
    by_arrival = sorted(first, key=lambda s: (first[s], s))
    reordered, later_min = 0, math.inf
    for seq in reversed(by_arrival):
        if later_min < seq:
            reordered += 1
        later_min = min(later_min, seq)
    delays = sorted(first[s] - sent[s] for s in first)
    n = len(delays)
    mean = sum(delays) / n if n else math.nan
    std = math.sqrt(sum((d - mean) ** 2 for d in delays) / (n - 1)) if n > 1 else 0.0
    return ProbeStats(
        sent=len(sent),
        received=n,
        duplicates=copies,
        reordered=reordered,
        delay_mean=mean,
        delay_std=std,
        delay_min=delays[0] if n else math.nan,
        delay_p50=_quantile(delays, 0.5),
        delay_p99=_quantile(delays, 0.99),
        delay_max=delays[-1] if n else math.nan,
    )


def flow_times(flow: dict) -> tuple[list[float], list[tuple[int, float]]]:
    """A flow of :func:`probe`'s result as (send times, arrivals) in seconds from the first send."""
    base = flow["sent"][0] if flow["sent"] else 0
    sent = [(t - base) / 1e9 for t in flow["sent"]]
    return sent, [(seq, (t - base) / 1e9) for seq, t in flow["arrivals"]]


def flow_stats(flow: dict) -> ProbeStats:
    """:func:`probe_stats` of one flow of :func:`probe`'s result, in seconds."""
    return probe_stats(*flow_times(flow))


def run_scenario(
    forward: str | Sequence[str] = (),
    reverse: str | Sequence[str] = (),
    count: int = 1000,
    interval: float = 0.002,
    size: int = 64,
    flows: Sequence[str] = ("forward",),
    settle: float = 2.0,
) -> dict:
    """Build the link, probe it (unless ``count`` is 0), add both qdiscs' statistics."""
    make_link(forward, reverse)
    result = probe(count, interval, size, flows, settle) if count else {}
    result["qdisc"] = {"forward": qdisc_stats(NS_A, DEV_A), "reverse": qdisc_stats(NS_B, DEV_B)}
    return result


def run_pair(
    server: Sequence[str],
    client: Sequence[str],
    timeout: float,
    forward: str | Sequence[str] = (),
    reverse: str | Sequence[str] = (),
) -> dict:
    """A server in B and its client in A across the link (``rudp sim``'s workloads).

    The server gets ``--bind ADDR_B:0`` and must print ``{"port": P}`` first;
    the client gets ``--connect ADDR_B:P``. Returns both processes' output and
    the qdiscs' statistics. Output goes through files, so neither side can
    block on a full pipe while the other runs.
    """
    make_link(forward, reverse)
    deadline = time.monotonic() + timeout
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {
            f"{side}_{stream}": open(os.path.join(tmp, f"{side}.{stream}"), "w+")  # noqa: SIM115
            for side in ("server", "client")
            for stream in ("stdout", "stderr")
        }
        procs = {}
        try:
            with Netns(NS_B):
                procs["server"] = subprocess.Popen(
                    [*server, "--bind", f"{ADDR_B}:0"],
                    stdout=files["server_stdout"],
                    stderr=files["server_stderr"],
                )
            port = _wait_for_port(procs["server"], files["server_stdout"], deadline)
            if port is not None:
                with Netns(NS_A):
                    procs["client"] = subprocess.Popen(
                        [*client, "--connect", f"{ADDR_B}:{port}"],
                        stdout=files["client_stdout"],
                        stderr=files["client_stderr"],
                    )
            for side in ("client", "server"):
                proc = procs.get(side)
                if proc is None:
                    continue
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    result[f"{side}_timed_out"] = True
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            for name, f in files.items():
                f.seek(0)
                text = f.read()
                result[name] = text if name.endswith("stdout") else text[-4000:]
                f.close()
    result["qdisc"] = {"forward": qdisc_stats(NS_A, DEV_A), "reverse": qdisc_stats(NS_B, DEV_B)}
    return result


def _wait_for_port(proc: subprocess.Popen, out, deadline: float) -> int | None:
    """The port in the server's first JSON line, or None if it exits or time runs out."""
    while time.monotonic() < deadline:
        out.seek(0)
        first = out.readline()
        if first.endswith("\n"):
            try:
                return int(json.loads(first)["port"])
            except (ValueError, KeyError, TypeError):
                return None
        if proc.poll() is not None:
            return None
        time.sleep(0.05)
    return None


def _parse_duration(text: str) -> float:
    for suffix, scale in (("ms", 1e-3), ("us", 1e-6), ("s", 1.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vm_probe", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    link = sub.add_parser("link", help="create the namespaces, veth pair and netem qdiscs")
    link.add_argument("--forward", default="", help="netem options on A's egress (A to B)")
    link.add_argument("--reverse", default="", help="netem options on B's egress (B to A)")
    link.add_argument("--forward-cmd", action="append", default=[], help="a full tc command in A")
    link.add_argument("--reverse-cmd", action="append", default=[], help="a full tc command in B")
    sub.add_parser("unlink", help="remove the namespaces")
    pr = sub.add_parser("probe", help="send timestamped probes, write raw times as JSON")
    pr.add_argument("--count", type=int, default=1000)
    pr.add_argument("--interval", type=_parse_duration, default=0.002)
    pr.add_argument("--size", type=int, default=64)
    pr.add_argument("--flow", action="append", choices=sorted(_FLOWS), default=[])
    pr.add_argument("--settle", type=_parse_duration, default=2.0)
    pr.add_argument("--out", required=True)
    sub.add_parser("qdisc", help="print tc -s -j qdisc show of both link ends")
    pa = sub.add_parser("pair", help="run a server in B and a client in A across the link")
    pa.add_argument("spec", help="JSON: {server, client, timeout, forward, reverse}")
    pa.add_argument("--out", required=True)
    pl = sub.add_parser("plan", help="run several link + probe scenarios in one process")
    pl.add_argument("plan", help="JSON: {name: {forward, reverse, count, interval, size, flows}}")
    pl.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "link":
        make_link(args.forward_cmd or args.forward, args.reverse_cmd or args.reverse)
    elif args.command == "unlink":
        remove_link()
    elif args.command == "probe":
        result = probe(args.count, args.interval, args.size, args.flow or ["forward"], args.settle)
        result["qdisc"] = {"forward": qdisc_stats(NS_A, DEV_A), "reverse": qdisc_stats(NS_B, DEV_B)}
        with open(args.out, "w") as f:
            json.dump(result, f)
    elif args.command == "plan":
        with open(args.plan) as f:
            plan = json.load(f)
        with open(args.out, "w") as f:
            json.dump({name: run_scenario(**spec) for name, spec in plan.items()}, f)
    elif args.command == "pair":
        with open(args.spec) as f:
            spec = json.load(f)
        with open(args.out, "w") as f:
            json.dump(run_pair(**spec), f)
    elif args.command == "qdisc":
        print(
            json.dumps({"forward": qdisc_stats(NS_A, DEV_A), "reverse": qdisc_stats(NS_B, DEV_B)})
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
