/* numoe native kernels: block layouts, the activation block, and the per-ISA kernel table.
 * Not part of the cffi cdef (see include/numoe.h). */
#ifndef NUMOE_INTERNAL_H
#define NUMOE_INTERNAL_H

#include <stdint.h>
#include <stddef.h>
#include <assert.h>

typedef uint16_t numoe_half;   /* IEEE binary16, bit pattern */
typedef uint16_t numoe_bf16;   /* bfloat16, bit pattern */

#define QK4_0 32
#define QK5_0 32
#define QK8_0 32
#define QK_K 256
#define K_SCALE_SIZE 12

/* GGUF block layouts, byte-identical to ggml's. */
typedef struct { numoe_half d; uint8_t qs[QK4_0 / 2]; } block_q4_0;
static_assert(sizeof(block_q4_0) == 18, "block_q4_0 size");
typedef struct { numoe_half d; uint8_t qh[4]; uint8_t qs[QK5_0 / 2]; } block_q5_0;
static_assert(sizeof(block_q5_0) == 22, "block_q5_0 size");
typedef struct { numoe_half d; int8_t qs[QK8_0]; } block_q8_0;
static_assert(sizeof(block_q8_0) == 34, "block_q8_0 size");
typedef struct { numoe_half d; numoe_half dmin; uint8_t scales[K_SCALE_SIZE]; uint8_t qs[QK_K / 2]; } block_q4_K;
static_assert(sizeof(block_q4_K) == 144, "block_q4_K size");
typedef struct { numoe_half d; numoe_half dmin; uint8_t scales[K_SCALE_SIZE]; uint8_t qh[QK_K / 8]; uint8_t qs[QK_K / 2]; } block_q5_K;
static_assert(sizeof(block_q5_K) == 176, "block_q5_K size");
typedef struct { uint8_t ql[QK_K / 2]; uint8_t qh[QK_K / 4]; int8_t scales[QK_K / 16]; numoe_half d; } block_q6_K;
static_assert(sizeof(block_q6_K) == 210, "block_q6_K size");

/* Activations for the integer paths: 32 values quantized symmetrically to int8,
 *   x[i] ~= d * qs[i],  bsums[j] = sum of qs[16j .. 16j+15].
 * The per-16 sums let K-quant kernels fold their offsets (Q4_K/Q5_K mins, Q6_K's -32)
 * into one multiply per sub-block instead of one per element. */
typedef struct { float d; int16_t bsums[2]; int8_t qs[32]; } block_q8a;
static_assert(sizeof(block_q8a) == 40, "block_q8a size");

/* One weight row against one activation row, n elements.
 * For integer types `act` points at n/32 block_q8a; for F32/F16/BF16 at n floats. */
typedef float (*numoe_vec_dot_fn)(int64_t n, const void *w_row, const void *act);
/* A tile of weight rows x tokens: y[t * ldy + r] = vec_dot(n, w + r * row_bytes, acts[t]),
 * bit for bit, for r < n_rows and t < n_tokens. An ISA provides one only for types whose
 * vec_dot it defines the same way (see qdot_avx512.c); callers without one loop over vec_dot. */
typedef void (*numoe_vec_dot_tile_fn)(int64_t n, const void *w, int64_t row_bytes,
                                      int64_t n_rows, const void *const *acts, int64_t n_tokens,
                                      float *y, int64_t ldy);
/* Dequantize one row of n elements. */
typedef void (*numoe_dequant_fn)(int64_t n, const void *src, float *dst);
/* Quantize n floats (n % 32 == 0) to n/32 block_q8a. */
typedef void (*numoe_quantize_act_fn)(int64_t n, const float *x, block_q8a *dst);

#define NUMOE_MAX_TYPE 31
typedef struct {
    numoe_vec_dot_fn vec_dot[NUMOE_MAX_TYPE];
    numoe_vec_dot_tile_fn vec_dot_tile[NUMOE_MAX_TYPE];  /* NULL: none; goes with vec_dot */
    numoe_dequant_fn dequant[NUMOE_MAX_TYPE];
    numoe_quantize_act_fn quantize_act;
} numoe_kernel_table;

/* Each ISA file fills the entries it implements; entries it leaves NULL fall back to the
 * next lower ISA (scalar reference last), so a table is always complete. */
void numoe_fill_table_scalar(numoe_kernel_table *t);
void numoe_fill_table_avx2(numoe_kernel_table *t);
void numoe_fill_table_avx512(numoe_kernel_table *t);

/* K-quant kernels (Q4_K, Q5_K, Q6_K) live in kquants_{ref,avx2,avx512}.c and register
 * themselves through these, called by the fill functions above. */
void numoe_fill_kquants_scalar(numoe_kernel_table *t);
void numoe_fill_kquants_avx2(numoe_kernel_table *t);
void numoe_fill_kquants_avx512(numoe_kernel_table *t);
/* Q8_0, Q4_0, Q5_0 vec_dot and their row x token tiles (qdot_avx512.c); the same for Q4_K
 * and Q6_K (ktile_avx512.c). */
void numoe_fill_qdot_avx512(numoe_kernel_table *t);
void numoe_fill_ktile_avx512(numoe_kernel_table *t);

/* fp16 <-> fp32 in plain C (scalar reference; SIMD files use F16C). */
float numoe_half_to_float(numoe_half h);
numoe_half numoe_float_to_half(float f);

/* Tokens [t0, t1) of a tile call: y[(t - t0) * ldy + r] = row r . activation of t, whose bytes
 * start at acts + (index ? index[t] : t) * act_bytes. Pointers go to the tile 64 at a time. */
static inline void numoe_tile_tokens(numoe_vec_dot_tile_fn tile_fn, int64_t n, const void *w,
                                     int64_t row_bytes, int64_t n_rows, const uint8_t *acts,
                                     int64_t act_bytes, const int32_t *index, int64_t t0,
                                     int64_t t1, float *y, int64_t ldy) {
    const void *ptrs[64];
    for (int64_t t = t0; t < t1; t += 64) {
        const int64_t count = t1 - t < 64 ? t1 - t : 64;
        for (int64_t i = 0; i < count; i++)
            ptrs[i] = acts + (index != NULL ? index[t + i] : t + i) * act_bytes;
        tile_fn(n, w, row_bytes, n_rows, ptrs, count, y + (t - t0) * ldy, ldy);
    }
}

/* --- runtime shared by the entry points (dispatch.c, types.c) ---------------------------- */
/* The kernel table of the ISA in use; always complete for the types that have a scalar
 * reference (lower-ISA entries fill the gaps). */
const numoe_kernel_table *numoe_active_table(void);
/* OpenMP threads every entry point uses (numoe_set_threads). */
int numoe_active_threads(void);
/* 1 if the type's vec_dot takes block_q8a activations, 0 if it takes f32 activations. */
int numoe_type_uses_q8a(int type);

#endif
