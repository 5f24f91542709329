"""Prometheus at the edge: plain stats in, exposition text out.

The engine loop fills a `ServingStats` (no Prometheus types on the hot path) and the
coordinator's `ClusterRunner.worker_stats()` returns each worker's cumulative counters;
`MetricsExporter.update()` turns both into metrics on its own registry and `render()` gives the
text a `/metrics` endpoint serves:

    exporter = MetricsExporter(model_name="qwen3-30b-a3b", backend="cpu")
    exporter.update(serving, runner.worker_stats(), now=time.monotonic())
    body = exporter.render()  # bytes, content type prometheus_client.CONTENT_TYPE_LATEST

Serving metrics carry vLLM's names (under `numoe:` instead of `vllm:`), label `model_name` and
bucket boundaries, so vLLM dashboards work with the prefix changed. Worker metrics are ours.

Every input is cumulative or drained, so `update()` may run as often as wanted without double
counting: cumulative values are fed to counters as deltas from the last value seen (a value
that went down means the source restarted from zero: the whole new value is the delta, as
Prometheus' own rate() treats a counter reset); observation lists are emptied as they are read.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

PREFIX = "numoe:"

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py), in seconds.
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                  5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                         2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                             40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# One all-reduce of a [T, H] partial: ~10 us (shared memory, decode) to ~100 ms (tcp, prompt).
ALL_REDUCE_BUCKETS_S = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2,
                        2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0)

WORKER_LABELS = ("rank", "host", "numa_node")


@dataclass
class ServingStats:
    """What the engine loop counts. Counts are cumulative over the server's life; the
    observation lists are appended to by the loop and drained by `MetricsExporter.update()`
    (call it from the loop's thread, or hold the loop's lock: update() reads the first n items
    and deletes exactly those, so an append racing with it is kept for the next update)."""

    num_requests_running: int = 0
    num_requests_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV cache blocks in use, 0..1 (vLLM's "perc" too)
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    # Finished requests by reason, vLLM's values: "stop", "length", "abort".
    request_success_total: dict[str, int] = field(default_factory=dict)
    time_to_first_token_seconds: list[float] = field(default_factory=list)
    inter_token_latency_seconds: list[float] = field(default_factory=list)
    e2e_request_latency_seconds: list[float] = field(default_factory=list)
    request_queue_time_seconds: list[float] = field(default_factory=list)


class _Deltas:
    """Turns cumulative values into increments: the last value seen per key."""

    def __init__(self) -> None:
        self._last: dict[Any, float] = {}

    def delta(self, key: Any, value: float) -> float:
        last = self._last.get(key)
        self._last[key] = value
        if last is None or value < last:  # first sight, or the source restarted from zero
            return value
        return value - last


@dataclass
class _MeanHistogram:
    """A histogram fed n observations at a time, all at their mean (non-cumulative buckets)."""

    bucket_counts: np.ndarray  # int64 [len(bounds) + 1], the last one is +Inf
    total_s: float = 0.0
    count: int = 0


class _ArrayCollector:
    """Collects the metrics kept as arrays rather than prometheus_client children: tokens per
    expert per layer (up to n_layers x n_experts series: a per-child Python object each would
    make update() slow) and the all-reduce histograms (fed in bulk, see update())."""

    def __init__(self, model_name: str, export_expert_tokens: bool) -> None:
        self.model_name = model_name
        self.export_expert_tokens = export_expert_tokens
        self.expert_tokens: np.ndarray | None = None  # float64 [n_layers, n_experts]
        self.all_reduce: dict[tuple[str, str, str], _MeanHistogram] = {}

    def collect(self) -> Iterator[Metric]:
        experts = CounterMetricFamily(
            f"{PREFIX}expert_tokens",
            "(token, slot) pairs the router sent to each expert of each layer.",
            labels=["model_name", "layer", "expert"])
        if self.expert_tokens is not None and self.export_expert_tokens:
            for layer, expert in zip(*np.nonzero(self.expert_tokens), strict=True):
                experts.add_metric([self.model_name, str(layer), str(expert)],
                                   float(self.expert_tokens[layer, expert]))
        yield experts

        reduce = HistogramMetricFamily(
            f"{PREFIX}worker_all_reduce_seconds",
            "Wall time of one all-reduce, waiting for peers included. Approximate: each update "
            "adds its new calls at their mean time (workers count a sum and a call count).",
            labels=["model_name", *WORKER_LABELS])
        for labels, hist in self.all_reduce.items():
            cumulative = np.cumsum(hist.bucket_counts)
            buckets = [(floatToGoString(bound), float(n))
                       for bound, n in zip(ALL_REDUCE_BUCKETS_S, cumulative[:-1], strict=True)]
            buckets.append(("+Inf", float(cumulative[-1])))
            reduce.add_metric([self.model_name, *labels], buckets, hist.total_s)
        yield reduce


class MetricsExporter:
    """Serving and worker metrics on one registry (a fresh one unless given)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, model_name: str,
                 backend: str = "unknown", export_expert_tokens: bool = True) -> None:
        """backend: WorkerOptions.backend, the label of kernel seconds (a worker's stats do
        not name it; a "backend" key in them wins). export_expert_tokens: False drops the
        per-expert counter, n_layers x n_experts series (61 x 256 = 15,616 for DeepSeek-V3:
        fine for a Prometheus server, ~1 MB per scrape)."""
        self.registry = registry if registry is not None else CollectorRegistry()
        self.model_name = model_name
        self.backend = backend
        self._deltas = _Deltas()
        self._known_workers: dict[int, tuple[str, str, str]] = {}  # rank -> labels
        self._expert_last: dict[int, np.ndarray] = {}  # rank -> cumulative [L, E] last seen
        self._arrays = _ArrayCollector(model_name, export_expert_tokens)
        self.registry.register(self._arrays)
        self._make_serving_metrics()
        self._make_worker_metrics()

    def _make_serving_metrics(self) -> None:
        model = ["model_name"]
        r = self.registry
        self.num_requests_running = Gauge(
            f"{PREFIX}num_requests_running", "Number of requests in model execution batches.",
            model, registry=r)
        self.num_requests_waiting = Gauge(
            f"{PREFIX}num_requests_waiting", "Number of requests waiting to be processed.",
            model, registry=r)
        self.kv_cache_usage_perc = Gauge(
            f"{PREFIX}kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
            model, registry=r)
        self.prompt_tokens = Counter(
            f"{PREFIX}prompt_tokens", "Number of prefill tokens processed.", model, registry=r)
        self.generation_tokens = Counter(
            f"{PREFIX}generation_tokens", "Number of generation tokens processed.", model,
            registry=r)
        self.request_success = Counter(
            f"{PREFIX}request_success", "Count of successfully processed requests.",
            [*model, "finished_reason"], registry=r)
        self.time_to_first_token = Histogram(
            f"{PREFIX}time_to_first_token_seconds", "Histogram of time to first token in seconds.",
            model, buckets=TTFT_BUCKETS_S, registry=r)
        self.inter_token_latency = Histogram(
            f"{PREFIX}inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.", model,
            buckets=INTER_TOKEN_BUCKETS_S, registry=r)
        self.e2e_request_latency = Histogram(
            f"{PREFIX}e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.", model,
            buckets=REQUEST_LATENCY_BUCKETS_S, registry=r)
        self.request_queue_time = Histogram(
            f"{PREFIX}request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.", model,
            buckets=REQUEST_LATENCY_BUCKETS_S, registry=r)

    def _make_worker_metrics(self) -> None:
        labels = ["model_name", *WORKER_LABELS]
        r = self.registry
        self.worker_up = Gauge(
            f"{PREFIX}worker_up", "1 if the worker answered the last stats call, else 0.",
            labels, registry=r)
        self.worker_last_seen = Gauge(
            f"{PREFIX}worker_last_seen_timestamp_seconds",
            "The `now` of the last update in which the worker answered.", labels, registry=r)
        # Busy bandwidth: bytes over step time, not over wall time between updates, so an idle
        # server shows what its steps reach (comparable with the node's measured bandwidth)
        # rather than ~0. The two counters below give the wall-time rate via rate().
        self.weight_read_bandwidth = Gauge(
            f"{PREFIX}worker_weight_read_bytes_per_second",
            "Weight bytes read per second of step time, over the steps since the last update "
            "(kept from the last update that had steps).", labels, registry=r)
        self.weight_bytes_read = Counter(
            f"{PREFIX}worker_weight_bytes_read", "Bytes of weights the forward passes read.",
            labels, registry=r)
        self.step_seconds = Counter(
            f"{PREFIX}worker_step_seconds", "Wall time of steps: compute and sends.", labels,
            registry=r)
        self.kernel_seconds = Counter(
            f"{PREFIX}worker_kernel_seconds", "Wall time inside backend (kernel) calls.",
            [*labels, "backend"], registry=r)
        self.expert_imbalance = Gauge(
            f"{PREFIX}expert_load_imbalance",
            "max / mean of tokens routed per expert of a layer, since start (1 = balanced).",
            ["model_name", "layer"], registry=r)

    # --- update ---------------------------------------------------------------------------

    def update(self, serving: ServingStats, worker_stats: Sequence[dict[str, Any]] | None,
               now: float) -> None:
        """Fold in the serving stats (draining its observation lists) and, unless
        worker_stats is None (no cluster this time: worker metrics left as they are), each
        worker's stats as ClusterRunner.worker_stats() returns them; a worker seen before and
        missing now is marked down."""
        self._update_serving(serving)
        if worker_stats is not None:
            self._update_workers(worker_stats, now)

    def render(self) -> bytes:
        """The text exposition of this exporter's registry."""
        return generate_latest(self.registry)

    def _update_serving(self, s: ServingStats) -> None:
        model = self.model_name
        self.num_requests_running.labels(model).set(s.num_requests_running)
        self.num_requests_waiting.labels(model).set(s.num_requests_waiting)
        self.kv_cache_usage_perc.labels(model).set(s.kv_cache_usage)
        self.prompt_tokens.labels(model).inc(
            self._deltas.delta("prompt_tokens", s.prompt_tokens_total))
        self.generation_tokens.labels(model).inc(
            self._deltas.delta("generation_tokens", s.generation_tokens_total))
        for reason, total in s.request_success_total.items():
            self.request_success.labels(model, reason).inc(
                self._deltas.delta(("request_success", reason), total))
        for histogram, observations in (
                (self.time_to_first_token, s.time_to_first_token_seconds),
                (self.inter_token_latency, s.inter_token_latency_seconds),
                (self.e2e_request_latency, s.e2e_request_latency_seconds),
                (self.request_queue_time, s.request_queue_time_seconds)):
            child = histogram.labels(model)
            n = len(observations)
            for value in observations[:n]:
                child.observe(value)
            del observations[:n]

    def _update_workers(self, worker_stats: Sequence[dict[str, Any]], now: float) -> None:
        model = self.model_name
        seen: set[int] = set()
        expert_deltas: list[np.ndarray] = []
        for stats in worker_stats:
            rank = int(stats["rank"])
            labels = (str(rank), str(stats["host"]), str(stats["numa_node"]))
            seen.add(rank)
            self._known_workers[rank] = labels
            self.worker_up.labels(model, *labels).set(1)
            self.worker_last_seen.labels(model, *labels).set(now)
            step_s = self._deltas.delta((rank, "step_seconds"), float(stats["step_seconds"]))
            self.step_seconds.labels(model, *labels).inc(step_s)
            forward = stats.get("forward")
            if forward is None:  # not loaded yet: no forward counters
                continue
            read = self._deltas.delta((rank, "weight_bytes_read"),
                                      float(forward["weight_bytes_read"]))
            self.weight_bytes_read.labels(model, *labels).inc(read)
            if step_s > 0:
                self.weight_read_bandwidth.labels(model, *labels).set(read / step_s)
            backend = str(stats.get("backend", self.backend))
            self.kernel_seconds.labels(model, *labels, backend).inc(
                self._deltas.delta((rank, "kernel_seconds"), float(forward["kernel_seconds"])))
            self._add_all_reduce(rank, labels, forward)
            expert_deltas.append(self._expert_delta(rank, forward["expert_tokens"]))
        for rank, labels in self._known_workers.items():
            if rank not in seen:
                self.worker_up.labels(model, *labels).set(0)
        self._add_expert_tokens(expert_deltas)

    def _add_all_reduce(self, rank: int, labels: tuple[str, str, str],
                        forward: dict[str, Any]) -> None:
        """Workers count only a sum of seconds and a number of calls, so the calls since the
        last update all go in the bucket of their mean: count and sum are exact, the spread
        within one update interval is lost (at a 5 s interval, ~thousands of decode calls)."""
        seconds = self._deltas.delta((rank, "all_reduce_seconds"),
                                     float(forward["all_reduce_seconds"]))
        calls = int(self._deltas.delta((rank, "all_reduce_calls"),
                                       float(forward["all_reduce_calls"])))
        hist = self._arrays.all_reduce.get(labels)
        if hist is None:
            hist = _MeanHistogram(np.zeros(len(ALL_REDUCE_BUCKETS_S) + 1, np.int64))
            self._arrays.all_reduce[labels] = hist
        if calls <= 0:
            return
        # Buckets are "le": a mean equal to a bound belongs to that bound's bucket.
        hist.bucket_counts[bisect.bisect_left(ALL_REDUCE_BUCKETS_S, seconds / calls)] += calls
        hist.total_s += seconds
        hist.count += calls

    def _expert_delta(self, rank: int, expert_tokens: Any) -> np.ndarray:
        current = np.asarray(expert_tokens, np.float64)  # [n_layers, n_experts]
        last = self._expert_last.get(rank)
        self._expert_last[rank] = current
        if last is None or last.shape != current.shape or np.any(current < last):
            return current  # first sight, or the worker restarted from zero
        return current - last

    def _add_expert_tokens(self, deltas: list[np.ndarray]) -> None:
        """Routing is replicated within a stage: each worker of a stage counts every routed
        pair of the stage's layers and rows of other stages' layers stay 0, so the elementwise
        max over workers is the cluster's count (a sum would multiply by the stage's width).
        Caveat: a worker missing from one update and back (not restarted) in the next brings
        the missed interval again, which its stage peers already gave: counted twice."""
        if not deltas:
            return
        shapes = {d.shape for d in deltas}
        if len(shapes) != 1:
            return  # workers of different models: nothing sensible to add
        step = np.maximum.reduce(deltas)  # [n_layers, n_experts]
        arrays = self._arrays
        if arrays.expert_tokens is None or arrays.expert_tokens.shape != step.shape:
            arrays.expert_tokens = np.zeros_like(step)
        arrays.expert_tokens += step
        totals = arrays.expert_tokens
        means = totals.mean(axis=1)  # [n_layers]
        for layer in np.nonzero(means > 0)[0]:
            self.expert_imbalance.labels(self.model_name, str(layer)).set(
                float(totals[layer].max() / means[layer]))
