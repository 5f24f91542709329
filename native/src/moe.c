/* numoe_moe: one routed-expert FFN block for a whole layer in one call.
 *
 *   1. group the (token, slot) pairs by expert (counting sort: stable, so deterministic);
 *   2. gate/up: for every used expert, its n_ff rows against its tokens' activations,
 *      hidden[p] = act(gate . x) * (up . x);
 *   3. quantize the hidden rows (if the down type takes block_q8a);
 *   4. down: for a range of y's rows, those rows of every used expert against its pairs'
 *      hidden rows, then
 *   5. y[t] = sum_k w[t,k] * out[pair(t,k)] for the same rows, k ascending.
 * A negative expert id means "skip this (token, slot)": it adds nothing to y[t]. An
 * expert-parallel worker holding experts [e0, e1) passes ids e - e0 for those and -1 for the
 * others, so one call computes its share of the block.
 * Threads split the *rows* of the experts' matrices (steps 2 and 4), so one token with 8
 * experts keeps every thread streaming weights. Each output value is computed by one code
 * path whatever the thread count (one vec_dot, or one GEMM micro-kernel column) and the
 * final sum runs in slot order, so results do not depend on the thread count.
 *
 * Prefill: an expert matrix whose pair count reaches numoe_gemm_min_tokens(type) takes the
 * prompt path of numoe_matmul (gemm.h): its tokens' x (for gate/up) or hidden rows (for
 * down) are packed once, and each 16-row unit is dequantized to float32 and multiplied with
 * all of the expert's pairs in the float GEMM micro-kernel. Experts with fewer pairs keep the
 * vec_dot per (row, pair). */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "gemm.h"
#include "internal.h"
#include "numoe.h"

enum {
    ROWS_PER_UNIT = NUMOE_GEMM_ROW_TILE,   /* rows of one expert matrix per work unit */
    ACT_TILE_BYTES = 192 * 1024,           /* activations of one pair tile, kept in L2 */
    SCRATCH_BYTES = 64 * 1024 * 1024,      /* token chunk size bound for the scratch buffers */
    MIN_PARALLEL_BYTES = 128 * 1024        /* below this a fork/join costs more than it saves */
};

typedef struct {
    /* problem */
    int64_t n_tokens, n_embd, n_used, n_ff, n_experts;
    int allow_gemm;                        /* 0: every pair on the vec_dot path (rows alone) */
    const float *x;                        /* [n_tokens, n_embd] */
    const float *expert_weights;           /* [n_tokens, n_used] */
    const numoe_kernel_table *table;
    int gate_type, up_type, down_type, activation;
    const uint8_t *gate, *up, *down;
    int64_t gate_row_bytes, up_row_bytes, down_row_bytes;
    /* grouping */
    int64_t n_active;                      /* experts with at least one pair */
    int32_t *active_expert;                /* [n_active] expert id */
    int64_t *active_begin;                 /* [n_active + 1] first pair of each in sorted order */
    int32_t *pair_token;                   /* [P] token of each sorted pair */
    int64_t *pair_of_slot;                 /* [n_tokens * n_used] sorted pair of (t, k) */
    /* prompt path (gemm.h) */
    const numoe_gemm_kernel *gemm;
    int64_t *packed_begin;                 /* [n_active + 1] first packed token slot of each */
    float *x_packed;                       /* packed x of each expert's pairs, n_embd per slot */
    float *hidden_packed;                  /* packed hidden rows, n_ff per slot */
    float *scratch;                        /* per thread: scratch_floats */
    int64_t scratch_floats;
    /* scratch */
    block_q8a *x_q8a;                      /* [n_tokens, n_embd / 32] or NULL */
    float *hidden;                         /* [P, n_ff] */
    block_q8a *hidden_q8a;                 /* [P, n_ff / 32] or NULL */
    float *out;                            /* [P, n_embd] */
} moe_job;

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* ggml's tanh approximation of GELU. */
static inline float gelu_tanh(float v) {
    const float sqrt_2_over_pi = 0.79788456080286535588f;
    return 0.5f * v * (1.0f + tanhf(sqrt_2_over_pi * v * (1.0f + 0.044715f * v * v)));
}

static const void *token_act(const moe_job *job, int type, int64_t t) {
    if (numoe_type_uses_q8a(type)) return job->x_q8a + t * (job->n_embd / 32);
    return job->x + t * job->n_embd;
}

