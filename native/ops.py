"""Python face of the native layer ops (numoe.h, section "layer ops"): RMSNorm, RoPE and
attention over a KV cache, on float32 numpy arrays. The weight products (matmul, dense gated
FFN, MoE) live in native/kernels.py.

These run about a dozen times per layer per token, where a microsecond of Python per call is
several percent of a decode step. So the checks are the cheap ones that keep C from reading or
writing past a buffer: dtypes and element counts here, while `ffi.from_buffer` itself refuses
arrays that are not C-contiguous, and read-only arrays where C writes. Shapes follow the
forward pass: x [rows, n], q [T, n_heads, d], one layer's KV cache [n_kv_heads, n_ctx, d].
"""

from __future__ import annotations

from typing import Any

import numpy as np

from native._numoe_native import ffi, lib

_F32 = np.dtype(np.float32)
# The KV cache dtypes the attention kernel reads, as ggml type ids.
CACHE_TYPES: dict[np.dtype, int] = {
    np.dtype(np.float32): lib.NUMOE_TYPE_F32,
    np.dtype(np.float16): lib.NUMOE_TYPE_F16,
}


def _floats(x: np.ndarray, what: str, writable: bool = False) -> Any:
    """A float* over x (no copy). from_buffer refuses non-contiguous and, when writing,
    read-only arrays."""
    if x.dtype != _F32:
        raise ValueError(f"{what} must be float32, got {x.dtype}")
    return ffi.from_buffer("float[]", x, writable)


def _check(status: int, call: str) -> None:
    if status < 0:
        raise ValueError(f"{call}: bad arguments (status {status})")


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, residual: np.ndarray | None = None,
             out: np.ndarray | None = None) -> np.ndarray:
    """residual + x / sqrt(mean(x^2, last axis) + eps) * weight, for x [..., n], weight [n].
    `out` (x's shape) may be x or residual itself; a new array when None."""
    n = x.shape[-1]
    if weight.size != n:
        raise ValueError(f"rms_norm: weight has {weight.size} elements, rows have {n}")
    if residual is not None and residual.size != x.size:
        raise ValueError(f"rms_norm: residual {list(residual.shape)} must match x "
                         f"{list(x.shape)}")
    if out is None:
        out = np.empty(x.shape, _F32)
    elif out.size != x.size:
        raise ValueError(f"rms_norm: out {list(out.shape)} must match x {list(x.shape)}")
    status = lib.numoe_rms_norm(
        _floats(x, "rms_norm x"), _floats(weight, "rms_norm weight"), x.size // n, n, eps,
        ffi.NULL if residual is None else _floats(residual, "rms_norm residual"),
        _floats(out, "rms_norm out", writable=True),
    )
    _check(status, "rms_norm")
    return out


