"""YaRN RoPE (worker/layers/yarn.py) against transformers' DeepSeek-V3 rotary embedding and
attention scale, the reference implementation of the HF checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    DeepseekV3RotaryEmbedding,
)

from cluster.model import YarnScaling
from worker.layers.yarn import yarn_cos_sin, yarn_inv_freq, yarn_rope_factor, yarn_softmax_scale

N_POSITIONS = 256
FLOAT32_EPS = float(np.finfo(np.float32).eps)

# (rope dim, base, YaRN parameters); the first is DeepSeek-V3's config.json.
CASES = [
    (64, 10_000.0, YarnScaling(factor=40.0, original_context_length=4096, beta_fast=32.0,
                               beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)),
    # DeepSeek-V2-Lite's mscale pair (equal, below 1), a different base and ramp.
    (64, 50_000.0, YarnScaling(factor=16.0, original_context_length=2048, beta_fast=16.0,
                               beta_slow=2.0, mscale=0.707, mscale_all_dim=0.707)),
    # Unequal mscales: the rope factor differs from 1, so cos/sin are scaled.
    (32, 10_000.0, YarnScaling(factor=8.0, original_context_length=1024, mscale=1.0,
                               mscale_all_dim=0.5)),
    # No mscale_all_dim: the softmax scale is plain, the rope factor is mscale(factor).
    (16, 10_000.0, YarnScaling(factor=4.0, original_context_length=512, mscale=0.0,
                               mscale_all_dim=0.0)),
]


def _hf_config(rope_dim: int, base: float, yarn: YarnScaling) -> DeepseekV3Config:
    rope_parameters = {"rope_type": "yarn", "rope_theta": base, "factor": yarn.factor,
                       "original_max_position_embeddings": yarn.original_context_length,
                       "beta_fast": yarn.beta_fast, "beta_slow": yarn.beta_slow}
    if yarn.mscale:
        rope_parameters["mscale"] = yarn.mscale
    if yarn.mscale_all_dim:
        rope_parameters["mscale_all_dim"] = yarn.mscale_all_dim
    return DeepseekV3Config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16,
        kv_lora_rank=32, qk_rope_head_dim=rope_dim, qk_nope_head_dim=24, v_head_dim=20,
        max_position_embeddings=int(yarn.factor * yarn.original_context_length),
        rope_parameters=rope_parameters)


@pytest.mark.parametrize(("rope_dim", "base", "yarn"), CASES)
def test_cos_sin_match_transformers(rope_dim: int, base: float, yarn: YarnScaling) -> None:
    rotary = DeepseekV3RotaryEmbedding(_hf_config(rope_dim, base, yarn))
    positions = torch.arange(N_POSITIONS)[None]  # [1, N]
    with torch.no_grad():
        ref_cos, ref_sin = rotary(torch.zeros(1, dtype=torch.float32), positions)  # [1, N, d]
    half = rope_dim // 2
    ref_cos, ref_sin = ref_cos[0, :, :half].numpy(), ref_sin[0, :, :half].numpy()  # cat(f, f)

    inv_freq = yarn_inv_freq(rope_dim, base, yarn)  # [d/2]
    np.testing.assert_allclose(inv_freq, rotary.inv_freq.numpy(), rtol=4 * FLOAT32_EPS, atol=0)
    assert yarn_rope_factor(yarn) == pytest.approx(rotary.attention_scaling, rel=1e-12)

    cos, sin = yarn_cos_sin(rope_dim, base, yarn, N_POSITIONS)  # [N, d/2]
    # transformers forms position * inv_freq in float32: its angle error grows with the angle
    # (a few float32 ulps of it); ours is float64. At small angles the bound is 1e-6.
    angles = np.arange(N_POSITIONS)[:, None] * inv_freq  # [N, d/2]
    bound = 1e-6 + 4 * FLOAT32_EPS * angles * yarn_rope_factor(yarn)
    assert np.all(np.abs(cos - ref_cos) <= bound)
    assert np.all(np.abs(sin - ref_sin) <= bound)
    # The interesting part: YaRN must differ from plain RoPE, or this test proves nothing.
    plain = base ** (-np.arange(0, rope_dim, 2) / rope_dim)
    assert np.abs(inv_freq - plain).max() > 1e-3 * plain.max()


@pytest.mark.parametrize(("rope_dim", "base", "yarn"), CASES)
def test_softmax_scale_matches_transformers(rope_dim: int, base: float,
                                            yarn: YarnScaling) -> None:
    config = _hf_config(rope_dim, base, yarn)
    attention = DeepseekV3Attention(config, layer_idx=0)
    qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
    assert yarn_softmax_scale(qk_head_dim, yarn) == pytest.approx(attention.scaling, rel=1e-12)


def test_no_scaling_is_plain_softmax_scale() -> None:
    assert yarn_softmax_scale(192, None) == 192 ** -0.5
