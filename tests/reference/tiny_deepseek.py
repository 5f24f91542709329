"""A tiny random-weight DeepSeek-V3 (`deepseek2` in GGUF), the reference for numoe's MLA path.

The official DeepSeek-V3 config scaled down, keeping every feature the architecture adds:
low-rank Q (q_lora_rank) and KV (kv_lora_rank) paths with a separate RoPE part, YaRN scaling with
mscale_all_dim (which also scales the softmax), a leading dense layer, one shared expert beside
16 routed ones in 4 groups of which 2 are used, sigmoid scores with a score-correction bias that
only steers the choice (`noaux_tc`), weight normalisation and routed_scaling_factor 2.5.

Built and converted through tiny_models.py (same tokenizer, weight recipe, cache and llama.cpp
converter). The converter writes the split MLA form (attn_k_b / attn_v_b, with key_length_mla);
`legacy_gguf` rewrites a file into the older combined attn_kv_b form with gguf-py, which llama.cpp
still loads and runs without the absorbed (latent) attention.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from tests.reference import llamacpp
from tests.reference.tiny_models import TinyModel, TinySpec, cached_model

# The score-correction bias is trained to balance experts; here it is drawn uniformly in
# +-ROUTER_BIAS_SPREAD, about the spread of the sigmoid scores themselves, so it changes which
# experts (and groups) win without deciding alone.
ROUTER_BIAS_SPREAD = 0.3

# DeepSeek-V3 (hidden 7168, 128 heads, q_lora 1536, kv_lora 512, qk_nope 128, qk_rope 64, v 128,
# 256 experts in 8 groups, 4 groups and 8 experts used, 3 dense layers) scaled down. Head dims
# keep the real ratios (nope = v = 2 x rope); q_lora > kv_lora as in the real model.
DEEPSEEK_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "first_k_dense_replace": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 48,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "intermediate_size": 192,  # the dense layer
    "moe_intermediate_size": 32,
    "n_routed_experts": 16,
    "n_shared_experts": 1,
    "n_group": 4,
    "topk_group": 2,
    "num_experts_per_tok": 4,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    # transformers hard-codes these two; config.json must still carry them because llama.cpp's
    # converter reads scoring_func (without it llama.cpp assumes DeepSeek-V2's softmax).
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 16384,
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "rope_interleave": True,
    "num_nextn_predict_layers": 0,  # no multi-token-prediction layer
    "tie_word_embeddings": False,
    "attention_bias": False,
    "hidden_act": "silu",
}


def _randomize_router_bias(model: Any, generator: Any) -> None:
    import torch  # noqa: PLC0415

    for module in model.modules():
        bias = getattr(module, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor):
            spread = torch.rand(bias.shape, generator=generator) * 2 - 1
            bias.copy_(ROUTER_BIAS_SPREAD * spread)


# Bump when _write_legacy changes: the legacy files are cached under a name that carries it.
LEGACY_VERSION = 1

DEEPSEEK_SPEC = TinySpec(
    "deepseek2",
    "DeepseekV3ForCausalLM",
    "DeepseekV3Config",
    DEEPSEEK_CONFIG,
    13,
    adjust_weights=_randomize_router_bias,
)


def tiny_deepseek() -> TinyModel:
    """The tiny DeepSeek-V3, built on first use (about a minute) and reused from the cache."""
    return cached_model(DEEPSEEK_SPEC)


def legacy_gguf(model: TinyModel, kind: str = "f32") -> Path:
    """The model's GGUF rewritten into the older combined form (attn_kv_b, no *_length_mla keys),
    as converters before the MLA split wrote it; cached beside the split file (~15 s once)."""
    if kind not in ("f32", "f16"):  # quantized blocks cannot be transposed element-wise
        raise ValueError(f"legacy_gguf supports f32 and f16, not {kind!r}")
    split = model.gguf[kind]
    legacy = split.with_name(f"{split.stem}-kvb{LEGACY_VERSION}.gguf")
    if not legacy.exists():
        work = Path(tempfile.mkdtemp(prefix=".kvb-", dir=split.parent))
        try:
            _write_legacy(split, work / legacy.name)
            os.rename(work / legacy.name, legacy)  # atomic: readers never see half a file
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return legacy


def _write_legacy(source: Path, target: Path) -> None:
    reader = gguf.GGUFReader(source)
    arch = "deepseek2"
    config = DEEPSEEK_CONFIG
    n_head, nope = config["num_attention_heads"], config["qk_nope_head_dim"]
    v_dim = config["v_head_dim"]
    # Legacy files describe plain multi-head attention: one KV head per query head, the per-head
    # sizes in key/value_length, and no MLA sizes.
    replaced = {
        f"{arch}.attention.head_count_kv": n_head,
        f"{arch}.attention.key_length": nope + config["qk_rope_head_dim"],
        f"{arch}.attention.value_length": v_dim,
    }
    dropped = {f"{arch}.attention.key_length_mla", f"{arch}.attention.value_length_mla"}
    writer = gguf.GGUFWriter(target, arch)
    for field in reader.fields.values():
        name = field.name
        if name.startswith("GGUF.") or name == "general.architecture" or name in dropped:
            continue
        value_type = field.types[0]
        if name in replaced:
            writer.add_uint32(name, replaced[name])
        elif value_type == gguf.GGUFValueType.ARRAY:
            writer.add_array(name, field.contents())
        else:
            writer.add_key_value(name, field.contents(), value_type)
    for tensor in reader.tensors:
        name = tensor.name
        if ".attn_v_b." in name:
            continue  # folded into attn_kv_b with its attn_k_b
        data = np.asarray(tensor.data)
        if ".attn_k_b." in name:
            v_b = _tensor(reader, name.replace(".attn_k_b.", ".attn_v_b."))
            # attn_k_b is [head][kv_lora][nope] (transposed by the converter), attn_v_b is
            # [head][v][kv_lora]; kv_b_proj rows are per head: nope key rows, then v value rows.
            k_rows = data.transpose(0, 2, 1)  # [head][nope][kv_lora]
            kv_b = np.concatenate([k_rows, v_b], axis=1).reshape(n_head * (nope + v_dim), -1)
            writer.add_tensor(name.replace(".attn_k_b.", ".attn_kv_b."), np.ascontiguousarray(kv_b))
        else:
            writer.add_tensor(name, data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tensor(reader: Any, name: str) -> np.ndarray:
    return np.asarray(next(t for t in reader.tensors if t.name == name).data)


# llama.cpp's side of the comparison, shared with the other tiny models' tests.
llamacpp_logits = llamacpp.logits
llamacpp_greedy = llamacpp.greedy
