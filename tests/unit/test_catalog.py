"""Built-in model descriptions checked against independent numbers: parameter counts from the
official config.json values (the formulas of the Hugging Face modeling code, written here),
published headline sizes and GGUF file sizes, gguf-py's block table, numoe's own GGUF checker,
and the tensor types real llama-quantize writes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import gguf as gguf_py
import numpy as np
import pytest

from bench.make_moe_model import BenchModelSpec, tensor_plan
from cluster.catalog import (
    MODELS,
    CatalogError,
    Shapes,
    describe,
    describe_shapes,
    list_models,
)
from cluster.gguf import open_gguf
from cluster.model import expected_tensor_shapes, load_model_spec
from tests.reference import llamacpp
from tests.reference.tiny_models import TinyModel

# config.json numbers, copied from the model repositories (huggingface.co/<repo>/config.json).
HF_CONFIGS = {
    "deepseek-v3": dict(  # deepseek-ai/DeepSeek-V3
        kind="mla", vocab_size=129280, hidden_size=7168, num_hidden_layers=61,
        num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, intermediate_size=18432,
        moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1,
        num_experts_per_tok=8, first_k_dense_replace=3),
    "kimi-k2": dict(  # moonshotai/Kimi-K2-Instruct
        kind="mla", vocab_size=163840, hidden_size=7168, num_hidden_layers=61,
        num_attention_heads=64, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, intermediate_size=18432,
        moe_intermediate_size=2048, n_routed_experts=384, n_shared_experts=1,
        num_experts_per_tok=8, first_k_dense_replace=1),
    "qwen3-235b-a22b": dict(  # Qwen/Qwen3-235B-A22B
        kind="gqa", vocab_size=151936, hidden_size=4096, num_hidden_layers=94,
        num_attention_heads=64, num_key_value_heads=4, head_dim=128, moe_intermediate_size=1536,
        num_experts=128, num_experts_per_tok=8),
    "qwen3-coder-480b": dict(  # Qwen/Qwen3-Coder-480B-A35B-Instruct
        kind="gqa", vocab_size=151936, hidden_size=6144, num_hidden_layers=62,
        num_attention_heads=96, num_key_value_heads=8, head_dim=128, moe_intermediate_size=2560,
        num_experts=160, num_experts_per_tok=8),
    "glm-4.6": dict(  # zai-org/GLM-4.6
        kind="gqa", vocab_size=151552, hidden_size=5120, num_hidden_layers=92,
        num_attention_heads=96, num_key_value_heads=8, head_dim=128, intermediate_size=12288,
        moe_intermediate_size=1536, n_routed_experts=160, n_shared_experts=1,
        num_experts_per_tok=8, first_k_dense_replace=3, attention_bias=True,
        num_nextn_predict_layers=1),
}
# Headline (total, active) parameters the model cards state. Active excludes the input
# embedding (a gather). Totals within 1.5% (Kimi-K2's card rounds 1.03T to "1T"; GLM's 355B
# and the counts here bracket the MTP layer), actives within 3% (cards round to whole billions).
PUBLISHED = {"deepseek-v3": (671e9, 37e9), "kimi-k2": (1.04e12, 32e9),
             "qwen3-235b-a22b": (235e9, 22e9), "qwen3-coder-480b": (480e9, 35e9),
             "glm-4.6": (355e9, 32e9)}
GB = 1e9


def _hf_parameters(c: dict) -> tuple[int, int, int, int]:
    """(total, routed-expert, routed-expert in the layers decoding runs, embedding) parameter
    counts by the modeling code's formulas."""
    h, layers = c["hidden_size"], c["num_hidden_layers"] + c.get("num_nextn_predict_layers", 0)
    experts = c.get("n_routed_experts", c.get("num_experts"))
    per_expert = 3 * h * c["moe_intermediate_size"]
    total = 2 * c["vocab_size"] * h + h  # embedding, lm_head, final norm
    routed = routed_run = 0
    for layer in range(layers):
        total += 2 * h  # input and post-attention RMSNorm
        heads = c["num_attention_heads"]
        if c["kind"] == "mla":
            qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
            total += h * c["q_lora_rank"] + c["q_lora_rank"] + c["q_lora_rank"] * heads * qk
            total += h * (c["kv_lora_rank"] + c["qk_rope_head_dim"]) + c["kv_lora_rank"]
            total += c["kv_lora_rank"] * heads * (c["qk_nope_head_dim"] + c["v_head_dim"])
            total += heads * c["v_head_dim"] * h
        else:
            q, kv = heads * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
            total += h * (q + 2 * kv) + q * h + 2 * c["head_dim"]  # q/k/v/o, q_norm, k_norm
            if c.get("attention_bias"):
                total += q + 2 * kv
        if layer < c.get("first_k_dense_replace", 0):
            total += 3 * h * c["intermediate_size"]
            continue
        total += experts * h + experts * per_expert + c.get("n_shared_experts", 0) * per_expert
        total += experts if c.get("n_routed_experts") else 0  # e_score_correction_bias
        routed += experts * per_expert
        routed_run += experts * per_expert if layer < c["num_hidden_layers"] else 0
        if layer >= c["num_hidden_layers"]:  # MTP head: eh_proj, enorm, hnorm, shared norm
            total += 2 * h * h + 3 * h
    return total, routed, routed_run, c["vocab_size"] * h


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_parameters_match_config_and_model_card(name: str) -> None:
    model = describe(f"{name}:BF16")
    c = HF_CONFIGS[name]
    total, routed, routed_run, embedding = _hf_parameters(c)
    assert sum(t.n_elements for t in model.tensors.values()) == total
    assert sum(t.n_elements for n, t in model.tensors.items() if "_exps" in n) == routed
    mtp = sum(t.n_elements for n, t in model.tensors.items()
              if n.startswith(f"blk.{c['num_hidden_layers']}."))
    run_total = total - mtp
    n_experts = c.get("n_routed_experts", c.get("num_experts"))
    active = run_total - embedding - routed_run + routed_run * c["num_experts_per_tok"] // n_experts
    published_total, published_active = PUBLISHED[name]
    assert abs(run_total / published_total - 1) < 0.015, run_total
    assert abs(active / published_active - 1) < 0.03, active


