"""GGUF metadata of llama.cpp's `deepseek2` architecture (DeepSeek-V2/V3/R1, Kimi-K2) ->
ModelConfig.

cluster.model.load_model_spec calls it for deepseek2 files, and cluster.catalog for its built-in
DeepSeek / Kimi descriptions (from the header the converter would write), so a description and a
real file are read by the same code. The key names and defaults follow
llama.cpp (src/models/deepseek2.cpp load_arch_hparams, src/llama-model.cpp load_hparams,
src/llama-context.cpp for YaRN), and the meaning of each value follows the converter
(conversion/deepseek.py DeepseekV2Model.set_gguf_parameters):

* attention.key_length / value_length describe the MQA form llama.cpp runs the absorbed
  attention in (kv_lora_rank + rope, kv_lora_rank); the per-head sizes of the "decompressed"
  heads are attention.key_length_mla (qk_nope + qk_rope) and value_length_mla (v_head_dim).
  Older files have no *_mla keys and store the per-head sizes in key_length / value_length.
* attention.head_count_kv is 1 in that MQA form; numoe's config counts the decompressed heads,
  n_kv_heads = n_heads, as cluster.catalog does.
* block_count includes the nextn_predict_layers multi-token-prediction layers at the end.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cluster.errors import NumoeError
from cluster.gguf import TensorInfo
from cluster.model import ExpertGating, ModelConfig, RopeStyle, YarnScaling, _Metadata
from worker.layers.yarn import yarn_softmax_scale

ARCHITECTURE = "deepseek2"
# llama.cpp [TAG_DEEPSEEK2_YARN_LOG_MUL_FIX]: the converter writes 0.1 * mscale_all_dim.
YARN_LOG_MULTIPLIER_PER_MSCALE = 0.1
# llama.cpp's hparams defaults; its loader reads no yarn_beta_* keys for any architecture.
YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0


def read_deepseek2_config(metadata: dict[str, Any],
                          tensors: dict[str, TensorInfo] | None = None) -> ModelConfig:
    """The ModelConfig of a deepseek2 GGUF. `tensors` (optional) gives the vocabulary size from
    token_embd.weight; without it {arch}.vocab_size or the tokenizer's token list does."""
    meta = _Metadata(metadata, ARCHITECTURE)
    n_nextn_layers = meta.integer("nextn_predict_layers", 0)
    n_layers = meta.integer("block_count") - n_nextn_layers
    n_heads = meta.integer("attention.head_count")
    head_dim = meta.integer("attention.key_length_mla", 0) or meta.integer("attention.key_length")
    value_head_dim = (meta.integer("attention.value_length_mla", 0)
                      or meta.integer("attention.value_length"))
    rope_dim = meta.integer("rope.dimension_count")
    n_experts = meta.integer("expert_count")
    n_expert_groups = meta.integer("expert_group_count", 0) or 1
    n_expert_groups_used = meta.integer("expert_group_used_count", 0) or 1
    _check_groups(n_experts, n_expert_groups, n_expert_groups_used)
    yarn = read_yarn_scaling(meta)
    # Written only when it differs from 1; llama.cpp skips the scaling when the key is absent (0).
    expert_weights_scale = float(meta.get("expert_weights_scale", 0.0)) or 1.0
    return ModelConfig(
        architecture=ARCHITECTURE,
        vocab_size=_vocab_size(meta, tensors),
        n_layers=n_layers,
        n_embd=meta.integer("embedding_length"),
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=head_dim,
        value_head_dim=value_head_dim,
        n_ff=meta.integer("feed_forward_length", 0),
        n_experts=n_experts,
        n_experts_used=meta.integer("expert_used_count"),
        n_ff_expert=meta.integer("expert_feed_forward_length"),
        # llama.cpp's default is false; the converter writes true for norm_topk_prob models.
        expert_weights_norm=bool(meta.get("expert_weights_norm", False)),
        expert_weights_scale=expert_weights_scale,
        ffn_activation="silu",
        norm_eps=float(meta.require("attention.layer_norm_rms_epsilon")),
        rope_style=RopeStyle.NORMAL,  # llama.cpp: LLAMA_ROPE_TYPE_NORM for deepseek2
        rope_theta=float(meta.get("rope.freq_base", 10_000.0)),
        rope_theta_sliding=float(meta.get("rope.freq_base", 10_000.0)),
        rope_freq_scale=1.0,  # YaRN's factor lives in rope_yarn, not in a linear scale
        context_length=meta.integer("context_length"),
        sliding_window=0,
        sliding_layers=(False,) * n_layers,
        attention_scale=yarn_softmax_scale(head_dim, yarn),
        embedding_scale=1.0,
        final_logit_softcap=0.0,
        has_qk_norm=False,
        has_post_norms=False,
        tied_output=tensors is not None and "output.weight" not in tensors,
        n_dense_layers=meta.integer("leading_dense_block_count", 0),
        n_shared_experts=meta.integer("expert_shared_count"),
        # DeepSeek-V2-Lite has no low-rank query path (one plain attn_q).
        q_lora_rank=meta.integer("attention.q_lora_rank", 0),
        kv_lora_rank=meta.integer("attention.kv_lora_rank"),
        qk_rope_head_dim=rope_dim,
        n_nextn_layers=n_nextn_layers,
        expert_gating=_expert_gating(meta),
        n_expert_groups=n_expert_groups,
        n_expert_groups_used=n_expert_groups_used,
        rope_yarn=yarn,
    )


