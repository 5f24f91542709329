/* AVX2 prompt-path micro-kernel: 4 weight rows x up to 24 tokens (3 ymm of 8 tokens).
 * 12 accumulators + 3 token vectors + 1 broadcast = the 16 ymm registers. Same scheme as
 * gemm_avx512.c (see there). */
#include <immintrin.h>

#include "gemm.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

enum { MR = 4, LANES = 8, MAX_NV = 3 };

/* acc[MR][NV] over all k, then stored to out[MR][NV * 16]. */
#define DEFINE_MICRO(NV)                                                                     \
    static void micro_##NV(int64_t n_in, const float *const *w, const float *xp,              \
                           int64_t stride, float *out) {                                     \
        __m256 acc[MR][NV];                                                                  \
        _Pragma("GCC unroll 4") for (int i = 0; i < MR; i++)                                 \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[i][v] =                  \
                _mm256_setzero_ps();                                                         \
        for (int64_t k = 0; k < n_in; k++) {                                                 \
            __m256 xv[NV];                                                                   \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) xv[v] =                      \
                _mm256_loadu_ps(xp + k * stride + LANES * v);                                \
            _Pragma("GCC unroll 4") for (int i = 0; i < MR; i++) {                           \
                const __m256 wb = _mm256_set1_ps(w[i][k]);                                   \
                _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[i][v] =              \
                    _mm256_fmadd_ps(wb, xv[v], acc[i][v]);                                   \
            }                                                                                \
        }                                                                                    \
        _Pragma("GCC unroll 4") for (int i = 0; i < MR; i++)                                 \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++)                             \
                _mm256_storeu_ps(out + (i * MAX_NV + v) * LANES, acc[i][v]);                 \
    }

DEFINE_MICRO(1)
DEFINE_MICRO(2)
DEFINE_MICRO(3)

static void tile_avx2(const float *w, int64_t ldw, int64_t n_rows, int64_t n_in,
                        const float *xp, int64_t n_tok, int64_t stride, float *y, int64_t ldy) {
    float out[MR * MAX_NV * LANES] __attribute__((aligned(32)));
    const int64_t nv = stride / LANES;
    for (int64_t r0 = 0; r0 < n_rows; r0 += MR) {
        const float *rows[MR];
        for (int i = 0; i < MR; i++)
            rows[i] = w + (r0 + i < n_rows ? r0 + i : n_rows - 1) * ldw;
        switch (nv) {
        case 1: micro_1(n_in, rows, xp, stride, out); break;
        case 2: micro_2(n_in, rows, xp, stride, out); break;
        default: micro_3(n_in, rows, xp, stride, out); break;
        }
        const int64_t valid = n_rows - r0 < MR ? n_rows - r0 : MR;
        for (int64_t t = 0; t < n_tok; t++)
            for (int64_t i = 0; i < valid; i++) y[t * ldy + r0 + i] = out[i * MAX_NV * LANES + t];
    }
}

#pragma GCC pop_options

const numoe_gemm_kernel numoe_gemm_avx2 = {.panel = MAX_NV * LANES, .lanes = LANES,
                                             .tile = tile_avx2};
