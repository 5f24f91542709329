/* Scalar reference kernels (`*_ref`) for F32, F16, BF16, Q8_0, Q4_0, Q5_0 and the activation
 * quantizer. Plain C, written for clarity: SIMD versions are tested against these, and these
 * against gguf-py. */
#include <math.h>
#include <string.h>

#include "internal.h"
#include "numoe.h"

static inline float bf16_to_float(numoe_bf16 h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* --- activations ------------------------------------------------------------------------ */

/* d = amax / 127 and q = round(x * 127 / amax), ties to even (as the SIMD converts do, so
 * every ISA produces bit-identical blocks). */
static void quantize_act_ref(int64_t n, const float *x, block_q8a *dst) {
    for (int64_t b = 0; b < n / 32; b++) {
        const float *xb = x + b * 32;
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float inv_scale = amax != 0.0f ? 127.0f / amax : 0.0f;
        dst[b].d = amax / 127.0f;
        int sum[2] = {0, 0};
        for (int j = 0; j < 32; j++) {
            const int q = (int)nearbyintf(xb[j] * inv_scale);
            dst[b].qs[j] = (int8_t)q;
            sum[j / 16] += q;
        }
        dst[b].bsums[0] = (int16_t)sum[0];
        dst[b].bsums[1] = (int16_t)sum[1];
    }
}

/* --- dequantize ---------------------------------------------------------------------------- */

static void dequant_f32_ref(int64_t n, const void *src, float *dst) {
    memcpy(dst, src, (size_t)n * sizeof(float));
}

static void dequant_f16_ref(int64_t n, const void *src, float *dst) {
    const numoe_half *h = src;
    for (int64_t i = 0; i < n; i++) dst[i] = numoe_half_to_float(h[i]);
}

static void dequant_bf16_ref(int64_t n, const void *src, float *dst) {
    const numoe_bf16 *h = src;
    for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_float(h[i]);
}

static void dequant_q8_0_ref(int64_t n, const void *src, float *dst) {
    const block_q8_0 *blocks = src;
    for (int64_t b = 0; b < n / QK8_0; b++) {
        const float d = numoe_half_to_float(blocks[b].d);
        for (int j = 0; j < QK8_0; j++) dst[b * QK8_0 + j] = (float)blocks[b].qs[j] * d;
    }
}

/* Q4_0: element j in the low nibble of qs[j], element j+16 in the high nibble; value q - 8. */
static void dequant_q4_0_ref(int64_t n, const void *src, float *dst) {
    const block_q4_0 *blocks = src;
    for (int64_t b = 0; b < n / QK4_0; b++) {
        const float d = numoe_half_to_float(blocks[b].d);
        float *out = dst + b * QK4_0;
        for (int j = 0; j < QK4_0 / 2; j++) {
            out[j] = (float)((blocks[b].qs[j] & 0x0F) - 8) * d;
            out[j + QK4_0 / 2] = (float)((blocks[b].qs[j] >> 4) - 8) * d;
        }
    }
}

/* Q5_0: as Q4_0, with bit j of the little-endian qh word as the fifth bit; value q - 16. */
static inline uint32_t q5_high_bits(const block_q5_0 *block) {
    return (uint32_t)block->qh[0] | (uint32_t)block->qh[1] << 8 | (uint32_t)block->qh[2] << 16 |
           (uint32_t)block->qh[3] << 24;
}

static void dequant_q5_0_ref(int64_t n, const void *src, float *dst) {
    const block_q5_0 *blocks = src;
    for (int64_t b = 0; b < n / QK5_0; b++) {
        const float d = numoe_half_to_float(blocks[b].d);
        const uint32_t qh = q5_high_bits(&blocks[b]);
        float *out = dst + b * QK5_0;
        for (int j = 0; j < QK5_0 / 2; j++) {
            const int lo = (blocks[b].qs[j] & 0x0F) | (int)((qh >> j) & 1) << 4;
            const int hi = (blocks[b].qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
            out[j] = (float)(lo - 16) * d;
            out[j + QK5_0 / 2] = (float)(hi - 16) * d;
        }
    }
}

/* --- dot products: float types against f32 activations ------------------------------------ */

static float vec_dot_f32_ref(int64_t n, const void *w_row, const void *act) {
    const float *w = w_row, *x = act;
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) sum += w[i] * x[i];
    return sum;
}

static float vec_dot_f16_ref(int64_t n, const void *w_row, const void *act) {
    const numoe_half *w = w_row;
    const float *x = act;
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) sum += numoe_half_to_float(w[i]) * x[i];
    return sum;
}

