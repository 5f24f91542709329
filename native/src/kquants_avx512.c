/* K-quant dot products of Q5_K and Q6_K for AVX-512 F/BW/VL + VNNI (what dispatch.c checks);
 * Q4_K moved to ktile_avx512.c, whose row x token tiles define its per-pair order.
 *
 * Same arithmetic as kquants_ref.c and the same plan as kquants_avx2.c (read that first);
 * the differences:
 *   - VNNI's dpbusd (unsigned 8-bit x signed 8-bit -> int32) replaces maddubs + madd: it is
 *     exactly the shape of "unsigned weight codes times signed activations".
 *   - The activation scales and block sums of a super-block come out of four loads and two
 *     two-source permutes (AVX2 needs eight scalar loads).
 *   - The fifth (Q5_K) and top two (Q6_K) bits are merged with vpternlog.
 * The main loop stays on 256-bit registers (AVX-512VL), one 32-value block each. Measured on
 * Zen 4, where a 512-bit op costs two 256-bit ones: pairing two blocks per 512-bit register
 * needs an insert per activation load and was 7% slower for Q4_K; so was keeping one float
 * FMA per block with the scale read back as an embedded broadcast (store forwarding).
 * Dequantization is not specialised here: the AVX2 versions (inherited) are memory bound.
 */
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")

#include <immintrin.h>
#include <string.h>

#include "internal.h"
#include "numoe.h"

/* vpternlog truth tables, operands (a, b, c): */
#define TERN_A_OR_B_AND_C 0xF8       /* a | (b & c) */
#define TERN_SELECT_A_IF_C 0xE4      /* c ? a : b, bit by bit */

static inline float half_to_float(numoe_half h) { return _cvtsh_ss(h); }

static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* int32 lanes whose sums are the dot of 32 unsigned weight codes with a block's int8 values. */
static inline __m256i dot32_u8_s8(__m256i q, const block_q8a *act) {
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, _mm256_loadu_si256((const __m256i *)act->qs));
}

/* The 8 activation blocks of a super-block, as one vector: lanes 0-7 hold their float scales
 * d, lanes 8-15 their two int16 bsums packed in one int32 (bsums[0] in the low half).
 * block_q8a is 10 int32 words (d at word 0, bsums at word 1), so these are words 10j and
 * 10j+1: four overlapping loads, two two-source permutes and a blend (gathers are slow). */
static inline __m512i load_act_meta(const block_q8a *a) {
    const int32_t *words = (const int32_t *)a;
    const __m512i w0 = _mm512_loadu_si512(words), w20 = _mm512_loadu_si512(words + 20);
    const __m512i w40 = _mm512_loadu_si512(words + 40), w60 = _mm512_loadu_si512(words + 60);
    /* Blocks 4h..4h+3 sit at words 0, 10 of the first window and 16, 26 of the pair. */
    const __m512i first4 = _mm512_setr_epi32(0, 10, 16, 26, 0, 0, 0, 0, 1, 11, 17, 27, 0, 0, 0, 0);
    const __m512i last4 = _mm512_setr_epi32(0, 0, 0, 0, 0, 10, 16, 26, 0, 0, 0, 0, 1, 11, 17, 27);
    const __m512i blocks0123 = _mm512_permutex2var_epi32(w0, first4, w20);
    const __m512i blocks4567 = _mm512_permutex2var_epi32(w40, last4, w60);
    return _mm512_mask_blend_epi32(0xF0F0, blocks0123, blocks4567);
}

/* Q5_K block header (Q4_K's layout too: d, dmin, 12 packed bytes of 6-bit scales and mins), one 16-byte
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
    const __m128i top_src = _mm_srli_epi32(_mm_shuffle_epi32(header, _MM_SHUFFLE(2, 2, 1, 1)), 2);
    const __m128i packed8 = _mm_ternarylogic_epi32(low, top_src, _mm_setr_epi32(0, 0x30303030, 0, 0x30303030),
                                                   TERN_A_OR_B_AND_C);   /* sc0..7, m0..7 */
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

static float vec_dot_q5_K(int64_t n, const void *w_row, const void *act) {
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    const __m256i bit4 = _mm256_set1_epi8(0x10);
    const uint8_t *row = w_row;
    const block_q8a *a = act;
    __m256 acc = _mm256_setzero_ps();       /* d * sc_j * d_act_j * sum(q * qs), per lane j */
    __m256 acc_min = _mm256_setzero_ps();   /* dmin * m_j * d_act_j * sum(qs), per lane j */

    for (int64_t i = 0; i < n / QK_K; i++, row += sizeof(block_q5_K), a += 8) {
        const uint8_t *qh = row + offsetof(block_q5_K, qh);
        const uint8_t *qs = row + offsetof(block_q5_K, qs);

        const __m512i meta = load_act_meta(a);
        const __m256 act_d = _mm512_castps512_ps256(_mm512_castsi512_ps(meta));
        const __m256 act_sum = _mm256_cvtepi32_ps(
            _mm256_madd_epi16(_mm512_extracti64x4_epi64(meta, 1), _mm256_set1_epi16(1)));
        __m256 d, dmin, sc, m;
        unpack_header(row, &d, &dmin, &sc, &m);
        acc_min = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_mul_ps(dmin, m), act_d), act_sum, acc_min);

        __m256i high = _mm256_loadu_si256((const __m256i *)qh);
        __m256i s[8];
