"""Human units for sizes, durations, percentages and rates.

One parser for the CLI, the TOML config files and the netem profiles, so
``64M``, ``40ms``, ``2%`` and ``20mbit`` mean the same thing everywhere.
Rates follow ``tc(8)``: ``bit``/``kbit``/``mbit``/``gbit`` are bits per second
in powers of 1000, ``bps``/``kbps``/``mbps`` are *bytes* per second.
"""

from __future__ import annotations

import re

__all__ = [
    "format_duration",
    "format_rate",
    "format_size",
    "parse_duration",
    "parse_percent",
    "parse_rate",
    "parse_size",
]

_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
}

_DURATION_UNITS = {
    "": 1.0,
    "s": 1.0,
    "sec": 1.0,
    "secs": 1.0,
    "ms": 1e-3,
    "msec": 1e-3,
    "msecs": 1e-3,
    "us": 1e-6,
    "usec": 1e-6,
    "usecs": 1e-6,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
}

_RATE_UNITS = {
    "": 1,
    "bit": 1,
    "kbit": 1000,
    "mbit": 1000**2,
    "gbit": 1000**3,
    "tbit": 1000**4,
    "kibit": 1024,
    "mibit": 1024**2,
    "gibit": 1024**3,
    "bps": 8,
    "kbps": 8 * 1000,
    "mbps": 8 * 1000**2,
    "gbps": 8 * 1000**3,
}


def _split(text: str | int | float, what: str) -> tuple[float, str]:
    if isinstance(text, bool):
        raise ValueError(f"{what}: expected a number with a unit, got {text!r}")
    if isinstance(text, int | float):
        return float(text), ""
    match = re.fullmatch(_NUMBER + r"\s*([A-Za-z%]*)", str(text).strip())
    if not match:
        raise ValueError(f"{what}: cannot parse {text!r}")
    return float(match.group(1)), match.group(2).lower()


def parse_size(text: str | int, what: str = "size") -> int:
    """``"64M"`` → 67108864. K/M/G are powers of 1024; a bare number is bytes."""
    value, unit = _split(text, what)
    if unit not in _SIZE_UNITS:
        raise ValueError(f"{what}: unknown size unit {unit!r} in {text!r} (use B, K, M, G)")
    return int(value * _SIZE_UNITS[unit])


def parse_duration(text: str | int | float, what: str = "duration") -> float:
    """``"40ms"`` → 0.04 (seconds). A bare number is seconds."""
    value, unit = _split(text, what)
    if unit not in _DURATION_UNITS:
        raise ValueError(f"{what}: unknown time unit {unit!r} in {text!r} (use us, ms, s, m, h)")
    return value * _DURATION_UNITS[unit]


def parse_percent(text: str | int | float, what: str = "percentage") -> float:
    """``"2%"`` → 0.02. Without ``%`` the value is a fraction in [0, 1]."""
    value, unit = _split(text, what)
    if unit == "%":
        value /= 100.0
    elif unit:
        raise ValueError(f"{what}: unknown unit {unit!r} in {text!r} (use % or a fraction)")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} must be in [0%, 100%], got {text!r}")
    return value


def parse_rate(text: str | int | float, what: str = "rate") -> int:
    """``"20mbit"`` → 20000000 (bits per second), in ``tc`` units."""
    value, unit = _split(text, what)
    if unit not in _RATE_UNITS:
        raise ValueError(
            f"{what}: unknown rate unit {unit!r} in {text!r} (use kbit, mbit, gbit, bps, ...)"
        )
    return int(value * _RATE_UNITS[unit])


def format_size(n: float) -> str:
    """Bytes as a short human string (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """Seconds as ``tc``-style text: ``0.025`` → ``25ms``."""
    if seconds == 0:
        return "0ms"
    us = round(seconds * 1e6)
    if us % 1_000_000 == 0:
        return f"{us // 1_000_000}s"
    if us % 1000 == 0:
        return f"{us // 1000}ms"
    return f"{us}us"


def format_rate(bits_per_second: int) -> str:
    """Bits per second as ``tc`` text: ``20000000`` → ``20mbit``."""
    for unit, scale in (("gbit", 1000**3), ("mbit", 1000**2), ("kbit", 1000)):
        if bits_per_second >= scale and bits_per_second % scale == 0:
            return f"{bits_per_second // scale}{unit}"
    return f"{bits_per_second}bit"
