/* Helpers of the AVX-512 row x token tiles (qdot_avx512.c, ktile_avx512.c): 16 weight rows,
 * one per 32-bit lane. Include after the file's `#pragma GCC target` with AVX-512 F/BW/VNNI
 * enabled: these are always-inline and take that target. */
#ifndef NUMOE_TILE_AVX512_H
#define NUMOE_TILE_AVX512_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* z[k] = 8 dwords of row k | 8 dwords of row k + 8  ->  t[c] lane r = dword c of row r.
 * The 8 x 8 dword transpose of AVX2 in each 256-bit half (rows 0-7 and rows 8-15). */
ALWAYS_INLINE void numoe_transpose_16x8(const __m512i z[8], __m512i t[8]) {
    __m512i s[8], u[8];
    for (int k = 0; k < 4; k++) {
        s[2 * k] = _mm512_unpacklo_epi32(z[2 * k], z[2 * k + 1]);
        s[2 * k + 1] = _mm512_unpackhi_epi32(z[2 * k], z[2 * k + 1]);
    }
    for (int k = 0; k < 2; k++) {
        u[4 * k] = _mm512_unpacklo_epi64(s[4 * k], s[4 * k + 2]);
        u[4 * k + 1] = _mm512_unpackhi_epi64(s[4 * k], s[4 * k + 2]);
        u[4 * k + 2] = _mm512_unpacklo_epi64(s[4 * k + 1], s[4 * k + 3]);
        u[4 * k + 3] = _mm512_unpackhi_epi64(s[4 * k + 1], s[4 * k + 3]);
    }
    /* u[c] (rows 0-3) and u[c + 4] (rows 4-7) hold column c in their even 128-bit lanes and
     * column c + 4 in their odd ones (and the same for rows 8-15 in the upper half). */
    const __m512i low = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
    const __m512i high = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
    for (int c = 0; c < 4; c++) {
        t[c] = _mm512_permutex2var_epi64(u[c], low, u[c + 4]);
        t[c + 4] = _mm512_permutex2var_epi64(u[c], high, u[c + 4]);
    }
}

/* 32 bytes at rows[r] + offset for the 16 rows, transposed (t[c] lane r = bytes 4c..4c+3). */
ALWAYS_INLINE void numoe_load_transposed(const uint8_t *const *rows, int64_t offset,
                                         __m512i t[8]) {
    __m512i z[8];
    for (int k = 0; k < 8; k++)
        z[k] = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(rows[k] + offset))),
            _mm256_loadu_si256((const __m256i *)(rows[k + 8] + offset)), 1);
    numoe_transpose_16x8(z, t);
}

/* The row pointers of a tile (rows past n_rows repeat row 0: their lanes are computed and
 * dropped) and their byte offsets from w, as the gather index vector. */
ALWAYS_INLINE __m512i numoe_tile_rows(const uint8_t *w, int64_t row_bytes, int64_t n_rows,
                                      const uint8_t *rows[16]) {
    int32_t offsets[16];
    for (int r = 0; r < 16; r++) {
        offsets[r] = (int32_t)((r < n_rows ? r : 0) * row_bytes);
        rows[r] = w + offsets[r];
    }
    return _mm512_loadu_si512(offsets);
}

ALWAYS_INLINE __m512i broadcast_dword(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return _mm512_set1_epi32(v);
}

/* fp16 in the low half of the dword at base + offsets[r], as float, per lane. */
ALWAYS_INLINE __m512 numoe_gather_half_lo(const uint8_t *base, __m512i offsets) {
    const __m512i words = _mm512_i32gather_epi32(offsets, base, 1);
    return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(words));
}

/* The 16 rows are one contiguous span, but read a block column at a time they look like
 * 16 short streams to the hardware prefetchers: callers fetch the next span ahead, a slice
 * per block, so the next tile finds it in cache. */
ALWAYS_INLINE void numoe_prefetch_span(const uint8_t *start, int64_t bytes) {
    for (int64_t line = 0; line < bytes; line += 64)
        _mm_prefetch((const char *)start + line, _MM_HINT_T1);
}

#endif
