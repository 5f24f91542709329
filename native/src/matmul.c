/* numoe_dequantize_rows and numoe_matmul: argument checks, activation quantization, and the
 * threaded loops over output rows.
 *
 * Decode (one token) streams the weight matrix once: a guided split gives each thread long
 * contiguous runs of rows, which the hardware prefetchers follow best, and still lets a
 * thread that runs ahead (the machine may be shared) take over the shrinking tail.
 * Prompt (n_tokens >= numoe_gemm_min_tokens(type), 4 to 12) is compute-bound: the
 * activations are packed once, and threads take tiles of NUMOE_GEMM_ROW_TILE weight rows,
 * dequantize each to float32 into their own scratch and multiply it with every token in the
 * float GEMM micro-kernel (gemm.h). A few tokens (2 up to that threshold) keep the vec_dot per
 * (row, token): rows are cut into tiles of ROWS_PER_TILE, and each tile is multiplied with a
 * tile of tokens whose activations fit in L2, so a weight row is read from memory once and
 * then from L1 for every token of the tile. Where the ISA has a row x token tile kernel for
 * the type (qdot_avx512.c), it replaces the per-pair loops, decode included: it reproduces
 * vec_dot bit for bit and unpacks each weight block once for all tokens. */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "gemm.h"
#include "internal.h"
#include "numoe.h"

enum {
    ROWS_PER_TILE = 16,
    TILE_GROUP_ROWS = 64,                 /* rows per tile call in a matrix-vector product */
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

/* n_threads: the team size for this product (1 inside numoe_matmul_batched's per-head team).
 * Threads only split output rows, so no result depends on it. */
static void matvec(const numoe_kernel_table *table, int type, const uint8_t *weight,
                   int64_t row_bytes, int64_t n_out, int64_t n_in, const void *act, float *y,
                   int n_threads) {
    const int parallel = n_threads > 1 && n_out * row_bytes >= MIN_PARALLEL_BYTES;
    const numoe_vec_dot_tile_fn tile_fn = table->vec_dot_tile[type];
    if (tile_fn != NULL) {  /* groups of rows that share one vector register per block */
        const int64_t n_groups = (n_out + TILE_GROUP_ROWS - 1) / TILE_GROUP_ROWS;
#pragma omp parallel for num_threads(n_threads) schedule(guided) if (parallel)
        for (int64_t g = 0; g < n_groups; g++) {
            const int64_t r0 = g * TILE_GROUP_ROWS;
            const int64_t rows = n_out - r0 < TILE_GROUP_ROWS ? n_out - r0 : TILE_GROUP_ROWS;
            tile_fn(n_in, weight + r0 * row_bytes, row_bytes, rows, &act, 1, y + r0, n_out);
        }
        return;
    }
    const numoe_vec_dot_fn dot = table->vec_dot[type];
#pragma omp parallel for num_threads(n_threads) schedule(guided) if (parallel)
    for (int64_t r = 0; r < n_out; r++) y[r] = dot(n_in, weight + r * row_bytes, act);
}

static void matmat(const numoe_kernel_table *table, int type, const uint8_t *weight,
                   int64_t row_bytes, int64_t n_out, int64_t n_in, const float *x,
                   int64_t n_tokens, block_q8a *x_q8a, float *y, int n_threads) {
    const numoe_vec_dot_fn dot = table->vec_dot[type];
    const numoe_vec_dot_tile_fn tile_fn = table->vec_dot_tile[type];
    const int64_t act_bytes = act_row_bytes(type, n_in);
    const uint8_t *act = x_q8a != NULL ? (const uint8_t *)x_q8a : (const uint8_t *)x;
    int64_t tokens_per_tile = ACT_TILE_BYTES / act_bytes;
    if (tokens_per_tile < 1) tokens_per_tile = 1;
    const int64_t n_row_tiles = (n_out + ROWS_PER_TILE - 1) / ROWS_PER_TILE;
    const int parallel = n_threads > 1 && n_out * row_bytes * n_tokens >= MIN_PARALLEL_BYTES;

#pragma omp parallel num_threads(n_threads) if (parallel)
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
                if (tile_fn != NULL) {
                    numoe_tile_tokens(tile_fn, n_in, weight + r0 * row_bytes, row_bytes, r1 - r0,
                                      act, act_bytes, NULL, t0, t1, y + t0 * n_out + r0, n_out);
                    continue;
                }
                for (int64_t r = r0; r < r1; r++) {
                    const uint8_t *w_row = weight + r * row_bytes;
                    for (int64_t t = t0; t < t1; t++)
                        y[t * n_out + r] = dot(n_in, w_row, act + t * act_bytes);
                }
            }
        }
    }
}

static void *alloc_floats(int64_t n) {
    const size_t bytes = ((size_t)n * sizeof(float) + 63) / 64 * 64;  /* aligned_alloc rule */
    return aligned_alloc(64, bytes > 0 ? bytes : 64);
}

