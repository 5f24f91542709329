"""Built-in shape descriptions of the big MoE models: their GGUF tensor index without the file.

`describe("deepseek-v3:Q4_K_M")` returns the ModelConfig and the tensor index (names, ggml types,
numpy-order shapes, byte sizes) that llama.cpp's convert_hf_to_gguf.py + llama-quantize would
write, so a 671B model can be planned before it is downloaded. Nothing here reads a file.
`shapes_from_hf_config(json.load(...))` describes a model from its config.json the same way.

A deepseek2 description's ModelConfig is read by cluster.deepseek2_config, the code that reads a
real file's header, from the metadata the converter would write (`deepseek2_metadata`): YaRN,
sigmoid group-limited routing, routed_scaling_factor and the YaRN-scaled softmax scale come out
as they would from the GGUF.

Shapes come from each model's official config.json (numbers and sources in MODELS). Tensor names
and shapes follow llama.cpp (src/models/deepseek2.cpp, glm4-moe.cpp, qwen3moe.cpp, read at
llama.cpp 0c1e570): routed experts are stacked per layer ([E, n_out, n_in]), MLA keeps the low
rank projections, and the converter writes 1-D tensors, norms and the router (ffn_gate_inp) as F32.
The multi-token-prediction layer is left out for DeepSeek/Kimi (the deepseek2 converter skips it)
and kept for GLM-4.6 (the glm4moe converter writes it as layer 92; llama.cpp loads it, never runs
it in plain decoding).

A quant name maps to per-tensor types the way llama-quantize's mixture does for these
architectures (llama_tensor_get_type_impl in src/llama-quant.cpp, same commit). Only the branches
these models reach are reproduced: experts >= 128, no fused qkv, no imatrix. The approximation:
  * Q4_K_M: Q4_K everywhere, but output.weight Q6_K; attn_v / attn_kv_b Q6_K and every ffn_down*
    (dense, shared and routed) Q6_K on the "use_more_bits" layers (the first and last eighth and
    every third layer between); token_embd Q4_K;
  * Q5_K_M likewise with Q5_K; Q4_K_S: ffn_down Q5_K in the first eighth, attn_v Q5_K in the
    first 4; Q5_K_S / Q6_K / Q8_0 / Q4_0: one type, output.weight Q6_K (Q8_0 stays Q8_0);
  * BF16 / F16: every quantizable weight in that type;
  * a row width that is not a multiple of the type's block falls back as llama-quantize does
    (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, then F16): MLA's attn_k_b rows are 128 wide.
The community's mixed recipes are written like llama-quantize's --tensor-type:
"deepseek-v3:Q8_0,ffn_.*_exps=Q4_K" applies Q8_0's mixture, then REGEX=TYPE to the quantizable
tensors whose name the regex finds (first match wins), with any type of cluster.gguf's table.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cluster.errors import NumoeError
from cluster.gguf import GGML_TYPE_NAMES, type_block
from cluster.model import ModelConfig, RopeStyle, YarnScaling

F32, F16, Q4_0, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 6, 7, 8, 12, 13, 14, 30
TYPE_IDS = {name: type_id for type_id, name in GGML_TYPE_NAMES.items()}
# llama-quantize's fallback when a row is not a whole number of blocks (tensor_type_fallback).
_FALLBACK = {Q4_K: Q5_0, Q5_K: Q5_1, Q6_K: Q8_0}


class CatalogError(NumoeError):
    """An unknown built-in model or quant recipe (message lists the known ones)."""


@dataclass(frozen=True)
class CatalogTensor:
    """One tensor of a described GGUF (the fields placement reads of cluster.gguf.TensorInfo)."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]  # numpy order: [n_out, n_in], experts [E, n_out, n_in]
    n_bytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPE_NAMES[self.ggml_type]

    @property
    def n_elements(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


@dataclass(frozen=True)
class Shapes:
    """The numbers of one official config.json that decide tensor shapes."""

    architecture: str  # GGUF general.architecture
    source: str  # where the numbers come from
    vocab_size: int
    hidden_size: int
    n_layers: int  # num_hidden_layers (the layers decoding runs)
    n_heads: int
    n_kv_heads: int
    head_dim: int  # GQA head width (MLA: qk_nope_head_dim + qk_rope_head_dim)
    value_head_dim: int
    intermediate_size: int  # dense FFN (first_k_dense_replace layers)
    moe_intermediate_size: int
    n_experts: int
    n_experts_used: int
    n_shared_experts: int = 0
    n_dense_layers: int = 0  # first_k_dense_replace
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    attention_bias: bool = False
    qk_norm: bool = False
    n_nextn_layers: int = 0  # MTP layers the GGUF holds after n_layers
    rope_theta: float = 10_000.0
    context_length: int = 4096
    norm_eps: float = 1e-6
    expert_weights_scale: float = 1.0  # routed_scaling_factor
    # deepseek2 routing and RoPE (the other families' configs are built from the shapes alone)
    sigmoid_gating: bool = False  # scoring_func "sigmoid" (V3 / R1 / Kimi-K2), else softmax
    n_expert_groups: int = 1  # n_group
    n_expert_groups_used: int = 1  # topk_group
    norm_topk_prob: bool = True
    yarn: YarnScaling | None = None  # rope_scaling of type "yarn"


_DEEPSEEK_V3 = Shapes(
    architecture="deepseek2",
    source="https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json "
           "(DeepSeek-R1 has the same shapes)",
    vocab_size=129280, hidden_size=7168, n_layers=61, n_heads=128, n_kv_heads=128,
    head_dim=128 + 64, value_head_dim=128,  # qk_nope_head_dim + qk_rope_head_dim, v_head_dim
    intermediate_size=18432, moe_intermediate_size=2048, n_experts=256, n_experts_used=8,
    n_shared_experts=1, n_dense_layers=3, q_lora_rank=1536, kv_lora_rank=512,
    qk_rope_head_dim=64, rope_theta=10_000.0, context_length=163840, norm_eps=1e-6,
    expert_weights_scale=2.5, sigmoid_gating=True, n_expert_groups=8, n_expert_groups_used=4,
    yarn=YarnScaling(factor=40.0, original_context_length=4096, beta_fast=32.0, beta_slow=1.0,
                     mscale=1.0, mscale_all_dim=1.0))

MODELS: dict[str, Shapes] = {
    "deepseek-v3": _DEEPSEEK_V3,
    "deepseek-r1": _DEEPSEEK_V3,
    "kimi-k2": Shapes(
        architecture="deepseek2",
        source="https://huggingface.co/moonshotai/Kimi-K2-Instruct/blob/main/config.json",
        vocab_size=163840, hidden_size=7168, n_layers=61, n_heads=64, n_kv_heads=64,
        head_dim=128 + 64, value_head_dim=128, intermediate_size=18432,
        moe_intermediate_size=2048, n_experts=384, n_experts_used=8, n_shared_experts=1,
        n_dense_layers=1, q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64,
        rope_theta=50_000.0, context_length=131072, norm_eps=1e-6, expert_weights_scale=2.827,
        sigmoid_gating=True, n_expert_groups=1, n_expert_groups_used=1,
        yarn=YarnScaling(factor=32.0, original_context_length=4096, beta_fast=1.0,
                         beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)),
    "qwen3-235b-a22b": Shapes(
        architecture="qwen3moe",
        source="https://huggingface.co/Qwen/Qwen3-235B-A22B/blob/main/config.json",
        vocab_size=151936, hidden_size=4096, n_layers=94, n_heads=64, n_kv_heads=4,
        head_dim=128, value_head_dim=128, intermediate_size=12288, moe_intermediate_size=1536,
        n_experts=128, n_experts_used=8, qk_norm=True, rope_theta=1_000_000.0,
        context_length=40960, norm_eps=1e-6),
    "qwen3-coder-480b": Shapes(
        architecture="qwen3moe",
        source="https://huggingface.co/Qwen/Qwen3-Coder-480B-A35B-Instruct/blob/main/config.json",
        vocab_size=151936, hidden_size=6144, n_layers=62, n_heads=96, n_kv_heads=8,
        head_dim=128, value_head_dim=128, intermediate_size=8192, moe_intermediate_size=2560,
        n_experts=160, n_experts_used=8, qk_norm=True, rope_theta=10_000_000.0,
        context_length=262144, norm_eps=1e-6),
    "glm-4.6": Shapes(
        architecture="glm4moe",
        source="https://huggingface.co/zai-org/GLM-4.6/blob/main/config.json",
        vocab_size=151552, hidden_size=5120, n_layers=92, n_heads=96, n_kv_heads=8,
        head_dim=128, value_head_dim=128, intermediate_size=12288, moe_intermediate_size=1536,
        n_experts=160, n_experts_used=8, n_shared_experts=1, n_dense_layers=3,
        attention_bias=True, qk_norm=True, n_nextn_layers=1, rope_theta=1_000_000.0,
        context_length=202752, norm_eps=1e-5, expert_weights_scale=2.5),
}
MLA_LAYOUTS = ("split", "kv_b")  # attn_k_b + attn_v_b (llama.cpp >= May 2025) | attn_kv_b
DEFAULT_QUANT = "Q4_K_M"
_MIXTURES = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "Q8_0", "Q4_0", "BF16", "F16")


