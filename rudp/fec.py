"""Reed-Solomon forward error correction across packets, and the packet-group logic.

The code is the one ``reedsolo`` defines: for k data shards and m parity shards, parity
shard j at byte b is byte k+j of ``reedsolo.RSCodec(nsym=m, nsize=k+m).encode(column)``,
where the column is byte b of every data shard (zero-padded to the longest). reedsolo is
the specification and the test oracle but runs at about 0.5 MB/s, so this module only
asks it once per (k, m) for the m x k coding matrix (the code is linear: encode the unit
vectors) and then multiplies matrices over GF(2^8). Decoding solves for the lost data
shards with the inverse of a small submatrix, cached per erasure pattern.

The multiply runs in the compiled kernel ``rudp._rs`` (SIMD nibble tables) when it built;
:class:`PyMatrix` is the readable reference with the same contract, used when the
extension is missing or ``RUDP_ENGINE=python``, and in the tests.

Above the codec sit sans-I/O state machines for packets (integer millisecond clock):
:class:`FecEncoder` numbers outgoing payloads into groups and emits parity when a group
is full or its time bound expires; :class:`FecDecoder` remembers payloads and returns
lost ones as soon as enough of their group arrived; :class:`FecController` picks the
parity count from the measured loss rate.
"""

from __future__ import annotations

import math
import os
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Protocol

__all__ = [
    "ENGINE",
    "ENGINES",
    "FecController",
    "FecDecoder",
    "FecEncoder",
    "FecTag",
    "ParityPacket",
    "PyMatrix",
    "RSCodec",
    "TooManyErasures",
    "klauspost_matrix",
    "reedsolo_matrix",
]

try:
    from rudp import _rs
except ImportError:  # the extension is optional: fall back to the reference kernel
    _rs = None

#: Kernels this installation can run, and the one used by default.
ENGINES: tuple[str, ...] = ("python", "cython") if _rs is not None else ("python",)
ENGINE: str = "python" if _rs is None or os.environ.get("RUDP_ENGINE") == "python" else "cython"

MatrixKind = Literal["reedsolo", "klauspost"]

# ---------------------------------------------------------------------------
# GF(2^8), polynomial 0x11D, generator 2 (reedsolo's and klauspost's field)
# ---------------------------------------------------------------------------

_EXP = bytearray(512)
_LOG = [0] * 256
_x = 1
for _i in range(255):
    _EXP[_i] = _x
    _LOG[_x] = _i
    _x <<= 1
    if _x & 0x100:
        _x ^= 0x11D
_EXP[255:510] = _EXP[:255]
del _x, _i


def _mul(a: int, b: int) -> int:
    return _EXP[_LOG[a] + _LOG[b]] if a and b else 0


def _inv(a: int) -> int:
    return _EXP[255 - _LOG[a]]


def _pow(a: int, n: int) -> int:
    if n == 0:
        return 1
    return _EXP[(_LOG[a] * n) % 255] if a else 0


#: ``_MUL[c]`` maps every byte x to c*x: a ``bytes.translate`` table.
_MUL = [bytes(_mul(c, x) for x in range(256)) for c in range(256)]


def _invert(rows: Sequence[Sequence[int]]) -> list[list[int]]:
    """Inverse of a square matrix over GF(2^8) (Gauss-Jordan); ValueError if singular."""
    n = len(rows)
    work = [[*row, *(int(i == r) for i in range(n))] for r, row in enumerate(rows)]
    for col in range(n):
        pivot = next((r for r in range(col, n) if work[r][col]), None)
        if pivot is None:
            raise ValueError("matrix is singular")
        work[col], work[pivot] = work[pivot], work[col]
        scale = _inv(work[col][col])
        work[col] = [_mul(scale, v) for v in work[col]]
        for r in range(n):
            factor = work[r][col]
            if r != col and factor:
                work[r] = [v ^ _mul(factor, p) for v, p in zip(work[r], work[col], strict=True)]
    return [row[n:] for row in work]


