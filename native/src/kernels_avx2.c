/* AVX2 + FMA + F16C kernels: vec_dot and dequantize for F32, F16, BF16, Q8_0, Q4_0, Q5_0
 * and the activation quantizer. The AVX-512 table inherits the dequantizers: they feed the
 * prompt path (gemm.h), where a few percent of its time goes to them. Compiled with the ISA enabled for this file only (the .so must load on any
 * x86-64); dispatch.c calls numoe_fill_table_avx2 only on CPUs that have it.
 *
 * Integer blocks use ggml's sign trick: maddubs wants unsigned x signed bytes, so the dot
 * of signed w and signed a is computed as |w| . (a * sign(w)). |w| <= 128 and |a| <= 127
 * keep each int16 pair sum <= 32512, below saturation. */
/* Included before any target pragma: intrinsics defined inside one would carry that
 * target, and a function with another target could not inline them. */
#include <immintrin.h>
#include <string.h>

#include "internal.h"
#include "numoe.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline int hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

/* 32 signed bytes . 32 signed bytes, as 8 float partial sums (exact integers). */
static inline __m256 dot_i8(__m256i qw, __m256i qa) {
    const __m256i abs_w = _mm256_sign_epi8(qw, qw);
    const __m256i signed_a = _mm256_sign_epi8(qa, qw);
    const __m256i pairs = _mm256_maddubs_epi16(abs_w, signed_a);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

static inline __m256i load_act(const block_q8a *a) {
    return _mm256_loadu_si256((const __m256i *)a->qs);
}

/* 16 bytes of nibbles -> 32 values: low nibbles are elements 0..15, high 16..31. */
static inline __m256i unpack_nibbles(const uint8_t *qs) {
    const __m128i packed = _mm_loadu_si128((const __m128i *)qs);
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

/* 32 bits -> 32 bytes, 0xFF where the bit is set (ggml's bytes_from_bits_32). */
static inline __m256i bytes_from_bits(const uint8_t *bits32) {
    uint32_t x;
    memcpy(&x, bits32, sizeof x);
    const __m256i spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32((int)x),
        _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
    const __m256i with_other_bits = _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    return _mm256_cmpeq_epi8(with_other_bits, _mm256_set1_epi64x(-1));
}

static inline __m256i q8_0_values(const block_q8_0 *w) {
    return _mm256_loadu_si256((const __m256i *)w->qs);
}

static inline __m256i q4_0_values(const block_q4_0 *w) {
    return _mm256_sub_epi8(unpack_nibbles(w->qs), _mm256_set1_epi8(8));
}

/* q - 16: where the fifth bit is clear, set the upper nibble (nibble - 16 in two's complement). */
static inline __m256i q5_0_values(const block_q5_0 *w) {
    const __m256i high_bit = bytes_from_bits(w->qh);
    const __m256i minus16 = _mm256_andnot_si256(high_bit, _mm256_set1_epi8((char)0xF0));
    return _mm256_or_si256(unpack_nibbles(w->qs), minus16);
}

/* Two accumulators hide the FMA latency; blocks are independent. */
#define DEFINE_VEC_DOT_INT(name, block_t, values)                                             \
    static float name(int64_t n, const void *w_row, const void *act) {                        \
        const block_t *w = w_row;                                                             \
        const block_q8a *a = act;                                                             \
        const int64_t nb = n / 32;                                                            \
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();                        \
        int64_t b = 0;                                                                        \
        for (; b + 1 < nb; b += 2) {                                                          \
            const __m256 s0 = _mm256_set1_ps(_cvtsh_ss(w[b].d) * a[b].d);                     \
            const __m256 s1 = _mm256_set1_ps(_cvtsh_ss(w[b + 1].d) * a[b + 1].d);             \
            acc0 = _mm256_fmadd_ps(s0, dot_i8(values(&w[b]), load_act(&a[b])), acc0);         \
            acc1 = _mm256_fmadd_ps(s1, dot_i8(values(&w[b + 1]), load_act(&a[b + 1])), acc1); \
        }                                                                                     \
        if (b < nb) {                                                                         \
            const __m256 s0 = _mm256_set1_ps(_cvtsh_ss(w[b].d) * a[b].d);                     \
            acc0 = _mm256_fmadd_ps(s0, dot_i8(values(&w[b]), load_act(&a[b])), acc0);         \
        }                                                                                     \
        return hsum_ps(_mm256_add_ps(acc0, acc1));                                            \
    }

DEFINE_VEC_DOT_INT(vec_dot_q8_0_avx2, block_q8_0, q8_0_values)
DEFINE_VEC_DOT_INT(vec_dot_q4_0_avx2, block_q4_0, q4_0_values)
DEFINE_VEC_DOT_INT(vec_dot_q5_0_avx2, block_q5_0, q5_0_values)

/* --- float types: 8 lanes x 4 accumulators, scalar tail ----------------------------------- */

static inline __m256 load8_f32(const void *p) { return _mm256_loadu_ps(p); }
static inline __m256 load8_f16(const void *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
static inline __m256 load8_bf16(const void *p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
static inline float one_f32(const void *p, int64_t i) { return ((const float *)p)[i]; }
static inline float one_f16(const void *p, int64_t i) {
    return _cvtsh_ss(((const numoe_half *)p)[i]);
}
static inline float one_bf16(const void *p, int64_t i) {
    const uint32_t bits = (uint32_t)((const numoe_bf16 *)p)[i] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#define DEFINE_VEC_DOT_FLOAT(name, elem_t, load8, one)                                 \
    static float name(int64_t n, const void *w_row, const void *act) {                 \
        const elem_t *w = w_row;                                                       \
        const float *x = act;                                                          \
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();                 \
        __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();                 \
        int64_t i = 0;                                                                 \
        for (; i + 32 <= n; i += 32) {                                                 \
            acc0 = _mm256_fmadd_ps(load8(w + i), _mm256_loadu_ps(x + i), acc0);        \
            acc1 = _mm256_fmadd_ps(load8(w + i + 8), _mm256_loadu_ps(x + i + 8), acc1); \
            acc2 = _mm256_fmadd_ps(load8(w + i + 16), _mm256_loadu_ps(x + i + 16), acc2); \
            acc3 = _mm256_fmadd_ps(load8(w + i + 24), _mm256_loadu_ps(x + i + 24), acc3); \
        }                                                                              \
        for (; i + 8 <= n; i += 8)                                                     \
            acc0 = _mm256_fmadd_ps(load8(w + i), _mm256_loadu_ps(x + i), acc0);        \
        float sum = hsum_ps(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3))); \
        for (; i < n; i++) sum += one(w, i) * x[i];                                    \
        return sum;                                                                    \
    }

DEFINE_VEC_DOT_FLOAT(vec_dot_f32_avx2, float, load8_f32, one_f32)
DEFINE_VEC_DOT_FLOAT(vec_dot_f16_avx2, numoe_half, load8_f16, one_f16)
DEFINE_VEC_DOT_FLOAT(vec_dot_bf16_avx2, numoe_bf16, load8_bf16, one_bf16)

/* --- dequantize: bit-identical to the references (int -> float is exact, then one multiply) */

/* dst[0..31] = d * q for 32 signed bytes q. */
static inline void store32_scaled(float *dst, __m256i q, float d) {
    const __m256 scale = _mm256_set1_ps(d);
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    _mm256_storeu_ps(dst, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), scale));
    _mm256_storeu_ps(dst + 8, _mm256_mul_ps(
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), scale));
    _mm256_storeu_ps(dst + 16, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), scale));
    _mm256_storeu_ps(dst + 24, _mm256_mul_ps(
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), scale));
}