static int64_t act_bytes_per_row(int type, int64_t n) {
    return numoe_type_uses_q8a(type) ? n / 32 * (int64_t)sizeof(block_q8a) : n * (int64_t)sizeof(float);
}

static int64_t pairs_per_tile(int64_t act_bytes) {
    const int64_t tile = ACT_TILE_BYTES / act_bytes;
    return tile < 1 ? 1 : tile;
}

static int64_t pair_count(const moe_job *job, int64_t u) {
    return job->active_begin[u + 1] - job->active_begin[u];
}

/* Whether active expert u's matrix of `type` takes the GEMM path (the same answer for every
 * unit of the matrix, so packing and use agree). Never for one token (decode: no packed
 * buffers, even if that token picked one expert several times). */
static int uses_gemm(const moe_job *job, int type, int64_t u) {
    return job->allow_gemm && job->n_tokens > 1 &&
           pair_count(job, u) >= numoe_gemm_min_tokens(type);
}

/* One expert matrix (gate, up or down) of one active expert, rows [r0, r1), against all of the
 * expert's pairs: out[(p - begin) * ldo + (r - r0)] = W[r] . a[p]. GEMM path: `packed` holds
 * the expert's packed activations. vec_dot path: activation p is `acts` + index(p) *
 * act_bytes, with index(p) the pair's token if by_token, else p itself. */
typedef struct {
    int type;
    const uint8_t *rows;                   /* this expert's matrix, row_bytes per row */
    int64_t row_bytes, n_in;
    const uint8_t *acts;
    int by_token;
    const float *packed;
} expert_matrix;

static void expert_rows(const moe_job *job, const expert_matrix *m, int64_t u, int64_t r0,
                        int64_t r1, float *out, int64_t ldo, float *scratch) {
    const int64_t begin = job->active_begin[u], end = job->active_begin[u + 1];
    if (uses_gemm(job, m->type, u)) {
        numoe_gemm_rows(job->gemm, job->table->dequant[m->type], m->type,
                        m->rows + r0 * m->row_bytes, m->row_bytes, r1 - r0, m->n_in, m->packed,
                        end - begin, out, ldo, scratch);
        return;
    }
    const numoe_vec_dot_fn dot = job->table->vec_dot[m->type];
    const numoe_vec_dot_tile_fn tile_fn = job->table->vec_dot_tile[m->type];
    const int64_t act_bytes = act_bytes_per_row(m->type, m->n_in);
    const int64_t tile = pairs_per_tile(act_bytes);
    for (int64_t p0 = begin; p0 < end; p0 += tile) {
        const int64_t p1 = p0 + tile < end ? p0 + tile : end;
        if (tile_fn != NULL) {
            numoe_tile_tokens(tile_fn, m->n_in, m->rows + r0 * m->row_bytes, m->row_bytes,
                              r1 - r0, m->acts, act_bytes, m->by_token ? job->pair_token : NULL,
                              p0, p1, out + (p0 - begin) * ldo, ldo);
            continue;
        }
        for (int64_t r = r0; r < r1; r++) {
            const uint8_t *row = m->rows + r * m->row_bytes;
            for (int64_t p = p0; p < p1; p++) {
                const int64_t index = m->by_token ? job->pair_token[p] : p;
                out[(p - begin) * ldo + (r - r0)] = dot(m->n_in, row, m->acts + index * act_bytes);
            }
        }
    }
}

static inline float activate(const moe_job *job, float g) {
    return job->activation == NUMOE_ACT_SILU ? silu(g) : gelu_tanh(g);
}

