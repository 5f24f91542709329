/* AVX-512 VNNI dot products of 32-element integer blocks (Q8_0, Q4_0, Q5_0) with 8-bit
 * activation blocks, 16 weight rows at a time: one vector lane per row.
 *
 * Per block b, row r and token t the exact integer dot i = w_rb . a_tb is formed, then
 *     acc_rt = fma(d_w[r, b] * d_a[t, b], (float)i, acc_rt)        (b ascending)
 * and y[t, r] = acc_rt. The integer part is exact whatever the instruction order, so this one
 * float sequence is each pair's result in every path: a row alone (vec_dot, plain C with
 * fmaf), a matrix-vector product, or a tile of 16 rows x 64 tokens. That is what makes a
 * decode batch batch-invariant while it reads and unpacks each weight block once for all of
 * its tokens (the LM head of a 262k vocabulary dominates a small model's step).
 *
 * The tile: the 16 rows' block b is unpacked to unsigned bytes u = w + offset (Q8_0: +128,
 * Q4_0: the nibble, +8; Q5_0: the 5-bit value, +16) and transposed so that vector j holds
 * bytes 4j..4j+3 of every row. For each token, eight dpbusd with the token's bytes 4j..4j+3
 * broadcast give all 16 rows' sums u . a, and starting from -offset * sum(a) (the activation
 * block's bsums) makes them w . a. Per token and 16 rows that is 8 dpbusd, one convert, one
 * multiply and one FMA; the transpose is paid once per block for all tokens. */
/* Included before any target pragma: intrinsics defined inside one would carry that
 * target, and a function with another target could not inline them. */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "internal.h"
#include "numoe.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")

#include "tile_avx512.h"

enum {
    LANES = 16,        /* weight rows per register: one per 32-bit lane */
    MAX_TOKENS = 64    /* tokens per tile call (numoe_tile_tokens hands over at most 64) */
};


ALWAYS_INLINE int64_t block_bytes(int type) {
    return type == NUMOE_TYPE_Q8_0 ? (int64_t)sizeof(block_q8_0)
         : type == NUMOE_TYPE_Q4_0 ? (int64_t)sizeof(block_q4_0)
                                   : (int64_t)sizeof(block_q5_0);
}

ALWAYS_INLINE int weight_offset(int type) {
    return type == NUMOE_TYPE_Q8_0 ? 128 : type == NUMOE_TYPE_Q4_0 ? 8 : 16;
}

ALWAYS_INLINE __m256i unpack_nibbles(const uint8_t *qs) {
    const __m128i packed = _mm_loadu_si128((const __m128i *)qs);
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

/* The 32 values of one block as unsigned bytes w + weight_offset(type). */
ALWAYS_INLINE __m256i block_unsigned(int type, const uint8_t *block) {
    if (type == NUMOE_TYPE_Q8_0) {
        const __m256i q = _mm256_loadu_si256((const __m256i *)((const block_q8_0 *)block)->qs);
        return _mm256_xor_si256(q, _mm256_set1_epi8((char)0x80));
    }
    if (type == NUMOE_TYPE_Q4_0) return unpack_nibbles(((const block_q4_0 *)block)->qs);
    const block_q5_0 *w = (const block_q5_0 *)block;  /* fifth bit set: +16 */
    uint32_t qh;
    memcpy(&qh, w->qh, sizeof qh);
    const __m256i nibbles = unpack_nibbles(w->qs);
    return _mm256_mask_add_epi8(nibbles, (__mmask32)qh, nibbles, _mm256_set1_epi8(16));
}

/* Every block type here starts with its fp16 scale d. */
ALWAYS_INLINE float block_scale(const uint8_t *block) {
    uint16_t d;
    memcpy(&d, block, sizeof d);
    return _cvtsh_ss(d);
}

/* Exact w . a of one block (the row-alone path). */
ALWAYS_INLINE int32_t block_dot(int type, const uint8_t *block, const block_q8a *a) {
    const __m256i u = block_unsigned(type, block);
    const __m256i x = _mm256_loadu_si256((const __m256i *)a->qs);
    const __m256i sums = _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x);
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sums), _mm256_extracti128_si256(sums, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s) - weight_offset(type) * (a->bsums[0] + a->bsums[1]);
}

ALWAYS_INLINE float row_dot(int type, int64_t n, const uint8_t *row, const block_q8a *a) {
    const int64_t bytes = block_bytes(type);
    float acc = 0.0f;
    for (int64_t b = 0; b < n / 32; b++) {
        const float scale = block_scale(row + b * bytes) * a[b].d;
        acc = fmaf(scale, (float)block_dot(type, row + b * bytes, &a[b]), acc);
    }
    return acc;
}

/* Block b of 16 rows (rows[r] = row r's block b), transposed: t[j] lane r = bytes 4j..4j+3
 * of row r, as unsigned w + offset. */
ALWAYS_INLINE void load_block_16(int type, const uint8_t *const *rows, __m512i t[8]) {
    __m512i z[8];  /* z[k] = row k | row k + 8, eight dwords each */
    for (int k = 0; k < 8; k++)
        z[k] = _mm512_inserti64x4(_mm512_castsi256_si512(block_unsigned(type, rows[k])),
                                  block_unsigned(type, rows[k + 8]), 1);
    numoe_transpose_16x8(z, t);
}