@pytest.mark.parametrize("recipe", ["Q4_K_M", "Q8_0", "Q5_K_M", "BF16"])
@pytest.mark.parametrize("name", ["deepseek-v3", "glm-4.6"])
def test_bytes_follow_gguf_py_block_table(name: str, recipe: str) -> None:
    for tensor in describe(f"{name}:{recipe}").tensors.values():
        block, block_bytes = gguf_py.GGML_QUANT_SIZES[gguf_py.GGMLQuantizationType(
            tensor.ggml_type)]
        assert tensor.n_elements % block == 0, tensor.name
        assert tensor.n_bytes == tensor.n_elements // block * block_bytes, tensor.name


def test_deepseek_v3_sizes_match_published_gguf_files() -> None:
    """bartowski/deepseek-ai_DeepSeek-V3-0324-GGUF (llama.cpp b4944, attn_kv_b layout) lists
    Q4_K_M at 404.43 GB and Q8_0 at 713.29 GB (GB = 1e9; the files also hold a few MB of
    tokenizer metadata)."""
    q4 = describe("deepseek-v3:Q4_K_M", mla_layout="kv_b").total_bytes
    q8 = describe("deepseek-v3:Q8_0", mla_layout="kv_b").total_bytes
    assert abs(q4 / (404.43 * GB) - 1) < 0.001, q4
    assert abs(q8 / (713.29 * GB) - 1) < 0.001, q8
    split = describe("deepseek-v3:Q4_K_M")  # newer files: attn_k_b (rows of 128: Q5_0) + v_b
    assert split.tensors["blk.0.attn_k_b.weight"].type_name == "Q5_0"
    assert split.tensors["blk.0.attn_v_b.weight"].type_name == "Q4_K"
    assert "blk.0.attn_kv_b.weight" not in split.tensors


def test_q4_k_m_mixture_on_deepseek() -> None:
    tensors = describe("deepseek-v3:Q4_K_M", mla_layout="kv_b").tensors
    types = {name: t.type_name for name, t in tensors.items()}
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    assert types["blk.3.ffn_gate_inp.weight"] == "F32" and types["blk.3.exp_probs_b.bias"] == "F32"
    # use_more_bits(i, 61): i < 7, i >= 53, or (i - 7) % 3 == 2
    for layer, more in ((0, True), (6, True), (7, False), (9, True), (10, False), (53, True)):
        expected = "Q6_K" if more else "Q4_K"
        assert types[f"blk.{layer}.attn_kv_b.weight"] == expected, layer
        down = "ffn_down" if layer < 3 else "ffn_down_exps"
        assert types[f"blk.{layer}.{down}.weight"] == expected, layer
        assert types[f"blk.{layer}.attn_q_b.weight"] == "Q4_K"


def test_mixed_recipe_pins_expert_types() -> None:
    tensors = describe("deepseek-v3:Q8_0,ffn_.*_exps=Q4_K,ffn_down_exps=Q6_K").tensors
    for name, tensor in tensors.items():
        if "_exps" in name:
            assert tensor.type_name == "Q4_K", name  # first match wins, as in llama-quantize
        elif tensor.shape[-1] % 32 == 0 and len(tensor.shape) > 1 and "gate_inp" not in name:
            assert tensor.type_name == "Q8_0", name


