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

import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import Literal, Protocol

__all__ = [
    "ENGINE",
    "ENGINES",
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
        missing = tuple(i for i in range(self.k) if shards[i] is None)
        if not missing:
            return [bytes(s) for s in shards[: self.k]]  # type: ignore[arg-type]
        parity = tuple(j for j in range(self.m) if shards[self.k + j] is not None)
        if len(parity) < len(missing):
            lost = len(missing) + self.m - len(parity)
            raise TooManyErasures(
                f"{lost} of {self.n} shards lost but only {self.m} parity shards: unrecoverable"
            )
        parity = parity[: len(missing)]
        inputs = [s for s in shards[: self.k] if s is not None]
        inputs += [shards[self.k + j] for j in parity]  # type: ignore[misc]
        length = max(len(s) for s in shards if s is not None)
        recovered = iter(self._decoder(missing, parity).mul(inputs, length))
        return [bytes(s) if s is not None else next(recovered) for s in shards[: self.k]]

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