def rope(q: np.ndarray, k: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool) -> None:
    """Rotates q [T, n_q_heads, d] and k [T, n_k_heads, d] in place; cos, sin [T, d/2] are the
    table rows of the T positions. NeoX pairs (i, i + d/2), else (2i, 2i + 1)."""
    if q.ndim != 3 or k.ndim != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"rope: q {list(q.shape)} and k {list(k.shape)} must be [T, heads, d] "
                         "with the same T and d")
    n_tokens, n_q_heads, head_dim = q.shape
    if cos.shape != (n_tokens, head_dim // 2) or sin.shape != cos.shape:
        raise ValueError(f"rope: cos {list(cos.shape)} and sin {list(sin.shape)} must be "
                         f"[{n_tokens}, {head_dim // 2}]")
    status = lib.numoe_rope(
        _floats(q, "rope q", writable=True), n_q_heads, _floats(k, "rope k", writable=True),
        k.shape[1], n_tokens, head_dim, _floats(cos, "rope cos"), _floats(sin, "rope sin"),
        int(neox),
    )
    _check(status, "rope")


def attention(q: np.ndarray, k_new: np.ndarray, v_new: np.ndarray, k_cache: np.ndarray,
              v_cache: np.ndarray, start: int, scale: float, sliding_window: int = 0,
              out: np.ndarray | None = None) -> np.ndarray:
    """Stores k_new, v_new at positions [start, start + T) of one layer's cache, then attends the
    T queries to every visible key -> [T, n_heads * dv].

    q [T, n_heads, d], k_new [T, n_kv, d], v_new [T, n_kv, dv] float32; k_cache [n_kv, n_ctx, d]
    and v_cache [n_kv, n_ctx, dv] float32 or float16, written in place. Query head h reads KV
    head h // (n_heads / n_kv); a key at p0 is visible from p1 iff p0 <= p1 and (no window or
    p1 - p0 < sliding_window)."""
    cache_type = CACHE_TYPES.get(k_cache.dtype)
    if cache_type is None or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"attention: the KV cache must be float32 or float16, got "
                         f"{k_cache.dtype} / {v_cache.dtype}")
    if k_cache.ndim != 3 or v_cache.ndim != 3:
        raise ValueError("attention: the caches must be one layer's [n_kv, n_ctx, dim]")
    n_tokens, n_heads, head_dim = q.shape
    n_kv, n_ctx, _ = k_cache.shape
    value_dim = v_cache.shape[2]
    if (k_new.shape != (n_tokens, n_kv, head_dim) or v_new.shape != (n_tokens, n_kv, value_dim)
            or k_cache.shape[2] != head_dim or v_cache.shape[:2] != (n_kv, n_ctx)):
        raise ValueError(
            f"attention: shapes disagree: q {list(q.shape)}, k_new {list(k_new.shape)}, "
            f"v_new {list(v_new.shape)}, k_cache {list(k_cache.shape)}, "
            f"v_cache {list(v_cache.shape)}")
    if n_heads % n_kv or start < 0 or start + n_tokens > n_ctx or sliding_window < 0:
        raise ValueError(f"attention: need n_heads ({n_heads}) a multiple of n_kv ({n_kv}), "
                         f"positions [{start}, {start + n_tokens}) within [0, {n_ctx}) and a "
                         f"window >= 0 (got {sliding_window})")
    if out is None:
        out = np.empty((n_tokens, n_heads * value_dim), np.float32)  # [T, n_heads * dv]
    elif out.size != n_tokens * n_heads * value_dim:
        raise ValueError(f"attention: out {list(out.shape)} must hold "
                         f"[{n_tokens}, {n_heads * value_dim}]")
    status = lib.numoe_attention(
        _floats(q, "attention q"), _floats(k_new, "attention k_new"),
        _floats(v_new, "attention v_new"), n_tokens, n_heads, n_kv, head_dim, value_dim,
        cache_type, ffi.from_buffer(k_cache, require_writable=True),
        ffi.from_buffer(v_cache, require_writable=True), n_ctx,
        start, scale, sliding_window, _floats(out, "attention out", writable=True),
    )
    _check(status, "attention")
    return out


def attention_latent(q: np.ndarray, latent_new: np.ndarray, cache_layer: np.ndarray, start: int,
                     scale: float, value_dim: int, out: np.ndarray | None = None) -> np.ndarray:
    """MLA (DeepSeek) absorbed attention of one layer: stores latent_new at positions
    [start, start + T) of the latent cache, then attends the T queries causally to every cached
    row -> [T, n_heads, value_dim].

    One KV head shared by all query heads: a row's key is the whole cached latent row
    [width = kv_lora + rope], its value the row's first value_dim (kv_lora) elements.
    q [T, n_heads, width] (roped, not scaled) and latent_new [T, width] float32;
    cache_layer [n_ctx, width] float32 or float16, written in place."""
    cache_type = CACHE_TYPES.get(cache_layer.dtype)
    if cache_type is None:
        raise ValueError(f"attention_latent: the latent cache must be float32 or float16, got "
                         f"{cache_layer.dtype}")
    if cache_layer.ndim != 2:
        raise ValueError(f"attention_latent: the cache must be one layer's [n_ctx, width], got "
                         f"{list(cache_layer.shape)}")
    n_ctx, width = cache_layer.shape
    if q.ndim != 3 or q.shape[2] != width or latent_new.shape != (q.shape[0], width):
        raise ValueError(f"attention_latent: q must be [T, n_heads, {width}] and latent_new "
                         f"[T, {width}] for cache {list(cache_layer.shape)}; got q "
                         f"{list(q.shape)}, latent_new {list(latent_new.shape)}")
    n_tokens, n_heads, _ = q.shape
    if not 0 < value_dim <= width:
        raise ValueError(f"attention_latent: value_dim must be in [1, {width}] (the leading "
                         f"kv_lora elements of a latent row), got {value_dim}")
    if start < 0 or start + n_tokens > n_ctx:
        raise ValueError(f"attention_latent: positions [{start}, {start + n_tokens}) must lie "
                         f"within the cache's [0, {n_ctx})")
    if out is None:
        out = np.empty((n_tokens, n_heads, value_dim), np.float32)  # [T, n_heads, dv]
    elif out.size != n_tokens * n_heads * value_dim:
        raise ValueError(f"attention_latent: out {list(out.shape)} must hold "
                         f"[{n_tokens}, {n_heads}, {value_dim}]")
    status = lib.numoe_attention_latent(
        _floats(q, "attention_latent q"), _floats(latent_new, "attention_latent latent_new"),
        n_tokens, n_heads, width, value_dim, cache_type,
        ffi.from_buffer(cache_layer, require_writable=True), n_ctx, start, scale,
        _floats(out, "attention_latent out", writable=True),
    )
    _check(status, "attention_latent")
    return out
