"""Placement plans: byte accounting checked against gguf-py's tensor index and the Hugging Face
config the tiny model was converted from, and against the built-in DeepSeek-V3 description
(whose bytes tests/unit/test_catalog.py checks against gguf-py and published file sizes)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import gguf as gguf_py
import pytest

from bench.roofline import decode_traffic
from cluster.catalog import describe
from cluster.gguf import open_gguf
from cluster.model import load_model_spec
from cluster.placement import (
    ModelSpec,
    Plan,
    PlanError,
    PlanOptions,
    make_plan,
    parse_override,
    plan_from_dict,
)
from cluster.predict import Calibration
from cluster.topology import GIB, Host, NumaNode, Topology, load_topology, virtual_numa
from tests.reference.tiny_models import TinyModel

REPO = Path(__file__).resolve().parents[2]
TOPOLOGIES = REPO / "deploy" / "topologies"
TWO_SOCKET = TOPOLOGIES / "2socket-2gpu.json"
ONE_GPU = TOPOLOGIES / "2socket-1gpu.json"
CTX = 512
CPU_ONLY = PlanOptions(ctx=CTX, gpu="off")
# The speed model reduced to bandwidth alone: every kernel streams at the node's bandwidth.
BANDWIDTH_ONLY = Calibration(kernel_efficiency=(), default_kernel_efficiency=1.0,
                             core_decode_gbs=(), default_core_decode_gbs=1e12,
                             layer_overhead_s=0.0, expert_overhead_s=0.0, allreduce_latency_s=0.0,
                             gpu_efficiency=1.0, gpu_layer_overhead_s=0.0, stage_handoff_s=0.0)


@pytest.fixture(scope="module")
def quant() -> str:
    return "q8_0"  # quant blocks of 32: column cuts must land on block bounds


@pytest.fixture(scope="module")
def spec(tiny_qwen3moe: TinyModel, quant: str) -> ModelSpec:
    with open_gguf(tiny_qwen3moe.gguf[quant]) as file:
        config, tensors = load_model_spec(file)
    return ModelSpec(config, tensors)


@pytest.fixture(scope="module")
def file_index(tiny_qwen3moe: TinyModel, quant: str,
               request: pytest.FixtureRequest) -> dict[str, tuple[int, int, int]]:
    """name -> (bytes, quant block elements, elements), from gguf-py. Its reader parses the
    whole 151936-token vocabulary (10-20 s here), so the index is kept in pytest's cache,
    keyed by the file's path, size and mtime."""
    path = tiny_qwen3moe.gguf[quant]
    stat = path.stat()
    key = f"numoe/gguf-py-index/{path.name}"
    cached = request.config.cache.get(key, None)
    if cached is not None and cached["file"] == [str(path), stat.st_size, stat.st_mtime_ns]:
        return {name: tuple(value) for name, value in cached["index"].items()}
    reader = gguf_py.GGUFReader(path)
    index = {t.name: (int(t.n_bytes), gguf_py.GGML_QUANT_SIZES[t.tensor_type][0],
                      int(t.n_elements)) for t in reader.tensors}
    request.config.cache.set(key, {"file": [str(path), stat.st_size, stat.st_mtime_ns],
                                   "index": index})
    return index


