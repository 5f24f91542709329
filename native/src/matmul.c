/* numoe_dequantize_rows and numoe_matmul: argument checks, activation quantization, and the
 * threaded loops over output rows. The per-row work is the dispatch table's vec_dot.
 *
 * Decode (one token) streams the weight matrix once: a guided split gives each thread long
 * contiguous runs of rows, which the hardware prefetchers follow best, and still lets a
 * thread that runs ahead (the machine may be shared) take over the shrinking tail.
 * Prompt (many tokens) reuses weights: rows are cut into tiles of ROWS_PER_TILE, and each
 * tile is multiplied with a tile of tokens whose activations fit in L2, so a weight row is
 * read from memory once and then from L1 for every token of the tile. */
#include <stdint.h>
#include <stdlib.h>

#include "internal.h"
#include "numoe.h"

enum {
    ROWS_PER_TILE = 16,
    ACT_TILE_BYTES = 192 * 1024,          /* activations of one token tile, kept in L2 */
    MIN_PARALLEL_BYTES = 128 * 1024       /* below this a fork/join costs more than it saves */
};

static int check_type(int type) {
    if (type < 0 || type >= NUMOE_MAX_TYPE || numoe_block_size(type) <= 0) return NUMOE_EBADTYPE;
    return NUMOE_OK;
}

int numoe_dequantize_rows(int type, const void *src, float *dst, int64_t n_rows, int64_t n) {
    if (check_type(type) != NUMOE_OK) return NUMOE_EBADTYPE;
    const numoe_dequant_fn dequant = numoe_active_table()->dequant[type];
    if (dequant == NULL) return NUMOE_EBADTYPE;
    if (src == NULL || dst == NULL) return NUMOE_EBADARG;
    const int64_t row_bytes = numoe_row_bytes(type, n);
    if (row_bytes < 0) return (int)row_bytes;
    if (n_rows < 0 || (n_rows > 0 && n_rows > INT64_MAX / row_bytes)) return NUMOE_EBADSHAPE;

    const uint8_t *rows = src;
    const int parallel = n_rows > 1 && n_rows * row_bytes >= MIN_PARALLEL_BYTES;
#pragma omp parallel for num_threads(numoe_active_threads()) schedule(static) if (parallel)
    for (int64_t r = 0; r < n_rows; r++) dequant(n, rows + r * row_bytes, dst + r * n);
    return NUMOE_OK;
}

/* Bytes of one token's activations as vec_dot reads them. */
static int64_t act_row_bytes(int type, int64_t n_in) {
    return numoe_type_uses_q8a(type) ? n_in / 32 * (int64_t)sizeof(block_q8a)
                                     : n_in * (int64_t)sizeof(float);
}

static void matvec(numoe_vec_dot_fn dot, const uint8_t *weight, int64_t row_bytes, int64_t n_out,
                   int64_t n_in, const void *act, float *y) {
    const int parallel = n_out * row_bytes >= MIN_PARALLEL_BYTES;
#pragma omp parallel for num_threads(numoe_active_threads()) schedule(guided) if (parallel)
    for (int64_t r = 0; r < n_out; r++) y[r] = dot(n_in, weight + r * row_bytes, act);
}

static void matmat(const numoe_kernel_table *table, int type, const uint8_t *weight,
                   int64_t row_bytes, int64_t n_out, int64_t n_in, const float *x,
                   int64_t n_tokens, block_q8a *x_q8a, float *y) {
    const numoe_vec_dot_fn dot = table->vec_dot[type];
    const int64_t act_bytes = act_row_bytes(type, n_in);
    const uint8_t *act = x_q8a != NULL ? (const uint8_t *)x_q8a : (const uint8_t *)x;
    int64_t tokens_per_tile = ACT_TILE_BYTES / act_bytes;
    if (tokens_per_tile < 1) tokens_per_tile = 1;
    const int64_t n_row_tiles = (n_out + ROWS_PER_TILE - 1) / ROWS_PER_TILE;
    const int parallel = n_out * row_bytes * n_tokens >= MIN_PARALLEL_BYTES;

#pragma omp parallel num_threads(numoe_active_threads()) if (parallel)
    {
        if (x_q8a != NULL) {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < n_tokens; t++)
                table->quantize_act(n_in, x + t * n_in, x_q8a + t * (n_in / 32));
        }
        /* Dynamic: the machine is shared, and a late thread should not hold the others. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t tile = 0; tile < n_row_tiles; tile++) {
            const int64_t r0 = tile * ROWS_PER_TILE;
            const int64_t r1 = r0 + ROWS_PER_TILE < n_out ? r0 + ROWS_PER_TILE : n_out;
            for (int64_t t0 = 0; t0 < n_tokens; t0 += tokens_per_tile) {
                const int64_t t1 = t0 + tokens_per_tile < n_tokens ? t0 + tokens_per_tile : n_tokens;
                for (int64_t r = r0; r < r1; r++) {
                    const uint8_t *w_row = weight + r * row_bytes;
                    for (int64_t t = t0; t < t1; t++)
                        y[t * n_out + r] = dot(n_in, w_row, act + t * act_bytes);
                }
            }
        }
    }
}

int numoe_matmul(int type, const void *weight, int64_t n_out, int64_t n_in, const float *x,
                 int64_t n_tokens, float *y) {
    if (check_type(type) != NUMOE_OK) return NUMOE_EBADTYPE;
    const numoe_kernel_table *table = numoe_active_table();
    if (table->vec_dot[type] == NULL) return NUMOE_EBADTYPE;
    if (weight == NULL || x == NULL || y == NULL) return NUMOE_EBADARG;
    const int64_t row_bytes = numoe_row_bytes(type, n_in);
    if (row_bytes < 0) return (int)row_bytes;
    if (n_out <= 0 || n_tokens < 0 || n_out > INT64_MAX / row_bytes) return NUMOE_EBADSHAPE;
    if (n_tokens == 0) return NUMOE_OK;
    if (n_tokens > INT64_MAX / n_out || n_tokens > INT64_MAX / n_in) return NUMOE_EBADSHAPE;

    block_q8a *x_q8a = NULL;
    if (numoe_type_uses_q8a(type)) {
        x_q8a = malloc((size_t)(n_tokens * (n_in / 32)) * sizeof(block_q8a));
        if (x_q8a == NULL) return NUMOE_EBADSHAPE;  /* too large to allocate */
    }
    if (n_tokens == 1) {
        if (x_q8a != NULL) table->quantize_act(n_in, x, x_q8a);
        matvec(table->vec_dot[type], weight, row_bytes, n_out, n_in,
               x_q8a != NULL ? (const void *)x_q8a : (const void *)x, y);
    } else {
        matmat(table, type, weight, row_bytes, n_out, n_in, x, n_tokens, x_q8a, y);
    }
    free(x_q8a);
    return NUMOE_OK;
}