@dataclass(frozen=True)
class CatalogModel:
    name: str  # "deepseek-v3:Q4_K_M"
    shapes: Shapes
    config: ModelConfig
    tensors: dict[str, CatalogTensor]  # GGUF order

    @property
    def total_bytes(self) -> int:
        return sum(tensor.n_bytes for tensor in self.tensors.values())


def list_models() -> list[str]:
    return sorted(MODELS)


def format_catalog() -> str:
    """The built-in models (one line each) and the quant recipes, for `numoe plan --list-models`."""
    lines = ["built-in models (numoe plan NAME:QUANT):"]
    for name in list_models():
        s = MODELS[name]
        experts = f"{s.n_experts} experts, top {s.n_experts_used}"
        if s.n_shared_experts:
            experts += f" + {s.n_shared_experts} shared"
        attention = "MLA" if s.kv_lora_rank else f"GQA {s.n_heads}/{s.n_kv_heads} heads"
        lines.append(f"  {name:18s} {s.architecture:9s} {s.n_layers} layers, hidden "
                     f"{s.hidden_size}, {attention}, {experts}; {s.source}")
    lines.append(f"quant recipes: {', '.join(_MIXTURES)} (llama-quantize's mixtures), "
                 f"optionally followed by ,REGEX=TYPE parts, e.g. deepseek-v3:Q8_0,"
                 f"ffn_.*_exps=Q4_K")
    return "\n".join(lines)


