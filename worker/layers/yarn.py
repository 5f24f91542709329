"""YaRN RoPE scaling (DeepSeek-V3 / R1, Kimi-K2): the rotary inverse frequencies and the two
attention factors, as transformers' `_compute_yarn_parameters` and DeepseekV3Attention compute them.

YaRN keeps the high frequencies (many rotations over the original context) as they were, divides
the low ones by `factor`, and ramps linearly between the two over the dimensions whose rotation
count lies between beta_slow and beta_fast. Two scalars go with it:

* the rope factor multiplies cos and sin, so it scales only the RoPE part of q·k (twice);
* DeepSeek's softmax scale folds mscale(factor, mscale_all_dim)^2 into 1/sqrt(qk_head_dim), so it
  scales all of q·k.

For the released DeepSeek models mscale == mscale_all_dim, so the rope factor is 1 and only the
softmax scale changes. llama.cpp gets the same numbers from the GGUF keys (see
cluster.deepseek2_config.read_yarn_scaling): its cos/sin factor is yarn_attn_factor and its
kq_scale is mscale^2 / sqrt(n_embd_head_k_mla).
"""

from __future__ import annotations

import math

import numpy as np

from cluster.model import YarnScaling


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    if factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def yarn_inv_freq(rope_dim: int, base: float, yarn: YarnScaling) -> np.ndarray:
    """Rotary inverse frequencies [rope_dim / 2] (float64), pair i rotating at inv_freq[i]."""
    exponents = np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim  # [d/2]
    extrapolated = base ** -exponents  # [d/2], the unscaled RoPE frequencies
    interpolated = extrapolated / yarn.factor  # [d/2]
    low, high = _correction_range(rope_dim, base, yarn)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(rope_dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp  # [d/2], 1 = high frequency kept as is, 0 = fully interpolated
    return interpolated * (1.0 - keep) + extrapolated * keep


def yarn_rope_factor(yarn: YarnScaling) -> float:
    """Multiplier on cos and sin (transformers' attention_factor, llama.cpp's attn_factor)."""
    if yarn.mscale and yarn.mscale_all_dim:
        return yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor,
                                                                   yarn.mscale_all_dim)
    return yarn_mscale(yarn.factor)


def yarn_softmax_scale(qk_head_dim: int, yarn: YarnScaling | None) -> float:
    """The factor on q·k before the softmax: qk_head_dim^-0.5, times mscale(factor,
    mscale_all_dim)^2 when the model sets mscale_all_dim (DeepseekV3Attention.scaling)."""
    scale = qk_head_dim ** -0.5
    if yarn is not None and yarn.mscale_all_dim:
        scale *= yarn_mscale(yarn.factor, yarn.mscale_all_dim) ** 2
    return scale


def yarn_cos_sin(rope_dim: int, base: float, yarn: YarnScaling,
                 n_ctx: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [n_ctx, rope_dim / 2] (float64) of position * inv_freq, times the rope factor:
    the tables a RopeTable holds, for YaRN."""
    angles = np.arange(n_ctx, dtype=np.float64)[:, None] * yarn_inv_freq(rope_dim, base, yarn)
    factor = yarn_rope_factor(yarn)
    return np.cos(angles) * factor, np.sin(angles) * factor


def _correction_range(rope_dim: int, base: float, yarn: YarnScaling) -> tuple[float, float]:
    """The dimension-pair range [low, high] over which the ramp runs: the pairs that rotate
    between beta_fast and beta_slow times over the original context (floored / ceiled, as both
    transformers' truncate=True default and ggml's ggml_rope_yarn_corr_dims do)."""

    def pair_for_rotations(rotations: float) -> float:
        wavelengths = yarn.original_context_length / (rotations * 2 * math.pi)
        return rope_dim * math.log(wavelengths) / (2 * math.log(base))

    low = math.floor(pair_for_rotations(yarn.beta_fast))
    high = math.ceil(pair_for_rotations(yarn.beta_slow))
    return max(low, 0), min(high, rope_dim - 1)
