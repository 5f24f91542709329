"""What a worker counts on its hot path: plain numbers, exported elsewhere (metrics at the edge).

`WorkerCounters` is cumulative over the worker's life; `TimedBackend` puts a Backend's call
times into it, so the forward pass itself carries no timing code.
"""

from __future__ import annotations

from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.backends.base import Activation, Backend, WeightData

if TYPE_CHECKING:
    from worker.layers.attention import KVCache, LatentCache
    from worker.layers.rope import RopeTable


@dataclass
class WorkerCounters:
    """Cumulative counters of one worker (one ShardRunner)."""

    # int64 [n_layers, n_experts]: (token, slot) pairs the router sent to each global expert of
    # each layer. Routing is replicated, so every worker of a stage counts every pair of the
    # stage's layers (whether it holds the expert or not): rows sum to tokens * experts used,
    # the stage's workers hold equal counts, and rows of other stages' layers stay 0.
    expert_tokens: np.ndarray
    forward_calls: int = 0
    tokens: int = 0  # tokens through the forward pass (prompt and decode)
    # Bytes of weights the forward passes read: every matrix slice multiplied, each norm and
    # router vector, the embedding rows looked up (distinct tokens) and, for routed experts,
    # the bytes of the distinct local experts the step's tokens used.
    weight_bytes_read: int = 0
    kernel_seconds: float = 0.0  # wall time inside backend calls
    all_reduce_seconds: float = 0.0  # wall time inside all_reduce, waiting for peers included
    all_reduce_calls: int = 0

    @classmethod
    def for_model(cls, n_layers: int, n_experts: int) -> WorkerCounters:
        return cls(expert_tokens=np.zeros((n_layers, n_experts), np.int64))


class TimedBackend(Backend):
    """Delegates every call to `inner`, adding its wall time to counters.kernel_seconds."""

    def __init__(self, inner: Backend, counters: WorkerCounters) -> None:
        self.inner = inner
        self.counters = counters
        self.name = inner.name
        self.dtype = inner.dtype
        self.kv_cache_dtypes = inner.kv_cache_dtypes

    def load_weight(self, tensor: WeightData) -> Any:
        return self.inner.load_weight(tensor)

    def load_vector(self, tensor: WeightData) -> np.ndarray:
        return self.inner.load_vector(tensor)

    # Each call is timed inline (no shared helper): a decode step makes ~14 backend calls per
    # layer, and an extra Python frame per call measurably slows a small model's decode.

    def matmul(self, weight: Any, x: np.ndarray) -> np.ndarray:
        started = perf_counter()
        out = self.inner.matmul(weight, x)
        self.counters.kernel_seconds += perf_counter() - started
        return out

    def gated_ffn(self, x: np.ndarray, gate: Any, up: Any, down: Any,
                  activation: Activation) -> np.ndarray:
        started = perf_counter()
        out = self.inner.gated_ffn(x, gate, up, down, activation)
        self.counters.kernel_seconds += perf_counter() - started
        return out

    def moe(self, x: np.ndarray, expert_ids: np.ndarray, expert_weights: np.ndarray, gate: Any,
            up: Any, down: Any, activation: Activation) -> np.ndarray:
        started = perf_counter()
        out = self.inner.moe(x, expert_ids, expert_weights, gate, up, down, activation)
        self.counters.kernel_seconds += perf_counter() - started
        return out

    # The batch-invariant forms go to the inner backend's own (native: one call each); the
    # Backend defaults would loop over rows through this wrapper's plain products instead.

    def matmul_rows(self, weight: Any, x: np.ndarray) -> np.ndarray:
        started = perf_counter()
        out = self.inner.matmul_rows(weight, x)
        self.counters.kernel_seconds += perf_counter() - started
        return out

    def gated_ffn_rows(self, x: np.ndarray, gate: Any, up: Any, down: Any,
                       activation: Activation) -> np.ndarray:
        started = perf_counter()
        out = self.inner.gated_ffn_rows(x, gate, up, down, activation)
        self.counters.kernel_seconds += perf_counter() - started
        return out

    def moe_rows(self, x: np.ndarray, expert_ids: np.ndarray, expert_weights: np.ndarray,
                 gate: Any, up: Any, down: Any, activation: Activation) -> np.ndarray:
        started = perf_counter()
        out = self.inner.moe_rows(x, expert_ids, expert_weights, gate, up, down, activation)
        self.counters.kernel_seconds += perf_counter() - started
        return out

    def embedding(self, weight: Any, token_ids: np.ndarray) -> np.ndarray:
        started = perf_counter()
        out = self.inner.embedding(weight, token_ids)
        self.counters.kernel_seconds += perf_counter() - started
        return out

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float,
                 residual: np.ndarray | None = None, out: np.ndarray | None = None
                 ) -> np.ndarray:
        started = perf_counter()
        result = self.inner.rms_norm(x, weight, eps, residual, out)
        self.counters.kernel_seconds += perf_counter() - started
        return result

    def rope(self, q: np.ndarray, k: np.ndarray, table: RopeTable, start: int
             ) -> tuple[np.ndarray, np.ndarray]:
        started = perf_counter()
        rotated = self.inner.rope(q, k, table, start)
        self.counters.kernel_seconds += perf_counter() - started
        return rotated

    def attention(self, q: np.ndarray, k_new: np.ndarray, v_new: np.ndarray, cache: KVCache,
                  layer: int, start: int, scale: float, sliding_window: int) -> np.ndarray:
        started = perf_counter()
        out = self.inner.attention(q, k_new, v_new, cache, layer, start, scale, sliding_window)
        self.counters.kernel_seconds += perf_counter() - started
        return out

    def matmul_heads(self, weight: Any, x: np.ndarray) -> np.ndarray:
        started = perf_counter()
        out = self.inner.matmul_heads(weight, x)
        self.counters.kernel_seconds += perf_counter() - started
        return out

    def matmul_heads_rows(self, weight: Any, x: np.ndarray) -> np.ndarray:
        started = perf_counter()
        out = self.inner.matmul_heads_rows(weight, x)
        self.counters.kernel_seconds += perf_counter() - started
        return out

    def attention_latent(self, q: np.ndarray, latent_new: np.ndarray, cache: LatentCache,
                         layer: int, start: int, scale: float, value_dim: int) -> np.ndarray:
        started = perf_counter()
        out = self.inner.attention_latent(q, latent_new, cache, layer, start, scale, value_dim)
        self.counters.kernel_seconds += perf_counter() - started
        return out
