"""The tiny DeepSeek-V3 reference is right: llama.cpp's converter writes every MLA / routing tensor
and key of `deepseek2`, and llama.cpp, running the GGUF, agrees with transformers running the saved
Hugging Face model. Both attention forms are checked: the split attn_k_b / attn_v_b that the
converter writes (llama.cpp runs it absorbed, with a latent KV cache) and the older combined
attn_kv_b that legacy_gguf derives (llama.cpp runs it as plain multi-head attention).

Expected values come from the saved Hugging Face config and safetensors, never from numoe.
F32 logits agree to ~4e-7 of max |logit| (bound 1e-5, as for the Qwen models); F16 to ~1.5e-3.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.reference.tiny_deepseek import (
    legacy_gguf,
    llamacpp_greedy,
    llamacpp_logits,
    tiny_deepseek,
)
from tests.reference.tiny_models import TinyModel, reference_greedy, reference_logits

# "The quick brown fox jumps over the lazy dog. Mixture-of-experts models route tokens" in the
# Qwen2 vocabulary; given as ids so llama.cpp and transformers see the very same prompt.
TEXT_IDS = [785, 3974, 13876, 38835, 34208, 916, 279, 15678, 5562, 13, 386, 12735, 8668, 18376]
PROMPT_IDS = TEXT_IDS[:6]
N_REFERENCE = 32  # transformers' greedy steps (numoe must match all of them)
N_LLAMACPP = 16  # llama.cpp's greedy steps compared with them

# kind -> (bound for the median position, bound for every position), relative to max |logit|
TOLERANCES = {"f32": (1e-5, 1e-5), "f16": (3e-3, 1e-1)}

ATTENTION = ["attn_norm", "attn_q_a", "attn_q_a_norm", "attn_q_b", "attn_kv_a_mqa"]
ATTENTION += ["attn_kv_a_norm", "attn_output", "ffn_norm"]
DENSE_FFN = ["ffn_gate", "ffn_up", "ffn_down"]
MOE_FFN = ["ffn_gate_inp", "exp_probs_b", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"]
MOE_FFN += ["ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"]


@pytest.fixture(scope="module")
def model() -> TinyModel:
    return tiny_deepseek()


@pytest.fixture(scope="module")
def hf_config(model: TinyModel) -> dict[str, Any]:
    from transformers import AutoConfig  # noqa: PLC0415

    return AutoConfig.from_pretrained(model.hf_dir).to_dict()


@pytest.fixture(scope="module")
def hf_weights(model: TinyModel) -> dict[str, np.ndarray]:
    return load_file(str(model.hf_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def expected_greedy(model: TinyModel) -> list[int]:
    return reference_greedy(model, PROMPT_IDS, N_REFERENCE)


def _gguf_path(model: TinyModel, form: str) -> Path:
    """form: "f32" / "f16" (split attn_k_b / attn_v_b) or "f32-kvb" / "f16-kvb" (combined)."""
    kind, _, legacy = form.partition("-")
    return legacy_gguf(model, kind) if legacy else model.gguf[kind]


@cache
def _reader(path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)  # ~8 s: it parses the 151936-token vocabulary in Python


def _tensors(path: Path) -> dict[str, np.ndarray]:
    return {t.name: np.asarray(t.data) for t in _reader(path).tensors}


def _fields(path: Path) -> dict[str, Any]:
    fields = _reader(path).fields.values()
    return {f.name: f.contents() for f in fields if not f.name.startswith("tokenizer.")}


def test_hf_model_has_the_deepseek_v3_features(
    hf_config: dict[str, Any], hf_weights: dict[str, np.ndarray]
) -> None:
    assert hf_config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert hf_config["rope_parameters"]["rope_type"] == "yarn"
    assert hf_config["q_lora_rank"] > 0 and hf_config["kv_lora_rank"] > 0
    assert "model.layers.0.mlp.gate_proj.weight" in hf_weights  # the leading dense layer
    assert "model.layers.0.mlp.gate.weight" not in hf_weights
    for layer in range(1, hf_config["num_hidden_layers"]):
        bias = hf_weights[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"]
        assert np.abs(bias).min() > 0 and np.unique(bias).size == bias.size  # random, not zero


@pytest.mark.parametrize("kind", ["f32", "f16"])
def test_gguf_has_every_deepseek2_tensor(
    model: TinyModel, kind: str, hf_config: dict[str, Any], hf_weights: dict[str, np.ndarray]
) -> None:
    tensors = _tensors(model.gguf[kind])
    names = set(tensors)
    assert {"token_embd.weight", "output_norm.weight", "output.weight"} <= names
    for layer in range(hf_config["num_hidden_layers"]):
        ffn = DENSE_FFN if layer < hf_config["first_k_dense_replace"] else MOE_FFN
        expected = {f"blk.{layer}.{t}.weight" for t in ATTENTION + ffn if t != "exp_probs_b"}
        expected |= {f"blk.{layer}.attn_k_b.weight", f"blk.{layer}.attn_v_b.weight"}
        if "exp_probs_b" in ffn:
            expected.add(f"blk.{layer}.exp_probs_b.bias")
        layer_names = {n for n in names if n.startswith(f"blk.{layer}.")}
        assert layer_names == expected, layer
    # The score-correction bias arrives unrounded (F32 even in the F16 file).
    router_bias = hf_weights["model.layers.1.mlp.gate.e_score_correction_bias"]
    np.testing.assert_array_equal(tensors["blk.1.exp_probs_b.bias"], router_bias)


@pytest.mark.parametrize("kind", ["f32", "f16"])
def test_gguf_metadata_follows_the_hf_config(
    model: TinyModel, kind: str, hf_config: dict[str, Any]
) -> None:
    fields = _fields(model.gguf[kind])
    rope = hf_config["rope_parameters"]
    assert fields["general.architecture"] == "deepseek2"
    expected = {
        "leading_dense_block_count": hf_config["first_k_dense_replace"],
        "attention.q_lora_rank": hf_config["q_lora_rank"],
        "attention.kv_lora_rank": hf_config["kv_lora_rank"],
        "attention.key_length_mla": hf_config["qk_nope_head_dim"] + hf_config["qk_rope_head_dim"],
        "attention.value_length_mla": hf_config["v_head_dim"],
        "rope.dimension_count": hf_config["qk_rope_head_dim"],
        "expert_count": hf_config["n_routed_experts"],
        "expert_used_count": hf_config["num_experts_per_tok"],
        "expert_shared_count": hf_config["n_shared_experts"],
        "expert_group_count": hf_config["n_group"],
        "expert_group_used_count": hf_config["topk_group"],
        "expert_weights_scale": pytest.approx(hf_config["routed_scaling_factor"]),
        "expert_weights_norm": hf_config["norm_topk_prob"],
        "expert_gating_func": gguf.ExpertGatingFuncType.SIGMOID,
        "rope.scaling.type": "yarn",
        "rope.scaling.factor": pytest.approx(rope["factor"]),
        "rope.scaling.original_context_length": rope["original_max_position_embeddings"],
        "rope.scaling.yarn_beta_fast": pytest.approx(rope["beta_fast"]),
        "rope.scaling.yarn_beta_slow": pytest.approx(rope["beta_slow"]),
        # The converter stores 0.1 x mscale_all_dim here (llama.cpp divides it back out).
        "rope.scaling.yarn_log_multiplier": pytest.approx(0.1 * rope["mscale_all_dim"]),
    }
    got = {key: fields.get(f"deepseek2.{key}") for key in expected}
    assert got == expected


def test_legacy_form_holds_the_hf_kv_b_proj(
    model: TinyModel, hf_config: dict[str, Any], hf_weights: dict[str, np.ndarray]
) -> None:
    path = legacy_gguf(model, "f32")
    tensors = _tensors(path)
    assert not any(".attn_k_b." in n or ".attn_v_b." in n for n in tensors)
    for layer in range(hf_config["num_hidden_layers"]):
        np.testing.assert_array_equal(
            tensors[f"blk.{layer}.attn_kv_b.weight"],
            hf_weights[f"model.layers.{layer}.self_attn.kv_b_proj.weight"],
        )
    fields = _fields(path)
    assert "deepseek2.attention.key_length_mla" not in fields
    assert fields["deepseek2.attention.head_count_kv"] == hf_config["num_attention_heads"]


def test_logits_are_not_flat(model: TinyModel) -> None:
    """Greedy agreement means something only if the top logit stands clear of rounding noise
    and the output depends on the context."""
    logits = reference_logits(model, TEXT_IDS)  # [T, vocab]
    assert logits.std(axis=1).min() > 0.3
    shifted = reference_logits(model, [TEXT_IDS[0] + 1, *TEXT_IDS[1:]])
    assert np.abs(shifted[-1] - logits[-1]).max() > 0.1 * np.abs(logits[-1]).max()


def test_router_bias_changes_the_output(model: TinyModel) -> None:
    """The bias only steers the expert choice (noaux_tc), so the output moves only if some token
    picks different experts with it: the bias path is exercised, not a no-op."""
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    unbiased = AutoModelForCausalLM.from_pretrained(
        model.hf_dir,
        dtype=torch.float64,
        attn_implementation="eager",
        experts_implementation="eager",
    ).eval()
    for name, buffer in unbiased.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.zero_()
    with torch.no_grad():
        without = unbiased(torch.tensor([TEXT_IDS]), use_cache=False).logits[0].numpy()
    with_bias = reference_logits(model, TEXT_IDS)
    assert np.abs(with_bias - without).max() > 0.1 * np.abs(with_bias).max()


@pytest.mark.parametrize("form", ["f32", "f32-kvb", "f16", "f16-kvb"])
def test_llamacpp_logits_match_transformers(model: TinyModel, form: str) -> None:
    expected = reference_logits(model, TEXT_IDS)  # [T, vocab]
    got = llamacpp_logits(_gguf_path(model, form), TEXT_IDS)
    assert got.shape == expected.shape
    per_position = np.abs(got - expected).max(axis=1) / np.abs(expected).max()  # [T]
    typical_bound, every_bound = TOLERANCES[form.split("-")[0]]
    assert np.median(per_position) <= typical_bound, per_position
    assert per_position.max() <= every_bound, per_position


@pytest.mark.parametrize("form", ["f32", "f32-kvb"])
def test_llamacpp_greedy_matches_transformers(
    model: TinyModel, form: str, expected_greedy: list[int]
) -> None:
    assert len(expected_greedy) == N_REFERENCE
    got = llamacpp_greedy(_gguf_path(model, form), PROMPT_IDS, N_LLAMACPP)
    assert got == expected_greedy[:N_LLAMACPP]


def test_reference_greedy_agrees_with_full_forward(
    model: TinyModel, expected_greedy: list[int]
) -> None:
    """generate() (KV cache, YaRN at growing positions) and one full forward over the result pick
    the same 32 tokens, so the reference itself is consistent."""
    logits = reference_logits(model, PROMPT_IDS + expected_greedy)  # [T, vocab]
    assert logits[len(PROMPT_IDS) - 1 : -1].argmax(axis=1).tolist() == expected_greedy
