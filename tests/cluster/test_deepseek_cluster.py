"""The tiny DeepSeek-V3 through two tensor-parallel Ray workers (this machine as 2 virtual NUMA
nodes, one thread each): MLA split by heads with the latent cache on both workers, shared and
routed experts split, the grouped sigmoid router replicated. Its greedy tokens are transformers'
(float64, independent of numoe) and its logits the single process's within float rounding."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest

from cluster.cluster_cli import ClusterOptions, cluster_runner_factory
from cluster.engine import Engine
from tests.cluster.conftest import N_CTX, RayTestCluster, greedy, prompt_ids, relative_error
from tests.reference.tiny_models import TinyModel, reference_greedy

pytestmark = pytest.mark.slow
F32_BOUND = 1e-5  # max |diff| / max |ref|: only the order of the partial sums differs
N_GREEDY = 32


@pytest.fixture(scope="module")
def cluster_engine(ray_cluster: RayTestCluster, tiny_deepseek: TinyModel) -> Iterator[Engine]:
    """The engine as `numoe generate --virtual-numa 2 -t 1` builds it."""
    factory = cluster_runner_factory(ClusterOptions(virtual_numa=2, threads_per_worker=1),
                                     notes=io.StringIO())
    engine = Engine(tiny_deepseek.gguf["f32"], n_ctx=N_CTX, runner_factory=factory)
    yield engine
    engine.close()


def test_plan_splits_mla_by_heads(cluster_engine: Engine) -> None:
    plan = cluster_engine.runner.plan
    assert [w.kv_heads for w in plan.workers] == [(0, 2), (2, 4)]  # 4 heads, 2 each
    assert plan.block_is_split(0, 0, "attention")
    config = cluster_engine.config
    per_token = config.n_layers * config.kv_cache_width * 2  # f16 cache: latent + rope key
    assert all(w.kv_bytes_per_token == per_token for w in plan.workers)


def test_greedy_tokens_match_transformers(cluster_engine: Engine,
                                          tiny_deepseek: TinyModel) -> None:
    prompt = prompt_ids(1, 8)
    ours, _ = greedy(cluster_engine.runner.forward, prompt, N_GREEDY)
    assert ours == reference_greedy(tiny_deepseek, prompt, N_GREEDY)


def test_logits_match_single_process(cluster_engine: Engine, tiny_deepseek: TinyModel) -> None:
    reference = Engine(tiny_deepseek.gguf["f32"], backend="cpu", n_threads=1, n_ctx=N_CTX)
    try:
        prompt = prompt_ids(2)
        ours, our_logits = greedy(cluster_engine.runner.forward, prompt, 8)
        expected, expected_logits = greedy(reference.runner.forward, prompt, 8)
    finally:
        reference.close()
    assert ours == expected
    assert relative_error(our_logits, expected_logits) <= F32_BOUND