/* Prompt path (see the top of the file). Returns NUMOE_EBADSHAPE if scratch is too large. */
static int matmat_gemm(const numoe_kernel_table *table, int type, const uint8_t *weight,
                       int64_t row_bytes, int64_t n_out, int64_t n_in, const float *x,
                       int64_t n_tokens, float *y, int n_threads) {
    const numoe_gemm_kernel *kernel = numoe_active_gemm();
    const int64_t scratch_floats = numoe_gemm_scratch_floats(n_in);
    float *xp = alloc_floats(numoe_gemm_packed_floats(kernel, n_tokens, n_in));
    float *scratch = alloc_floats(n_threads * scratch_floats);
    if (xp == NULL || scratch == NULL) {
        free(xp);
        free(scratch);
        return NUMOE_EBADSHAPE;
    }
    numoe_gemm_pack(kernel, x, n_in, NULL, n_tokens, n_in, xp);
    const int64_t n_tiles = (n_out + NUMOE_GEMM_ROW_TILE - 1) / NUMOE_GEMM_ROW_TILE;
    const int parallel = n_threads > 1 && n_tiles > 1 && (double)n_out * n_in * n_tokens >= MIN_PARALLEL_BYTES;
#pragma omp parallel num_threads(n_threads) if (parallel)
    {
        float *mine = scratch + omp_get_thread_num() * scratch_floats;
        /* Dynamic: the machine is shared, and a late thread should not hold the others. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t tile = 0; tile < n_tiles; tile++) {
            const int64_t r0 = tile * NUMOE_GEMM_ROW_TILE;
            const int64_t rows = n_out - r0 < NUMOE_GEMM_ROW_TILE ? n_out - r0 : NUMOE_GEMM_ROW_TILE;
            numoe_gemm_rows(kernel, table->dequant[type], type, weight + r0 * row_bytes,
                            row_bytes, rows, n_in, xp, n_tokens, y + r0, n_out, mine);
        }
    }
    free(xp);
    free(scratch);
    return NUMOE_OK;
}

/* The argument checks every product shares; *row_bytes on success. */
static int check_product(int type, const void *weight, int64_t n_out, int64_t n_in,
                         const float *x, const float *y, int64_t *row_bytes) {
    if (check_type(type) != NUMOE_OK) return NUMOE_EBADTYPE;
    if (numoe_active_table()->vec_dot[type] == NULL) return NUMOE_EBADTYPE;
    if (weight == NULL || x == NULL || y == NULL) return NUMOE_EBADARG;
    *row_bytes = numoe_row_bytes(type, n_in);
    if (*row_bytes < 0) return (int)*row_bytes;
    if (n_out <= 0 || n_out > INT64_MAX / *row_bytes) return NUMOE_EBADSHAPE;
    return NUMOE_OK;
}

/* allow_gemm == 0: every row takes the vec_dot path, so each row's result is what it would
 * be alone (numoe_matmul_rows). */
static int check_tokens(int64_t n_tokens, int64_t n_out, int64_t n_in) {
    if (n_tokens < 0 || n_tokens > INT64_MAX / n_out || n_tokens > INT64_MAX / n_in)
        return NUMOE_EBADSHAPE;
    return NUMOE_OK;
}

/* The product on checked arguments (check_product, check_tokens, n_tokens > 0). */
static int matmul_checked(const numoe_kernel_table *table, int type, const uint8_t *weight,
                          int64_t row_bytes, int64_t n_out, int64_t n_in, const float *x,
                          int64_t n_tokens, float *y, int allow_gemm, int n_threads) {
    if (allow_gemm && n_tokens >= numoe_gemm_min_tokens(type) && table->dequant[type] != NULL)
        return matmat_gemm(table, type, weight, row_bytes, n_out, n_in, x, n_tokens, y,
                           n_threads);

    block_q8a *x_q8a = NULL;
    if (numoe_type_uses_q8a(type)) {
        x_q8a = malloc((size_t)(n_tokens * (n_in / 32)) * sizeof(block_q8a));
        if (x_q8a == NULL) return NUMOE_EBADSHAPE;  /* too large to allocate */
    }
    if (n_tokens == 1) {
        if (x_q8a != NULL) table->quantize_act(n_in, x, x_q8a);
        matvec(table, type, weight, row_bytes, n_out, n_in,
               x_q8a != NULL ? (const void *)x_q8a : (const void *)x, y, n_threads);
    } else {
        matmat(table, type, weight, row_bytes, n_out, n_in, x, n_tokens, x_q8a, y, n_threads);
    }
    free(x_q8a);
    return NUMOE_OK;
}

static int matmul(int type, const void *weight, int64_t n_out, int64_t n_in, const float *x,
                  int64_t n_tokens, float *y, int allow_gemm) {
    int64_t row_bytes;
    int status = check_product(type, weight, n_out, n_in, x, y, &row_bytes);
    if (status == NUMOE_OK) status = check_tokens(n_tokens, n_out, n_in);
    if (status != NUMOE_OK || n_tokens == 0) return status;
    return matmul_checked(numoe_active_table(), type, weight, row_bytes, n_out, n_in, x,
                          n_tokens, y, allow_gemm, numoe_active_threads());
}

int numoe_matmul(int type, const void *weight, int64_t n_out, int64_t n_in, const float *x,
                 int64_t n_tokens, float *y) {
    return matmul(type, weight, n_out, n_in, x, n_tokens, y, 1);
}

int numoe_matmul_rows(int type, const void *weight, int64_t n_out, int64_t n_in,
                      const float *x, int64_t n_tokens, float *y) {
    return matmul(type, weight, n_out, n_in, x, n_tokens, y, 0);
}

int numoe_vec_dot_rows(int type, const void *weight, int64_t n_out, int64_t n_in,
                       const float *x, float *y) {
    int64_t row_bytes;
    const int status = check_product(type, weight, n_out, n_in, x, y, &row_bytes);
    if (status != NUMOE_OK) return status;
    const numoe_kernel_table *table = numoe_active_table();
    const void *act = x;
    block_q8a *x_q8a = NULL;
    if (numoe_type_uses_q8a(type)) {
        x_q8a = malloc((size_t)(n_in / 32) * sizeof(block_q8a));
        if (x_q8a == NULL) return NUMOE_EBADSHAPE;
        table->quantize_act(n_in, x, x_q8a);
        act = x_q8a;
    }
    const uint8_t *rows = weight;
    for (int64_t r = 0; r < n_out; r++) y[r] = table->vec_dot[type](n_in, rows + r * row_bytes, act);
    free(x_q8a);
    return NUMOE_OK;
}

/* Per-head products (MLA's attn_k_b / attn_v_b): y[t, b] = W_b @ x[t, b] for a stack of
 * n_batch matrices. Each head's x[:, b] is gathered into contiguous rows and run through the
 * same product numoe_matmul (_rows) would run on it alone, so every head's result is that
 * call's, bit for bit. The heads are small (e.g. 512 x 128): with enough of them, one team
 * splits the heads and each head's product runs on one thread, instead of a fork/join per
 * head. Neither split changes a result (threads only ever divide output rows). */
static int matmul_batched_heads(const numoe_kernel_table *table, int type, const uint8_t *weight,
                                int64_t row_bytes, int64_t n_batch, int64_t n_out, int64_t n_in,
                                const float *x, int64_t n_tokens, float *y, int allow_gemm,
                                int n_threads, int heads_parallel) {
    const int64_t matrix_bytes = n_out * row_bytes;
    int status = NUMOE_OK;
#pragma omp parallel num_threads(n_threads) if (heads_parallel)
    {
        /* This thread's head rows: x_b [T, n_in] and y_b [T, n_out]. */
        float *x_b = malloc((size_t)(n_tokens * (n_in + n_out)) * sizeof(float));
        float *y_b = x_b != NULL ? x_b + n_tokens * n_in : NULL;
        if (x_b == NULL) {
#pragma omp atomic write
            status = NUMOE_EBADSHAPE;
        }
        /* Dynamic: the machine is shared, and a late thread should not hold the others. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < n_batch; b++) {
            if (x_b == NULL) continue;
            for (int64_t t = 0; t < n_tokens; t++) {
                const float *from = x + (t * n_batch + b) * n_in;
                for (int64_t i = 0; i < n_in; i++) x_b[t * n_in + i] = from[i];
            }
            const int head_status =
                matmul_checked(table, type, weight + b * matrix_bytes, row_bytes, n_out, n_in,
                               x_b, n_tokens, y_b, allow_gemm, heads_parallel ? 1 : n_threads);
            if (head_status != NUMOE_OK) {
#pragma omp atomic write
                status = head_status;
                continue;
            }
            for (int64_t t = 0; t < n_tokens; t++) {
                float *to = y + (t * n_batch + b) * n_out;
                for (int64_t o = 0; o < n_out; o++) to[o] = y_b[t * n_out + o];
            }
        }
        free(x_b);
    }
    return status;
}

int numoe_matmul_batched(int type, const void *weight, int64_t n_batch, int64_t n_out,
                         int64_t n_in, const float *x, int64_t n_tokens, float *y,
                         int rows_alone) {
    int64_t row_bytes;
    int status = check_product(type, weight, n_out, n_in, x, y, &row_bytes);
    if (status == NUMOE_OK) status = check_tokens(n_tokens, n_out, n_in);
    if (status != NUMOE_OK) return status;
    if (n_batch <= 0 || n_batch > INT64_MAX / (n_out * row_bytes) ||
        (n_tokens > 0 && n_batch > INT64_MAX / n_tokens / (n_in > n_out ? n_in : n_out)))
        return NUMOE_EBADSHAPE;
    if (n_tokens == 0) return NUMOE_OK;
    const int n_threads = numoe_active_threads();
    /* Split heads when every thread gets at least one and the whole is worth a fork. */
    const int heads_parallel = n_threads > 1 && n_batch >= n_threads &&
        (double)n_batch * n_out * row_bytes * n_tokens >= MIN_PARALLEL_BYTES;
    return matmul_batched_heads(numoe_active_table(), type, weight, row_bytes, n_batch, n_out,
                                n_in, x, n_tokens, y, !rows_alone, n_threads, heads_parallel);
}