/* Step 2 for rows [r0, r1) of active expert u; `scratch` is this thread's. */
static void gate_up_unit(const moe_job *job, int64_t u, int64_t r0, int64_t r1, float *scratch) {
    const int64_t e = job->active_expert[u];
    const uint8_t *gate = job->gate + e * job->n_ff * job->gate_row_bytes;
    const uint8_t *up = job->up + e * job->n_ff * job->up_row_bytes;
    const numoe_vec_dot_tile_fn gate_tile = job->table->vec_dot_tile[job->gate_type];
    const numoe_vec_dot_tile_fn up_tile = job->table->vec_dot_tile[job->up_type];
    if (!uses_gemm(job, job->gate_type, u) && !uses_gemm(job, job->up_type, u) &&
        gate_tile != NULL && up_tile != NULL) {
        /* Row x token tiles: each weight block is unpacked once for up to 64 pairs. */
        float up_out[64 * ROWS_PER_UNIT];  /* [pairs, rows] */
        const uint8_t *gate_acts = token_act(job, job->gate_type, 0);
        const uint8_t *up_acts = token_act(job, job->up_type, 0);
        for (int64_t p0 = job->active_begin[u]; p0 < job->active_begin[u + 1]; p0 += 64) {
            const int64_t p1 = min64(p0 + 64, job->active_begin[u + 1]);
            float *hidden = job->hidden + p0 * job->n_ff + r0;
            numoe_tile_tokens(gate_tile, job->n_embd, gate + r0 * job->gate_row_bytes,
                              job->gate_row_bytes, r1 - r0, gate_acts,
                              act_bytes_per_row(job->gate_type, job->n_embd), job->pair_token,
                              p0, p1, hidden, job->n_ff);
            numoe_tile_tokens(up_tile, job->n_embd, up + r0 * job->up_row_bytes,
                              job->up_row_bytes, r1 - r0, up_acts,
                              act_bytes_per_row(job->up_type, job->n_embd), job->pair_token,
                              p0, p1, up_out, ROWS_PER_UNIT);
            for (int64_t i = 0; i < p1 - p0; i++)
                for (int64_t r = 0; r < r1 - r0; r++)
                    hidden[i * job->n_ff + r] = activate(job, hidden[i * job->n_ff + r]) *
                                                up_out[i * ROWS_PER_UNIT + r];
        }
        return;
    }
    if (!uses_gemm(job, job->gate_type, u) && !uses_gemm(job, job->up_type, u)) {
        /* Decode and small groups: gate and up of one pair together, x read once per tile. */
        const numoe_vec_dot_fn gate_dot = job->table->vec_dot[job->gate_type];
        const numoe_vec_dot_fn up_dot = job->table->vec_dot[job->up_type];
        const int64_t tile = pairs_per_tile(act_bytes_per_row(job->gate_type, job->n_embd) +
                                            act_bytes_per_row(job->up_type, job->n_embd));
        for (int64_t p0 = job->active_begin[u]; p0 < job->active_begin[u + 1]; p0 += tile) {
            const int64_t p1 = p0 + tile < job->active_begin[u + 1] ? p0 + tile : job->active_begin[u + 1];
            for (int64_t r = r0; r < r1; r++) {
                const uint8_t *gate_row = gate + r * job->gate_row_bytes;
                const uint8_t *up_row = up + r * job->up_row_bytes;
                for (int64_t p = p0; p < p1; p++) {
                    const int64_t t = job->pair_token[p];
                    const float g = gate_dot(job->n_embd, gate_row, token_act(job, job->gate_type, t));
                    const float v = up_dot(job->n_embd, up_row, token_act(job, job->up_type, t));
                    job->hidden[p * job->n_ff + r] = activate(job, g) * v;
                }
            }
        }
        return;
    }
    /* Gate into hidden, up into a [pairs, ROWS_PER_UNIT] block after the dequant tile. */
    const int64_t begin = job->active_begin[u];
    const float *packed = job->x_packed + job->packed_begin[u] * job->n_embd;
    float *up_out = scratch + numoe_gemm_scratch_floats(job->n_embd > job->n_ff ? job->n_embd : job->n_ff);
    const expert_matrix g = {job->gate_type, gate, job->gate_row_bytes, job->n_embd,
                             numoe_type_uses_q8a(job->gate_type) ? (const uint8_t *)job->x_q8a
                                                                 : (const uint8_t *)job->x,
                             1, packed};
    const expert_matrix v = {job->up_type, up, job->up_row_bytes, job->n_embd,
                             numoe_type_uses_q8a(job->up_type) ? (const uint8_t *)job->x_q8a
                                                               : (const uint8_t *)job->x,
                             1, packed};
    float *hidden = job->hidden + begin * job->n_ff + r0;
    expert_rows(job, &g, u, r0, r1, hidden, job->n_ff, scratch);
    expert_rows(job, &v, u, r0, r1, up_out, ROWS_PER_UNIT, scratch);
    for (int64_t i = 0; i < pair_count(job, u); i++)
        for (int64_t r = 0; r < r1 - r0; r++)
            hidden[i * job->n_ff + r] = activate(job, hidden[i * job->n_ff + r]) * up_out[i * ROWS_PER_UNIT + r];
}

