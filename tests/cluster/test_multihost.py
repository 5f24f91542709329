"""Two "hosts" on one machine: the session's head raylet stands for this machine (host A, one
NUMA node of CPUs 0-1, 2 threads) and a second raylet for host B (2 virtual nodes, CPU 0 and
CPU 1). The plan is a 2-stage pipeline across the hosts with tensor parallelism inside host B;
activations cross hosts over tcp:// and stay on ipc:// inside a host. Greedy tokens and logits
match the single-process engine on the tiny Qwen3-MoE (F32)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from cluster.coordinator import ClusterRunner
from cluster.engine import Engine
from cluster.gguf import open_gguf
from cluster.model import load_model_spec
from cluster.placement import ModelSpec, PlanOptions, make_plan
from cluster.ray_cluster import OBJECT_STORE_BYTES, host_resources
from cluster.topology import Host, NumaNode, Topology
from tests.cluster.conftest import (
    N_CTX,
    N_STEPS,
    RayTestCluster,
    greedy,
    prompt_ids,
    relative_error,
)
from tests.reference.tiny_models import TinyModel
from worker import numa
from worker.worker import WorkerOptions

pytestmark = pytest.mark.slow
F32_BOUND = 1e-5
HOST_B = "host-b"


@dataclass(frozen=True)
class TwoHosts:
    topology: Topology
    head_node_id: str  # host A's Ray node (the coordinator's)


@pytest.fixture(scope="module")
def two_hosts(ray_cluster: RayTestCluster) -> Iterator[TwoHosts]:
    import ray  # noqa: PLC0415

    local = ray_cluster.local.hosts[0]
    memory = local.nodes[0].memory_node
    # Host A: the head's NUMA resource numoe_numa_<host>_0, here as one node with both CPUs.
    host_a = Host(local.name, (NumaNode(0, (0, 1), 1 << 30, os_node_id=memory),))
    host_b = Host(HOST_B, (NumaNode(0, (0,), 1 << 30, os_node_id=memory),
                           NumaNode(1, (1,), 1 << 30, os_node_id=memory)))
    cluster = ray_cluster.cluster
    node_b = cluster.add_node(num_cpus=1, resources=host_resources(host_b),  # type: ignore
                              object_store_memory=OBJECT_STORE_BYTES)
    cluster.wait_for_nodes()  # type: ignore[attr-defined]
    try:
        yield TwoHosts(Topology((host_a, host_b)), ray.get_runtime_context().get_node_id())
    finally:
        cluster.remove_node(node_b)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def pipeline(two_hosts: TwoHosts, tiny_qwen3moe: TinyModel) -> Iterator[ClusterRunner]:
    path = tiny_qwen3moe.gguf["f32"]
    with open_gguf(path) as gguf:
        config, tensors = load_model_spec(gguf)
    plan = make_plan(ModelSpec(config, tensors), two_hosts.topology, PlanOptions(ctx=N_CTX))
    # n_threads None: each worker runs one thread per CPU of its node (2 on host A, 1 on B).
    runner = ClusterRunner(path, plan, N_CTX, topology=two_hosts.topology,
                           options=WorkerOptions())
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def reference(tiny_qwen3moe: TinyModel) -> Iterator[Engine]:
    engine = Engine(tiny_qwen3moe.gguf["f32"], backend="cpu", n_threads=1, n_ctx=N_CTX)
    yield engine
    engine.close()


def test_plan_is_a_pipeline_across_hosts(pipeline: ClusterRunner,
                                         tiny_qwen3moe: TinyModel) -> None:
    plan = pipeline.plan
    assert [stage.host for stage in plan.stages] == [plan.workers[0].host, HOST_B]
    assert [stage.ranks for stage in plan.stages] == [(0,), (1, 2)]
    assert plan.stages[0].layers[1] == plan.stages[1].layers[0]  # layers split between them


def test_greedy_tokens_match_single_process(pipeline: ClusterRunner, reference: Engine) -> None:
    for seed in (3, 4):
        prompt = prompt_ids(seed)
        ours, our_logits = greedy(pipeline.forward, prompt, N_STEPS)
        expected, expected_logits = greedy(reference.runner.forward, prompt, N_STEPS)
        assert ours == expected
        assert relative_error(our_logits, expected_logits) <= F32_BOUND
    all_rows = pipeline.forward(prompt_ids(5), 0, logits="all")  # [T, vocab] through 2 stages
    expected_rows = reference.runner.forward(prompt_ids(5), 0, logits="all")
    assert relative_error(all_rows, expected_rows) <= F32_BOUND


def test_tcp_across_hosts_ipc_inside(pipeline: ClusterRunner, two_hosts: TwoHosts) -> None:
    wiring = pipeline.wiring
    assert wiring[0]["node_id"] == two_hosts.head_node_id  # host A: the coordinator's node
    assert wiring[1]["node_id"] == wiring[2]["node_id"] != two_hosts.head_node_id
    assert wiring[0]["inbox"].startswith("ipc://")  # coordinator -> stage 0, same host
    # Stage 0's one rank feeds both ranks of stage 1, across hosts.
    assert len(wiring[0]["downstream"]) == 2
    assert all(address.startswith("tcp://") for address in wiring[0]["downstream"])
    for rank in (1, 2):
        assert wiring[rank]["downstream"] == []
        assert wiring[rank]["coordinator"].startswith("tcp://")  # logits back across hosts
        assert wiring[rank]["inbox"].startswith("tcp://")  # shutdown from the coordinator
        assert all(address.startswith("shm://") for address in wiring[rank]["reduce"])
    assert wiring[0]["reduce"] == []  # a one-worker stage reduces nothing


def test_threads_default_to_the_node_cpus(pipeline: ClusterRunner) -> None:
    found = pipeline.worker_placement()
    assert found[0]["openmp_threads"] == 2
    assert found[0]["thread_cpus"] == [0, 1]  # OpenMP thread i on the node's CPU i
    assert found[0]["affinity"] == [0]  # the data-plane thread is OpenMP thread 0
    for report, cpu in ((found[1], 0), (found[2], 1)):
        assert report["openmp_threads"] == 1
        assert report["affinity"] == report["thread_cpus"] == [cpu]
    for report in found:
        assert report["memory_policy_mode"] == numa.MPOL_BIND


def test_stats_come_from_both_hosts(pipeline: ClusterRunner) -> None:
    pipeline.forward(prompt_ids(6), 0)
    stats = pipeline.worker_stats()
    assert [s["host"] for s in stats] == [pipeline.plan.workers[0].host, HOST_B, HOST_B]
    n_layers = len(stats[0]["forward"]["expert_tokens"])
    for s in stats:
        experts = s["forward"]["expert_tokens"]  # [L, E]: only the stage's layers count
        layers = pipeline.plan.stages[s["stage"]].layers
        assert all((sum(experts[layer]) > 0) == (layers[0] <= layer < layers[1])
                   for layer in range(n_layers))
        assert s["forward"]["weight_bytes_read"] > 0
    assert stats[0]["forward"]["all_reduce_calls"] == 0  # one-worker stage
    assert stats[1]["forward"]["all_reduce_calls"] > 0
