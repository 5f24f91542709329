/* AVX-512 VNNI row x token tile for Q4_K, and the per-pair vec_dot it reproduces.
 *
 * As in qdot_avx512.c (read that first), 16 weight rows share a vector, one per lane, and
 * each pair's result is one fixed float sequence over exact integer dot products: per
 * super-block, sub-block j = 0..7 (32 values, activation block j),
 *     acc = fma((d * sc_j) * d_a, (float)(q . a), acc)
 *     acc = fma(-((dmin * m_j) * d_a), (float)sum(a), acc)
 * with q the unsigned 4-bit codes. vec_dot computes it with plain fmaf; the tile unpacks a
 * super-block of 16 rows once, transposed so that vector c of block j holds codes 4c..4c+3
 * of every row, then runs 8 dpbusd per block for each token.
 * Q5_K and Q6_K keep kquants_avx512.c's vec_dot and no tile. A Q6_K tile built the same way
 * (6 transposed loads per super-block) gave 3x at 16 tokens but read a DRAM-resident matrix
 * at one token at 12-13 GB/s per thread against the per-pair kernel's 18: the LM head of a
 * Q4_K_M model is Q6_K, so decode lost more than batches won (see git history). */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "internal.h"
#include "numoe.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")

#include "tile_avx512.h"

enum {
    LANES = 16,       /* weight rows per tile */
    MAX_TOKENS = 64,  /* tokens per tile call */
    BLOCKS = 8        /* 32-value activation blocks per super-block */
};

/* --- the per-pair definition ------------------------------------------------------------ */

/* Exact sum of codes[l] * a[l] over one 32-value block. */
ALWAYS_INLINE int32_t code_dot(const uint8_t *codes, const int8_t *a) {
    int32_t sum = 0;
    for (int l = 0; l < 32; l++) sum += codes[l] * a[l];
    return sum;
}

/* Sub-block j's 6-bit scale and min (ggml's get_scale_min_k4). */
ALWAYS_INLINE void scale_min(const uint8_t *packed, int j, int *sc, int *m) {
    if (j < 4) {
        *sc = packed[j] & 63;
        *m = packed[j + 4] & 63;
    } else {
        *sc = (packed[j + 4] & 0xF) | ((packed[j - 4] >> 6) << 4);
        *m = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4);
    }
}

static float vec_dot_q4_K(int64_t n, const void *w_row, const void *act) {
    const block_q4_K *blocks = w_row;
    const block_q8a *a = act;
    float acc = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++, a += BLOCKS) {
        const block_q4_K *b = &blocks[i];
        const float d = _cvtsh_ss(b->d), dmin = _cvtsh_ss(b->dmin);
        for (int j = 0; j < BLOCKS; j++) {
            uint8_t codes[32];
            const uint8_t *qs = b->qs + 32 * (j / 2);
            for (int l = 0; l < 32; l++) codes[l] = j % 2 ? qs[l] >> 4 : qs[l] & 0xF;
            int sc, m;
            scale_min(b->scales, j, &sc, &m);
            const float sum_a = (float)(a[j].bsums[0] + a[j].bsums[1]);
            acc = fmaf((d * (float)sc) * a[j].d, (float)code_dot(codes, a[j].qs), acc);
            acc = fmaf(-((dmin * (float)m) * a[j].d), sum_a, acc);
        }
    }
    return acc;
}

/* --- tiles -------------------------------------------------------------------------------- */

typedef struct {
    __m512i codes[BLOCKS][8];  /* [block][c] lane r: codes 4c..4c+3 of row r */
    __m512 scale[BLOCKS];      /* d * sc_j */
    __m512 min[BLOCKS];        /* dmin * m_j */
} super_block_16;

/* Byte k (0..3) of every lane, shifted right by `shift` more bits, masked. */
ALWAYS_INLINE __m512i lane_bits(__m512i words, int byte, int shift, int mask) {
    return _mm512_and_si512(_mm512_srli_epi32(words, 8 * byte + shift), _mm512_set1_epi32(mask));
}

static void unpack_q4_K(const uint8_t *const *rows, const uint8_t *base, __m512i offsets,
                        super_block_16 *sb) {
    const __m512i d_dmin = _mm512_i32gather_epi32(offsets, base, 1);
    const __m512 d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(d_dmin));
    const __m512 dmin = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(d_dmin, 16)));
    const __m512i w1 = _mm512_i32gather_epi32(offsets, base + 4, 1);   /* scale bytes 0-3 */
    const __m512i w2 = _mm512_i32gather_epi32(offsets, base + 8, 1);   /* 4-7 */
    const __m512i w3 = _mm512_i32gather_epi32(offsets, base + 12, 1);  /* 8-11 */
    for (int j = 0; j < 4; j++) {
        const __m512i sc = lane_bits(w1, j, 0, 63), m = lane_bits(w2, j, 0, 63);
        const __m512i sc_hi = _mm512_or_si512(lane_bits(w3, j, 0, 15),
                                              _mm512_slli_epi32(lane_bits(w1, j, 6, 3), 4));
        const __m512i m_hi = _mm512_or_si512(lane_bits(w3, j, 4, 15),
                                             _mm512_slli_epi32(lane_bits(w2, j, 6, 3), 4));
        sb->scale[j] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(sc));
        sb->min[j] = _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(m));
        sb->scale[j + 4] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(sc_hi));
        sb->min[j + 4] = _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(m_hi));
    }
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    for (int p = 0; p < 4; p++) {  /* qs[32p..32p+31]: sub-block 2p low nibbles, 2p+1 high */
        __m512i t[8];
        numoe_load_transposed(rows, (int64_t)offsetof(block_q4_K, qs) + 32 * p, t);
        for (int c = 0; c < 8; c++) {
            sb->codes[2 * p][c] = _mm512_and_si512(t[c], nibble);
            sb->codes[2 * p + 1][c] = _mm512_and_si512(_mm512_srli_epi16(t[c], 4), nibble);
        }
    }
}

