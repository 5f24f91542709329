"""Multi-head latent attention (MLA) of DeepSeek-V2/V3, R1 and Kimi-K2 for one layer, in numpy.

Each token's keys and values come from one small latent: c_kv [kv_lora_rank] (RMS-normed) plus
one RoPE key k_pe [qk_rope_head_dim] shared by every head. The cache keeps only those
kv_lora_rank + qk_rope_head_dim values per token (llama.cpp's concat(kv_cmpr, k_pe) order), not
per-head keys and values. Two equal ways to attend over it:

* expanded (absorbed=False): per head, k_nope = k_b c_kv and v = v_b c_kv for every cached token,
  then plain causal attention with key [k_nope, k_pe] (transformers' DeepseekV3Attention);
* absorbed (absorbed=True): k_b moves onto the query instead, q_latent = k_b^T q_nope, so
  q_nope . k_nope = q_latent . c_kv and attention runs in the latent space; the softmax-weighted
  latent is mapped to the head's value by v_b once per query, not once per cached token
  (llama.cpp's MLA path). Decode then reads kv_lora + rope values per cached token instead of
  n_heads * (nope + rope + v).

Weights are in the GGUF orientation, [n_out, n_in] per matrix, as llama.cpp's tensors read into
numpy. RoPE is DeepSeek's interleaved ("normal") pairing, (2i, 2i + 1), rotated in place as ggml
does; transformers de-interleaves its output instead, which permutes q_pe and k_pe alike and so
leaves every q . k unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from worker.layers.norm import rms_norm


@dataclass(frozen=True)
class MlaWeights:
    """One layer's MLA weights, float64, [n_out, n_in] like every numoe matrix.

    k_b and v_b are llama.cpp's split tensors (attn_k_b, attn_v_b), whose ggml shapes
    {nope, kv_lora, n_heads} and {kv_lora, v, n_heads} read into numpy as below: per head,
    k_b[h] maps a nope query into the latent (q_latent = k_b[h] @ q_nope) and v_b[h] maps a
    latent to a value (v = v_b[h] @ c_kv). Files with the older combined attn_kv_b go through
    `split_kv_b`.
    """

    q_a: np.ndarray  # [q_lora, H]
    q_a_norm: np.ndarray  # [q_lora]
    q_b: np.ndarray  # [n_heads * (nope + rope), q_lora], per head nope rows then rope rows
    kv_a_mqa: np.ndarray  # [kv_lora + rope, H], latent rows then the shared RoPE key rows
    kv_a_norm: np.ndarray  # [kv_lora]
    k_b: np.ndarray  # [n_heads, kv_lora, nope]
    v_b: np.ndarray  # [n_heads, v, kv_lora]
    o: np.ndarray  # [H, n_heads * v]

    @property
    def n_heads(self) -> int:
        return self.k_b.shape[0]

    @property
    def kv_lora_rank(self) -> int:
        return self.k_b.shape[1]

    @property
    def nope_dim(self) -> int:
        """Per-head query/key dimensions without position (qk_nope_head_dim)."""
        return self.k_b.shape[2]

    @property
    def rope_dim(self) -> int:
        """Per-head query/key dimensions that carry RoPE (qk_rope_head_dim)."""
        return self.kv_a_mqa.shape[0] - self.kv_lora_rank

    @property
    def value_dim(self) -> int:
        return self.v_b.shape[1]

    @property
    def cache_width(self) -> int:
        """Cached values per token: the normed latent and the roped shared key."""
        return self.kv_lora_rank + self.rope_dim


def split_kv_b(kv_b: np.ndarray, n_heads: int, nope_dim: int,
               value_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The combined attn_kv_b [n_heads * (nope + v), kv_lora] (transformers' kv_b_proj.weight:
    per head, nope key rows then v value rows) -> (k_b [n_heads, kv_lora, nope],
    v_b [n_heads, v, kv_lora]), as llama.cpp's converter splits it."""
    per_head = kv_b.reshape(n_heads, nope_dim + value_dim, -1)  # [n_heads, nope + v, kv_lora]
    k_rows = per_head[:, :nope_dim]  # [n_heads, nope, kv_lora]
    k_b = np.ascontiguousarray(k_rows.transpose(0, 2, 1))  # [n_heads, kv_lora, nope]
    v_b = np.ascontiguousarray(per_head[:, nope_dim:])  # [n_heads, v, kv_lora]
    return k_b, v_b


