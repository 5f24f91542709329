/* AVX-512 (F/BW/VL) kernels: vec_dot for F32, F16, BF16 and the activation quantizer
 * (the integer block types are in qdot_avx512.c, K-quants in kquants_avx512.c). Compiled with
 * the ISA enabled for this file only; dispatch.c calls numoe_fill_table_avx512 only on CPUs
 * that have it. The float types use 512-bit FMAs with masked tails. */
/* Included before any target pragma: intrinsics defined inside one would carry that
 * target, and a function with another target could not inline them. */
#include <immintrin.h>
#include <string.h>

#include "internal.h"
#include "numoe.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")

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
    numoe_fill_qdot_avx512(t);
    numoe_fill_kquants_avx512(t);
    numoe_fill_ktile_avx512(t);
}
