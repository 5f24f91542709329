"""One worker's multi-head latent attention (MLA: DeepSeek-V2/V3, R1, Kimi-K2) in the forward pass.

A tensor-parallel worker computes a contiguous range of heads (cluster/placement.py splits
attn_q_b / attn_k_b / attn_v_b / attn_output by head) and the whole latent path (attn_q_a,
attn_kv_a_mqa and their norms are replicated), so it keeps the whole latent cache and its output
is a partial sum over its heads, closed by the attention all-reduce like GQA's. Per layer:

    q      = q_b(norm(q_a x))                     [T, heads, nope + rope]   (or q x: no q_lora)
    kv     = kv_a_mqa x  ->  latent = [norm(kv[:kv_lora]), rope(kv[kv_lora:])]   [T, width]
    absorbed (default): q' = [k_b^T q_nope, rope(q_pe)] attends to the cached latent rows
        (value = a row's first kv_lora values; backend.attention_latent), then v_b per head;
    expanded (mla_absorbed False; a reference): keys and values decompressed per head from
        every cached row (worker/layers/mla.py expanded_attention), dense k_b and v_b;
    out    = attn_output(heads)                   [T, H]

worker/layers/mla.py is the float64 reference both forms are checked against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cluster.model import MLA_KV_B, ModelConfig
from worker.backends.base import Backend, WeightData
from worker.batch import Span
from worker.layers.attention import LatentCache
from worker.layers.mla import expanded_attention, split_kv_b
from worker.layers.rope import RopeTable

if TYPE_CHECKING:
    from worker.shard_runner import _Loader

_F32 = 0  # ggml type id of float32


@dataclass
class MlaWeightHandles:
    """This rank's heads of one layer's MLA, as backend handles (vectors dense)."""

    q_a: Any | None  # [q_lora, H], None without a low-rank query (DeepSeek-V2-Lite)
    q_a_norm: np.ndarray | None  # [q_lora]
    q_b: Any  # [heads' * (nope + rope), q_lora], or attn_q [heads' * (nope + rope), H]
    kv_a_mqa: Any  # [kv_lora + rope, H]
    kv_a_norm: np.ndarray  # [kv_lora]
    k_b: Any  # [heads', kv_lora, nope]
    v_b: Any  # [heads', v, kv_lora]
    output: Any  # [H, heads' * v]
    k_b_data: WeightData  # the same k_b and v_b in their file encoding, for the expanded form
    v_b_data: WeightData
    n_heads: int  # heads' = the heads this rank computes
    n_bytes: int  # bytes of every matrix above: read once per forward
    # k_b and v_b dequantized, filled on the expanded form's first use (a reference path)
    k_b_dense: np.ndarray | None = None  # [heads', kv_lora, nope]
    v_b_dense: np.ndarray | None = None  # [heads', v, kv_lora]


def mla_tensor_names(prefix: str, config: ModelConfig, layout: str) -> list[str]:
    """Every MLA tensor of layer prefix `prefix` ("blk.N.") in a file of `layout`."""
    kinds = ["attn_q_a", "attn_q_a_norm", "attn_q_b"] if config.q_lora_rank else ["attn_q"]
    kinds += ["attn_kv_a_mqa", "attn_kv_a_norm"]
    kinds += ["attn_kv_b"] if layout == MLA_KV_B else ["attn_k_b", "attn_v_b"]
    return [f"{prefix}{kind}.weight" for kind in [*kinds, "attn_output"]]


def load_mla(loader: _Loader, backend: Backend, prefix: str, config: ModelConfig,
             layout: str) -> MlaWeightHandles | None:
    """This rank's MLA weights of one layer, or None when the block is pinned to another rank."""
    names = mla_tensor_names(prefix, config, layout)
    if not loader.holds_block(names):
        return None
    output_name = prefix + "attn_output.weight"
    shard = loader.shard(output_name)
    n_heads = (config.n_heads if shard.axis is None
               else (shard.stop - shard.start) // config.value_head_dim)
    if layout == MLA_KV_B:
        k_b_data, v_b_data = _split_kv_b(loader, prefix + "attn_kv_b.weight", config, n_heads,
                                         backend)
    else:
        k_b_data, v_b_data = (loader.weights[prefix + f"attn_{kind}_b.weight"]
                              for kind in ("k", "v"))
    has_q_lora = config.q_lora_rank > 0
    return MlaWeightHandles(
        q_a=loader.matrix(prefix + "attn_q_a.weight") if has_q_lora else None,
        q_a_norm=loader.vector(prefix + "attn_q_a_norm.weight") if has_q_lora else None,
        q_b=loader.matrix(prefix + ("attn_q_b.weight" if has_q_lora else "attn_q.weight")),
        kv_a_mqa=loader.matrix(prefix + "attn_kv_a_mqa.weight"),
        kv_a_norm=loader.vector(prefix + "attn_kv_a_norm.weight"),
        k_b=backend.load_weight(k_b_data), v_b=backend.load_weight(v_b_data),
        output=loader.matrix(output_name), k_b_data=k_b_data, v_b_data=v_b_data,
        n_heads=n_heads, n_bytes=sum(loader.n_bytes(name) for name in names))


def _split_kv_b(loader: _Loader, name: str, config: ModelConfig, n_heads: int,
                backend: Backend) -> tuple[WeightData, WeightData]:
    """An older file's combined attn_kv_b (this rank's heads) -> float32 k_b and v_b. k_b is
    kv_b's key rows transposed per head, which no quantized layout survives, so both are kept
    dense (as llama.cpp, which runs such files without the absorbed form, cannot do better)."""
    dense = np.asarray(backend.load_vector(loader.weights[name]), np.float32)  # [rows, kv_lora]
    k_b, v_b = split_kv_b(dense, n_heads, config.mla_nope_dim, config.value_head_dim)
    return tuple(WeightData(name.replace("kv_b", kind), _F32, tuple(array.shape),
                            np.ascontiguousarray(array, np.float32).reshape(-1).view(np.uint8))
                 for kind, array in (("k_b", k_b), ("v_b", v_b)))  # type: ignore[return-value]


class MlaAttention:
    """Runs one rank's MLA for the layers it holds; `absorbed` picks the form (see module)."""

    def __init__(self, config: ModelConfig, backend: Backend, table: RopeTable) -> None:
        self.config = config
        self.backend = backend
        self.table = table
        self.absorbed = True

    def __call__(self, w: MlaWeightHandles, x: np.ndarray, spans: list[Span],
                 caches: list[LatentCache], local: int, rows: bool) -> np.ndarray:
        """x [T, H] (attention-normed) -> this rank's heads' share of the output [T, H]."""
        c, backend = self.config, self.backend
        matmul: Callable[[Any, np.ndarray], np.ndarray] = (
            backend.matmul_rows if rows else backend.matmul)
        heads_product = backend.matmul_heads_rows if rows else backend.matmul_heads
        n_tokens = x.shape[0]
        nope, kv_lora = c.mla_nope_dim, c.kv_lora_rank

        q_in = x
        if w.q_a is not None:
            q_in = backend.rms_norm(matmul(w.q_a, x), w.q_a_norm, c.norm_eps)  # [T, q_lora]
        q = matmul(w.q_b, q_in).reshape(n_tokens, w.n_heads, c.head_dim)  # [T, heads', d]
        q_nope = np.ascontiguousarray(q[..., :nope])  # [T, heads', nope]
        q_pe = np.ascontiguousarray(q[..., nope:])  # [T, heads', rope]

        kv = matmul(w.kv_a_mqa, x)  # [T, kv_lora + rope]
        latent = np.empty_like(kv)  # [T, kv_lora + rope]: this call's cache rows
        latent[:, :kv_lora] = backend.rms_norm(np.ascontiguousarray(kv[:, :kv_lora]),
                                               w.kv_a_norm, c.norm_eps)
        k_pe = np.ascontiguousarray(kv[:, None, kv_lora:])  # [T, 1, rope]: one key, all heads
        for span in spans:
            part = slice(span.r0, span.r1)
            q_pe[part], k_pe[part] = backend.rope(q_pe[part], k_pe[part], self.table, span.start)
        latent[:, kv_lora:] = k_pe[:, 0]

        if self.absorbed:
            q_latent = np.concatenate([heads_product(w.k_b, q_nope), q_pe],
                                      axis=-1)  # [T, heads', kv_lora + rope]
            latent_out = np.empty((n_tokens, w.n_heads, kv_lora), q.dtype)  # [T, heads', kv_lora]
            for span in spans:
                part = slice(span.r0, span.r1)
                latent_out[part] = backend.attention_latent(
                    q_latent[part], latent[part], caches[span.slot], local, span.start,
                    c.attention_scale, kv_lora)
            heads_out = heads_product(w.v_b, latent_out)  # [T, heads', v]
        else:
            k_b, v_b = self._dense_heads(w)
            heads_out = np.empty((n_tokens, w.n_heads, c.value_head_dim), q.dtype)
            for span in spans:
                part = slice(span.r0, span.r1)
                cache = caches[span.slot].layer_latents[local]  # [C, kv_lora + rope]
                cache[span.start : span.start + span.r1 - span.r0] = latent[part]
                heads_out[part] = expanded_attention(q_nope[part], q_pe[part], cache, span.start,
                                                     k_b, v_b, c.attention_scale)
        return matmul(w.output, heads_out.reshape(n_tokens, -1))  # [T, H]

    def _dense_heads(self, w: MlaWeightHandles) -> tuple[np.ndarray, np.ndarray]:
        """k_b and v_b dequantized (once per layer) for the expanded form."""
        if w.k_b_dense is None or w.v_b_dense is None:
            dtype = self.backend.dtype
            w.k_b_dense = np.asarray(self.backend.load_vector(w.k_b_data), dtype)
            w.v_b_dense = np.asarray(self.backend.load_vector(w.v_b_data), dtype)
        return w.k_b_dense, w.v_b_dense
