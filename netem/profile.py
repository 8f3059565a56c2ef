"""Link profiles in ``tc netem`` terms.

An :class:`Impairment` is everything one ``tc qdisc ... netem`` line says about
one direction of a link; a :class:`Profile` names a link and gives both
directions (``forward`` = client → server, ``reverse`` = server → client).

Options are written exactly as ``tc`` writes them, so a profile *is* its
``tc`` command line and :meth:`Impairment.tc_args` prints it back::

    delay = "100ms 75ms"          # TIME [JITTER [CORRELATION]]
    distribution = "paretonormal" # uniform (default) | normal | pareto | paretonormal
    loss = "11%"                  # [random] P [CORR] | state P13 [P31 [P32 [P23 [P14]]]]
                                  #                   | gemodel P [R [1-H [1-K]]]
    duplicate = "1% 25%"          # P [CORR];  corrupt, reorder likewise
    gap = 5                       # with reorder
    rate = "20mbit 14"            # RATE [PACKETOVERHEAD [CELLSIZE [CELLOVERHEAD]]]
    slot = "1ms 4ms packets 8"    # MIN [MAX] | distribution D DELAY JITTER; [packets N] [bytes N]
    limit = 1000                  # packets queued (tail drop)

Single values have their own keys too (``jitter``, ``delay_correlation``,
``loss_correlation``, ``packet_overhead``, ...), which is what the CLI's
``--delay 40ms --jitter 10ms --loss 2%`` uses. Unlike ``tc``, a percentage
must carry ``%`` and a time its unit (``tc`` reads a bare ``10`` as 10% or
10 µs, a classic way to get a profile silently wrong).

Profile files (``netem/profiles/NAME.toml``): top-level options apply to both
directions, ``[forward]`` and ``[reverse]`` tables override one direction::

    description = "..."
    delay = "25ms"
    loss = "10%"
    [reverse]
    loss = "5%"
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from netem.distributions import DISTRIBUTIONS
from rudp import units

__all__ = [
    "DEFAULT_LIMIT",
    "Impairment",
    "Profile",
    "Slot",
    "list_profiles",
    "load_profile",
]

#: ``tc``'s default queue limit (packets).
DEFAULT_LIMIT = 1000
#: Largest delay the kernel can hold (32-bit scheduler ticks of 64 ns).
MAX_DELAY = 274.0
#: Largest jitter ``tabledist`` accepts (INT_MAX nanoseconds).
MAX_JITTER = (2**31 - 1) / 1e9

_INT32 = (-(2**31), 2**31 - 1)


# ---------------------------------------------------------------- value parsing


def _percent(token: Any, what: str) -> float:
    if not isinstance(token, str) or not token.strip().endswith("%"):
        raise ValueError(f"{what}: write percentages with '%' (e.g. '2%'), got {token!r}")
    return units.parse_percent(token, what)


def _duration(token: Any, what: str) -> float:
    if not isinstance(token, str) or not re.search(r"[a-zA-Z]\s*$", token):
        raise ValueError(f"{what}: write a time with its unit (e.g. '25ms'), got {token!r}")
    value = units.parse_duration(token, what)
    if value < 0:
        raise ValueError(f"{what} must not be negative, got {token!r}")
    return value


def _rate(token: Any, what: str) -> int:
    if not isinstance(token, str) or not re.search(r"[a-zA-Z]\s*$", token):
        raise ValueError(f"{what}: write a rate with its unit (e.g. '20mbit'), got {token!r}")
    return units.parse_rate(token, what)


def _integer(token: Any, what: str) -> int:
    if isinstance(token, bool):
        raise ValueError(f"{what}: expected an integer, got {token!r}")
    if isinstance(token, int):
        return token
    try:
        return int(str(token).strip())
    except ValueError:
        raise ValueError(f"{what}: expected an integer, got {token!r}") from None


def _is_number(token: str, signed: bool = False) -> bool:
    """``tc``'s test for an optional positional argument: does it start with a digit?"""
    return bool(token) and (token[0].isdigit() or (signed and token[0] == "-"))


