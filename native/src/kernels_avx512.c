/* AVX-512 (F/BW/VL) + VNNI kernels: vec_dot for F32, F16, BF16, Q8_0, Q4_0, Q5_0 and the
 * activation quantizer. Compiled with the ISA enabled for this file only; dispatch.c calls
 * numoe_fill_table_avx512 only on CPUs that have it.
 *
 * Integer blocks: one 32-byte block is one 256-bit VNNI dpbusd (unsigned x signed bytes into
 * int32), fed with |w| and a * sign(w). Measured on Zen 5: two blocks per 512-bit dpbusd, with
 * the four scales of a step converted together, ran no faster (0.88 ns per Q8_0 block either
 * way), so the simpler loop stays. The float types use 512-bit FMAs with masked tails. */
/* Included before any target pragma: intrinsics defined inside one would carry that
 * target, and a function with another target could not inline them. */
#include <immintrin.h>
#include <string.h>

#include "internal.h"
#include "numoe.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")

static inline float hsum256_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 32 signed bytes . 32 signed bytes, as 8 float partial sums (exact integers). */
static inline __m256 dot_i8_vnni(__m256i qw, __m256i qa) {
    const __m256i abs_w = _mm256_sign_epi8(qw, qw);
    const __m256i signed_a = _mm256_sign_epi8(qa, qw);
    return _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), abs_w, signed_a));
}

static inline __m256i load_act(const block_q8a *a) {
    return _mm256_loadu_si256((const __m256i *)a->qs);
}

static inline __m256i unpack_nibbles(const uint8_t *qs) {
    const __m128i packed = _mm_loadu_si128((const __m128i *)qs);
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

static inline __m256i q8_0_values(const block_q8_0 *w) {
    return _mm256_loadu_si256((const __m256i *)w->qs);
}

static inline __m256i q4_0_values(const block_q4_0 *w) {
    return _mm256_sub_epi8(unpack_nibbles(w->qs), _mm256_set1_epi8(8));
}

/* q - 16: subtract 16 from every nibble whose fifth bit (a mask register here) is clear. */
static inline __m256i q5_0_values(const block_q5_0 *w) {
    uint32_t qh;
    memcpy(&qh, w->qh, sizeof qh);
    const __m256i nibbles = unpack_nibbles(w->qs);
    return _mm256_mask_sub_epi8(nibbles, (__mmask32)~qh, nibbles, _mm256_set1_epi8(16));
}

#define DEFINE_VEC_DOT_INT(name, block_t, values)                                                \
    static float name(int64_t n, const void *w_row, const void *act) {                           \
        const block_t *w = w_row;                                                                \
        const block_q8a *a = act;                                                                \
        const int64_t nb = n / 32;                                                               \
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();                           \
        int64_t b = 0;                                                                           \
        for (; b + 1 < nb; b += 2) {                                                             \
            const __m256 s0 = _mm256_set1_ps(_cvtsh_ss(w[b].d) * a[b].d);                        \
            const __m256 s1 = _mm256_set1_ps(_cvtsh_ss(w[b + 1].d) * a[b + 1].d);                \
            acc0 = _mm256_fmadd_ps(s0, dot_i8_vnni(values(&w[b]), load_act(&a[b])), acc0);       \
            acc1 = _mm256_fmadd_ps(s1, dot_i8_vnni(values(&w[b + 1]), load_act(&a[b + 1])), acc1); \
        }                                                                                        \
        if (b < nb) {                                                                            \
            const __m256 s0 = _mm256_set1_ps(_cvtsh_ss(w[b].d) * a[b].d);                        \
            acc0 = _mm256_fmadd_ps(s0, dot_i8_vnni(values(&w[b]), load_act(&a[b])), acc0);       \
        }                                                                                        \
        return hsum256_ps(_mm256_add_ps(acc0, acc1));                                            \
    }

DEFINE_VEC_DOT_INT(vec_dot_q8_0_avx512, block_q8_0, q8_0_values)
DEFINE_VEC_DOT_INT(vec_dot_q4_0_avx512, block_q4_0, q4_0_values)
DEFINE_VEC_DOT_INT(vec_dot_q5_0_avx512, block_q5_0, q5_0_values)

/* --- float types: 16 lanes x 4 accumulators, masked tail ---------------------------------- */

static inline __m512 load16_f32(const void *p, __mmask16 m) {
    return _mm512_maskz_loadu_ps(m, p);
}
static inline __m512 load16_f16(const void *p, __mmask16 m) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
static inline __m512 load16_bf16(const void *p, __mmask16 m) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

#define DEFINE_VEC_DOT_FLOAT(name, elem_t, load16)                                            \
    static float name(int64_t n, const void *w_row, const void *act) {                        \
        const elem_t *w = w_row;                                                              \
        const float *x = act;                                                                 \
        const __mmask16 all = 0xFFFF;                                                         \
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();                        \
        __m512 acc2 = _mm512_setzero_ps(), acc3 = _mm512_setzero_ps();                        \
        int64_t i = 0;                                                                        \
        for (; i + 64 <= n; i += 64) {                                                        \
            acc0 = _mm512_fmadd_ps(load16(w + i, all), _mm512_loadu_ps(x + i), acc0);         \
            acc1 = _mm512_fmadd_ps(load16(w + i + 16, all), _mm512_loadu_ps(x + i + 16), acc1); \
            acc2 = _mm512_fmadd_ps(load16(w + i + 32, all), _mm512_loadu_ps(x + i + 32), acc2); \
            acc3 = _mm512_fmadd_ps(load16(w + i + 48, all), _mm512_loadu_ps(x + i + 48), acc3); \
        }                                                                                     \
        for (; i < n; i += 16) {                                                              \
            const __mmask16 m = n - i >= 16 ? all : (__mmask16)((1u << (n - i)) - 1);         \
            acc0 = _mm512_fmadd_ps(load16(w + i, m), _mm512_maskz_loadu_ps(m, x + i), acc0);  \
        }                                                                                     \
        return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1),                  \
                                                  _mm512_add_ps(acc2, acc3)));                \
    }