def describe(text: str, mla_layout: str = "split") -> CatalogModel:
    """A built-in description: "NAME[:RECIPE]", e.g. "deepseek-v3:Q4_K_M" or
    "deepseek-v3:Q8_0,ffn_.*_exps=Q4_K" (default recipe Q4_K_M)."""
    name, _, recipe = text.partition(":")
    shapes = MODELS.get(name.lower())
    if shapes is None:
        raise CatalogError(f"no built-in model {name!r}; known: {', '.join(list_models())} "
                           f"(write NAME:QUANT, e.g. deepseek-v3:Q4_K_M), or give a GGUF path")
    return describe_shapes(shapes, recipe or DEFAULT_QUANT, name.lower(), mla_layout)


def describe_shapes(shapes: Shapes, recipe: str, name: str = "custom",
                    mla_layout: str = "split") -> CatalogModel:
    """The GGUF that `shapes` quantized with `recipe` would be (see the module docstring)."""
    if mla_layout not in MLA_LAYOUTS:
        raise CatalogError(f"MLA layout {mla_layout!r}: choose one of {', '.join(MLA_LAYOUTS)}")
    mixture, overrides = _parse_recipe(recipe)
    shaped = list(_tensor_shapes(shapes, mla_layout))
    types = _quant_types(shaped, shapes, mixture, overrides)
    tensors = {tensor_name: CatalogTensor(tensor_name, ggml_type, shape,
                                          _n_bytes(shape, ggml_type))
               for (tensor_name, shape), ggml_type in zip(shaped, types, strict=True)}
    config = (_deepseek2_config(shapes, mla_layout, tensors)
              if shapes.architecture == "deepseek2" else _model_config(shapes))
    return CatalogModel(f"{name}:{recipe}", shapes, config, tensors)