def _fmt_percent(p: float) -> str:
    return f"{p * 100:.12g}%"


def _fmt_time(seconds: float) -> str:
    return units.format_duration(seconds)


# ---------------------------------------------------------------- the dataclasses


@dataclass(frozen=True)
class Slot:
    """``slot``: hold packets back and release them in bursts (Wi-Fi/LTE/DOCSIS MACs).

    Either a uniform wait in ``[min_delay, max_delay]`` between slots, or, with
    ``distribution`` set, a wait drawn like a delay (``delay`` ± ``jitter``).
    ``packets``/``bytes`` cap one slot (0 = no cap).
    """

    min_delay: float = 0.0
    max_delay: float = 0.0
    distribution: str | None = None
    delay: float = 0.0
    jitter: float = 0.0
    packets: int = 0
    bytes: int = 0

    def __post_init__(self) -> None:
        for name in ("min_delay", "max_delay", "delay", "jitter"):
            _check_number(f"slot {name}", getattr(self, name), 0.0, MAX_DELAY)
            object.__setattr__(self, name, round(getattr(self, name) * 1e9) / 1e9)
        if self.max_delay < self.min_delay:
            raise ValueError(
                f"slot max_delay ({self.max_delay}s) must be >= min_delay ({self.min_delay}s)"
            )
        if self.distribution is not None:
            _check_choice("slot distribution", self.distribution, DISTRIBUTIONS)
            if self.jitter <= 0:
                raise ValueError("slot jitter must be > 0 with a slot distribution")
            if self.min_delay or self.max_delay:
                raise ValueError("slot: give either MIN [MAX] or a distribution, not both")
        _check_int("slot packets", self.packets, 0, 2**31 - 1)
        _check_int("slot bytes", self.bytes, 0, 2**31 - 1)

    def tc_args(self) -> str:
        if self.distribution is not None:
            words = [
                "slot distribution",
                self.distribution,
                _fmt_time(self.delay),
                _fmt_time(self.jitter),
            ]
        else:
            words = ["slot", _fmt_time(self.min_delay)]
            if self.max_delay != self.min_delay:
                words.append(_fmt_time(self.max_delay))
        if self.packets:
            words += ["packets", str(self.packets)]
        if self.bytes:
            words += ["bytes", str(self.bytes)]
        return " ".join(words)


_PROBABILITIES = (
    "delay_correlation",
    "loss",
    "loss_correlation",
    "duplicate",
    "duplicate_correlation",
    "corrupt",
    "corrupt_correlation",
    "reorder",
    "reorder_correlation",
)


def _normal_fraction(p: float) -> float:
    """Drop float noise from parsing (``0.1%`` → 0.001, not 0.0010000000000000002)."""
    return round(float(p), 12)


