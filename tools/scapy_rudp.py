# ruff: noqa: RUF012  (scapy declares layers with class-level field lists)
"""Scapy layers for rudp's wire formats: dissect captures, craft test packets.

    >>> from tools.scapy_rudp import bind, RudpHeader, KcpSegment
    >>> bind(9000)                                  # UDP port 9000 carries the rudp framing
    >>> rdpcap("capture.pcap")[0].show()
    >>> RudpHeader(type="DATA", cid=7) / KcpSegment(cmd="PUSH", sn=1, data=b"x")

The layouts are those of :mod:`rudp.wire` (its docstrings have the ASCII
diagrams). scapy is GPL-2.0: this module belongs to the tools and tests, and
the ``rudp`` package never imports it. Run as a script to dissect a pcap:
``python tools/scapy_rudp.py capture.pcap --port 9000 [--framing kcp|kcp-go]``.
"""

from __future__ import annotations

import argparse

from scapy.fields import (
    ByteEnumField,
    ByteField,
    FieldLenField,
    FlagsField,
    LEIntField,
    LELongField,
    LEShortField,
    StrFixedLenField,
    StrLenField,
    XLEIntField,
)
from scapy.layers.inet import UDP
from scapy.packet import Packet, Raw, bind_layers, split_layers

from rudp import wire

PACKET_TYPES = {
    wire.PKT_INIT: "INIT",
    wire.PKT_RETRY: "RETRY",
    wire.PKT_ACCEPT: "ACCEPT",
    wire.PKT_DATA: "DATA",
    wire.PKT_PING: "PING",
    wire.PKT_PONG: "PONG",
    wire.PKT_CLOSE: "CLOSE",
    wire.PKT_CLOSE_ACK: "CLOSE_ACK",
    wire.PKT_RESET: "RESET",
    wire.PKT_DATA_FEC: "DATA_FEC",
    wire.PKT_PARITY: "PARITY",
    wire.PKT_FEC_REPORT: "FEC_REPORT",
}
KCP_COMMANDS = {
    wire.KCP_CMD_PUSH: "PUSH",
    wire.KCP_CMD_ACK: "ACK",
    wire.KCP_CMD_WASK: "WASK",
    wire.KCP_CMD_WINS: "WINS",
}
SMUX_COMMANDS = {
    wire.SMUX_SYN: "SYN",
    wire.SMUX_FIN: "FIN",
    wire.SMUX_PSH: "PSH",
    wire.SMUX_NOP: "NOP",
    wire.SMUX_UPD: "UPD",
    wire.SMUX_RST: "RST",
}


class KcpSegment(Packet):
    """One KCP segment; several follow each other in a datagram."""

    name = "KCP"
    fields_desc = [
        LEIntField("conv", 0),
        ByteEnumField("cmd", wire.KCP_CMD_PUSH, KCP_COMMANDS),
        ByteField("frg", 0),
        LEShortField("wnd", 128),
        LEIntField("ts", 0),
        LEIntField("sn", 0),
        LEIntField("una", 0),
        FieldLenField("len", None, length_of="data", fmt="<I"),
        StrLenField("data", b"", length_from=lambda pkt: pkt.len),
    ]

    def guess_payload_class(self, payload: bytes) -> type[Packet]:
        return KcpSegment if len(payload) >= wire.KCP_OVERHEAD else Raw


class RudpHeader(Packet):
    """The rudp envelope: version, packet type, connection id."""

    name = "rudp"
    fields_desc = [
        ByteField("version", wire.RUDP_VERSION),
        ByteEnumField("type", wire.PKT_DATA, PACKET_TYPES),
        LELongField("cid", 0),
    ]

    def guess_payload_class(self, payload: bytes) -> type[Packet]:
        if self.type in (wire.PKT_INIT, wire.PKT_RETRY, wire.PKT_ACCEPT):
            return RudpParams
        if self.type == wire.PKT_DATA:
            return KcpSegment
        if self.type == wire.PKT_DATA_FEC:
            return RudpFecData
        if self.type == wire.PKT_PARITY:
            return RudpParity
        if self.type in (wire.PKT_CLOSE, wire.PKT_RESET):
            return RudpReason
        return Raw


class RudpParams(Packet):
    """Handshake parameters (INIT/RETRY/ACCEPT); INIT and RETRY then carry a cookie."""

    name = "rudp params"
    fields_desc = [
        LEShortField("mtu", 1400),
        LEShortField("rcvwnd", 512),
        FlagsField("flags", 0, 8, ["message_mode", "mux", "mux_ext", "fec_auto"]),
        ByteField("fec_k", 0),
        ByteField("fec_m", 0),
        ByteField("smux_version", 2),
        LEIntField("stream_buffer", 0),
        LEShortField("reserved1", 0),
        LEShortField("reserved2", 0),
    ]


class RudpFecData(Packet):
    name = "rudp FEC data"
    fields_desc = [LEIntField("group", 0), ByteField("index", 0)]

    def guess_payload_class(self, payload: bytes) -> type[Packet]:
        return KcpSegment


class RudpParity(Packet):
    name = "rudp FEC parity"
    fields_desc = [
        LEIntField("group", 0),
        ByteField("index", 0),
        ByteField("count", 0),
        ByteField("m", 0),
    ]


class RudpReason(Packet):
    name = "rudp close/reset"
    fields_desc = [LEShortField("code", 0)]


class KcpGoHeader(Packet):
    """kcp-go's "none" crypt header: 16-byte nonce, CRC32 of the rest."""

    name = "kcp-go"
    fields_desc = [
        StrFixedLenField("nonce", b"\0" * wire.KCPGO_NONCE, wire.KCPGO_NONCE),
        XLEIntField("crc", 0),
    ]

    def guess_payload_class(self, payload: bytes) -> type[Packet]:
        return KcpSegment


class SmuxFrame(Packet):
    """One smux frame (the bytes inside KCP payloads when the mux runs)."""

    name = "smux"
    fields_desc = [
        ByteField("ver", 2),
        ByteEnumField("cmd", wire.SMUX_PSH, SMUX_COMMANDS),
        FieldLenField("length", None, length_of="data", fmt="<H"),
        LEIntField("sid", 0),
        StrLenField("data", b"", length_from=lambda pkt: pkt.length),
    ]

    def guess_payload_class(self, payload: bytes) -> type[Packet]:
        return SmuxFrame if len(payload) >= wire.SMUX_OVERHEAD else Raw


_FIRST_LAYER = {"rudp": RudpHeader, "kcp": KcpSegment, "kcp-go": KcpGoHeader}


def bind(port: int, framing: str = "rudp") -> None:
    """Dissect UDP datagrams to or from ``port`` as ``framing``."""
    layer = _FIRST_LAYER[framing]
    for other in _FIRST_LAYER.values():
        split_layers(UDP, other, dport=port)
        split_layers(UDP, other, sport=port)
    bind_layers(UDP, layer, dport=port)
    bind_layers(UDP, layer, sport=port)


def main() -> None:
    from scapy.utils import rdpcap

    parser = argparse.ArgumentParser(description="dissect rudp traffic in a pcap file")
    parser.add_argument("pcap")
    parser.add_argument("--port", type=int, required=True, help="the server's UDP port")
    parser.add_argument("--framing", choices=sorted(_FIRST_LAYER), default="rudp")
    args = parser.parse_args()
    bind(args.port, args.framing)
    for packet in rdpcap(args.pcap):
        print(packet.summary())


if __name__ == "__main__":
    main()
