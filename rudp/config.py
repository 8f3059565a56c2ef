"""Connection configuration: one validated dataclass, presets with kcptun's names.

Durations are seconds (floats) at this API; the ARQ core works in integer
milliseconds, as KCP does on the wire. Every field is checked when the object
is built, and a bad value raises ``ValueError`` naming the field and the
allowed range, so a mistake surfaces at configuration time rather than as a
stalled transfer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["FRAMINGS", "MODES", "Configuration", "check_bool", "check_choice", "check_range"]

#: kcptun's modes: (nodelay, interval ms, resend, nc). nc=1 disables congestion control.
MODES: dict[str, tuple[int, int, int, int]] = {
    "normal": (0, 40, 2, 1),
    "fast": (0, 30, 2, 1),
    "fast2": (1, 20, 2, 1),
    "fast3": (1, 10, 2, 1),
}
#: What ``mode="manual"`` starts from: the reference KCP's own defaults.
MANUAL_DEFAULTS: tuple[int, int, int, int] = (0, 100, 0, 0)

FRAMINGS = ("rudp", "kcp", "kcp-go")
CONGESTION = ("none", "reno")

Framing = Literal["rudp", "kcp", "kcp-go"]
Mode = Literal["normal", "fast", "fast2", "fast3", "manual"]
FecSetting = tuple[int, int] | Literal["auto", "off"]


def check_range(name: str, value: Any, lo: float, hi: float, kind: type = int) -> None:
    ok_type = isinstance(value, int | float) if kind is float else isinstance(value, int)
    if isinstance(value, bool) or not ok_type:
        raise ValueError(
            f"{name} must be {'a number' if kind is float else 'an integer'} in [{lo}, {hi}], got {value!r}"
        )
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


@dataclass(frozen=True)
class Configuration:
    """Everything that shapes a connection. Build it once, share it freely (it is immutable).

    ``mode`` picks kcptun's (nodelay, interval, resend, congestion) quadruple;
    ``nodelay``, ``interval``, ``resend`` and ``congestion`` override single
    values of it. Use :meth:`replace` to derive a variant.
    """

    # --- wire
    framing: Framing = "rudp"
    conv: int = 0
    mtu: int = 1400

    # --- ARQ
    mode: Mode = "fast3"
    nodelay: int | None = None
    interval: float | None = None
    resend: int | None = None
    congestion: Literal["none", "reno"] | None = None
    pacing: bool = True
    sndwnd: int = 512
    rcvwnd: int = 512
    message_mode: bool = False
    max_message_size: int = 4 * 1024 * 1024
    rto_min: float | None = None
    rto_max: float = 60.0
    fast_limit: int = 5
    dead_link: int = 20
    bundle: int | None = None

    # --- FEC
    fec: FecSetting = "auto"

    # --- session (mux)
    mux: bool | None = None
    smux_version: int = 2
    max_frame_size: int = 32768
    stream_buffer: int = 1024 * 1024
    session_buffer: int = 4 * 1024 * 1024
    max_streams: int = 1024
    stream_backlog: int = 128

    # --- connection life
    send_buffer: int = 1024 * 1024
    backlog: int = 128
    connect_timeout: float = 10.0
    idle_timeout: float = 30.0
    keepalive: float = 10.0
    close_timeout: float = 10.0
    fast_open: bool = False

    def __post_init__(self) -> None:
        check_choice("framing", self.framing, FRAMINGS)
        check_range("conv", self.conv, 0, 2**32 - 1)
        check_range("mtu", self.mtu, 128, 65507)
        check_choice("mode", self.mode, (*MODES, "manual"))
        if self.nodelay is not None:
            check_range("nodelay", self.nodelay, 0, 2)
        if self.interval is not None:
            check_range("interval", self.interval, 0.001, 5.0, float)
        if self.resend is not None:
            check_range("resend", self.resend, 0, 255)
        if self.congestion is not None:
            check_choice("congestion", self.congestion, CONGESTION)
        check_bool("pacing", self.pacing)
        check_range("sndwnd", self.sndwnd, 1, 65535)
        check_range("rcvwnd", self.rcvwnd, 1, 65535)
        check_bool("message_mode", self.message_mode)
        check_range("max_message_size", self.max_message_size, 1, 1 << 30)
        if self.rto_min is not None:
            check_range("rto_min", self.rto_min, 0.001, 60.0, float)
        check_range("rto_max", self.rto_max, self.rto_min_effective, 3600.0, float)
        check_range("fast_limit", self.fast_limit, 1, 255)
        check_range("dead_link", self.dead_link, 1, 1000)
        if self.bundle is not None:
            check_range("bundle", self.bundle, 0, 8)
        self._check_fec()
        if self.mux is not None:
            check_bool("mux", self.mux)
            if self.mux and self.message_mode:
                raise ValueError(
                    "mux must be False with message_mode=True (streams are byte streams)"
                )
        check_choice("smux_version", self.smux_version, (1, 2))
        check_range("max_frame_size", self.max_frame_size, 1, 65535)
        check_range("stream_buffer", self.stream_buffer, 1024, 1 << 30)
        check_range("session_buffer", self.session_buffer, self.stream_buffer, 1 << 31)
        check_range("max_streams", self.max_streams, 1, 1 << 20)
        check_range("stream_backlog", self.stream_backlog, 1, 65535)
        check_range("send_buffer", self.send_buffer, 1024, 1 << 31)
        check_range("backlog", self.backlog, 1, 65535)
        check_range("connect_timeout", self.connect_timeout, 0.01, 3600.0, float)
        check_range("idle_timeout", self.idle_timeout, 0.1, 86400.0, float)
        check_range("keepalive", self.keepalive, 0.01, self.idle_timeout, float)
        check_range("close_timeout", self.close_timeout, 0.0, 3600.0, float)
        check_bool("fast_open", self.fast_open)

    def _check_fec(self) -> None:
        fec = self.fec
        if fec in ("auto", "off"):
            return
        if not (isinstance(fec, tuple | list) and len(fec) == 2):
            raise ValueError(f"fec must be 'off', 'auto' or a (data, parity) pair, got {fec!r}")
        k, m = fec
        check_range("fec data shards", k, 1, 128)
        check_range("fec parity shards", m, 1, 128)
        if k + m > 255:
            raise ValueError(f"fec data + parity shards must be at most 255, got {k} + {m}")

    # ------------------------------------------------------------------ derived

    @property
    def _quad(self) -> tuple[int, int, int, int]:
        return MANUAL_DEFAULTS if self.mode == "manual" else MODES[self.mode]

    @property
    def nodelay_effective(self) -> int:
        return self._quad[0] if self.nodelay is None else self.nodelay

    @property
    def interval_ms(self) -> int:
        return self._quad[1] if self.interval is None else max(1, round(self.interval * 1000))

    @property
    def resend_effective(self) -> int:
        return self._quad[2] if self.resend is None else self.resend

    @property
    def congestion_effective(self) -> str:
        if self.congestion is not None:
            return self.congestion
        return "none" if self._quad[3] else "reno"

    @property
    def rto_min_effective(self) -> float:
        if self.rto_min is not None:
            return self.rto_min
        return 0.03 if self.nodelay_effective else 0.1

    @property
    def bundle_effective(self) -> int:
        """Copies of unacknowledged segments that may ride in a datagram with room.

        On by default in the nodelay modes (fast2, fast3): thin streams of small
        messages then repair a loss with the next datagram instead of a timeout. While
        FEC parity is being sent the connection keeps one copy at most: parity does most
        of that job, the copy covers the groups parity cannot rebuild.
        """
        if self.bundle is not None:
            return self.bundle
        return 2 if self.nodelay_effective else 0

    @property
    def mux_effective(self) -> bool:
        if self.mux is None:
            return self.framing != "kcp" and not self.message_mode
        return self.mux

    def replace(self, **changes: Any) -> Configuration:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
