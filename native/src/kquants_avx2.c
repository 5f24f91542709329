/* K-quant kernels (Q4_K, Q5_K, Q6_K) for AVX2 + FMA + F16C.
 *
 * Same arithmetic as kquants_ref.c (read that first); only the summation order of the float
 * terms differs. Decode is memory bound, so the work per 32 weights is kept small:
 *   unpack codes (shift/and/or)  ->  maddubs + madd: exact int32 partial sums in 8 lanes.
 * Everything that varies per 32 or per 16 weights (weight sub-scales, activation scales,
 * mins, Q6_K's -32 offset) is computed once per super-block as 8- or 16-lane float vectors;
 * the mins and the -32 go through the activation block sums (bsums), one FMA per super-block.
 *   Q4_K/Q5_K: a transpose-and-add tree turns the 8 blocks' partial sums into one vector of
 *              8 block sums, then one convert and one FMA with the 8 block scales.
 *   Q6_K:      scales are per 16 values (4 lanes), so each block takes one permute of the
 *              scale vector, one convert and one FMA.
 *
 * Dequantization keeps ggml's float32 mul-then-sub (no FMA) so it stays bit-exact.
 */
#pragma GCC target("avx2,fma,f16c")
#pragma GCC optimize("fp-contract=off")

#include <immintrin.h>
#include <string.h>

#include "internal.h"
#include "numoe.h"

/* ---- shared helpers ---------------------------------------------------------------------- */

static inline float half_to_float(numoe_half h) { return _cvtsh_ss(h); }

static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Sum of the 8 int32 lanes is the dot of 32 unsigned weights with 32 signed activations.
 * maddubs cannot saturate: |q| <= 63 and |a| <= 128 give |pair sums| <= 16128. */
static inline __m256i dot32_u8_s8(__m256i q, const int8_t *act_qs) {
    const __m256i a = _mm256_loadu_si256((const __m256i *)act_qs);
    return _mm256_madd_epi16(_mm256_maddubs_epi16(q, a), _mm256_set1_epi16(1));
}

/* The 8 activation blocks of one super-block: their float scales and, per block, the two
 * int16 per-16 sums packed in one int32 lane (bsums[0] low half, bsums[1] high half).
 * Plain loads: AVX2 gathers are slower than eight scalar loads on the CPUs we measured. */
static inline void load_act_meta(const block_q8a *a, __m256 *scales, __m256i *bsum_pairs) {
    int32_t pairs[8];
    for (int j = 0; j < 8; j++) memcpy(&pairs[j], a[j].bsums, sizeof pairs[j]);
    *scales = _mm256_setr_ps(a[0].d, a[1].d, a[2].d, a[3].d, a[4].d, a[5].d, a[6].d, a[7].d);
    *bsum_pairs = _mm256_setr_epi32(pairs[0], pairs[1], pairs[2], pairs[3], pairs[4], pairs[5],
                                    pairs[6], pairs[7]);
}

/* Q4_K/Q5_K block header (d, dmin, 12 packed bytes of 6-bit scales and mins), one 16-byte
 * load: d and dmin as broadcast floats, the eight scales sc and the eight mins m as floats.
 * Scale layout (see kquants_ref.c), in the header's words w1 w2 w3 (w0 = d, dmin):
 * sc0-3 = w1 & 63, m0-3 = w2 & 63, sc4-7 = (w3 & 15) | top2(w1), m4-7 = (w3 >> 4) | top2(w2). */
static inline void unpack_header(const uint8_t *block, __m256 *d, __m256 *dmin, __m256 *sc, __m256 *m) {
    const __m128i header = _mm_loadu_si128((const __m128i *)block);
    const __m128 d_dmin = _mm_cvtph_ps(header);
    *d = _mm256_broadcastss_ps(d_dmin);
    *dmin = _mm256_broadcastss_ps(_mm_movehdup_ps(d_dmin));
    const __m128i low_src = _mm_shuffle_epi32(header, _MM_SHUFFLE(3, 2, 3, 1));   /* w1 w3 w2 w3 */
    const __m128i low = _mm_and_si128(_mm_srlv_epi32(low_src, _mm_setr_epi32(0, 0, 0, 4)),
                                      _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f));
    /* Top two bits of sc4-7 / m4-7: bits 6-7 of w1 / w2, moved to bits 4-5. */
    const __m128i top = _mm_and_si128(_mm_srli_epi32(_mm_shuffle_epi32(header, _MM_SHUFFLE(2, 2, 1, 1)), 2),
                                      _mm_setr_epi32(0, 0x30303030, 0, 0x30303030));
    const __m128i packed8 = _mm_or_si128(low, top);   /* sc0..7, m0..7 */
    *sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(packed8));
    *m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(packed8, packed8)));
}

