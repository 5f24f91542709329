"""deepseek2 plans: a plan made from a built-in description agrees with one made from a real
GGUF header (the tiny DeepSeek-V3, converted by llama.cpp's convert_hf_to_gguf.py from its
Hugging Face config.json); full-size DeepSeek-V3 / Kimi-K2 split MLA by heads with the latent
cache on every worker; the descriptions' configs agree with headers gguf-py writes from the
official config.json values."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gguf as gguf_py
import pytest
from transformers import DeepseekV3Config

from cluster.catalog import (
    MODELS,
    CatalogError,
    Shapes,
    describe,
    describe_shapes,
    shapes_from_hf_config,
)
from cluster.gguf import open_gguf
from cluster.model import ExpertGating, ModelConfig, load_model_spec
from cluster.placement import (
    ModelSpec,
    Plan,
    PlanOptions,
    format_plan_table,
    make_plan,
    plan_from_dict,
)
from cluster.topology import load_topology
from tests.reference.tiny_deepseek import legacy_gguf, tiny_deepseek
from tests.reference.tiny_models import TinyModel
from tests.unit.test_deepseek2_config import DEEPSEEK_V3, _parse, _write_metadata
from tests.unit.test_placement import ONE_GPU, TWO_SOCKET, assert_every_byte_once

CPU_ONLY = PlanOptions(ctx=512, gpu="off")
# moonshotai/Kimi-K2-Instruct config.json: DeepSeek-V3's shapes but 64 heads, 384 experts in
# one group, one dense layer, and its own RoPE / YaRN numbers.
KIMI_K2 = {**DEEPSEEK_V3, "vocab_size": 163840, "num_attention_heads": 64,
           "num_key_value_heads": 64, "n_routed_experts": 384, "n_group": 1, "topk_group": 1,
           "first_k_dense_replace": 1, "routed_scaling_factor": 2.827,
           "max_position_embeddings": 131072,
           "rope_parameters": {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 32.0,
                               "original_max_position_embeddings": 4096, "beta_fast": 1.0,
                               "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}}


@pytest.fixture(scope="module")
def tiny() -> TinyModel:
    return tiny_deepseek()


@pytest.fixture(scope="module")
def tiny_shapes(tiny: TinyModel) -> Shapes:
    return shapes_from_hf_config(json.loads((tiny.hf_dir / "config.json").read_text()))


def _file_spec(path: Path) -> ModelSpec:
    with open_gguf(path) as file:
        config, tensors = load_model_spec(file)
    return ModelSpec(config, tensors)


def _index(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """name -> (bytes, quant block elements), the block from gguf-py's table."""
    return {name: (t.n_bytes, gguf_py.GGML_QUANT_SIZES[gguf_py.GGMLQuantizationType(
        t.ggml_type)][0]) for name, t in spec.tensors.items()}


def _layout(plan: Plan) -> dict[str, tuple]:
    return {t.name: (t.ggml_type, t.shape, t.n_bytes, t.replicated, t.pinned, t.shards)
            for t in plan.tensors}


def _totals(plan: Plan) -> list[tuple]:
    return [(w.rank, w.weight_bytes, w.kv_bytes, w.kv_bytes_per_token,
             w.decode_bytes_per_token, w.kv_heads, w.vocab, w.n_tensors) for w in plan.workers]


# --- description vs real file --------------------------------------------------------------


@pytest.mark.parametrize(("recipe", "kind", "legacy"), [
    ("Q8_0", "q8_0", False), ("F16", "f16", False), ("F16", "f16", True)])
def test_description_and_gguf_header_plan_alike(tiny: TinyModel, tiny_shapes: Shapes,
                                                recipe: str, kind: str, legacy: bool) -> None:
    """The tiny model's config.json through shapes_from_hf_config + describe_shapes gives the
    file llama.cpp's converter wrote: same config, tensors (types, shapes, bytes), and on two
    sockets the same plan. The converter's type choices included: in the q8_0 file attn_q_b is
    F16, its 48-wide rows not a whole number of 32-element Q8_0 blocks."""
    path = legacy_gguf(tiny, kind) if legacy else tiny.gguf[kind]
    real = _file_spec(path)
    described = describe_shapes(tiny_shapes, recipe, "tiny",
                                mla_layout="kv_b" if legacy else "split")
    assert described.config == real.config
    assert {n: (t.ggml_type, tuple(t.shape), t.n_bytes) for n, t in real.tensors.items()} == {
        n: (t.ggml_type, t.shape, t.n_bytes) for n, t in described.tensors.items()}
    if kind == "q8_0":
        q_b = real.tensors["blk.1.attn_q_b.weight"]
        assert q_b.shape[-1] % 32 != 0 and q_b.ggml_type == gguf_py.GGMLQuantizationType.F16
    topology = load_topology(TWO_SOCKET)
    from_file = make_plan(real, topology, CPU_ONLY)
    from_description = make_plan(ModelSpec(described.config, described.tensors), topology,
                                 CPU_ONLY)
    assert_every_byte_once(from_file, _index(real))
    assert _layout(from_description) == _layout(from_file)
    assert _totals(from_description) == _totals(from_file)
    assert from_description.notes == from_file.notes
    assert from_description.prediction == from_file.prediction