/* Exact code . a over dwords [c0, c0 + 4) of block j, for the 16 rows, from `start`. */
ALWAYS_INLINE __m512i codes_dot4(const super_block_16 *sb, int j, int c0, const int8_t *qs,
                                 __m512i start) {
    __m512i even = start, odd = _mm512_setzero_si512();
    for (int c = c0; c < c0 + 4; c += 2) {
        even = _mm512_dpbusd_epi32(even, sb->codes[j][c], broadcast_dword(qs + 4 * c));
        odd = _mm512_dpbusd_epi32(odd, sb->codes[j][c + 1], broadcast_dword(qs + 4 * c + 4));
    }
    return _mm512_add_epi32(even, odd);
}

ALWAYS_INLINE __m512 token_q4_K(const super_block_16 *sb, const block_q8a *a, __m512 acc) {
    for (int j = 0; j < BLOCKS; j++) {
        const __m512i dot = _mm512_add_epi32(
            codes_dot4(sb, j, 0, a[j].qs, _mm512_setzero_si512()),
            codes_dot4(sb, j, 4, a[j].qs, _mm512_setzero_si512()));
        const __m512 d_a = _mm512_set1_ps(a[j].d);
        const __m512 sum_a = _mm512_set1_ps((float)(a[j].bsums[0] + a[j].bsums[1]));
        acc = _mm512_fmadd_ps(_mm512_mul_ps(sb->scale[j], d_a), _mm512_cvtepi32_ps(dot), acc);
        acc = _mm512_fnmadd_ps(_mm512_mul_ps(sb->min[j], d_a), sum_a, acc);
    }
    return acc;
}

/* Up to 16 rows x up to MAX_TOKENS tokens: y[t * ldy + r]. Rows past n_rows repeat row 0;
 * their lanes are computed and dropped. */
static void tile_16(int64_t n, const uint8_t *w, int64_t row_bytes, int64_t n_rows,
                    const void *const *acts, int64_t n_tokens, float *y, int64_t ldy) {
    const int64_t bytes = (int64_t)sizeof(block_q4_K);
    const uint8_t *rows[LANES];
    const __m512i offsets = numoe_tile_rows(w, row_bytes, n_rows, rows);
    __m512 acc[MAX_TOKENS];
    for (int64_t t = 0; t < n_tokens; t++) acc[t] = _mm512_setzero_ps();
    const int64_t nb = n / QK_K;
    const uint8_t *next = w + LANES * row_bytes;
    const int64_t slice = (LANES * row_bytes + nb - 1) / nb;
    super_block_16 sb;
    for (int64_t i = 0; i < nb; i++) {
        numoe_prefetch_span(next + i * slice, slice);
        unpack_q4_K(rows, w + i * bytes, offsets, &sb);
        for (int r = 0; r < LANES; r++) rows[r] += bytes;
        for (int64_t t = 0; t < n_tokens; t++) {
            const block_q8a *a = (const block_q8a *)acts[t] + i * BLOCKS;
            acc[t] = token_q4_K(&sb, a, acc[t]);
        }
    }
    const __mmask16 valid = (__mmask16)((1u << n_rows) - 1);
    for (int64_t t = 0; t < n_tokens; t++) _mm512_mask_storeu_ps(y + t * ldy, valid, acc[t]);
}

static void vec_dot_tile_q4_K(int64_t n, const void *w, int64_t row_bytes, int64_t n_rows,
                              const void *const *acts, int64_t n_tokens, float *y, int64_t ldy) {
    for (int64_t r = 0; r < n_rows; r += LANES) {
        const int64_t rows = n_rows - r < LANES ? n_rows - r : LANES;
        for (int64_t t = 0; t < n_tokens; t += MAX_TOKENS) {
            const int64_t tokens = n_tokens - t < MAX_TOKENS ? n_tokens - t : MAX_TOKENS;
            tile_16(n, (const uint8_t *)w + r * row_bytes, row_bytes, rows, acts + t, tokens,
                    y + t * ldy + r, ldy);
        }
    }
}

#pragma GCC pop_options

void numoe_fill_ktile_avx512(numoe_kernel_table *t) {
    t->vec_dot[NUMOE_TYPE_Q4_K] = vec_dot_q4_K;
    t->vec_dot_tile[NUMOE_TYPE_Q4_K] = vec_dot_tile_q4_K;
}