#define DEFINE_DEQUANT_INT(name, block_t, values)                                            \
    static void name(int64_t n, const void *src, float *dst) {                               \
        const block_t *w = src;                                                              \
        for (int64_t b = 0; b < n / 32; b++)                                                 \
            store32_scaled(dst + 32 * b, values(&w[b]), _cvtsh_ss(w[b].d));                  \
    }

DEFINE_DEQUANT_INT(dequant_q8_0_avx2, block_q8_0, q8_0_values)
DEFINE_DEQUANT_INT(dequant_q4_0_avx2, block_q4_0, q4_0_values)
DEFINE_DEQUANT_INT(dequant_q5_0_avx2, block_q5_0, q5_0_values)

#define DEFINE_DEQUANT_FLOAT(name, elem_t, load8, one)                                       \
    static void name(int64_t n, const void *src, float *dst) {                               \
        const elem_t *w = src;                                                               \
        int64_t i = 0;                                                                       \
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8(w + i));                  \
        for (; i < n; i++) dst[i] = one(w, i);                                               \
    }

DEFINE_DEQUANT_FLOAT(dequant_f16_avx2, numoe_half, load8_f16, one_f16)
DEFINE_DEQUANT_FLOAT(dequant_bf16_avx2, numoe_bf16, load8_bf16, one_bf16)

