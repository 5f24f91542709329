/* Layer ops of the forward pass: RMSNorm (optionally fused with the residual add), RoPE in
 * place on q and k, and attention of new tokens over one layer's KV cache (numoe.h, section
 * "layer ops"). They are cheap next to the weight products, but each one replaces several
 * numpy passes and temporaries per layer per token.
 *
 * Every op has a scalar reference; the inner loops (dot, axpy, sum of squares, NeoX rotation)
 * also have AVX2 + FMA + F16C versions, used when the selected ISA is AVX2 or wider. Both
 * accumulate in float32; they differ only in summation order. AVX-512 adds nothing here:
 * head rows are 64-256 floats and the loops wait on loads, not on arithmetic.
 *
 * KV cache of one layer, head-major: keys [n_kv_heads, n_ctx, head_dim], values
 * [n_kv_heads, n_ctx, value_dim], float32 or float16 (NUMOE_TYPE_F32 / NUMOE_TYPE_F16).
 * New rows are rounded to the cache type when stored, and attention reads them back from
 * the cache, so a token sees its own key exactly as later tokens will.
 *
 * MLA (DeepSeek) latent cache of one layer: [n_ctx, width = kv_lora + rope], one row per
 * token and no value cache; numoe_attention_latent reads a row as the key of one shared KV
 * head and its first kv_lora elements as the value (attend_one's value_stride). */
/* Included before any target pragma (see kernels_avx2.c). */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "internal.h"
#include "numoe.h"

enum {
    /* Attention of fewer multiply-adds than this runs on the calling thread: a fork/join
     * costs a few microseconds, the whole decode attention of a short context less. */
    ATTENTION_MIN_PARALLEL_FLOPS = 1 << 18
};

/* The inner loops, one table per ISA. `cache_type` rows are float32 or fp16 bit patterns. */
typedef struct {
    float (*dot_f32)(int64_t n, const float *a, const float *b);
    float (*dot_f16)(int64_t n, const float *a, const numoe_half *b);
    void (*axpy_f32)(int64_t n, float alpha, const float *x, float *y);    /* y += alpha x */
    void (*axpy_f16)(int64_t n, float alpha, const numoe_half *x, float *y);
    float (*sum_squares)(int64_t n, const float *x);
    void (*scale_add)(int64_t n, const float *x, float s, const float *w, const float *residual,
                      float *out);                           /* out = residual + x * s * w */
    void (*rotate_neox)(int64_t half, float *x, const float *cos, const float *sin);
} ops_kernels;

/* --- scalar reference ------------------------------------------------------------------ */

static float dot_f32_ref(int64_t n, const float *a, const float *b) {
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
}

static float dot_f16_ref(int64_t n, const float *a, const numoe_half *b) {
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) sum += a[i] * numoe_half_to_float(b[i]);
    return sum;
}

static void axpy_f32_ref(int64_t n, float alpha, const float *x, float *y) {
    for (int64_t i = 0; i < n; i++) y[i] += alpha * x[i];
}

static void axpy_f16_ref(int64_t n, float alpha, const numoe_half *x, float *y) {
    for (int64_t i = 0; i < n; i++) y[i] += alpha * numoe_half_to_float(x[i]);
}

static float sum_squares_ref(int64_t n, const float *x) {
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) sum += x[i] * x[i];
    return sum;
}

static void scale_add_ref(int64_t n, const float *x, float s, const float *w,
                          const float *residual, float *out) {
    for (int64_t i = 0; i < n; i++) {
        const float v = x[i] * s * w[i];
        out[i] = residual != NULL ? residual[i] + v : v;
    }
}

/* Pairs (i, i + half): x0' = x0 cos - x1 sin, x1' = x1 cos + x0 sin. */
static void rotate_neox_ref(int64_t half, float *x, const float *cos, const float *sin) {
    for (int64_t i = 0; i < half; i++) {
        const float x0 = x[i], x1 = x[i + half];
        x[i] = x0 * cos[i] - x1 * sin[i];
        x[i + half] = x1 * cos[i] + x0 * sin[i];
    }
}

static const ops_kernels ops_scalar = {
    dot_f32_ref, dot_f16_ref, axpy_f32_ref, axpy_f16_ref, sum_squares_ref, scale_add_ref,
    rotate_neox_ref,
};

