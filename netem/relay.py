"""A UDP relay on loopback that impairs traffic between a client and a server.

Unprivileged: the client sends to the relay instead of the server; the relay
forwards each datagram through the profile's forward direction to the server,
from its own upstream socket (one per client), and the server's replies through
the reverse direction back to the client. Only UDP is impaired (TCP needs the
namespace link, :mod:`netem.netns`).

``rebind()`` emulates NAT rebinding: the relay's upstream socket for a client
is replaced by a new one on a new port, so the server sees the same client
arrive from a new address; replies to the old port are lost, as they would be
at a NAT whose mapping changed.

Timing: the relay runs on an asyncio loop and releases packets from a timer.
The default selector loop sleeps in whole milliseconds (``epoll``), so packets
leave on average ~0.5 ms after their time; the standalone relay
(``python -m netem.relay``) uses a ``select()`` loop with microsecond timers.

Run standalone::

    python -m netem.relay --profile lossy --listen 127.0.0.1:9000 --server 127.0.0.1:9001
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import selectors
import signal
import socket
import sys
import time
from dataclasses import asdict
from typing import Any

from netem.model import UDP_FRAME_OVERHEAD, NetemQueue, QueueStats
from netem.profile import Profile, load_profile

__all__ = ["Relay", "main"]

Address = tuple[str, int]
_BATCH = 256  # datagrams read per wake-up before yielding to the loop
_MAX_DATAGRAM = 65535
_BUFFER = 4 * 1024 * 1024


def _udp_socket(bind: Address) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):  # SO_*BUFFORCE
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, _BUFFER)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, _BUFFER)
    sock.setblocking(False)
    sock.bind(bind)
    return sock


class _Mapping:
    """One client's path through the relay: its upstream socket towards the server."""

    __slots__ = ("client", "sock")

    def __init__(self, client: Address) -> None:
        self.client = client
        self.sock: socket.socket | None = None