#pragma GCC unroll 4
        for (int p = 0; p < 4; p++) {
            /* 32 bytes of qs = sub-block 2p (low nibbles) and 2p+1 (high nibbles). */
            const __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * p));
            __m256i q_lo = _mm256_and_si256(q, nibble);
            __m256i q_hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), nibble);
            /* Bit 2p / 2p+1 of every qh byte, moved to bit 4 (high has been shifted by 2p). */
            q_lo = _mm256_ternarylogic_epi32(q_lo, _mm256_slli_epi16(high, 4), bit4, TERN_A_OR_B_AND_C);
            q_hi = _mm256_ternarylogic_epi32(q_hi, _mm256_slli_epi16(high, 3), bit4, TERN_A_OR_B_AND_C);
            high = _mm256_srli_epi16(high, 2);
            s[2 * p] = dot32_u8_s8(q_lo, &a[2 * p]);
            s[2 * p + 1] = dot32_u8_s8(q_hi, &a[2 * p + 1]);
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum_each_of_8(s)),
                              _mm256_mul_ps(_mm256_mul_ps(d, sc), act_d), acc);
    }
    return hsum_ps(_mm256_sub_ps(acc, acc_min));
}

static float vec_dot_q6_K(int64_t n, const void *w_row, const void *act) {
    const block_q6_K *blocks = w_row;
    const block_q8a *a = act;
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    const __m256i low6 = _mm256_set1_epi8(0x3F);
    const __m512i act_of_group = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                     _mm256_setzero_ps()};
    __m512 acc_offset = _mm512_setzero_ps();   /* sum of group scale * bsum, to be times -32 */

    for (int64_t i = 0; i < n / QK_K; i++, a += 8) {
        const block_q6_K *b = &blocks[i];
        const __m512i meta = load_act_meta(a);
        /* Float scale of each 16-value group k: d * sc[k] * d_act[k / 2]. */
        const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)b->scales)));
        const __m512 act16 = _mm512_permutexvar_ps(act_of_group, _mm512_castsi512_ps(meta));
        const __m512 group_scale = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(half_to_float(b->d)), sc), act16);
        /* bsums in group order: the 16 int16 of lanes 8-15, widened. */
        const __m512 bsum = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(meta, 1)));
        acc_offset = _mm512_fmadd_ps(group_scale, bsum, acc_offset);
        const __m256 half_scale[2] = {_mm512_castps512_ps256(group_scale),
                                      _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(group_scale), 1))};

#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            /* Half h: values 128h + 32r + l (r = 0..3) in activation block 4h + r; r = 0, 2 take
             * the low / high nibble of ql bytes 0-31, r = 1, 3 of bytes 32-63, and bits
             * (2r, 2r+1) of qh. Each ternlog takes bits 0-3 from the nibble source and bits 4-7
             * from the shifted qh; the final and drops qh's unrelated bits 6-7. */
            const __m256i ql0 = _mm256_loadu_si256((const __m256i *)(b->ql + 64 * h));
            const __m256i ql1 = _mm256_loadu_si256((const __m256i *)(b->ql + 64 * h + 32));
            const __m256i qh = _mm256_loadu_si256((const __m256i *)(b->qh + 32 * h));
            const __m256i q[4] = {
                _mm256_and_si256(_mm256_ternarylogic_epi32(ql0, _mm256_slli_epi16(qh, 4), nibble,
                                                           TERN_SELECT_A_IF_C), low6),
                _mm256_and_si256(_mm256_ternarylogic_epi32(ql1, _mm256_slli_epi16(qh, 2), nibble,
                                                           TERN_SELECT_A_IF_C), low6),
                _mm256_and_si256(_mm256_ternarylogic_epi32(_mm256_srli_epi16(ql0, 4), qh, nibble,
                                                           TERN_SELECT_A_IF_C), low6),
                _mm256_and_si256(_mm256_ternarylogic_epi32(_mm256_srli_epi16(ql1, 4),
                                                           _mm256_srli_epi16(qh, 2), nibble,
                                                           TERN_SELECT_A_IF_C), low6),
            };
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) {
                /* int32 lanes 0-3 belong to group 2r of this half, lanes 4-7 to group 2r+1. */
                const __m256i s = dot32_u8_s8(q[r], &a[4 * h + r]);
                const __m256 scale = _mm256_permutevar8x32_ps(
                    half_scale[h], _mm256_setr_epi32(2 * r, 2 * r, 2 * r, 2 * r, 2 * r + 1,
                                                     2 * r + 1, 2 * r + 1, 2 * r + 1));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[r]);
            }
        }
    }
    const __m256 total = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    return hsum_ps(total) - 32.0f * _mm512_reduce_add_ps(acc_offset);
}

void numoe_fill_kquants_avx512(numoe_kernel_table *t) {
    t->vec_dot[NUMOE_TYPE_Q5_K] = vec_dot_q5_K;
    t->vec_dot[NUMOE_TYPE_Q6_K] = vec_dot_q6_K;
}