/* --- AVX2 + FMA + F16C ------------------------------------------------------------------ */
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 load8_half(const numoe_half *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

/* Two accumulators hide the FMA latency; a scalar tail covers n % 16. */
static float dot_f32_avx2(int64_t n, const float *a, const float *b) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    float sum = hsum8(_mm256_add_ps(acc0, acc1));
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

static float dot_f16_avx2(int64_t n, const float *a, const numoe_half *b) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8_half(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8_half(b + i + 8), acc1);
    }
    float sum = hsum8(_mm256_add_ps(acc0, acc1));
    for (; i < n; i++) sum += a[i] * _cvtsh_ss(b[i]);
    return sum;
}

static void axpy_f32_avx2(int64_t n, float alpha, const float *x, float *y) {
    const __m256 a = _mm256_set1_ps(alpha);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += alpha * x[i];
}

static void axpy_f16_avx2(int64_t n, float alpha, const numoe_half *x, float *y) {
    const __m256 a = _mm256_set1_ps(alpha);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, load8_half(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += alpha * _cvtsh_ss(x[i]);
}

static float sum_squares_avx2(int64_t n, const float *x) {
    return dot_f32_avx2(n, x, x);
}

static void scale_add_avx2(int64_t n, const float *x, float s, const float *w,
                           const float *residual, float *out) {
    const __m256 scale = _mm256_set1_ps(s);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), scale),
                                 _mm256_loadu_ps(w + i));
        if (residual != NULL) v = _mm256_add_ps(_mm256_loadu_ps(residual + i), v);
        _mm256_storeu_ps(out + i, v);
    }
    for (; i < n; i++) {
        const float v = x[i] * s * w[i];
        out[i] = residual != NULL ? residual[i] + v : v;
    }
}

static void rotate_neox_avx2(int64_t half, float *x, const float *cos, const float *sin) {
    int64_t i = 0;
    for (; i + 8 <= half; i += 8) {
        const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + half);
        const __m256 c = _mm256_loadu_ps(cos + i), s = _mm256_loadu_ps(sin + i);
        _mm256_storeu_ps(x + i, _mm256_fmsub_ps(x0, c, _mm256_mul_ps(x1, s)));
        _mm256_storeu_ps(x + i + half, _mm256_fmadd_ps(x1, c, _mm256_mul_ps(x0, s)));
    }
    for (; i < half; i++) {
        const float x0 = x[i], x1 = x[i + half];
        x[i] = x0 * cos[i] - x1 * sin[i];
        x[i + half] = x1 * cos[i] + x0 * sin[i];
    }
}

static const ops_kernels ops_avx2 = {
    dot_f32_avx2, dot_f16_avx2, axpy_f32_avx2, axpy_f16_avx2, sum_squares_avx2, scale_add_avx2,
    rotate_neox_avx2,
};

#pragma GCC pop_options

static const ops_kernels *active_ops(void) {
    return numoe_get_isa() >= NUMOE_ISA_AVX2 ? &ops_avx2 : &ops_scalar;
}

/* --- RMSNorm ------------------------------------------------------------------------------ */

int numoe_rms_norm(const float *x, const float *weight, int64_t n_rows, int64_t n, float eps,
                   const float *residual, float *out) {
    if (x == NULL || weight == NULL || out == NULL) return NUMOE_EBADARG;
    if (n <= 0 || n_rows < 0) return NUMOE_EBADSHAPE;
    const ops_kernels *k = active_ops();
    for (int64_t r = 0; r < n_rows; r++) {
        const float *row = x + r * n;
        /* The sum is taken before `out` is written, so out may alias x or residual. */
        const float inv_rms = 1.0f / sqrtf(k->sum_squares(n, row) / (float)n + eps);
        k->scale_add(n, row, inv_rms, weight, residual != NULL ? residual + r * n : NULL,
                     out + r * n);
    }
    return NUMOE_OK;
}

/* --- RoPE ------------------------------------------------------------------------------- */

static void rotate_rows(const ops_kernels *k, float *x, int64_t n_tokens, int64_t n_heads,
                        int64_t head_dim, const float *cos, const float *sin, int neox) {
    const int64_t half = head_dim / 2;
    for (int64_t t = 0; t < n_tokens; t++) {
        const float *c = cos + t * half, *s = sin + t * half;
        for (int64_t h = 0; h < n_heads; h++) {
            float *row = x + (t * n_heads + h) * head_dim;
            if (neox) {
                k->rotate_neox(half, row, c, s);
            } else {
                /* Pairs (2i, 2i + 1): a stride-2 shuffle, rare in the models numoe runs. */
                for (int64_t i = 0; i < half; i++) {
                    const float x0 = row[2 * i], x1 = row[2 * i + 1];
                    row[2 * i] = x0 * c[i] - x1 * s[i];
                    row[2 * i + 1] = x1 * c[i] + x0 * s[i];
                }
            }
        }
    }
}

