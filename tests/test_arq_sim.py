"""Two engines over a seeded lossy link (``netem.VirtualLink``), in virtual time.

Both directions at once, stream and message mode, with and without congestion
control and pacing, through the project's netem profiles (loss, delay, jitter
that reorders, Gilbert-Elliott bursts, long-delay links) and one with explicit
duplication and reordering. Every byte (or message) must arrive exactly once,
in order, and afterwards both engines must go idle (``check()`` is None).
"""

from __future__ import annotations

import random

import pytest
from conftest import transfer

import netem

CHAOS = netem.Profile.from_options(
    "chaos", delay="30ms", jitter="20ms", loss="7%", duplicate="5%", reorder="15%"
)
PROFILES = ["lossy", "kcp-sim", "weak-mobile", "burst", "chaos"]

FAST3 = {"nodelay": 1, "interval": 10, "resend": 2, "congestion": "none"}  # kcptun's fast3
NORMAL_RENO = {"nodelay": 0, "interval": 40, "resend": 2, "congestion": "reno"}


def profile(name: str) -> netem.Profile:
    return CHAOS if name == "chaos" else netem.load_profile(name)


def stream_chunks(rng: random.Random, total: int) -> list[bytes]:
    chunks, n = [], 0
    while n < total:
        size = min(total - n, rng.choice([1, 100, 1376, 5000, 30000]))
        chunks.append(rng.randbytes(size))
        n += size
    return chunks


def messages(rng: random.Random, mss: int) -> list[bytes]:
    """Small and large messages, an empty one, and one of 300 fragments."""
    out = [rng.randbytes(rng.choice([1, 50, 300, mss, mss + 1, 3 * mss])) for _ in range(60)]
    out.insert(10, b"")
    out.insert(30, rng.randbytes(300 * mss - 7))
    return out


def check_link_did_its_job(link, name):
    fwd, rev = link.stats
    assert fwd.lost + rev.lost > 0, "the profile dropped nothing: the test proves little"
    if name == "chaos":
        assert fwd.duplicated + rev.duplicated > 0 and fwd.reordered + rev.reordered > 0


@pytest.mark.parametrize("name", PROFILES)
@pytest.mark.parametrize("params", [FAST3, NORMAL_RENO], ids=["fast3", "normal-reno"])
def test_stream_both_ways(arq_cls, name, params):
    rng = random.Random(f"stream-{name}")
    kw = {"stream": True, "snd_wnd": 128, "rcv_wnd": 128, **params}
    a, b = arq_cls(42, **kw), arq_cls(42, **kw)
    link = netem.VirtualLink(profile(name), seed=7)
    up, down = stream_chunks(rng, 300_000), stream_chunks(rng, 100_000)
    got_b, got_a, _ = transfer(a, b, link, up, down, message=False)
    assert b"".join(got_b) == b"".join(up)
    assert b"".join(got_a) == b"".join(down)
    assert a.pending_bytes == b.pending_bytes == 0
    check_link_did_its_job(link, name)


@pytest.mark.parametrize("name", ["lossy", "weak-mobile", "chaos"])
@pytest.mark.parametrize("params", [FAST3, NORMAL_RENO], ids=["fast3", "normal-reno"])
def test_messages_both_ways(arq_cls, name, params):
    """Message boundaries survive, including a 300-fragment message through a 64-segment
    receive window."""
    rng = random.Random(f"messages-{name}")
    kw = {"stream": False, "mtu": 500, "snd_wnd": 128, "rcv_wnd": 64, **params}
    a, b = arq_cls(9, **kw), arq_cls(9, **kw)
    link = netem.VirtualLink(profile(name), seed=11)
    up, down = messages(rng, a.mss), messages(rng, a.mss)
    got_b, got_a, _ = transfer(a, b, link, up, down, message=True)
    assert got_b == up
    assert got_a == down
    check_link_did_its_job(link, name)


@pytest.mark.parametrize("name", ["kcp-sim", "satellite"])
def test_pacing_under_loss_and_delay(arq_cls, name):
    kw = {"stream": True, "snd_wnd": 256, "rcv_wnd": 256, "pacing": True, **FAST3}
    a, b = arq_cls(5, **kw), arq_cls(5, **kw)
    link = netem.VirtualLink(profile(name), seed=3)
    up = stream_chunks(random.Random(name), 400_000)
    got_b, got_a, _ = transfer(a, b, link, up, [], message=False, send_buffer=1 << 20)
    assert b"".join(got_b) == b"".join(up) and got_a == []


def test_reading_slowly_never_stalls(arq_cls):
    """A receiver whose application reads late keeps closing and reopening its window;
    the sender follows its WINS announcements instead of waiting for probes (this
    seeded run takes 2.25 s of virtual time; without the announcements, 4.1 s)."""
    kw = {"stream": True, "snd_wnd": 64, "rcv_wnd": 8, **FAST3}
    a, b = arq_cls(1, **kw), arq_cls(1, **kw)
    link = netem.VirtualLink(profile("lossy"), seed=5)
    data = random.Random(1).randbytes(150_000)
    a.send(data)
    got = b""
    now = 0
    while len(got) < len(data):
        assert now < 3000, f"only {len(got)} bytes after {now} ms"
        for direction, datagram in link.receive(now / 1000):
            if direction == netem.FORWARD:
                b.input(datagram, now)
            else:
                a.input(datagram, now)
        if now % 50 == 0:  # the application reads only every 50 ms
            got += b.recv()
        for i, end in enumerate((a, b)):
            end.flush(now)
            for datagram in end.datagrams():
                link.send(i, datagram, now / 1000)
        now += 1
    assert got == data
    assert b.stats()["wins_segs"] > 0


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "message"])
def test_sequence_numbers_wrap(arq_cls, stream):
    """Sequence numbers cross 2**32 in the middle of a lossy, reordering transfer."""
    kw = {"stream": stream, "mtu": 200, "snd_wnd": 64, "rcv_wnd": 64, **FAST3}
    a, b = arq_cls(77, **kw), arq_cls(77, **kw)
    a._start_sequence(2**32 - 300, 2**32 - 50)
    b._start_sequence(2**32 - 50, 2**32 - 300)
    link = netem.VirtualLink(CHAOS, seed=9)
    rng = random.Random(9)
    if stream:
        up, down = stream_chunks(rng, 200_000), stream_chunks(rng, 50_000)
    else:
        up, down = messages(rng, a.mss), messages(rng, a.mss)
    got_b, got_a, _ = transfer(a, b, link, up, down, message=not stream)
    if stream:
        assert b"".join(got_b) == b"".join(up) and b"".join(got_a) == b"".join(down)
    else:
        assert got_b == up and got_a == down
    assert a.stats()["out_segs"] > 1000, "far enough past the wrap"
