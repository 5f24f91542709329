"""Generate the DeepSeek benchmark model: DeepSeek-V3 layers at hidden 2048, random weights.

    python bench/make_deepseek_model.py [--layers 6] [--out PATH] [--keep-f16] [--threads N]

Every layer has DeepSeek-V3's per-layer structure with the width scaled to the Qwen3-MoE bench
model's hidden 2048, so KV-cache and decode comparisons against it are like for like: MLA
attention with 16 heads, q_lora_rank 1536, kv_lora_rank 512, qk_nope 128 + qk_rope 64, v 128;
128 routed experts of width 768, 8 per token, chosen group-limited (8 groups, 4 used) by sigmoid
scores plus a score-correction bias (exp_probs_b), normalised and scaled by 2.5; one shared expert
of width 768; the first layer dense (FFN 6144). YaRN as DeepSeek-V3's config (factor 40 over an
original 4096 context, mscale_all_dim 1.0), rope base 10000, context 163840. The default 6 layers
(1 dense + 5 MoE) give a Q4_K_M file of about 2.2 GiB; routed experts are ~85% of it.

The GGUF is the `deepseek2` architecture exactly as llama.cpp's converter (conversion/deepseek.py,
DeepseekV2Model) writes DeepSeek-V3: the split MLA form attn_k_b [heads, kv_lora, nope] and
attn_v_b [heads, v, kv_lora] (numpy order) instead of attn_kv_b, with attention.key_length_mla /
value_length_mla, head_count_kv 1 and key_length kv_lora + rope (MLA stored as MQA).

Steps (each skipped when its output exists):
1. Write an F16 GGUF (~7.5 GB) with gguf-py's GGUFWriter, one tensor at a time (generated,
   written, freed: memory stays < 1 GB). The tokenizer metadata is copied from llama.cpp's
   ggml-vocab-qwen2.gguf (as the Qwen3-MoE bench model), so prompts tokenize.
2. Quantize it with llama.cpp's own `llama-quantize ... Q4_K_M`; the F16 file is then deleted
   unless --keep-f16. The per-type tensor counts of the result are printed.
3. Load it with llama.cpp's bindings and generate a few tokens (logits must be finite).

Reproducible: tensor i is drawn from np.random.default_rng([seed, i]), so the same arguments
give the same F16 bytes. Weight recipe and helpers are bench/make_moe_model.py's.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import (
    ExpertGatingFuncType,
    GGUFReader,
    GGUFWriter,
    LlamaFileType,
    RopeScalingType,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.make_moe_model import (  # noqa: E402 — repo root on the path first
    GIB,
    QWEN2_VOCAB,
    TensorPlan,
    build_q4_k_m,
    copy_tokenizer,
    generate_tensor,
    plan_bytes,
    verify,
    write_tensors,
)
from tests.reference import llamacpp  # noqa: E402

DEFAULT_OUT = Path.home() / ".cache" / "numoe" / "bench-models" / "deepseek2-bench-Q4_K_M.gguf"
# The trained score-correction bias only nudges expert choice; +-0.05 against router logits of
# std ~2.7 (sigmoid scores spread over most of 0..1) steers a few near-ties, never decides alone.
ROUTER_BIAS_SPREAD = 0.05


@dataclass(frozen=True)
class DeepseekBenchSpec:
    """DeepSeek-V3's config.json per-layer structure at hidden 2048 / 16 heads, n_layers layers."""

    n_layers: int = 6
    first_dense_layers: int = 1  # DeepSeek-V3 has 3 of 61; one keeps the dense path exercised
    hidden: int = 2048
    n_heads: int = 16
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_experts: int = 128
    experts_per_token: int = 8
    n_groups: int = 8
    groups_used: int = 4
    n_shared_experts: int = 1
    expert_ffn: int = 768  # moe_intermediate_size
    dense_ffn: int = 6144  # intermediate_size, the leading dense layer(s)
    routed_scaling_factor: float = 2.5
    context_length: int = 163840
    rope_theta: float = 10000.0
    yarn_factor: float = 40.0
    yarn_original_context: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale_all_dim: float = 1.0
    rms_norm_eps: float = 1e-6
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.first_dense_layers < self.n_layers:
            raise ValueError(
                f"n_layers {self.n_layers} leaves no MoE layer after {self.first_dense_layers} "
                f"dense one(s); pass --layers {self.first_dense_layers + 1} or more"
            )




