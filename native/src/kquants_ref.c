/* K-quant kernels (Q4_K, Q5_K, Q6_K), scalar reference.
 *
 * Plain C, written for clarity: the SIMD files are tested against these functions.
 *
 * Super-block layout (256 weights; see block_q*_K in internal.h):
 *   Q4_K / Q5_K: 8 sub-blocks of 32, each with a 6-bit scale sc and a 6-bit min m packed into
 *                12 bytes; w = d*sc*q - dmin*m with q in [0,15] (Q4_K) or [0,31] (Q5_K).
 *   Q6_K:        16 groups of 16, each with an int8 scale; w = d*sc*(q - 32), q in [0,63].
 *
 * Dequantization follows ggml's dequantize_row_q*_K operation by operation (same float32
 * products in the same order), so it equals gguf-py's `gguf.quants.dequantize` bit for bit.
 *
 * Dot products take activations as block_q8a (x ~= d_act * qs, per 32 values). A super-block
 * covers 8 activation blocks, and each Q4_K/Q5_K sub-block lines up with one of them, so
 *   sum_i w_i x_i = sum_j d_act[j] * (d*sc[j] * sum(q*qs) - dmin*m[j] * sum(qs)).
 * The mins (and Q6_K's -32) are folded through the activation block sums (bsums) instead of
 * being subtracted element by element.
 */
#include "internal.h"
#include "numoe.h"

/* The dequantizers must round exactly like ggml's mul-then-sub: never fuse into an FMA. */
#pragma GCC optimize("fp-contract=off")

/* Unpack the 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes:
 * bytes 0-3 hold sc[0..3] (low 6 bits) and the top 2 bits of sc[4..7]; bytes 4-7 likewise for
 * the mins; bytes 8-11 hold the low 4 bits of sc[4..7] (low nibble) and m[4..7] (high nibble). */
static void scale_min_k4(int j, const uint8_t *packed, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = packed[j] & 63;
        *m = packed[j + 4] & 63;
    } else {
        *sc = (packed[j + 4] & 0xF) | ((packed[j - 4] >> 6) << 4);
        *m = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4);
    }
}

/* ---- dequantize ------------------------------------------------------------------------- */

static void dequant_q4_K(int64_t n, const void *src, float *dst) {
    const block_q4_K *blocks = src;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const block_q4_K *b = &blocks[i];
        const float d = numoe_half_to_float(b->d);
        const float dmin = numoe_half_to_float(b->dmin);
        const uint8_t *q = b->qs;
        /* Each 32 bytes of qs hold two sub-blocks: low nibbles first, then high nibbles. */
        for (int j = 0; j < 8; j += 2) {
            uint8_t sc, m;
            scale_min_k4(j, b->scales, &sc, &m);
            const float d1 = d * sc, m1 = dmin * m;
            scale_min_k4(j + 1, b->scales, &sc, &m);
            const float d2 = d * sc, m2 = dmin * m;
            for (int l = 0; l < 32; l++) *dst++ = d1 * (q[l] & 0xF) - m1;
            for (int l = 0; l < 32; l++) *dst++ = d2 * (q[l] >> 4) - m2;
            q += 32;
        }
    }
}

static void dequant_q5_K(int64_t n, const void *src, float *dst) {
    const block_q5_K *blocks = src;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const block_q5_K *b = &blocks[i];
        const float d = numoe_half_to_float(b->d);
        const float dmin = numoe_half_to_float(b->dmin);
        const uint8_t *ql = b->qs;
        /* The fifth bit of sub-block j is bit j of qh[l], l = 0..31. */
        for (int j = 0; j < 8; j += 2) {
            uint8_t sc, m;
            scale_min_k4(j, b->scales, &sc, &m);
            const float d1 = d * sc, m1 = dmin * m;
            scale_min_k4(j + 1, b->scales, &sc, &m);
            const float d2 = d * sc, m2 = dmin * m;
            for (int l = 0; l < 32; l++) {
                const int q = (ql[l] & 0xF) | (((b->qh[l] >> j) & 1) << 4);
                *dst++ = d1 * q - m1;
            }
            for (int l = 0; l < 32; l++) {
                const int q = (ql[l] >> 4) | (((b->qh[l] >> (j + 1)) & 1) << 4);
                *dst++ = d2 * q - m2;
            }
            ql += 32;
        }
    }
}

/* Q6_K value k (0..255) of a super-block, as the unsigned 6-bit code (0..63).
 * Each 128-value half uses 64 bytes of ql and 32 of qh: value 32*r + l (r = 0..3, l = 0..31)
 * takes nibble r/2 of ql[l + 32*(r%2)] and bits 2r, 2r+1 of qh[l]. */
