"""Continuous batching across workers (issue 4): several sequences in one FORWARD, their
sequence ids being KV-cache slots, give bit-identical logits to each sequence run alone through
the same cluster, on a real local Ray with 2 tensor-parallel workers.

The scenario is tests/models/test_batching.py's: staggered arrivals, more sequences than slots,
prompts around the GEMM thresholds, decode steps batched and prompts in the same calls.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from cluster.coordinator import ClusterRunner
from cluster.errors import NumoeError
from cluster.gguf import open_gguf
from cluster.model import load_model_spec
from cluster.placement import ModelSpec, PlanOptions, make_plan
from tests.cluster.conftest import RayTestCluster
from tests.models.test_batching import assert_same, make_requests, run_alone, run_batched
from tests.reference.tiny_models import TinyModel
from worker.batch import SequenceChunk
from worker.worker import WorkerOptions

pytestmark = pytest.mark.slow
N_CTX = 48
N_SLOTS = 3


@pytest.fixture(scope="module")
def runner(ray_cluster: RayTestCluster, tiny_qwen3moe: TinyModel) -> Iterator[ClusterRunner]:
    # Its own runner, closed with this module: other modules' engines hold the NUMA resources
    # only while they run.
    path = tiny_qwen3moe.gguf["f32"]  # float weights: the GEMM path starts at 4 tokens
    with open_gguf(path) as gguf:
        config, tensors = load_model_spec(gguf)
    plan = make_plan(ModelSpec(config, tensors), ray_cluster.local, PlanOptions(ctx=N_CTX))
    options = WorkerOptions(n_threads=1, n_slots=N_SLOTS)
    runner = ClusterRunner(path, plan, N_CTX, topology=ray_cluster.local, options=options,
                           step_timeout_s=120.0)
    yield runner
    runner.close()


def test_batched_sequences_equal_each_alone(runner: ClusterRunner) -> None:
    assert len(runner.plan.workers) == 2
    assert runner.n_slots == N_SLOTS
    requests = make_requests(5, runner.vocab_size, seed=3)
    alone = [run_alone(runner, r) for r in requests]  # slot 0, one sequence at a time
    assert_same(alone, run_batched(runner, requests))


def test_bad_chunks_are_refused_before_any_worker_sees_them(runner: ClusterRunner) -> None:
    with pytest.raises(NumoeError, match="slot 3 is outside"):
        runner.forward_batch([SequenceChunk(3, 0, (1,))])
    with pytest.raises(NumoeError, match="appears twice"):
        runner.forward_batch([SequenceChunk(1, 0, (1,)), SequenceChunk(1, 1, (2,))])
    runner.forward_batch([SequenceChunk(1, 0, (1, 2))])  # the runner is still usable


def test_a_forward_message_splits_into_chunks_by_sequence_and_position() -> None:
    from worker.worker import _chunks  # noqa: PLC0415

    positions = np.array([5, 6, 7, 0, 3, 4])  # [T]
    sequence_ids = np.array([2, 2, 2, 0, 1, 1])  # [T]: the KV-cache slots
    assert _chunks(positions, sequence_ids) == ([2, 0, 1], [5, 0, 3], [3, 1, 2])
    with pytest.raises(NumoeError, match="consecutive positions in one run"):
        _chunks(np.array([0, 1, 3]), np.array([0, 0, 0]))  # a gap in one sequence
    with pytest.raises(NumoeError, match="consecutive positions in one run"):
        _chunks(np.array([0, 0, 1]), np.array([0, 1, 0]))  # sequence 0 in two runs
