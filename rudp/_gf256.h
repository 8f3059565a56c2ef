/*
 * GF(2^8) matrix x shards, the inner loop of the Reed-Solomon codec (rudp/_rs.pyx).
 *
 * Field: polynomial 0x11D, generator 2 (what reedsolo and klauspost/reedsolomon use).
 * out[r][i] = XOR over c of coef[r][c] * in[c][i], for i < len.
 *
 * Multiplying a whole vector by one constant c is a table lookup per byte. The SIMD
 * kernels split each byte into its two nibbles and look both up in 16-entry tables
 * (c*x and c*(x<<4)) with pshufb, 16 or 32 bytes at a time. The instruction set is
 * picked at run time (__builtin_cpu_supports), so the same build runs on any x86-64;
 * other CPUs and compilers get the scalar kernel, which uses the full 64 KiB product
 * table.
 */
#ifndef RUDP_GF256_H
#define RUDP_GF256_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define GF256_X86 1
#include <immintrin.h>
#else
#define GF256_X86 0
#endif

/* The two 16-byte nibble tables of one coefficient. */
typedef struct {
    uint8_t lo[16];
    uint8_t hi[16];
} gf256_nib;

typedef void (*gf256_kernel)(const uint8_t *coefs, const gf256_nib *tabs, int rows, int cols,
                             const uint8_t *const *in, uint8_t *const *out, size_t len);

enum { GF256_SCALAR = 0, GF256_SSSE3 = 1, GF256_AVX2 = 2 };

static uint8_t gf256_mul_table[256][256];

static void gf256_init_tables(void)
{
    uint8_t exp[512];
    int log[256];
    int x = 1;
    for (int i = 0; i < 255; i++) {
        exp[i] = (uint8_t)x;
        log[x] = i;
        x <<= 1;
        if (x & 0x100)
            x ^= 0x11D;
    }
    for (int i = 255; i < 512; i++)
        exp[i] = exp[i - 255];
    for (int a = 0; a < 256; a++)
        for (int b = 0; b < 256; b++)
            gf256_mul_table[a][b] = (a && b) ? exp[log[a] + log[b]] : 0;
}

static void gf256_nibbles(uint8_t c, gf256_nib *t)
{
    for (int x = 0; x < 16; x++) {
        t->lo[x] = gf256_mul_table[c][x];
        t->hi[x] = gf256_mul_table[c][x << 4];
    }
}

/* out[from:len] for one row, one byte at a time (also the SIMD kernels' tail). */
static void gf256_row_scalar(const uint8_t *coefs, int cols, const uint8_t *const *in,
                             uint8_t *o, size_t from, size_t len)
{
    if (from >= len)
        return;
    memset(o + from, 0, len - from);
    for (int c = 0; c < cols; c++) {
        const uint8_t *t = gf256_mul_table[coefs[c]];
        const uint8_t *x = in[c];
        if (coefs[c] == 0)
            continue;
        if (coefs[c] == 1) {
            for (size_t i = from; i < len; i++)
                o[i] ^= x[i];
        } else {
            for (size_t i = from; i < len; i++)
                o[i] ^= t[x[i]];
        }
    }
}

static void gf256_kernel_scalar(const uint8_t *coefs, const gf256_nib *tabs, int rows, int cols,
                                const uint8_t *const *in, uint8_t *const *out, size_t len)
{
    (void)tabs;
    for (int r = 0; r < rows; r++)
        gf256_row_scalar(coefs + (size_t)r * cols, cols, in, out[r], 0, len);
}

#if GF256_X86

