"""GGUF metadata -> ModelConfig, and the tensor index checked against it.

`load_model_spec(gguf)` is the single place that interprets a model file: it reads the
hyper-parameters for the architectures numoe runs (qwen3moe, qwen3, gemma3, and deepseek2
through cluster/deepseek2_config.py), then checks that every tensor the forward pass needs is
present, has the shape the metadata implies and a quant type numoe has kernels for. Everything
downstream (runner, placement) reads the frozen config and never re-derives it from metadata.
Conventions follow llama.cpp, the reference implementation for GGUF files: shapes are numpy
order ([n_out, n_in] for weights).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from cluster.errors import (
    NumoeError,
    TensorShapeError,
    UnsupportedArchitectureError,
    UnsupportedQuantTypeError,
)
from cluster.gguf import GGML_TYPE_NAMES, SUPPORTED_TYPES, GGUFFile, TensorInfo

SUPPORTED_ARCHITECTURES = ("qwen3moe", "qwen3", "gemma3", "deepseek2")
# The two ways a deepseek2 file stores MLA's per-head up-projections: llama.cpp's converter
# writes attn_k_b + attn_v_b since May 2025; older files hold the combined attn_kv_b.
MLA_SPLIT, MLA_KV_B = "split", "kv_b"

# Gemma 3: every 6th layer attends globally, the others through a sliding window (llama.cpp's
# load_swa_pattern(ml, 6) default when the file has no sliding_window_pattern key).
GEMMA3_SWA_PATTERN = 6
# llama.cpp's rope_freq_base_train_swa default: Gemma 3's local layers use RoPE base 10 000.
GEMMA3_LOCAL_ROPE_BASE = 10_000.0


class RopeStyle(Enum):
    """How RoPE pairs the dimensions of a head (llama.cpp's rope_type)."""

    NORMAL = "normal"  # pairs (2i, 2i+1): original LLaMA / GPT-J layout
    NEOX = "neox"  # pairs (i, i + d/2): GPT-NeoX layout, used by Qwen3 and Gemma 3


class ExpertGating(Enum):
    """How the router turns logits into expert scores. The values are GGUF's expert_gating_func
    (llama.cpp's llama_expert_gating_func_type)."""

    SOFTMAX = 1  # Qwen3-MoE, DeepSeek-V2
    SIGMOID = 2  # DeepSeek-V3 / R1, Kimi-K2


@dataclass(frozen=True)
class YarnScaling:
    """YaRN RoPE context extension, as transformers' rope_parameters of type "yarn" hold it."""

    factor: float  # context extension factor (GGUF rope.scaling.factor)
    original_context_length: int  # context the model was pre-trained with, in tokens
    beta_fast: float = 32.0  # rotations above which a frequency is kept (extrapolated)
    beta_slow: float = 1.0  # rotations below which a frequency is divided by factor
    mscale: float = 1.0  # DeepSeek's mscale
    mscale_all_dim: float = 0.0  # DeepSeek's mscale_all_dim; 0 = absent


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    n_layers: int
    n_embd: int  # hidden size
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (grouped-query attention when < n_heads)
    head_dim: int  # per-head width of queries and keys
    value_head_dim: int  # per-head width of values
    n_ff: int  # dense FFN intermediate size (0 when every layer is MoE)
    n_experts: int  # routed experts per MoE layer (0 for dense models)
    n_experts_used: int  # experts each token is routed to
    n_ff_expert: int  # intermediate size of one routed expert
    expert_weights_norm: bool  # renormalise the top-k router weights to sum to 1
    expert_weights_scale: float  # multiplier on the routed output
    ffn_activation: str  # "silu" (SwiGLU) | "gelu_tanh" (GeGLU)
    norm_eps: float  # RMSNorm epsilon
    rope_style: RopeStyle
    rope_theta: float  # RoPE base of the global-attention layers
    rope_theta_sliding: float  # RoPE base of the sliding-window layers
    rope_freq_scale: float  # 1 / linear rope scaling factor (1.0 = no scaling)
    context_length: int  # trained context, in tokens
    sliding_window: int  # tokens a sliding layer sees (key p0 visible from p1 iff p1-p0 < window)
    sliding_layers: tuple[bool, ...]  # [n_layers] True where the layer uses the sliding window
    attention_scale: float  # multiplies q·k before the softmax
    embedding_scale: float  # multiplies the token embeddings (Gemma: sqrt(n_embd))
    final_logit_softcap: float  # 0 = none; else logits = c * tanh(logits / c)
    has_qk_norm: bool  # RMSNorm over each head of q and k before RoPE
    has_post_norms: bool  # Gemma: RMSNorm on the attention and FFN outputs before the residual
    tied_output: bool  # LM head reuses token_embd.weight (no output.weight tensor)
    # Optional (defaults keep every constructor above valid): deepseek2 (DeepSeek, Kimi) and
    # cluster.catalog's glm4moe, which numoe can plan but not run yet.
    n_dense_layers: int = 0  # leading layers with a dense FFN in an MoE model (first_k_dense)
    n_shared_experts: int = 0  # always-on experts per MoE layer (ffn_*_shexp tensors)
    q_lora_rank: int = 0  # MLA: rank of the compressed query (0 = one plain q projection)
    kv_lora_rank: int = 0  # MLA: width of the compressed KV latent; 0 = not MLA
    qk_rope_head_dim: int = 0  # MLA: RoPE part of a head's query/key (one rope key per token)
    n_nextn_layers: int = 0  # multi-token-prediction layers stored after n_layers, never run
    expert_gating: ExpertGating = ExpertGating.SOFTMAX  # router logits -> expert scores
    n_expert_groups: int = 1  # group-limited routing: experts in this many groups (1 = none)
    n_expert_groups_used: int = 1  # groups a token may pick its experts from
    rope_yarn: YarnScaling | None = None  # None = no YaRN scaling

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def is_mla(self) -> bool:
        """Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2)."""
        return self.kv_lora_rank > 0

    @property
    def kv_cache_width(self) -> int:
        """KV-cache elements per token per layer. MLA caches the compressed latent and the one
        shared RoPE key (kv_lora_rank + qk_rope_head_dim, as llama.cpp does), not per-head keys
        and values; other attention caches k and v of every kv head."""
        if self.is_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return self.n_kv_heads * (self.head_dim + self.value_head_dim)

    @property
    def mla_nope_dim(self) -> int:
        """MLA: per-head query/key dimensions without position (qk_nope_head_dim)."""
        return self.head_dim - self.qk_rope_head_dim

    def layer_is_moe(self, layer: int) -> bool:
        """Whether `layer` has routed experts (DeepSeek's first layers are dense)."""
        return self.is_moe and layer >= self.n_dense_layers

    @property
    def q_width(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.n_kv_heads * self.head_dim

    def rope_theta_for_layer(self, layer: int) -> float:
        return self.rope_theta_sliding if self.sliding_layers[layer] else self.rope_theta


TensorMap = dict[str, TensorInfo]  # canonical GGUF tensor name -> info; "output.weight" resolved


def load_model_spec(gguf: GGUFFile) -> tuple[ModelConfig, TensorMap]:
    """Read the ModelConfig from `gguf` and check every tensor it needs (names, shapes, types)."""
    config = _read_config(gguf.metadata, gguf.tensors)
    tensors = _check_tensors(config, gguf.tensors, mla_layout_of(gguf.tensors))
    return config, tensors


def mla_layout_of(tensors: Mapping[str, Any]) -> str:
    """MLA_KV_B when the file holds the combined attn_kv_b tensors, else MLA_SPLIT."""
    return MLA_KV_B if "blk.0.attn_kv_b.weight" in tensors else MLA_SPLIT


# --- metadata -------------------------------------------------------------------------------


class _Metadata:
    """Typed access to `{arch}.*` keys; a missing required key is a NumoeError naming the key
    (the file is incomplete, not a bug in numoe)."""

    def __init__(self, metadata: dict[str, Any], arch: str) -> None:
        self.metadata = metadata
        self.arch = arch

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.arch}.{key}", default)

    def require(self, key: str) -> Any:
        full_key = f"{self.arch}.{key}"
        if full_key not in self.metadata:
            raise NumoeError(
                f"GGUF metadata lacks {full_key!r}, which a {self.arch} model needs; the file "
                f"is incomplete: re-convert it with llama.cpp's convert_hf_to_gguf.py"
            )
        return self.metadata[full_key]

    def integer(self, key: str, default: int | None = None) -> int:
        value = self.require(key) if default is None else self.get(key, default)
        if hasattr(value, "__len__"):  # per-layer arrays: numoe needs them uniform
            values = {int(v) for v in value}
            if len(values) != 1:
                raise NumoeError(
                    f"GGUF metadata {self.arch}.{key} varies per layer ({sorted(values)}); "
                    f"numoe supports uniform layers only"
                )
            return values.pop()
        return int(value)


def _read_config(metadata: dict[str, Any], tensors: dict[str, TensorInfo]) -> ModelConfig:
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"model architecture {arch!r} (general.architecture) is not supported; numoe runs "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}: use a model of one of these families"
        )
    if arch == "deepseek2":
        # Imported here: cluster.deepseek2_config builds on this module's types.
        from cluster.deepseek2_config import read_deepseek2_config  # noqa: PLC0415

        if "token_embd.weight" not in tensors:
            raise TensorShapeError(_MISSING_EMBEDDING)
        return read_deepseek2_config(metadata, tensors)
    meta = _Metadata(metadata, arch)
    n_layers = meta.integer("block_count")
    n_embd = meta.integer("embedding_length")
    n_heads = meta.integer("attention.head_count")
    n_kv_heads = meta.integer("attention.head_count_kv", n_heads)
    head_dim = meta.integer("attention.key_length", n_embd // n_heads)
    value_head_dim = meta.integer("attention.value_length", head_dim)
    if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads:
        raise NumoeError(
            f"GGUF metadata: {n_heads} attention heads is not a multiple of {n_kv_heads} "
            f"key/value heads; the file is corrupt: re-convert it"
        )

    is_moe = arch == "qwen3moe"
    n_experts = meta.integer("expert_count") if is_moe else 0
    n_experts_used = meta.integer("expert_used_count") if is_moe else 0
    n_ff = meta.integer("feed_forward_length", 0) if is_moe else meta.integer("feed_forward_length")
    n_ff_expert = 0
    if is_moe:
        # llama.cpp's fallback when the key is absent: n_ff / n_expert_used.
        fallback = n_ff // n_experts_used if n_experts_used else 0
        n_ff_expert = meta.integer("expert_feed_forward_length", fallback)

    token_embd = tensors.get("token_embd.weight")
    if token_embd is None:
        raise TensorShapeError(_MISSING_EMBEDDING)
    vocab_size = token_embd.shape[0] if len(token_embd.shape) == 2 else -1
    declared_vocab = meta.get("vocab_size")
    if declared_vocab is not None and int(declared_vocab) != vocab_size:
        raise TensorShapeError(
            f"tensor 'token_embd.weight' has shape {list(token_embd.shape)} but metadata "
            f"{arch}.vocab_size is {declared_vocab}; expected [{declared_vocab}, {n_embd}]"
        )

    is_gemma = arch == "gemma3"
    sliding_window = 0
    sliding_layers = (False,) * n_layers
    rope_theta = float(meta.get("rope.freq_base", 10_000.0))
    rope_theta_sliding = rope_theta
    if is_gemma:
        sliding_window = int(meta.get("attention.sliding_window", 0))
        if sliding_window > 0:
            sliding_layers = _gemma3_sliding_layers(meta, n_layers)
            rope_theta_sliding = float(meta.get("rope.freq_base_swa", GEMMA3_LOCAL_ROPE_BASE))

    return ModelConfig(
        architecture=arch,
        vocab_size=vocab_size,
        n_layers=n_layers,
        n_embd=n_embd,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        value_head_dim=value_head_dim,
        n_ff=n_ff,
        n_experts=n_experts,
        n_experts_used=n_experts_used,
        n_ff_expert=n_ff_expert,
        # llama.cpp's qwen3moe graph always renormalises (norm_w = true); a file may say otherwise.
        expert_weights_norm=bool(meta.get("expert_weights_norm", True)) if is_moe else False,
        expert_weights_scale=float(meta.get("expert_weights_scale", 1.0)) if is_moe else 1.0,
        ffn_activation="gelu_tanh" if is_gemma else "silu",
        norm_eps=float(meta.require("attention.layer_norm_rms_epsilon")),
        rope_style=RopeStyle.NEOX,  # llama.cpp: LLAMA_ROPE_TYPE_NEOX for these three
        rope_theta=rope_theta,
        rope_theta_sliding=rope_theta_sliding,
        rope_freq_scale=_rope_freq_scale(meta),
        context_length=meta.integer("context_length"),
        sliding_window=sliding_window,
        sliding_layers=sliding_layers,
        # Gemma 3 (all sizes but 27B) and Qwen3 both scale by 1/sqrt(head_dim) (llama.cpp's
        # gemma3 f_attention_scale); 27B uses n_embd / n_heads, which differs only there.
        attention_scale=_attention_scale(is_gemma, n_layers, n_embd, n_heads, head_dim),
        embedding_scale=math.sqrt(n_embd) if is_gemma else 1.0,
        final_logit_softcap=float(meta.get("final_logit_softcapping", 0.0)) if is_gemma else 0.0,
        has_qk_norm=True,
        has_post_norms=is_gemma,
        tied_output="output.weight" not in tensors,
    )


_MISSING_EMBEDDING = ("tensor 'token_embd.weight' is missing; every model needs its token "
                      "embeddings: re-convert the model with llama.cpp's convert_hf_to_gguf.py")


def _attention_scale(is_gemma: bool, n_layers: int, n_embd: int, n_heads: int,
                     head_dim: int) -> float:
    gemma3_27b_layers = 62
    if is_gemma and n_layers == gemma3_27b_layers:
        return 1.0 / math.sqrt(n_embd / n_heads)
    return 1.0 / math.sqrt(head_dim)


def _gemma3_sliding_layers(meta: _Metadata, n_layers: int) -> tuple[bool, ...]:
    pattern = meta.get("attention.sliding_window_pattern", GEMMA3_SWA_PATTERN)
    if hasattr(pattern, "__len__"):  # explicit per-layer booleans
        if len(pattern) != n_layers:
            raise NumoeError(
                f"GGUF metadata {meta.arch}.attention.sliding_window_pattern has {len(pattern)} "
                f"entries for {n_layers} layers; the file is corrupt: re-convert it"
            )
        return tuple(bool(v) for v in pattern)
    period = int(pattern)
    # llama.cpp set_swa_pattern: layer il is sliding iff il % period < period - 1.
    return tuple(period == 0 or layer % period < period - 1 for layer in range(n_layers))


def _rope_freq_scale(meta: _Metadata) -> float:
    scaling = meta.get("rope.scaling.type", "none")
    if scaling in ("none", None):
        return 1.0
    if scaling == "linear":
        factor = float(meta.get("rope.scaling.factor", 1.0))
        return 1.0 / factor if factor > 0 else 1.0
    raise NumoeError(
        f"RoPE scaling {scaling!r} ({meta.arch}.rope.scaling.type) is not supported yet; numoe "
        f"supports none and linear: use a model converted without it"
    )


# --- tensor index ---------------------------------------------------------------------------


def expected_tensor_shapes(config: ModelConfig, mla_layout: str = MLA_SPLIT
                           ) -> dict[str, tuple[int, ...]]:
    """Every tensor the forward pass reads, with its numpy-order shape implied by `config`.
    `mla_layout` says which form a deepseek2 file stores MLA's up-projections in."""
    c = config
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (c.vocab_size, c.n_embd),
        "output_norm.weight": (c.n_embd,),
    }
    if not c.tied_output:
        shapes["output.weight"] = (c.vocab_size, c.n_embd)
    for layer in range(c.n_layers):
        p = f"blk.{layer}."
        shapes[p + "attn_norm.weight"] = (c.n_embd,)
        if c.is_mla:
            shapes.update(_mla_shapes(p, c, mla_layout))
        else:
            shapes[p + "attn_q.weight"] = (c.q_width, c.n_embd)
            shapes[p + "attn_k.weight"] = (c.kv_width, c.n_embd)
            shapes[p + "attn_v.weight"] = (c.n_kv_heads * c.value_head_dim, c.n_embd)
            shapes[p + "attn_output.weight"] = (c.n_embd, c.n_heads * c.value_head_dim)
        if c.has_qk_norm:
            shapes[p + "attn_q_norm.weight"] = (c.head_dim,)
            shapes[p + "attn_k_norm.weight"] = (c.head_dim,)
        shapes[p + "ffn_norm.weight"] = (c.n_embd,)
        if c.has_post_norms:
            shapes[p + "post_attention_norm.weight"] = (c.n_embd,)
            shapes[p + "post_ffw_norm.weight"] = (c.n_embd,)
        if c.layer_is_moe(layer):
            shapes[p + "ffn_gate_inp.weight"] = (c.n_experts, c.n_embd)
            if c.expert_gating is ExpertGating.SIGMOID:
                shapes[p + "exp_probs_b.bias"] = (c.n_experts,)
            shapes[p + "ffn_gate_exps.weight"] = (c.n_experts, c.n_ff_expert, c.n_embd)
            shapes[p + "ffn_up_exps.weight"] = (c.n_experts, c.n_ff_expert, c.n_embd)
            shapes[p + "ffn_down_exps.weight"] = (c.n_experts, c.n_embd, c.n_ff_expert)
            if c.n_shared_experts:
                shared = c.n_ff_expert * c.n_shared_experts
                shapes[p + "ffn_gate_shexp.weight"] = (shared, c.n_embd)
                shapes[p + "ffn_up_shexp.weight"] = (shared, c.n_embd)
                shapes[p + "ffn_down_shexp.weight"] = (c.n_embd, shared)
        else:
            shapes[p + "ffn_gate.weight"] = (c.n_ff, c.n_embd)
            shapes[p + "ffn_up.weight"] = (c.n_ff, c.n_embd)
            shapes[p + "ffn_down.weight"] = (c.n_embd, c.n_ff)
    return shapes