def looks_like_catalog_name(text: str) -> bool:
    """True for "NAME:RECIPE" or a bare known NAME (a GGUF path is neither)."""
    name = text.partition(":")[0].lower()
    return name in MODELS or (":" in text and "/" not in name and not name.endswith(".gguf"))


# --- tensor shapes --------------------------------------------------------------------------


def _tensor_shapes(s: Shapes, mla_layout: str) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, numpy-order shape) of every tensor, in the order the converter writes them."""
    h = s.hidden_size
    yield "token_embd.weight", (s.vocab_size, h)
    for layer in range(s.n_layers + s.n_nextn_layers):
        p = f"blk.{layer}."
        yield p + "attn_norm.weight", (h,)
        if s.kv_lora_rank:
            yield from _mla_shapes(p, s, mla_layout)
        else:
            q, kv = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
            for kind, rows in (("q", q), ("k", kv), ("v", s.n_kv_heads * s.value_head_dim)):
                yield p + f"attn_{kind}.weight", (rows, h)
                if s.attention_bias:
                    yield p + f"attn_{kind}.bias", (rows,)
            yield p + "attn_output.weight", (h, s.n_heads * s.value_head_dim)
            if s.qk_norm:
                yield p + "attn_q_norm.weight", (s.head_dim,)
                yield p + "attn_k_norm.weight", (s.head_dim,)
        # glm4moe names its pre-FFN norm post_attention_norm (LLM_TENSOR_ATTN_POST_NORM).
        norm = "post_attention_norm" if s.architecture == "glm4moe" else "ffn_norm"
        yield p + f"{norm}.weight", (h,)
        if layer < s.n_dense_layers:
            f = s.intermediate_size
            yield p + "ffn_gate.weight", (f, h)
            yield p + "ffn_up.weight", (f, h)
            yield p + "ffn_down.weight", (h, f)
        else:
            e, f = s.n_experts, s.moe_intermediate_size
            yield p + "ffn_gate_inp.weight", (e, h)
            if s.architecture != "qwen3moe":  # sigmoid routers with a selection bias
                yield p + "exp_probs_b.bias", (e,)
            yield p + "ffn_gate_exps.weight", (e, f, h)
            yield p + "ffn_up_exps.weight", (e, f, h)
            yield p + "ffn_down_exps.weight", (e, h, f)
            if s.n_shared_experts:
                shared = f * s.n_shared_experts
                yield p + "ffn_gate_shexp.weight", (shared, h)
                yield p + "ffn_up_shexp.weight", (shared, h)
                yield p + "ffn_down_shexp.weight", (h, shared)
        if layer >= s.n_layers:  # MTP head: llama.cpp's LLM_TENSOR_NEXTN_* (glm4moe)
            yield p + "nextn.eh_proj.weight", (h, 2 * h)
            yield p + "nextn.enorm.weight", (h,)
            yield p + "nextn.hnorm.weight", (h,)
            yield p + "nextn.shared_head_norm.weight", (h,)
    yield "output_norm.weight", (h,)
    yield "output.weight", (s.vocab_size, h)


def _mla_shapes(p: str, s: Shapes, mla_layout: str) -> Iterator[tuple[str, tuple[int, ...]]]:
    """deepseek2 attention (llama.cpp's LLM_TENSOR_ATTN_Q_A ... ATTN_OUT), numpy order."""
    h, heads = s.hidden_size, s.n_heads
    nope = s.head_dim - s.qk_rope_head_dim
    if s.q_lora_rank:
        yield p + "attn_q_a_norm.weight", (s.q_lora_rank,)
    yield p + "attn_kv_a_norm.weight", (s.kv_lora_rank,)
    if s.q_lora_rank:
        yield p + "attn_q_a.weight", (s.q_lora_rank, h)
        yield p + "attn_q_b.weight", (heads * s.head_dim, s.q_lora_rank)
    else:  # DeepSeek-V2-Lite: one full-rank query projection
        yield p + "attn_q.weight", (heads * s.head_dim, h)
    yield p + "attn_kv_a_mqa.weight", (s.kv_lora_rank + s.qk_rope_head_dim, h)
    if mla_layout == "split":
        yield p + "attn_k_b.weight", (heads, s.kv_lora_rank, nope)  # ne {nope, rank, heads}
        yield p + "attn_v_b.weight", (heads, s.value_head_dim, s.kv_lora_rank)
    else:
        yield p + "attn_kv_b.weight", (heads * (nope + s.value_head_dim), s.kv_lora_rank)
    yield p + "attn_output.weight", (h, heads * s.value_head_dim)


def _n_bytes(shape: tuple[int, ...], ggml_type: int) -> int:
    block_elements, block_bytes = type_block(ggml_type)
    elements = 1
    for dim in shape:
        elements *= dim
    assert elements % block_elements == 0, (shape, ggml_type)
    return elements // block_elements * block_bytes


# --- quant recipes --------------------------------------------------------------------------


def _parse_recipe(recipe: str) -> tuple[str, list[tuple[re.Pattern[str], int]]]:
    mixture, *parts = [part.strip() for part in recipe.split(",")]
    mixture = mixture.upper()
    if mixture not in _MIXTURES:
        raise CatalogError(f"quant {mixture!r} is not a known mixture; use one of "
                           f"{', '.join(_MIXTURES)}, optionally followed by REGEX=TYPE parts "
                           f"(e.g. Q8_0,ffn_.*_exps=Q4_K)")
    overrides = []
    for part in parts:
        pattern, sep, type_name = part.rpartition("=")
        type_id = TYPE_IDS.get(type_name.upper())
        if not sep or not pattern or type_id is None:
            raise CatalogError(f"recipe part {part!r}: write REGEX=TYPE with a type of "
                               f"{', '.join(TYPE_IDS)}")
        try:
            overrides.append((re.compile(pattern), type_id))
        except re.error as error:
            raise CatalogError(f"recipe part {part!r}: {error}; fix the regex") from error
    return mixture, overrides


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama-quant.cpp's use_more_bits: the first and last eighth, and every third between."""
    return (i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8
            or (i_layer - n_layers // 8) % 3 == 2)


def _quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """llama-quant.cpp's tensor_allows_quantization for these architectures."""
    return (len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name)


def _quant_types(shaped: list[tuple[str, tuple[int, ...]]], s: Shapes, mixture: str,
                 overrides: list[tuple[re.Pattern[str], int]]) -> list[int]:
    base = {"Q4_K_M": Q4_K, "Q4_K_S": Q4_K, "Q5_K_M": Q5_K, "Q5_K_S": Q5_K, "Q6_K": Q6_K,
            "Q8_0": Q8_0, "Q4_0": Q4_0, "BF16": BF16, "F16": F16}[mixture]
    quantized = base not in (BF16, F16)
    n_layer_all = s.n_layers + s.n_nextn_layers
    n_attention_v = sum(1 for name, _ in shaped if _is_attn_v(name))
    i_attention_v = 0
    types = []
    for name, shape in shaped:
        if not _quantizable(name, shape):
            types.append(F32)  # the converter writes these F32 and quantize keeps them
            continue
        if not quantized:
            types.append(base)
            continue
        chosen = next((t for regex, t in overrides if regex.search(name)), None)
        if chosen is None:
            chosen = _mixture_type(name, base, mixture, n_layer_all, i_attention_v,
                                   n_attention_v)
        if _is_attn_v(name):
            i_attention_v += 1
        types.append(_fallback(chosen, shape[-1]))
    return types


def _is_attn_v(name: str) -> bool:
    return "attn_v.weight" in name or "attn_kv_b.weight" in name or "attn_qkv.weight" in name


def _mixture_type(name: str, base: int, mixture: str, n_layer_all: int, i_attention_v: int,
                  n_attention_v: int) -> int:
    if name == "output.weight":
        return base if base == Q8_0 else Q6_K
    if name == "token_embd.weight":
        return base
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    if _is_attn_v(name):
        if mixture in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i_attention_v, n_attention_v):
            return Q6_K
        if mixture == "Q4_K_S" and i_attention_v < 4:
            return Q5_K
        return base
    if "ffn_down" in name:
        if mixture in ("Q4_K_M", "Q5_K_M") and _use_more_bits(layer, n_layer_all):
            return Q6_K
        if mixture == "Q4_K_S" and layer < n_layer_all // 8:
            return Q5_K
    return base


def _fallback(ggml_type: int, row_width: int) -> int:
    """llama-quantize's tensor_type_fallback for rows that are not whole blocks."""
    if row_width % type_block(ggml_type)[0] == 0:
        return ggml_type
    smaller = _FALLBACK.get(ggml_type, F16)
    return smaller if row_width % type_block(smaller)[0] == 0 else F16


# --- config ---------------------------------------------------------------------------------


def _f32(value: float) -> float:
    """`value` as GGUF stores it (float32), so a description reads like a file's header."""
    return float(np.float32(value))


def deepseek2_metadata(s: Shapes, mla_layout: str = "split") -> dict[str, Any]:
    """The deepseek2 metadata llama.cpp's converter (conversion/deepseek.py
    DeepseekV2Model.set_gguf_parameters and the base class) writes for `s`, keys as a GGUF
    header holds them, floats rounded to float32 as GGUF stores them. `mla_layout` "kv_b" gives
    the older converters' form (per-head sizes in key/value_length, no *_mla keys).

    GGUF has no mscale key: the converter writes yarn_log_multiplier = 0.1 * mscale_all_dim and
    llama.cpp takes mscale = mscale_all_dim, so a config whose two differ cannot be written."""
    arch = "deepseek2"
    nope = s.head_dim - s.qk_rope_head_dim
    meta: dict[str, Any] = {
        "general.architecture": arch,
        f"{arch}.block_count": s.n_layers + s.n_nextn_layers,
        f"{arch}.context_length": s.context_length,
        f"{arch}.embedding_length": s.hidden_size,
        f"{arch}.feed_forward_length": s.intermediate_size,
        f"{arch}.attention.head_count": s.n_heads,
        f"{arch}.rope.freq_base": _f32(s.rope_theta),
        f"{arch}.attention.layer_norm_rms_epsilon": _f32(s.norm_eps),
        f"{arch}.expert_count": s.n_experts,
        f"{arch}.expert_used_count": s.n_experts_used,
        f"{arch}.expert_group_count": s.n_expert_groups,
        f"{arch}.expert_group_used_count": s.n_expert_groups_used,
        f"{arch}.expert_gating_func": 2 if s.sigmoid_gating else 1,
        f"{arch}.leading_dense_block_count": s.n_dense_layers,
        f"{arch}.vocab_size": s.vocab_size,
        f"{arch}.attention.kv_lora_rank": s.kv_lora_rank,
        f"{arch}.expert_feed_forward_length": s.moe_intermediate_size,
        f"{arch}.expert_shared_count": s.n_shared_experts,
        f"{arch}.rope.dimension_count": s.qk_rope_head_dim,
    }
    if mla_layout == "split":  # the MQA form llama.cpp runs absorbed attention in
        meta[f"{arch}.attention.head_count_kv"] = 1
        meta[f"{arch}.attention.key_length"] = s.kv_lora_rank + s.qk_rope_head_dim
        meta[f"{arch}.attention.value_length"] = s.kv_lora_rank
        meta[f"{arch}.attention.key_length_mla"] = nope + s.qk_rope_head_dim
        meta[f"{arch}.attention.value_length_mla"] = s.value_head_dim
    else:
        meta[f"{arch}.attention.head_count_kv"] = s.n_heads
        meta[f"{arch}.attention.key_length"] = nope + s.qk_rope_head_dim
        meta[f"{arch}.attention.value_length"] = s.value_head_dim
    if s.q_lora_rank:
        meta[f"{arch}.attention.q_lora_rank"] = s.q_lora_rank
    if s.expert_weights_scale != 1.0:
        meta[f"{arch}.expert_weights_scale"] = _f32(s.expert_weights_scale)
    if s.norm_topk_prob:
        meta[f"{arch}.expert_weights_norm"] = True
    if s.n_nextn_layers:
        meta[f"{arch}.nextn_predict_layers"] = s.n_nextn_layers
    if s.yarn is not None:
        y = s.yarn
        if y.mscale != y.mscale_all_dim:
            raise CatalogError(f"{s.source}: YaRN mscale {y.mscale} differs from mscale_all_dim "
                               f"{y.mscale_all_dim}; GGUF (and llama.cpp) hold only the latter")
        meta.update({
            f"{arch}.rope.scaling.type": "yarn",
            f"{arch}.rope.scaling.factor": _f32(y.factor),
            f"{arch}.rope.scaling.original_context_length": y.original_context_length,
            f"{arch}.rope.scaling.yarn_beta_fast": _f32(y.beta_fast),
            f"{arch}.rope.scaling.yarn_beta_slow": _f32(y.beta_slow),
            f"{arch}.rope.scaling.yarn_log_multiplier": _f32(0.1 * y.mscale_all_dim),
        })
    return meta


def _deepseek2_config(s: Shapes, mla_layout: str,
                      tensors: Mapping[str, CatalogTensor]) -> ModelConfig:
    """A deepseek2 description's config, read by the code that reads a real file's header
    (cluster.deepseek2_config), from the metadata the converter would write: YaRN, sigmoid
    group-limited routing and the YaRN-scaled softmax scale come out as a file's would."""
    from cluster.deepseek2_config import read_deepseek2_config  # noqa: PLC0415 - needs model

    return read_deepseek2_config(deepseek2_metadata(s, mla_layout),
                                 tensors)  # type: ignore[arg-type]


def shapes_from_hf_config(config: Mapping[str, Any], source: str = "config.json") -> Shapes:
    """The Shapes of a Hugging Face config.json (a dict), for planning a model that is not
    built in: DeepSeek-V2/V3/R1 and Kimi-K2 (model_type deepseek_v2 / deepseek_v3 / kimi_k2)
    and Qwen3-MoE (qwen3_moe). Keys and defaults as llama.cpp's converter reads them."""
    model_type = str(config.get("model_type", ""))
    try:
        if model_type in ("deepseek_v2", "deepseek_v3", "kimi_k2"):
            return _deepseek_shapes(config, source)
        if model_type == "qwen3_moe":
            heads = config["num_attention_heads"]
            head_dim = config.get("head_dim") or config["hidden_size"] // heads
            return Shapes(
                architecture="qwen3moe", source=source, vocab_size=config["vocab_size"],
                hidden_size=config["hidden_size"], n_layers=config["num_hidden_layers"],
                n_heads=heads, n_kv_heads=config.get("num_key_value_heads", heads),
                head_dim=head_dim, value_head_dim=head_dim,
                intermediate_size=config.get("intermediate_size", 0),
                moe_intermediate_size=config["moe_intermediate_size"],
                n_experts=config["num_experts"], n_experts_used=config["num_experts_per_tok"],
                qk_norm=True, rope_theta=float(config.get("rope_theta", 10_000.0)),
                context_length=config["max_position_embeddings"],
                norm_eps=float(config.get("rms_norm_eps", 1e-6)))
    except KeyError as error:
        raise CatalogError(f"{source}: a {model_type} config.json needs {error}; give the "
                           f"model's complete config.json") from None
    raise CatalogError(f"{source}: model_type {model_type!r} is not one numoe can describe; "
                       f"known: deepseek_v2, deepseek_v3, kimi_k2, qwen3_moe")


def _deepseek_shapes(c: Mapping[str, Any], source: str) -> Shapes:
    rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type"))
    yarn = None
    if rope_type == "yarn" and rope.get("factor") is not None:
        yarn = YarnScaling(
            factor=float(rope["factor"]),
            original_context_length=int(rope["original_max_position_embeddings"]),
            beta_fast=float(rope.get("beta_fast", 32.0)),
            beta_slow=float(rope.get("beta_slow", 1.0)),
            mscale=float(rope.get("mscale", rope.get("mscale_all_dim", 0.0))),
            mscale_all_dim=float(rope.get("mscale_all_dim", 0.0)))
    scoring = c.get("scoring_func", "softmax")
    if scoring not in ("softmax", "sigmoid"):
        raise CatalogError(f"{source}: scoring_func {scoring!r}; llama.cpp's deepseek2 supports "
                           f"softmax and sigmoid")
    heads = c["num_attention_heads"]
    return Shapes(
        architecture="deepseek2", source=source, vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=heads,
        n_kv_heads=heads, head_dim=c["qk_nope_head_dim"] + c["qk_rope_head_dim"],
        value_head_dim=c["v_head_dim"], intermediate_size=c["intermediate_size"],
        moe_intermediate_size=c["moe_intermediate_size"], n_experts=c["n_routed_experts"],
        n_experts_used=c["num_experts_per_tok"],
        n_shared_experts=c.get("n_shared_experts") or 0,
        n_dense_layers=c.get("first_k_dense_replace") or 0,
        q_lora_rank=c.get("q_lora_rank") or 0, kv_lora_rank=c["kv_lora_rank"],
        qk_rope_head_dim=c["qk_rope_head_dim"],
        rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10_000.0))),
        context_length=c["max_position_embeddings"],
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        expert_weights_scale=float(c.get("routed_scaling_factor", 1.0)),
        sigmoid_gating=scoring == "sigmoid", n_expert_groups=c.get("n_group") or 1,
        n_expert_groups_used=c.get("topk_group") or 1,
        norm_topk_prob=bool(c.get("norm_topk_prob", False)), yarn=yarn)


