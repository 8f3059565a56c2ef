"""The sans-I/O connection in virtual time: handshake, transfer, close, reset, liveness, migration."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from simnet import SERVER, Net

import netem
from rudp import Configuration, ConnectionRefused, ConnectionReset, DeadPeerError, wire
from rudp.connection import Connection, ConnectionState
from rudp.events import AddressChanged, Connected, EndOfData, Terminated
from rudp.listener import Listener

LOSSY = netem.Profile.from_options(delay="25ms", loss="10%")
REORDER = netem.Profile.from_options(delay="20ms", jitter="10ms", loss="5%", duplicate="2%")


def payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def terminated(net: Net, side: str) -> Terminated | None:
    return next((e for e in net.events[side] if isinstance(e, Terminated)), None)


# ---------------------------------------------------------------- handshake


def test_handshake_costs_one_round_trip_before_data_flows(arq_cls):
    net = Net(engine=arq_cls, profile=netem.Profile.from_options(delay="50ms"))
    net.start()
    assert net.run_until(lambda: any(isinstance(e, Connected) for e in net.events["client"]))
    # INIT out, RETRY back: one round trip of 100 ms, and the client may send.
    assert net.now == pytest.approx(0.1, abs=0.002)
    net.client.send(b"hello")
    assert net.run_until(lambda: net.server is not None and net.server.readable == 5)
    # The data rode with the second INIT: it arrived half a round trip later.
    assert net.now == pytest.approx(0.15, abs=0.002)
    assert net.server.read() == b"hello"


def test_listener_keeps_no_state_and_never_amplifies_before_the_cookie(arq_cls):
    config = Configuration()
    listener = Listener(config, secret=b"s" * 32, engine=arq_cls)
    rng = random.Random(5)
    received = sent = 0
    for i in range(500):
        cid = rng.getrandbits(64)
        addr = (f"192.0.2.{i % 250}", 1000 + i)
        params = wire.Params(
            mtu=rng.choice([200, 1400]), rcvwnd=128, flags=wire.FLAG_MUX | wire.FLAG_MUX_EXTENSIONS
        )
        pad = rng.choice([0, params.mtu])
        cookie = rng.choice([b"", rng.randbytes(20)])  # forged cookies too
        init = wire.encode_handshake(wire.PKT_INIT, cid, params, cookie, pad)
        received += len(init)
        assert listener.receive_datagram(init, addr, 10.0) is None
        for packet, to in listener.datagrams_to_send():
            assert to == addr
            assert len(packet) <= 3 * len(init)
            sent += len(packet)
    assert sent <= 3 * received
    assert listener.counters["passive_opens"] == 0


def test_cookie_is_bound_to_address_and_expires(arq_cls):
    listener = Listener(Configuration(), secret=b"k" * 32, engine=arq_cls)
    cookie = listener.make_cookie(7, ("10.0.0.1", 5), now=100.0)
    assert listener.check_cookie(cookie, 7, ("10.0.0.1", 5), 110.0)
    assert not listener.check_cookie(cookie, 8, ("10.0.0.1", 5), 110.0)
    assert not listener.check_cookie(cookie, 7, ("10.0.0.1", 6), 110.0)
    assert not listener.check_cookie(cookie, 7, ("10.0.0.1", 5), 100.0 + 31 + 1)


def test_refused_when_backlog_is_full(arq_cls):
    net = Net(engine=arq_cls)
    net.accepting = False
    net.start()
    net.run_until(lambda: terminated(net, "client") is not None, 5)
    event = terminated(net, "client")
    assert event is not None and isinstance(event.error, ConnectionRefused)
    assert net.server is None


def test_incompatible_peers_are_refused(arq_cls):
    net = Net(Configuration(message_mode=True), Configuration(), engine=arq_cls)
    net.start()
    net.run_until(lambda: terminated(net, "client") is not None, 5)
    event = terminated(net, "client")
    assert isinstance(event.error, ConnectionRefused) and "message mode" in str(event.error)


def test_connect_timeout_when_nothing_answers(arq_cls):
    net = Net(Configuration(connect_timeout=2.0), engine=arq_cls)
    net.drop_all = True
    net.start()
    net.run_until(lambda: terminated(net, "client") is not None, 10)
    event = terminated(net, "client")
    assert isinstance(event.error, DeadPeerError)
    assert 2.0 <= net.now <= 2.01


def test_handshake_survives_heavy_loss(arq_cls):
    net = Net(engine=arq_cls, profile=netem.Profile.from_options(delay="30ms", loss="40%"), seed=3)
    net.start()
    assert net.run_until(net.established, 10)


# ---------------------------------------------------------------- transfer


@pytest.mark.parametrize("profile", [LOSSY, REORDER], ids=["lossy", "reorder-dup"])
def test_bulk_both_ways_is_exact(arq_cls, profile):
    net = Net(engine=arq_cls, profile=profile, seed=11)
    net.start()
    up, down = payload(300_000, 1), payload(200_000, 2)
    got_up, got_down = net.transfer(up, down)
    assert got_up == up and got_down == down
    stats = net.client.stats()
    assert stats["retrans_segs"] > 0 and stats["packets_out"] > 0


def test_message_mode_keeps_boundaries(arq_cls):
    config = Configuration(message_mode=True)
    net = Net(config, engine=arq_cls, profile=LOSSY, seed=4)
    net.start()
    assert net.run_until(net.established)
    messages = [payload(n, n) for n in (1, 100, 1376, 1377, 50_000, 7)]
    for m in messages:
        net.client.send(m)
    got: list[bytes] = []

    def collect() -> bool:
        while (m := net.server.read_message()) is not None:
            got.append(m)
        return len(got) == len(messages)

    assert net.run_until(collect)
    assert got == messages


# ---------------------------------------------------------------- closing


def test_graceful_close_delivers_everything_then_eof(arq_cls):
    net = Net(engine=arq_cls, profile=LOSSY, seed=7)
    net.start()
    assert net.run_until(net.established)
    data = payload(100_000, 3)
    net.client.send(data)
    net.client.close(net.now)
    received = bytearray()

    def drained() -> bool:
        received.extend(net.server.read())
        return net.server.at_eof

    assert net.run_until(drained)
    assert bytes(received) == data
    assert any(isinstance(e, EndOfData) for e in net.events["server"])
    net.server.close(net.now)
    assert net.run_until(
        lambda: (
            net.server.state is ConnectionState.TERMINATED
            and net.client.state is ConnectionState.TERMINATED
        )
    )
    assert terminated(net, "client").error is None
    assert terminated(net, "server").error is None


def test_half_close_keeps_the_other_direction(arq_cls):
    net = Net(engine=arq_cls, profile=LOSSY, seed=8)
    net.start()
    assert net.run_until(net.established)
    net.client.send(b"request")
    net.client.write_eof()
    assert net.run_until(lambda: net.server.readable == 7 and net.server._peer_closed)
    assert net.server.read() == b"request" and net.server.at_eof
    reply = payload(20_000, 9)
    net.server.send(reply)
    got = bytearray()

    def done() -> bool:
        got.extend(net.client.read())
        return len(got) == len(reply)

    assert net.run_until(done)
    assert bytes(got) == reply
    with pytest.raises(Exception, match="closed"):
        net.client.send(b"more")


def test_reset_reaches_the_peer(arq_cls):
    net = Net(engine=arq_cls)
    net.start()
    assert net.run_until(net.established)
    net.client.send(payload(10_000))
    net.client.reset("changed my mind", net.now)
    assert net.run_until(lambda: terminated(net, "server") is not None, 5)
    error = terminated(net, "server").error
    assert isinstance(error, ConnectionReset) and "changed my mind" in str(error)


def test_close_twice_is_harmless(arq_cls):
    net = Net(engine=arq_cls)
    net.start()
    assert net.run_until(net.established)
    net.client.close(net.now)
    net.client.close(net.now)
    net.server.close(net.now)
    assert net.run_until(lambda: net.client.state is ConnectionState.TERMINATED)
    net.client.close(net.now)
    assert sum(isinstance(e, Terminated) for e in net.events["client"]) == 1


# ---------------------------------------------------------------- liveness


def test_dead_peer_detected_within_bound(arq_cls):
    config = Configuration(keepalive=1.0, idle_timeout=5.0)
    net = Net(config, engine=arq_cls)
    net.start()
    assert net.run_until(net.established)
    net.run_for(3.0)  # idle, alive: keepalives answered
    assert net.client.state is ConnectionState.ESTABLISHED
    pulled = net.now
    net.drop_all = True
    assert net.run_until(
        lambda: terminated(net, "client") is not None and terminated(net, "server") is not None, 20
    )
    assert isinstance(terminated(net, "client").error, DeadPeerError)
    assert isinstance(terminated(net, "server").error, DeadPeerError)
    assert net.now - pulled <= config.idle_timeout + 0.01


def test_idle_connection_stays_up_with_keepalive(arq_cls):
    config = Configuration(keepalive=2.0, idle_timeout=6.0)
    net = Net(config, engine=arq_cls)
    net.start()
    assert net.run_until(net.established)
    net.run_for(60.0)
    assert net.client.state is ConnectionState.ESTABLISHED
    assert net.server.state is ConnectionState.ESTABLISHED
    # Only the client pings; the server answers. About one exchange per keepalive.
    assert 25 <= net.client.stats()["pings_out"] <= 31


def test_idle_engine_needs_no_timer(arq_cls):
    net = Net(engine=arq_cls)
    net.start()
    net.transfer(b"x" * 5000, b"y" * 5000)
    net.run_for(1.0)
    assert net.server.engine.check(net.server._ms(net.now)) is None
    # What remains is only liveness: the idle timeout on the server side.
    assert net.server.get_timer(net.now) == pytest.approx(
        net.server._last_recv + net.server_config.idle_timeout
    )


# ---------------------------------------------------------------- migration


def test_client_address_change_keeps_the_session(arq_cls):
    net = Net(engine=arq_cls, profile=LOSSY, seed=12)
    net.start()
    assert net.run_until(net.established)
    data = payload(200_000, 5)
    net.client.send(data[:100_000])
    net.run_for(0.5)
    net.client_addr = ("10.9.9.9", 50001)  # NAT rebinding
    net.client.send(data[100_000:])
    got = bytearray()

    def done() -> bool:
        got.extend(net.server.read())
        return len(got) == len(data)

    assert net.run_until(done)
    assert bytes(got) == data
    assert net.server.peer_address == ("10.9.9.9", 50001)
    assert any(isinstance(e, AddressChanged) for e in net.events["server"])


# ---------------------------------------------------------------- bad input


@settings(max_examples=200, deadline=None)
@given(garbage=st.lists(st.binary(max_size=1500), max_size=30), seed=st.integers(0, 1000))
def test_garbage_is_counted_and_harmless(garbage, seed):
    from rudp.engine import Arq

    net = Net(engine=Arq, seed=seed)
    net.start()
    assert net.run_until(net.established)
    rng = random.Random(seed)
    # Some garbage carries the right header, to reach deeper parsers. (A well-formed
    # CLOSE or RESET with the right connection id is a real close: the 64-bit random id
    # is what keeps off-path senders from forging one.)
    types = [t for t in wire.PACKET_TYPES if t not in (wire.PKT_RESET, wire.PKT_CLOSE)]
    for g in garbage:
        if g and rng.random() < 0.5:
            g = wire.encode_header(rng.choice(types), net.client.cid) + g
        net.server.receive_datagram(g, net.client_addr, net.now)
        net.client.receive_datagram(g, SERVER, net.now)
    got_up, got_down = net.transfer(b"a" * 3000, b"b" * 3000)
    assert got_up == b"a" * 3000 and got_down == b"b" * 3000


def test_wrong_version_and_cid_are_counted(arq_cls):
    net = Net(engine=arq_cls)
    net.start()
    assert net.run_until(net.established)
    before = net.server.stats()["in_errors"]
    net.server.receive_datagram(
        b"\x07" + wire.encode_header(wire.PKT_DATA, net.client.cid)[1:], net.client_addr, net.now
    )
    net.server.receive_datagram(wire.encode_header(wire.PKT_DATA, 99), net.client_addr, net.now)
    net.server.receive_datagram(b"\x01", net.client_addr, net.now)
    assert net.server.stats()["in_errors"] == before + 3


# ---------------------------------------------------------------- kcp framings


@pytest.mark.parametrize("framing", ["kcp", "kcp-go"])
def test_kcp_framings_transfer(arq_cls, framing):
    config = Configuration(framing=framing, conv=77)
    net = Net(config, engine=arq_cls, profile=LOSSY, seed=21)
    net.start()
    up = payload(80_000, 6)
    # KCP has no handshake: the server exists once the first segment arrives.
    net.client.send(up[:1000])
    assert net.run_until(lambda: net.server is not None, 5)
    net.client.send(up[1000:])
    got = bytearray()

    def done() -> bool:
        got.extend(net.server.read())
        return len(got) == len(up)

    assert net.run_until(done)
    assert bytes(got) == up


def test_kcpgo_crc_errors_are_counted(arq_cls):
    config = Configuration(framing="kcp-go", conv=1)
    conn = Connection(config, is_client=True, engine=arq_cls)
    conn.connect(SERVER, 0.0)
    good = wire.encode_kcpgo(
        wire.KcpSegment(1, wire.KCP_CMD_WINS, 0, 32, 0, 0, 0).encode(), bytes(16)
    )
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    conn.receive_datagram(bytes(bad), SERVER, 0.01)
    assert conn.stats()["in_csum_errors"] == 1
    conn.receive_datagram(good, SERVER, 0.02)
    assert conn.stats()["in_csum_errors"] == 1


# ---------------------------------------------------------------- FEC


def test_fixed_fec_recovers_without_retransmission(arq_cls):
    config = Configuration(fec=(10, 3))
    net = Net(config, engine=arq_cls, profile=LOSSY, seed=31)
    net.start()
    up = payload(400_000, 8)
    got_up, _ = net.transfer(up, b"")
    assert got_up == up
    server, client = net.server.stats(), net.client.stats()
    assert client["fec_parity_sent"] > 0
    assert server["fec_recovered"] > 0
    # Repaired packets need no retransmission: fewer retransmissions than without FEC.
    plain = Net(Configuration(), engine=arq_cls, profile=LOSSY, seed=31)
    plain.start()
    plain.transfer(up, b"")
    assert client["retrans_segs"] < plain.client.stats()["retrans_segs"]


def _stream(net: Net, seconds: float, every: float = 0.02, size: int = 200) -> bytes:
    """A steady message stream (the case auto FEC is for); returns what arrived."""
    net.start()
    assert net.run_until(net.established)
    got = bytearray()
    sent = bytearray()
    end = net.now + seconds
    while net.now < end:
        chunk = payload(size, int(net.now * 1000))
        net.client.send(chunk)
        sent += chunk
        net.run_for(every)
        got += net.server.read()
    net.run_until(lambda: got.extend(net.server.read()) or len(got) == len(sent), 10)
    assert bytes(got) == bytes(sent)
    return bytes(got)


def test_auto_fec_turns_on_under_loss_and_stays_off_on_a_clean_link(arq_cls):
    lossy = Net(Configuration(fec="auto"), engine=arq_cls, profile=LOSSY, seed=32)
    _stream(lossy, 4.0)
    stats = lossy.client.stats()
    assert stats["fec_parity_sent"] > 0
    assert 0.05 <= stats["fec_loss_estimate"] <= 0.2  # the peer reports ~10% raw loss
    assert lossy.server.stats()["fec_recovered"] > 0

    clean = Net(Configuration(fec="auto"), engine=arq_cls, seed=32)
    _stream(clean, 4.0)
    stats = clean.client.stats()
    assert stats["fec_parity_sent"] == 0
    # On a clean link auto FEC costs nothing on the wire.
    assert stats["fec_data_protected"] == 0


def test_sparse_messages_get_parity_within_the_time_bound(arq_cls):
    config = Configuration(fec=(10, 2), message_mode=True)
    net = Net(config, engine=arq_cls, profile=netem.Profile.from_options(delay="25ms"), seed=33)
    net.start()
    assert net.run_until(net.established)
    net.client.send(b"lonely message")
    net.run_for(0.2)
    # One message, a group that never fills: its parity still left, within ~half an RTT.
    assert net.client.stats()["fec_parity_sent"] == 2
    assert net.client.stats()["fec_groups_timed"] == 1


def test_a_replayed_datagram_from_elsewhere_does_not_move_the_session(arq_cls):
    net = Net(engine=arq_cls, seed=13)
    net.start()
    assert net.run_until(net.established)
    recorded: list[bytes] = []
    net.client.send(payload(5000, 1))
    recorded += net.client.datagrams_to_send(net.now)
    net.link.send(0, recorded[0], net.now)
    for d in recorded[1:]:
        net.link.send(0, d, net.now)
    net.transfer(payload(20_000, 2), b"")
    before = net.server.peer_address
    for d in recorded:  # an observer replays them from its own address
        net.server.receive_datagram(d, ("10.66.6.6", 666), net.now)
    assert net.server.peer_address == before
    assert net.server.stats()["migrations"] == 0


def test_first_flight_overtaking_init_is_dropped_quietly_but_a_lost_session_is_reset(arq_cls):
    listener = Listener(Configuration(), secret=b"k" * 32, engine=arq_cls)
    early = (
        wire.encode_header(wire.PKT_DATA, 5)
        + wire.KcpSegment(5, wire.KCP_CMD_PUSH, 0, 512, 0, 3, 0, b"x").encode()
    )
    assert listener.receive_datagram(early, ("10.0.0.1", 1), 1.0) is None
    assert listener.datagrams_to_send() == []  # reordered ahead of INIT: no reset
    stale = (
        wire.encode_header(wire.PKT_DATA, 5)
        + wire.KcpSegment(5, wire.KCP_CMD_PUSH, 0, 512, 0, 9, 4, b"x").encode()
    )
    listener.receive_datagram(stale, ("10.0.0.1", 1), 1.0)
    [(reset, _)] = listener.datagrams_to_send()  # it acknowledges data we never sent: session lost
    assert reset[1] == wire.PKT_RESET


def test_bulk_over_a_jittery_reordering_link(arq_cls):
    profile = netem.Profile.from_options(delay="10ms", jitter="5ms", reorder="25%", gap="5")
    for seed in range(3):
        net = Net(engine=arq_cls, profile=profile, seed=seed)
        net.start()
        data = payload(300_000, seed)
        assert net.transfer(data, b"")[0] == data