/* Lane j of the result = the sum of the 8 int32 lanes of s[j] (j = 0..7), i.e. the
 * per-block dot products side by side, so that their float scales apply with one FMA.
 * A transpose-and-add tree: interleave pairs and add, then pairs of pairs, then the two
 * 128-bit halves. */
static inline __m256i sum_each_of_8(const __m256i s[8]) {
    __m256i pairs[4], quads[2];
    for (int k = 0; k < 4; k++)   /* lanes: s[2k], s[2k+1], s[2k], s[2k+1] | same */
        pairs[k] = _mm256_add_epi32(_mm256_unpacklo_epi32(s[2 * k], s[2 * k + 1]),
                                    _mm256_unpackhi_epi32(s[2 * k], s[2 * k + 1]));
    for (int k = 0; k < 2; k++)   /* lanes: s[4k] .. s[4k+3] | same, other half of the sums */
        quads[k] = _mm256_add_epi32(_mm256_unpacklo_epi64(pairs[2 * k], pairs[2 * k + 1]),
                                    _mm256_unpackhi_epi64(pairs[2 * k], pairs[2 * k + 1]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(quads[0], quads[1], 0x20),
                            _mm256_permute2x128_si256(quads[0], quads[1], 0x31));
}

/* ---- dot products ------------------------------------------------------------------------- */

/* Q4_K and Q5_K share everything but the fifth bit; with_qh selects it at compile time. */
static inline float vec_dot_q45_K(int64_t n, const uint8_t *row, size_t block_bytes,
                                  const block_q8a *a, int with_qh) {
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    const __m256i bit4 = _mm256_set1_epi8(0x10);
    __m256 acc = _mm256_setzero_ps();       /* d * sc_j * d_act_j * sum(q * qs), per lane j */
    __m256 acc_min = _mm256_setzero_ps();   /* dmin * m_j * d_act_j * sum(qs), per lane j */

    for (int64_t i = 0; i < n / QK_K; i++, row += block_bytes, a += 8) {
        const uint8_t *qh = row + offsetof(block_q5_K, qh);
        const uint8_t *qs = row + (with_qh ? offsetof(block_q5_K, qs) : offsetof(block_q4_K, qs));

        __m256 act_d, d, dmin, sc, m;
        __m256i bsum_pairs;
        load_act_meta(a, &act_d, &bsum_pairs);
        unpack_header(row, &d, &dmin, &sc, &m);
        const __m256 act_sum = _mm256_cvtepi32_ps(_mm256_madd_epi16(bsum_pairs, _mm256_set1_epi16(1)));
        acc_min = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_mul_ps(dmin, m), act_d), act_sum, acc_min);

        __m256i high = with_qh ? _mm256_loadu_si256((const __m256i *)qh) : _mm256_setzero_si256();
        __m256i s[8];
#pragma GCC unroll 4
        for (int p = 0; p < 4; p++) {
            /* 32 bytes of qs = sub-block 2p (low nibbles) and 2p+1 (high nibbles). */
            const __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * p));
            __m256i q_lo = _mm256_and_si256(q, nibble);
            /* (Keeping the high nibble in place, as the AVX-512 kernel does, would let
             * maddubs saturate: 2 * 240 * 127 > 32767.) */
            __m256i q_hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), nibble);
            if (with_qh) {
                /* Bit 2p / 2p+1 of every qh byte, moved to bit 4 (high has been shifted by 2p). */
                q_lo = _mm256_or_si256(q_lo, _mm256_and_si256(_mm256_slli_epi16(high, 4), bit4));
                q_hi = _mm256_or_si256(q_hi, _mm256_and_si256(_mm256_slli_epi16(high, 3), bit4));
                high = _mm256_srli_epi16(high, 2);
            }
            s[2 * p] = dot32_u8_s8(q_lo, a[2 * p].qs);
            s[2 * p + 1] = dot32_u8_s8(q_hi, a[2 * p + 1].qs);
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum_each_of_8(s)),
                              _mm256_mul_ps(_mm256_mul_ps(d, sc), act_d), acc);
    }
    return hsum_ps(_mm256_sub_ps(acc, acc_min));
}

static float vec_dot_q4_K(int64_t n, const void *w_row, const void *act) {
    return vec_dot_q45_K(n, w_row, sizeof(block_q4_K), act, 0);
}

static float vec_dot_q5_K(int64_t n, const void *w_row, const void *act) {
    return vec_dot_q45_K(n, w_row, sizeof(block_q5_K), act, 1);
}

