"""The userspace link between two network namespaces: TUN devices and the netem model.

For kernels without ``sch_netem`` (this project's machines and CI). Two TUN
devices are created in the root namespace (so this process holds their file
descriptors), then moved into the client and server namespaces and addressed
as the two ends of a point-to-point link. Every IP packet one side routes to
the other (TCP, UDP, ICMP alike) is read here, passed through the profile's
direction with :class:`netem.model.NetemQueue`, and written into the other
side's device at its release time. Rates and slots count the IP packet plus
a 14-byte Ethernet header, so a profile shapes traffic as netem would on a veth.

The loop waits in ``select()`` (microsecond timeouts), reads every packet
that is ready (one ``read`` each: TUN has no batch read), advances both
queues to the current time and writes what is due. Run by
:class:`netem.netns.NamespaceLink`; standalone::

    python -m netem.forwarder --client-ns C --server-ns S --profile lossy

It prints one JSON line when the link is up, one with cumulative statistics
on SIGUSR1, and a last one on SIGTERM/SIGINT before it exits (the devices
vanish with it).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import select
import signal
import struct
import subprocess
import sys
import time
from dataclasses import asdict
from typing import Any

from netem.model import IP_FRAME_OVERHEAD, NetemQueue
from netem.profile import Profile, load_profile

__all__ = ["CLIENT_ADDRESS", "SERVER_ADDRESS", "Forwarder", "main"]

#: The two ends of the link, inside their own namespaces (so they never clash).
CLIENT_ADDRESS = "10.201.0.1"
SERVER_ADDRESS = "10.201.0.2"

_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_READ_BATCH = 512  # packets read from one device per wake-up
_MTU_READ = 65536


def open_tun(name: str) -> int:
    """Create TUN device ``name`` (layer 3, no packet-info header); returns its fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def configure_end(device: str, namespace: str, local: str, peer: str, mtu: int) -> None:
    """Move ``device`` into ``namespace`` and make it one end of a point-to-point link."""
    _ip("link", "set", "dev", device, "netns", namespace)
    _ip("-n", namespace, "link", "set", "dev", "lo", "up")
    # A long device queue: if this process is briefly descheduled, packets wait
    # instead of being dropped before the profile sees them.
    _ip("-n", namespace, "link", "set", "dev", device, "mtu", str(mtu), "txqueuelen", "10000")
    _ip("-n", namespace, "link", "set", "dev", device, "addrgenmode", "none")
    _ip("-n", namespace, "addr", "add", local, "peer", peer, "dev", device)
    _ip("-n", namespace, "link", "set", "dev", device, "up")


