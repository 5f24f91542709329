"""The single-process forward pass: the whole model on one worker.

A ModelRunner is a ShardRunner (worker/shard_runner.py) over a one-worker plan: every tensor
whole, no all-reduce, one stage that embeds the tokens and computes every logit. Its weights
are zero-copy views into the GGUF mapping, so there is one forward pass in the codebase, whether
one process runs the model or a cluster does. The mapping's pages are filled at load
(GGUFFile.populate), as llama.cpp's loader does, so that no early token pays the page faults of
the experts it is the first to use.

A prompt is one batch (matrix-matrix products); decode is T = 1 (matrix-vector). The KV cache
is in the backend's dtype or, on request, float16. With n_slots > 1 it runs several sequences
at once (forward_batch; worker/batch.py), each sequence's results independent of the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from numpy.typing import DTypeLike

from cluster.gguf import GGUFFile
from cluster.model import ModelConfig, TensorMap
from cluster.placement import ModelSpec, Plan, PlanOptions, make_plan
from cluster.protocol import ReduceSite
from cluster.topology import Host, NumaNode, Topology
from worker.backends.base import Backend, WeightData
from worker.batch import SequenceChunk, check_chunks
from worker.counters import WorkerCounters
from worker.layers.attention import KVCache
from worker.shard_runner import ShardRunner

# The in-process runner maps the file and lets the OS page it: memory is not the plan's to
# refuse here, so its one node is given room for any model.
_UNPLANNED_MEMORY_BYTES = 1 << 62


def weight_data(gguf: GGUFFile, tensors: TensorMap, name: str) -> WeightData:
    """Tensor `name` whole, as a zero-copy view into the file's mapping."""
    info = tensors[name]
    return WeightData(info.name, info.ggml_type, tuple(info.shape), gguf.tensor_data(info.name))


def single_worker_plan(config: ModelConfig, tensors: TensorMap, n_ctx: int) -> Plan:
    """The plan of one worker holding every tensor whole (one host, one node)."""
    node = NumaNode(node_id=0, cpus=(0,), memory_bytes=_UNPLANNED_MEMORY_BYTES)
    topology = Topology(hosts=(Host(name="local", nodes=(node,)),))
    return make_plan(ModelSpec(config, tensors), topology, PlanOptions(ctx=n_ctx))


def _no_reduce(partial: np.ndarray, site: ReduceSite, layer: int) -> np.ndarray:
    """One worker's partial sum is the full sum (never called: a one-worker plan splits
    nothing)."""
    return partial


class ModelRunner:
    """Runs sequences in n_slots KV-cache slots: `forward` appends tokens of slot 0 at
    `start` and returns their logits; `forward_batch` appends chunks of several slots."""

    def __init__(self, config: ModelConfig, tensors: TensorMap, gguf: GGUFFile,
                 backend: Backend, n_ctx: int, kv_cache_dtype: DTypeLike | None = None,
                 n_slots: int = 1, populate: bool = True) -> None:
        """kv_cache_dtype: the backend's dtype when None; float16 halves the cache and rounds
        keys and values as llama.cpp's default F16 cache does. n_slots: sequences kept at
        once, each with its own n_ctx-token KV cache. populate: map the file's pages now
        (GGUFFile.populate, as llama.cpp's loader does), so no token pays their first faults."""
        self.config = config
        self.backend = backend
        self.n_ctx = n_ctx
        self.n_slots = n_slots
        self.plan = single_worker_plan(config, tensors, n_ctx)
        weights = {tensor.name: weight_data(gguf, tensors, tensor.name)
                   for tensor in self.plan.tensors}
        self.shard = ShardRunner(config, self.plan, 0, weights, backend, n_ctx, _no_reduce,
                                 kv_cache_dtype, n_slots)
        if populate:
            gguf.populate()

    @property
    def cache(self) -> KVCache:
        return self.shard.cache

    @property
    def counters(self) -> WorkerCounters:
        return self.shard.counters

    def forward(self, token_ids: list[int] | np.ndarray, start: int,
                logits: Literal["last", "all"] = "last") -> np.ndarray:
        """Logits for the new tokens: [1, vocab] for the last one, or [T, vocab] for all."""
        return self.shard.forward(start, token_ids=np.asarray(token_ids, dtype=np.int64),
                                  logits=logits)

    def forward_batch(self, chunks: Sequence[SequenceChunk]) -> np.ndarray:
        """Logits of each chunk's last token, float32 [len(chunks), vocab], each row exactly
        what that sequence gives in a call of its own (the batch-invariant products,
        worker/batch.py). A chunk starting at 0 reuses its slot for a new sequence."""
        check_chunks(chunks, self.n_slots, self.n_ctx, self.config.vocab_size)
        ids = np.fromiter((t for c in chunks for t in c.token_ids), np.int64)  # [sum T]
        out = self.shard.forward_batch([c.slot for c in chunks], [c.start for c in chunks],
                                       [len(c.token_ids) for c in chunks], token_ids=ids,
                                       rows=True)  # [n_chunks, vocab]
        return np.asarray(out, dtype=np.float32)
