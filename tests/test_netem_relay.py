"""The asyncio UDP relay: same decisions as the virtual link, real sockets, rebinding.

Which packets are lost, duplicated or reordered depends only on the seed and
the order of packets, so those checks are exact (the relay must agree with
the virtual link packet for packet). Timing checks bound only what the relay
adds (it must never deliver early; its lateness is reported and loosely bounded).
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import statistics
import time

import pytest

import netem
from netem.profile import Impairment, Profile
from netem.relay import Relay


class Sink(asyncio.DatagramProtocol):
    """Records (arrival time, data, source) of every datagram."""

    def __init__(self, echo: bool = False) -> None:
        self.received: list[tuple[float, bytes, tuple[str, int]]] = []
        self.echo = echo
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.received.append((time.monotonic(), data, addr))
        if self.echo:
            self.transport.sendto(data, addr)


async def endpoint(echo: bool = False) -> tuple[asyncio.DatagramTransport, Sink]:
    loop = asyncio.get_running_loop()
    return await loop.create_datagram_endpoint(
        lambda: Sink(echo), local_addr=("127.0.0.1", 0), family=socket.AF_INET
    )


async def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the relay")
        await asyncio.sleep(0.005)


def virtual_run(imp: Impairment, n: int, seed: int) -> tuple[list[int], netem.model.QueueStats]:
    """What the virtual link delivers (sequence numbers in order) for n packets 1 ms apart."""
    link = netem.VirtualLink(Profile("t", forward=imp, reverse=imp), seed=seed)
    for i in range(n):
        link.send(0, i.to_bytes(4, "big"), i * 0.001)
    got = [int.from_bytes(d[:4], "big") for _, d in link.receive(n * 0.001 + 10)]
    return got, link.stats[0]


def virtual_sequence(imp: Impairment, n: int, seed: int) -> list[int]:
    return virtual_run(imp, n, seed)[0]


async def send_numbered(transport, to, n: int, spacing: float) -> list[float]:
    sent = []
    start = time.monotonic()
    for i in range(n):
        delay = start + i * spacing - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        sent.append(time.monotonic())
        transport.sendto(i.to_bytes(4, "big") + bytes(28), to)
    return sent


def test_echo_through_the_relay_and_the_server_sees_the_relay():
    async def main():
        server_t, server = await endpoint(echo=True)
        async with Relay(netem.load_profile("lan"), server_t.get_extra_info("sockname")) as relay:
            client_t, client = await endpoint()
            client_t.sendto(b"ping", relay.address)
            await wait_for(lambda: client.received)
            assert client.received[0][1] == b"ping"
            assert client.received[0][2] == relay.address
            assert server.received[0][2] == relay.upstream_address()
            client_t.close()
        server_t.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    "tc",
    [
        "loss 10%",
        "loss gemodel 2% 20% 100% 0%",
        "duplicate 5%",
        "delay 2ms reorder 20% gap 3",
        "delay 4ms 3ms",
    ],
)
def test_relay_makes_the_same_decisions_as_the_virtual_link(tc):
    imp = Impairment.from_tc_args(tc)
    n, seed = 1000, 42

    async def main():
        server_t, server = await endpoint()
        profile = Profile("t", forward=imp, reverse=imp)
        async with Relay(profile, server_t.get_extra_info("sockname"), seed=seed) as relay:
            client_t, _ = await endpoint()
            await send_numbered(client_t, relay.address, n, 0.001)
            expected, expected_stats = virtual_run(imp, n, seed)
            await wait_for(lambda: len(server.received) >= len(expected))
            await asyncio.sleep(0.05)
            client_t.close()
            assert relay.send_errors == 0
            stats = relay.stats[0]
        server_t.close()
        got = [int.from_bytes(d[:4], "big") for _, d, _ in server.received]
        for name in ("lost", "duplicated", "reordered", "delivered"):
            assert getattr(stats, name) == getattr(expected_stats, name), name
        if imp.jitter or imp.reorder:
            # Who overtakes whom depends on real send times, which wobble around
            # the 1 ms grid: the same packets arrive, in a similar order.
            assert sorted(got) == sorted(expected)
            swaps = sum(1 for a, b in itertools.pairwise(got) if b < a)
            assert swaps > n // 20
        else:
            assert got == expected

    asyncio.run(main())


@pytest.mark.slow
def test_relay_delay_is_never_early_and_close_to_the_profile():
    imp = Impairment.from_tc_args("delay 20ms 5ms")  # uniform: mean 20 ms, sd 2.89 ms
    n = 400

    async def main():
        server_t, server = await endpoint()
        profile = Profile("t", forward=imp, reverse=imp)
        async with Relay(profile, server_t.get_extra_info("sockname"), seed=1) as relay:
            client_t, _ = await endpoint()
            sent = await send_numbered(client_t, relay.address, n, 0.005)
            await wait_for(lambda: len(server.received) >= n)
            client_t.close()
        server_t.close()
        return [t - sent[int.from_bytes(d[:4], "big")] for t, d, _ in server.received]

    delays = asyncio.run(main())
    assert min(delays) >= 0.015 - 1e-4  # never before the profile's minimum
    # Stated tolerance for the in-process relay: median within 5% + 1.5 ms (asyncio's
    # default loop sleeps in whole milliseconds), interquartile range (5 ms for a
    # uniform +-5 ms) within 10% + 1 ms. Robust statistics, so that a scheduling
    # hiccup on a busy machine does not decide the result.
    q1, median, q3 = statistics.quantiles(delays, n=4)
    assert median == pytest.approx(0.020, abs=0.020 * 0.05 + 0.0015)
    assert q3 - q1 == pytest.approx(0.005, abs=0.005 * 0.10 + 0.001)


def test_rebind_moves_the_client_to_a_new_port_and_old_replies_are_lost():
    async def main():
        server_t, server = await endpoint()
        async with Relay(netem.load_profile("lan"), server_t.get_extra_info("sockname")) as relay:
            client_t, client = await endpoint()
            client_t.sendto(b"one", relay.address)
            await wait_for(lambda: len(server.received) == 1)
            old = server.received[0][2]
            relay.rebind()
            assert relay.rebinds == 1
            new = relay.upstream_address()
            assert new != old
            server_t.sendto(b"to-old", old)  # the old mapping is gone
            client_t.sendto(b"two", relay.address)
            await wait_for(lambda: len(server.received) == 2)
            assert server.received[1][2] == new
            server_t.sendto(b"to-new", new)
            await wait_for(lambda: client.received)
            await asyncio.sleep(0.05)
            assert [d for _, d, _ in client.received] == [b"to-new"]
            client_t.close()
        server_t.close()

    asyncio.run(main())


def test_each_client_gets_its_own_upstream_port():
    async def main():
        server_t, server = await endpoint(echo=True)
        async with Relay(netem.load_profile("lan"), server_t.get_extra_info("sockname")) as relay:
            (a_t, a), (b_t, b) = await endpoint(), await endpoint()
            a_t.sendto(b"a", relay.address)
            b_t.sendto(b"b", relay.address)
            await wait_for(lambda: a.received and b.received)
            assert [d for _, d, _ in a.received] == [b"a"]
            assert [d for _, d, _ in b.received] == [b"b"]
            assert len({src for _, _, src in server.received}) == 2
            with pytest.raises(ValueError, match="2 clients"):
                relay.upstream_address()
            relay.rebind(a_t.get_extra_info("sockname"))
            assert relay.rebinds == 1
            a_t.close()
            b_t.close()
        server_t.close()

    asyncio.run(main())


def test_standalone_relay_process_prints_its_address_and_stats(tmp_path):
    import json
    import signal
    import subprocess
    import sys

    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(5)
    host, port = server.getsockname()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "netem.relay",
            "--profile",
            "lossy",
            "--netem",
            "delay 1ms",
            "--server",
            f"{host}:{port}",
            "--seed",
            "3",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        listen = tuple(json.loads(proc.stdout.readline())["listen"])
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for i in range(200):
            client.sendto(i.to_bytes(4, "big"), listen)
        got = []
        server.settimeout(1)
        try:
            while True:
                got.append(server.recv(100))
        except TimeoutError:
            pass
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["forward"]["offered"] == 200
    assert stats["forward"]["delivered"] == len(got) == 200 - stats["forward"]["lost"]
    imp = netem.load_profile("lossy").forward.with_options({"delay": "1ms"})
    assert [int.from_bytes(d, "big") for d in got] == virtual_sequence(imp, 200, 3)
