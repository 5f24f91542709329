/* numoe native kernels: the public API, and the single source for the cffi cdef.
 *
 * The cdef parser reads this file verbatim: keep it to plain declarations (no #include,
 * no macros other than the NUMOE_TYPE_* enum, no static_assert). Block layouts and the
 * dispatch table live in src/internal.h.
 *
 * Conventions shared by every call:
 *   - `type` is a ggml type id (numoe_type below). Rows of a weight matrix are contiguous
 *     and row_bytes(type, n_in) long, exactly as in a GGUF file.
 *   - A weight matrix W has shape [n_out, n_in] (GGUF ne = [n_in, n_out]); y = x @ W^T.
 *   - Activations and outputs are float32, row-major [n_tokens, n].
 *   - Return 0 on success, a negative NUMOE_E* code on bad arguments (never abort).
 */
typedef enum {
    NUMOE_TYPE_F32 = 0,
    NUMOE_TYPE_F16 = 1,
    NUMOE_TYPE_Q4_0 = 2,
    NUMOE_TYPE_Q5_0 = 6,
    NUMOE_TYPE_Q8_0 = 8,
    NUMOE_TYPE_Q4_K = 12,
    NUMOE_TYPE_Q5_K = 13,
    NUMOE_TYPE_Q6_K = 14,
    NUMOE_TYPE_BF16 = 30
} numoe_type;

typedef enum {
    NUMOE_OK = 0,
    NUMOE_EBADTYPE = -1,      /* type id not supported */
    NUMOE_EBADSHAPE = -2,     /* n_in not a multiple of the type's block size, or <= 0 */
    NUMOE_EBADARG = -3        /* null pointer, expert id out of range, ... */
} numoe_status;

typedef enum {
    NUMOE_ISA_SCALAR = 0,
    NUMOE_ISA_AVX2 = 1,       /* AVX2 + FMA + F16C */
    NUMOE_ISA_AVX512 = 2      /* AVX-512 F/BW/VL + VNNI */
} numoe_isa;

typedef enum {
    NUMOE_ACT_SILU = 0,       /* SwiGLU: silu(gate) * up  (Qwen3, Qwen3-MoE, DeepSeek) */
    NUMOE_ACT_GELU_TANH = 1   /* GeGLU: gelu_tanh(gate) * up (Gemma 3) */
} numoe_activation;

/* --- runtime configuration ------------------------------------------------------------ */
int numoe_best_isa(void);                 /* highest ISA this CPU supports */
int numoe_set_isa(int isa);               /* select; clamps to best; returns the ISA in use */
int numoe_get_isa(void);
void numoe_set_threads(int n_threads);    /* OpenMP threads for every call below */
int numoe_get_threads(void);

/* --- sizes ------------------------------------------------------------------------------ */
int64_t numoe_block_size(int type);       /* elements per block; <= 0 if unsupported */
int64_t numoe_block_bytes(int type);      /* bytes per block;    <= 0 if unsupported */
int64_t numoe_row_bytes(int type, int64_t n);
int numoe_type_supported(int type);      /* 1 if dequantize and products have kernels */

/* --- (a) dequantize: n_rows rows of n elements each, dst [n_rows, n] ---------------------- */
int numoe_dequantize_rows(int type, const void *src, float *dst, int64_t n_rows, int64_t n);

/* --- (b) products: y[t, o] = sum_i W[o, i] * x[t, i] -------------------------------------
 * Integer types quantize x to 8-bit blocks first. n_tokens == 1 is the decode matrix-vector
 * path; n_tokens > 1 the prompt matrix-matrix path. Threads split the output rows. */
int numoe_matmul(int type, const void *weight, int64_t n_out, int64_t n_in,
                 const float *x, int64_t n_tokens, float *y);

/* --- (c) fused MoE block for one layer ---------------------------------------------------
 *   x               [n_tokens, n_embd]            input hidden states
 *   expert_ids      [n_tokens, n_used]            int32 < n_experts; a negative id skips its (token, slot) (expert parallel)
 *   expert_weights  [n_tokens, n_used]            router weights, already normalised
 *   gate, up        [n_experts, n_ff, n_embd]     types gate_type/up_type, expert-major
 *   down            [n_experts, n_embd, n_ff]     type down_type
 *   y               [n_tokens, n_embd]            y[t] = sum_k w[t,k] * down_e(act(gate_e x) * up_e x)
 * y is overwritten. One call per layer; experts are grouped and threaded inside. */
int numoe_moe(const float *x, int64_t n_tokens, int64_t n_embd,
              const int32_t *expert_ids, const float *expert_weights, int64_t n_used,
              int64_t n_experts, int64_t n_ff,
              int gate_type, const void *gate, int up_type, const void *up,
              int down_type, const void *down, int activation, float *y);

