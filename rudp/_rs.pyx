# cython: language_level=3
"""Compiled GF(2^8) kernel for rudp.fec: a coefficient matrix times byte shards.

Same contract as ``rudp.fec.PyMatrix`` (the readable reference): everything else in
the codec (which matrix, inverses, padding rules) lives in ``rudp.fec``. The matrix
keeps its per-coefficient nibble tables, so a cached encode or decode matrix costs
nothing to set up per call; the multiply runs without the GIL.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport uint8_t
from libc.string cimport memcpy, memset


cdef extern from "_gf256.h" nogil:
    ctypedef struct gf256_nib:
        uint8_t lo[16]
        uint8_t hi[16]
    ctypedef void (*gf256_kernel)(const uint8_t *coefs, const gf256_nib *tabs, int rows,
                                  int cols, const uint8_t *const *inp, uint8_t *const *out,
                                  size_t length) noexcept nogil
    int GF256_SCALAR, GF256_SSSE3, GF256_AVX2
    void gf256_init_tables()
    void gf256_nibbles(uint8_t c, gf256_nib *t)
    int gf256_best_isa()
    gf256_kernel gf256_kernel_for(int isa)


_ISA_NAMES = {GF256_SCALAR: "scalar", GF256_SSSE3: "ssse3", GF256_AVX2: "avx2"}
_ISA_IDS = {name: isa for isa, name in _ISA_NAMES.items()}

gf256_init_tables()
cdef int _isa = gf256_best_isa()
cdef gf256_kernel _kernel = gf256_kernel_for(_isa)


def isa() -> str:
    """The instruction set the kernel uses now."""
    return _ISA_NAMES[_isa]


def available_isas() -> tuple:
    """Every instruction set this build and CPU can run, slowest first."""
    return tuple(name for isa_id, name in sorted(_ISA_NAMES.items())
                 if gf256_kernel_for(isa_id) != NULL)


def set_isa(name: str) -> str:
    """Force a kernel (tests and benchmarks compare them); returns the previous one."""
    global _isa, _kernel
    if name not in _ISA_IDS or gf256_kernel_for(_ISA_IDS[name]) == NULL:
        raise ValueError(f"isa must be one of {', '.join(available_isas())}, got {name!r}")
    previous = _ISA_NAMES[_isa]
    _isa = _ISA_IDS[name]
    _kernel = gf256_kernel_for(_isa)
    return previous


cdef class Matrix:
    """A rows x cols matrix over GF(2^8), ready to multiply shards."""

    cdef readonly int rows
    cdef readonly int cols
    cdef bytes _coefs
    cdef gf256_nib *_tabs

    def __cinit__(self, rows):
        rows = [bytes(row) for row in rows]
        if not rows or not rows[0]:
            raise ValueError("a matrix needs at least one row and one column")
        if any(len(row) != len(rows[0]) for row in rows):
            raise ValueError("matrix rows must all have the same length")
        self.rows = len(rows)
        self.cols = len(rows[0])
        self._coefs = b"".join(rows)
        self._tabs = <gf256_nib *> PyMem_Malloc(self.rows * self.cols * sizeof(gf256_nib))
        if self._tabs == NULL:
            raise MemoryError()
        cdef const uint8_t *coefs = <const uint8_t *> PyBytes_AS_STRING(self._coefs)
        cdef Py_ssize_t i
        for i in range(self.rows * self.cols):
            gf256_nibbles(coefs[i], &self._tabs[i])

    def __dealloc__(self):
        PyMem_Free(self._tabs)

    @property
    def coefficients(self) -> tuple:
        """The rows, as bytes."""
        return tuple(self._coefs[r * self.cols:(r + 1) * self.cols] for r in range(self.rows))

    def mul(self, inputs, Py_ssize_t length) -> list:
        """``rows`` shards of ``length`` bytes: each row's coefficients times ``inputs``.

        ``inputs`` are ``cols`` bytes-like shards; a shorter one counts as zero-padded,
        bytes past ``length`` are ignored.
        """
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        inputs = [x if type(x) is bytes else bytes(x) for x in inputs]
        if len(inputs) != self.cols:
            raise ValueError(f"expected {self.cols} input shards, got {len(inputs)}")
        cdef Py_ssize_t short = sum(1 for x in inputs if PyBytes_GET_SIZE(x) < length)
        cdef const uint8_t **inp = <const uint8_t **> PyMem_Malloc(
            (self.cols + self.rows) * sizeof(uint8_t *) + short * length)
        if inp == NULL:
            raise MemoryError()
        cdef uint8_t **out = <uint8_t **> (inp + self.cols)
        cdef uint8_t *pad = <uint8_t *> (out + self.rows)
        cdef Py_ssize_t c, r, size
        cdef const uint8_t *coefs
        cdef list outputs = []
        try:
            for c in range(self.cols):
                x = inputs[c]
                size = PyBytes_GET_SIZE(x)
                if size >= length:
                    inp[c] = <const uint8_t *> PyBytes_AS_STRING(x)
                else:
                    memcpy(pad, PyBytes_AS_STRING(x), size)
                    memset(pad + size, 0, length - size)
                    inp[c] = pad
                    pad += length
            for r in range(self.rows):
                shard = PyBytes_FromStringAndSize(NULL, length)
                outputs.append(shard)
                out[r] = <uint8_t *> PyBytes_AS_STRING(shard)
            coefs = <const uint8_t *> PyBytes_AS_STRING(self._coefs)
            with nogil:
                _kernel(coefs, self._tabs, self.rows, self.cols, inp, out, length)
        finally:
            PyMem_Free(inp)
        return outputs