/* Up to 16 rows x up to MAX_TOKENS tokens: y[t * ldy + r]. Rows past n_rows repeat row 0;
 * their lanes are computed and dropped. */
static void tile_16(int type, int64_t n, const uint8_t *w, int64_t row_bytes, int64_t n_rows,
                    const void *const *acts, int64_t n_tokens, float *y, int64_t ldy) {
    const int64_t bytes = block_bytes(type);
    const int offset = weight_offset(type);
    const uint8_t *rows[LANES];
    const __m512i offsets = numoe_tile_rows(w, row_bytes, n_rows, rows);
    __m512 acc[MAX_TOKENS];
    for (int64_t t = 0; t < n_tokens; t++) acc[t] = _mm512_setzero_ps();
    /* The 16 rows are one contiguous span, but read a block column at a time they look
     * like 16 short streams to the hardware prefetchers: fetch the next span ahead, a
     * slice per block, so the next call finds it in cache. */
    const int64_t nb = n / 32;
    const uint8_t *next = w + LANES * row_bytes;
    const int64_t slice = (LANES * row_bytes + nb - 1) / nb;
    for (int64_t b = 0; b < nb; b++) {
        numoe_prefetch_span(next + b * slice, slice);
        __m512i t8[8];
        load_block_16(type, rows, t8);
        const __m512 scales = numoe_gather_half_lo(w + b * bytes, offsets);
        for (int r = 0; r < LANES; r++) rows[r] += bytes;
        for (int64_t t = 0; t < n_tokens; t++) {
            const block_q8a *a = (const block_q8a *)acts[t] + b;
            /* Two chains of four: the integer sums are exact in any order. */
            __m512i even = _mm512_set1_epi32(-offset * (a->bsums[0] + a->bsums[1]));
            __m512i odd = _mm512_setzero_si512();
            for (int j = 0; j < 8; j += 2) {
                even = _mm512_dpbusd_epi32(even, t8[j], broadcast_dword(a->qs + 4 * j));
                odd = _mm512_dpbusd_epi32(odd, t8[j + 1], broadcast_dword(a->qs + 4 * j + 4));
            }
            const __m512i sums = _mm512_add_epi32(even, odd);
            const __m512 scale = _mm512_mul_ps(scales, _mm512_set1_ps(a->d));
            acc[t] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(sums), acc[t]);
        }
    }
    const __mmask16 valid = (__mmask16)((1u << n_rows) - 1);
    for (int64_t t = 0; t < n_tokens; t++) _mm512_mask_storeu_ps(y + t * ldy, valid, acc[t]);
}

ALWAYS_INLINE void tiles(int type, int64_t n, const uint8_t *w, int64_t row_bytes,
                         int64_t n_rows, const void *const *acts, int64_t n_tokens, float *y,
                         int64_t ldy) {
    for (int64_t r = 0; r < n_rows; r += LANES) {
        const int64_t rows = n_rows - r < LANES ? n_rows - r : LANES;
        for (int64_t t = 0; t < n_tokens; t += MAX_TOKENS) {
            const int64_t tokens = n_tokens - t < MAX_TOKENS ? n_tokens - t : MAX_TOKENS;
            tile_16(type, n, w + r * row_bytes, row_bytes, rows, acts + t, tokens,
                    y + t * ldy + r, ldy);
        }
    }
}

#define DEFINE_QDOT(suffix, type)                                                              \
    static float vec_dot_##suffix(int64_t n, const void *w_row, const void *act) {             \
        return row_dot(type, n, w_row, act);                                                   \
    }                                                                                          \
    static void vec_dot_tile_##suffix(int64_t n, const void *w, int64_t row_bytes,              \
                                      int64_t n_rows, const void *const *acts,                 \
                                      int64_t n_tokens, float *y, int64_t ldy) {               \
        tiles(type, n, w, row_bytes, n_rows, acts, n_tokens, y, ldy);                          \
    }

DEFINE_QDOT(q8_0_avx512, NUMOE_TYPE_Q8_0)
DEFINE_QDOT(q4_0_avx512, NUMOE_TYPE_Q4_0)
DEFINE_QDOT(q5_0_avx512, NUMOE_TYPE_Q5_0)

#pragma GCC pop_options

void numoe_fill_qdot_avx512(numoe_kernel_table *t) {
    t->vec_dot[NUMOE_TYPE_Q8_0] = vec_dot_q8_0_avx512;
    t->vec_dot_tile[NUMOE_TYPE_Q8_0] = vec_dot_tile_q8_0_avx512;
    t->vec_dot[NUMOE_TYPE_Q4_0] = vec_dot_q4_0_avx512;
    t->vec_dot_tile[NUMOE_TYPE_Q4_0] = vec_dot_tile_q4_0_avx512;
    t->vec_dot[NUMOE_TYPE_Q5_0] = vec_dot_q5_0_avx512;
    t->vec_dot_tile[NUMOE_TYPE_Q5_0] = vec_dot_tile_q5_0_avx512;
}