def test_tiny_plan_splits_mla_heads(tiny: TinyModel) -> None:
    """4 heads over 2 workers: each computes 2 heads from its slices and the whole latent."""
    spec = _file_spec(tiny.gguf["q8_0"])
    c = spec.config
    plan = make_plan(spec, load_topology(TWO_SOCKET), CPU_ONLY)
    by_name = {t.name: t for t in plan.tensors}
    half = c.n_heads // 2
    for name, axis, unit in (("attn_q_b", 0, c.head_dim), ("attn_k_b", 0, 1),
                             ("attn_v_b", 0, 1), ("attn_output", 1, c.value_head_dim)):
        tensor = by_name[f"blk.2.{name}.weight"]
        assert [(s.rank, s.axis, s.start, s.stop) for s in tensor.shards] == [
            (0, axis, 0, half * unit), (1, axis, half * unit, 2 * half * unit)], name
    for name in ("attn_q_a", "attn_kv_a_mqa", "attn_q_a_norm", "attn_kv_a_norm"):
        assert by_name[f"blk.2.{name}.weight"].replicated, name
    assert [w.kv_heads for w in plan.workers] == [(0, half), (half, c.n_heads)]
    latent = c.kv_lora_rank + c.qk_rope_head_dim  # from the header's own numbers
    assert [w.kv_bytes_per_token for w in plan.workers] == [c.n_layers * latent * 2] * 2
    assert all(plan.block_is_split(0, layer, "attention") for layer in range(c.n_layers))
    # a one-block shared expert cannot be cut into column slices: held whole by one worker
    shexp = [by_name[f"blk.{layer}.ffn_up_shexp.weight"] for layer in range(1, c.n_layers)]
    assert all(t.pinned and len(t.shards) == 1 for t in shexp)
    assert {t.shards[0].rank for t in shexp} == {0, 1}  # rotating with the layer
    assert plan_from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_legacy_kv_b_splits_per_head_rows(tiny: TinyModel) -> None:
    spec = _file_spec(legacy_gguf(tiny, "f16"))
    c = spec.config
    plan = make_plan(spec, load_topology(TWO_SOCKET), CPU_ONLY)
    assert_every_byte_once(plan, _index(spec))
    kv_b = next(t for t in plan.tensors if t.name == "blk.1.attn_kv_b.weight")
    rows = (c.n_heads // 2) * (c.mla_nope_dim + c.value_head_dim)
    assert [(s.axis, s.start, s.stop) for s in kv_b.shards] == [(0, 0, rows),
                                                                (0, rows, 2 * rows)]


# --- full-size models ----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "hf"), [("deepseek-v3", DEEPSEEK_V3), ("kimi-k2", KIMI_K2)])
def test_full_size_plans_split_mla_by_heads(name: str, hf: dict) -> None:
    model = describe(f"{name}:Q4_K_M")
    spec = ModelSpec(model.config, model.tensors)
    plan = make_plan(spec, load_topology(ONE_GPU), PlanOptions(ctx=4096, gpu="off"))
    assert_every_byte_once(plan, _index(spec))
    heads, layers = hf["num_attention_heads"], hf["num_hidden_layers"]
    assert [w.kv_heads for w in plan.workers] == [(0, heads // 2), (heads // 2, heads)]
    latent = hf["kv_lora_rank"] + hf["qk_rope_head_dim"]  # 576
    assert [w.kv_bytes_per_token for w in plan.workers] == [layers * latent * 2] * 2
    assert [w.kv_bytes for w in plan.workers] == [layers * latent * 2 * 4096] * 2
    by_name = {t.name: t for t in plan.tensors}
    output = by_name["blk.5.attn_output.weight"]
    assert [(s.axis, s.start, s.stop) for s in output.shards] == [
        (1, 0, heads // 2 * hf["v_head_dim"]), (1, heads // 2 * hf["v_head_dim"],
                                                 heads * hf["v_head_dim"])]
    assert all(s.block_aligned for s in output.shards)
    assert by_name["blk.5.attn_kv_a_mqa.weight"].replicated
    assert plan.block_is_split(0, 5, "attention") and not any("MLA" in n for n in plan.notes)
    table = format_plan_table(plan)
    assert "KV B/tok" in table and str(layers * latent * 2) in table
    assert plan.to_dict()["workers"][0]["kv_bytes_per_token"] == layers * latent * 2


def test_gpu_holds_the_whole_mla_block() -> None:
    model = describe("deepseek-v3:Q4_K_M")
    plan = make_plan(ModelSpec(model.config, model.tensors), load_topology(ONE_GPU),
                     PlanOptions(ctx=8192))
    for tensor in plan.tensors:
        if tensor.name.startswith("blk.7.attn_") and "norm" not in tensor.name:
            assert tensor.ranks == (2,) and tensor.pinned, tensor.name
    assert [w.kv_bytes_per_token for w in plan.workers] == [0, 0, 61 * 576 * 2]
    assert plan.workers[2].kv_heads == (0, 128)


def test_mla_replicated_when_heads_miss_output_blocks() -> None:
    """attn_output columns cut at 64 heads x 128 = 8192 hold whole Q4_K blocks; with 3 workers
    the bounds (43 x 128 = 5504) do not (5504 / 256 is not whole): MLA is replicated."""
    model = describe("deepseek-v3:Q4_K_M")
    three = {"hosts": [{"name": "h", "numa_nodes": [
        {"id": i, "cpus": f"{8 * i}-{8 * i + 7}", "memory": "512GiB"} for i in range(3)]}]}
    from cluster.topology import Topology  # noqa: PLC0415

    plan = make_plan(ModelSpec(model.config, model.tensors), Topology.from_dict(three),
                     PlanOptions(ctx=512, gpu="off"))
    assert not plan.block_is_split(0, 5, "attention")
    assert any("MLA attention replicated" in note for note in plan.notes)
    assert all(w.kv_heads == (0, 128) for w in plan.workers)


# --- descriptions' configs vs GGUF headers -------------------------------------------------


@pytest.mark.parametrize(("name", "hf"), [("deepseek-v3", DEEPSEEK_V3), ("kimi-k2", KIMI_K2)])
def test_description_config_is_a_headers(name: str, hf: dict, tmp_path: Path) -> None:
    """A metadata-only GGUF written by gguf-py from the official config.json values (as the
    converter writes it) reads back as the description's config, YaRN and routing included."""
    parsed = _parse(_write_metadata(tmp_path / f"{name}.gguf", DeepseekV3Config(**hf)))
    described = describe(name).config
    assert dataclasses.replace(parsed, tied_output=False) == described
    assert described.expert_gating is ExpertGating.SIGMOID
    assert (described.n_expert_groups, described.n_expert_groups_used) == (
        hf["n_group"], hf["topk_group"])
    assert described.rope_yarn is not None
    assert described.rope_yarn.factor == hf["rope_parameters"]["factor"]
    assert described.attention_scale > (hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"]) ** -0.5


def test_q_lora_rank_zero_describes_attn_q(tiny_shapes: Shapes) -> None:
    """DeepSeek-V2-Lite's form: one full-rank attn_q, split by heads like attn_q_b."""
    shapes = dataclasses.replace(tiny_shapes, q_lora_rank=0)
    model = describe_shapes(shapes, "F16")
    config: ModelConfig = model.config
    assert config.q_lora_rank == 0 and "blk.0.attn_q.weight" in model.tensors
    assert not any("attn_q_a" in n or "attn_q_b" in n for n in model.tensors)
    plan = make_plan(ModelSpec(config, model.tensors), load_topology(TWO_SOCKET), CPU_ONLY)
    assert_every_byte_once(plan, _index(ModelSpec(config, model.tensors)))
    attn_q = next(t for t in plan.tensors if t.name == "blk.0.attn_q.weight")
    assert [(s.axis, s.start, s.stop) for s in attn_q.shards] == [
        (0, 0, 2 * config.head_dim), (0, 2 * config.head_dim, 4 * config.head_dim)]


@pytest.mark.parametrize(("name", "hf", "model_type"), [
    ("deepseek-v3", DEEPSEEK_V3, "deepseek_v3"), ("kimi-k2", KIMI_K2, "kimi_k2")])
def test_built_in_shapes_are_their_config_json(name: str, hf: dict, model_type: str) -> None:
    """The built-in numbers are what shapes_from_hf_config reads from the config.json values
    copied above (YaRN, groups, gating, scaling factor included)."""
    built_in = MODELS[name]
    # both official config.json files carry scoring_func (transformers hard-codes it, so the
    # config dicts above leave it out); without it llama.cpp's converter means softmax
    official = {**hf, "model_type": model_type, "scoring_func": "sigmoid"}
    assert shapes_from_hf_config(official, built_in.source) == built_in
    assert not shapes_from_hf_config({**hf, "model_type": model_type}).sigmoid_gating


def test_shapes_from_hf_config_refuses_unknown_models() -> None:
    with pytest.raises(CatalogError, match="model_type 'llama'"):
        shapes_from_hf_config({"model_type": "llama"})
    with pytest.raises(CatalogError, match="needs 'kv_lora_rank'"):
        shapes_from_hf_config({**{k: v for k, v in DEEPSEEK_V3.items() if k != "kv_lora_rank"},
                               "model_type": "deepseek_v3"})
