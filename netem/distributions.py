"""netem's delay distribution tables, rebuilt from their mathematical definition.

``tc`` loads ``normal``, ``pareto`` and ``paretonormal`` as tables of 4096
signed 16-bit values (an inverse CDF sampled at equal probability steps,
scaled by :data:`SCALE` = 8192 per standard deviation) and the kernel picks
``table[rnd % 4096]``. Building the same tables here, rather than reading
``/usr/lib/tc/*.dist``, keeps the emulator identical on machines without
iproute2; a test checks them against the installed files where they exist.

``uniform`` has no table: the kernel draws uniformly from ``[mu - sigma, mu + sigma)``.
(``tc-netem(8)`` says the default distribution is normal; the code uses uniform.)
"""

from __future__ import annotations

import functools
import math
from statistics import NormalDist

__all__ = ["DISTRIBUTIONS", "SCALE", "table"]

#: One standard deviation in table units (the kernel's NETEM_DIST_SCALE).
SCALE = 8192
#: The distributions ``tc`` ships tables for, plus the table-less default.
DISTRIBUTIONS = ("uniform", "normal", "pareto", "paretonormal")

_FINE = 16384  # resolution of the underlying CDF; every 4th point is kept
_ENTRIES = 4096
_GRID = 0.00005  # step of the grid the normal table's abscissae lie on
_PARETO_SHAPE = 3.0


def _clamp16(value: int) -> int:
    return max(-32768, min(32767, value))


def _normal_cdf(x: float) -> float:
    return 0.5 + 0.5 * math.erf(x / math.sqrt(2.0))


def _normal_point(i: int) -> float:
    """The largest grid point in [-10, 10] whose CDF rounds to ``i / 16384``."""
    target = min(max((i + 0.5) / _FINE, 1e-300), 1.0 - 1e-16)
    j = math.floor((NormalDist().inv_cdf(target) + 10.0) / _GRID)
    while round(_FINE * _normal_cdf(-10.0 + (j + 1) * _GRID)) <= i:
        j += 1
    while round(_FINE * _normal_cdf(-10.0 + j * _GRID)) > i:
        j -= 1
    return -10.0 + j * _GRID


def _normal_raw() -> list[int]:
    return [round(SCALE * _normal_point(4 * k)) for k in range(_ENTRIES)]


def _pareto() -> list[int]:
    """Pareto with shape 3, shifted by its mean 1.5 and scaled by 4/3."""
    out = []
    for k in range(_ENTRIES):
        u = (65536 - 16 * k) / 65536
        value = (u ** (-1.0 / _PARETO_SHAPE) - 1.5) * (4.0 / 3.0) * SCALE
        out.append(min(32767, round(value)))
    return out


def _c_div(a: int, b: int) -> int:
    """Integer division truncating toward zero, as C does."""
    q = abs(a) // b
    return q if a >= 0 else -q


@functools.cache
def table(name: str) -> tuple[int, ...] | None:
    """The 4096-entry table for ``name``, or ``None`` for ``uniform``."""
    if name == "uniform":
        return None
    if name == "normal":
        return tuple(_clamp16(v) for v in _normal_raw())
    if name == "pareto":
        return tuple(_pareto())
    if name == "paretonormal":  # a quarter normal, three quarters pareto
        return tuple(
            _clamp16(_c_div(n + 3 * p, 4)) for n, p in zip(_normal_raw(), _pareto(), strict=True)
        )
    raise ValueError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}, got {name!r}")