class Relay:
    """Impairs UDP between clients and ``server`` with ``profile`` (seeded).

    Use as ``async with Relay(profile, server) as relay:`` and point the
    client at ``relay.address``. Several clients may share the relay; they
    share the link too (one queue per direction), like hosts behind one NAT.
    """

    def __init__(
        self,
        profile: Profile,
        server: Address,
        *,
        listen: Address = ("127.0.0.1", 0),
        seed: int = 0,
    ) -> None:
        self.profile = profile
        self.server = server
        self._listen_addr = listen
        self._queues = (
            NetemQueue(profile.forward, f"{seed}:forward", UDP_FRAME_OVERHEAD),
            NetemQueue(profile.reverse, f"{seed}:reverse", UDP_FRAME_OVERHEAD),
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listen: socket.socket | None = None
        self._mappings: dict[Address, _Mapping] = {}
        self._by_fd: dict[int, _Mapping] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: int | None = None
        self.send_errors = 0  # datagrams the relay itself failed to pass on
        self.rebinds = 0

    # ------------------------------------------------------------ life cycle

    async def start(self) -> Address:
        """Bind and start relaying; returns the address clients should send to."""
        self._loop = asyncio.get_running_loop()
        self._listen = _udp_socket(self._listen_addr)
        self._loop.add_reader(self._listen.fileno(), self._on_client_readable)
        return self.address

    async def close(self) -> None:
        """Stop relaying; packets still on the link are dropped."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        loop = self._loop
        for mapping in list(self._mappings.values()):
            if mapping.sock is not None:
                self._drop_socket(mapping.sock)
        self._mappings.clear()
        if self._listen is not None and loop is not None:
            loop.remove_reader(self._listen.fileno())
            self._listen.close()
            self._listen = None

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def address(self) -> Address:
        if self._listen is None:
            raise RuntimeError("relay not started")
        host, port = self._listen.getsockname()[:2]
        return (host, port)

    @property
    def stats(self) -> tuple[QueueStats, QueueStats]:
        """Per direction (forward, reverse): what the link did to the packets."""
        return (self._queues[0].stats, self._queues[1].stats)

    def upstream_address(self, client: Address | None = None) -> Address:
        """The address the server currently sees for ``client`` (the only one if None)."""
        if client is None:
            if len(self._mappings) != 1:
                raise ValueError(f"relay has {len(self._mappings)} clients; name one")
            mapping = next(iter(self._mappings.values()))
        else:
            mapping = self._mappings[client]
        assert mapping.sock is not None
        host, port = mapping.sock.getsockname()[:2]
        return (host, port)

    def rebind(self, client: Address | None = None) -> None:
        """Move ``client`` (every client if None) to a new upstream port: NAT rebinding."""
        targets = list(self._mappings.values()) if client is None else [self._mappings[client]]
        for mapping in targets:
            old = mapping.sock
            mapping.sock = self._open_upstream(mapping)
            if old is not None:
                self._drop_socket(old)
            self.rebinds += 1

    # ------------------------------------------------------------ I/O

    def _open_upstream(self, mapping: _Mapping) -> socket.socket:
        assert self._loop is not None and self._listen is not None
        sock = _udp_socket((self._listen.getsockname()[0], 0))
        self._by_fd[sock.fileno()] = mapping
        self._loop.add_reader(sock.fileno(), self._on_server_readable, sock)
        return sock

    def _drop_socket(self, sock: socket.socket) -> None:
        if self._loop is not None:
            self._loop.remove_reader(sock.fileno())
        self._by_fd.pop(sock.fileno(), None)
        sock.close()

    def _on_client_readable(self) -> None:
        assert self._listen is not None
        queue = self._queues[0]
        for _ in range(_BATCH):
            try:
                data, client = self._listen.recvfrom(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue  # e.g. an ICMP error queued on the socket
            client = (client[0], client[1])
            if client not in self._mappings:
                mapping = _Mapping(client)
                mapping.sock = self._open_upstream(mapping)
                self._mappings[client] = mapping
            queue.enqueue(data, client, time.monotonic_ns())
        self._flush()

    def _on_server_readable(self, sock: socket.socket) -> None:
        mapping = self._by_fd.get(sock.fileno())
        queue = self._queues[1]
        for _ in range(_BATCH):
            try:
                data, _ = sock.recvfrom(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            if mapping is not None and mapping.sock is sock:
                queue.enqueue(data, mapping.client, time.monotonic_ns())
        self._flush()

    def _flush(self, now: int | None = None) -> None:
        """Send what is due and re-arm the timer for the next release."""
        if now is not None:
            for queue in self._queues:
                queue.advance(now)
        forward, reverse = self._queues
        for _, data, client in forward.take():
            mapping = self._mappings.get(client)
            if mapping is not None and mapping.sock is not None:
                self._send(mapping.sock, data, self.server)
        if self._listen is not None:
            for _, data, client in reverse.take():
                self._send(self._listen, data, client)
        self._arm()

    def _send(self, sock: socket.socket, data: bytes, to: Address) -> None:
        try:
            sock.sendto(data, to)
        except OSError:
            self.send_errors += 1

    def _arm(self) -> None:
        times = [t for t in (q.next_time() for q in self._queues) if t is not None]
        nxt = min(times) if times else None
        if nxt == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = nxt
        if nxt is not None and self._loop is not None:
            self._timer = self._loop.call_at(nxt / 1e9, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._flush(time.monotonic_ns())


def _address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return (host, int(port))


async def _serve(args: argparse.Namespace, profile: Profile) -> dict[str, Any]:
    relay = Relay(profile, args.server, listen=args.listen, seed=args.seed)
    await relay.start()
    print(json.dumps({"listen": list(relay.address)}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, relay.rebind)
    await stop.wait()
    await relay.close()
    forward, reverse = relay.stats
    return {
        "forward": asdict(forward),
        "reverse": asdict(reverse),
        "send_errors": relay.send_errors,
        "rebinds": relay.rebinds,
    }


def main(argv: list[str] | None = None) -> int:
    """Run a relay until SIGINT/SIGTERM; SIGUSR1 rebinds. Prints its address, then stats."""
    parser = argparse.ArgumentParser(prog="python -m netem.relay", description=__doc__)
    parser.add_argument("--profile", default="lan", help="profile name or .toml file")
    parser.add_argument("--netem", default="", help="tc netem options applied over the profile")
    parser.add_argument("--listen", type=_address, default=("127.0.0.1", 0))
    parser.add_argument("--server", type=_address, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        profile = load_profile(args.profile)
        if args.netem:
            profile = Profile.from_options(base=profile, netem=args.netem)
    except ValueError as exc:
        print(f"netem.relay: {exc}", file=sys.stderr)
        return 2
    # select() sleeps with microsecond precision; epoll only in milliseconds.
    loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
    try:
        stats = loop.run_until_complete(_serve(args, profile))
    finally:
        loop.close()
    print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