DEFINE_VEC_DOT_FLOAT(vec_dot_f32_avx512, float, load16_f32)
DEFINE_VEC_DOT_FLOAT(vec_dot_f16_avx512, numoe_half, load16_f16)
DEFINE_VEC_DOT_FLOAT(vec_dot_bf16_avx512, numoe_bf16, load16_bf16)

/* --- activation quantizer: bit-identical to numoe_quantize_act_ref ----------------------- */

static void quantize_act_avx512(int64_t n, const float *x, block_q8a *dst) {
    for (int64_t b = 0; b < n / 32; b++) {
        const __m512 v0 = _mm512_loadu_ps(x + b * 32), v1 = _mm512_loadu_ps(x + b * 32 + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        const __m512 inv_scale = _mm512_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
        dst[b].d = amax / 127.0f;
        const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv_scale));
        const __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv_scale));
        dst[b].bsums[0] = (int16_t)_mm512_reduce_add_epi32(i0);
        dst[b].bsums[1] = (int16_t)_mm512_reduce_add_epi32(i1);
        _mm_storeu_si128((__m128i *)dst[b].qs, _mm512_cvtepi32_epi8(i0));
        _mm_storeu_si128((__m128i *)(dst[b].qs + 16), _mm512_cvtepi32_epi8(i1));
    }
}

#pragma GCC pop_options

void numoe_fill_table_avx512(numoe_kernel_table *t) {
    t->quantize_act = quantize_act_avx512;
    t->vec_dot[NUMOE_TYPE_F32] = vec_dot_f32_avx512;
    t->vec_dot[NUMOE_TYPE_F16] = vec_dot_f16_avx512;
    t->vec_dot[NUMOE_TYPE_BF16] = vec_dot_bf16_avx512;
    t->vec_dot[NUMOE_TYPE_Q8_0] = vec_dot_q8_0_avx512;
    t->vec_dot[NUMOE_TYPE_Q4_0] = vec_dot_q4_0_avx512;
    t->vec_dot[NUMOE_TYPE_Q5_0] = vec_dot_q5_0_avx512;
    numoe_fill_kquants_avx512(t);
}
