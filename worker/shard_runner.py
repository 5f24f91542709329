"""One worker's forward pass: its stage's layers, its slices of them, and the all-reduces between.

The placement plan (cluster/placement.py) says what this rank holds and `block_is_split` says
which blocks end in an all-reduce; nothing here re-derives the layout. A layer on one worker:

    x = attn_norm(hidden)
    attn = attention(x)              # this rank's kv-head group only: a partial sum [T, H]
                                     # (MLA: its query heads, worker/latent_attention.py)
    attn = all_reduce(attn)          # if the block is split: the full sum, same bits everywhere
    hidden = hidden + post_norm(attn)      (Gemma; plain hidden + attn otherwise)
    ... the same for the dense FFN or the routed experts plus any shared experts (the FFN
    reduce site; DeepSeek's first layers are dense).

The post-attention / post-FFN norms (Gemma) are norms of the full sum, so they run after the
reduce. The router is replicated: every rank of a stage routes the same tokens to the same
experts, and each computes its part (its slice of every expert's intermediate dimension, or,
expert parallel, its whole experts with the other ids masked to -1). A block the plan pins whole
to another rank contributes zeros here. The first stage embeds token ids; later stages take the
previous stage's hidden state; the last stage returns this rank's rows [v0, v1) of the logits.

One worker holding the whole model (a one-worker plan, no reduces) is the single-process engine
(worker/model_runner.py), so there is one forward pass in the codebase.

Continuous batching (worker/batch.py): the runner keeps n_slots KV caches, and
`forward_batch` runs several sequences' chunks at once: all their rows go through each weight
product together, and attention runs per chunk against its own slot. A call is one chunk of
any length, or several one-token chunks (decode steps), whose rows then take the batch-invariant
products (Backend.*_rows), so each row's result is what that decode step gives alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import DTypeLike

from cluster.errors import NumoeError, UnsupportedArchitectureError
from cluster.model import MLA_KV_B, MLA_SPLIT, SUPPORTED_ARCHITECTURES, ModelConfig
from cluster.placement import OUTPUT, OUTPUT_NORM, TOKEN_EMBEDDING, Plan, Shard
from cluster.protocol import ReduceSite
from worker.backends.base import Backend, WeightData
from worker.batch import Span, chunk_spans
from worker.counters import TimedBackend, WorkerCounters
from worker.latent_attention import MlaAttention, MlaWeightHandles, load_mla
from worker.layers.attention import KVCache, LatentCache
from worker.layers.ffn import RouterConfig, local_expert_ids, route
from worker.layers.rope import RopeTable
from worker.shard_loader import shard_shape

# partial [T, H], which block, layer -> the stage's full sum [T, H], identical on every rank
# (the caller binds the step id).
AllReduceFn = Callable[[np.ndarray, ReduceSite, int], np.ndarray]

# LayerWeights field -> the GGUF name of its vector in blk.N. (norms, the router and its bias).
_LAYER_VECTORS = {"attn_norm": "attn_norm.weight", "q_norm": "attn_q_norm.weight",
                  "k_norm": "attn_k_norm.weight", "post_attn_norm": "post_attention_norm.weight",
                  "ffn_norm": "ffn_norm.weight", "post_ffn_norm": "post_ffw_norm.weight",
                  "router": "ffn_gate_inp.weight", "router_bias": "exp_probs_b.bias"}
_REQUIRED_VECTORS = ("attn_norm", "ffn_norm")


@dataclass
class AttentionWeights:
    """This rank's kv-head group of one layer's attention."""

    q: Any  # [n_heads_local * d, H]
    k: Any  # [n_kv_local * d, H]
    v: Any  # [n_kv_local * dv, H]
    output: Any  # [H, n_heads_local * dv]
    n_heads: int  # query heads of the group
    n_kv_heads: int
    n_bytes: int  # bytes of q, k, v and output: read once per forward


@dataclass
class FfnWeights:
    """This rank's part of one layer's dense FFN or routed experts."""

    gate: Any  # dense [F', H] or experts [E', F', H]
    up: Any  # like gate
    down: Any  # dense [H, F'] or experts [E', H, F']
    experts: tuple[int, int] | None  # expert parallel: the global experts [e0, e1) held
    # Dense: bytes of gate, up and down (all read per forward). Routed: one local expert's
    # bytes (each distinct expert a step uses is read once).
    n_bytes: int
    routed: bool  # routed experts (else a dense FFN)
    # Shared experts beside the routed ones (DeepSeek: ffn_*_shexp), this rank's slice of
    # their intermediate dimension as (gate, up, down), read by every token.
    shared: tuple[Any, Any, Any] | None = None
    shared_bytes: int = 0


@dataclass
class LayerWeights:
    attn_norm: np.ndarray  # [H]
    q_norm: np.ndarray | None  # [d]
    k_norm: np.ndarray | None  # [d]
    post_attn_norm: np.ndarray | None  # [H] (Gemma)
    ffn_norm: np.ndarray  # [H]
    post_ffn_norm: np.ndarray | None  # [H] (Gemma)
    router: np.ndarray | None  # [E, H] (MoE)
    router_bias: np.ndarray | None  # [E]: DeepSeek-V3's score-correction bias (exp_probs_b)
    attention: AttentionWeights | MlaWeightHandles | None  # None: pinned to another rank
    ffn: FfnWeights | None  # None: the block is pinned to another rank
    split_attention: bool  # all-reduce the attention output over the stage
    split_ffn: bool  # all-reduce the FFN output over the stage
    vector_bytes: int  # norms and router, read once per forward


class ShardRunner:
    """Runs n_slots sequences on one worker: `forward` appends tokens of slot 0 at `start`,
    `forward_batch` appends chunks of several slots."""

    def __init__(self, config: ModelConfig, plan: Plan, rank: int,
                 weights: Mapping[str, WeightData], backend: Backend, n_ctx: int,
                 all_reduce: AllReduceFn, kv_cache_dtype: DTypeLike | None = None,
                 n_slots: int = 1) -> None:
        """weights: every tensor the plan gives `rank`, each of its slice's shape
        (worker/shard_loader.py). kv_cache_dtype: the backend's dtype when None; float16
        halves the cache and rounds as llama.cpp's default F16 cache does. n_slots: KV caches
        kept, one per sequence run at once (each n_ctx tokens)."""
        if n_slots < 1:
            raise NumoeError(f"n_slots is {n_slots}; a runner needs at least one KV-cache slot")
        if config.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"numoe can plan {config.architecture} models but not run them yet; run one of "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        if config.is_mla and type(backend).attention_latent is Backend.attention_latent:
            raise NumoeError(  # refused at load, not at the first token
                f"the {backend.name} backend cannot run multi-head latent attention yet, which "
                f"{config.architecture} models (DeepSeek, Kimi) need; use the cpu backend")
        cache_dtype = backend.dtype if kv_cache_dtype is None else np.dtype(kv_cache_dtype)
        if cache_dtype not in backend.kv_cache_dtypes:
            raise NumoeError(
                f"the {backend.name} backend cannot keep a {cache_dtype} KV cache; choose one "
                f"of: {', '.join(str(d) for d in backend.kv_cache_dtypes)}")
        self.config = config
        self.plan = plan
        self.rank = rank
        self.worker = plan.workers[rank]
        self.stage = plan.stages[self.worker.stage]
        self.n_ctx = n_ctx
        self.all_reduce = all_reduce
        self.n_slots = n_slots
        self.counters = WorkerCounters.for_model(config.n_layers, config.n_experts)
        self.backend: Backend = TimedBackend(backend, self.counters)
        self.is_first = self.stage.index == 0
        self.is_last = self.stage.index == len(plan.stages) - 1
        self.layer_range = range(*self.stage.layers)
        self._loader = _Loader(plan, rank, weights, self.backend)

        self.token_embd: Any = None  # [vocab, H], first stage
        self.embedding_row_bytes = 0
        if self.is_first:
            self.token_embd = self._loader.matrix(TOKEN_EMBEDDING)
            self.embedding_row_bytes = self._loader.n_bytes(TOKEN_EMBEDDING) // config.vocab_size
        self.output_norm: np.ndarray | None = None  # [H], last stage
        self.lm_head: Any = None  # [v1 - v0, H]: this rank's vocabulary rows, if any
        self.lm_head_bytes = 0
        if self.is_last:
            self.output_norm = self._loader.vector(OUTPUT_NORM)
            self.lm_head, self.lm_head_bytes = self._lm_head()

        self.mla_layout = MLA_KV_B if any(
            t.name.endswith("attn_kv_b.weight") for t in plan.tensors) else MLA_SPLIT
        self.layers = [self._layer_weights(layer) for layer in self.layer_range]
        self.router_config = RouterConfig(
            config.n_experts_used, config.expert_weights_norm, config.expert_weights_scale,
            config.expert_gating, config.n_expert_groups, config.n_expert_groups_used)
        self.caches: list[KVCache] | list[LatentCache]
        self.mla: MlaAttention | None = None
        if config.is_mla:
            held = [w.attention is not None for w in self.layers]
            self.caches = [LatentCache(held, n_ctx, config.kv_cache_width, cache_dtype)
                           for _ in range(n_slots)]
            self.mla = MlaAttention(config, self.backend, RopeTable(
                config.rope_theta, config.rope_freq_scale, config.qk_rope_head_dim, n_ctx,
                config.rope_style, backend.dtype, config.rope_yarn))
        else:
            kv_heads = [w.attention.n_kv_heads if w.attention else 0  # type: ignore[union-attr]
                        for w in self.layers]
            self.caches = [KVCache(kv_heads, n_ctx, config.head_dim, config.value_head_dim,
                                   cache_dtype) for _ in range(n_slots)]
        # One table per distinct RoPE base, shared by the layers that use it (MLA has its own).
        tables: dict[float, RopeTable] = {}
        self.rope: list[RopeTable] = []
        self.windows: list[int] = []
        for layer in self.layer_range:
            base = config.rope_theta_for_layer(layer)
            if base not in tables and not config.is_mla:
                tables[base] = RopeTable(base, config.rope_freq_scale, config.head_dim, n_ctx,
                                         config.rope_style, backend.dtype)
            if not config.is_mla:
                self.rope.append(tables[base])
            self.windows.append(config.sliding_window if config.sliding_layers[layer] else 0)
        self.fixed_bytes_per_forward = self._fixed_bytes()

    @property
    def cache(self) -> KVCache:
        """Slot 0's KV cache (the one `forward` uses)."""
        return self.caches[0]

    @cache.setter
    def cache(self, cache: KVCache) -> None:
        """Swap slot 0's cache (a caller keeping its own caches per sequence)."""
        self.caches[0] = cache

    # --- the forward pass ---------------------------------------------------------------

    def forward(self, start: int, token_ids: np.ndarray | None = None,
                hidden: np.ndarray | None = None,
                logits: Literal["last", "all"] = "last") -> np.ndarray:
        """T new tokens of slot 0 at positions [start, start + T): token_ids [T] on the first
        stage, the previous stage's hidden [T, H] on the others. Returns hidden [T, H] off the
        last stage; on it, this rank's logits [1 (last token) or T, v1 - v0]."""
        n_tokens = len(token_ids) if token_ids is not None else (
            len(hidden) if hidden is not None else 0)
        return self.forward_batch([0], [start], [n_tokens], token_ids, hidden, logits)

    def forward_batch(self, slots: Sequence[int], starts: Sequence[int],
                      lengths: Sequence[int], token_ids: np.ndarray | None = None,
                      hidden: np.ndarray | None = None,
                      logits: Literal["last", "all"] = "last", rows: bool = False) -> np.ndarray:
        """Chunks i = (slots[i], starts[i], lengths[i]), their tokens back to back: token_ids
        [sum T] on the first stage, the previous stage's hidden [sum T, H] on the others.
        rows: any chunks, every token row computed as it would be alone (the batch-invariant
        products of continuous batching, worker/batch.py); else one chunk, whose prompt
        products may take the GEMM. Returns hidden [sum T, H] off the last stage; on it,
        this rank's logits of each chunk's last token [n_chunks, v1 - v0] ("last"), or of
        every token [T, v1 - v0] ("all", one chunk without rows)."""
        c = self.config
        backend = self.backend
        hidden = self._input(token_ids, hidden)  # [T, H]
        n_tokens = hidden.shape[0]
        spans = chunk_spans(slots, starts, lengths, n_tokens, self.n_slots, self.n_ctx, logits,
                            rows)
        self.counters.forward_calls += 1
        self.counters.tokens += n_tokens
        self.counters.weight_bytes_read += self.fixed_bytes_per_forward

        for local, (layer, w) in enumerate(zip(self.layer_range, self.layers, strict=True)):
            x = backend.rms_norm(hidden, w.attn_norm, c.norm_eps)  # [T, H]
            attn = self._attention(local, w, x, spans, rows)  # this rank's partial [T, H]
            if w.split_attention:
                attn = self._all_reduce(attn, ReduceSite.ATTENTION, layer)  # full sum [T, H]
            hidden = self._residual(hidden, attn, w.post_attn_norm)  # [T, H]

            x = backend.rms_norm(hidden, w.ffn_norm, c.norm_eps)  # [T, H]
            ffn = self._ffn(layer, w, x, rows)  # this rank's partial [T, H]
            if w.split_ffn:
                ffn = self._all_reduce(ffn, ReduceSite.FFN, layer)  # full sum [T, H]
            hidden = self._residual(hidden, ffn, w.post_ffn_norm)  # [T, H]

        if not self.is_last:
            return hidden
        if logits == "last":  # the LM head is the costliest product: each chunk's last token
            hidden = hidden[[span.r1 - 1 for span in spans]]  # [n_chunks, H]
        if self.lm_head is None:
            return np.zeros((hidden.shape[0], 0), backend.dtype)  # no vocabulary rows here
        normed = backend.rms_norm(hidden, self.output_norm, c.norm_eps)  # [T or 1, H]
        out = self._matmul(self.lm_head, normed, rows)  # [T or 1, v1 - v0]
        if c.final_logit_softcap:
            cap = np.asarray(c.final_logit_softcap, dtype=out.dtype)
            out /= cap  # in place: the logits are the largest activations of the step
            np.tanh(out, out=out)
            out *= cap
        return out

    def _input(self, token_ids: np.ndarray | None, hidden: np.ndarray | None) -> np.ndarray:
        """The stage's input hidden state [T, H]: embedded tokens on the first stage."""
        if self.is_first:
            if token_ids is None or hidden is not None:
                raise ValueError("the first stage takes token_ids (and no hidden state)")
            ids = np.asarray(token_ids, dtype=np.int64)  # [T]
            if ids.ndim != 1 or len(ids) == 0:
                raise ValueError(f"forward needs token ids [T], T >= 1; got shape {ids.shape}")
            self.counters.weight_bytes_read += len(np.unique(ids)) * self.embedding_row_bytes
            out = self.backend.embedding(self.token_embd, ids)  # [T, H]
            if self.config.embedding_scale != 1.0:
                # A scalar of the array's dtype: CuPy refuses 0-d numpy arrays as operands.
                out = out * out.dtype.type(self.config.embedding_scale)
            return out
        if hidden is None or token_ids is not None:
            raise ValueError(f"stage {self.stage.index} takes the previous stage's hidden state "
                             f"(and no token ids)")
        hidden = np.asarray(hidden, dtype=self.backend.dtype)
        if hidden.ndim != 2 or hidden.shape[0] == 0 or hidden.shape[1] != self.config.n_embd:
            raise ValueError(f"hidden must be [T, {self.config.n_embd}], T >= 1; got "
                             f"{list(hidden.shape)}")
        return hidden

    def _matmul(self, weight: Any, x: np.ndarray, rows: bool) -> np.ndarray:
        """x [T, n_in] -> [T, n_out]; rows: each row as it would be alone."""
        return self.backend.matmul_rows(weight, x) if rows else self.backend.matmul(weight, x)

    def _attention(self, local: int, w: LayerWeights, x: np.ndarray, spans: list[Span],
                   rows: bool) -> np.ndarray:
        """x [T, H] -> this rank's kv-head group's share of the attention output [T, H];
        each chunk attends to its own slot's cache."""
        a = w.attention
        if a is None:
            return np.zeros_like(x)  # [T, H]: the block is pinned to another rank
        if isinstance(a, MlaWeightHandles):
            return self.mla(a, x, spans, self.caches, local, rows)  # type: ignore[misc,arg-type]
        c = self.config
        backend = self.backend
        n_tokens = x.shape[0]
        # Bound once: an extra Python frame per product shows in a small model's decode.
        matmul = backend.matmul_rows if rows else backend.matmul
        q = matmul(a.q, x).reshape(n_tokens, a.n_heads, c.head_dim)  # [T, nh', d]
        k = matmul(a.k, x).reshape(n_tokens, a.n_kv_heads, c.head_dim)  # [T, nkv', d]
        v = matmul(a.v, x).reshape(n_tokens, a.n_kv_heads, c.value_head_dim)
        if w.q_norm is not None:
            q = backend.rms_norm(q, w.q_norm, c.norm_eps, out=q)  # in place: q is this step's
            k = backend.rms_norm(k, w.k_norm, c.norm_eps, out=k)
        table, scale, window = self.rope[local], c.attention_scale, self.windows[local]
        if len(spans) == 1:
            span = spans[0]
            q, k = backend.rope(q, k, table, span.start)
            attn = backend.attention(q, k, v, self.caches[span.slot], local, span.start, scale,
                                     window)  # [T, nh' * dv]
        else:
            attn = np.empty((n_tokens, a.n_heads * c.value_head_dim), q.dtype)  # [T, nh' * dv]
            for span in spans:
                q_c, k_c = backend.rope(q[span.r0 : span.r1], k[span.r0 : span.r1], table,
                                        span.start)  # [t, nh', d], [t, nkv', d]
                attn[span.r0 : span.r1] = backend.attention(
                    q_c, k_c, v[span.r0 : span.r1], self.caches[span.slot], local, span.start,
                    scale, window)
        return matmul(a.output, attn)  # [T, H]

    def _ffn(self, layer: int, w: LayerWeights, x: np.ndarray, rows: bool) -> np.ndarray:
        """x [T, H] -> this rank's share of the dense FFN, or of the routed experts plus the
        shared experts [T, H]."""
        f = w.ffn
        backend = self.backend
        activation = self.config.ffn_activation
        if not self.config.layer_is_moe(layer):
            if f is None:
                return np.zeros_like(x)  # [T, H]: the block is pinned to another rank
            if rows:
                return backend.gated_ffn_rows(x, f.gate, f.up, f.down, activation)
            return backend.gated_ffn(x, f.gate, f.up, f.down, activation)
        out = self._routed(layer, w, x, rows)  # [T, H]
        if f is not None and f.shared is not None:
            shared_ffn = backend.gated_ffn_rows if rows else backend.gated_ffn
            out = out + shared_ffn(x, *f.shared, activation)  # [T, H]
        return out

    def _routed(self, layer: int, w: LayerWeights, x: np.ndarray, rows: bool) -> np.ndarray:
        """x [T, H] -> this rank's share of the routed experts [T, H]."""
        f = w.ffn
        if w.router is None:
            return np.zeros_like(x)  # this rank neither routes nor holds experts (a GPU worker)
        # Replicated router: every rank of the stage picks the same experts.
        if rows:  # one product per row: BLAS may sum a lone row differently from a batch
            router_logits = np.concatenate([x[t : t + 1] @ w.router.T
                                            for t in range(len(x))])  # [T, E]
        else:
            router_logits = x @ w.router.T  # [T, H] @ [H, E] -> [T, E]
        expert_ids, expert_weights = route(router_logits, self.router_config,
                                           w.router_bias)  # [T, K] each
        tokens_per_expert = np.bincount(expert_ids.ravel(), minlength=self.config.n_experts)
        self.counters.expert_tokens[layer] += tokens_per_expert  # [E]
        if f is None:
            return np.zeros_like(x)
        if f.experts is not None:  # expert parallel: this rank holds experts [e0, e1)
            e0, e1 = f.experts
            expert_ids = local_expert_ids(expert_ids, e0, e1)  # [T, K], -1 = held elsewhere
            tokens_per_expert = tokens_per_expert[e0:e1]
        n_used = int(np.count_nonzero(tokens_per_expert))
        if n_used == 0:
            return np.zeros_like(x)  # none of this rank's experts was picked
        self.counters.weight_bytes_read += n_used * f.n_bytes
        if rows:
            return self.backend.moe_rows(x, expert_ids, expert_weights, f.gate, f.up, f.down,
                                         self.config.ffn_activation)  # [T, H]
        return self.backend.moe(x, expert_ids, expert_weights, f.gate, f.up, f.down,
                                self.config.ffn_activation)  # [T, H]

    def _all_reduce(self, partial: np.ndarray, site: ReduceSite, layer: int) -> np.ndarray:
        started = time.perf_counter()
        try:
            return self.all_reduce(partial, site, layer)
        finally:
            self.counters.all_reduce_seconds += time.perf_counter() - started
            self.counters.all_reduce_calls += 1

    def _residual(self, hidden: np.ndarray, block_out: np.ndarray,
                  post_norm: np.ndarray | None) -> np.ndarray:
        """hidden + block_out, or hidden + post_norm(block_out) (Gemma; written into block_out,
        which is this step's own: a fresh sum from the reduce or this rank's partial)."""
        if post_norm is None:
            return hidden + block_out
        return self.backend.rms_norm(block_out, post_norm, self.config.norm_eps,
                                     residual=hidden, out=block_out)

    # --- loading ------------------------------------------------------------------------

    def _fixed_bytes(self) -> int:
        """Bytes every forward reads whatever its tokens: norms, routers, attention, dense FFN
        and the LM head rows. Embedding rows and routed experts depend on the tokens; forward
        counts them as it reads them."""
        total = self.lm_head_bytes
        if self.is_last:
            total += self._loader.n_bytes(OUTPUT_NORM)
        for w in self.layers:
            total += w.vector_bytes
            if w.attention is not None:
                total += w.attention.n_bytes
            if w.ffn is not None:
                total += w.ffn.shared_bytes if w.ffn.routed else w.ffn.n_bytes
        return total

    def _layer_weights(self, layer: int) -> LayerWeights:
        load = self._loader
        p = f"blk.{layer}."
        vectors = {field: (load.vector if field in _REQUIRED_VECTORS else load.optional_vector)(
            p + name) for field, name in _LAYER_VECTORS.items()}
        vector_bytes = sum(load.n_bytes(p + name) for name in _LAYER_VECTORS.values()
                           if load.holds(p + name))
        attention = (load_mla(load, self.backend, p, self.config, self.mla_layout)
                     if self.config.is_mla else self._attention_weights(p))
        return LayerWeights(
            **vectors, attention=attention, ffn=self._ffn_weights(layer),
            split_attention=self.plan.block_is_split(self.stage.index, layer, "attention"),
            split_ffn=self.plan.block_is_split(self.stage.index, layer, "ffn"),
            vector_bytes=vector_bytes)

    def _attention_weights(self, prefix: str) -> AttentionWeights | None:
        c = self.config
        load = self._loader
        names = [prefix + f"attn_{kind}.weight" for kind in ("q", "k", "v", "output")]
        if not load.holds_block(names):
            return None
        k_shard = load.shard(names[1])
        kv0, kv1 = ((0, c.n_kv_heads) if k_shard.axis is None
                    else (k_shard.start // c.head_dim, k_shard.stop // c.head_dim))
        n_kv = kv1 - kv0
        q, k, v, output = (load.matrix(name) for name in names)
        return AttentionWeights(q, k, v, output, n_heads=n_kv * (c.n_heads // c.n_kv_heads),
                                n_kv_heads=n_kv, n_bytes=sum(load.n_bytes(n) for n in names))

    def _ffn_weights(self, layer: int) -> FfnWeights | None:
        prefix = f"blk.{layer}."
        routed = self.config.layer_is_moe(layer)
        kinds = ("gate_exps", "up_exps", "down_exps") if routed else ("gate", "up", "down")
        names = [prefix + f"ffn_{kind}.weight" for kind in kinds]
        if not self._loader.holds_block(names):
            return None
        router = prefix + "ffn_gate_inp.weight"
        if routed and not self._loader.holds(router):
            raise NumoeError(f"the plan gives this worker {prefix}experts but not {router}, "
                             f"so it cannot route to them; make the plan again")
        gate_shard = self._loader.shard(names[0])
        n_bytes = sum(self._loader.n_bytes(name) for name in names)
        experts = None
        if routed:
            if gate_shard.axis == 0:  # expert parallel: whole experts [e0, e1)
                experts = (gate_shard.start, gate_shard.stop)
            n_local = self._loader.shape(names[0])[0]
            n_bytes //= n_local  # one local expert's gate, up and down
        gate, up, down = (self._loader.matrix(name) for name in names)
        shared, shared_bytes = None, 0
        shared_names = [prefix + f"ffn_{kind}_shexp.weight" for kind in ("gate", "up", "down")]
        if routed and self._loader.holds_block(shared_names):
            shared = tuple(self._loader.matrix(name) for name in shared_names)
            shared_bytes = sum(self._loader.n_bytes(name) for name in shared_names)
        return FfnWeights(gate, up, down, experts, n_bytes, routed, shared,  # type: ignore[arg-type]
                          shared_bytes)

    def _lm_head(self) -> tuple[Any, int]:
        """This rank's vocabulary rows [v0, v1) of the LM head (output.weight's slice, or of
        the tied token_embd it holds whole), and their bytes."""
        v0, v1 = self.worker.vocab
        if v1 == v0:
            return None, 0  # another worker of the stage (e.g. the GPU) computes every logit
        name = TOKEN_EMBEDDING if self.config.tied_output else OUTPUT
        load = self._loader
        if not load.holds(name):
            raise NumoeError(f"worker {self.rank} computes logits {v0}:{v1} but the plan gives "
                             f"it no {name}; do not pin {name} to one node")
        shard = load.shard(name)
        first = shard.start if shard.axis == 0 else 0  # the first row this rank holds
        n_rows = load.shape(name)[0]
        if shard.axis not in (None, 0) or not first <= v0 <= v1 <= first + n_rows:
            raise NumoeError(f"worker {self.rank} computes logits {v0}:{v1} but holds rows "
                             f"{first}:{first + n_rows} of {name}; the plan is inconsistent: "
                             f"make it again")
        if (v0 - first, v1 - first) == (0, n_rows) and name == TOKEN_EMBEDDING and self.is_first:
            return self.token_embd, load.n_bytes(name)  # one handle for embedding and head
        rows = load.rows(name, v0 - first, v1 - first)
        return self.backend.load_weight(rows), rows.data.nbytes


class _Loader:
    """This rank's weights, checked against the plan, turned into backend handles."""

    def __init__(self, plan: Plan, rank: int, weights: Mapping[str, WeightData],
                 backend: Backend) -> None:
        self.held: dict[str, Shard] = {}
        self.tensor_shapes: dict[str, tuple[int, ...]] = {}
        for tensor, shard in plan.shards_of(rank):
            self.held[tensor.name] = shard
            expected = shard_shape(tensor.shape, shard)
            found = weights.get(tensor.name)
            if found is None or tuple(found.shape) != expected:
                what = "missing" if found is None else f"shape {list(found.shape)}"
                raise NumoeError(f"worker {rank}: tensor {tensor.name} is {what}, but the plan "
                                 f"gives it a slice of shape {list(expected)}; load the weights "
                                 f"with worker.shard_loader.load_shards for this plan and rank")
        self.weights = weights
        self.backend = backend

    def holds(self, name: str) -> bool:
        return name in self.held

    def holds_block(self, names: list[str]) -> bool:
        """Whether this rank holds the block's tensors (all of them, or none: pinned away)."""
        held = [name in self.held for name in names]
        if any(held) and not all(held):
            raise NumoeError(f"the plan gives this worker only some of {', '.join(names)}; a "
                             f"block's tensors must be placed alike: make the plan again")
        return all(held)

    def shard(self, name: str) -> Shard:
        return self.held[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.weights[name].shape)

    def n_bytes(self, name: str) -> int:
        return int(self.weights[name].data.nbytes)

    def rows(self, name: str, a: int, b: int) -> WeightData:
        """Rows [a, b) of a held matrix: a view of its bytes (rows are back to back)."""
        data = self.weights[name]
        row_bytes = data.data.nbytes // data.shape[0]
        return WeightData(data.name, data.ggml_type, (b - a, *data.shape[1:]),
                          data.data[a * row_bytes : b * row_bytes])

    def matrix(self, name: str) -> Any:
        return self.backend.load_weight(self._get(name))

    def vector(self, name: str) -> np.ndarray:
        return self.backend.load_vector(self._get(name))

    def optional_vector(self, name: str) -> np.ndarray | None:
        return self.vector(name) if name in self.held else None

    def _get(self, name: str) -> WeightData:
        if name not in self.held:
            raise NumoeError(f"the plan gives this worker no {name}, which its layers need; "
                             f"make the plan from this model file (`numoe plan`)")
        return self.weights[name]