__attribute__((target("ssse3"))) static void
gf256_kernel_ssse3(const uint8_t *coefs, const gf256_nib *tabs, int rows, int cols,
                   const uint8_t *const *in, uint8_t *const *out, size_t len)
{
    const __m128i mask = _mm_set1_epi8(0x0f);
    size_t body = len & ~(size_t)15;
    for (int r = 0; r < rows; r++) {
        const gf256_nib *t = tabs + (size_t)r * cols;
        uint8_t *o = out[r];
        for (size_t i = 0; i < body; i += 16) {
            __m128i acc = _mm_setzero_si128();
            for (int c = 0; c < cols; c++) {
                __m128i x = _mm_loadu_si128((const __m128i *)(in[c] + i));
                __m128i lo = _mm_and_si128(x, mask);
                __m128i hi = _mm_and_si128(_mm_srli_epi64(x, 4), mask);
                acc = _mm_xor_si128(acc, _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)t[c].lo), lo));
                acc = _mm_xor_si128(acc, _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)t[c].hi), hi));
            }
            _mm_storeu_si128((__m128i *)(o + i), acc);
        }
        gf256_row_scalar(coefs + (size_t)r * cols, cols, in, o, body, len);
    }
}

#define GF256_AVX2_MULADD(acc, x, t)                                                          \
    do {                                                                                      \
        __m256i lo_ = _mm256_and_si256((x), mask);                                            \
        __m256i hi_ = _mm256_and_si256(_mm256_srli_epi64((x), 4), mask);                      \
        acc = _mm256_xor_si256(acc, _mm256_shuffle_epi8((t##_lo), lo_));                      \
        acc = _mm256_xor_si256(acc, _mm256_shuffle_epi8((t##_hi), hi_));                      \
    } while (0)

__attribute__((target("avx2"))) static void
gf256_kernel_avx2(const uint8_t *coefs, const gf256_nib *tabs, int rows, int cols,
                  const uint8_t *const *in, uint8_t *const *out, size_t len)
{
    const __m256i mask = _mm256_set1_epi8(0x0f);
    size_t body64 = len & ~(size_t)63;
    size_t body32 = len & ~(size_t)31;
    for (int r = 0; r < rows; r++) {
        const gf256_nib *t = tabs + (size_t)r * cols;
        uint8_t *o = out[r];
        size_t i = 0;
        /* 64 bytes per step: two independent accumulators share each table load. */
        for (; i < body64; i += 64) {
            __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
            for (int c = 0; c < cols; c++) {
                __m256i tc_lo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)t[c].lo));
                __m256i tc_hi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)t[c].hi));
                __m256i x0 = _mm256_loadu_si256((const __m256i *)(in[c] + i));
                __m256i x1 = _mm256_loadu_si256((const __m256i *)(in[c] + i + 32));
                GF256_AVX2_MULADD(a0, x0, tc);
                GF256_AVX2_MULADD(a1, x1, tc);
            }
            _mm256_storeu_si256((__m256i *)(o + i), a0);
            _mm256_storeu_si256((__m256i *)(o + i + 32), a1);
        }
        for (; i < body32; i += 32) {
            __m256i a0 = _mm256_setzero_si256();
            for (int c = 0; c < cols; c++) {
                __m256i tc_lo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)t[c].lo));
                __m256i tc_hi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)t[c].hi));
                __m256i x0 = _mm256_loadu_si256((const __m256i *)(in[c] + i));
                GF256_AVX2_MULADD(a0, x0, tc);
            }
            _mm256_storeu_si256((__m256i *)(o + i), a0);
        }
        gf256_row_scalar(coefs + (size_t)r * cols, cols, in, o, body32, len);
    }
}

#endif /* GF256_X86 */

/* The best kernel this CPU runs (GF256_AVX2, GF256_SSSE3 or GF256_SCALAR). */
static int gf256_best_isa(void)
{
#if GF256_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2"))
        return GF256_AVX2;
    if (__builtin_cpu_supports("ssse3"))
        return GF256_SSSE3;
#endif
    return GF256_SCALAR;
}

/* The kernel for an instruction set, or NULL when this build or CPU lacks it. */
static gf256_kernel gf256_kernel_for(int isa)
{
    if (isa == GF256_SCALAR)
        return gf256_kernel_scalar;
#if GF256_X86
    if (isa > gf256_best_isa())
        return NULL;
    if (isa == GF256_SSSE3)
        return gf256_kernel_ssse3;
    if (isa == GF256_AVX2)
        return gf256_kernel_avx2;
#endif
    return NULL;
}

#endif /* RUDP_GF256_H */
