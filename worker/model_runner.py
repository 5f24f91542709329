"""The forward pass: T new tokens at positions [start, start + T) -> logits, with a KV cache.

Weights (`LayerWeights`, one per layer) are loaded once through a Backend; run state (KV cache,
RoPE tables) is allocated once for n_ctx positions; config is the frozen ModelConfig. A prompt
is one batch (matrix-matrix products); decode is T = 1 (matrix-vector). Per-layer Python work is
a fixed, small number of backend calls (products, norms, RoPE, attention) in the backend's dtype
(float32 on CPU). The KV cache is in the backend's dtype or, on request, float16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import DTypeLike

from cluster.errors import NumoeError
from cluster.gguf import GGUFFile
from cluster.model import ModelConfig, TensorMap
from worker.backends.base import Backend, WeightData
from worker.layers.attention import KVCache
from worker.layers.ffn import RouterConfig, moe_block
from worker.layers.rope import RopeTable


@dataclass
class LayerWeights:
    attn_norm: np.ndarray  # [H]
    q: Any  # [n_heads * d, H]
    k: Any  # [n_kv * d, H]
    v: Any  # [n_kv * dv, H]
    output: Any  # [H, n_heads * dv]
    q_norm: np.ndarray | None  # [d]
    k_norm: np.ndarray | None  # [d]
    post_attn_norm: np.ndarray | None  # [H] (Gemma)
    ffn_norm: np.ndarray  # [H]
    post_ffn_norm: np.ndarray | None  # [H] (Gemma)
    gate: Any  # dense [F, H] or experts [E, F, H]
    up: Any  # dense [F, H] or experts [E, F, H]
    down: Any  # dense [H, F] or experts [E, H, F]
    router: np.ndarray | None  # [E, H] (MoE)


def weight_data(gguf: GGUFFile, tensors: TensorMap, name: str) -> WeightData:
    info = tensors[name]
    return WeightData(info.name, info.ggml_type, tuple(info.shape), gguf.tensor_data(info.name))


class ModelRunner:
    """Runs one sequence: `forward` appends tokens at `start` and returns their logits."""

    def __init__(self, config: ModelConfig, tensors: TensorMap, gguf: GGUFFile,
                 backend: Backend, n_ctx: int, kv_cache_dtype: DTypeLike | None = None) -> None:
        """kv_cache_dtype: the backend's dtype when None; float16 halves the cache and rounds
        keys and values as llama.cpp's default F16 cache does."""
        cache_dtype = backend.dtype if kv_cache_dtype is None else np.dtype(kv_cache_dtype)
        if cache_dtype not in backend.kv_cache_dtypes:
            raise NumoeError(
                f"the {backend.name} backend cannot keep a {cache_dtype} KV cache; choose one "
                f"of: {', '.join(str(d) for d in backend.kv_cache_dtypes)}"
            )
        self.config = config
        self.backend = backend
        self.n_ctx = n_ctx
        dtype = backend.dtype

        def matrix(name: str) -> Any:
            return backend.load_weight(weight_data(gguf, tensors, name))

        def vector(name: str) -> np.ndarray:
            return backend.load_vector(weight_data(gguf, tensors, name))

        def optional_vector(name: str) -> np.ndarray | None:
            return vector(name) if name in tensors else None

        self.token_embd = matrix("token_embd.weight")  # [vocab, H]
        self.lm_head = (
            self.token_embd if config.tied_output else matrix("output.weight")
        )  # [vocab, H]
        self.output_norm = vector("output_norm.weight")  # [H]
        ffn = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps") if config.is_moe else (
            "ffn_gate", "ffn_up", "ffn_down")
        self.layers: list[LayerWeights] = []
        for layer in range(config.n_layers):
            p = f"blk.{layer}."
            self.layers.append(LayerWeights(
                attn_norm=vector(p + "attn_norm.weight"),
                q=matrix(p + "attn_q.weight"),
                k=matrix(p + "attn_k.weight"),
                v=matrix(p + "attn_v.weight"),
                output=matrix(p + "attn_output.weight"),
                q_norm=optional_vector(p + "attn_q_norm.weight"),
                k_norm=optional_vector(p + "attn_k_norm.weight"),
                post_attn_norm=optional_vector(p + "post_attention_norm.weight"),
                ffn_norm=vector(p + "ffn_norm.weight"),
                post_ffn_norm=optional_vector(p + "post_ffw_norm.weight"),
                gate=matrix(p + ffn[0] + ".weight"),
                up=matrix(p + ffn[1] + ".weight"),
                down=matrix(p + ffn[2] + ".weight"),
                router=optional_vector(p + "ffn_gate_inp.weight"),
            ))

        self.router_config = RouterConfig(
            config.n_experts_used, config.expert_weights_norm, config.expert_weights_scale
        )
        self.cache = KVCache(config.n_layers, config.n_kv_heads, n_ctx, config.head_dim,
                             config.value_head_dim, cache_dtype)
        # One table per distinct RoPE base, shared by the layers that use it.
        tables: dict[float, RopeTable] = {}
        self.rope: list[RopeTable] = []
        for layer in range(config.n_layers):
            base = config.rope_theta_for_layer(layer)
            if base not in tables:
                tables[base] = RopeTable(base, config.rope_freq_scale, config.head_dim, n_ctx,
                                         config.rope_style, dtype)
            self.rope.append(tables[base])
        self.windows = [config.sliding_window if sliding else 0
                        for sliding in config.sliding_layers]

    def forward(self, token_ids: list[int] | np.ndarray, start: int,
                logits: Literal["last", "all"] = "last") -> np.ndarray:
        """Logits for the new tokens: [1, vocab] for the last one, or [T, vocab] for all."""
        c = self.config
        ids = np.asarray(token_ids, dtype=np.int64)  # [T]
        n_tokens = len(ids)
        if n_tokens == 0:
            raise ValueError("forward needs at least one token")
        if start < 0 or start + n_tokens > self.n_ctx:
            raise ValueError(
                f"positions [{start}, {start + n_tokens}) exceed the context of {self.n_ctx}"
            )
        backend = self.backend
        hidden = backend.embedding(self.token_embd, ids)  # [T, H]
        if c.embedding_scale != 1.0:
            hidden = hidden * np.asarray(c.embedding_scale, dtype=hidden.dtype)

        for layer, weights in enumerate(self.layers):
            hidden = self._layer(layer, weights, hidden, start)  # [T, H]

        if logits == "last":
            hidden = hidden[-1:]  # [1, H]: the LM head is the costliest product; skip the rest
        normed = backend.rms_norm(hidden, self.output_norm, c.norm_eps)
        out = backend.matmul(self.lm_head, normed)  # [T or 1, vocab]
        if c.final_logit_softcap:
            cap = np.asarray(c.final_logit_softcap, dtype=out.dtype)
            out /= cap  # in place: the logits are the largest activations of the step
            np.tanh(out, out=out)
            out *= cap
        return out

    def _layer(self, layer: int, w: LayerWeights, hidden: np.ndarray, start: int) -> np.ndarray:
        c = self.config
        backend = self.backend
        eps = c.norm_eps
        n_tokens = hidden.shape[0]

        # --- attention ---
        x = backend.rms_norm(hidden, w.attn_norm, eps)  # [T, H]
        q = backend.matmul(w.q, x).reshape(n_tokens, c.n_heads, c.head_dim)  # [T, nh, d]
        k = backend.matmul(w.k, x).reshape(n_tokens, c.n_kv_heads, c.head_dim)  # [T, nkv, d]
        v = backend.matmul(w.v, x).reshape(n_tokens, c.n_kv_heads, c.value_head_dim)
        if w.q_norm is not None:
            q = backend.rms_norm(q, w.q_norm, eps, out=q)  # in place: q is this step's own
            k = backend.rms_norm(k, w.k_norm, eps, out=k)
        q, k = backend.rope(q, k, self.rope[layer], start)
        attn = backend.attention(q, k, v, self.cache, layer, start, c.attention_scale,
                                 self.windows[layer])  # [T, nh * dv]
        attn_out = backend.matmul(w.output, attn)  # [T, H]
        if w.post_attn_norm is not None:
            hidden = backend.rms_norm(attn_out, w.post_attn_norm, eps, residual=hidden,
                                      out=attn_out)  # hidden + norm(attn_out)
        else:
            hidden = hidden + attn_out

        # --- feed-forward ---
        x = backend.rms_norm(hidden, w.ffn_norm, eps)  # [T, H]
        if w.router is not None:
            ffn_out = moe_block(backend, x, w.router, w.gate, w.up, w.down, self.router_config,
                                c.ffn_activation)  # [T, H]
        else:
            ffn_out = backend.gated_ffn(x, w.gate, w.up, w.down, c.ffn_activation)  # [T, H]
        if w.post_ffn_norm is not None:
            return backend.rms_norm(ffn_out, w.post_ffn_norm, eps, residual=hidden,
                                    out=ffn_out)  # hidden + norm(ffn_out)
        return hidden + ffn_out