/* --- probes ------------------------------------------------------------------------------ */
/* Streams `bytes` bytes of `buf` `repeats` times with the current threads; returns the sum of
 * the data read (so the compiler cannot skip the reads). Used to measure read bandwidth in the
 * same process as the kernels. */
double numoe_read_probe(const void *buf, int64_t bytes, int repeats);

/* --- layer ops (src/ops.c; Python face native/ops.py) -------------------------------------
 * The small per-layer work around the weight products, float32 rows. */

/* out[r] = residual[r] + x[r] / sqrt(mean(x[r]^2) + eps) * weight, for rows r of n elements;
 * residual NULL means no add. out may alias x or residual (in place). */
int numoe_rms_norm(const float *x, const float *weight, int64_t n_rows, int64_t n, float eps,
                   const float *residual, float *out);

/* RoPE in place on q [n_tokens, n_q_heads, head_dim] and k [n_tokens, n_k_heads, head_dim]
 * (either may be NULL with 0 heads). cos, sin [n_tokens, head_dim / 2]: the table rows of the
 * tokens' positions. neox != 0 rotates pairs (i, i + head_dim/2), else pairs (2i, 2i + 1). */
int numoe_rope(float *q, int64_t n_q_heads, float *k, int64_t n_k_heads, int64_t n_tokens,
               int64_t head_dim, const float *cos, const float *sin, int neox);

/* Attention of n_tokens new tokens at positions [start, start + n_tokens) for one layer.
 *   q      [n_tokens, n_heads, head_dim]        already normed, roped and NOT scaled
 *   k_new  [n_tokens, n_kv_heads, head_dim]     stored into k_cache rows [start, start + T)
 *   v_new  [n_tokens, n_kv_heads, value_dim]    stored into v_cache
 *   k_cache [n_kv_heads, n_ctx, head_dim], v_cache [n_kv_heads, n_ctx, value_dim]: one
 *           layer's cache, cache_type NUMOE_TYPE_F32 or NUMOE_TYPE_F16 (new rows are rounded)
 *   out    [n_tokens, n_heads * value_dim]      softmax(scale * q.K^T) V per head
 * Query head h reads KV head h / (n_heads / n_kv_heads). A key at p0 is visible from the
 * query at p1 iff p0 <= p1 and (sliding_window == 0 or p1 - p0 < sliding_window).
 * Threads split (token, head) pairs when the work is large enough. */
int numoe_attention(const float *q, const float *k_new, const float *v_new, int64_t n_tokens,
                    int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t value_dim,
                    int cache_type, void *k_cache, void *v_cache, int64_t n_ctx, int64_t start,
                    float scale, int64_t sliding_window, float *out);

/* MLA (DeepSeek) absorbed attention: multi-query attention with one shared KV head whose key
 * is the cached latent row and whose value is that row's first value_dim elements (llama.cpp's
 * MLA cache layout: one row of width = kv_lora + rope values per token, no value cache).
 *   q          [n_tokens, n_heads, width]   already roped, NOT scaled
 *   latent_new [n_tokens, width]            stored into cache rows [start, start + n_tokens)
 *   cache      [n_ctx, width]               cache_type NUMOE_TYPE_F32 or NUMOE_TYPE_F16
 *   out        [n_tokens, n_heads, value_dim], value_dim <= width
 * Causal: the query at position p1 sees keys p0 <= p1. Threads as numoe_attention. */
int numoe_attention_latent(const float *q, const float *latent_new, int64_t n_tokens,
                           int64_t n_heads, int64_t width, int64_t value_dim, int cache_type,
                           void *cache, int64_t n_ctx, int64_t start, float scale, float *out);

/* --- numa: thread pinning, memory binding, per-node bandwidth (src/numa.c; worker/numa.py) ---
 * Functions return 0 or a negative errno (e.g. -EPERM, -EINVAL) the kernel gave. */

/* In one OpenMP region of numoe_get_threads() threads, pins thread i to cpus[i % n_cpus]
 * (thread 0 is the caller). The pool's threads keep the mask for later regions of the same
 * size. numoe_allow_threads does the same but lets every thread run on all n_cpus CPUs. */
int numoe_pin_threads(const int *cpus, int n_cpus);
int numoe_allow_threads(const int *cpus, int n_cpus);

/* cpu_of_thread[i] = the CPU OpenMP thread i runs on (sched_getcpu) inside one region of
 * numoe_get_threads() threads, for i < max_threads; returns the number of threads. */
int numoe_thread_cpus(int *cpu_of_thread, int max_threads);

/* Memory policy of the caller and of every OpenMP thread: strict != 0 -> MPOL_BIND (allocation
 * fails rather than leave the node), else MPOL_PREFERRED. node in [0, 1024). */
