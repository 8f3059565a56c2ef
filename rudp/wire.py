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
# ---------------------------------------------------------------------------

SMUX_HEADER = struct.Struct("<BBHI")
SMUX_OVERHEAD = SMUX_HEADER.size  # 8
SMUX_SYN, SMUX_FIN, SMUX_PSH, SMUX_NOP, SMUX_UPD = range(5)
SMUX_UPD_BODY = struct.Struct("<II")