def _mla_shapes(p: str, c: ModelConfig, mla_layout: str) -> dict[str, tuple[int, ...]]:
    """deepseek2 attention tensors of layer prefix `p` (llama.cpp's names, numpy order)."""
    heads, nope, rope = c.n_heads, c.mla_nope_dim, c.qk_rope_head_dim
    shapes: dict[str, tuple[int, ...]] = {}
    if c.q_lora_rank:
        shapes[p + "attn_q_a.weight"] = (c.q_lora_rank, c.n_embd)
        shapes[p + "attn_q_a_norm.weight"] = (c.q_lora_rank,)
        shapes[p + "attn_q_b.weight"] = (heads * c.head_dim, c.q_lora_rank)
    else:  # DeepSeek-V2-Lite: one full-rank query projection
        shapes[p + "attn_q.weight"] = (heads * c.head_dim, c.n_embd)
    shapes[p + "attn_kv_a_mqa.weight"] = (c.kv_lora_rank + rope, c.n_embd)
    shapes[p + "attn_kv_a_norm.weight"] = (c.kv_lora_rank,)
    if mla_layout == MLA_KV_B:
        shapes[p + "attn_kv_b.weight"] = (heads * (nope + c.value_head_dim), c.kv_lora_rank)
    else:
        shapes[p + "attn_k_b.weight"] = (heads, c.kv_lora_rank, nope)
        shapes[p + "attn_v_b.weight"] = (heads, c.value_head_dim, c.kv_lora_rank)
    shapes[p + "attn_output.weight"] = (c.n_embd, heads * c.value_head_dim)
    return shapes