static int q6_code(const block_q6_K *b, int k) {
    const int half = k / 128, r = (k % 128) / 32, l = k % 32;
    const uint8_t low = b->ql[64 * half + l + 32 * (r % 2)];
    const uint8_t high = b->qh[32 * half + l];
    const int nibble = (r < 2) ? (low & 0xF) : (low >> 4);
    return nibble | (((high >> (2 * r)) & 3) << 4);
}

static void dequant_q6_K(int64_t n, const void *src, float *dst) {
    const block_q6_K *blocks = src;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const block_q6_K *b = &blocks[i];
        const float d = numoe_half_to_float(b->d);
        for (int k = 0; k < QK_K; k++) {
            /* ggml: d * sc * q, evaluated left to right in float32. */
            *dst++ = d * b->scales[k / 16] * (q6_code(b, k) - 32);
        }
    }
}

/* ---- dot products against block_q8a activations ---------------------------------------- */

static int32_t dot32_u8_s8(const uint8_t *q, const int8_t *a) {
    int32_t sum = 0;
    for (int l = 0; l < 32; l++) sum += q[l] * a[l];
    return sum;
}

static float vec_dot_q4_K(int64_t n, const void *w_row, const void *act) {
    const block_q4_K *blocks = w_row;
    const block_q8a *a = act;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++, a += 8) {
        const block_q4_K *b = &blocks[i];
        const float d = numoe_half_to_float(b->d);
        const float dmin = numoe_half_to_float(b->dmin);
        for (int j = 0; j < 8; j++) {
            uint8_t q[32], sc, m;
            for (int l = 0; l < 32; l++) {
                const uint8_t byte = b->qs[32 * (j / 2) + l];
                q[l] = (j % 2) ? (byte >> 4) : (byte & 0xF);
            }
            scale_min_k4(j, b->scales, &sc, &m);
            const int32_t qa = dot32_u8_s8(q, a[j].qs);
            const int32_t asum = a[j].bsums[0] + a[j].bsums[1];
            sum += a[j].d * (d * sc * qa - dmin * m * asum);
        }
    }
    return sum;
}

static float vec_dot_q5_K(int64_t n, const void *w_row, const void *act) {
    const block_q5_K *blocks = w_row;
    const block_q8a *a = act;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++, a += 8) {
        const block_q5_K *b = &blocks[i];
        const float d = numoe_half_to_float(b->d);
        const float dmin = numoe_half_to_float(b->dmin);
        for (int j = 0; j < 8; j++) {
            uint8_t q[32], sc, m;
            for (int l = 0; l < 32; l++) {
                const uint8_t byte = b->qs[32 * (j / 2) + l];
                const int nibble = (j % 2) ? (byte >> 4) : (byte & 0xF);
                q[l] = nibble | (((b->qh[l] >> j) & 1) << 4);
            }
            scale_min_k4(j, b->scales, &sc, &m);
            const int32_t qa = dot32_u8_s8(q, a[j].qs);
            const int32_t asum = a[j].bsums[0] + a[j].bsums[1];
            sum += a[j].d * (d * sc * qa - dmin * m * asum);
        }
    }
    return sum;
}

static float vec_dot_q6_K(int64_t n, const void *w_row, const void *act) {
    const block_q6_K *blocks = w_row;
    const block_q8a *a = act;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++, a += 8) {
        const block_q6_K *b = &blocks[i];
        const float d = numoe_half_to_float(b->d);
        for (int j = 0; j < 8; j++) {
            /* Activation block j spans scale groups 2j and 2j+1; -32 goes through bsums. */
            int32_t scaled = 0;
            for (int g = 0; g < 2; g++) {
                const int group = 2 * j + g;
                int32_t qa = 0;
                for (int l = 0; l < 16; l++) qa += q6_code(b, 16 * group + l) * a[j].qs[16 * g + l];
                scaled += b->scales[group] * (qa - 32 * a[j].bsums[g]);
            }
            sum += a[j].d * (d * scaled);
        }
    }
    return sum;
}

void numoe_fill_kquants_scalar(numoe_kernel_table *t) {
    t->dequant[NUMOE_TYPE_Q4_K] = dequant_q4_K;
    t->dequant[NUMOE_TYPE_Q5_K] = dequant_q5_K;
    t->dequant[NUMOE_TYPE_Q6_K] = dequant_q6_K;
    t->vec_dot[NUMOE_TYPE_Q4_K] = vec_dot_q4_K;
    t->vec_dot[NUMOE_TYPE_Q5_K] = vec_dot_q5_K;
    t->vec_dot[NUMOE_TYPE_Q6_K] = vec_dot_q6_K;
}