/* Steps 4 and 5 for rows [r0, r1) of y: these rows of every active expert's down matrix
 * against its pairs' hidden rows (`hidden_acts`, as the down type's vec_dot takes them, or
 * packed for the GEMM path), then y[t, r] = sum_k w[t,k] * out[pair(t,k), r] in slot order. */
static void down_rows(const moe_job *job, const uint8_t *hidden_acts, int64_t r0, int64_t r1,
                      float *scratch, float *y) {
    for (int64_t u = 0; u < job->n_active; u++) {
        const expert_matrix m = {
            job->down_type, job->down + job->active_expert[u] * job->n_embd * job->down_row_bytes,
            job->down_row_bytes, job->n_ff, hidden_acts, 0,
            job->hidden_packed + job->packed_begin[u] * job->n_ff};
        expert_rows(job, &m, u, r0, r1, job->out + job->active_begin[u] * job->n_embd + r0,
                    job->n_embd, scratch);
    }
    for (int64_t t = 0; t < job->n_tokens; t++) {
        float *yt = y + t * job->n_embd;
        for (int64_t r = r0; r < r1; r++) yt[r] = 0.0f;
        for (int64_t k = 0; k < job->n_used; k++) {
            const int64_t pair = job->pair_of_slot[t * job->n_used + k];
            if (pair < 0) continue;        /* skipped slot (negative expert id) */
            const float w = job->expert_weights[t * job->n_used + k];
            const float *o = job->out + pair * job->n_embd;
            for (int64_t r = r0; r < r1; r++) yt[r] += w * o[r];
        }
    }
}

/* Runs steps 2-5 on the grouped job. Gate/up work units are (active expert, row tile),
 * numbered expert-major; down units are row tiles of y across all active experts. One token:
 * units cost the same, and a guided split hands each thread long contiguous runs of rows.
 * Several tokens: experts carry different token counts, so units go out one at a time.
 * Barriers are kept few (a descheduled thread on a shared machine stalls every barrier):
 * one token quantizes x before the region and each thread quantizes the few hidden rows
 * itself, leaving one barrier between gate/up and down. Several tokens add one barrier
 * after preparing x (quantized and/or packed per expert). */