/* --- activation quantizer: bit-identical to numoe_quantize_act_ref ----------------------- */

static void quantize_act_avx2(int64_t n, const float *x, block_q8a *dst) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    /* packs interleaves 128-bit lanes; this restores element order. */
    const __m256i unshuffle = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b < n / 32; b++) {
        const float *xb = x + b * 32;
        const __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
        const __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
        __m256 m = _mm256_max_ps(_mm256_andnot_ps(sign_bit, v0), _mm256_andnot_ps(sign_bit, v1));
        m = _mm256_max_ps(m, _mm256_max_ps(_mm256_andnot_ps(sign_bit, v2),
                                           _mm256_andnot_ps(sign_bit, v3)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        const __m256 inv_scale = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
        dst[b].d = amax / 127.0f;

        const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, inv_scale));
        const __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, inv_scale));
        const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, inv_scale));
        const __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, inv_scale));
        dst[b].bsums[0] = (int16_t)hsum_epi32(_mm256_add_epi32(i0, i1));
        dst[b].bsums[1] = (int16_t)hsum_epi32(_mm256_add_epi32(i2, i3));
        const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1),
                                                  _mm256_packs_epi32(i2, i3));
        _mm256_storeu_si256((__m256i *)dst[b].qs, _mm256_permutevar8x32_epi32(packed, unshuffle));
    }
}

#pragma GCC pop_options

void numoe_fill_table_avx2(numoe_kernel_table *t) {
    t->quantize_act = quantize_act_avx2;
    t->vec_dot[NUMOE_TYPE_F32] = vec_dot_f32_avx2;
    t->vec_dot[NUMOE_TYPE_F16] = vec_dot_f16_avx2;
    t->vec_dot[NUMOE_TYPE_BF16] = vec_dot_bf16_avx2;
    t->vec_dot[NUMOE_TYPE_Q8_0] = vec_dot_q8_0_avx2;
    t->vec_dot[NUMOE_TYPE_Q4_0] = vec_dot_q4_0_avx2;
    t->vec_dot[NUMOE_TYPE_Q5_0] = vec_dot_q5_0_avx2;
    t->dequant[NUMOE_TYPE_F16] = dequant_f16_avx2;
    t->dequant[NUMOE_TYPE_BF16] = dequant_bf16_avx2;
    t->dequant[NUMOE_TYPE_Q8_0] = dequant_q8_0_avx2;
    t->dequant[NUMOE_TYPE_Q4_0] = dequant_q4_0_avx2;
    t->dequant[NUMOE_TYPE_Q5_0] = dequant_q5_0_avx2;
    numoe_fill_kquants_avx2(t);
}
