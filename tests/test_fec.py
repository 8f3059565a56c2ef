"""The Reed-Solomon codec: byte-for-byte reedsolo's code, on every kernel, every erasure pattern."""

from __future__ import annotations

import itertools
import random
import re

import pytest
import reedsolo
from conftest import BUILD_HINT, missing_extension
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rudp import fec


def _require(engine: str) -> str:
    if engine not in fec.ENGINES:
        missing_extension(f"rudp._rs (the compiled FEC kernel) is not importable; {BUILD_HINT}")
    return engine


@pytest.fixture(params=["python", "cython"])
def fec_engine(request: pytest.FixtureRequest) -> str:
    return _require(request.param)


@pytest.fixture(params=["scalar", "ssse3", "avx2"])
def isa(request: pytest.FixtureRequest):
    """Each compiled kernel in turn (the CPU may lack some: those skip)."""
    _require("cython")
    from rudp import _rs

    if request.param not in _rs.available_isas():
        pytest.skip(f"this CPU or build has no {request.param} kernel")
    previous = _rs.set_isa(request.param)
    yield request.param
    _rs.set_isa(previous)


def reedsolo_parity(data: list[bytes], m: int) -> list[bytes]:
    """The specification, column by column, straight from reedsolo."""
    k = len(data)
    length = max(map(len, data))
    codec = reedsolo.RSCodec(nsym=m, nsize=k + m)
    parity = [bytearray(length) for _ in range(m)]
    for b in range(length):
        column = bytes(d[b] if b < len(d) else 0 for d in data)
        for j, byte in enumerate(codec.encode(column)[k:]):
            parity[j][b] = byte
    return [bytes(p) for p in parity]


def padded(shard: bytes, length: int) -> bytes:
    return shard + bytes(length - len(shard))


# --------------------------------------------------------------------------- reference vectors

COLUMN = [68, 32, 130, 60, 253, 230, 241, 194, 107, 48]


def test_reference_column_reedsolo(fec_engine: str) -> None:
    codec = fec.RSCodec(10, 3, engine=fec_engine)
    assert [p[0] for p in codec.encode([bytes([b]) for b in COLUMN])] == [183, 194, 220]


def test_reference_column_klauspost(fec_engine: str) -> None:
    codec = fec.RSCodec(10, 3, matrix="klauspost", engine=fec_engine)
    assert [p[0] for p in codec.encode([bytes([b]) for b in COLUMN])] == [187, 183, 134]


def test_coding_matrix_is_reedsolo_on_unit_vectors() -> None:
    rows = fec.reedsolo_matrix(4, 2)
    codec = reedsolo.RSCodec(nsym=2, nsize=6)
    for i in range(4):
        unit = bytes(int(i == j) for j in range(4))
        assert bytes(row[i] for row in rows) == bytes(codec.encode(unit)[4:])


# --------------------------------------------------------------------------- encode = reedsolo


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    k=st.integers(1, 24),
    m=st.integers(1, 12),
    lengths=st.lists(st.integers(0, 40), min_size=24, max_size=24),
    seed=st.integers(0, 2**32 - 1),
)
def test_encode_matches_reedsolo(k: int, m: int, lengths: list[int], seed: int) -> None:
    rnd = random.Random(seed)
    data = [rnd.randbytes(n) for n in lengths[:k]]
    if max(map(len, data)) == 0:
        data[0] = b"\x01"
    expected = reedsolo_parity(data, m)
    for engine in fec.ENGINES:
        assert fec.RSCodec(k, m, engine=engine).encode(data) == expected


@pytest.mark.parametrize(("k", "m"), [(254, 1), (1, 254), (128, 127), (200, 55)])
def test_encode_matches_reedsolo_at_the_size_limits(fec_engine: str, k: int, m: int) -> None:
    rnd = random.Random(k * 1000 + m)
    data = [rnd.randbytes(rnd.randint(0, 3)) for _ in range(k)]
    data[0] = rnd.randbytes(3)
    assert fec.RSCodec(k, m, engine=fec_engine).encode(data) == reedsolo_parity(data, m)


def test_every_kernel_matches_the_reference(isa: str) -> None:
    """Random matrices (with 0 and 1 coefficients) at lengths around every SIMD width."""
    from rudp import _rs

    rnd = random.Random(7)
    for rows, cols in ((1, 1), (3, 10), (5, 17), (4, 64)):
        coefs = [
            bytes(rnd.choice((0, 1, rnd.randrange(256))) for _ in range(cols)) for _ in range(rows)
        ]
        reference, compiled = fec.PyMatrix(coefs), _rs.Matrix(coefs)
        assert compiled.coefficients == reference.coefficients
        for length in (0, 1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 1400, 1500):
            inputs = [
                rnd.randbytes(rnd.choice((length, length, rnd.randint(0, length))))
                for _ in range(cols)
            ]
            assert compiled.mul(inputs, length) == reference.mul(inputs, length), (
                rows,
                cols,
                length,
            )


