"""MetricsExporter: the rendered text is read back with prometheus_client's own parser and
every value is recomputed here from the inputs (numpy float64), across several updates.

Worker stats are built the way worker/worker.py's `_stats` builds them: the data-plane
counters and the ShardRunner's WorkerCounters through dataclasses.asdict, arrays as lists.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from cluster.metrics import (
    ALL_REDUCE_BUCKETS_S,
    INTER_TOKEN_BUCKETS_S,
    REQUEST_LATENCY_BUCKETS_S,
    TTFT_BUCKETS_S,
    MetricsExporter,
    ServingStats,
)
from worker.allreduce import ReduceStats
from worker.counters import WorkerCounters
from worker.worker import _DataPlaneCounters

MODEL = "tiny-moe"
N_LAYERS, N_EXPERTS = 4, 8
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: bytes) -> tuple[Samples, dict[str, str]]:
    """Every sample by (name, labels), and each family's type by family name."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text.decode()):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, types


def get(samples: Samples, name: str, **labels: Any) -> float:
    return samples[(name, frozenset((k, str(v)) for k, v in labels.items()))]


class FakeWorker:
    """One worker's cumulative counters, grown step by step like a running worker's."""

    def __init__(self, rank: int, host: str, node: int, stage: int, tp_rank: int) -> None:
        self.identity = {"rank": rank, "host": host, "numa_node": node, "stage": stage,
                         "tp_rank": tp_rank}
        self.counters = _DataPlaneCounters()
        self.forward = WorkerCounters.for_model(N_LAYERS, N_EXPERTS)
        self.reduce = ReduceStats()

    def stats(self) -> dict[str, Any]:
        # As worker.py's _stats: identity, data-plane counters, "forward" lists, "reduce".
        out: dict[str, Any] = {**self.identity, **asdict(self.counters)}
        out["forward"] = {key: value.tolist() if isinstance(value, np.ndarray) else value
                          for key, value in asdict(self.forward).items()}
        out["reduce"] = asdict(self.reduce)
        return out


def make_workers() -> list[FakeWorker]:
    """Stage 0 (layers 0-1) on two NUMA nodes of host a, stage 1 (layers 2-3) on host b."""
    return [FakeWorker(0, "a", 0, 0, 0), FakeWorker(1, "a", 1, 0, 1), FakeWorker(2, "b", 0, 1, 0)]


def run_steps(workers: list[FakeWorker], rng: np.random.Generator) -> None:
    """Some steps: routing counts are the same on the workers of a stage (it is replicated),
    and only in the stage's own layers."""
    for stage, layers in ((0, slice(0, 2)), (1, slice(2, 4))):
        routed = rng.integers(0, 50, size=(2, N_EXPERTS))  # [layers of stage, E]
        for w in workers:
            if w.identity["stage"] == stage:
                w.forward.expert_tokens[layers] += routed
    for w in workers:
        w.counters.steps += 3
        w.counters.step_seconds += float(rng.uniform(0.1, 1.0))
        w.forward.weight_bytes_read += int(rng.integers(1 << 20, 1 << 30))
        w.forward.kernel_seconds += float(rng.uniform(0.05, 0.5))
        calls = int(rng.integers(1, 40))
        w.forward.all_reduce_calls += calls
        w.forward.all_reduce_seconds += calls * float(rng.uniform(1e-5, 1e-2))


def worker_labels(w: FakeWorker) -> dict[str, Any]:
    return {"model_name": MODEL, "rank": w.identity["rank"], "host": w.identity["host"],
            "numa_node": w.identity["numa_node"]}


def test_serving_counters_and_gauges_follow_cumulative_stats() -> None:
    exporter = MetricsExporter(model_name=MODEL)
    serving = ServingStats(num_requests_running=3, num_requests_waiting=7, kv_cache_usage=0.25,
                           prompt_tokens_total=120, generation_tokens_total=40,
                           request_success_total={"stop": 2, "length": 1})
    exporter.update(serving, None, now=1.0)
    exporter.update(serving, None, now=2.0)  # nothing new: counters must not move
    samples, types = parse(exporter.render())
    assert types["numoe:prompt_tokens"] == "counter"
    assert types["numoe:num_requests_running"] == "gauge"
    assert get(samples, "numoe:prompt_tokens_total", model_name=MODEL) == 120
    assert get(samples, "numoe:generation_tokens_total", model_name=MODEL) == 40
    assert get(samples, "numoe:request_success_total", model_name=MODEL,
               finished_reason="stop") == 2

    serving.num_requests_running, serving.num_requests_waiting = 1, 0
    serving.kv_cache_usage = 0.5
    serving.prompt_tokens_total += 33
    serving.generation_tokens_total += 9
    serving.request_success_total["stop"] += 4
    serving.request_success_total["abort"] = 1
    exporter.update(serving, None, now=3.0)
    samples, _ = parse(exporter.render())
    assert get(samples, "numoe:num_requests_running", model_name=MODEL) == 1
    assert get(samples, "numoe:num_requests_waiting", model_name=MODEL) == 0
    assert get(samples, "numoe:kv_cache_usage_perc", model_name=MODEL) == 0.5
    assert get(samples, "numoe:prompt_tokens_total", model_name=MODEL) == 153
    assert get(samples, "numoe:generation_tokens_total", model_name=MODEL) == 49
    for reason, total in serving.request_success_total.items():
        assert get(samples, "numoe:request_success_total", model_name=MODEL,
                   finished_reason=reason) == total