def tensor_plan(spec: DeepseekBenchSpec, vocab: int) -> TensorPlan:
    """Tensors as convert_hf_to_gguf.py's DeepseekV2Model names and shapes them (numpy order)."""
    q_head = spec.qk_nope_head_dim + spec.qk_rope_head_dim
    shared_ffn = spec.expert_ffn * spec.n_shared_experts
    gate_up_shape = (spec.n_experts, spec.expert_ffn, spec.hidden)  # [expert, ffn, hidden]
    down_shape = (spec.n_experts, spec.hidden, spec.expert_ffn)  # [expert, hidden, ffn]
    plan: TensorPlan = [("token_embd.weight", (vocab, spec.hidden), "linear")]
    for layer in range(spec.n_layers):
        prefix = f"blk.{layer}."
        plan += [
            (prefix + "attn_norm.weight", (spec.hidden,), "norm"),
            (prefix + "attn_q_a.weight", (spec.q_lora_rank, spec.hidden), "linear"),
            (prefix + "attn_q_a_norm.weight", (spec.q_lora_rank,), "norm"),
            (prefix + "attn_q_b.weight", (spec.n_heads * q_head, spec.q_lora_rank), "linear"),
            # Compressed KV (kv_lora) and the shared RoPE key (qk_rope) in one projection.
            (
                prefix + "attn_kv_a_mqa.weight",
                (spec.kv_lora_rank + spec.qk_rope_head_dim, spec.hidden),
                "linear",
            ),
            (prefix + "attn_kv_a_norm.weight", (spec.kv_lora_rank,), "norm"),
            # kv_b_proj split per head, K half transposed (the converter's absorption layout).
            (
                prefix + "attn_k_b.weight",
                (spec.n_heads, spec.kv_lora_rank, spec.qk_nope_head_dim),
                "linear",
            ),
            (
                prefix + "attn_v_b.weight",
                (spec.n_heads, spec.v_head_dim, spec.kv_lora_rank),
                "linear",
            ),
            (
                prefix + "attn_output.weight",
                (spec.hidden, spec.n_heads * spec.v_head_dim),
                "linear",
            ),
            (prefix + "ffn_norm.weight", (spec.hidden,), "norm"),
        ]
        if layer < spec.first_dense_layers:
            plan += [
                (prefix + "ffn_gate.weight", (spec.dense_ffn, spec.hidden), "linear"),
                (prefix + "ffn_up.weight", (spec.dense_ffn, spec.hidden), "linear"),
                (prefix + "ffn_down.weight", (spec.hidden, spec.dense_ffn), "linear"),
            ]
            continue
        plan += [
            # Router and its bias stay F32, as convert_hf_to_gguf.py leaves 1-D / router tensors.
            (prefix + "ffn_gate_inp.weight", (spec.n_experts, spec.hidden), "router"),
            (prefix + "exp_probs_b.bias", (spec.n_experts,), "probs_bias"),
            (prefix + "ffn_gate_exps.weight", gate_up_shape, "linear"),
            (prefix + "ffn_up_exps.weight", gate_up_shape, "linear"),
            (prefix + "ffn_down_exps.weight", down_shape, "linear"),
            (prefix + "ffn_gate_shexp.weight", (shared_ffn, spec.hidden), "linear"),
            (prefix + "ffn_up_shexp.weight", (shared_ffn, spec.hidden), "linear"),
            (prefix + "ffn_down_shexp.weight", (spec.hidden, shared_ffn), "linear"),
        ]
    plan += [
        ("output_norm.weight", (spec.hidden,), "norm"),
        ("output.weight", (vocab, spec.hidden), "linear"),
    ]
    return plan