static float vec_dot_bf16_ref(int64_t n, const void *w_row, const void *act) {
    const numoe_bf16 *w = w_row;
    const float *x = act;
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) sum += bf16_to_float(w[i]) * x[i];
    return sum;
}

/* --- dot products: integer types against block_q8a activations ---------------------------- */
/* Per block: exact integer dot of the quants, then one float multiply by both scales. */

static float vec_dot_q8_0_ref(int64_t n, const void *w_row, const void *act) {
    const block_q8_0 *w = w_row;
    const block_q8a *a = act;
    float sum = 0.0f;
    for (int64_t b = 0; b < n / QK8_0; b++) {
        int32_t isum = 0;
        for (int j = 0; j < QK8_0; j++) isum += (int32_t)w[b].qs[j] * a[b].qs[j];
        sum += numoe_half_to_float(w[b].d) * a[b].d * (float)isum;
    }
    return sum;
}

static float vec_dot_q4_0_ref(int64_t n, const void *w_row, const void *act) {
    const block_q4_0 *w = w_row;
    const block_q8a *a = act;
    float sum = 0.0f;
    for (int64_t b = 0; b < n / QK4_0; b++) {
        int32_t isum = 0;
        for (int j = 0; j < QK4_0 / 2; j++) {
            isum += ((w[b].qs[j] & 0x0F) - 8) * a[b].qs[j];
            isum += ((w[b].qs[j] >> 4) - 8) * a[b].qs[j + QK4_0 / 2];
        }
        sum += numoe_half_to_float(w[b].d) * a[b].d * (float)isum;
    }
    return sum;
}

static float vec_dot_q5_0_ref(int64_t n, const void *w_row, const void *act) {
    const block_q5_0 *w = w_row;
    const block_q8a *a = act;
    float sum = 0.0f;
    for (int64_t b = 0; b < n / QK5_0; b++) {
        const uint32_t qh = q5_high_bits(&w[b]);
        int32_t isum = 0;
        for (int j = 0; j < QK5_0 / 2; j++) {
            const int lo = (w[b].qs[j] & 0x0F) | (int)((qh >> j) & 1) << 4;
            const int hi = (w[b].qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
            isum += (lo - 16) * a[b].qs[j] + (hi - 16) * a[b].qs[j + QK5_0 / 2];
        }
        sum += numoe_half_to_float(w[b].d) * a[b].d * (float)isum;
    }
    return sum;
}

void numoe_fill_table_scalar(numoe_kernel_table *t) {
    t->quantize_act = quantize_act_ref;
    t->dequant[NUMOE_TYPE_F32] = dequant_f32_ref;
    t->dequant[NUMOE_TYPE_F16] = dequant_f16_ref;
    t->dequant[NUMOE_TYPE_BF16] = dequant_bf16_ref;
    t->dequant[NUMOE_TYPE_Q8_0] = dequant_q8_0_ref;
    t->dequant[NUMOE_TYPE_Q4_0] = dequant_q4_0_ref;
    t->dequant[NUMOE_TYPE_Q5_0] = dequant_q5_0_ref;
    t->vec_dot[NUMOE_TYPE_F32] = vec_dot_f32_ref;
    t->vec_dot[NUMOE_TYPE_F16] = vec_dot_f16_ref;
    t->vec_dot[NUMOE_TYPE_BF16] = vec_dot_bf16_ref;
    t->vec_dot[NUMOE_TYPE_Q8_0] = vec_dot_q8_0_ref;
    t->vec_dot[NUMOE_TYPE_Q4_0] = vec_dot_q4_0_ref;
    t->vec_dot[NUMOE_TYPE_Q5_0] = vec_dot_q5_0_ref;
    numoe_fill_kquants_scalar(t);
}
