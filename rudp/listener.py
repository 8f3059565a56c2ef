"""The server half of connection set-up, without state for unverified peers.

Datagrams whose connection id (rudp framing) or address (kcp framings) the
endpoint does not know come here. In the rudp framing a first INIT is
answered with a RETRY carrying a cookie — an HMAC over the connection id,
the client's address and an expiry — and nothing is remembered. Only an INIT
that returns a valid cookie (proving the client receives at its address)
creates a :class:`~rudp.connection.Connection`. A spoofed or random packet
therefore creates no state, and every reply to an unverified address is
smaller than the datagram that provoked it (the INIT is padded to the MTU), far
inside the 3x amplification limit.

KCP has no handshake, so in the ``kcp`` and ``kcp-go`` framings the first
well-formed datagram from a new address creates a connection, as kcp-go does.
kcp-go clients (kcptun) draw a random conv per session, so with ``conv=0``
(the default) the new connection adopts the conv of that first segment; a
non-zero ``conv`` accepts only segments carrying it.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Any

from rudp import wire
from rudp.config import Configuration
from rudp.connection import Connection, local_params, negotiate
from rudp.events import Address

__all__ = ["COOKIE_LIFETIME", "Listener"]

#: Seconds a RETRY cookie stays valid.
COOKIE_LIFETIME = 30
_EXPIRY = struct.Struct("<I")
_MAC_SIZE = 16


class Listener:
    """Turns datagrams from unknown peers into new connections (see module docstring).

    ``secret`` keys the cookies: pass 32 random bytes (``os.urandom``); the
    sans-I/O layer draws no randomness of its own. ``connection`` is the class
    of the connections it creates (``rudp._connection.Connection``, the compiled
    twin, takes the same arguments).
    """

    def __init__(
        self,
        configuration: Configuration,
        *,
        secret: bytes,
        engine: Any = None,
        connection: type[Connection] = Connection,
    ) -> None:
        if len(secret) < 16:
            raise ValueError("secret must be at least 16 bytes")
        self.configuration = configuration
        self._secret = secret
        self._engine = engine
        self._connection = connection
        self._params = local_params(configuration)
        self._out: list[tuple[bytes, Address]] = []
        self.counters = dict.fromkeys(
            (
                "retries_sent",
                "cookies_rejected",
                "refused",
                "resets_sent",
                "garbage",
                "passive_opens",
            ),
            0,
        )

    # ------------------------------------------------------------------ cookies

    def _mac(self, cid: int, addr: Address, expiry: int) -> bytes:
        msg = struct.pack("<Q", cid) + repr(addr[:2]).encode() + _EXPIRY.pack(expiry)
        return hmac.new(self._secret, msg, hashlib.sha256).digest()[:_MAC_SIZE]

    def make_cookie(self, cid: int, addr: Address, now: float) -> bytes:
        expiry = (int(now) + COOKIE_LIFETIME) & 0xFFFFFFFF
        return _EXPIRY.pack(expiry) + self._mac(cid, addr, expiry)

    def check_cookie(self, cookie: bytes, cid: int, addr: Address, now: float) -> bool:
        if len(cookie) != _EXPIRY.size + _MAC_SIZE:
            return False
        (expiry,) = _EXPIRY.unpack_from(cookie)
        remaining = ((expiry - int(now)) + 0x80000000 & 0xFFFFFFFF) - 0x80000000
        if not 0 <= remaining <= COOKIE_LIFETIME:
            return False
        return hmac.compare_digest(cookie[_EXPIRY.size :], self._mac(cid, addr, expiry))

    # ------------------------------------------------------------------ input

    def receive_datagram(
        self, data: bytes, addr: Address, now: float, *, accepting: bool = True
    ) -> Connection | None:
        """Handle a datagram for no known connection; return a new connection or None.

        ``accepting`` is False while the server's accept backlog is full: clients
        are then refused cleanly instead of getting a half-working session.
        """
        if self.configuration.framing == "rudp":
            return self._receive_rudp(data, addr, now, accepting)
        return self._receive_kcp(data, addr, now, accepting)

    def _receive_rudp(
        self, data: bytes, addr: Address, now: float, accepting: bool
    ) -> Connection | None:
        if len(data) < wire.RUDP_OVERHEAD:
            self.counters["garbage"] += 1
            return None
        ver, ptype, cid = wire.RUDP_HEADER.unpack_from(data)
        if ver != wire.RUDP_VERSION:
            self.counters["garbage"] += 1
            return None
        body = memoryview(data)[wire.RUDP_OVERHEAD :]
        try:
            if ptype == wire.PKT_INIT:
                return self._receive_init(body, cid, addr, now, accepting, len(data))
            if ptype == wire.PKT_PING or (ptype == wire.PKT_DATA and self._is_mid_session(body)):
                # The client thinks a session exists that we do not have (we restarted,
                # or it timed out here): tell it, no bigger than what it sent.
                self._reply(
                    wire.encode_reason(wire.PKT_RESET, cid, wire.CODE_UNKNOWN_SESSION), addr
                )
                self.counters["resets_sent"] += 1
            elif ptype == wire.PKT_CLOSE:
                self._reply(wire.encode_header(wire.PKT_CLOSE_ACK, cid), addr)
            elif ptype not in wire.PACKET_TYPES:
                self.counters["garbage"] += 1
        except ValueError:
            self.counters["garbage"] += 1
        return None

    @staticmethod
    def _is_mid_session(body: memoryview) -> bool:
        """DATA that acknowledges our data (una > 0) proves we had this session once.

        Anything else may be the client's first flight overtaking its INIT on a
        reordering path: that is dropped quietly (the ARQ repeats it), not reset.
        """
        return len(body) >= wire.KCP_OVERHEAD and wire.KCP_HEADER.unpack_from(body)[6] != 0

    def _receive_init(
        self, body: memoryview, cid: int, addr: Address, now: float, accepting: bool, size: int
    ) -> Connection | None:
        params, cookie = wire.decode_handshake(body, with_cookie=True)
        try:
            negotiated = negotiate(params, self._params)
        except ValueError as exc:
            self._refuse(cid, addr, str(exc), size)
            return None
        if not accepting:
            self._refuse(cid, addr, "backlog full", size)
            return None
        if not cookie:
            self._reply(
                wire.encode_handshake(
                    wire.PKT_RETRY, cid, self._params, self.make_cookie(cid, addr, now)
                ),
                addr,
            )
            self.counters["retries_sent"] += 1
            return None
        if not self.check_cookie(cookie, cid, addr, now):
            self.counters["cookies_rejected"] += 1
            # A stale cookie (client retried for long, or its address changed): issue a fresh one.
            self._reply(
                wire.encode_handshake(
                    wire.PKT_RETRY, cid, self._params, self.make_cookie(cid, addr, now)
                ),
                addr,
            )
            return None
        conn = self._connection(self.configuration, is_client=False, cid=cid, engine=self._engine)
        conn.accept(negotiated, addr, now)
        self.counters["passive_opens"] += 1
        return conn

    def _refuse(self, cid: int, addr: Address, reason: str, size: int) -> None:
        packet = wire.encode_reason(wire.PKT_RESET, cid, wire.CODE_REFUSED, reason)
        self._reply(packet[: max(size, wire.RUDP_OVERHEAD + wire.CODE.size)], addr)
        self.counters["refused"] += 1

    def _receive_kcp(
        self, data: bytes, addr: Address, now: float, accepting: bool
    ) -> Connection | None:
        payload: bytes = data
        if self.configuration.framing == "kcp-go":
            try:
                payload = wire.decode_kcpgo(data)
            except ValueError:
                self.counters["garbage"] += 1
                return None
        if len(payload) < wire.KCP_OVERHEAD:
            self.counters["garbage"] += 1
            return None
        conv, cmd = struct.unpack_from("<IB", payload)
        wanted = self.configuration.conv
        if (wanted and conv != wanted) or cmd not in wire.KCP_CMDS:
            self.counters["garbage"] += 1
            return None
        if not accepting:
            self.counters["refused"] += 1
            return None
        config = self.configuration if conv == wanted else self.configuration.replace(conv=conv)
        conn = self._connection(config, is_client=False, engine=self._engine)
        conn.accept(self._params, addr, now)
        conn.receive_datagram(data, addr, now)
        self.counters["passive_opens"] += 1
        return conn

    # ------------------------------------------------------------------ output

    def _reply(self, packet: bytes, addr: Address) -> None:
        self._out.append((packet, addr))

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        out, self._out = self._out, []
        return out