def _generate_tensor(shape: tuple[int, ...], kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "probs_bias":
        return rng.uniform(-ROUTER_BIAS_SPREAD, ROUTER_BIAS_SPREAD, shape).astype(np.float32)
    return generate_tensor(shape, kind, rng)


def write_f16_gguf(spec: DeepseekBenchSpec, path: Path, vocab_path: Path) -> None:
    """Metadata in the keys (and values) DeepseekV2Model.set_gguf_parameters writes for V3."""
    writer = GGUFWriter(path, "deepseek2")
    writer.add_type("model")
    writer.add_name(
        f"deepseek2-bench-{spec.n_layers}L (random weights, DeepSeek-V3 layers at hidden 2048)"
    )
    writer.add_block_count(spec.n_layers)
    writer.add_context_length(spec.context_length)
    writer.add_embedding_length(spec.hidden)
    writer.add_feed_forward_length(spec.dense_ffn)
    writer.add_head_count(spec.n_heads)
    writer.add_head_count_kv(1)  # the converter stores MLA as MQA with one latent "head"
    writer.add_rope_scaling_type(RopeScalingType.YARN)
    writer.add_rope_scaling_factor(spec.yarn_factor)
    writer.add_rope_scaling_orig_ctx_len(spec.yarn_original_context)
    writer.add_rope_scaling_yarn_beta_fast(spec.yarn_beta_fast)
    writer.add_rope_scaling_yarn_beta_slow(spec.yarn_beta_slow)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_layer_norm_rms_eps(spec.rms_norm_eps)
    writer.add_expert_count(spec.n_experts)
    writer.add_expert_used_count(spec.experts_per_token)
    writer.add_expert_group_count(spec.n_groups)
    writer.add_expert_group_used_count(spec.groups_used)
    writer.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)
    writer.add_file_type(LlamaFileType.MOSTLY_F16)
    writer.add_leading_dense_block_count(spec.first_dense_layers)
    vocab = copy_tokenizer(writer, vocab_path)
    writer.add_vocab_size(vocab)
    writer.add_q_lora_rank(spec.q_lora_rank)
    writer.add_kv_lora_rank(spec.kv_lora_rank)
    # The cache holds kv_lora + rope per token; the MLA lengths are the per-head expanded ones.
    writer.add_key_length(spec.kv_lora_rank + spec.qk_rope_head_dim)
    writer.add_value_length(spec.kv_lora_rank)
    writer.add_key_length_mla(spec.qk_nope_head_dim + spec.qk_rope_head_dim)
    writer.add_value_length_mla(spec.v_head_dim)
    writer.add_expert_feed_forward_length(spec.expert_ffn)
    writer.add_expert_shared_count(spec.n_shared_experts)
    writer.add_expert_weights_scale(spec.routed_scaling_factor)
    writer.add_expert_weights_norm(True)
    writer.add_rope_dimension_count(spec.qk_rope_head_dim)
    # The converter's legacy deepseek2 convention (its TAG_DEEPSEEK2_YARN_LOG_MUL_FIX): 0.1 x dim.
    writer.add_rope_scaling_yarn_log_mul(0.1 * spec.yarn_mscale_all_dim)
    writer.add_quantization_version(2)

    write_tensors(writer, tensor_plan(spec, vocab), spec.seed, _generate_tensor)


def print_type_mixture(path: Path) -> None:
    """Per-ggml-type tensor counts and bytes, and which type each MLA projection got."""
    reader = GGUFReader(path)
    counts: collections.Counter[str] = collections.Counter()
    sizes: collections.Counter[str] = collections.Counter()
    by_role: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for tensor in reader.tensors:
        type_name = tensor.tensor_type.name
        counts[type_name] += 1
        sizes[type_name] += int(tensor.n_bytes)
        # "blk.3.attn_k_b.weight" -> "attn_k_b"; non-layer tensors keep their own name.
        role = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else tensor.name
        by_role[role][type_name] += 1
    print("tensor types: " + ", ".join(
        f"{name} x{counts[name]} ({sizes[name] / GIB:.2f} GiB)" for name in sorted(counts)
    ))  # fmt: skip
    for role in sorted(by_role):
        mix = ", ".join(f"{name} x{n}" for name, n in sorted(by_role[role].items()))
        print(f"  {role:24s} {mix}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=DeepseekBenchSpec.n_layers)
    parser.add_argument("--seed", type=int, default=DeepseekBenchSpec.seed)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--keep-f16", action="store_true", help="keep the F16 intermediate")
    args = parser.parse_args()
    try:
        spec = DeepseekBenchSpec(n_layers=args.layers, seed=args.seed)
    except ValueError as error:
        parser.error(str(error))
    build_q4_k_m(args.out, plan_bytes(tensor_plan(spec, QWEN2_VOCAB)), str(spec),
                 lambda path: write_f16_gguf(spec, path, llamacpp.vocab_file("qwen2")),
                 args.threads, args.keep_f16)
    print_type_mixture(args.out)
    verify(args.out, args.threads)


if __name__ == "__main__":
    main()
