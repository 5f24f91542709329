"""Multi-head latent attention (worker/layers/mla.py) against transformers' DeepseekV3Attention
built from the tiny DeepSeek-V3 config (YaRN on), and its absorbed (latent) form against the
expanded one, in one call and in prefill + decode steps over the cache."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    apply_rotary_pos_emb_interleave,
)

from cluster.model import YarnScaling
from tests.reference.tiny_deepseek import DEEPSEEK_CONFIG, tiny_deepseek
from worker.layers.mla import MlaWeights, mla_attention, new_mla_cache, split_kv_b
from worker.layers.yarn import yarn_cos_sin, yarn_softmax_scale

N_CTX = 64
N_TOKENS = 12
EPS = DEEPSEEK_CONFIG["rms_norm_eps"]
NOPE = DEEPSEEK_CONFIG["qk_nope_head_dim"]
ROPE = DEEPSEEK_CONFIG["qk_rope_head_dim"]
KV_LORA = DEEPSEEK_CONFIG["kv_lora_rank"]
N_HEADS = DEEPSEEK_CONFIG["num_attention_heads"]
V_DIM = DEEPSEEK_CONFIG["v_head_dim"]
HIDDEN = DEEPSEEK_CONFIG["hidden_size"]


def _yarn() -> YarnScaling:
    rope = DEEPSEEK_CONFIG["rope_parameters"]
    return YarnScaling(factor=rope["factor"],
                       original_context_length=rope["original_max_position_embeddings"],
                       beta_fast=rope["beta_fast"], beta_slow=rope["beta_slow"],
                       mscale=rope["mscale"], mscale_all_dim=rope["mscale_all_dim"])


def _tables() -> tuple[np.ndarray, np.ndarray]:
    base = DEEPSEEK_CONFIG["rope_parameters"]["rope_theta"]
    return yarn_cos_sin(ROPE, base, _yarn(), N_CTX)  # [C, rope/2] each


def _reference_attention(seed: int) -> DeepseekV3Attention:
    """A float64 DeepseekV3Attention with weights of unit-scale activations (the default init's
    0.02 would leave the softmax nearly uniform) and norm weights away from 1."""
    config = DeepseekV3Config(**DEEPSEEK_CONFIG)
    config._attn_implementation = "sdpa"  # eager's softmax runs in float32 even for float64
    attention = DeepseekV3Attention(config, layer_idx=0).to(torch.float64).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in attention.named_parameters():
            if "layernorm" in name:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=generator))
            else:
                n_in = param.shape[1]
                param.copy_(torch.randn(param.shape, generator=generator) * n_in**-0.5)
    return attention


def _weights_of(attention: DeepseekV3Attention) -> MlaWeights:
    """The module's weights as MlaWeights; nn.Linear already stores [n_out, n_in], and kv_b_proj
    is the combined attn_kv_b."""
    def array(module: torch.nn.Module) -> np.ndarray:
        return module.weight.detach().numpy().copy()

    k_b, v_b = split_kv_b(array(attention.kv_b_proj), N_HEADS, NOPE, V_DIM)
    return MlaWeights(q_a=array(attention.q_a_proj), q_a_norm=array(attention.q_a_layernorm),
                      q_b=array(attention.q_b_proj), kv_a_mqa=array(attention.kv_a_proj_with_mqa),
                      kv_a_norm=array(attention.kv_a_layernorm), k_b=k_b, v_b=v_b,
                      o=array(attention.o_proj))


def _hidden(n_tokens: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n_tokens, HIDDEN))  # [T, H]


def _scale() -> float:
    return yarn_softmax_scale(NOPE + ROPE, _yarn())


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def _run(weights: MlaWeights, x: np.ndarray, absorbed: bool,
         splits: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """x [T, H] in calls of the given token counts over one cache -> (output [T, H], cache)."""
    cos, sin = _tables()
    cache = new_mla_cache(N_CTX, weights)  # [C, kv_lora + rope]
    outputs, start = [], 0
    for n_tokens in splits:
        outputs.append(mla_attention(x[start:start + n_tokens], weights, cache, start, cos, sin,
                                     _scale(), absorbed, EPS))
        start += n_tokens
    return np.concatenate(outputs), cache


@pytest.mark.parametrize("absorbed", [False, True])
def test_matches_transformers(absorbed: bool) -> None:
    attention = _reference_attention(seed=3)
    weights = _weights_of(attention)
    x = _hidden(N_TOKENS, seed=4)
    cos, sin = _tables()  # [C, rope/2]
    # transformers takes cos/sin as cat(freqs, freqs) per position.
    ref_cos = torch.from_numpy(np.concatenate([cos, cos], axis=1)[None, :N_TOKENS])  # [1, T, rope]
    ref_sin = torch.from_numpy(np.concatenate([sin, sin], axis=1)[None, :N_TOKENS])
    future = torch.ones(N_TOKENS, N_TOKENS, dtype=torch.bool).triu(1)  # [T, T]
    mask = torch.zeros(1, 1, N_TOKENS, N_TOKENS, dtype=torch.float64).masked_fill(
        future, -torch.inf)  # [1, 1, T, T], additive
    with torch.no_grad():
        expected, _ = attention(torch.from_numpy(x)[None], (ref_cos, ref_sin), mask)
    expected = expected[0].numpy()  # [T, H]
    assert _scale() == pytest.approx(attention.scaling, rel=1e-12)

    actual, cache = _run(weights, x, absorbed, (N_TOKENS,))
    # transformers' RMSNorm rounds through float32, hence 1e-6 rather than ~1e-14.
    assert _relative_error(actual, expected) < 1e-6

    # The cache holds transformers' normed latent and its roped shared key (transformers
    # de-interleaves the RoPE pairs: evens first, then odds).
    with torch.no_grad():
        kv_a = attention.kv_a_proj_with_mqa(torch.from_numpy(x))  # [T, kv_lora + rope]
        ref_latent = attention.kv_a_layernorm(kv_a[:, :KV_LORA]).numpy()  # [T, kv_lora]
    assert _relative_error(cache[:N_TOKENS, :KV_LORA], ref_latent) < 1e-6
    with torch.no_grad():
        k_rot = kv_a[None, None, :, KV_LORA:]  # [1, 1, T, rope]
        _, ref_key = apply_rotary_pos_emb_interleave(k_rot, k_rot, ref_cos, ref_sin)
    roped = cache[:N_TOKENS, KV_LORA:]  # [T, rope]
    deinterleaved = np.concatenate([roped[:, 0::2], roped[:, 1::2]], axis=1)  # [T, rope]
    assert _relative_error(deinterleaved, ref_key[0, 0].numpy()) < 1e-12


def test_absorbed_equals_expanded_over_prefill_and_decode() -> None:
    weights = _weights_of(_reference_attention(seed=5))
    n_prefill, n_decode = 9, 3
    x = _hidden(n_prefill + n_decode, seed=6)
    steps = (n_prefill,) + (1,) * n_decode
    expanded_whole, expanded_cache = _run(weights, x, absorbed=False, splits=(len(x),))
    for absorbed in (False, True):
        for splits in ((len(x),), steps):
            actual, cache = _run(weights, x, absorbed, splits)
            assert _relative_error(actual, expanded_whole) < 1e-10, (absorbed, splits)
            np.testing.assert_allclose(cache, expanded_cache, rtol=1e-12, atol=1e-14)
    # Attention must depend on the cached past: dropping it changes the decoded outputs.
    alone, _ = _run(weights, x[n_prefill:], absorbed=True, splits=(n_decode,))
    assert _relative_error(alone, expanded_whole[n_prefill:]) > 1e-2


def test_cache_holds_latent_and_rope_key_per_token() -> None:
    weights = _weights_of(_reference_attention(seed=7))
    assert weights.cache_width == KV_LORA + ROPE  # 48 floats, not 4 heads x (48 + 32)
    _, cache = _run(weights, _hidden(N_TOKENS, seed=8), absorbed=True, splits=(N_TOKENS,))
    assert cache.shape == (N_CTX, KV_LORA + ROPE)
    assert np.all(cache[:N_TOKENS] != 0)  # every written row carries latent and key
    assert not np.any(cache[N_TOKENS:])  # positions not yet run stay untouched
    cos, sin = _tables()
    wide = np.zeros((N_CTX, KV_LORA + ROPE + 1))
    with pytest.raises(ValueError, match="cannot hold"):
        mla_attention(_hidden(1, seed=9), weights, wide, 0, cos, sin, _scale(), True, EPS)


def test_split_matches_llamacpp_converter() -> None:
    """split_kv_b turns the checkpoint's kv_b_proj into exactly the attn_k_b / attn_v_b that
    llama.cpp's converter writes, and the other MLA tensors reach the GGUF unchanged, so a
    GGUF layer's tensors fill MlaWeights as they are (tiny model: cached, else built ~1 min)."""
    model = tiny_deepseek()
    checkpoint = load_file(model.hf_dir / "model.safetensors")
    reader = gguf.GGUFReader(model.gguf["f32"])
    tensors = {tensor.name: np.asarray(tensor.data) for tensor in reader.tensors}
    layer = 1
    prefix = f"model.layers.{layer}.self_attn."
    k_b, v_b = split_kv_b(checkpoint[prefix + "kv_b_proj.weight"], N_HEADS, NOPE, V_DIM)
    np.testing.assert_array_equal(k_b, tensors[f"blk.{layer}.attn_k_b.weight"])
    np.testing.assert_array_equal(v_b, tensors[f"blk.{layer}.attn_v_b.weight"])
    same = {"q_a_proj": "attn_q_a", "q_a_layernorm": "attn_q_a_norm", "q_b_proj": "attn_q_b",
            "kv_a_proj_with_mqa": "attn_kv_a_mqa", "kv_a_layernorm": "attn_kv_a_norm",
            "o_proj": "attn_output"}
    for hf_name, gguf_name in same.items():
        np.testing.assert_array_equal(checkpoint[prefix + hf_name + ".weight"],
                                      tensors[f"blk.{layer}.{gguf_name}.weight"])
