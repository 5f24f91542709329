/* AVX-512 prompt-path micro-kernel: MR weight rows x up to 64 tokens (4 zmm of 16 tokens).
 *
 * Per input element k: load the panel's 16-token vectors of x[:, k], broadcast w[r, k] for
 * each of the MR rows, and FMA into MR x NV accumulators that stay in registers for the
 * whole row. 4 rows x 4 vectors = 16 accumulators: enough independent FMA chains for two
 * FMA pipes of latency 4, with 8 loads (4 vector + 4 broadcast) per 16 FMAs.
 * Measured on this Zen 5 (bench/kernel_gemm.py, F32 [2048 x 2048] x 64 tokens, 1 thread;
 * a plain FMA loop peaks at 116 GFLOP/s here): 4x4 ran 100-105 GFLOP/s, 8x4 about the same,
 * 6x4 91; 4x4 divides the 16-row tiles with no waste, so it stays. k is cut into blocks of
 * KC = 128 so that a block of the packed panel (128 x 64 floats, 32 KiB) is reused from L1
 * by the 4 row groups of a tile: +0-5% over no blocking here (64: -20%, 256: alike), and it
 * keeps long rows (n_in 8192: a 2 MiB panel) from falling out of L2.
 * Rows past the end reuse the last valid row (computed, never stored), so any row count works
 * without padding the weights; tokens past the end are zero lanes of the packed panel. */
#include <immintrin.h>

#include "gemm.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")

enum { MR = 4, LANES = 16, MAX_NV = 4, MAX_GROUPS = 4, KC = 128 };

/* acc[MR][NV] over k in [k0, k1): starts from zero at k0 == 0, else from out[MR][MAX_NV * 16]
 * (the sums of the earlier k blocks), and is stored back there. */
#define DEFINE_MICRO(NV)                                                                     \
    static void micro_##NV(int64_t k0, int64_t k1, const float *const *w, const float *xp,    \
                           int64_t stride, float *out) {                                     \
        __m512 acc[MR][NV];                                                                  \
        _Pragma("GCC unroll 8") for (int i = 0; i < MR; i++)                                 \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[i][v] =                  \
                k0 == 0 ? _mm512_setzero_ps()                                                \
                        : _mm512_load_ps(out + (i * MAX_NV + v) * LANES);                    \
        for (int64_t k = k0; k < k1; k++) {                                                  \
            __m512 xv[NV];                                                                   \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) xv[v] =                      \
                _mm512_loadu_ps(xp + k * stride + LANES * v);                                \
            _Pragma("GCC unroll 8") for (int i = 0; i < MR; i++) {                           \
                const __m512 wb = _mm512_set1_ps(w[i][k]);                                   \
                _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[i][v] =              \
                    _mm512_fmadd_ps(wb, xv[v], acc[i][v]);                                   \
            }                                                                                \
        }                                                                                    \
        _Pragma("GCC unroll 8") for (int i = 0; i < MR; i++)                                 \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++)                             \
                _mm512_store_ps(out + (i * MAX_NV + v) * LANES, acc[i][v]);                  \
    }

DEFINE_MICRO(1)
DEFINE_MICRO(2)
DEFINE_MICRO(3)
DEFINE_MICRO(4)

static void tile_avx512(const float *w, int64_t ldw, int64_t n_rows, int64_t n_in,
                        const float *xp, int64_t n_tok, int64_t stride, float *y, int64_t ldy) {
    float out[MAX_GROUPS][MR * MAX_NV * LANES] __attribute__((aligned(64)));
    const int64_t nv = stride / LANES;
    for (int64_t g0 = 0; g0 < n_rows; g0 += MAX_GROUPS * MR) {
        const int64_t g1 = g0 + MAX_GROUPS * MR < n_rows ? g0 + MAX_GROUPS * MR : n_rows;
        for (int64_t k0 = 0; k0 < n_in; k0 += KC) {
            const int64_t k1 = k0 + KC < n_in ? k0 + KC : n_in;
            for (int64_t r0 = g0; r0 < g1; r0 += MR) {
                const float *rows[MR];
                for (int i = 0; i < MR; i++)
                    rows[i] = w + (r0 + i < n_rows ? r0 + i : n_rows - 1) * ldw;
                float *o = out[(r0 - g0) / MR];
                switch (nv) {
                case 1: micro_1(k0, k1, rows, xp, stride, o); break;
                case 2: micro_2(k0, k1, rows, xp, stride, o); break;
                case 3: micro_3(k0, k1, rows, xp, stride, o); break;
                default: micro_4(k0, k1, rows, xp, stride, o); break;
                }
            }
        }
        for (int64_t r0 = g0; r0 < g1; r0 += MR) {
            const float *o = out[(r0 - g0) / MR];
            const int64_t valid = n_rows - r0 < MR ? n_rows - r0 : MR;
            for (int64_t t = 0; t < n_tok; t++)
                for (int64_t i = 0; i < valid; i++) y[t * ldy + r0 + i] = o[i * MAX_NV * LANES + t];
        }
    }
}

#pragma GCC pop_options

const numoe_gemm_kernel numoe_gemm_avx512 = {.panel = MAX_NV * LANES, .lanes = LANES,
                                             .tile = tile_avx512};