int numoe_rope(float *q, int64_t n_q_heads, float *k, int64_t n_k_heads, int64_t n_tokens,
               int64_t head_dim, const float *cos, const float *sin, int neox) {
    if (cos == NULL || sin == NULL) return NUMOE_EBADARG;
    if ((q == NULL && n_q_heads > 0) || (k == NULL && n_k_heads > 0)) return NUMOE_EBADARG;
    if (head_dim <= 0 || head_dim % 2 || n_tokens < 0 || n_q_heads < 0 || n_k_heads < 0)
        return NUMOE_EBADSHAPE;
    const ops_kernels *ops = active_ops();
    if (n_q_heads > 0) rotate_rows(ops, q, n_tokens, n_q_heads, head_dim, cos, sin, neox);
    if (n_k_heads > 0) rotate_rows(ops, k, n_tokens, n_k_heads, head_dim, cos, sin, neox);
    return NUMOE_OK;
}

/* --- attention --------------------------------------------------------------------------- */

static void store_rows(int cache_type, void *cache, const float *src, int64_t n_tokens,
                       int64_t n_kv_heads, int64_t n_ctx, int64_t dim, int64_t start) {
    for (int64_t t = 0; t < n_tokens; t++) {
        for (int64_t h = 0; h < n_kv_heads; h++) {
            const float *from = src + (t * n_kv_heads + h) * dim;
            const int64_t row = h * n_ctx + start + t;
            if (cache_type == NUMOE_TYPE_F32) {
                float *to = (float *)cache + row * dim;
                for (int64_t i = 0; i < dim; i++) to[i] = from[i];
            } else {
                numoe_half *to = (numoe_half *)cache + row * dim;
                for (int64_t i = 0; i < dim; i++) to[i] = numoe_float_to_half(from[i]);
            }
        }
    }
}

/* One query row against keys [first, last] of its KV head -> out [value_dim]. Key p starts at
 * keys + p * head_dim, value p at values + p * value_stride (elements): value_stride is
 * value_dim for a separate value cache, and the latent row width for MLA, whose values are
 * the first value_dim elements of the key rows themselves. */
static void attend_one(const ops_kernels *k, const float *q, const void *keys,
                       const void *values, int cache_type, int64_t head_dim, int64_t value_dim,
                       int64_t value_stride, int64_t first, int64_t last, float scale,
                       float *scores, float *out) {
    const int64_t n_keys = last - first + 1;
    float max_score = -INFINITY;
    for (int64_t j = 0; j < n_keys; j++) {
        const int64_t p = first + j;
        const float dot = cache_type == NUMOE_TYPE_F32
            ? k->dot_f32(head_dim, q, (const float *)keys + p * head_dim)
            : k->dot_f16(head_dim, q, (const numoe_half *)keys + p * head_dim);
        scores[j] = dot * scale;
        if (scores[j] > max_score) max_score = scores[j];
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < n_keys; j++) {
        scores[j] = expf(scores[j] - max_score);
        sum += scores[j];
    }
    const float inv_sum = 1.0f / sum;
    for (int64_t i = 0; i < value_dim; i++) out[i] = 0.0f;
    for (int64_t j = 0; j < n_keys; j++) {
        const int64_t p = first + j;
        if (cache_type == NUMOE_TYPE_F32)
            k->axpy_f32(value_dim, scores[j] * inv_sum,
                        (const float *)values + p * value_stride, out);
        else
            k->axpy_f16(value_dim, scores[j] * inv_sum,
                        (const numoe_half *)values + p * value_stride, out);
    }
}

/* Every (token, head) pair of new tokens against the cache, rows already stored. KV head kv's
 * keys start kv * n_ctx * head_dim elements into k_cache, its values kv * n_ctx * value_stride
 * into v_cache. */