def _check_tensors(config: ModelConfig, tensors: dict[str, TensorInfo],
                   mla_layout: str = MLA_SPLIT) -> TensorMap:
    checked: TensorMap = {}
    for name, expected in expected_tensor_shapes(config, mla_layout).items():
        info = tensors.get(name)
        if info is None:
            raise TensorShapeError(
                f"tensor {name!r} is missing; a {config.architecture} model with "
                f"{config.n_layers} layers needs it: the file is incomplete or was converted "
                f"for another architecture; re-convert it with llama.cpp's convert_hf_to_gguf.py"
            )
        if tuple(info.shape) != expected:
            raise TensorShapeError(
                f"tensor {name!r} has shape {list(info.shape)}, but the metadata implies "
                f"{list(expected)} (numpy order [n_out, n_in]); the file is inconsistent: "
                f"re-convert it"
            )
        if info.ggml_type not in SUPPORTED_TYPES:
            supported = ", ".join(GGML_TYPE_NAMES[t] for t in sorted(SUPPORTED_TYPES))
            raise UnsupportedQuantTypeError(
                f"tensor {name!r} has quant type {info.type_name}, which numoe cannot read "
                f"yet; supported: {supported}. Requantise the model to one of them, e.g. "
                f"`llama-quantize --allow-requantize model.gguf out.gguf Q4_K_M`"
            )
        checked[name] = info
    if config.tied_output:
        checked["output.weight"] = checked["token_embd.weight"]
    return checked
