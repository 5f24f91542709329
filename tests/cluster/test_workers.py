"""Two NUMA workers on a real local Ray (this machine as 2 virtual nodes, 1 CPU and 1 thread
each) against the single-process engine on the tiny Qwen3-MoE (F32): same logits within 1e-5
relative, same greedy tokens; workers pinned as planned (read back from the kernel through Ray);
counters after a step; and the coordinator maps no weight pages."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import numpy as np
import pytest

from cluster.cluster_cli import ClusterOptions, cluster_runner_factory
from cluster.coordinator import ClusterRunner
from cluster.engine import Engine
from tests.cluster.conftest import (
    N_CTX,
    N_STEPS,
    RayTestCluster,
    greedy,
    mapped_rss_bytes,
    prompt_ids,
    relative_error,
)
from tests.reference.tiny_models import TinyModel
from worker import numa

pytestmark = pytest.mark.slow
F32_BOUND = 1e-5  # max |diff| / max |ref|: only the order of the partial sums differs


@pytest.fixture(scope="module")
def cluster_engine(ray_cluster: RayTestCluster, tiny_qwen3moe: TinyModel) -> Iterator[Engine]:
    """The engine as `numoe generate --virtual-numa 2 -t 1` builds it."""
    factory = cluster_runner_factory(ClusterOptions(virtual_numa=2, threads_per_worker=1),
                                     notes=io.StringIO())
    engine = Engine(tiny_qwen3moe.gguf["f32"], n_ctx=N_CTX, runner_factory=factory)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def reference(tiny_qwen3moe: TinyModel) -> Iterator[Engine]:
    engine = Engine(tiny_qwen3moe.gguf["f32"], backend="cpu", n_threads=1, n_ctx=N_CTX)
    yield engine
    engine.close()


def test_prompt_logits_match_single_process(cluster_engine: Engine, reference: Engine) -> None:
    ids = prompt_ids(0)
    ours = cluster_engine.runner.forward(ids, 0, logits="all")  # [T, vocab]
    expected = reference.runner.forward(ids, 0, logits="all")
    assert ours.shape == expected.shape == (len(ids), reference.config.vocab_size)
    assert ours.dtype == np.float32
    assert relative_error(ours, expected) <= F32_BOUND


def test_default_reduce_is_shared_memory(cluster_engine: Engine) -> None:
    wiring = cluster_engine.runner.wiring
    assert all(address.startswith("shm://") for w in wiring.values() for address in w["reduce"])


def test_greedy_tokens_match_single_process(cluster_engine: Engine, reference: Engine) -> None:
    for seed in (1, 2):
        prompt = prompt_ids(seed)
        ours, our_logits = greedy(cluster_engine.runner.forward, prompt, N_STEPS)
        expected, expected_logits = greedy(reference.runner.forward, prompt, N_STEPS)
        assert ours == expected
        assert relative_error(our_logits, expected_logits) <= F32_BOUND


def test_generate_text_matches_single_process(cluster_engine: Engine, reference: Engine) -> None:
    """Engine.generate on the cluster runner (what the CLI does) gives the same text."""
    prompt = "The quick brown fox jumps over the lazy dog"
    ours = cluster_engine.generate(prompt, max_tokens=N_STEPS)
    expected = reference.generate(prompt, max_tokens=N_STEPS)
    assert ours.text() == expected.text()
    assert ours.token_ids == expected.token_ids


def test_workers_are_pinned_and_bound_as_planned(cluster_engine: Engine,
                                                 ray_cluster: RayTestCluster) -> None:
    runner = cluster_engine.runner
    assert isinstance(runner, ClusterRunner)
    found = runner.worker_placement()
    nodes = ray_cluster.local.hosts[0].nodes
    assert len(found) == len(runner.plan.workers) == 2
    for report, worker in zip(found, runner.plan.workers, strict=True):
        assert report["rank"] == worker.rank
        assert report["pid"] != os.getpid()  # its own process, not the coordinator's
        assert report["planned_cpus"] == list(worker.cpus) == list(nodes[worker.rank].cpus)
        # One thread per worker: the data-plane thread and its one OpenMP thread on its CPU.
        assert report["openmp_threads"] == 1
        assert report["affinity"] == list(worker.cpus)
        assert report["thread_cpus"] == list(worker.cpus)
        assert report["memory_policy_mode"] == numa.MPOL_BIND
        assert report["memory_policy_nodes"] == [nodes[worker.rank].memory_node]
    assert found[0]["affinity"] != found[1]["affinity"]
    assert found[0]["pid"] != found[1]["pid"]


def test_worker_counters_follow_a_step(cluster_engine: Engine, reference: Engine) -> None:
    runner = cluster_engine.runner
    config = reference.config
    ids = prompt_ids(5)
    before = runner.worker_stats()
    expected_before = reference.runner.counters.expert_tokens.copy()
    runner.forward(ids, 0)
    reference.runner.forward(ids, 0)
    after = runner.worker_stats()
    # The single-process engine routed the same tokens to the same experts.
    expected_experts = reference.runner.counters.expert_tokens - expected_before  # [L, E]
    assert expected_experts.sum() == len(ids) * config.n_experts_used * config.n_layers
    for old, new in zip(before, after, strict=True):
        assert new["steps"] - old["steps"] == 1
        assert new["step_errors"] == 0
        assert new["weight_bytes"] > 0 and new["bytes_sent"] > old["bytes_sent"]
        f_old, f_new = old["forward"], new["forward"]
        assert f_new["tokens"] - f_old["tokens"] == len(ids)
        assert f_new["forward_calls"] - f_old["forward_calls"] == 1
        assert f_new["weight_bytes_read"] > f_old["weight_bytes_read"]
        assert f_new["kernel_seconds"] > f_old["kernel_seconds"]
        assert f_new["all_reduce_seconds"] > f_old["all_reduce_seconds"]
        # Two reduces per layer (attention and MoE), both split over the 2 workers.
        assert f_new["all_reduce_calls"] - f_old["all_reduce_calls"] == 2 * config.n_layers
        assert new["reduce"]["calls"] - old["reduce"]["calls"] == 2 * config.n_layers
        experts = np.array(f_new["expert_tokens"]) - np.array(f_old["expert_tokens"])
        np.testing.assert_array_equal(experts, expected_experts)


def test_coordinator_maps_no_weight_pages(cluster_engine: Engine, reference: Engine) -> None:
    """The coordinator's mapping of the GGUF holds only metadata pages (tokenizer, config);
    the single-process engine's mapping, read by its forward pass, holds the weights it read."""
    greedy(cluster_engine.runner.forward, prompt_ids(7), 2)
    greedy(reference.runner.forward, prompt_ids(7), 2)
    gguf = cluster_engine.gguf
    first_tensor = min(gguf.tensors.values(), key=lambda info: info.offset)
    output = gguf.tensors["output.weight"]
    metadata_bytes = first_tensor.offset

    def mapping_start(engine: Engine) -> int:
        view = engine.gguf.tensor_data(first_tensor.name)  # a view: touches no page
        return view.ctypes.data - first_tensor.offset

    ours = mapped_rss_bytes(gguf.path, mapping_start(cluster_engine))
    theirs = mapped_rss_bytes(reference.gguf.path, mapping_start(reference))
    assert output.n_bytes > 16 * (1 << 20)  # the LM head alone is far above the slack below
    assert ours <= metadata_bytes + (1 << 20)  # + fault-around and page rounding
    assert theirs >= output.n_bytes  # the measurement does see weights read through a mapping
    assert not hasattr(cluster_engine, "backend")  # no local forward pass was built