@pytest.mark.parametrize(("field", "name", "bounds"), [
    ("time_to_first_token_seconds", "numoe:time_to_first_token_seconds", TTFT_BUCKETS_S),
    ("inter_token_latency_seconds", "numoe:inter_token_latency_seconds", INTER_TOKEN_BUCKETS_S),
    ("e2e_request_latency_seconds", "numoe:e2e_request_latency_seconds",
     REQUEST_LATENCY_BUCKETS_S),
    ("request_queue_time_seconds", "numoe:request_queue_time_seconds",
     REQUEST_LATENCY_BUCKETS_S),
])
def test_serving_histograms_drain_observations(field: str, name: str,
                                               bounds: tuple[float, ...]) -> None:
    rng = np.random.default_rng(1)
    exporter = MetricsExporter(model_name=MODEL)
    serving = ServingStats()
    seen: list[float] = []
    for n in (17, 0, 5):  # the empty round checks an update without news adds nothing
        batch = list(rng.lognormal(np.log(bounds[len(bounds) // 2]), 2.0, size=n))
        batch.append(bounds[3])  # a value on a bound belongs to that bound's bucket (le)
        getattr(serving, field).extend(batch)
        seen += batch
        exporter.update(serving, None, now=0.0)
        assert getattr(serving, field) == []
    samples, types = parse(exporter.render())
    assert types[name] == "histogram"
    values = np.array(seen, np.float64)
    assert get(samples, f"{name}_count", model_name=MODEL) == len(values)
    assert get(samples, f"{name}_sum", model_name=MODEL) == pytest.approx(values.sum(), 1e-12)
    for bound in bounds:
        assert get(samples, f"{name}_bucket", model_name=MODEL, le=bound) == \
            np.count_nonzero(values <= bound), bound
    assert get(samples, f"{name}_bucket", model_name=MODEL, le="+Inf") == len(values)


def test_worker_metrics_from_deltas() -> None:
    rng = np.random.default_rng(7)
    workers = make_workers()
    exporter = MetricsExporter(model_name=MODEL, backend="cpu")
    serving = ServingStats()
    history: list[list[dict[str, Any]]] = []
    for round_ in range(3):
        run_steps(workers, rng)
        history.append([w.stats() for w in workers])
        exporter.update(serving, history[-1], now=100.0 + round_)
        exporter.update(serving, history[-1], now=100.0 + round_)  # same stats: no change
    samples, types = parse(exporter.render())
    assert types["numoe:worker_all_reduce_seconds"] == "histogram"
    assert types["numoe:expert_tokens"] == "counter"

    for i, w in enumerate(workers):
        labels = worker_labels(w)
        last, before = history[-1][i], history[-2][i]
        assert get(samples, "numoe:worker_up", **labels) == 1
        assert get(samples, "numoe:worker_last_seen_timestamp_seconds", **labels) == 102.0
        # Busy bandwidth over the last update interval: delta bytes / delta step seconds.
        bandwidth = ((last["forward"]["weight_bytes_read"]
                      - before["forward"]["weight_bytes_read"])
                     / (last["step_seconds"] - before["step_seconds"]))
        assert get(samples, "numoe:worker_weight_read_bytes_per_second", **labels) == \
            pytest.approx(bandwidth, rel=1e-12)
        assert get(samples, "numoe:worker_weight_bytes_read_total", **labels) == \
            last["forward"]["weight_bytes_read"]
        assert get(samples, "numoe:worker_step_seconds_total", **labels) == \
            pytest.approx(last["step_seconds"], rel=1e-12)
        assert get(samples, "numoe:worker_kernel_seconds_total", backend="cpu", **labels) == \
            pytest.approx(last["forward"]["kernel_seconds"], rel=1e-12)

        # All-reduce: each round's calls sit in the bucket of that round's mean time.
        calls = np.diff([0] + [h[i]["forward"]["all_reduce_calls"] for h in history])
        secs = np.diff([0.0] + [h[i]["forward"]["all_reduce_seconds"] for h in history])
        means = secs / calls
        assert get(samples, "numoe:worker_all_reduce_seconds_count", **labels) == calls.sum()
        assert get(samples, "numoe:worker_all_reduce_seconds_sum", **labels) == \
            pytest.approx(last["forward"]["all_reduce_seconds"], rel=1e-12)
        for bound in ALL_REDUCE_BUCKETS_S:
            assert get(samples, "numoe:worker_all_reduce_seconds_bucket", le=bound,
                       **labels) == calls[means <= bound].sum()

    # Tokens per expert: the cluster's count is one worker's per stage (not their sum).
    expected = np.zeros((N_LAYERS, N_EXPERTS), np.float64)
    expected[0:2] = np.array(history[-1][0]["forward"]["expert_tokens"])[0:2]  # stage 0, rank 0
    expected[2:4] = np.array(history[-1][2]["forward"]["expert_tokens"])[2:4]  # stage 1, rank 2
    for layer in range(N_LAYERS):
        for expert in range(N_EXPERTS):
            key = ("numoe:expert_tokens_total", frozenset({
                "model_name": MODEL, "layer": str(layer), "expert": str(expert)}.items()))
            assert samples.get(key, 0.0) == expected[layer, expert]
        imbalance = expected[layer].max() / expected[layer].mean()
        assert get(samples, "numoe:expert_load_imbalance", model_name=MODEL, layer=layer) == \
            pytest.approx(imbalance, rel=1e-12)


def test_missing_worker_is_down_and_its_counters_stay() -> None:
    rng = np.random.default_rng(3)
    workers = make_workers()
    exporter = MetricsExporter(model_name=MODEL, backend="numpy")
    run_steps(workers, rng)
    first = [w.stats() for w in workers]
    exporter.update(ServingStats(), first, now=1.0)
    run_steps(workers, rng)
    exporter.update(ServingStats(), [w.stats() for w in workers[:2]], now=2.0)  # rank 2 gone
    samples, _ = parse(exporter.render())
    for w in workers[:2]:
        assert get(samples, "numoe:worker_up", **worker_labels(w)) == 1
    gone = worker_labels(workers[2])
    assert get(samples, "numoe:worker_up", **gone) == 0
    assert get(samples, "numoe:worker_last_seen_timestamp_seconds", **gone) == 1.0
    assert get(samples, "numoe:worker_weight_bytes_read_total", **gone) == \
        first[2]["forward"]["weight_bytes_read"]

    # None: no cluster information this time, nothing about workers changes.
    exporter.update(ServingStats(), None, now=3.0)
    assert parse(exporter.render())[0] == samples


def test_restarted_worker_counts_from_zero() -> None:
    rng = np.random.default_rng(5)
    exporter = MetricsExporter(model_name=MODEL)
    old = make_workers()
    run_steps(old, rng)
    run_steps(old, rng)
    exporter.update(ServingStats(), [w.stats() for w in old], now=1.0)
    new = make_workers()  # same ranks, counters back at zero
    run_steps(new, rng)
    exporter.update(ServingStats(), [w.stats() for w in new], now=2.0)
    samples, _ = parse(exporter.render())
    for o, n in zip(old, new, strict=True):
        assert get(samples, "numoe:worker_weight_bytes_read_total", **worker_labels(o)) == \
            o.forward.weight_bytes_read + n.forward.weight_bytes_read
    layer0 = old[0].forward.expert_tokens[0] + new[0].forward.expert_tokens[0]  # [E]
    assert get(samples, "numoe:expert_tokens_total", model_name=MODEL, layer=0, expert=5) == \
        layer0[5]


def test_exporters_keep_their_own_registry() -> None:
    global_before = {m.name for m in REGISTRY.collect()}
    registry = CollectorRegistry()
    a = MetricsExporter(registry, model_name="a")
    b = MetricsExporter(model_name="b")  # would raise on a shared registry (duplicate names)
    a.update(ServingStats(prompt_tokens_total=4), None, now=0.0)
    b.update(ServingStats(prompt_tokens_total=9), None, now=0.0)
    assert a.registry is registry
    assert get(parse(a.render())[0], "numoe:prompt_tokens_total", model_name="a") == 4
    assert get(parse(b.render())[0], "numoe:prompt_tokens_total", model_name="b") == 9
    assert {m.name for m in REGISTRY.collect()} == global_before


def test_expert_series_can_be_left_out() -> None:
    workers = make_workers()
    run_steps(workers, np.random.default_rng(9))
    exporter = MetricsExporter(model_name=MODEL, export_expert_tokens=False)
    exporter.update(ServingStats(), [w.stats() for w in workers], now=0.0)
    samples, _ = parse(exporter.render())
    assert not any(name == "numoe:expert_tokens_total" for name, _ in samples)
    assert any(name == "numoe:expert_load_imbalance" for name, _ in samples)


def test_all_reduce_mean_on_a_bound_falls_in_that_bucket() -> None:
    worker = make_workers()[0]
    bound = ALL_REDUCE_BUCKETS_S[5]
    worker.forward.all_reduce_calls = 4
    worker.forward.all_reduce_seconds = 4 * bound  # a power-of-2 multiple: mean == bound exactly
    exporter = MetricsExporter(model_name=MODEL)
    exporter.update(ServingStats(), [worker.stats()], now=0.0)
    samples, _ = parse(exporter.render())
    labels = worker_labels(worker)
    assert get(samples, "numoe:worker_all_reduce_seconds_bucket", le=bound, **labels) == 4
    assert get(samples, "numoe:worker_all_reduce_seconds_bucket", le=ALL_REDUCE_BUCKETS_S[4],
               **labels) == 0
