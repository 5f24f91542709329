"""Grouped-query attention over a preallocated KV cache, causal, with an optional sliding window.

KV cache layout is head-major, per layer [n_kv_heads, n_ctx, head_dim], rather than
[n_ctx, n_kv_heads, head_dim]: each KV head's keys are then one contiguous
[n_ctx, head_dim] block, so q @ K^T for a head group is a plain strided matmul with no copy,
and a worker that owns a subset of KV heads (tensor parallel by head group) owns a contiguous
slice of the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np


class KVCache:
    """Keys and values of every layer for positions [0, n_ctx), in `dtype` (the activation
    dtype, or float16 to halve the memory and round as llama.cpp's default F16 cache does).

    `heads` is the number of KV heads kept per layer: the model's for one worker; for a
    tensor-parallel worker its own head group, and 0 for a layer whose attention another
    worker computes. One allocation each for keys and values; layer views are made once."""

    def __init__(self, heads: Sequence[int], n_ctx: int, head_dim: int, value_head_dim: int,
                 dtype: np.dtype) -> None:
        self.n_ctx = n_ctx
        total_heads = sum(heads)
        self.keys = np.zeros((total_heads, n_ctx, head_dim), dtype)  # [sum heads, C, d]
        self.values = np.zeros((total_heads, n_ctx, value_head_dim), dtype)  # [sum heads, C, dv]
        bounds = list(pairwise(np.cumsum([0, *heads])))  # [L] first, last head of each layer
        # The native attention takes one layer's contiguous block.
        self.layer_keys = [self.keys[a:b] for a, b in bounds]  # L x [h, C, d]
        self.layer_values = [self.values[a:b] for a, b in bounds]  # L x [h, C, dv]

    @property
    def n_bytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class LatentCache:
    """Multi-head latent attention's cache (DeepSeek, Kimi): per layer [n_ctx, kv_lora + rope],
    the normed latent then the roped shared key of each position, and nothing per head (every
    head's key and value are decompressed from it, or the query is absorbed into its space).

    `held` says per layer whether this worker computes that layer's attention (a layer another
    worker computes keeps no rows). In `dtype`: the activation dtype or float16."""

    def __init__(self, held: Sequence[bool], n_ctx: int, width: int, dtype: np.dtype) -> None:
        self.n_ctx = n_ctx
        self.latents = np.zeros((sum(held), n_ctx, width), dtype)  # [layers held, C, width]
        index = np.cumsum([0, *held])  # [L + 1]
        empty = np.zeros((0, width), dtype)
        self.layer_latents = [self.latents[index[layer]] if is_held else empty
                              for layer, is_held in enumerate(held)]  # L x [C, width]

    @property
    def n_bytes(self) -> int:
        return self.latents.nbytes


def attention(
    q: np.ndarray,
    k_new: np.ndarray,
    v_new: np.ndarray,
    cache: KVCache,
    layer: int,
    start: int,
    scale: float,
    sliding_window: int = 0,
) -> np.ndarray:
    """Attend T new queries at positions [start, start + T) to every visible cached key.

    q [T, n_heads, d], k_new [T, n_kv, d], v_new [T, n_kv, dv] (already normed and roped).
    Query head h reads KV head h // (n_heads / n_kv), as in llama.cpp and transformers.
    A key at p0 is visible from a query at p1 iff p0 <= p1 and (no window or p1 - p0 < window).
    Returns [T, n_heads * dv].
    """
    n_tokens, n_heads, head_dim = q.shape
    n_kv = k_new.shape[1]
    group = n_heads // n_kv
    end = start + n_tokens
    layer_keys, layer_values = cache.layer_keys[layer], cache.layer_values[layer]
    layer_keys[:, start:end] = k_new.transpose(1, 0, 2)
    layer_values[:, start:end] = v_new.transpose(1, 0, 2)

    # The first key any of the new queries can see: older keys fall outside every window.
    first = max(0, start - sliding_window + 1) if sliding_window > 0 else 0
    # A float16 cache is read back in the activation dtype, as the native kernel does.
    keys = layer_keys[:, first:end].astype(q.dtype, copy=False)  # [n_kv, S, d]
    values = layer_values[:, first:end].astype(q.dtype, copy=False)  # [n_kv, S, dv]
    n_keys = end - first

    # Rows of each KV head's query block are ordered (head in group, token).
    q_grouped = q.reshape(n_tokens, n_kv, group, head_dim).transpose(1, 2, 0, 3)
    q_grouped = q_grouped.reshape(n_kv, group * n_tokens, head_dim)  # [n_kv, G*T, d]
    scores = np.matmul(q_grouped, keys.transpose(0, 2, 1))  # [n_kv, G*T, S]
    scores *= scale

    if n_tokens > 1 or (sliding_window > 0 and start - first + 1 > sliding_window):
        query_pos = np.arange(start, end)[:, None]  # [T, 1]
        key_pos = np.arange(first, end)[None, :]  # [1, S]
        visible = key_pos <= query_pos  # [T, S]
        if sliding_window > 0:
            visible &= query_pos - key_pos < sliding_window
        scores4 = scores.reshape(n_kv, group, n_tokens, n_keys)
        scores4[:, :, ~visible] = -np.inf

    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    out = np.matmul(scores, values)  # [n_kv, G*T, dv]
    out = out.reshape(n_kv, group, n_tokens, -1).transpose(2, 0, 1, 3)  # [T, n_kv, G, dv]
    return out.reshape(n_tokens, -1)  # [T, n_heads * dv]
