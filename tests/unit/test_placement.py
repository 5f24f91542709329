"""Placement plans on the tiny Qwen3-MoE: byte accounting checked against gguf-py's tensor index
and the Hugging Face config the model was converted from (independent of numoe's reader)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf as gguf_py
import pytest

from bench.roofline import decode_traffic
from cluster.gguf import open_gguf
from cluster.model import load_model_spec
from cluster.placement import (
    ModelSpec,
    Plan,
    PlanError,
    PlanOptions,
    make_plan,
    parse_override,
)
from cluster.topology import Topology, load_topology, virtual_numa
from tests.reference.tiny_models import TinyModel

REPO = Path(__file__).resolve().parents[2]
TWO_SOCKET = REPO / "deploy" / "topologies" / "2socket-2gpu.json"
CTX = 512


@pytest.fixture(scope="module", params=["f32", "q8_0"])
def quant(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def spec(tiny_qwen3moe: TinyModel, quant: str) -> ModelSpec:
    with open_gguf(tiny_qwen3moe.gguf[quant]) as file:
        config, tensors = load_model_spec(file)
    return ModelSpec(config, tensors)


@pytest.fixture(scope="module")
def file_tensor_bytes(tiny_qwen3moe: TinyModel, quant: str) -> dict[str, int]:
    reader = gguf_py.GGUFReader(tiny_qwen3moe.gguf[quant])
    return {tensor.name: int(tensor.n_bytes) for tensor in reader.tensors}


@pytest.fixture(scope="module")
def hf_config(tiny_qwen3moe: TinyModel) -> dict:
    return json.loads((tiny_qwen3moe.hf_dir / "config.json").read_text())


def _two_socket() -> Topology:
    return load_topology(TWO_SOCKET)


def test_every_split_byte_placed_once(spec: ModelSpec, file_tensor_bytes: dict[str, int],
                                      tiny_qwen3moe: TinyModel, quant: str) -> None:
    plan = make_plan(spec, _two_socket(), PlanOptions(ctx=CTX))
    block_sizes = {name: gguf_py.GGML_QUANT_SIZES[t.tensor_type][0]
                   for name, t in ((t.name, t) for t in
                                   gguf_py.GGUFReader(tiny_qwen3moe.gguf[quant]).tensors)}
    assert {t.name for t in plan.tensors} == set(file_tensor_bytes)
    n_split = 0
    for tensor in plan.tensors:
        if tensor.replicated:
            assert sorted(tensor.ranks) == [0, 1], tensor.name
            assert all(s.n_bytes == file_tensor_bytes[tensor.name] for s in tensor.shards)
            continue
        n_split += 1
        assert sum(s.n_bytes for s in tensor.shards) == file_tensor_bytes[tensor.name]
        axis = tensor.shards[0].axis
        assert axis is not None and all(s.axis == axis for s in tensor.shards)
        bounds = sorted((s.start, s.stop) for s in tensor.shards)  # contiguous, no overlap
        assert bounds[0][0] == 0 and bounds[-1][1] == tensor.shape[axis]
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
        if axis == len(tensor.shape) - 1:  # column slices hold whole quant blocks
            assert all(s.start % block_sizes[tensor.name] == 0 for s in tensor.shards)
    # 4 layers x (3 expert tensors + q, k, v, output) are split
    assert n_split == spec.config.n_layers * 7 + 1  # and the LM head, split by vocab rows


def test_worker_memory_sums(spec: ModelSpec, file_tensor_bytes: dict[str, int],
                            hf_config: dict) -> None:
    plan = make_plan(spec, _two_socket(), PlanOptions(ctx=CTX))
    replica_bytes = sum(t.n_bytes for t in plan.tensors if t.replicated)
    n_workers = len(plan.workers)
    assert sum(w.weight_bytes for w in plan.workers) == (
        sum(file_tensor_bytes.values()) + (n_workers - 1) * replica_bytes)
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config[
        "num_attention_heads"]
    kv_total = (hf_config["num_hidden_layers"] * CTX * hf_config["num_key_value_heads"]
                * head_dim * 2 * 2)  # k and v, f16
    assert sum(w.kv_bytes for w in plan.workers) == kv_total
    assert all(w.total_bytes == w.weight_bytes + w.kv_bytes for w in plan.workers)


def test_single_worker_decode_bytes_match_roofline(spec: ModelSpec) -> None:
    one_node = Topology.from_dict({"hosts": [{"name": "h", "numa_nodes": [
        {"id": 0, "cpus": "0-1", "memory": "8GiB", "read_bandwidth_gbs": 20}]}]})
    plan = make_plan(spec, one_node, PlanOptions(ctx=CTX))
    (worker,) = plan.workers
    assert worker.decode_bytes_per_token == decode_traffic(spec.config, spec.tensors).total_bytes
    assert not worker.bandwidth_assumed and plan.notes == ()
    assert plan.predicted_decode_tok_s == pytest.approx(20e9 / worker.decode_bytes_per_token)


def test_override_pins_experts_whole(spec: ModelSpec,
                                     file_tensor_bytes: dict[str, int]) -> None:
    options = PlanOptions(ctx=CTX, overrides=(parse_override(r"blk\..*\.ffn_.*_exps\.=numa1"),))
    plan = make_plan(spec, _two_socket(), options)
    experts = [t for t in plan.tensors if t.name.endswith("_exps.weight")]
    assert len(experts) == 3 * spec.config.n_layers
    for tensor in experts:
        assert tensor.pinned and not tensor.replicated and tensor.ranks == (1,)
        assert tensor.shards[0].n_bytes == file_tensor_bytes[tensor.name]
    assert plan.workers[1].weight_bytes > plan.workers[0].weight_bytes


def test_bad_override_is_refused() -> None:
    with pytest.raises(PlanError, match="REGEX=numaN"):
        parse_override("blk.*=gpu0")


def test_model_that_does_not_fit_is_refused(spec: ModelSpec) -> None:
    tiny = Topology.from_dict({"hosts": [{"name": "small", "numa_nodes": [
        {"id": 0, "cpus": "0", "memory": "1MiB"}, {"id": 1, "cpus": "1", "memory": "1MiB"}]}]})
    with pytest.raises(PlanError) as error:
        make_plan(spec, tiny, PlanOptions(ctx=CTX))
    message = str(error.value)
    assert "does not fit" in message and "node 0" in message and "GiB short" in message
    assert "--ctx" in message and "smaller quant" in message


def test_plan_json_round_trip(spec: ModelSpec) -> None:
    plan = make_plan(spec, virtual_numa(_single_node(), 2), PlanOptions(ctx=CTX))
    data = json.loads(json.dumps(plan.to_dict()))
    assert data == plan.to_dict()
    assert isinstance(plan, Plan) and len(data["workers"]) == 2
    assert data["predicted_decode_tok_s"] == min(w["predicted_decode_tok_s"]
                                                 for w in data["workers"])


def _single_node() -> Topology:
    return Topology.from_dict({"hosts": [{"name": "one", "numa_nodes": [
        {"id": 0, "cpus": "0-3", "memory": "16GiB"}]}]})


def test_cli_plan_json(tiny_qwen3moe: TinyModel) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "plan", str(tiny_qwen3moe.gguf["f32"]),
         "--virtual-numa", "2", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [w["rank"] for w in data["workers"]] == [0, 1]
    assert data["strategy"] == "tensor_parallel"