def test_kernels_accept_any_bytes_like_and_ignore_bytes_past_length(fec_engine: str) -> None:
    matrix = fec._matrix_class(fec_engine)([b"\x02\x03"])
    a, b = b"\x01\x02\x03\x04", b"\x05\x06"
    expected = matrix.mul([a, b], 3)
    assert matrix.mul([bytearray(a), memoryview(b)], 3) == expected
    assert matrix.mul([a + b"junk", b], 3) == expected
    assert len(expected[0]) == 3


# --------------------------------------------------------------------------- decode


def _check_all_patterns(codec: fec.RSCodec, data: list[bytes], patterns) -> int:
    parity = codec.encode(data)
    length = len(parity[0])
    checked = 0
    for lost in patterns:
        shards: list[bytes | None] = [*data, *parity]
        for i in lost:
            shards[i] = None
        out = codec.decode(shards)
        assert out == [padded(d, length) if i in lost else d for i, d in enumerate(data)], lost
        checked += 1
    return checked


@pytest.mark.parametrize(("k", "m"), [(1, 1), (1, 3), (2, 2), (3, 2), (4, 4), (6, 3), (10, 3)])
@pytest.mark.parametrize("matrix", ["reedsolo", "klauspost"])
def test_every_erasure_pattern_recovers(fec_engine: str, matrix: str, k: int, m: int) -> None:
    rnd = random.Random(k * 31 + m)
    data = [rnd.randbytes(rnd.randint(0, 50)) for _ in range(k)]
    data[-1] = rnd.randbytes(50)
    codec = fec.RSCodec(k, m, matrix=matrix, engine=fec_engine)
    patterns = [c for e in range(m + 1) for c in itertools.combinations(range(k + m), e)]
    assert _check_all_patterns(codec, data, patterns) == len(patterns)


@pytest.mark.parametrize(("k", "m"), [(50, 20), (128, 127), (200, 55)])
def test_sampled_erasure_patterns_recover_for_large_codes(fec_engine: str, k: int, m: int) -> None:
    rnd = random.Random(k + m)
    data = [rnd.randbytes(rnd.randint(0, 40)) for _ in range(k)]
    codec = fec.RSCodec(k, m, engine=fec_engine)
    patterns = [rnd.sample(range(k + m), rnd.choice((m, m, rnd.randint(1, m)))) for _ in range(6)]
    patterns.append(list(range(min(k, m))))  # as many data shards as parity can repair
    assert _check_all_patterns(codec, data, patterns) == len(patterns)


@settings(max_examples=80, deadline=None)
@given(data=st.data(), k=st.integers(1, 16), m=st.integers(1, 8))
def test_any_erasures_up_to_m_recover(data: st.DataObject, k: int, m: int) -> None:
    shards = data.draw(st.lists(st.binary(max_size=48), min_size=k, max_size=k))
    lost = data.draw(st.sets(st.integers(0, k + m - 1), max_size=m))
    for engine in fec.ENGINES:
        codec = fec.RSCodec(k, m, engine=engine)
        assert _check_all_patterns(codec, shards, [lost]) == 1


def test_more_than_m_lost_is_a_clear_error(fec_engine: str) -> None:
    codec = fec.RSCodec(4, 2, engine=fec_engine)
    shards: list[bytes | None] = [*([b"abc"] * 4), *codec.encode([b"abc"] * 4)]
    shards[0] = shards[1] = shards[4] = None
    with pytest.raises(fec.TooManyErasures, match="unrecoverable"):
        codec.decode(shards)
    assert issubclass(fec.TooManyErasures, ValueError)


def test_decode_returns_present_shards_unchanged_and_prefers_any_parity(fec_engine: str) -> None:
    codec = fec.RSCodec(3, 3, engine=fec_engine)
    data = [b"a", b"bbbb", b"cc"]
    parity = codec.encode(data)
    assert codec.decode([*data, None, None, None]) == data
    # lose the first two parity shards: the third alone repairs one data shard
    assert codec.decode([b"a", None, b"cc", None, None, parity[2]]) == data


def test_decode_cache_is_bounded(fec_engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    codec = fec.RSCodec(8, 3, engine=fec_engine)
    monkeypatch.setattr(codec, "DECODE_CACHE", 5)
    data = [bytes([i]) * 4 for i in range(8)]
    _check_all_patterns(codec, data, itertools.combinations(range(11), 2))
    assert len(codec._decoders) == 5


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("k", "m", "field"),
    [
        (0, 3, "k (data shards)"),
        (10, 0, "m (parity shards)"),
        (255, 1, "k (data shards)"),
        (200, 56, "k + m"),
        (True, 3, "k (data shards)"),
        (10, 2.0, "m (parity shards)"),
    ],
)
def test_invalid_code_names_the_field(k, m, field: str) -> None:
    with pytest.raises(ValueError, match=re.escape(field)):
        fec.RSCodec(k, m)


def test_wrong_shard_counts_and_unknown_options() -> None:
    codec = fec.RSCodec(3, 2, engine="python")
    with pytest.raises(ValueError, match="expected 3 data shards"):
        codec.encode([b"a", b"b"])
    with pytest.raises(ValueError, match="expected 5 shards"):
        codec.decode([b"a", b"b", b"c"])
    with pytest.raises(ValueError, match="matrix must be"):
        fec.RSCodec(3, 2, matrix="cauchy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="engine must be"):
        fec.RSCodec(3, 2, engine="fortran")
