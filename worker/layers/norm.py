"""RMSNorm over the last axis, as llama.cpp computes it: x / sqrt(mean(x^2) + eps) * w.

Gemma's "(1 + w)" convention needs nothing here: llama.cpp's converter already adds the 1 to
Gemma 3's norm weights in the GGUF file.
"""

from __future__ import annotations

import numpy as np


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float,
             residual: np.ndarray | None = None) -> np.ndarray:
    """x [..., n], weight [n] -> (residual +) normed x [..., n] in x's dtype."""
    # ufunc.reduce and in-place updates: np.mean's Python wrapper alone costs more than the
    # arithmetic on a decode-sized row, and this runs six times per Gemma layer.
    sum_squares = np.add.reduce(x * x, axis=-1, keepdims=True)  # [..., 1]
    inv_rms = 1.0 / np.sqrt(sum_squares * (1.0 / x.shape[-1]) + eps)
    out = x * inv_rms
    out *= weight
    if residual is not None:
        out += residual
    return out