int numoe_bind_memory_node(int node, int strict);
/* Back to the default policy (allocate on the node of the touching CPU). */
int numoe_unbind_memory(void);
/* The caller's policy read back: *mode = MPOL_* number (0 default, 1 preferred, 2 bind),
 * *nodemask = the first 64 nodes of its node mask. */
int numoe_memory_policy(int *mode, uint64_t *nodemask);

/* STREAM-style bandwidth with n_cpus threads, thread i pinned to cpus[i] for the call only
 * (each thread's mask is restored after). Three arrays of `bytes` bytes (doubles) are first
 * touched by the pinned threads; best of `repeats` timings of read (sum b), copy (a = b) and
 * triad (a = b + s*c). GB/s = 1e9 bytes/s, counting bytes read plus bytes written (1, 2, 3
 * arrays). The results are checked (read sum, copied and triad values); -EIO if wrong,
 * -ENOMEM if the arrays cannot be allocated. */
int numoe_membw(const int *cpus, int n_cpus, int64_t bytes, int repeats,
                double *read_gbs, double *copy_gbs, double *triad_gbs);

/* --- shared-memory all-reduce (src/shm_reduce.c; worker/shm_allreduce.py) -----------------
 * Each rank owns one segment of numoe_shm_segment_bytes(capacity) bytes (capacity = float32
 * values per reduction round), mapped by every rank of the group and zero-filled before its
 * first use. Functions return 0 or a negative errno. */
typedef enum {
    NUMOE_SHM_KEY_LEN = 6,         /* key: step, layer, site, n_tokens, hidden, offset */
    NUMOE_SHM_HEADER_BYTES = 64    /* slot header: seq, n, key; one cache line */
} numoe_shm_layout;

int64_t numoe_shm_segment_bytes(int64_t capacity);

/* Round seq (1, 2, 3, ... on every rank in the same order) of an all-reduce of n <= capacity
 * floats: publishes values and key in segments[rank], waits for every peer's round seq,
 * checks that each peer's n and key equal ours, then out[i] = ((v0[i] + v1[i]) + v2[i]) + ...
 * in rank order (bit-identical on every rank). Errors: -ETIMEDOUT when peers did not publish
 * within timeout_s (*ranks = bit mask of them); -EPROTO when a peer published another key or
 * n, or a later round (*ranks = its bit, peer_key[0..NUMOE_SHM_KEY_LEN] = its key then its n);
 * -EINVAL for bad arguments (world_size <= 64). Spins, then yields, then sleeps while waiting. */
int numoe_shm_all_reduce(void *const *segments, int world_size, int rank, int64_t capacity,
                         int64_t seq, const int64_t *key, const float *values, int64_t n,
                         double timeout_s, float *out, uint64_t *ranks, int64_t *peer_key);

/* --- batch-invariant products (continuous batching; src/matmul.c, src/moe.c) --------------
 * As numoe_matmul and numoe_moe, with the same arguments, but every token row is computed
 * exactly as it would be in a call of its own with n_tokens == 1: the vec_dot path (8-bit
 * activation blocks for integer types) for every row and every expert, never the prompt GEMM.
 * A row's result therefore does not depend on the other rows of the call (threads split
 * output rows, never the dot products). Used for a batch of decode steps of several
 * sequences. */
int numoe_matmul_rows(int type, const void *weight, int64_t n_out, int64_t n_in,
                      const float *x, int64_t n_tokens, float *y);
/* y[r] = the active ISA's per-pair dot product of weight row r with x alone (x [n_in],
 * quantized to 8-bit blocks for integer types), never a row x token tile: the definition
 * every other path of numoe_matmul / numoe_matmul_rows reproduces bit for bit. For tests. */
int numoe_vec_dot_rows(int type, const void *weight, int64_t n_out, int64_t n_in,
                       const float *x, float *y);
/* Per-head products (MLA's attn_k_b / attn_v_b): weight is a stack [n_batch, n_out, n_in],
 * matrix b starting at byte b * n_out * row_bytes; x [n_tokens, n_batch, n_in],
 * y [n_tokens, n_batch, n_out] with y[t, b] = W_b @ x[t, b]. Head b's result is bit for bit
 * numoe_matmul (rows_alone == 0) or numoe_matmul_rows (rows_alone != 0) on W_b and x[:, b],
 * for any thread count. */
int numoe_matmul_batched(int type, const void *weight, int64_t n_batch, int64_t n_out,
                         int64_t n_in, const float *x, int64_t n_tokens, float *y,
                         int rows_alone);
int numoe_moe_rows(const float *x, int64_t n_tokens, int64_t n_embd,
                   const int32_t *expert_ids, const float *expert_weights, int64_t n_used,
                   int64_t n_experts, int64_t n_ff,
                   int gate_type, const void *gate, int up_type, const void *up,
                   int down_type, const void *down, int activation, float *y);
