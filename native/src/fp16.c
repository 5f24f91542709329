/* fp16 <-> fp32 conversion in portable C, bit-exact with IEEE binary16 (and with F16C).
 * Same construction as ggml's (after FP16 by Maratos Dukhan): float arithmetic does the
 * rounding, so no branches on the hot path apart from the denormal select. */
#include <string.h>

#include "internal.h"

static inline float float_from_bits(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint32_t bits_from_float(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return bits;
}

float numoe_half_to_float(numoe_half h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & UINT32_C(0x80000000);
    const uint32_t two_w = w + w;

    /* Normal numbers: move exponent and mantissa into place, then rescale the exponent. */
    const uint32_t exp_offset = UINT32_C(0xE0) << 23;
    const float normalized = float_from_bits((two_w >> 4) + exp_offset) * 0x1.0p-112f;
    /* Denormals: build 0.5 + m * 2^-24 exactly and subtract 0.5. */
    const uint32_t magic_mask = UINT32_C(126) << 23;
    const float denormalized = float_from_bits((two_w >> 17) | magic_mask) - 0.5f;

    const uint32_t denormal_cutoff = UINT32_C(1) << 27;
    const uint32_t result = sign | (two_w < denormal_cutoff ? bits_from_float(denormalized)
                                                            : bits_from_float(normalized));
    return float_from_bits(result);
}

numoe_half numoe_float_to_half(float f) {
    const float scale_to_inf = 0x1.0p+112f;
    const float scale_to_zero = 0x1.0p-110f;
    float base = ((f < 0 ? -f : f) * scale_to_inf) * scale_to_zero;

    const uint32_t w = bits_from_float(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & UINT32_C(0x80000000);
    uint32_t bias = shl1_w & UINT32_C(0xFF000000);
    if (bias < UINT32_C(0x71000000)) bias = UINT32_C(0x71000000);

    /* Adding a power of two aligned to the target exponent rounds to nearest-even. */
    base = float_from_bits((bias >> 1) + UINT32_C(0x07800000)) + base;
    const uint32_t bits = bits_from_float(base);
    const uint32_t exp_bits = (bits >> 13) & UINT32_C(0x00007C00);
    const uint32_t mantissa_bits = bits & UINT32_C(0x00000FFF);
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return (numoe_half)((sign >> 16) | (shl1_w > UINT32_C(0xFF000000) ? UINT16_C(0x7E00) : nonsign));
}