def read_yarn_scaling(meta: _Metadata) -> YarnScaling | None:
    """{arch}.rope.scaling.* -> YarnScaling, None when the file has no YaRN scaling.

    GGUF has no mscale key: llama.cpp (llama_context constructor) takes mscale = mscale_all_dim
    for deepseek2, true of every released DeepSeek / Kimi config, and so does numoe.
    """
    scaling = meta.get("rope.scaling.type", "none")
    if scaling in ("none", None):
        return None
    if scaling != "yarn":
        raise NumoeError(
            f"RoPE scaling {scaling!r} ({meta.arch}.rope.scaling.type) is not supported for "
            f"{meta.arch}; numoe supports none and yarn: re-convert the model with llama.cpp's "
            f"convert_hf_to_gguf.py")
    attn_factor = float(meta.get("rope.scaling.attn_factor", 1.0))
    if attn_factor != 1.0:
        raise NumoeError(
            f"GGUF metadata {meta.arch}.rope.scaling.attn_factor is {attn_factor}; numoe "
            f"supports only 1.0 for YaRN models: re-convert the model with llama.cpp's "
            f"convert_hf_to_gguf.py")
    factor = float(meta.require("rope.scaling.factor"))
    # Divided in float32 as llama.cpp does, so a written float32(0.1 * 1.0) reads back as 1.0.
    log_multiplier = np.float32(meta.get("rope.scaling.yarn_log_multiplier", 0.0))
    mscale_all_dim = float(log_multiplier / np.float32(YARN_LOG_MULTIPLIER_PER_MSCALE))
    return YarnScaling(
        factor=factor,
        original_context_length=meta.integer("rope.scaling.original_context_length",
                                             meta.integer("context_length")),
        beta_fast=float(meta.get("rope.scaling.yarn_beta_fast", YARN_BETA_FAST)),
        beta_slow=float(meta.get("rope.scaling.yarn_beta_slow", YARN_BETA_SLOW)),
        mscale=mscale_all_dim,
        mscale_all_dim=mscale_all_dim,
    )


def _expert_gating(meta: _Metadata) -> ExpertGating:
    # Absent (0) means softmax: DeepSeek-V2 / V2.5 files predate the key (llama.cpp's fallback).
    value = meta.integer("expert_gating_func", 0) or ExpertGating.SOFTMAX.value
    try:
        return ExpertGating(value)
    except ValueError:
        raise NumoeError(
            f"GGUF metadata {meta.arch}.expert_gating_func is {value}; numoe supports "
            f"{', '.join(f'{g.value} ({g.name.lower()})' for g in ExpertGating)}") from None


def _check_groups(n_experts: int, n_groups: int, n_groups_used: int) -> None:
    if n_experts % n_groups or not 1 <= n_groups_used <= n_groups:
        raise NumoeError(
            f"GGUF metadata: {n_experts} experts in {n_groups} groups, {n_groups_used} used, is "
            f"not a valid group-limited router (groups must divide the experts, and "
            f"1 <= used <= groups); the file is corrupt: re-convert it")


def _vocab_size(meta: _Metadata, tensors: dict[str, TensorInfo] | None) -> int:
    token_embd = (tensors or {}).get("token_embd.weight")
    if token_embd is not None:
        return int(token_embd.shape[0])
    if meta.get("vocab_size") is not None:
        return meta.integer("vocab_size")
    tokens = meta.metadata.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise NumoeError(
            f"GGUF file has neither token_embd.weight, {meta.arch}.vocab_size nor a tokenizer "
            f"token list, so its vocabulary size is unknown; re-convert it")
    return len(tokens)