static void run_job(const moe_job *job, float *y) {
    const int64_t units_ff = (job->n_ff + ROWS_PER_UNIT - 1) / ROWS_PER_UNIT;
    const int64_t units_embd = (job->n_embd + ROWS_PER_UNIT - 1) / ROWS_PER_UNIT;
    const int64_t n_pairs = job->active_begin[job->n_active];
    const int64_t hidden_blocks = job->n_ff / 32;
    const int decode = job->n_tokens == 1;
    const int64_t expert_bytes = job->n_ff * (job->gate_row_bytes + job->up_row_bytes) +
                                 job->n_embd * job->down_row_bytes;
    const int parallel = job->n_active * expert_bytes >= MIN_PARALLEL_BYTES;

    if (decode && job->x_q8a != NULL)
        job->table->quantize_act(job->n_embd, job->x, job->x_q8a);

#pragma omp parallel num_threads(numoe_active_threads()) if (parallel)
    {
        float *scratch = job->scratch + omp_get_thread_num() * job->scratch_floats;
        if (!decode) {
            if (job->x_q8a != NULL) {
#pragma omp for schedule(static) nowait
                for (int64_t t = 0; t < job->n_tokens; t++)
                    job->table->quantize_act(job->n_embd, job->x + t * job->n_embd,
                                             job->x_q8a + t * (job->n_embd / 32));
            }
#pragma omp for schedule(dynamic, 1)
            for (int64_t u = 0; u < job->n_active; u++)
                if (uses_gemm(job, job->gate_type, u) || uses_gemm(job, job->up_type, u))
                    numoe_gemm_pack(job->gemm, job->x, job->n_embd,
                                    job->pair_token + job->active_begin[u], pair_count(job, u),
                                    job->n_embd, job->x_packed + job->packed_begin[u] * job->n_embd);
        }
        if (decode) {
#pragma omp for schedule(guided)
            for (int64_t i = 0; i < job->n_active * units_ff; i++) {
                const int64_t r0 = i % units_ff * ROWS_PER_UNIT;
                gate_up_unit(job, i / units_ff, r0, min64(r0 + ROWS_PER_UNIT, job->n_ff), scratch);
            }
        } else {
#pragma omp for schedule(dynamic, 1)
            for (int64_t i = 0; i < job->n_active * units_ff; i++) {
                const int64_t r0 = i % units_ff * ROWS_PER_UNIT;
                gate_up_unit(job, i / units_ff, r0, min64(r0 + ROWS_PER_UNIT, job->n_ff), scratch);
            }
        }

        const uint8_t *hidden_acts = (const uint8_t *)job->hidden;
        if (job->hidden_q8a != NULL && decode) {
            /* A few rows: cheaper for each thread to quantize them than to wait at a barrier. */
            block_q8a *mine = job->hidden_q8a + omp_get_thread_num() * n_pairs * hidden_blocks;
            for (int64_t p = 0; p < n_pairs; p++)
                job->table->quantize_act(job->n_ff, job->hidden + p * job->n_ff,
                                         mine + p * hidden_blocks);
            hidden_acts = (const uint8_t *)mine;
        } else if (!decode) {
            /* Each expert's hidden rows as its down matrix takes them: packed, or quantized. */
#pragma omp for schedule(dynamic, 1)
            for (int64_t u = 0; u < job->n_active; u++) {
                const int64_t begin = job->active_begin[u], end = job->active_begin[u + 1];
                if (uses_gemm(job, job->down_type, u)) {
                    numoe_gemm_pack(job->gemm, job->hidden + begin * job->n_ff, job->n_ff, NULL,
                                    end - begin, job->n_ff,
                                    job->hidden_packed + job->packed_begin[u] * job->n_ff);
                } else if (job->hidden_q8a != NULL) {
                    for (int64_t p = begin; p < end; p++)
                        job->table->quantize_act(job->n_ff, job->hidden + p * job->n_ff,
                                                 job->hidden_q8a + p * hidden_blocks);
                }
            }
            if (job->hidden_q8a != NULL) hidden_acts = (const uint8_t *)job->hidden_q8a;
        }

        if (decode) {
#pragma omp for schedule(guided)
            for (int64_t i = 0; i < units_embd; i++)
                down_rows(job, hidden_acts, i * ROWS_PER_UNIT,
                          min64((i + 1) * ROWS_PER_UNIT, job->n_embd), scratch, y);
        } else {
#pragma omp for schedule(dynamic, 1)
            for (int64_t i = 0; i < units_embd; i++)
                down_rows(job, hidden_acts, i * ROWS_PER_UNIT,
                          min64((i + 1) * ROWS_PER_UNIT, job->n_embd), scratch, y);
        }
    }
}

/* Counting sort of the chunk's (token, slot) pairs by expert; pairs of one expert stay in
 * (token, slot) order. Slots with a negative id get no pair (pair_of_slot -1). `counts` is
 * [n_experts] scratch. */
static void group_pairs(moe_job *job, const int32_t *expert_ids, int64_t *counts) {
    const int64_t n_slots = job->n_tokens * job->n_used;
    for (int64_t e = 0; e < job->n_experts; e++) counts[e] = 0;
    for (int64_t s = 0; s < n_slots; s++)
        if (expert_ids[s] >= 0) counts[expert_ids[s]]++;
    job->n_active = 0;
    int64_t begin = 0;
    for (int64_t e = 0; e < job->n_experts; e++) {
        if (counts[e] == 0) continue;
        job->active_expert[job->n_active] = (int32_t)e;
        job->active_begin[job->n_active] = begin;
        job->n_active++;
        const int64_t count = counts[e];
        counts[e] = begin;                 /* now: next free position of expert e */
        begin += count;
    }
    job->active_begin[job->n_active] = begin;
    /* Packed slots: each expert's pairs rounded up to whole SIMD vectors of tokens. */
    job->packed_begin[0] = 0;
    for (int64_t u = 0; u < job->n_active; u++) {
        const int64_t lanes = job->gemm->lanes;
        job->packed_begin[u + 1] =
            job->packed_begin[u] + (pair_count(job, u) + lanes - 1) / lanes * lanes;
    }
    for (int64_t s = 0; s < n_slots; s++) {
        if (expert_ids[s] < 0) {
            job->pair_of_slot[s] = -1;
            continue;
        }
        const int64_t p = counts[expert_ids[s]]++;
        job->pair_token[p] = (int32_t)(s / job->n_used);
        job->pair_of_slot[s] = p;
    }
}