static int attend_all(const float *q, int cache_type, const void *k_cache, const void *v_cache,
                      int64_t n_tokens, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                      int64_t value_dim, int64_t value_stride, int64_t n_ctx, int64_t start,
                      float scale, int64_t sliding_window, float *out) {
    const ops_kernels *k = active_ops();
    const int64_t group = n_heads / n_kv_heads;  /* query heads per KV head */
    const int64_t elem = cache_type == NUMOE_TYPE_F32 ? 4 : 2;
    const int64_t n_items = n_tokens * n_heads;
    const int64_t max_keys = start + n_tokens;
    const double flops = (double)n_items * max_keys * (head_dim + value_dim);
    int status = NUMOE_OK;
#pragma omp parallel num_threads(numoe_active_threads()) \
    if (n_items > 1 && flops >= ATTENTION_MIN_PARALLEL_FLOPS)
    {
        float *scores = malloc((size_t)max_keys * sizeof(float));  /* this thread's softmax row */
        if (scores == NULL) {
#pragma omp atomic write
            status = NUMOE_EBADSHAPE;
        }
        /* Dynamic: the machine is shared, and causal rows differ in length. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < n_items; item++) {
            if (scores == NULL) continue;
            const int64_t t = item / n_heads, h = item % n_heads, kv = h / group;
            const int64_t pos = start + t;
            /* A key at p is visible from pos iff p <= pos and (no window or pos - p < window). */
            const int64_t first =
                sliding_window > 0 && pos - sliding_window + 1 > 0 ? pos - sliding_window + 1 : 0;
            const uint8_t *keys = (const uint8_t *)k_cache + kv * n_ctx * head_dim * elem;
            const uint8_t *values = (const uint8_t *)v_cache + kv * n_ctx * value_stride * elem;
            attend_one(k, q + item * head_dim, keys, values, cache_type, head_dim, value_dim,
                       value_stride, first, pos, scale, scores, out + item * value_dim);
        }
        free(scores);
    }
    return status;
}

int numoe_attention(const float *q, const float *k_new, const float *v_new, int64_t n_tokens,
                    int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t value_dim,
                    int cache_type, void *k_cache, void *v_cache, int64_t n_ctx, int64_t start,
                    float scale, int64_t sliding_window, float *out) {
    if (q == NULL || k_new == NULL || v_new == NULL || k_cache == NULL || v_cache == NULL ||
        out == NULL)
        return NUMOE_EBADARG;
    if (cache_type != NUMOE_TYPE_F32 && cache_type != NUMOE_TYPE_F16) return NUMOE_EBADTYPE;
    if (n_tokens < 0 || n_heads <= 0 || n_kv_heads <= 0 || n_heads % n_kv_heads ||
        head_dim <= 0 || value_dim <= 0 || start < 0 || n_ctx <= 0 || start + n_tokens > n_ctx ||
        sliding_window < 0)
        return NUMOE_EBADSHAPE;
    if (n_tokens == 0) return NUMOE_OK;
    store_rows(cache_type, k_cache, k_new, n_tokens, n_kv_heads, n_ctx, head_dim, start);
    store_rows(cache_type, v_cache, v_new, n_tokens, n_kv_heads, n_ctx, value_dim, start);

    return attend_all(q, cache_type, k_cache, v_cache, n_tokens, n_heads, n_kv_heads, head_dim,
                      value_dim, value_dim, n_ctx, start, scale, sliding_window, out);
}

/* MLA (DeepSeek) absorbed attention: one shared KV head whose key is the cached latent row
 * [width = kv_lora + rope] and whose value is that row's first value_dim (kv_lora) elements,
 * so the cache holds each token once (llama.cpp's MLA layout). */
int numoe_attention_latent(const float *q, const float *latent_new, int64_t n_tokens,
                           int64_t n_heads, int64_t width, int64_t value_dim, int cache_type,
                           void *cache, int64_t n_ctx, int64_t start, float scale, float *out) {
    if (q == NULL || latent_new == NULL || cache == NULL || out == NULL) return NUMOE_EBADARG;
    if (cache_type != NUMOE_TYPE_F32 && cache_type != NUMOE_TYPE_F16) return NUMOE_EBADTYPE;
    if (n_tokens < 0 || n_heads <= 0 || width <= 0 || value_dim <= 0 || value_dim > width ||
        start < 0 || n_ctx <= 0 || start + n_tokens > n_ctx)
        return NUMOE_EBADSHAPE;
    if (n_tokens == 0) return NUMOE_OK;
    store_rows(cache_type, cache, latent_new, n_tokens, 1, n_ctx, width, start);
    return attend_all(q, cache_type, cache, cache, n_tokens, n_heads, 1, width, value_dim, width,
                      n_ctx, start, scale, 0, out);
}
