"""Every wire format rudp speaks, in one place, with its byte layout.

All integers are little-endian (as in KCP, kcp-go and smux). The Cython
engines parse KCP segments in C for speed; this module is the readable
definition they must agree with, and what the pure-Python layers use.
Golden test vectors in ``tests/test_wire.py`` are built by hand, not with
these encoders.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

# ---------------------------------------------------------------------------
# KCP segment (ikcp.c), 24-byte header then ``len`` bytes of payload.
#
#   0        4    5    6        8            12           16           20           24
#   +--------+----+----+--------+------------+------------+------------+------------+------ - -
#   |  conv  |cmd |frg |  wnd   |     ts     |     sn     |    una     |    len     | data
#   +--------+----+----+--------+------------+------------+------------+------------+------ - -
#     u32     u8   u8    u16        u32          u32          u32          u32
#
#   cmd  81 PUSH (data), 82 ACK, 83 WASK (window probe ask), 84 WINS (window size tell)
#   frg  message mode: fragments that follow this one (stream mode: 0). rudp writes
#        min(remaining, 255) so messages of more than 256 fragments still work:
#        a message ends at the first segment with frg == 0.
#   wnd  the sender's free receive window, in segments
#   ts   sender's clock in ms; an ACK echoes the ts of the segment it acknowledges
#   sn   sequence number (PUSH), or the sn acknowledged (ACK); 0 for probes
#   una  every sn below this was received
# Several segments share one datagram, up to the MTU.
# ---------------------------------------------------------------------------

KCP_HEADER = struct.Struct("<IBBHIIII")
KCP_OVERHEAD = KCP_HEADER.size  # 24
KCP_CMD_PUSH = 81
KCP_CMD_ACK = 82
KCP_CMD_WASK = 83
KCP_CMD_WINS = 84
KCP_CMDS = (KCP_CMD_PUSH, KCP_CMD_ACK, KCP_CMD_WASK, KCP_CMD_WINS)


@dataclass(frozen=True, slots=True)
class KcpSegment:
    conv: int
    cmd: int
    frg: int
    wnd: int
    ts: int
    sn: int
    una: int
    data: bytes = b""

    def encode(self) -> bytes:
        return (
            KCP_HEADER.pack(
                self.conv, self.cmd, self.frg, self.wnd, self.ts, self.sn, self.una, len(self.data)
            )
            + self.data
        )


def decode_kcp_segments(datagram: bytes) -> list[KcpSegment]:
    """Split a datagram into KCP segments; ``ValueError`` if it is malformed."""
    out = []
    view = memoryview(datagram)
    pos = 0
    while pos < len(view):
        if len(view) - pos < KCP_OVERHEAD:
            raise ValueError(f"truncated KCP header at offset {pos}")
        conv, cmd, frg, wnd, ts, sn, una, length = KCP_HEADER.unpack_from(view, pos)
        pos += KCP_OVERHEAD
        if length > len(view) - pos:
            raise ValueError(f"KCP len {length} exceeds the {len(view) - pos} bytes left")
        out.append(KcpSegment(conv, cmd, frg, wnd, ts, sn, una, bytes(view[pos : pos + length])))
        pos += length
    return out


# ---------------------------------------------------------------------------
# kcp-go "none" crypt header (what kcptun speaks with --crypt none), 20 bytes:
#
#   0                  16       20
#   +------------------+--------+------ - -
#   |   nonce (16)     | crc32  | KCP segments (or a kcp-go FEC packet)
#   +------------------+--------+------ - -
#
#   crc32 is IEEE CRC-32 of everything after it. Nothing is encrypted.
# ---------------------------------------------------------------------------

KCPGO_NONCE = 16
KCPGO_OVERHEAD = KCPGO_NONCE + 4


def encode_kcpgo(payload: bytes, nonce: bytes) -> bytes:
    if len(nonce) != KCPGO_NONCE:
        raise ValueError(f"nonce must be {KCPGO_NONCE} bytes")
    return nonce + struct.pack("<I", zlib.crc32(payload)) + payload


def decode_kcpgo(datagram: bytes) -> bytes:
    """The payload behind the header; ``ValueError`` on a short packet or bad CRC."""
    if len(datagram) < KCPGO_OVERHEAD:
        raise ValueError("datagram shorter than the kcp-go header")
    (crc,) = struct.unpack_from("<I", datagram, KCPGO_NONCE)
    payload = datagram[KCPGO_OVERHEAD:]
    if zlib.crc32(payload) != crc:
        raise ValueError("kcp-go CRC32 mismatch")
    return payload


# ---------------------------------------------------------------------------
# smux frame (xtaci/smux v1 and v2), 8-byte header:
#
#   0     1     2         4              8
#   +-----+-----+---------+--------------+------ - -
#   | ver | cmd | length  |     sid      | data (length bytes)
#   +-----+-----+---------+--------------+------ - -
#     u8    u8     u16         u32
#
#   ver  1 or 2;  cmd  0 SYN, 1 FIN, 2 PSH, 3 NOP, 4 UPD (v2 only)
#   SYN, FIN, NOP carry no data; UPD carries  consumed u32 | window u32.
#   Client stream ids are odd, server stream ids even.
#
#   rudp extension (only when both ends are rudp: the handshake's mux-extensions flag):
#   cmd 0x80 RST, body  code u32  (0 reset, 1 refused). smux itself has no reset.
# ---------------------------------------------------------------------------

SMUX_HEADER = struct.Struct("<BBHI")
SMUX_OVERHEAD = SMUX_HEADER.size  # 8
SMUX_SYN, SMUX_FIN, SMUX_PSH, SMUX_NOP, SMUX_UPD = range(5)
SMUX_UPD_BODY = struct.Struct("<II")
SMUX_RST = 0x80
SMUX_RST_BODY = struct.Struct("<I")
SMUX_RST_RESET = 0
SMUX_RST_REFUSED = 1


# ---------------------------------------------------------------------------
# rudp envelope (framing="rudp"): every datagram starts with 10 bytes.
#
#   0      1      2                              10
#   +------+------+------------------------------+------ - -
#   | ver  | type |   connection id (u64)        | body (by type)
#   +------+------+------------------------------+------ - -
#
#   ver   RUDP_VERSION; anything else is dropped and counted
#   cid   chosen at random by the client; sessions are keyed by it, not by the
#         peer's address, so a client whose address changes keeps its session
#
# Bodies:
#   INIT    (client → server)  PARAMS | cookie_len u8 | cookie | zero padding
#           The first INIT has no cookie and is padded to the client's MTU
#           (which also proves that size crosses the path); the second echoes
#           the cookie from RETRY.
#   RETRY   (server → client)  PARAMS | cookie_len u8 | cookie
#           Stateless: the server keeps nothing until a valid cookie returns,
#           and the reply is far below 3x the padded INIT.
#   ACCEPT  (server → client)  PARAMS (the negotiated values)
#   DATA    KCP segments (conv = low 32 bits of cid)
#   PING    u32 token          (keepalive; the peer answers PONG with the token)
#   PONG    u32 token
#   CLOSE   u16 code | reason (utf-8)  "I will send nothing more"; sent once all
#           my data is acknowledged; repeated until CLOSE_ACK
#   CLOSE_ACK  (empty)
#   RESET   u16 code | reason (utf-8)  abort: queued data is discarded
#   DATA_FEC  group u32 | index u8 | KCP segments      (a data packet inside an FEC group)
#   PARITY    group u32 | index u8 | count u8 | m u8 | parity shard
#           count = data packets in the group (k' <= k: a group closes early when its
#           time bound expires), m = parity packets of the group. The protected shard is
#           u16 (len + 2) | KCP segments, zero-padded to the group's longest; the size
#           prefix and padding never travel with data packets (see rudp.fec).
#   FEC_REPORT  u16 loss   the receiver's measured raw packet loss, in 1/65535 units,
#           so an fec="auto" sender can size its parity (FEC hides loss from the ARQ)
#
# PARAMS (16 bytes):
#   0      2        4      5      6      7       8               12      14      16
#   +------+--------+------+------+------+-------+---------------+-------+-------+
#   | mtu  | rcvwnd | flags| fec_k| fec_m| smux_v| stream_buffer | rsv   | rsv   |
#   +------+--------+------+------+------+-------+---------------+-------+-------+
#     u16     u16     u8     u8     u8     u8          u32          u16     u16
#   flags: bit 0 message mode, bit 1 mux, bit 2 mux extensions, bit 3 fec auto
# ---------------------------------------------------------------------------

RUDP_VERSION = 1
RUDP_HEADER = struct.Struct("<BBQ")
RUDP_OVERHEAD = RUDP_HEADER.size  # 10

(
    PKT_INIT,
    PKT_RETRY,
    PKT_ACCEPT,
    PKT_DATA,
    PKT_PING,
    PKT_PONG,
    PKT_CLOSE,
    PKT_CLOSE_ACK,
    PKT_RESET,
    PKT_DATA_FEC,
    PKT_PARITY,
    PKT_FEC_REPORT,
) = range(1, 13)
PACKET_TYPES = range(PKT_INIT, PKT_FEC_REPORT + 1)
FEC_DATA = struct.Struct("<IB")
FEC_PARITY = struct.Struct("<IBBB")
FEC_REPORT = struct.Struct("<H")
#: Extra bytes FEC adds around a KCP payload, at most (a parity packet: header + size prefix).
FEC_OVERHEAD = FEC_PARITY.size + 2

PARAMS = struct.Struct("<HHBBBBIHH")
FLAG_MESSAGE_MODE = 0x01
FLAG_MUX = 0x02
FLAG_MUX_EXTENSIONS = 0x04
FLAG_FEC_AUTO = 0x08

PING_BODY = struct.Struct("<I")
CODE = struct.Struct("<H")

# Close/reset codes
CODE_NORMAL = 0
CODE_REFUSED = 1  # nothing accepts this connection (backlog full, incompatible parameters)
CODE_TIMEOUT = 2  # the sender gave up waiting (dead peer, close timeout)
CODE_PROTOCOL = 3  # the peer broke the protocol
CODE_ABORT = 4  # the application aborted
CODE_UNKNOWN_SESSION = 5  # no session with that connection id


@dataclass(frozen=True, slots=True)
class Params:
    """What each side announces in the handshake."""

    mtu: int
    rcvwnd: int
    flags: int = 0
    fec_k: int = 0
    fec_m: int = 0
    smux_version: int = 0
    stream_buffer: int = 0

    def encode(self) -> bytes:
        return PARAMS.pack(
            self.mtu,
            self.rcvwnd,
            self.flags,
            self.fec_k,
            self.fec_m,
            self.smux_version,
            self.stream_buffer,
            0,
            0,
        )

    @classmethod
    def decode(cls, body: bytes | memoryview) -> Params:
        if len(body) < PARAMS.size:
            raise ValueError("truncated handshake parameters")
        mtu, rcvwnd, flags, k, m, smux_v, stream_buffer, _, _ = PARAMS.unpack_from(body)
        return cls(mtu, rcvwnd, flags, k, m, smux_v, stream_buffer)


def encode_header(ptype: int, cid: int) -> bytes:
    return RUDP_HEADER.pack(RUDP_VERSION, ptype, cid)


def encode_handshake(
    ptype: int, cid: int, params: Params, cookie: bytes = b"", pad_to: int = 0
) -> bytes:
    """INIT / RETRY (with a cookie) or ACCEPT (without)."""
    out = encode_header(ptype, cid) + params.encode()
    if ptype != PKT_ACCEPT:
        out += bytes([len(cookie)]) + cookie
    return out.ljust(pad_to, b"\0")


def decode_handshake(body: bytes | memoryview, with_cookie: bool) -> tuple[Params, bytes]:
    """(params, cookie) of an INIT/RETRY/ACCEPT body; ``ValueError`` if malformed."""
    params = Params.decode(body)
    if not with_cookie:
        return params, b""
    if len(body) < PARAMS.size + 1:
        raise ValueError("truncated cookie length")
    n = body[PARAMS.size]
    cookie = bytes(body[PARAMS.size + 1 : PARAMS.size + 1 + n])
    if len(cookie) != n:
        raise ValueError("truncated cookie")
    return params, cookie


def encode_reason(ptype: int, cid: int, code: int, reason: str = "") -> bytes:
    """CLOSE or RESET."""
    return encode_header(ptype, cid) + CODE.pack(code) + reason.encode()[:200]


def decode_reason(body: bytes | memoryview) -> tuple[int, str]:
    if len(body) < CODE.size:
        raise ValueError("truncated close/reset code")
    (code,) = CODE.unpack_from(body)
    return code, bytes(body[CODE.size :]).decode("utf-8", "replace")