def new_mla_cache(n_ctx: int, weights: MlaWeights) -> np.ndarray:
    """An empty cache for one layer: [n_ctx, kv_lora + rope] float64."""
    return np.zeros((n_ctx, weights.cache_width), np.float64)  # [C, kv_lora + rope]


def rope_interleaved(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate pairs (2i, 2i + 1) of x [T, ..., rope] by cos, sin [T, rope / 2] (one row per
    token; a YaRN rope factor is already folded into them). Returns a new array."""
    extra_axes = (1,) * (x.ndim - 2)
    cos = cos.reshape(cos.shape[0], *extra_axes, cos.shape[1])  # [T, 1.., rope/2]
    sin = sin.reshape(sin.shape[0], *extra_axes, sin.shape[1])
    even, odd = x[..., 0::2], x[..., 1::2]  # [T, ..., rope/2] each
    out = np.empty_like(x)  # [T, ..., rope]
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = odd * cos + even * sin
    return out


def mla_attention(x: np.ndarray, weights: MlaWeights, cache: np.ndarray, start: int,
                  cos: np.ndarray, sin: np.ndarray, scale: float, absorbed: bool,
                  eps: float = 1e-6) -> np.ndarray:
    """One MLA layer for T new tokens at positions [start, start + T), causal.

    x [T, H] is the attention-normed hidden state; cache [n_ctx, kv_lora + rope] receives this
    call's latents at rows [start, start + T) and must hold the earlier positions' rows.
    cos, sin [n_ctx, rope / 2] are the RoPE (or YaRN) tables; scale multiplies q . k (for YaRN
    it carries mscale^2, see worker.layers.yarn.yarn_softmax_scale); eps is both RMSNorms'.
    Returns the attention output after o: [T, H].
    """
    n_tokens = x.shape[0]
    end = start + n_tokens
    if end > cache.shape[0] or cache.shape[1] != weights.cache_width:
        raise ValueError(f"cache {cache.shape} cannot hold positions [{start}, {end}) of width "
                         f"{weights.cache_width}")
    n_heads, kv_lora, nope = weights.n_heads, weights.kv_lora_rank, weights.nope_dim
    cos_new, sin_new = cos[start:end], sin[start:end]  # [T, rope/2]

    q_latent = rms_norm(x @ weights.q_a.T, weights.q_a_norm, eps)  # [T, q_lora]
    q = (q_latent @ weights.q_b.T).reshape(n_tokens, n_heads, -1)  # [T, n_heads, nope + rope]
    q_nope = q[..., :nope]  # [T, n_heads, nope]
    q_pe = rope_interleaved(q[..., nope:], cos_new, sin_new)  # [T, n_heads, rope]

    kv_a = x @ weights.kv_a_mqa.T  # [T, kv_lora + rope]
    latent_new = np.empty_like(kv_a)  # [T, kv_lora + rope]: this call's cache rows
    latent_new[:, :kv_lora] = rms_norm(kv_a[:, :kv_lora], weights.kv_a_norm, eps)
    latent_new[:, kv_lora:] = rope_interleaved(kv_a[:, kv_lora:], cos_new, sin_new)
    if absorbed:
        q_absorbed = np.einsum("thn,hln->thl", q_nope, weights.k_b)  # [T, n_heads, kv_lora]
        q_latent_space = np.concatenate([q_absorbed, q_pe], axis=-1)  # [T, n_heads, width]
        latent_out = latent_attention(q_latent_space, latent_new, cache, start, scale,
                                      kv_lora)  # [T, n_heads, kv_lora]
        heads_out = np.einsum("thl,hvl->thv", latent_out, weights.v_b)  # [T, n_heads, v]
    else:
        cache[start:end] = latent_new
        heads_out = expanded_attention(q_nope, q_pe, cache, start, weights.k_b, weights.v_b,
                                       scale)  # [T, n_heads, v]
    return heads_out.reshape(n_tokens, -1) @ weights.o.T  # [T, H]


def latent_attention(q: np.ndarray, latent_new: np.ndarray, cache: np.ndarray, start: int,
                     scale: float, value_dim: int) -> np.ndarray:
    """The absorbed form's attention: multi-query attention with one shared head whose key is
    the cached row [kv_lora + rope] and whose value is that row's first value_dim (= kv_lora)
    elements, so no separate value cache exists.

    q [T, n_heads, width] (the absorbed nope query then the roped query), latent_new [T, width]
    written to cache [n_ctx, width] rows [start, start + T) (rounded to the cache's dtype), causal.
    Returns [T, n_heads, value_dim] in q's dtype."""
    end = start + q.shape[0]
    cache[start:end] = latent_new
    keys = cache[:end].astype(q.dtype, copy=False)  # [S, width], S = end
    scores = np.einsum("thw,sw->hts", q, keys)  # [n_heads, T, S]
    probs = _causal_softmax(scores * scale, start)  # [n_heads, T, S]
    return np.einsum("hts,sv->thv", probs, keys[:, :value_dim])  # [T, n_heads, value_dim]


def expanded_attention(q_nope: np.ndarray, q_pe: np.ndarray, cache: np.ndarray, start: int,
                       k_b: np.ndarray, v_b: np.ndarray, scale: float) -> np.ndarray:
    """The expanded form over a cache already holding rows [0, start + T): per head, keys
    [k_b c_kv, k_pe] and values v_b c_kv decompressed for every cached position, then causal
    attention. q_nope [T, n_heads, nope], q_pe [T, n_heads, rope] (roped), k_b, v_b as in
    MlaWeights (dense). Returns [T, n_heads, v]."""
    kv_lora = k_b.shape[1]
    end = start + q_nope.shape[0]
    rows = cache[:end].astype(q_nope.dtype, copy=False)  # [S, kv_lora + rope]
    latent, k_pe = rows[:, :kv_lora], rows[:, kv_lora:]  # [S, kv_lora], [S, rope]
    k_nope = np.einsum("sl,hln->hsn", latent, k_b)  # [n_heads, S, nope]
    scores = np.einsum("thn,hsn->hts", q_nope, k_nope)  # [n_heads, T, S]
    scores += np.einsum("thr,sr->hts", q_pe, k_pe)  # the RoPE part: one key shared by all heads
    probs = _causal_softmax(scores * scale, start)  # [n_heads, T, S]
    values = np.einsum("sl,hvl->hsv", latent, v_b)  # [n_heads, S, v]
    return np.einsum("hts,hsv->thv", probs, values)  # [T, n_heads, v]


def _causal_softmax(scores: np.ndarray, start: int) -> np.ndarray:
    """Softmax over keys of scores [n_heads, T, S] where query t sits at position start + t and
    sees keys 0..start + t."""
    n_tokens, n_keys = scores.shape[1:]
    query_pos = start + np.arange(n_tokens)[:, None]  # [T, 1]
    hidden = np.arange(n_keys)[None, :] > query_pos  # [T, S], keys in the future
    masked = np.where(hidden, -np.inf, scores)  # [n_heads, T, S]
    masked -= masked.max(axis=-1, keepdims=True)  # each row sees key 0, so the max is finite
    weights = np.exp(masked)  # [n_heads, T, S]
    return weights / weights.sum(axis=-1, keepdims=True)