class Forwarder:
    """Moves packets between two TUN fds through the profile, until stopped."""

    def __init__(self, client_fd: int, server_fd: int, profile: Profile, seed: int = 0) -> None:
        self.fds = (client_fd, server_fd)
        self.queues = (
            NetemQueue(profile.forward, f"{seed}:forward", IP_FRAME_OVERHEAD),
            NetemQueue(profile.reverse, f"{seed}:reverse", IP_FRAME_OVERHEAD),
        )
        self.write_errors = 0
        self.max_lateness_ns = 0  # worst delay between a packet's release time and its write
        self.lateness_ns_total = 0
        self._cpu_start = os.times()[:2]
        self._stop_r, self._stop_w = os.pipe()
        os.set_blocking(self._stop_w, False)

    def stop(self) -> None:
        """Ask :meth:`run` to return (safe from a signal handler)."""
        with contextlib.suppress(BlockingIOError):
            os.write(self._stop_w, b"x")

    def stats(self) -> dict[str, Any]:
        forward, reverse = (q.stats for q in self.queues)
        delivered = forward.delivered + reverse.delivered
        return {
            "forward": asdict(forward),
            "reverse": asdict(reverse),
            "write_errors": self.write_errors,
            "lateness_ms_mean": self.lateness_ns_total / delivered / 1e6 if delivered else 0.0,
            "lateness_ms_max": self.max_lateness_ns / 1e6,
            "cpu_user_seconds": os.times().user - self._cpu_start[0],
            "cpu_system_seconds": os.times().system - self._cpu_start[1],
        }

    def run(self) -> None:
        client_fd, server_fd = self.fds
        forward, reverse = self.queues
        sources = ((client_fd, forward), (server_fd, reverse))
        targets = ((forward, server_fd), (reverse, client_fd))
        watch = [client_fd, server_fd, self._stop_r]
        monotonic_ns = time.monotonic_ns
        read, write = os.read, os.write
        while True:
            nxt = forward.next_time()
            other = reverse.next_time()
            if nxt is None or (other is not None and other < nxt):
                nxt = other
            timeout = None if nxt is None else max(0.0, (nxt - monotonic_ns()) / 1e9)
            try:
                ready, _, _ = select.select(watch, [], [], timeout)
            except InterruptedError:
                continue
            if self._stop_r in ready:
                return
            for fd, queue in sources:
                if fd not in ready:
                    continue
                for _ in range(_READ_BATCH):
                    try:
                        packet = read(fd, _MTU_READ)
                    except (BlockingIOError, InterruptedError):
                        break
                    queue.enqueue(packet, None, monotonic_ns())
            now = monotonic_ns()
            for queue, fd in targets:
                queue.advance(now)
                if not queue.out:
                    continue
                for due, packet, _ in queue.take():
                    try:
                        write(fd, packet)
                    except OSError:
                        self.write_errors += 1
                    late = now - due
                    self.lateness_ns_total += late
                    if late > self.max_lateness_ns:
                        self.max_lateness_ns = late


def _prefer_cpu() -> None:
    """Real-time (FIFO, lowest RT priority) scheduling, else a high nice priority.

    The kernel's netem runs in softirq context, ahead of every process; a
    userspace link that waits behind other processes adds their latency to the
    profile. The forwarder sleeps in select() and the kernel's RT throttling
    caps it at 95% of a CPU, so this cannot lock the machine up.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except (OSError, AttributeError):
        with contextlib.suppress(OSError):
            os.nice(-10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m netem.forwarder", description=__doc__)
    parser.add_argument("--client-ns", required=True)
    parser.add_argument("--server-ns", required=True)
    parser.add_argument("--profile", default="lan", help="profile name or .toml file")
    parser.add_argument("--profile-toml", help="the profile as TOML text (overrides --profile)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mtu", type=int, default=1500)
    parser.add_argument("--device-prefix", default=f"rt{os.getpid()}")
    parser.add_argument(
        "--realtime",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run at real-time priority (as netem runs in the kernel) so that busy "
        "neighbours do not delay packets; falls back to nice -10",
    )
    args = parser.parse_args(argv)
    try:
        if args.profile_toml:
            profile = Profile.from_toml(args.profile_toml, "link")
        else:
            profile = load_profile(args.profile)
    except ValueError as exc:
        print(f"netem.forwarder: {exc}", file=sys.stderr)
        return 2
    names = (f"{args.device_prefix}c"[:15], f"{args.device_prefix}s"[:15])
    fds = [open_tun(name) for name in names]
    try:
        configure_end(names[0], args.client_ns, CLIENT_ADDRESS, SERVER_ADDRESS, args.mtu)
        configure_end(names[1], args.server_ns, SERVER_ADDRESS, CLIENT_ADDRESS, args.mtu)
    except subprocess.CalledProcessError as exc:
        print(f"netem.forwarder: {' '.join(exc.cmd)}: {exc.stderr.strip()}", file=sys.stderr)
        return 1
    forwarder = Forwarder(fds[0], fds[1], profile, args.seed)
    if args.realtime:
        _prefer_cpu()

    def report(*_: object) -> None:
        print(json.dumps(forwarder.stats()), flush=True)

    signal.signal(signal.SIGTERM, lambda *_: forwarder.stop())
    signal.signal(signal.SIGINT, lambda *_: forwarder.stop())
    signal.signal(signal.SIGUSR1, report)
    print(json.dumps({"ready": True, "devices": names}), flush=True)
    forwarder.run()
    report()
    for fd in fds:
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
