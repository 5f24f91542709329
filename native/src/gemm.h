/* numoe prompt path: float32 matrix-matrix products on dequantized weight tiles.
 *
 * Decode (one token) streams weights once, so it stays on the integer vec_dot kernels. A
 * prompt reuses every weight row for all its tokens: the row is dequantized to float32 once
 * (into a small per-thread scratch tile) and multiplied with every token in a
 * register-blocked micro-kernel, so the cost per weight is one dequantization plus
 * T fused multiply-adds at full SIMD width. Activations stay float32, which is also more
 * accurate than the 8-bit blocks of the decode path.
 *
 * Activations are packed once per call ("panels"): tokens are grouped `panel` at a time and
 * each group is stored transposed, k-major, [n_in][stride] with stride = the group's token
 * count rounded up to `lanes` (zero padded). One SIMD load then fetches one input element
 * of `lanes` tokens, and the micro-kernel broadcasts one weight against it.
 * Not part of the cffi cdef (see include/numoe.h). */
#ifndef NUMOE_GEMM_H
#define NUMOE_GEMM_H

#include <stdint.h>

#include "internal.h"

/* y[t * ldy + r] = sum_k w[r * ldw + k] * xp[k * stride + t], for r < n_rows, t < n_tok,
 * with xp one packed panel (n_tok <= panel, stride = n_tok rounded up to lanes). */
typedef void (*numoe_gemm_tile_fn)(const float *w, int64_t ldw, int64_t n_rows, int64_t n_in,
                                   const float *xp, int64_t n_tok, int64_t stride, float *y,
                                   int64_t ldy);

typedef struct {
    int64_t panel;              /* tokens per packed panel */
    int64_t lanes;              /* a panel's stride is a multiple of this */
    numoe_gemm_tile_fn tile;
} numoe_gemm_kernel;

extern const numoe_gemm_kernel numoe_gemm_scalar;
extern const numoe_gemm_kernel numoe_gemm_avx2;
extern const numoe_gemm_kernel numoe_gemm_avx512;

/* The micro-kernel of the ISA in use (dispatch.c). */
const numoe_gemm_kernel *numoe_active_gemm(void);

/* Tokens at and above which numoe_matmul (and numoe_moe, per expert) take the dequantize +
 * float GEMM path for weights of `type`. The micro-kernel computes whole 16-token vectors, so
 * below 16 tokens part of its work is padding, while the integer vec_dot path costs the same
 * per (row, token) at any count. Measured crossovers on Zen 5, 1 thread, [2048 x 2048]
 * (bench/kernel_gemm.py --tokens N): the VNNI vec_dot runs ~67 GFLOP/s for Q8_0 and the
 * K-quants, ~44 for Q4_0/Q5_0 and ~24 for the float types; the GEMM ~100 x T / 16 below 16
 * tokens (T = 8: 41-46, T = 16: 81-91). */
int64_t numoe_gemm_min_tokens(int type);

/* Rows of weights dequantized at a time into a thread's scratch (numoe_gemm_scratch_floats). */
enum { NUMOE_GEMM_ROW_TILE = 16 };

/* Floats of packed activations for n_tok tokens of n_in elements. */
int64_t numoe_gemm_packed_floats(const numoe_gemm_kernel *k, int64_t n_tok, int64_t n_in);

/* Packs tokens x[ids[i] * ldx ...] (ids NULL: token i) for i < n_tok into panels at xp. */
void numoe_gemm_pack(const numoe_gemm_kernel *k, const float *x, int64_t ldx,
                     const int32_t *ids, int64_t n_tok, int64_t n_in, float *xp);

/* Floats of per-thread scratch numoe_gemm_rows needs for rows of n_in elements. */
int64_t numoe_gemm_scratch_floats(int64_t n_in);

/* y[t * ldy + r] = sum_k W[r, k] x[t, k] for r < n_rows, t < n_tok, with W n_rows rows of
 * `type` (row_bytes each, starting at w) and x packed by numoe_gemm_pack. Dequantizes
 * NUMOE_GEMM_ROW_TILE rows at a time into `scratch` (F32 rows are used in place). */
void numoe_gemm_rows(const numoe_gemm_kernel *k, numoe_dequant_fn dequant, int type,
                     const uint8_t *w, int64_t row_bytes, int64_t n_rows, int64_t n_in,
                     const float *xp, int64_t n_tok, float *y, int64_t ldy, float *scratch);

#endif
