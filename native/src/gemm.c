/* Prompt-path GEMM: activation packing, the dequantize-a-tile-then-multiply driver, and the
 * scalar reference micro-kernel (the SIMD ones are in gemm_avx2.c and gemm_avx512.c). */
#include "gemm.h"
#include "numoe.h"

static inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

int64_t numoe_gemm_min_tokens(int type) {
    switch (type) {
    case NUMOE_TYPE_F32:
    case NUMOE_TYPE_F16:
    case NUMOE_TYPE_BF16: return 4;
    case NUMOE_TYPE_Q4_0:
    case NUMOE_TYPE_Q5_0: return 8;
    default: return 12;
    }
}

int64_t numoe_gemm_packed_floats(const numoe_gemm_kernel *k, int64_t n_tok, int64_t n_in) {
    return round_up(n_tok, k->lanes) * n_in;
}

void numoe_gemm_pack(const numoe_gemm_kernel *k, const float *x, int64_t ldx,
                     const int32_t *ids, int64_t n_tok, int64_t n_in, float *xp) {
    for (int64_t t0 = 0; t0 < n_tok; t0 += k->panel) {
        const int64_t count = n_tok - t0 < k->panel ? n_tok - t0 : k->panel;
        const int64_t stride = round_up(count, k->lanes);
        float *panel = xp + t0 * n_in;  /* earlier panels are full: panel * n_in floats each */
        for (int64_t c = 0; c < stride; c++) {
            if (c >= count) {
                for (int64_t i = 0; i < n_in; i++) panel[i * stride + c] = 0.0f;
                continue;
            }
            const int64_t t = t0 + c;
            const float *row = x + (ids != NULL ? (int64_t)ids[t] : t) * ldx;
            for (int64_t i = 0; i < n_in; i++) panel[i * stride + c] = row[i];
        }
    }
}

int64_t numoe_gemm_scratch_floats(int64_t n_in) { return NUMOE_GEMM_ROW_TILE * n_in; }

void numoe_gemm_rows(const numoe_gemm_kernel *k, numoe_dequant_fn dequant, int type,
                     const uint8_t *w, int64_t row_bytes, int64_t n_rows, int64_t n_in,
                     const float *xp, int64_t n_tok, float *y, int64_t ldy, float *scratch) {
    for (int64_t r0 = 0; r0 < n_rows; r0 += NUMOE_GEMM_ROW_TILE) {
        const int64_t rows = n_rows - r0 < NUMOE_GEMM_ROW_TILE ? n_rows - r0 : NUMOE_GEMM_ROW_TILE;
        const float *tile;
        if (type == NUMOE_TYPE_F32) {
            tile = (const float *)(w + r0 * row_bytes);  /* already float: no copy */
        } else {
            for (int64_t r = 0; r < rows; r++)
                dequant(n_in, w + (r0 + r) * row_bytes, scratch + r * n_in);
            tile = scratch;
        }
        for (int64_t t0 = 0; t0 < n_tok; t0 += k->panel) {
            const int64_t count = n_tok - t0 < k->panel ? n_tok - t0 : k->panel;
            k->tile(tile, n_in, rows, n_in, xp + t0 * n_in, count, round_up(count, k->lanes),
                    y + t0 * ldy + r0, ldy);
        }
    }
}

/* Scalar reference: one output at a time, summed in k order. */
static void tile_scalar(const float *w, int64_t ldw, int64_t n_rows, int64_t n_in,
                        const float *xp, int64_t n_tok, int64_t stride, float *y, int64_t ldy) {
    for (int64_t r = 0; r < n_rows; r++) {
        for (int64_t t = 0; t < n_tok; t++) {
            float sum = 0.0f;
            for (int64_t i = 0; i < n_in; i++) sum += w[r * ldw + i] * xp[i * stride + t];
            y[t * ldy + r] = sum;
        }
    }
}

const numoe_gemm_kernel numoe_gemm_scalar = {.panel = 8, .lanes = 1, .tile = tile_scalar};