def test_qwen3moe_description_passes_numoe_model_checker() -> None:
    """cluster.model's expected_tensor_shapes (what numoe's GGUF loader demands) agrees."""
    model = describe("qwen3-235b-a22b:Q4_K_M")
    shapes = {name: t.shape for name, t in model.tensors.items()}
    assert shapes == expected_tensor_shapes(model.config)


def test_unknown_model_and_recipe_are_refused() -> None:
    with pytest.raises(CatalogError, match="deepseek-v3.*kimi-k2"):
        describe("deepseek-v9:Q4_K_M")
    with pytest.raises(CatalogError, match="Q4_K_M"):
        describe("deepseek-v3:Q3_K_XL")
    with pytest.raises(CatalogError, match="REGEX=TYPE"):
        describe("deepseek-v3:Q8_0,exps=IQ9")
    assert set(list_models()) == set(MODELS) and "kimi-k2" in list_models()


def _shapes_of(path: Path) -> Shapes:
    with open_gguf(path) as file:
        c, _ = load_model_spec(file)
    return Shapes(architecture=c.architecture, source=str(path), vocab_size=c.vocab_size,
                  hidden_size=c.n_embd, n_layers=c.n_layers, n_heads=c.n_heads,
                  n_kv_heads=c.n_kv_heads, head_dim=c.head_dim, value_head_dim=c.value_head_dim,
                  intermediate_size=c.n_ff, moe_intermediate_size=c.n_ff_expert,
                  n_experts=c.n_experts, n_experts_used=c.n_experts_used,
                  qk_norm=c.has_qk_norm)


def _assert_types_match_llama_quantize(source: Path, out_dir: Path, recipes: list[str]) -> None:
    for recipe in recipes:
        out = out_dir / f"{source.stem}-{recipe}.gguf"
        result = subprocess.run([str(llamacpp.tool("llama-quantize")), str(source), str(out),
                                 recipe], capture_output=True, text=True, timeout=300,
                                check=False)
        assert result.returncode == 0, result.stderr[-2000:]
        real = {t.name: int(t.tensor_type) for t in gguf_py.GGUFReader(out).tensors}
        described = describe_shapes(_shapes_of(source), recipe).tensors
        assert set(real) == set(described)
        wrong = {n: (real[n], described[n].ggml_type) for n in real
                 if real[n] != described[n].ggml_type}
        assert not wrong, (recipe, wrong)


def _write_wide_f16(path: Path, spec: BenchModelSpec, vocab: int) -> None:
    """A qwen3moe F16 GGUF of zeros with bench/make_moe_model.py's tensor list and metadata,
    but a small vocabulary and no tokenizer (llama-quantize reads neither)."""
    writer = gguf_py.GGUFWriter(path, "qwen3moe")
    writer.add_block_count(spec.n_layers)
    writer.add_context_length(spec.context_length)
    writer.add_embedding_length(spec.hidden)
    writer.add_feed_forward_length(spec.dense_ffn)
    writer.add_head_count(spec.n_heads)
    writer.add_head_count_kv(spec.n_kv_heads)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_layer_norm_rms_eps(spec.rms_norm_eps)
    writer.add_expert_count(spec.n_experts)
    writer.add_expert_used_count(spec.experts_per_token)
    writer.add_expert_feed_forward_length(spec.expert_ffn)
    writer.add_file_type(gguf_py.LlamaFileType.MOSTLY_F16)
    for name, shape, kind in tensor_plan(spec, vocab):
        writer.add_tensor(name, np.zeros(shape, np.float16 if kind == "linear" else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.slow
def test_recipes_match_llama_quantize(tmp_path: Path, tiny_qwen3moe: TinyModel) -> None:
    """Real llama-quantize on two qwen3moe F16 files: the tiny test model (64-wide rows, so
    every K-quant falls back) and one with 256-wide rows and 8 layers (the mixtures' layer
    rules: Q6_K / Q5_K on use_more_bits layers and the first eighth, output Q6_K)."""
    _assert_types_match_llama_quantize(tiny_qwen3moe.gguf["f16"], tmp_path, ["Q4_K_M"])
    wide = tmp_path / "wide-f16.gguf"
    _write_wide_f16(wide, BenchModelSpec(n_layers=8, hidden=256, n_heads=4, n_kv_heads=2,
                                         head_dim=64, n_experts=16, experts_per_token=2,
                                         expert_ffn=256, dense_ffn=512), vocab=512)
    _assert_types_match_llama_quantize(wide, tmp_path, ["Q4_K_M", "Q5_K_M", "Q4_K_S", "Q4_0"])