static void *alloc_floats(int64_t n) {
    const size_t bytes = ((size_t)n * sizeof(float) + 63) / 64 * 64;  /* aligned_alloc rule */
    return aligned_alloc(64, bytes > 0 ? bytes : 64);
}

static int check_weight_type(const numoe_kernel_table *table, int type, int64_t n_in,
                             int64_t n_rows, int64_t *row_bytes) {
    if (type < 0 || type >= NUMOE_MAX_TYPE || numoe_block_size(type) <= 0 ||
        table->vec_dot[type] == NULL)
        return NUMOE_EBADTYPE;
    *row_bytes = numoe_row_bytes(type, n_in);
    if (*row_bytes < 0) return (int)*row_bytes;
    if (n_rows > INT64_MAX / *row_bytes) return NUMOE_EBADSHAPE;
    return NUMOE_OK;
}

static int moe(const float *x, int64_t n_tokens, int64_t n_embd, const int32_t *expert_ids,
               const float *expert_weights, int64_t n_used, int64_t n_experts, int64_t n_ff,
               int gate_type, const void *gate, int up_type, const void *up, int down_type,
               const void *down, int activation, float *y, int allow_gemm) {
    if (x == NULL || expert_ids == NULL || expert_weights == NULL || gate == NULL || up == NULL ||
        down == NULL || y == NULL)
        return NUMOE_EBADARG;
    if (activation != NUMOE_ACT_SILU && activation != NUMOE_ACT_GELU_TANH) return NUMOE_EBADARG;
    if (n_tokens < 0 || n_embd <= 0 || n_used <= 0 || n_experts <= 0 || n_ff <= 0 ||
        n_experts > INT32_MAX || n_tokens > INT32_MAX / n_used)
        return NUMOE_EBADSHAPE;
    const numoe_kernel_table *table = numoe_active_table();
    moe_job job = {.n_embd = n_embd, .n_used = n_used, .n_ff = n_ff, .n_experts = n_experts,
                   .allow_gemm = allow_gemm,
                   .table = table, .gate_type = gate_type, .up_type = up_type,
                   .down_type = down_type, .activation = activation,
                   .gate = gate, .up = up, .down = down};
    int status;
    if ((status = check_weight_type(table, gate_type, n_embd, n_experts * n_ff, &job.gate_row_bytes)) ||
        (status = check_weight_type(table, up_type, n_embd, n_experts * n_ff, &job.up_row_bytes)) ||
        (status = check_weight_type(table, down_type, n_ff, n_experts * n_embd, &job.down_row_bytes)))
        return status;
    if (n_ff > INT64_MAX / n_experts || n_embd > INT64_MAX / n_experts) return NUMOE_EBADSHAPE;
    for (int64_t s = 0; s < n_tokens * n_used; s++)
        if (expert_ids[s] >= n_experts) return NUMOE_EBADARG;  /* negative: skipped slot */
    if (n_tokens == 0) return NUMOE_OK;

    /* Tokens are processed in chunks so the scratch stays bounded for long prompts. */
    const int x_q8a = numoe_type_uses_q8a(gate_type) || numoe_type_uses_q8a(up_type);
    const int hidden_q8a = numoe_type_uses_q8a(down_type);
    const int64_t bytes_per_token =
        (x_q8a ? n_embd / 32 * (int64_t)sizeof(block_q8a) : 0) +
        n_used * (int64_t)(sizeof(int32_t) + 2 * sizeof(int64_t) +
                           2 * (n_ff + n_embd) * sizeof(float) +  /* + packed copies */
                           (hidden_q8a ? n_ff / 32 * sizeof(block_q8a) : 0));
    int64_t chunk = SCRATCH_BYTES / bytes_per_token;
    if (chunk < 1) chunk = 1;
    if (chunk > n_tokens) chunk = n_tokens;
    const int64_t max_pairs = chunk * n_used;
    const int64_t max_active = max_pairs < n_experts ? max_pairs : n_experts;

    int64_t *counts = malloc((size_t)n_experts * sizeof(int64_t));
    job.active_expert = malloc((size_t)max_active * sizeof(int32_t));
    job.active_begin = malloc((size_t)(max_active + 1) * sizeof(int64_t));
    job.pair_token = malloc((size_t)max_pairs * sizeof(int32_t));
    job.pair_of_slot = malloc((size_t)max_pairs * sizeof(int64_t));
    job.x_q8a = x_q8a ? malloc((size_t)(chunk * (n_embd / 32)) * sizeof(block_q8a)) : NULL;
    job.hidden = malloc((size_t)(max_pairs * n_ff) * sizeof(float));
    /* Decode gives each thread its own copy of the quantized hidden rows (see run_job). */
    const int64_t hidden_copies = chunk == 1 ? numoe_active_threads() : 1;
    job.hidden_q8a = hidden_q8a ? malloc((size_t)(hidden_copies * max_pairs * (n_ff / 32)) *
                                         sizeof(block_q8a))
                                : NULL;
    job.out = malloc((size_t)(max_pairs * n_embd) * sizeof(float));
    /* Prompt path: packed activations (each expert padded to whole vectors of tokens) and
     * per-thread scratch (a dequantized row tile, then up's outputs for one unit). */
    job.gemm = numoe_active_gemm();
    job.packed_begin = malloc((size_t)(max_active + 1) * sizeof(int64_t));
    const int prefill = chunk > 1 && allow_gemm;
    const int64_t packed_slots = max_pairs + max_active * (job.gemm->lanes - 1);
    job.x_packed = prefill ? alloc_floats(packed_slots * n_embd) : NULL;
    job.hidden_packed = prefill ? alloc_floats(packed_slots * n_ff) : NULL;
    job.scratch_floats = prefill ? numoe_gemm_scratch_floats(n_embd > n_ff ? n_embd : n_ff) +
                                       max_pairs * ROWS_PER_UNIT
                                 : 0;
    job.scratch = prefill ? alloc_floats(numoe_active_threads() * job.scratch_floats) : NULL;
    status = NUMOE_OK;
    if (!counts || !job.active_expert || !job.active_begin || !job.pair_token ||
        !job.pair_of_slot || (x_q8a && !job.x_q8a) || !job.hidden ||
        (hidden_q8a && !job.hidden_q8a) || !job.out || !job.packed_begin ||
        (prefill && (!job.x_packed || !job.hidden_packed || !job.scratch))) {
        status = NUMOE_EBADSHAPE;  /* too large to allocate */
    } else {
        for (int64_t t0 = 0; t0 < n_tokens; t0 += chunk) {
            job.n_tokens = t0 + chunk <= n_tokens ? chunk : n_tokens - t0;
            job.x = x + t0 * n_embd;
            job.expert_weights = expert_weights + t0 * n_used;
            group_pairs(&job, expert_ids + t0 * n_used, counts);
            run_job(&job, y + t0 * n_embd);
        }
    }
    free(counts);
    free(job.active_expert);
    free(job.active_begin);
    free(job.pair_token);
    free(job.pair_of_slot);
    free(job.x_q8a);
    free(job.hidden);
    free(job.hidden_q8a);
    free(job.out);
    free(job.packed_begin);
    free(job.x_packed);
    free(job.hidden_packed);
    free(job.scratch);
    return status;
}

int numoe_moe(const float *x, int64_t n_tokens, int64_t n_embd, const int32_t *expert_ids,
              const float *expert_weights, int64_t n_used, int64_t n_experts, int64_t n_ff,
              int gate_type, const void *gate, int up_type, const void *up, int down_type,
              const void *down, int activation, float *y) {
    return moe(x, n_tokens, n_embd, expert_ids, expert_weights, n_used, n_experts, n_ff,
               gate_type, gate, up_type, up, down_type, down, activation, y, 1);
}

int numoe_moe_rows(const float *x, int64_t n_tokens, int64_t n_embd, const int32_t *expert_ids,
                   const float *expert_weights, int64_t n_used, int64_t n_experts, int64_t n_ff,
                   int gate_type, const void *gate, int up_type, const void *up, int down_type,
                   const void *down, int activation, float *y) {
    return moe(x, n_tokens, n_embd, expert_ids, expert_weights, n_used, n_experts, n_ff,
               gate_type, gate, up_type, up, down_type, down, activation, y, 0);
}