static float vec_dot_q6_K(int64_t n, const void *w_row, const void *act) {
    const block_q6_K *blocks = w_row;
    const block_q8a *a = act;
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    const __m256i bits45 = _mm256_set1_epi8(0x30);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                     _mm256_setzero_ps()};
    __m256 acc_offset = _mm256_setzero_ps();   /* sum of scale * bsum, to be times -32 */

    for (int64_t i = 0; i < n / QK_K; i++, a += 8) {
        const block_q6_K *b = &blocks[i];
        /* Float scale of each 16-value group k: d * sc[k] * d_act[k / 2]. */
        __m256 act_d;
        __m256i bsum_pairs;
        load_act_meta(a, &act_d, &bsum_pairs);
        const __m256 d = _mm256_set1_ps(half_to_float(b->d));
        const __m128i sc16 = _mm_loadu_si128((const __m128i *)b->scales);
        const __m256 sc_lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc16));
        const __m256 sc_hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc16, 8)));
        const __m256 act_lo = _mm256_permutevar8x32_ps(act_d, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
        const __m256 act_hi = _mm256_permutevar8x32_ps(act_d, _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7));
        const __m256 group_scale[2] = {_mm256_mul_ps(_mm256_mul_ps(d, sc_lo), act_lo),
                                       _mm256_mul_ps(_mm256_mul_ps(d, sc_hi), act_hi)};
        /* bsums in group order: lanes of 16-bit pairs widen to groups 0..7 and 8..15. */
        const __m256 bsum_lo = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(bsum_pairs)));
        const __m256 bsum_hi = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(bsum_pairs, 1)));
        acc_offset = _mm256_fmadd_ps(group_scale[0], bsum_lo, acc_offset);
        acc_offset = _mm256_fmadd_ps(group_scale[1], bsum_hi, acc_offset);

#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            /* Half h: values 128h + 32r + l (r = 0..3) in activation block 4h + r. */
            const __m256i ql0 = _mm256_loadu_si256((const __m256i *)(b->ql + 64 * h));
            const __m256i ql1 = _mm256_loadu_si256((const __m256i *)(b->ql + 64 * h + 32));
            const __m256i qh = _mm256_loadu_si256((const __m256i *)(b->qh + 32 * h));
            const __m256i q[4] = {
                _mm256_or_si256(_mm256_and_si256(ql0, nibble),
                                _mm256_and_si256(_mm256_slli_epi16(qh, 4), bits45)),
                _mm256_or_si256(_mm256_and_si256(ql1, nibble),
                                _mm256_and_si256(_mm256_slli_epi16(qh, 2), bits45)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), nibble),
                                _mm256_and_si256(qh, bits45)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), nibble),
                                _mm256_and_si256(_mm256_srli_epi16(qh, 2), bits45)),
            };
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) {
                /* int32 lanes 0-3 belong to group 2r of this half, lanes 4-7 to group 2r+1. */
                const __m256i s = dot32_u8_s8(q[r], a[4 * h + r].qs);
                const __m256 scale = _mm256_permutevar8x32_ps(
                    group_scale[h], _mm256_setr_epi32(2 * r, 2 * r, 2 * r, 2 * r, 2 * r + 1,
                                                      2 * r + 1, 2 * r + 1, 2 * r + 1));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[r]);
            }
        }
    }
    const __m256 total = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    return hsum_ps(total) - 32.0f * hsum_ps(acc_offset);
}

/* ---- dequantize ---------------------------------------------------------------------------- */

/* dst[0..31] = scale * q - offset for 32 unsigned bytes q; mul then sub, as ggml. */
static inline void store32_scaled(float *dst, __m256i q, float scale, float offset) {
    const __m256 vs = _mm256_set1_ps(scale), vo = _mm256_set1_ps(offset);
    const __m128i halves[2] = {_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)};
#pragma GCC unroll 2
    for (int h = 0; h < 2; h++) {
        const __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(halves[h]));
        const __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(halves[h], 8)));
        _mm256_storeu_ps(dst + 16 * h, _mm256_sub_ps(_mm256_mul_ps(vs, f0), vo));
        _mm256_storeu_ps(dst + 16 * h + 8, _mm256_sub_ps(_mm256_mul_ps(vs, f1), vo));
    }
}