def _check_code(k: int, m: int) -> None:
    for name, value, hi in (("k (data shards)", k, 254), ("m (parity shards)", m, 254)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
            raise ValueError(f"{name} must be an integer in [1, {hi}], got {value!r}")
    if k + m > 255:
        raise ValueError(f"k + m (data + parity shards) must be at most 255, got {k} + {m}")


# ---------------------------------------------------------------------------
# Coding matrices: m rows of k coefficients, parity = matrix x data
# ---------------------------------------------------------------------------


@lru_cache(maxsize=256)
def reedsolo_matrix(k: int, m: int) -> tuple[bytes, ...]:
    """The coding matrix of ``reedsolo.RSCodec(nsym=m, nsize=k+m)``, read off its encoder.

    Column i is the parity of the i-th unit vector; by linearity any column of data then
    encodes to the matrix times that column.
    """
    import reedsolo

    _check_code(k, m)
    codec = reedsolo.RSCodec(nsym=m, nsize=k + m)
    columns = [codec.encode(bytes(int(i == j) for j in range(k)))[k:] for i in range(k)]
    return tuple(bytes(column[j] for column in columns) for j in range(m))


@lru_cache(maxsize=256)
def klauspost_matrix(k: int, m: int) -> tuple[bytes, ...]:
    """klauspost/reedsolomon's default (kcp-go's) parity rows: V x inv(V[:k]).

    V is the (k+m) x k Vandermonde matrix V[r][c] = r^c over the field elements r =
    0..k+m-1; multiplying by the inverse of its top square makes the code systematic.
    """
    _check_code(k, m)
    vandermonde = [[_pow(r, c) for c in range(k)] for r in range(k + m)]
    top_inverse = _invert(vandermonde[:k])
    rows = []
    for r in range(k, k + m):
        row = vandermonde[r]
        rows.append(
            bytes(_xor_sum(_mul(row[t], top_inverse[t][c]) for t in range(k)) for c in range(k))
        )
    return tuple(rows)


def _xor_sum(values: Iterable[int]) -> int:
    total = 0
    for v in values:
        total ^= v
    return total


# ---------------------------------------------------------------------------
# Kernels: a matrix times shards
# ---------------------------------------------------------------------------


class Matrix(Protocol):
    """What both kernels provide (``PyMatrix`` here, ``rudp._rs.Matrix`` compiled)."""

    rows: int
    cols: int

    def mul(self, inputs: Sequence[bytes], length: int) -> list[bytes]: ...


class PyMatrix:
    """Reference kernel: ``rows`` output shards, each the sum of coefficient x input.

    Inputs shorter than ``length`` count as zero-padded; bytes past it are ignored.
    Readable and still not slow: ``bytes.translate`` multiplies a whole shard by one
    constant and a little-endian integer XORs whole shards (zero padding comes free).
    """

    def __init__(self, rows: Sequence[bytes]) -> None:
        self.coefficients = tuple(bytes(row) for row in rows)
        if not self.coefficients or not self.coefficients[0]:
            raise ValueError("a matrix needs at least one row and one column")
        if any(len(row) != len(self.coefficients[0]) for row in self.coefficients):
            raise ValueError("matrix rows must all have the same length")
        self.rows = len(self.coefficients)
        self.cols = len(self.coefficients[0])

    def mul(self, inputs: Sequence[bytes], length: int) -> list[bytes]:
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if len(inputs) != self.cols:
            raise ValueError(f"expected {self.cols} input shards, got {len(inputs)}")
        shards = [bytes(x[:length]) for x in inputs]
        outputs = []
        for row in self.coefficients:
            acc = 0
            for coef, shard in zip(row, shards, strict=True):
                if coef:
                    acc ^= int.from_bytes(shard.translate(_MUL[coef]), "little")
            outputs.append(acc.to_bytes(length, "little"))
        return outputs


def _matrix_class(engine: str | None) -> Callable[[Sequence[bytes]], Matrix]:
    engine = ENGINE if engine is None else engine
    if engine == "cython" and _rs is not None:
        return _rs.Matrix
    if engine == "python":
        return PyMatrix
    raise ValueError(f"engine must be one of {', '.join(map(repr, ENGINES))}, got {engine!r}")


# ---------------------------------------------------------------------------
# The codec
# ---------------------------------------------------------------------------


class TooManyErasures(ValueError):
    """More shards of a group are missing than it has parity shards: nothing to recover."""


class RSCodec:
    """Systematic Reed-Solomon erasure code: k data shards, m parity shards.

    ``matrix="reedsolo"`` (default) is the code reedsolo defines; ``"klauspost"`` is the
    one kcp-go uses. ``engine`` picks the kernel (default :data:`ENGINE`). Instances are
    safe to share: the only state is a bounded cache of decode matrices.
    """

    #: Decode matrices kept per codec (one per erasure pattern seen).
    DECODE_CACHE = 256

    def __init__(
        self, k: int, m: int, *, matrix: MatrixKind = "reedsolo", engine: str | None = None
    ) -> None:
        _check_code(k, m)
        builders = {"reedsolo": reedsolo_matrix, "klauspost": klauspost_matrix}
        if matrix not in builders:
            raise ValueError(f"matrix must be 'reedsolo' or 'klauspost', got {matrix!r}")
        self.k, self.m, self.n = k, m, k + m
        self.matrix = matrix
        self.coding = builders[matrix](k, m)
        self._new_matrix = _matrix_class(engine)
        self.engine = "python" if self._new_matrix is PyMatrix else "cython"
        self._encoder = self._new_matrix(self.coding)
        self._decoders: OrderedDict[tuple[tuple[int, ...], tuple[int, ...]], Matrix] = OrderedDict()

    def __repr__(self) -> str:
        return f"RSCodec({self.k}, {self.m}, matrix={self.matrix!r}, engine={self.engine!r})"

    def encode(self, data_shards: Sequence[bytes]) -> list[bytes]:
        """The m parity shards, each as long as the longest data shard."""
        if len(data_shards) != self.k:
            raise ValueError(f"expected {self.k} data shards, got {len(data_shards)}")
        return self._encoder.mul(data_shards, max(map(len, data_shards)))

    def decode(self, shards: Sequence[bytes | None]) -> list[bytes]:
        """The k data shards, from k + m shards (data first) with ``None`` for lost ones.

        Shards present are returned unchanged; recovered ones are as long as the longest
        shard given. Raises :class:`TooManyErasures` when fewer than k shards are present.
        """
        if len(shards) != self.n:
            raise ValueError(f"expected {self.n} shards (data then parity), got {len(shards)}")
        k = self.k
        out = [s if s is None or type(s) is bytes else bytes(s) for s in shards[:k]]
        missing = tuple(i for i, s in enumerate(out) if s is None)
        if not missing:
            return out  # type: ignore[return-value]
        parity = tuple(j for j, s in enumerate(shards[k:]) if s is not None)
        if len(parity) < len(missing):
            lost = len(missing) + self.m - len(parity)
            raise TooManyErasures(
                f"{lost} of {self.n} shards lost but only {self.m} parity shards: unrecoverable"
            )
        parity = parity[: len(missing)]
        inputs = [s for s in out if s is not None]
        inputs += [shards[k + j] for j in parity]  # type: ignore[misc]
        length = max(map(len, filter(None, shards)), default=0)
        for i, shard in zip(
            missing, self._decoder(missing, parity).mul(inputs, length), strict=True
        ):
            out[i] = shard
        return out  # type: ignore[return-value]

    def _decoder(self, missing: tuple[int, ...], parity: tuple[int, ...]) -> Matrix:
        """Rows giving the missing data shards from (present data, then used parity).

        With D the missing data indices and P the parity rows used, parity p satisfies
        sum_{i in D} C[p][i] d_i = p + sum_{i not in D} C[p][i] d_i, so d_D = A^-1 (p_P +
        C[P][not D] d_rest) with A = C[P][D]: only an |D| x |D| inverse per pattern.
        """
        key = (missing, parity)
        decoder = self._decoders.get(key)
        if decoder is not None:
            self._decoders.move_to_end(key)
            return decoder
        present = [i for i in range(self.k) if i not in missing]
        a_inv = _invert([[self.coding[p][d] for d in missing] for p in parity])
        rows = []
        for inv_row in a_inv:
            data_coefs = [
                _xor_sum(_mul(inv_row[t], self.coding[p][i]) for t, p in enumerate(parity))
                for i in present
            ]
            rows.append(bytes(data_coefs + inv_row))
        decoder = self._new_matrix(rows)
        self._decoders[key] = decoder
        if len(self._decoders) > self.DECODE_CACHE:
            self._decoders.popitem(last=False)
        return decoder


@lru_cache(maxsize=128)
def _shared_codec(k: int, m: int, engine: str | None) -> RSCodec:
    return RSCodec(k, m, engine=engine)


# ---------------------------------------------------------------------------
# Packet groups (sans-I/O; ``now`` is a monotonic integer millisecond clock)
#
# What the wire must carry for them (the byte layout belongs to rudp/wire.py):
#
#   data packet    group u32 | index u8                           | payload
#   parity packet  group u32 | index u8 | count u8 | parity u8    | shard
#
#   group   the group's id; consecutive groups have consecutive ids, wrapping at 2^32
#   index   data: position in the group (< count); parity: which parity shard (< parity)
#   count   k', the data packets the group actually holds (a group closed early by its
#           time bound holds fewer than the configured k)
#   parity  m, the parity packets of the group (the code depends on both k' and m)
#
# The shard the code protects is  size u16 (payload length + 2, as kcp-go counts) |
# payload,  zero-padded to the group's longest, so a parity shard is 2 + the longest
# payload long and a recovered shard gives back the exact payload. The size prefix and
# the padding never travel with data packets.
# ---------------------------------------------------------------------------

GROUP_MODULUS = 1 << 32
#: The longest payload a group can protect (the u16 size counts its own 2 bytes).
MAX_PAYLOAD = 0xFFFF - 2
_SIZE = struct.Struct("<H")


@dataclass(frozen=True, slots=True)
class FecTag:
    """Where an outgoing data payload sits: the header fields of its data packet."""

    group: int
    index: int


@dataclass(frozen=True, slots=True)
class ParityPacket:
    """One parity packet to send: header fields and the parity shard."""

    group: int
    index: int
    count: int
    parity: int
    shard: bytes


def _binomial_tail(n: int, p: float, m: int) -> float:
    """P(more than m of n independent packets lost), each with probability p."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(m + 1, n + 1))


class FecController:
    """Picks each group's parity count from the raw packet loss rate the connection feeds.

    Model: packets are lost independently with probability p; a group of k' data and m
    parity packets cannot be repaired when more than m of its k' + m packets are lost.
    ``parity_for(k')`` is the smallest m that keeps that probability at or below
    ``target`` — or ``partial_target`` for a group closed before it filled (sparse,
    latency-critical traffic, where a loss left to the ARQ costs a whole timeout rather
    than a little throughput) — capped at ``max_parity``. Below ``off_below`` loss there is no parity at
    all (and data packets carry no FEC header), so a clean link pays nothing; it turns
    back on at ``on_above`` (two thresholds, so a rate near one does not flap).

    Feed it the loss the link causes, not what is left after repair: while FEC is off the
    ARQ's retransmission rate, while it is on the peer decoder's ``shards_lost /
    shards_expected`` (FEC hides losses from the ARQ, so its rate would turn FEC off).
    """

    def __init__(
        self,
        *,
        max_parity: int = 8,
        target: float = 0.01,
        partial_target: float = 0.001,
        on_above: float = 0.005,
        off_below: float = 0.002,
    ) -> None:
        _check_int("max_parity", max_parity, 1, 254)
        for name, value in (("target", target), ("partial_target", partial_target)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value!r}")
        if not 0.0 <= off_below <= on_above <= 1.0:
            raise ValueError(
                f"need 0 <= off_below <= on_above <= 1, got off_below={off_below!r}, "
                f"on_above={on_above!r}"
            )
        self.max_parity = max_parity
        self.target = target
        self.partial_target = partial_target
        self.on_above = on_above
        self.off_below = off_below
        self.loss_rate = 0.0
        self.active = False
        self._memo: dict[tuple[int, bool], int] = {}

    def update(self, loss_rate: float) -> None:
        """Take a new measurement of the raw loss rate (a fraction in [0, 1])."""
        if not 0.0 <= loss_rate <= 1.0:
            raise ValueError(f"loss_rate must be in [0, 1], got {loss_rate!r}")
        if loss_rate >= self.on_above:
            self.active = True
        elif loss_rate < self.off_below:
            self.active = False
        if loss_rate != self.loss_rate:
            self.loss_rate = loss_rate
            self._memo.clear()

    def parity_for(self, count: int, partial: bool = False) -> int:
        """Parity packets for a group of ``count`` data packets (0 while inactive);
        ``partial``: the group closed before it filled."""
        if not self.active:
            return 0
        m = self._memo.get((count, partial))
        if m is None:
            limit = max(1, min(self.max_parity, 255 - count))
            p = max(self.loss_rate, self.off_below)
            target = self.partial_target if partial else self.target
            m = next(
                (m for m in range(1, limit) if _binomial_tail(count + m, p, m) <= target),
                limit,
            )
            self._memo[(count, partial)] = m
        return m


class FecEncoder:
    """Numbers outgoing payloads into groups and emits each group's parity.

    A group closes when it holds ``data_shards`` payloads or ``max_delay`` ms after its
    first one, whichever comes first, so sparse traffic gets its parity while it can
    still help (call :meth:`poll` at :meth:`next_deadline`). ``parity`` is a fixed m or a
    :class:`FecController`. Changes to ``data_shards``, ``parity`` and ``max_delay``
    take effect for the group being filled. Data payloads are never held back: the caller
    sends each at once with its :class:`FecTag`.
    """

    def __init__(
        self,
        data_shards: int = 10,
        parity: int | FecController = 3,
        max_delay: int = 20,
        *,
        first_group: int = 0,
        engine: str | None = None,
    ) -> None:
        _check_int("data_shards", data_shards, 1, 254)
        if not isinstance(parity, FecController):
            _check_int("parity", parity, 1, 254)
        _check_int("max_delay", max_delay, 0, 3_600_000)
        _check_int("first_group", first_group, 0, GROUP_MODULUS - 1)
        _matrix_class(engine)  # fail now, not at the first group, on a bad engine name
        self.data_shards = data_shards
        self.parity = parity
        self.max_delay = max_delay
        self.engine = engine
        self._group = first_group
        self._shards: list[bytes] = []
        self._opened = 0
        self.counters = dict.fromkeys(
            (
                "data_protected",
                "data_unprotected",
                "groups_full",
                "groups_timed",
                "parity_sent",
                "parity_bytes",
            ),
            0,
        )

    def _parity_for(self, count: int, partial: bool = False) -> int:
        if isinstance(self.parity, FecController):
            return self.parity.parity_for(count, partial)
        return min(self.parity, 255 - count)

    def add(self, payload: bytes, now: int) -> tuple[FecTag | None, list[ParityPacket]]:
        """Assign ``payload`` its place; returns its tag (``None``: send it without FEC,
        parity is off) and any parity that became due, to send after it."""
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f"payload must be at most {MAX_PAYLOAD} bytes, got {len(payload)}")
        out = self.poll(now)
        if not self._shards:
            if self._parity_for(self.data_shards) == 0:
                self.counters["data_unprotected"] += 1
                return None, out
            self._opened = now
        tag = FecTag(self._group, len(self._shards))
        self._shards.append(_SIZE.pack(len(payload) + 2) + payload)
        self.counters["data_protected"] += 1
        if len(self._shards) >= self.data_shards:
            out += self._close("groups_full")
        elif now >= self._opened + self.max_delay:
            out += self._close("groups_timed")
        return tag, out

    def next_deadline(self) -> int | None:
        """When the open group's time bound expires; ``None`` when no group is open."""
        return self._opened + self.max_delay if self._shards else None

    def poll(self, now: int) -> list[ParityPacket]:
        """Close the open group if its time bound has expired; its parity, or ``[]``."""
        if self._shards and now >= self._opened + self.max_delay:
            return self._close("groups_timed")
        return []

    def flush(self) -> list[ParityPacket]:
        """Close the open group now (e.g. before the connection goes quiet for good)."""
        return self._close("groups_timed") if self._shards else []

    def stats(self) -> dict[str, int]:
        return {**self.counters, "open_group_size": len(self._shards)}

    def _close(self, reason: str) -> list[ParityPacket]:
        shards, self._shards = self._shards, []
        group, self._group = self._group, (self._group + 1) % GROUP_MODULUS
        self.counters[reason] += 1
        count = len(shards)
        m = self._parity_for(count, partial=count < self.data_shards)
        if m == 0:  # the controller switched parity off while the group filled
            return []
        parity = _shared_codec(count, m, self.engine).encode(shards)
        self.counters["parity_sent"] += m
        self.counters["parity_bytes"] += m * len(parity[0])
        return [ParityPacket(group, j, count, m, shard) for j, shard in enumerate(parity)]


class _Group:
    """What the decoder knows of one group."""

    __slots__ = (
        "count",
        "data",
        "data_seen",
        "done",
        "nbytes",
        "parities",
        "parity",
        "parity_seen",
        "shard_len",
    )

    def __init__(self) -> None:
        self.count = 0  # k'; 0 until a parity packet tells it
        self.parity = 0  # m
        self.shard_len = 0
        self.data: dict[int, bytes] = {}
        self.parities: dict[int, bytes] = {}
        self.data_seen = 0  # bit i: data packet i arrived (kept after the buffers go)
        self.parity_seen = 0
        self.nbytes = 0
        self.done = False  # every data payload delivered or recovered; buffers released


class FecDecoder:
    """Remembers received payloads per group and recovers lost ones from parity.

    The caller hands each data payload up at once and also gives it here; whatever
    :meth:`on_data` or :meth:`on_parity` returns are payloads the link lost, recovered
    (hand them up too; ARQ drops any it already has). Memory is bounded twice: only
    groups fewer than ``max_groups`` ids behind the newest are kept (older ones are
    stale: dropped and counted; ids wrap at 2^32), and at most ``max_bytes`` of payload
    is buffered (the oldest groups go first). Packets claiming more than
    ``max_data_shards`` / ``max_parity_shards`` or longer than ``max_payload`` are
    dropped and counted, as are inconsistent ones. Set those three from the negotiated
    code and MTU: every new (k', m) and erasure pattern costs a matrix derivation and an
    inversion in Python (about 5 ms at 32 + 16, 0.7 s at 128 + 127), so forged parity must
    not be able to pick them freely. Nothing here raises on network input.
    """

    def __init__(
        self,
        *,
        max_groups: int = 32,
        max_bytes: int = 1 << 20,
        max_data_shards: int = 32,
        max_parity_shards: int = 16,
        max_payload: int = MAX_PAYLOAD,
        engine: str | None = None,
    ) -> None:
        _check_int("max_groups", max_groups, 1, 1 << 16)
        _check_int("max_bytes", max_bytes, 1, 1 << 40)
        _check_int("max_data_shards", max_data_shards, 1, 254)
        _check_int("max_parity_shards", max_parity_shards, 1, 254)
        _check_int("max_payload", max_payload, 1, MAX_PAYLOAD)
        _matrix_class(engine)
        self.max_groups = max_groups
        self.max_bytes = max_bytes
        self.max_data_shards = max_data_shards
        self.max_parity_shards = max_parity_shards
        self.max_payload = max_payload
        self.engine = engine
        self._groups: dict[int, _Group] = {}
        self._newest: int | None = None
        self._bytes = 0
        self.counters = dict.fromkeys(
            (
                "data_received",
                "parity_received",
                "recovered",
                "groups_recovered",
                "groups_complete",
                "groups_unrecoverable",
                "groups_expired",
                "shards_expected",
                "shards_lost",
                "duplicates",
                "late",
                "invalid",
                "recovered_invalid",
            ),
            0,
        )

    def stats(self) -> dict[str, int]:
        """Counters, plus the groups and bytes held now."""
        return {
            **self.counters,
            "groups_in_flight": len(self._groups),
            "bytes_buffered": self._bytes,
        }

    def on_data(self, group: int, index: int, payload: bytes) -> list[bytes]:
        """A data packet arrived (already handed up); returns payloads it let us recover."""
        if not (
            0 <= group < GROUP_MODULUS and 0 <= index < 255 and len(payload) <= self.max_payload
        ):
            self.counters["invalid"] += 1
            return []
        g = self._group(group)
        if g is None:
            return []
        bit = 1 << index
        if g.data_seen & bit:
            self.counters["duplicates"] += 1
            return []
        if g.count and (index >= g.count or len(payload) + 2 > g.shard_len):
            self.counters["invalid"] += 1
            return []
        g.data_seen |= bit
        self.counters["data_received"] += 1
        if g.done:
            return []
        g.data[index] = bytes(payload)
        self._hold(g, len(payload))
        return self._try_recover(g)

    def on_parity(
        self, group: int, index: int, count: int, parity: int, shard: bytes
    ) -> list[bytes]:
        """A parity packet arrived; returns the data payloads it let us recover."""
        if not (
            0 <= group < GROUP_MODULUS
            and 1 <= count <= self.max_data_shards
            and 1 <= parity <= self.max_parity_shards
            and count + parity <= 255
            and 0 <= index < parity
            and 2 <= len(shard) <= self.max_payload + 2
        ):
            self.counters["invalid"] += 1
            return []
        g = self._group(group)
        if g is None:
            return []
        if not g.count:
            if g.data_seen >> count or any(len(p) + 2 > len(shard) for p in g.data.values()):
                self.counters["invalid"] += 1  # contradicts the data already here
                return []
            g.count, g.parity, g.shard_len = count, parity, len(shard)
        elif (count, parity, len(shard)) != (g.count, g.parity, g.shard_len):
            self.counters["invalid"] += 1
            return []
        bit = 1 << index
        if g.parity_seen & bit:
            self.counters["duplicates"] += 1
            return []
        g.parity_seen |= bit
        self.counters["parity_received"] += 1
        if g.done:
            return []
        g.parities[index] = bytes(shard)
        self._hold(g, len(shard))
        return self._try_recover(g)

    # ------------------------------------------------------------------ internals

    def _group(self, group: int) -> _Group | None:
        """The state for ``group``, created if new; ``None`` if it is stale."""
        newest = self._newest
        if newest is None:
            self._newest = newest = group
        ahead = (group - newest) % GROUP_MODULUS
        if ahead and ahead < GROUP_MODULUS // 2:
            self._newest = newest = group
            for old in [g for g in self._groups if (newest - g) % GROUP_MODULUS >= self.max_groups]:
                self._drop(old)
        elif (newest - group) % GROUP_MODULUS >= self.max_groups:
            self.counters["late"] += 1
            return None
        g = self._groups.get(group)
        if g is None:
            g = self._groups[group] = _Group()
        return g

    def _hold(self, g: _Group, nbytes: int) -> None:
        g.nbytes += nbytes
        self._bytes += nbytes
        while self._bytes > self.max_bytes:  # oldest first; possibly the group just fed
            assert self._newest is not None
            self._drop(max(self._groups, key=lambda i: (self._newest - i) % GROUP_MODULUS))

    def _release(self, g: _Group) -> None:
        g.done = True
        g.data, g.parities = {}, {}
        self._bytes -= g.nbytes
        g.nbytes = 0

    def _drop(self, group: int) -> None:
        """Forget a group, and account for its losses now that no more will arrive."""
        g = self._groups.pop(group)
        if g.count:
            expected = g.count + g.parity
            self.counters["shards_expected"] += expected
            self.counters["shards_lost"] += (
                expected - g.data_seen.bit_count() - g.parity_seen.bit_count()
            )
        if not g.done:
            self.counters["groups_expired"] += 1
            if g.count:
                self.counters["groups_unrecoverable"] += 1
            self._release(g)

    def _try_recover(self, g: _Group) -> list[bytes]:
        if not g.count or g.done:  # parity unknown yet, or the byte budget just dropped it
            return []
        if len(g.data) == g.count:
            self.counters["groups_complete"] += 1
            self._release(g)
            return []
        if len(g.data) + len(g.parities) < g.count:
            return []
        codec = _shared_codec(g.count, g.parity, self.engine)
        shards: list[bytes | None] = [
            _SIZE.pack(len(g.data[i]) + 2) + g.data[i] if i in g.data else None
            for i in range(g.count)
        ]
        shards += [g.parities.get(j) for j in range(g.parity)]
        out = codec.decode(shards)
        recovered = []
        for i in range(g.count):
            if i in g.data:
                continue
            shard = out[i]
            (size,) = _SIZE.unpack_from(shard)
            if 2 <= size <= len(shard) and not any(shard[size:]):
                recovered.append(shard[2:size])
            else:  # parity that does not belong with this data (forged or corrupt)
                self.counters["recovered_invalid"] += 1
        self.counters["recovered"] += len(recovered)
        self.counters["groups_recovered"] += 1
        self._release(g)
        return recovered


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
