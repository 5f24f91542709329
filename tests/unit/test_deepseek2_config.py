"""deepseek2 GGUF metadata -> ModelConfig (cluster/deepseek2_config.py), on metadata-only files
written by gguf-py as llama.cpp's converter writes them from DeepSeek-V3's config.json."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import pytest
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

from cluster.catalog import describe
from cluster.deepseek2_config import read_deepseek2_config
from cluster.errors import NumoeError, TensorShapeError
from cluster.gguf import GGUFFile
from cluster.model import ExpertGating, RopeStyle, YarnScaling, load_model_spec

# https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json
DEEPSEEK_V3 = dict(
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
    num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
    n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
    qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4,
    num_experts_per_tok=8, first_k_dense_replace=3, norm_topk_prob=True,
    max_position_embeddings=163840, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                     "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                     "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
)


def _write_metadata(path: Path, hf: DeepseekV3Config, nextn_layers: int = 0,
                    gating: gguf.ExpertGatingFuncType | None = gguf.ExpertGatingFuncType.SIGMOID,
                    legacy_head_sizes: bool = False) -> Path:
    """The keys llama.cpp's converter (conversion/deepseek.py DeepseekV2Model and the
    TextModel base) writes for `hf`, and no tensors."""
    rope = hf.rope_parameters
    writer = gguf.GGUFWriter(path, "deepseek2")
    writer.add_block_count(hf.num_hidden_layers + nextn_layers)
    if nextn_layers:
        writer.add_nextn_predict_layers(nextn_layers)
    writer.add_context_length(hf.max_position_embeddings)
    writer.add_embedding_length(hf.hidden_size)
    writer.add_feed_forward_length(hf.intermediate_size)
    writer.add_head_count(hf.num_attention_heads)
    writer.add_head_count_kv(1)  # MLA converts to MQA
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(hf.rms_norm_eps)
    writer.add_expert_count(hf.n_routed_experts)
    writer.add_expert_used_count(hf.num_experts_per_tok)
    writer.add_expert_group_count(hf.n_group)
    writer.add_expert_group_used_count(hf.topk_group)
    if gating is not None:
        writer.add_expert_gating_func(gating)
    writer.add_leading_dense_block_count(hf.first_k_dense_replace)
    writer.add_vocab_size(hf.vocab_size)
    writer.add_q_lora_rank(hf.q_lora_rank)
    writer.add_kv_lora_rank(hf.kv_lora_rank)
    if legacy_head_sizes:  # files from before the *_mla keys
        writer.add_key_length(hf.qk_nope_head_dim + hf.qk_rope_head_dim)
        writer.add_value_length(hf.v_head_dim)
    else:
        writer.add_key_length(hf.kv_lora_rank + hf.qk_rope_head_dim)
        writer.add_value_length(hf.kv_lora_rank)
        writer.add_key_length_mla(hf.qk_nope_head_dim + hf.qk_rope_head_dim)
        writer.add_value_length_mla(hf.v_head_dim)
    writer.add_expert_feed_forward_length(hf.moe_intermediate_size)
    writer.add_expert_shared_count(hf.n_shared_experts)
    writer.add_expert_weights_scale(hf.routed_scaling_factor)
    writer.add_expert_weights_norm(hf.norm_topk_prob)
    writer.add_rope_dimension_count(hf.qk_rope_head_dim)
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(rope["factor"])
    writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    writer.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
    writer.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    writer.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _parse(path: Path):
    with GGUFFile(path) as file:
        return read_deepseek2_config(file.metadata)


def _hf_softmax_scale(hf: DeepseekV3Config) -> float:
    """DeepseekV3Attention.scaling, from a copy of `hf` small enough to build."""
    small = DeepseekV3Config(**{**DEEPSEEK_V3, "hidden_size": 64, "num_attention_heads": 2,
                                "num_key_value_heads": 2, "q_lora_rank": 16, "kv_lora_rank": 32})
    assert small.qk_head_dim == hf.qk_head_dim and small.rope_parameters == hf.rope_parameters
    return DeepseekV3Attention(small, layer_idx=0).scaling


def test_deepseek_v3_metadata(tmp_path: Path) -> None:
    hf = DeepseekV3Config(**DEEPSEEK_V3)
    config = _parse(_write_metadata(tmp_path / "v3.gguf", hf))
    assert config.architecture == "deepseek2"
    assert (config.vocab_size, config.n_layers, config.n_embd) == (
        hf.vocab_size, hf.num_hidden_layers, hf.hidden_size)
    assert (config.n_heads, config.n_kv_heads) == (hf.num_attention_heads, hf.num_attention_heads)
    assert (config.head_dim, config.value_head_dim) == (hf.qk_head_dim, hf.v_head_dim)
    assert (config.q_lora_rank, config.kv_lora_rank, config.qk_rope_head_dim) == (
        hf.q_lora_rank, hf.kv_lora_rank, hf.qk_rope_head_dim)
    assert config.kv_cache_width == hf.kv_lora_rank + hf.qk_rope_head_dim
    assert (config.n_ff, config.n_ff_expert) == (hf.intermediate_size, hf.moe_intermediate_size)
    assert (config.n_experts, config.n_experts_used, config.n_shared_experts) == (
        hf.n_routed_experts, hf.num_experts_per_tok, hf.n_shared_experts)
    assert (config.n_expert_groups, config.n_expert_groups_used) == (hf.n_group, hf.topk_group)
    assert config.n_dense_layers == hf.first_k_dense_replace
    assert config.expert_gating is ExpertGating.SIGMOID
    assert config.expert_weights_norm is True
    assert config.expert_weights_scale == pytest.approx(hf.routed_scaling_factor)
    assert config.rope_style is RopeStyle.NORMAL
    assert config.rope_theta == hf.rope_parameters["rope_theta"]
    assert config.context_length == hf.max_position_embeddings
    assert config.norm_eps == pytest.approx(hf.rms_norm_eps)
    rope = hf.rope_parameters
    assert config.rope_yarn == YarnScaling(
        factor=rope["factor"], original_context_length=rope["original_max_position_embeddings"],
        beta_fast=rope["beta_fast"], beta_slow=rope["beta_slow"], mscale=rope["mscale"],
        mscale_all_dim=rope["mscale_all_dim"])
    # The YaRN mscale^2 folded into 1/sqrt(192): about 1.87x the plain scale.
    assert config.attention_scale == pytest.approx(_hf_softmax_scale(hf), rel=1e-6)


def test_agrees_with_the_catalog_description(tmp_path: Path) -> None:
    """The built-in deepseek-v3 description and a GGUF header written from the official config
    give the same ModelConfig, every field (routing, YaRN and attention scale included)."""
    parsed = _parse(_write_metadata(tmp_path / "v3.gguf", DeepseekV3Config(**DEEPSEEK_V3)))
    described = describe("deepseek-v3").config
    assert parsed == described


def test_nextn_layers_and_legacy_defaults(tmp_path: Path) -> None:
    """MTP layers are counted apart; a file without expert_gating_func means softmax
    (DeepSeek-V2); files without the *_mla keys store per-head sizes in key/value_length."""
    hf = DeepseekV3Config(**DEEPSEEK_V3)
    path = _write_metadata(tmp_path / "old.gguf", hf, nextn_layers=1, gating=None,
                           legacy_head_sizes=True)
    config = _parse(path)
    assert (config.n_layers, config.n_nextn_layers) == (hf.num_hidden_layers, 1)
    assert config.expert_gating is ExpertGating.SOFTMAX
    assert (config.head_dim, config.value_head_dim) == (hf.qk_head_dim, hf.v_head_dim)


def test_bad_groups_are_refused(tmp_path: Path) -> None:
    hf = DeepseekV3Config(**{**DEEPSEEK_V3, "n_group": 7})  # 256 experts do not split into 7
    with pytest.raises(NumoeError, match="groups"):
        _parse(_write_metadata(tmp_path / "bad.gguf", hf))


def test_header_without_tensors_is_refused_clearly(tmp_path: Path) -> None:
    """load_model_spec runs deepseek2 now; a file with metadata but no tensors names the first
    tensor it lacks and the fix."""
    path = _write_metadata(tmp_path / "v3.gguf", DeepseekV3Config(**DEEPSEEK_V3))
    with GGUFFile(path) as file, pytest.raises(TensorShapeError, match="token_embd.*re-convert"):
        load_model_spec(file)


def test_config_is_frozen_and_hashable(tmp_path: Path) -> None:
    config = _parse(_write_metadata(tmp_path / "v3.gguf", DeepseekV3Config(**DEEPSEEK_V3)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.n_layers = 1  # type: ignore[misc]
    hash(config)