static inline void dequant_q45_K(int64_t n, const uint8_t *row, size_t block_bytes, float *dst,
                                 int with_qh) {
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    const __m256i bit4 = _mm256_set1_epi8(0x10);
    for (int64_t i = 0; i < n / QK_K; i++, row += block_bytes, dst += QK_K) {
        const block_q4_K *b = (const block_q4_K *)row;
        const uint8_t *qh = row + offsetof(block_q5_K, qh);
        const uint8_t *qs = with_qh ? row + offsetof(block_q5_K, qs) : b->qs;
        const float d = half_to_float(b->d), dmin = half_to_float(b->dmin);
        float sc[8], m[8];
        __m256 vd, vdmin, vsc, vm;
        unpack_header(row, &vd, &vdmin, &vsc, &vm);
        _mm256_storeu_ps(sc, vsc);
        _mm256_storeu_ps(m, vm);
        __m256i high = with_qh ? _mm256_loadu_si256((const __m256i *)qh) : _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int p = 0; p < 4; p++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * p));
            __m256i q_lo = _mm256_and_si256(q, nibble);
            __m256i q_hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), nibble);
            if (with_qh) {
                q_lo = _mm256_or_si256(q_lo, _mm256_and_si256(_mm256_slli_epi16(high, 4), bit4));
                q_hi = _mm256_or_si256(q_hi, _mm256_and_si256(_mm256_slli_epi16(high, 3), bit4));
                high = _mm256_srli_epi16(high, 2);
            }
            /* d * (float)sc is exactly the reference's d * sc (sc < 64 converts exactly). */
            store32_scaled(dst + 64 * p, q_lo, d * sc[2 * p], dmin * m[2 * p]);
            store32_scaled(dst + 64 * p + 32, q_hi, d * sc[2 * p + 1], dmin * m[2 * p + 1]);
        }
    }
}

static void dequant_q4_K(int64_t n, const void *src, float *dst) {
    dequant_q45_K(n, src, sizeof(block_q4_K), dst, 0);
}

static void dequant_q5_K(int64_t n, const void *src, float *dst) {
    dequant_q45_K(n, src, sizeof(block_q5_K), dst, 1);
}

static void dequant_q6_K(int64_t n, const void *src, float *dst) {
    const block_q6_K *blocks = src;
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    const __m256i bits45 = _mm256_set1_epi8(0x30);
    const __m256i offset = _mm256_set1_epi8(32);
    for (int64_t i = 0; i < n / QK_K; i++) {
        const block_q6_K *b = &blocks[i];
        const float d = half_to_float(b->d);
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            const __m256i ql0 = _mm256_loadu_si256((const __m256i *)(b->ql + 64 * h));
            const __m256i ql1 = _mm256_loadu_si256((const __m256i *)(b->ql + 64 * h + 32));
            const __m256i qh = _mm256_loadu_si256((const __m256i *)(b->qh + 32 * h));
            const __m256i q[4] = {
                _mm256_or_si256(_mm256_and_si256(ql0, nibble),
                                _mm256_and_si256(_mm256_slli_epi16(qh, 4), bits45)),
                _mm256_or_si256(_mm256_and_si256(ql1, nibble),
                                _mm256_and_si256(_mm256_slli_epi16(qh, 2), bits45)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), nibble),
                                _mm256_and_si256(qh, bits45)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), nibble),
                                _mm256_and_si256(_mm256_srli_epi16(qh, 2), bits45)),
            };
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) {
                const __m256i centered = _mm256_sub_epi8(q[r], offset);   /* int8 in [-32, 31] */
                const __m128i halves[2] = {_mm256_castsi256_si128(centered),
                                           _mm256_extracti128_si256(centered, 1)};
                float *out = dst + QK_K * i + 128 * h + 32 * r;
#pragma GCC unroll 2
                for (int g = 0; g < 2; g++) {
                    /* ggml: (d * sc) * q in float32, sc per 16 values. */
                    const __m256 scale = _mm256_set1_ps(d * b->scales[8 * h + 2 * r + g]);
                    const __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(halves[g]));
                    const __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(halves[g], 8)));
                    _mm256_storeu_ps(out + 16 * g, _mm256_mul_ps(scale, f0));
                    _mm256_storeu_ps(out + 16 * g + 8, _mm256_mul_ps(scale, f1));
                }
            }
        }
    }
}

void numoe_fill_kquants_avx2(numoe_kernel_table *t) {
    t->dequant[NUMOE_TYPE_Q4_K] = dequant_q4_K;
    t->dequant[NUMOE_TYPE_Q5_K] = dequant_q5_K;
    t->dequant[NUMOE_TYPE_Q6_K] = dequant_q6_K;
    t->vec_dot[NUMOE_TYPE_Q4_K] = vec_dot_q4_K;
    t->vec_dot[NUMOE_TYPE_Q5_K] = vec_dot_q5_K;
    t->vec_dot[NUMOE_TYPE_Q6_K] = vec_dot_q6_K;
}
