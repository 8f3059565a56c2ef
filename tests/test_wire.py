"""Golden wire vectors: the expected bytes are written out by hand, not by the encoders."""

from __future__ import annotations

import zlib

import pytest

from rudp import wire

# A KCP PUSH: conv 0x01020304, cmd 81, frg 2, wnd 128, ts 1000, sn 7, una 5, len 3, "abc".
KCP_PUSH = (
    bytes.fromhex(
        "04030201"  # conv (LE)
        "51"  # cmd 81
        "02"  # frg
        "8000"  # wnd 128
        "e8030000"  # ts 1000
        "07000000"  # sn 7
        "05000000"  # una 5
        "03000000"  # len 3
    )
    + b"abc"
)

# A KCP ACK of sn 9 echoing ts 0x11223344, una 10, wnd 32.
KCP_ACK = bytes.fromhex("040302015200200044332211090000000a00000000000000")


def test_kcp_segment_encode_matches_golden():
    seg = wire.KcpSegment(0x01020304, wire.KCP_CMD_PUSH, 2, 128, 1000, 7, 5, b"abc")
    assert seg.encode() == KCP_PUSH


def test_kcp_segments_decode_several_per_datagram():
    segs = wire.decode_kcp_segments(KCP_PUSH + KCP_ACK)
    assert [s.cmd for s in segs] == [81, 82]
    assert segs[0].data == b"abc" and segs[0].frg == 2 and segs[0].una == 5
    assert segs[1].sn == 9 and segs[1].ts == 0x11223344 and segs[1].wnd == 32


@pytest.mark.parametrize("bad", [KCP_PUSH[:23], KCP_PUSH[:-1], KCP_PUSH + b"\x00" * 5])
def test_kcp_decode_rejects_truncation(bad):
    with pytest.raises(ValueError):
        wire.decode_kcp_segments(bad)


def test_kcpgo_header_layout():
    nonce = bytes(range(16))
    payload = KCP_PUSH
    crc = zlib.crc32(payload)
    expected = nonce + crc.to_bytes(4, "little") + payload
    assert wire.encode_kcpgo(payload, nonce) == expected
    assert wire.decode_kcpgo(expected) == payload
    corrupted = bytearray(expected)
    corrupted[-1] ^= 1
    with pytest.raises(ValueError, match="CRC"):
        wire.decode_kcpgo(bytes(corrupted))


def test_smux_header_layout():
    # ver 2, PSH, length 5, sid 3
    assert wire.SMUX_HEADER.pack(2, wire.SMUX_PSH, 5, 3) == bytes.fromhex("0202050003000000")
    assert wire.SMUX_UPD_BODY.pack(100, 262144) == bytes.fromhex("6400000000000400")


# rudp INIT from cid 0x0807060504030201 with mtu 1400, rcvwnd 512, flags mux|ext, no FEC,
# smux v2, stream buffer 1 MiB, no cookie, padded to 40 bytes.
RUDP_INIT = (
    bytes.fromhex(
        "01"  # version
        "01"  # INIT
        "0102030405060708"  # cid (LE)
        "7805"  # mtu 1400
        "0002"  # rcvwnd 512
        "06"  # flags: mux + mux extensions
        "00"
        "00"  # fec k, m
        "02"  # smux version
        "00001000"  # stream buffer 1 MiB
        "0000"
        "0000"  # reserved
        "00"  # cookie length
    )
    + b"\0" * 13
)


def test_rudp_init_golden():
    params = wire.Params(
        mtu=1400,
        rcvwnd=512,
        flags=wire.FLAG_MUX | wire.FLAG_MUX_EXTENSIONS,
        smux_version=2,
        stream_buffer=1 << 20,
    )
    assert (
        wire.encode_handshake(wire.PKT_INIT, 0x0807060504030201, params, b"", pad_to=40)
        == RUDP_INIT
    )
    decoded, cookie = wire.decode_handshake(RUDP_INIT[10:], with_cookie=True)
    assert decoded == params and cookie == b""


def test_rudp_retry_carries_cookie():
    cookie = bytes(range(20))
    packet = wire.encode_handshake(wire.PKT_RETRY, 1, wire.Params(mtu=1200, rcvwnd=64), cookie)
    assert packet[:10] == bytes.fromhex("01020100000000000000")
    assert packet[10:12] == (1200).to_bytes(2, "little")
    assert packet[26] == 20 and packet[27:] == cookie
    assert wire.decode_handshake(packet[10:], with_cookie=True)[1] == cookie


def test_rudp_data_header_then_kcp():
    packet = wire.encode_header(wire.PKT_DATA, 0xAABB) + KCP_PUSH
    assert packet[:10] == bytes.fromhex("0104bbaa000000000000")
    assert wire.decode_kcp_segments(packet[10:])[0].data == b"abc"


def test_rudp_reset_reason():
    packet = wire.encode_reason(wire.PKT_RESET, 5, wire.CODE_REFUSED, "backlog full")
    assert packet == bytes.fromhex("010905000000000000000100") + b"backlog full"
    assert wire.decode_reason(packet[10:]) == (wire.CODE_REFUSED, "backlog full")


@pytest.mark.parametrize("body", [b"", b"\x00" * 15])
def test_rudp_params_truncated(body):
    with pytest.raises(ValueError):
        wire.decode_handshake(body, with_cookie=False)