@pytest.fixture(scope="module")
def hf_config(tiny_qwen3moe: TinyModel) -> dict:
    return json.loads((tiny_qwen3moe.hf_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def deepseek() -> ModelSpec:
    model = describe("deepseek-v3:Q4_K_M")
    return ModelSpec(model.config, model.tensors)


def _two_hosts() -> Topology:
    nodes = [{"id": i, "cpus": f"{2 * i}-{2 * i + 1}", "memory": "8GiB",
              "read_bandwidth_gbs": 20} for i in range(2)]
    return Topology.from_dict({"hosts": [{"name": "a", "numa_nodes": nodes},
                                         {"name": "b", "numa_nodes": nodes}]})


def _one_node(bandwidth: float = 20.0) -> Topology:
    return Topology.from_dict({"hosts": [{"name": "h", "numa_nodes": [
        {"id": 0, "cpus": "0-1", "memory": "8GiB", "read_bandwidth_gbs": bandwidth}]}]})


def assert_every_byte_once(plan: Plan, index: Mapping[str, tuple[int, ...]]) -> None:
    """Every tensor of the file is in the plan once; in every stage that holds it, it is either
    held whole by each holder or cut along one axis into contiguous, non-overlapping slices
    that cover it exactly once (column cuts on quant-block bounds), bytes summing to the file's.
    Per-worker weights then sum to the file plus the extra whole copies."""
    assert sorted(t.name for t in plan.tensors) == sorted(index)
    stage_of = {w.rank: w.stage for w in plan.workers}
    expected_total = 0
    for tensor in plan.tensors:
        n_bytes, block = index[tensor.name][:2]
        assert tensor.n_bytes == n_bytes, tensor.name
        by_stage: dict[int, list] = {}
        for shard in tensor.shards:
            by_stage.setdefault(stage_of[shard.rank], []).append(shard)
        for shards in by_stage.values():
            assert len({s.rank for s in shards}) == len(shards), tensor.name
            if all(s.axis is None for s in shards):
                assert all(s.n_bytes == n_bytes for s in shards), tensor.name
                assert not tensor.pinned or len(shards) == 1, tensor.name
                expected_total += n_bytes * len(shards)
                continue
            axis = shards[0].axis
            assert axis is not None and all(s.axis == axis for s in shards), tensor.name
            bounds = sorted((s.start, s.stop) for s in shards)
            assert bounds[0][0] == 0 and bounds[-1][1] == tensor.shape[axis], tensor.name
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
            assert sum(s.n_bytes for s in shards) == n_bytes, tensor.name
            if axis == len(tensor.shape) - 1:
                assert all(s.start % block == 0 for s in shards), tensor.name
            expected_total += n_bytes
    assert sum(w.weight_bytes for w in plan.workers) == expected_total
    assert all(w.total_bytes == w.weight_bytes + w.kv_bytes for w in plan.workers)


def _kv_bytes_per_layer(hf: dict, ctx: int) -> int:
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    return ctx * hf["num_key_value_heads"] * head_dim * 2 * 2  # k and v, f16


def _catalog_index(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    return {name: (t.n_bytes, gguf_py.GGML_QUANT_SIZES[gguf_py.GGMLQuantizationType(
        t.ggml_type)][0]) for name, t in spec.tensors.items()}


# --- tensor parallel, expert parallel, pipeline ----------------------------------------------


def test_tensor_parallel_places_every_byte_once(spec: ModelSpec, file_index: dict,
                                                hf_config: dict) -> None:
    plan = make_plan(spec, load_topology(TWO_SOCKET), CPU_ONLY)
    assert_every_byte_once(plan, file_index)
    split = [t for t in plan.tensors if not t.replicated]
    # 4 layers x (3 expert tensors + q, k, v, output) are split, and the LM head by vocab rows
    assert len(split) == spec.config.n_layers * 7 + 1
    assert all(sorted(t.ranks) == [0, 1] for t in plan.tensors)
    assert sum(w.kv_bytes for w in plan.workers) == (
        hf_config["num_hidden_layers"] * _kv_bytes_per_layer(hf_config, CTX))
    assert all(plan.block_is_split(0, layer, block) for layer in range(spec.config.n_layers)
               for block in ("attention", "ffn"))


def test_expert_parallel_splits_whole_experts(spec: ModelSpec, file_index: dict) -> None:
    plan = make_plan(spec, load_topology(TWO_SOCKET), replace(CPU_ONLY,
                                                              strategy="expert_parallel"))
    assert_every_byte_once(plan, file_index)
    for tensor in plan.tensors:
        if tensor.name.endswith("_exps.weight"):
            assert [(s.axis, s.start, s.stop) for s in tensor.shards] == [
                (0, 0, spec.config.n_experts // 2), (0, spec.config.n_experts // 2,
                                                      spec.config.n_experts)]


def test_pipeline_across_two_hosts(spec: ModelSpec, file_index: dict, hf_config: dict) -> None:
    plan = make_plan(spec, _two_hosts(), replace(CPU_ONLY, layer_split=(1, 3)))
    assert [(s.host, s.layers, s.ranks) for s in plan.stages] == [
        ("a", (0, 1), (0, 1)), ("b", (1, 4), (2, 3))]
    assert_every_byte_once(plan, file_index)
    for tensor in plan.tensors:
        layer = re.match(r"blk\.(\d+)\.", tensor.name)
        if layer:
            expected = (0, 1) if int(layer.group(1)) < 1 else (2, 3)
            assert set(tensor.ranks) == set(expected), tensor.name
    by_name = {t.name: t for t in plan.tensors}
    assert set(by_name["token_embd.weight"].ranks) == {0, 1}
    assert set(by_name["output.weight"].ranks) == {2, 3}
    assert [w.vocab for w in plan.workers][:2] == [(0, 0), (0, 0)]
    assert plan.workers[2].vocab[0] == 0 and plan.workers[3].vocab[1] == spec.config.vocab_size
    assert sum(w.kv_bytes for w in plan.workers) == (
        hf_config["num_hidden_layers"] * _kv_bytes_per_layer(hf_config, CTX))
    with pytest.raises(PlanError, match="layer-split"):
        make_plan(spec, _two_hosts(), replace(CPU_ONLY, layer_split=(2, 3)))


# --- CPU + GPU -------------------------------------------------------------------------------


def test_gpu_hybrid_layout(spec: ModelSpec, file_index: dict, hf_config: dict) -> None:
    plan = make_plan(spec, load_topology(TWO_SOCKET), PlanOptions(ctx=CTX))
    assert_every_byte_once(plan, file_index)
    gpu = plan.workers[2]
    assert (gpu.device, gpu.stage, gpu.node_id, plan.stages[0].ranks) == ("cuda:0", 0, 0,
                                                                          (0, 1, 2))
    assert gpu.cpus == (31,) and 31 not in plan.workers[0].cpus
    for tensor in plan.tensors:
        if re.fullmatch(r"blk\.\d+\.attn_(q|k|v|output)\.weight|output\.weight", tensor.name):
            assert tensor.pinned and tensor.ranks == (2,), tensor.name
        elif tensor.name.endswith("_exps.weight"):
            assert sorted(tensor.ranks) == [0, 1] and not tensor.replicated, tensor.name
        elif "ffn_gate_inp" in tensor.name:
            assert tensor.replicated and sorted(tensor.ranks) == [0, 1], tensor.name
        else:  # norms and the embedding: every worker keeps its own residual stream
            assert tensor.replicated and sorted(tensor.ranks) == [0, 1, 2], tensor.name
    kv_total = hf_config["num_hidden_layers"] * _kv_bytes_per_layer(hf_config, CTX)
    assert [w.kv_bytes for w in plan.workers] == [0, 0, kv_total]
    assert [w.vocab for w in plan.workers] == [(0, 0), (0, 0), (0, spec.config.vocab_size)]
    assert [w.kv_heads for w in plan.workers] == [(0, 0), (0, 0),
                                                  (0, spec.config.n_kv_heads)]
    assert all(plan.block_is_split(0, layer, block) for layer in range(spec.config.n_layers)
               for block in ("attention", "ffn"))
    assert any("GPU 1" in note and "idle" in note for note in plan.notes)


def test_deepseek_v3_plans_onto_two_sockets_and_a_gpu(deepseek: ModelSpec) -> None:
    plan = make_plan(deepseek, load_topology(ONE_GPU), PlanOptions(ctx=8192))
    assert_every_byte_once(plan, _catalog_index(deepseek))
    cpu0, cpu1, gpu = plan.workers
    assert (cpu0.device, cpu1.device, gpu.device) == ("cpu", "cpu", "cuda:0")
    for tensor in plan.tensors:
        name = tensor.name
        if name.endswith("_exps.weight"):  # routed experts: split over the two sockets
            assert sorted(tensor.ranks) == [0, 1] and all(s.axis in (1, 2)
                                                          for s in tensor.shards), name
        elif re.match(r"blk\.\d+\.attn_(q_a|q_b|kv_a_mqa|k_b|v_b|output)\.", name) or \
                re.match(r"blk\.\d+\.ffn_(gate|up|down)(_shexp)?\.weight", name) or \
                name == "output.weight":  # MLA, shared experts, dense layers 0-2, LM head
            assert tensor.ranks == (2,), name
    # MLA caches kv_lora_rank + qk_rope_head_dim (512 + 64) f16 values per token and layer
    assert gpu.kv_bytes == 61 * 8192 * (512 + 64) * 2
    assert cpu0.kv_bytes == cpu1.kv_bytes == 0
    assert gpu.total_bytes <= gpu.node_memory_bytes == 23 * GIB
    assert plan.prediction is not None and plan.predicted_decode_tok_s > 0


def test_gpu_too_small_falls_back_or_is_refused(deepseek: ModelSpec) -> None:
    data = json.loads(ONE_GPU.read_text())
    data["hosts"][0]["numa_nodes"][0]["gpus"][0]["memory"] = "8GiB"
    small = Topology.from_dict(data)
    plan = make_plan(deepseek, small, PlanOptions(ctx=8192))
    assert [w.device for w in plan.workers] == ["cpu", "cpu"]
    assert any("cuda:0" in note and "short" in note for note in plan.notes)
    with pytest.raises(PlanError, match=r"cuda:0.* 7\.00 GiB free .* GiB short"):
        make_plan(deepseek, small, PlanOptions(ctx=8192, gpu="on"))


def test_cpu_only_deepseek_splits_mla_heads_per_socket(deepseek: ModelSpec) -> None:
    """MLA split by heads (64 of 128 per socket); the latent cache, which every head reads, is
    kept whole by both sockets."""
    plan = make_plan(deepseek, load_topology(ONE_GPU), PlanOptions(ctx=4096, gpu="off"))
    assert_every_byte_once(plan, _catalog_index(deepseek))
    assert [w.kv_bytes for w in plan.workers] == [61 * 4096 * 576 * 2] * 2
    assert [w.kv_heads for w in plan.workers] == [(0, 64), (64, 128)]
    assert plan.block_is_split(0, 5, "attention") and plan.block_is_split(0, 5, "ffn")
    assert not any("MLA" in note for note in plan.notes)


def test_glm_biases_and_mtp_layer() -> None:
    """GLM-4.6 on two CPU sockets: q/k/v biases are cut with their rows; the multi-token
    prediction layer 92 is held by the last stage but never read per token."""
    model = describe("glm-4.6:Q4_K_M")
    spec = ModelSpec(model.config, model.tensors)
    plan = make_plan(spec, load_topology(ONE_GPU), PlanOptions(ctx=4096, gpu="off"))
    assert_every_byte_once(plan, _catalog_index(spec))
    by_name = {t.name: t for t in plan.tensors}
    for kind in ("q", "k", "v"):
        weight, bias = by_name[f"blk.7.attn_{kind}.weight"], by_name[f"blk.7.attn_{kind}.bias"]
        assert [(s.start, s.stop) for s in bias.shards] == [
            (s.start, s.stop) for s in weight.shards]
        assert bias.shards[0].stop == bias.shape[0] // 2
    mtp = [t for t in plan.tensors if t.name.startswith("blk.92.")]
    assert mtp and all(sorted(t.ranks) == [0, 1] for t in mtp)
    held = sum(s.n_bytes for t in plan.tensors for s in t.shards if s.rank == 0)
    read = plan.workers[0].decode_bytes_per_token
    mtp_bytes = sum(s.n_bytes for t in mtp for s in t.shards if s.rank == 0)
    assert held == plan.workers[0].weight_bytes and mtp_bytes > 0
    run = [t for t in plan.tensors if not t.name.startswith("blk.92.")]
    experts_read = sum(s.n_bytes * 8 // 160 for t in run if "_exps" in t.name
                       for s in t.shards if s.rank == 0)  # top 8 of 160 experts
    others_read = sum(s.n_bytes for t in run if "_exps" not in t.name
                      and t.name != "token_embd.weight" for s in t.shards if s.rank == 0)
    row = by_name["token_embd.weight"].n_bytes // model.config.vocab_size
    assert read == experts_read + others_read + row


# --- refusals, pins, options -------------------------------------------------------------------


def test_model_that_does_not_fit_is_refused(deepseek: ModelSpec) -> None:
    small = Topology.from_dict({"hosts": [{"name": "small", "numa_nodes": [
        {"id": 0, "cpus": "0-15", "memory": "64GiB"}, {"id": 1, "cpus": "16-31",
                                                      "memory": "64GiB"}]}]})
    with pytest.raises(PlanError) as error:
        make_plan(deepseek, small, PlanOptions(ctx=4096))
    message = str(error.value)
    assert "does not fit" in message and "node 0" in message
    assert "--ctx" in message and "smaller quant" in message
    needs, weights, kv, has, short = (float(x) for x in re.search(
        r"needs ([\d.]+) GiB \(weights ([\d.]+) \+ KV cache ([\d.]+)\) but the node has "
        r"([\d.]+) GiB, ([\d.]+) GiB short", message).groups())
    half = sum(t.n_bytes for t in deepseek.tensors.values()) / 2 / GIB
    assert has == 64 and needs > half and abs(needs - has - short) < 0.02
    assert abs(weights + kv - needs) < 0.02 and kv == pytest.approx(61 * 4096 * 576 * 2 / GIB,
                                                                     abs=0.01)


def test_pins(spec: ModelSpec, file_index: dict) -> None:
    exps = r"blk\..*\.ffn_.*_exps\."
    plan = make_plan(spec, load_topology(TWO_SOCKET),
                     replace(CPU_ONLY, overrides=(parse_override(f"{exps}=numa1"),)))
    assert_every_byte_once(plan, file_index)
    for tensor in plan.tensors:
        if tensor.name.endswith("_exps.weight"):
            assert tensor.pinned and tensor.ranks == (1,)
    # llama.cpp's -ot exps=CPU spelling keeps attention off the GPU too when asked
    plan = make_plan(spec, load_topology(TWO_SOCKET), PlanOptions(ctx=CTX, overrides=(
        parse_override(r"attn=CPU"), parse_override(r"blk\.0\.ffn_.*_exps\.=CUDA0"))))
    assert_every_byte_once(plan, file_index)
    by_name = {t.name: t for t in plan.tensors}
    assert sorted(by_name["blk.1.attn_q.weight"].ranks) == [0, 1]
    assert by_name["blk.0.ffn_up_exps.weight"].ranks == (2,)
    assert 2 in by_name["blk.0.ffn_gate_inp.weight"].ranks  # the GPU now routes layer 0
    assert 2 not in by_name["blk.1.ffn_gate_inp.weight"].ranks
    assert plan.workers[2].kv_bytes == 0 and plan.workers[0].kv_bytes > 0


def test_bad_overrides_are_refused(spec: ModelSpec) -> None:
    with pytest.raises(PlanError, match="REGEX=numaN"):
        parse_override("blk.*=disk0")
    with pytest.raises(PlanError, match="gpu off"):
        make_plan(spec, load_topology(TWO_SOCKET),
                  replace(CPU_ONLY, overrides=(parse_override("exps=gpu0"),)))
    with pytest.raises(PlanError, match="placed differently"):
        make_plan(spec, load_topology(TWO_SOCKET),
                  replace(CPU_ONLY, overrides=(parse_override(r"blk\.0\.ffn_up_exps=numa0"),)))


# --- predictions ---------------------------------------------------------------------------


def test_single_worker_prediction_is_the_roofline(spec: ModelSpec, file_index: dict,
                                                  hf_config: dict) -> None:
    plan = make_plan(spec, _one_node(20.0), replace(CPU_ONLY, calibration=BANDWIDTH_ONLY))
    (worker,) = plan.workers
    traffic = decode_traffic(spec.config, spec.tensors).total_bytes
    assert worker.decode_bytes_per_token == traffic
    assert not worker.bandwidth_assumed and plan.notes == ()
    assert plan.predicted_decode_tok_s == pytest.approx(20e9 / traffic)
    # prompt: 2 FLOPs per weight a token multiplies (top-k of E experts, no embedding gather)
    h, k = hf_config["hidden_size"], hf_config["num_experts_per_tok"]
    e = hf_config.get("num_experts") or hf_config["num_local_experts"]
    experts = hf_config["num_hidden_layers"] * 3 * e * h * hf_config["moe_intermediate_size"]
    every = sum(elements for _, _, elements in file_index.values())
    active = every - experts - hf_config["vocab_size"] * h + experts * k // e
    assert plan.predicted_prompt_tok_s == pytest.approx(
        2 * BANDWIDTH_ONLY.core_gflops * 1e9 / (2 * active), rel=1e-9)


def test_prediction_counts_all_reduces_and_gpu_time(spec: ModelSpec) -> None:
    slow_reduce = replace(BANDWIDTH_ONLY, allreduce_latency_s=1e-3)
    tp = make_plan(spec, load_topology(TWO_SOCKET), replace(CPU_ONLY, calibration=slow_reduce))
    (stage,) = tp.prediction.stages  # type: ignore[union-attr]
    assert stage.overhead_s == pytest.approx(spec.config.n_layers * 2 * 1e-3)
    hybrid = make_plan(spec, load_topology(TWO_SOCKET), PlanOptions(
        ctx=CTX, calibration=BANDWIDTH_ONLY, gpu_bandwidth_gbs=1000.0))
    gpu = hybrid.workers[2]
    attention_bytes = sum(s.n_bytes for t in hybrid.tensors for s in t.shards
                          if s.rank == 2 and "attn" in t.name)
    (stage,) = hybrid.prediction.stages  # type: ignore[union-attr]
    assert stage.attention_s == pytest.approx(attention_bytes / 1000e9)
    assert gpu.bandwidth_gbs == 1000.0 and not gpu.bandwidth_assumed


# --- serialisation and CLI ---------------------------------------------------------------------


def test_plan_json_round_trip(spec: ModelSpec, deepseek: ModelSpec) -> None:
    plans = [make_plan(spec, virtual_numa(_single_node(), 2), PlanOptions(ctx=CTX)),
             make_plan(spec, _two_hosts(), CPU_ONLY),
             make_plan(deepseek, load_topology(ONE_GPU), PlanOptions(ctx=8192, decode_depth=9))]
    for plan in plans:
        data = json.loads(json.dumps(plan.to_dict()))
        assert plan_from_dict(data) == plan
        assert data["predicted_decode_tok_s"] == pytest.approx(plan.predicted_decode_tok_s)
    with pytest.raises(PlanError, match="not a numoe plan"):
        plan_from_dict({"strategy": "tensor_parallel"})


def _single_node() -> Topology:
    return Topology.from_dict({"hosts": [{"name": "one", "numa_nodes": [
        {"id": 0, "cpus": "0-3", "memory": "16GiB"}]}]})


def _numoe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)


def test_cli_plan_gguf_json(tiny_qwen3moe: TinyModel) -> None:
    result = _numoe("plan", str(tiny_qwen3moe.gguf["f32"]), "--virtual-numa", "2", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [w["rank"] for w in data["workers"]] == [0, 1]
    assert data["strategy"] == "tensor_parallel"


def test_cli_plan_builtin_model() -> None:
    table = _numoe("plan", "deepseek-v3:Q4_K_M", "--topology", str(ONE_GPU), "--ctx", "8192")
    assert table.returncode == 0, table.stderr
    assert "deepseek2" in table.stdout and "server0:cuda:0" in table.stdout
    assert re.search(r"predicted decode: [\d.]+ tok/s", table.stdout)
    assert re.search(r"predicted prompt: [\d.]+ tok/s", table.stdout)
    as_json = _numoe("plan", "deepseek-v3:Q4_K_M", "--topology", str(ONE_GPU), "--ctx", "8192",
                     "--json")
    plan = plan_from_dict(json.loads(as_json.stdout))
    assert [w.device for w in plan.workers] == ["cpu", "cpu", "cuda:0"]
    unknown = _numoe("plan", "deepseek-v9:Q4_K_M", "--topology", str(ONE_GPU))
    assert unknown.returncode == 1 and "known: deepseek-r1, deepseek-v3" in unknown.stderr
    listing = _numoe("plan", "--list-models")
    assert listing.returncode == 0 and "qwen3-coder-480b" in listing.stdout


@pytest.mark.parametrize(("n_workers", "expected_axis"), [(2, 1), (3, 1), (4, 0)])
def test_experts_split_whole_when_blocks_do_not_divide(n_workers: int,
                                                       expected_axis: int) -> None:
    """Qwen3-235B's experts are 1536 wide: 6 K-quant blocks of 256 (gguf-py's block size). Over
    2 or 3 workers they split into equal column slices; over 4 the slices would be uneven, so
    the planner splits whole experts instead (and says so), keeping every layer balanced."""
    model = describe("qwen3-235b-a22b:Q4_K_M")
    spec = ModelSpec(model.config, model.tensors)
    down = model.tensors["blk.0.ffn_down_exps.weight"]
    block = gguf_py.GGML_QUANT_SIZES[gguf_py.GGMLQuantizationType(down.ggml_type)][0]
    assert down.shape[-1] // block == 6
    one_node = Topology(hosts=(Host(name="box", nodes=(
        NumaNode(node_id=0, cpus=tuple(range(12)), memory_bytes=1024 * GIB),)),))
    topology = virtual_numa(one_node, n_workers)
    plan = make_plan(spec, topology, PlanOptions(ctx=512, gpu="off"))
    for name in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
        tensor = next(t for t in plan.tensors if t.name == f"blk.3.{name}.weight")
        axes = {shard.axis for shard in tensor.shards}
        expected = {2 if "down" in name else 1} if expected_axis == 1 else {0}
        assert axes == expected, (name, axes)
        widths = {shard.stop - shard.start for shard in tensor.shards}
        assert len(widths) == 1  # equal slices for every worker
    assert (expected_axis == 0) == any("split whole" in note for note in plan.notes)