def _check_number(name: str, value: Any, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")


def _check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class Impairment:
    """One direction of a link: the options of one ``tc qdisc ... netem`` line.

    Times are seconds, probabilities and correlations fractions in [0, 1],
    ``rate`` bits per second (0 = unlimited). Build it from ``tc`` text with
    :meth:`from_tc_args`, from CLI/TOML options with :meth:`from_options`, or
    directly. Invalid values raise ``ValueError`` naming the field.
    """

    delay: float = 0.0
    jitter: float = 0.0
    delay_correlation: float = 0.0
    distribution: str = "uniform"
    loss: float = 0.0
    loss_correlation: float = 0.0
    #: 4-state Markov loss: (p13, p31, p32, p23, p14).
    loss_state: tuple[float, float, float, float, float] | None = None
    #: Gilbert-Elliott loss: (p, r, 1-h, 1-k); 1-h = loss in the bad state, 1-k in the good.
    loss_gemodel: tuple[float, float, float, float] | None = None
    duplicate: float = 0.0
    duplicate_correlation: float = 0.0
    corrupt: float = 0.0
    corrupt_correlation: float = 0.0
    reorder: float = 0.0
    reorder_correlation: float = 0.0
    gap: int = 0
    rate: int = 0
    packet_overhead: int = 0
    cell_size: int = 0
    cell_overhead: int = 0
    slot: Slot | None = None
    limit: int = DEFAULT_LIMIT

    def __post_init__(self) -> None:
        _check_number("delay", self.delay, 0.0, MAX_DELAY)
        _check_number("jitter", self.jitter, 0.0, MAX_JITTER)
        for name in ("delay", "jitter"):  # tc's resolution: whole microseconds
            object.__setattr__(self, name, round(getattr(self, name) * 1e6) / 1e6)
        for name in _PROBABILITIES:
            _check_number(name, getattr(self, name), 0.0, 1.0)
            object.__setattr__(self, name, _normal_fraction(getattr(self, name)))
        _check_choice("distribution", self.distribution, DISTRIBUTIONS)
        if self.distribution != "uniform" and not (self.delay > 0 and self.jitter > 0):
            raise ValueError(f"distribution {self.distribution} needs a delay and a jitter")
        if self.delay_correlation and not self.jitter:
            raise ValueError("delay_correlation needs a jitter (it correlates the jitter)")
        self._check_loss()
        if self.reorder_correlation and not self.reorder:
            raise ValueError("reorder_correlation needs a reorder probability")
        if self.reorder and not self.delay:
            raise ValueError("reorder needs a delay (reordered packets skip it)")
        _check_int("gap", self.gap, 0, 2**32 - 1)
        if self.gap and not self.reorder:
            raise ValueError("gap needs a reorder probability")
        if self.reorder and not self.gap:
            object.__setattr__(self, "gap", 1)  # what tc sends when no gap is given
        if self.duplicate_correlation and not self.duplicate:
            raise ValueError("duplicate_correlation needs a duplicate probability")
        if self.corrupt_correlation and not self.corrupt:
            raise ValueError("corrupt_correlation needs a corrupt probability")
        _check_int("rate", self.rate, 0, 2**64 - 1)
        if 0 < self.rate < 8:
            raise ValueError(f"rate must be 0 (unlimited) or at least 8bit, got {self.rate}")
        _check_int("packet_overhead", self.packet_overhead, *_INT32)
        _check_int("cell_size", self.cell_size, 0, 2**32 - 1)
        _check_int("cell_overhead", self.cell_overhead, *_INT32)
        if not self.rate and (self.packet_overhead or self.cell_size or self.cell_overhead):
            raise ValueError("packet_overhead, cell_size and cell_overhead need a rate")
        if self.cell_overhead and not self.cell_size:
            raise ValueError("cell_overhead needs a cell_size")
        if self.slot is not None and not isinstance(self.slot, Slot):
            raise ValueError(f"slot must be a netem.Slot, got {self.slot!r}")
        _check_int("limit", self.limit, 1, 2**32 - 1)

    def _check_loss(self) -> None:
        models = [self.loss > 0 or self.loss_correlation > 0]
        models += [self.loss_state is not None, self.loss_gemodel is not None]
        if sum(models) > 1:
            raise ValueError("loss: use one loss model (random, state or gemodel), not several")
        if self.loss_correlation and not self.loss:
            raise ValueError("loss_correlation needs a loss probability")
        if self.loss_state is not None:
            names = ("p13", "p31", "p32", "p23", "p14")
            if not isinstance(self.loss_state, tuple) or len(self.loss_state) != 5:
                raise ValueError(f"loss_state must be 5 probabilities {names}")
            for name, p in zip(names, self.loss_state, strict=True):
                _check_number(f"loss state {name}", p, 0.0, 1.0)
            object.__setattr__(self, "loss_state", tuple(map(_normal_fraction, self.loss_state)))
            p13, p31, p32, _p23, p14 = self.loss_state
            if p13 + p14 > 1.0 + 1e-12:
                raise ValueError("loss state: p13 + p14 must not exceed 100%")
            if p31 + p32 > 1.0 + 1e-12:
                raise ValueError("loss state: p31 + p32 must not exceed 100%")
        if self.loss_gemodel is not None:
            names = ("p", "r", "1-h", "1-k")
            if not isinstance(self.loss_gemodel, tuple) or len(self.loss_gemodel) != 4:
                raise ValueError(f"loss_gemodel must be 4 probabilities {names}")
            for name, p in zip(names, self.loss_gemodel, strict=True):
                _check_number(f"loss gemodel {name}", p, 0.0, 1.0)
            object.__setattr__(
                self, "loss_gemodel", tuple(map(_normal_fraction, self.loss_gemodel))
            )

    # ------------------------------------------------------------ rendering

    def tc_args(self) -> str:
        """The ``netem`` options as ``tc`` takes them: ``"delay 25ms loss 10%"``."""
        words: list[str] = []
        if self.limit != DEFAULT_LIMIT:
            words += ["limit", str(self.limit)]
        if self.delay or self.jitter:
            words += ["delay", _fmt_time(self.delay)]
            if self.jitter:
                words.append(_fmt_time(self.jitter))
                if self.delay_correlation:
                    words.append(_fmt_percent(self.delay_correlation))
        if self.distribution != "uniform":
            words += ["distribution", self.distribution]
        if self.loss:
            words += ["loss", _fmt_percent(self.loss)]
            if self.loss_correlation:
                words.append(_fmt_percent(self.loss_correlation))
        if self.loss_state is not None:
            words += ["loss", "state", *map(_fmt_percent, self.loss_state)]
        if self.loss_gemodel is not None:
            words += ["loss", "gemodel", *map(_fmt_percent, self.loss_gemodel)]
        if self.duplicate:
            words += ["duplicate", _fmt_percent(self.duplicate)]
            if self.duplicate_correlation:
                words.append(_fmt_percent(self.duplicate_correlation))
        if self.reorder:
            words += ["reorder", _fmt_percent(self.reorder)]
            if self.reorder_correlation:
                words.append(_fmt_percent(self.reorder_correlation))
            if self.gap > 1:
                words += ["gap", str(self.gap)]
        if self.corrupt:
            words += ["corrupt", _fmt_percent(self.corrupt)]
            if self.corrupt_correlation:
                words.append(_fmt_percent(self.corrupt_correlation))
        if self.rate:
            words += ["rate", units.format_rate(self.rate)]
            tail = [self.packet_overhead, self.cell_size, self.cell_overhead]
            while tail and not tail[-1]:
                tail.pop()
            words += [str(v) for v in tail]
        if self.slot is not None:
            words.append(self.slot.tc_args())
        return " ".join(words)

    def summary(self) -> str:
        """A short human description (``tc_args`` without the queue details)."""
        return self.tc_args() or "no impairment"

    # ------------------------------------------------------------ parsing

    @classmethod
    def from_tc_args(cls, text: str, what: str = "netem") -> Impairment:
        """Parse ``tc``'s netem option syntax (what :meth:`tc_args` prints)."""
        return cls().with_tc_args(text, what)

    def with_tc_args(self, text: str, what: str = "netem") -> Impairment:
        """This impairment with the options in ``text`` (``tc`` syntax) applied."""
        tokens = text.split()
        changes: dict[str, Any] = {}
        i = 0
        while i < len(tokens):
            keyword = tokens[i]
            if keyword not in _TC_KEYWORDS:
                known = ", ".join(_TC_KEYWORDS)
                raise ValueError(f"{what}: unknown netem option {keyword!r} (known: {known})")
            j = _extent(keyword, tokens, i + 1)
            changes.update(_parse_option(keyword, tokens[i + 1 : j], f"{what}: {keyword}"))
            i = j
        return self._replace_checked(changes, what)

    @classmethod
    def from_options(cls, what: str = "options", **options: Any) -> Impairment:
        """Build from option keys (``delay="40ms", jitter="10ms", loss="2%"``)."""
        return cls().with_options(options, what)

    def with_options(self, options: Mapping[str, Any], what: str = "options") -> Impairment:
        """This impairment with ``options`` applied, each key resetting what it names.

        ``netem`` takes a whole ``tc`` argument string; the other keys are the
        ``tc`` option words and the single-value fields (``jitter``, ...).
        Keys are applied in ``tc``'s order, so ``delay`` then ``jitter`` works.
        """
        normalized = {str(k).replace("-", "_"): v for k, v in options.items()}
        unknown = set(normalized) - set(_GROUPS) - {"netem"}
        if unknown:
            raise ValueError(
                f"{what}: unknown netem option(s) {', '.join(sorted(unknown))} "
                f"(known: netem, {', '.join(_GROUPS)})"
            )
        result = self
        if "netem" in normalized:
            result = result.with_tc_args(str(normalized.pop("netem")), f"{what}.netem")
        changes: dict[str, Any] = {}
        for key in _GROUPS:  # tc's order
            if key not in normalized:
                continue
            value = normalized[key]
            tokens = [str(t) for t in value] if isinstance(value, list | tuple) else None
            if tokens is None:
                tokens = value.split() if isinstance(value, str) else [value]
            changes.update(_parse_option(key, tokens, f"{what}.{key}"))
        return result._replace_checked(changes, what)

    def _replace_checked(self, changes: dict[str, Any], what: str) -> Impairment:
        if changes.get("reorder") == 0.0 and "gap" not in changes:
            changes["gap"] = 0
        try:
            return dataclasses.replace(self, **changes)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None


# Each option keyword → the fields it resets (tc order), then single-value keys.
_GROUP_FIELDS: dict[str, tuple[str, ...]] = {
    "limit": ("limit",),
    "delay": ("delay", "jitter", "delay_correlation"),
    "distribution": ("distribution",),
    "loss": ("loss", "loss_correlation", "loss_state", "loss_gemodel"),
    "duplicate": ("duplicate", "duplicate_correlation"),
    "reorder": ("reorder", "reorder_correlation"),
    "gap": ("gap",),
    "corrupt": ("corrupt", "corrupt_correlation"),
    "rate": ("rate", "packet_overhead", "cell_size", "cell_overhead"),
    "slot": ("slot",),
}
_SINGLE = (
    "jitter",
    "delay_correlation",
    "loss_correlation",
    "duplicate_correlation",
    "reorder_correlation",
    "corrupt_correlation",
    "packet_overhead",
    "cell_size",
    "cell_overhead",
)
_GROUPS: dict[str, tuple[str, ...]] = {**_GROUP_FIELDS, **{k: (k,) for k in _SINGLE}}
#: The option words of tc's netem syntax, in tc's order.
_TC_KEYWORDS = tuple(_GROUP_FIELDS)


def _extent(keyword: str, tokens: list[str], j: int) -> int:
    """Where ``keyword``'s arguments end in tc text: like tc, numbers and the option's own words."""
    if keyword == "distribution":
        return j + 1
    if keyword == "loss" and j < len(tokens) and tokens[j] in ("random", "state", "gemodel"):
        j += 1
    if keyword == "slot" and j < len(tokens) and tokens[j] == "distribution":
        j += 2
    while j < len(tokens) and (
        _is_number(tokens[j], signed=True)
        or (keyword == "slot" and tokens[j] in ("packets", "bytes"))
    ):
        j += 1
    return j


def _defaults(fields: Iterable[str]) -> dict[str, Any]:
    proto = Impairment()
    return {f: getattr(proto, f) for f in fields}


def _take(tokens: list[Any], what: str, lo: int, hi: int) -> None:
    if not lo <= len(tokens) <= hi:
        want = f"{lo}" if lo == hi else f"{lo} to {hi}"
        raise ValueError(f"{what}: expected {want} value(s), got {len(tokens)}: {tokens!r}")


def _parse_option(key: str, tokens: list[Any], what: str) -> dict[str, Any]:
    out = _defaults(_GROUPS[key])
    if key in ("limit", "gap"):
        _take(tokens, what, 1, 1)
        out[key] = _integer(tokens[0], what)
    elif key == "delay":
        _take(tokens, what, 1, 3)
        out["delay"] = _duration(tokens[0], what)
        if len(tokens) > 1:
            out["jitter"] = _duration(tokens[1], f"{what} jitter")
        if len(tokens) > 2:
            out["delay_correlation"] = _percent(tokens[2], f"{what} correlation")
    elif key == "jitter":
        _take(tokens, what, 1, 1)
        out["jitter"] = _duration(tokens[0], what)
    elif key == "distribution":
        _take(tokens, what, 1, 1)
        out["distribution"] = str(tokens[0])
    elif key == "loss":
        out.update(_parse_loss(tokens, what))
    elif key in ("duplicate", "reorder", "corrupt"):
        _take(tokens, what, 1, 2)
        out[key] = _percent(tokens[0], what)
        if len(tokens) > 1:
            out[f"{key}_correlation"] = _percent(tokens[1], f"{what} correlation")
    elif key.endswith("_correlation"):
        _take(tokens, what, 1, 1)
        out[key] = _percent(tokens[0], what)
    elif key == "rate":
        _take(tokens, what, 1, 4)
        out["rate"] = _rate(tokens[0], what)
        for name, token in zip(
            ("packet_overhead", "cell_size", "cell_overhead"), tokens[1:], strict=False
        ):
            out[name] = _integer(token, f"{what} {name}")
    elif key in ("packet_overhead", "cell_size", "cell_overhead"):
        _take(tokens, what, 1, 1)
        out[key] = _integer(tokens[0], what)
    elif key == "slot":
        out["slot"] = _parse_slot([str(t) for t in tokens], what)
    return out


def _parse_loss(tokens: list[Any], what: str) -> dict[str, Any]:
    if not tokens:
        raise ValueError(f"{what}: expected a probability or a loss model")
    model, args = "random", tokens
    if isinstance(tokens[0], str) and tokens[0] in ("random", "state", "gemodel"):
        model, args = tokens[0], tokens[1:]
    if model == "random":
        _take(args, what, 1, 2)
        out = {"loss": _percent(args[0], what)}
        if len(args) > 1:
            out["loss_correlation"] = _percent(args[1], f"{what} correlation")
        return out
    if model == "state":
        _take(args, f"{what} state", 1, 5)
        names = ("p13", "p31", "p32", "p23", "p14")
        given = [_percent(a, f"{what} state {n}") for n, a in zip(names, args, strict=False)]
        p13 = given[0]
        values = [p13, 1.0 - p13, 0.0, 1.0, 0.0]  # tc's defaults for omitted values
        values[: len(given)] = given
        return {"loss_state": tuple(values)}
    _take(args, f"{what} gemodel", 1, 4)
    names = ("p", "r", "1-h", "1-k")
    given = [_percent(a, f"{what} gemodel {n}") for n, a in zip(names, args, strict=False)]
    values = [given[0], 1.0 - given[0], 1.0, 0.0]  # tc's defaults for omitted values
    values[: len(given)] = given
    return {"loss_gemodel": tuple(values)}


def _parse_slot(tokens: list[str], what: str) -> Slot:
    kwargs: dict[str, Any] = {}
    rest = tokens
    if rest and rest[0] == "distribution":
        if len(rest) < 4:
            raise ValueError(f"{what}: expected 'distribution NAME DELAY JITTER'")
        kwargs["distribution"] = rest[1]
        kwargs["delay"] = _duration(rest[2], f"{what} delay")
        kwargs["jitter"] = _duration(rest[3], f"{what} jitter")
        rest = rest[4:]
    else:
        if not rest or not _is_number(rest[0]):
            raise ValueError(f"{what}: expected MIN_DELAY [MAX_DELAY] or distribution ...")
        kwargs["min_delay"] = kwargs["max_delay"] = _duration(rest[0], f"{what} min_delay")
        rest = rest[1:]
        if rest and _is_number(rest[0]):
            kwargs["max_delay"] = _duration(rest[0], f"{what} max_delay")
            rest = rest[1:]
    while rest:
        if rest[0] not in ("packets", "bytes") or len(rest) < 2:
            raise ValueError(f"{what}: unexpected {' '.join(rest)!r}")
        if rest[0] == "packets":
            kwargs["packets"] = _integer(rest[1], f"{what} packets")
        else:
            kwargs["bytes"] = units.parse_size(rest[1], f"{what} bytes")
        rest = rest[2:]
    try:
        return Slot(**kwargs)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


@dataclass(frozen=True)
class Profile:
    """A named link: ``forward`` impairs client → server, ``reverse`` server → client."""

    name: str
    description: str = ""
    forward: Impairment = field(default_factory=Impairment)
    reverse: Impairment = field(default_factory=Impairment)

    def tc_commands(self, dev_forward: str, dev_reverse: str) -> list[str]:
        """The ``tc`` commands that build this link from two devices' egress queues.

        ``dev_forward`` carries client → server packets (e.g. the client side's
        veth), ``dev_reverse`` server → client.
        """
        return [
            f"tc qdisc add dev {dev} root netem {imp.tc_args()}".rstrip()
            for dev, imp in ((dev_forward, self.forward), (dev_reverse, self.reverse))
        ]

    @property
    def symmetric(self) -> bool:
        return self.forward == self.reverse

    def summary(self) -> str:
        if self.symmetric:
            return f"{self.forward.summary()} (each way)"
        return f"forward: {self.forward.summary()}; reverse: {self.reverse.summary()}"

    @classmethod
    def from_options(
        cls,
        name: str = "inline",
        description: str = "",
        *,
        base: Profile | None = None,
        **options: Any,
    ) -> Profile:
        """A profile from inline options (``delay="40ms", jitter="10ms", loss="2%"``).

        The options apply to both directions, over ``base`` when given (so
        ``--profile lossy --loss 5%`` changes only the loss).
        """
        if base is None:
            base = cls(name=name, description=description)
        elif not options:
            return base
        forward = base.forward.with_options(options)
        reverse = base.reverse.with_options(options)
        label = name if base.name == "inline" or name != "inline" else f"{base.name}+inline"
        return cls(label, description or base.description, forward, reverse)

    @classmethod
    def from_toml(cls, text: str, name: str) -> Profile:
        """Parse a profile file's text (see the module docstring for the format)."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"profile {name}: invalid TOML: {exc}") from None
        return cls.from_mapping(data, name)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], name: str) -> Profile:
        data = dict(data)
        label = str(data.pop("name", name))
        description = data.pop("description", "")
        if not isinstance(description, str):
            raise ValueError(f"profile {label}: description must be a string")
        per_direction = {}
        for direction in ("forward", "reverse"):
            table = data.pop(direction, {})
            if not isinstance(table, dict):
                raise ValueError(f"profile {label}: [{direction}] must be a table")
            per_direction[direction] = table
        common = Impairment().with_options(data, f"profile {label}")
        forward = common.with_options(per_direction["forward"], f"profile {label}: forward")
        reverse = common.with_options(per_direction["reverse"], f"profile {label}: reverse")
        return cls(label, description, forward, reverse)


def _profile_dir() -> Any:
    return resources.files("netem") / "profiles"


def list_profiles() -> list[str]:
    """The names of the shipped profiles."""
    return sorted(
        p.name.removesuffix(".toml") for p in _profile_dir().iterdir() if p.name.endswith(".toml")
    )


def load_profile(name_or_path: str | Path) -> Profile:
    """A shipped profile by name (``"lossy"``) or a profile file by path."""
    text_name = str(name_or_path)
    path = Path(text_name)
    if path.suffix == ".toml" or path.exists() or "/" in text_name:
        if not path.is_file():
            raise ValueError(f"profile file {text_name!r} not found")
        return Profile.from_toml(path.read_text(), path.stem)
    shipped = _profile_dir() / f"{text_name}.toml"
    if not shipped.is_file():
        raise ValueError(
            f"unknown profile {text_name!r}: use one of {', '.join(list_profiles())} "
            "or a path to a .toml file"
        )
    return Profile.from_toml(shipped.read_text(), text_name)