def _model_config(s: Shapes) -> ModelConfig:
    """The ModelConfig placement reads, for the families other than deepseek2 (whose config
    comes from _deepseek2_config). Fields only the forward pass uses (rope, scales) are filled
    from config.json where it gives them and are not used: numoe does not run glm4moe, and
    plans only need shapes."""
    return ModelConfig(
        architecture=s.architecture, vocab_size=s.vocab_size, n_layers=s.n_layers,
        n_embd=s.hidden_size, n_heads=s.n_heads, n_kv_heads=s.n_kv_heads, head_dim=s.head_dim,
        value_head_dim=s.value_head_dim,
        n_ff=s.intermediate_size if s.n_dense_layers else 0,
        n_experts=s.n_experts, n_experts_used=s.n_experts_used,
        n_ff_expert=s.moe_intermediate_size, expert_weights_norm=True,
        expert_weights_scale=s.expert_weights_scale, ffn_activation="silu",
        norm_eps=s.norm_eps,
        rope_style=RopeStyle.NORMAL if s.architecture == "deepseek2" else RopeStyle.NEOX,
        rope_theta=s.rope_theta, rope_theta_sliding=s.rope_theta, rope_freq_scale=1.0,
        context_length=s.context_length, sliding_window=0,
        sliding_layers=(False,) * s.n_layers, attention_scale=s.head_dim ** -0.5,
        embedding_scale=1.0, final_logit_softcap=0.0, has_qk_norm=s.qk_norm,
        has_post_norms=False, tied_output=False, n_dense_layers=s.n_dense_layers,
        n_shared_experts=s.n_shared_experts, q_lora_rank=s.q_lora_rank,
        kv_lora_rank=s.kv_lora_rank, qk_rope_head_dim=s.qk_rope_head_dim,
        n_nextn_layers=s.n_nextn_layers)
