"""The ZeroMQ ipc all-reduce instead of the default shared memory: 2 workers on a real local Ray
against the single-process engine on the tiny Qwen3-MoE (F32). Its own module: the workers of
test_workers.py hold both virtual nodes' Ray resources until that module ends."""

from __future__ import annotations

import io

import pytest

from cluster.cluster_cli import ClusterOptions, cluster_runner_factory
from cluster.engine import Engine
from tests.cluster.conftest import (
    N_CTX,
    N_STEPS,
    RayTestCluster,
    greedy,
    prompt_ids,
    relative_error,
)
from tests.reference.tiny_models import TinyModel

pytestmark = pytest.mark.slow
F32_BOUND = 1e-5  # max |diff| / max |ref|: only the order of the partial sums differs


def test_zeromq_ipc_reduce_matches_single_process(ray_cluster: RayTestCluster,
                                                  tiny_qwen3moe: TinyModel) -> None:
    """The same run with the ZeroMQ ipc all-reduce instead of shared memory."""
    factory = cluster_runner_factory(
        ClusterOptions(virtual_numa=2, threads_per_worker=1, reduce_transport="ipc"),
        notes=io.StringIO())
    reference = Engine(tiny_qwen3moe.gguf["f32"], backend="cpu", n_threads=1, n_ctx=N_CTX)
    with reference, Engine(tiny_qwen3moe.gguf["f32"], n_ctx=N_CTX,
                           runner_factory=factory) as engine:
        wiring = engine.runner.wiring
        assert all(a.startswith("ipc://") for w in wiring.values() for a in w["reduce"])
        ids = prompt_ids(3)
        assert relative_error(engine.runner.forward(ids, 0, logits="all"),
                              reference.runner.forward(ids, 0, logits="all")) <= F32_BOUND
        ours, _ = greedy(engine.runner.forward, ids, N_STEPS)
        expected, _ = greedy(reference.runner.forward, ids, N_STEPS)
        assert ours == expected
