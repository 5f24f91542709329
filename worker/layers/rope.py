"""Rotary position embeddings: precomputed cos/sin tables, applied in NeoX or normal layout."""

from __future__ import annotations

import numpy as np

from cluster.model import RopeStyle, YarnScaling
from worker.layers.yarn import yarn_cos_sin


class RopeTable:
    """cos/sin of position * base^(-2i/d) * freq_scale for every position up to n_ctx.

    One table per distinct RoPE base (Gemma 3 has two: local and global layers), built once, so
    the per-token cost is a slice and four multiplies. With `yarn` (DeepSeek-V3, Kimi-K2) the
    frequencies and the cos/sin factor are YaRN's (worker/layers/yarn.py) and freq_scale is unused.
    """

    def __init__(self, base: float, freq_scale: float, head_dim: int, n_ctx: int,
                 style: RopeStyle, dtype: np.dtype, yarn: YarnScaling | None = None) -> None:
        self.style = style
        half = head_dim // 2
        if yarn is not None:
            cos, sin = yarn_cos_sin(head_dim, base, yarn, n_ctx)  # [n_ctx, d/2] each
        else:
            inv_freq = base ** (-np.arange(half, dtype=np.float64) * 2.0 / head_dim)  # [d/2]
            angles = np.arange(n_ctx, dtype=np.float64)[:, None] * inv_freq * freq_scale
            cos, sin = np.cos(angles), np.sin(angles)  # [n_ctx, d/2]
        self.cos = np.ascontiguousarray(cos, dtype=dtype)  # [n_ctx, d/2]
        self.sin = np.ascontiguousarray(sin, dtype=dtype)  # [n_ctx, d/2]

    def apply(self, x: np.ndarray, start: int) -> np.ndarray:
        """x [T, n_heads, d] for positions [start, start + T) -> rotated copy [T, n_heads, d]."""
        n_tokens = x.shape[0]
        cos = self.cos[start : start + n_tokens, None]  # [T, 1, d/2]
        sin = self.sin[start : start + n_tokens, None]
        out = np.empty_like(x)
        if self.style is RopeStyle.NEOX:
            half = x.shape[-1] // 2
            first, second = x[..., :half], x[..., half:]  # pairs (i, i + d/2)
            out_first, out_second = out[..., :half], out[..., half:]
        else:
            first, second = x[..., 0::2], x[..., 1::2]  # pairs (2i, 2i + 1)
            out_first, out_second = out[..., 0::2], out[..., 1::2]
        np.multiply(first, cos, out=out_first)
        out_first -= second * sin
        np.multiply(second, cos, out=out_second)
        out_second += first * sin
        return out
