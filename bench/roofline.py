"""Decode roofline: weight bytes one decode token must read, and the read bandwidth to read them.

Single-token decode is bound by memory bandwidth: every weight matrix is streamed once per
token and each weight byte feeds only one multiply-add. So no engine can decode faster than

    roofline tok/s = read bandwidth (bytes/s) / weight bytes read per token

What a token reads (KV cache and activations are left out: they are small at benchmark context):
- every non-expert tensor in full (attention, dense FFN, norms, router, the LM head);
- of each routed-expert tensor (`*_exps`), only the n_experts_used / n_experts of its bytes that
  belong to the experts the router picks;
- one row of `token_embd` (the embedding is a gather), unless it doubles as the tied LM head, in
  which case the head's product reads all of it.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from cluster.gguf import TensorInfo
from cluster.model import ModelConfig

TOKEN_EMBEDDING = "token_embd.weight"
EXPERT_SUFFIX = "_exps.weight"


@dataclass(frozen=True)
class DecodeTraffic:
    """Weight bytes one decode token reads, by kind."""

    dense_bytes: int  # attention, dense FFN, norms, router, untied LM head
    expert_bytes: int  # the routed experts' share of the `*_exps` tensors
    embedding_bytes: int  # one token_embd row, or all of it when it is the tied LM head

    @property
    def total_bytes(self) -> int:
        return self.dense_bytes + self.expert_bytes + self.embedding_bytes


def decode_traffic(config: ModelConfig, tensors: Mapping[str, TensorInfo]) -> DecodeTraffic:
    """Weight bytes read per decode token. `tensors` is the model's tensor index (the TensorMap
    of load_model_spec or the GGUF's full index); a tensor reachable under two names (the tied
    head aliased as "output.weight") counts once."""
    dense_bytes = expert_bytes = embedding_bytes = 0
    unique = {info.name: info for info in tensors.values()}
    for name, info in unique.items():
        if name == TOKEN_EMBEDDING:
            embedding_bytes = (info.n_bytes if config.tied_output
                               else info.n_bytes // info.shape[0])  # one row of [vocab, H]
        elif name.endswith(EXPERT_SUFFIX):
            expert_bytes += info.n_bytes * config.n_experts_used // config.n_experts
        else:
            dense_bytes += info.n_bytes
    return DecodeTraffic(dense_bytes, expert_bytes, embedding_bytes)


def measure_read_bandwidth_gbs(n_threads: int, buffer_gib: float = 1.0, samples: int = 5,
                               passes_per_sample: int = 2) -> float:
    """Median read bandwidth (GB/s, 1e9 bytes/s) of native read_probe over a buffer far larger
    than any cache, with `n_threads` kernel threads (left set afterwards, as the engine sets
    them too)."""
    from native import kernels  # noqa: PLC0415 — keeps decode_traffic free of the native module

    kernels.set_threads(n_threads)
    buffer = np.ones(int(buffer_gib * 2**30), np.uint8)  # [bytes]; written, so pages exist
    rates = [kernels.read_probe(buffer, passes_per_sample) for _ in range(samples)]
    return statistics.median(rates)


def roofline_tokens_per_s(bandwidth_gbs: float, traffic: DecodeTraffic) -> float:
    return bandwidth_gbs * 1e9 / traffic.total_bytes
