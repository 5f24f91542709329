"""Predicted decode and prompt speed of a plan, from the bytes and FLOPs each worker handles.

Decode is bound by memory reads. For one token, each stage (pipeline stages run one after
another) costs

    sum over blocks (attention, FFN, head) of the slowest worker's seconds for that block
    + its layers x (layer overhead + all-reduces per layer x all-reduce latency)
    + its MoE layers x experts per token x expert overhead
    + its layers x GPU launch overhead, when the stage has a GPU worker

A worker's seconds for some bytes of ggml type t are bytes / rate(t):
  * CPU worker: rate = min(node read bandwidth x kernel efficiency(t),
                           cores x per-core decode throughput(t))
    (two threads reach memory bandwidth here, one does not: bench/RESULTS.md);
  * GPU worker: rate = GPU bandwidth x gpu_efficiency.
Blocks are timed separately because, in a GPU hybrid, the GPU's attention and the CPUs' experts
run one after the other, while the GPU's shared experts overlap the CPUs' routed experts.
Stages are joined by one network hop each (stage_handoff_s). The KV cache the attention reads
at `decode_depth` tokens of context is added to the attention block.

Prompt processing is bound by compute: seconds per prompt token = sum over stages and blocks of
the slowest worker's 2 x (weights it multiplies per token in that block) / its sustained FLOP/s
(attention's context-dependent FLOPs are left out).

Every constant is in Calibration, with where it came from.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cluster.gguf import GGML_TYPE_NAMES, type_block

if TYPE_CHECKING:
    from cluster.model import ModelConfig
    from cluster.placement import Shard, TensorPlacement

BLOCKS = ("attention", "ffn", "head")
F16 = 1
TOKEN_EMBEDDING = "token_embd.weight"
EXPERT_SUFFIX = "_exps.weight"
_LAYER = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class Calibration:
    """Constants of the speed model. Defaults and their sources:

    kernel_efficiency: decode matvec GB/s / read-probe GB/s, 2 threads (bench/RESULTS.md,
        kernel_bandwidth.py: Q4_K 0.89, Q6_K 0.94, Q8_0 0.97, BF16 0.94); other types
        default_kernel_efficiency (0.9, the mean of those).
    core_decode_gbs: weight GB/s one core's decode matvec sustains when not bandwidth bound
        (bench/RESULTS.md, 1 thread, AVX-512: Q4_K 12.8, Q6_K 16.9, Q8_0 26.0; the Q8_0 figure is
        already near one core's read bandwidth, so it is a lower bound); others
        default_core_decode_gbs (13.0).
    core_gflops: sustained GEMM GFLOP/s per core for prompt processing (bench/RESULTS.md,
        kernel_gemm.py, 2048x2048 Q4_K, 1 thread: 89.2).
    layer_overhead_s: fixed seconds per layer and token besides streaming weights (norms, rope,
        attention over a short context, Python dispatch, thread wake-ups). Fitted on this
        machine (2 cores): Gemma 3 270M Q4_K_M, 18 dense layers, measured tg 93.88 tok/s against
        8.13 ms of weight reads in this model -> 140 us per layer (bench/RESULTS.md numbers).
    expert_overhead_s: fixed seconds per routed expert a token uses, per MoE layer (router
        top-k, one gate/up/down matvec triple per expert with its thread sync). Fitted on the
        MoE benchmark model (bench/RESULTS.md: tg 47.12 tok/s, 6 layers x 8 experts, 16.14 ms
        of weight reads): (21.22 ms - 16.14 ms - 6 x 140 us) / 48 -> 88 us. Both fits come
        from one single-process run each; re-fit with bench/plan_ktransformers.py --calibrate.
    allreduce_latency_s: one decode-size all-reduce between the workers of a stage. Assumed 60 us:
        a 2-rank direct all-reduce is one one-way ZeroMQ hop each way at once (DESIGN.md: a
        round trip is ~0.1 ms here); bench/allreduce_latency.py measures it.
    gpu_efficiency: fraction of a GPU's peak bandwidth a quantized matvec reaches. Assumed 0.75
        (llama.cpp's CUDA MMVQ kernels reach 70-85% on an RTX 4090); no numoe measurement yet.
    gpu_compute_efficiency: fraction of the GPU's dense FP16 tensor peak that dequantize +
        cuBLAS prompt processing reaches. Assumed 0.5.
    gpu_layer_overhead_s: kernel launches per layer on a GPU worker (about 8 launches of ~5 us,
        no CUDA graphs). Assumed.
    stage_handoff_s: one [1, H] activation from one pipeline stage to the next over TCP.
        Assumed (DESIGN.md: a ZeroMQ round trip is ~0.1 ms here; across a LAN ~0.2 ms).
    """

    kernel_efficiency: tuple[tuple[str, float], ...] = (
        ("Q4_K", 0.89), ("Q6_K", 0.94), ("Q8_0", 0.97), ("BF16", 0.94))
    default_kernel_efficiency: float = 0.9
    core_decode_gbs: tuple[tuple[str, float], ...] = (
        ("Q4_K", 12.8), ("Q6_K", 16.9), ("Q8_0", 26.0))
    default_core_decode_gbs: float = 13.0
    core_gflops: float = 89.2
    layer_overhead_s: float = 140e-6
    expert_overhead_s: float = 88e-6
    allreduce_latency_s: float = 60e-6
    gpu_efficiency: float = 0.75
    gpu_compute_efficiency: float = 0.5
    gpu_layer_overhead_s: float = 40e-6
    stage_handoff_s: float = 200e-6

    def efficiency(self, ggml_type: int) -> float:
        return dict(self.kernel_efficiency).get(GGML_TYPE_NAMES.get(ggml_type, ""),
                                                self.default_kernel_efficiency)

    def core_rate_gbs(self, ggml_type: int) -> float:
        return dict(self.core_decode_gbs).get(GGML_TYPE_NAMES.get(ggml_type, ""),
                                              self.default_core_decode_gbs)


# name fragment (lower case) -> (peak read bandwidth GB/s, dense FP16 tensor TFLOP/s), rounded
# from the vendors' spec sheets (no sparsity; the RTX 4090D's TFLOP/s scaled from the 4090 by
# its 114 of 128 SMs). The longest fragment found in the name wins. Only the bandwidth matters
# for decode; the TFLOP/s only for the prompt prediction.
KNOWN_GPUS: dict[str, tuple[float, float]] = {
    "rtx 5090": (1792.0, 209.5),
    "rtx 4090d": (1008.0, 147.0),
    "rtx 4090": (1008.0, 165.2),
    "rtx 3090 ti": (1008.0, 80.0),
    "rtx 3090": (936.0, 71.0),
    "rtx 6000 ada": (960.0, 364.2),
    "rtx a6000": (768.0, 154.8),
    "l40s": (864.0, 362.1),
    "a100 40gb": (1555.0, 312.0),
    "a100": (2039.0, 312.0),
    "h100 pcie": (2000.0, 756.0),
    "h100": (3350.0, 989.0),
    "h200": (4800.0, 989.0),
}
UNKNOWN_GPU = (500.0, 50.0)  # a cautious guess for a GPU missing from the table


def gpu_spec(name: str) -> tuple[float, float, bool]:
    """(bandwidth GB/s, FP16 TFLOP/s, known) of a GPU by its topology name."""
    lowered = name.lower()
    found = [key for key in KNOWN_GPUS if key in lowered]
    if not found:
        return UNKNOWN_GPU[0], UNKNOWN_GPU[1], False
    bandwidth, tflops = KNOWN_GPUS[max(found, key=len)]
    return bandwidth, tflops, True


@dataclass
class WorkerLoad:
    """What one worker reads and multiplies per token (accumulated by the planner)."""

    reads: dict[str, dict[int, int]] = field(
        default_factory=lambda: {block: {} for block in BLOCKS})  # block -> type -> bytes
    active_elements: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(BLOCKS, 0))  # block -> weights a token multiplies
    kv_bytes_per_context_token: int = 0  # KV-cache bytes a decode step reads per context token

    def add(self, block: str, ggml_type: int, n_bytes: int) -> None:
        self.reads[block][ggml_type] = self.reads[block].get(ggml_type, 0) + n_bytes


@dataclass(frozen=True)
class WorkerRate:
    """The hardware side of one worker, as the plan records it."""

    device: str  # "cpu" or "cuda:N"
    cores: int
    bandwidth_gbs: float
    compute_gflops: float


@dataclass(frozen=True)
class StagePrediction:
    stage: int
    attention_s: float  # slowest worker's attention reads (weights + KV cache), per token
    ffn_s: float  # slowest worker's FFN/MoE reads
    head_s: float  # slowest worker's LM head, embedding row and output norm
    overhead_s: float  # fixed per-layer costs and all-reduces
    prompt_s: float  # seconds per prompt token (compute bound)

    @property
    def decode_s(self) -> float:
        return self.attention_s + self.ffn_s + self.head_s + self.overhead_s


@dataclass(frozen=True)
class Prediction:
    stages: tuple[StagePrediction, ...]
    handoff_s: float  # stage-to-stage hops per token
    decode_depth: int  # tokens of context the decode prediction assumes

    @property
    def decode_s_per_token(self) -> float:
        return sum(stage.decode_s for stage in self.stages) + self.handoff_s

    @property
    def prompt_s_per_token(self) -> float:
        return sum(stage.prompt_s for stage in self.stages)

    @property
    def decode_tok_s(self) -> float:
        seconds = self.decode_s_per_token
        return 1.0 / seconds if seconds > 0 else float("inf")

    @property
    def prompt_tok_s(self) -> float:
        seconds = self.prompt_s_per_token
        return 1.0 / seconds if seconds > 0 else float("inf")


def prediction_from_dict(data: Mapping[str, object]) -> Prediction:
    stages = tuple(StagePrediction(**stage) for stage in data["stages"])  # type: ignore[arg-type]
    return Prediction(stages, float(data["handoff_s"]),  # type: ignore[arg-type]
                      int(data["decode_depth"]))  # type: ignore[call-overload]


def worker_seconds(block_reads: Mapping[int, int], rate: WorkerRate,
                   calibration: Calibration) -> float:
    """Seconds for one worker to stream `block_reads` (ggml type -> bytes) once."""
    seconds = 0.0
    for ggml_type, n_bytes in block_reads.items():
        if n_bytes == 0:
            continue
        if rate.device != "cpu":
            gbs = rate.bandwidth_gbs * calibration.gpu_efficiency
        else:
            gbs = min(rate.bandwidth_gbs * calibration.efficiency(ggml_type),
                      rate.cores * calibration.core_rate_gbs(ggml_type))
        seconds += n_bytes / (gbs * 1e9) if gbs > 0 else float("inf")
    return seconds


def _flop_seconds(elements: int, rate: WorkerRate) -> float:
    """Seconds to multiply `elements` weights by one token's activations (2 FLOPs each)."""
    return 2.0 * elements / (rate.compute_gflops * 1e9) if elements else 0.0


def predict(stage_ranks: Sequence[Sequence[int]], run_layers: Sequence[int],
            expert_calls: Sequence[int], reduces: Sequence[int], rates: Sequence[WorkerRate],
            loads: Sequence[WorkerLoad], calibration: Calibration, decode_depth: int
            ) -> Prediction:
    """The speed model above. Per stage s: `stage_ranks[s]` its workers, `run_layers[s]` the
    layers it computes, `expert_calls[s]` its routed experts per token summed over its MoE
    layers, `reduces[s]` its all-reduces per token (summed over layers)."""
    stages = []
    for index, ranks in enumerate(stage_ranks):
        block_s = {}
        for block in BLOCKS:
            slowest = 0.0
            for rank in ranks:
                reads = dict(loads[rank].reads[block])
                if block == "attention" and decode_depth:  # the cache, timed like F16 weights
                    kv = loads[rank].kv_bytes_per_context_token * decode_depth
                    reads[F16] = reads.get(F16, 0) + kv
                slowest = max(slowest, worker_seconds(reads, rates[rank], calibration))
            block_s[block] = slowest
        has_gpu = any(rates[rank].device != "cpu" for rank in ranks)
        overhead = run_layers[index] * calibration.layer_overhead_s
        overhead += expert_calls[index] * calibration.expert_overhead_s
        overhead += reduces[index] * calibration.allreduce_latency_s
        if has_gpu:
            overhead += run_layers[index] * calibration.gpu_layer_overhead_s
        prompt = sum(max(_flop_seconds(loads[rank].active_elements[block], rates[rank])
                         for rank in ranks) for block in BLOCKS)
        stages.append(StagePrediction(index, block_s["attention"], block_s["ffn"],
                                      block_s["head"], overhead, prompt))
    handoff = (len(stage_ranks) - 1) * calibration.stage_handoff_s
    return Prediction(tuple(stages), handoff, decode_depth)


# --- what each worker holds and reads ---------------------------------------------------------


@dataclass
class WorkerTally:
    """One worker's totals over the plan's shards."""

    weight_bytes: int = 0
    decode_bytes: int = 0  # weight bytes one decode token reads
    n_tensors: int = 0
    kv_elements: int = 0  # KV-cache elements per token of context, summed over its layers
    first_layer_heads: tuple[int, int] = (0, 0)  # kv heads it attends over in its first layer
    load: WorkerLoad = field(default_factory=WorkerLoad)


def tally(config: ModelConfig, placements: Sequence[TensorPlacement], n_workers: int,
          first_ranks: set[int], stage_start: Mapping[int, int],
          vocab_ranges: Mapping[int, tuple[int, int]]) -> list[WorkerTally]:
    """Bytes held, bytes read per decode token (bench/roofline.py's rules), FLOPs and KV cache
    of every worker. Layers past config.n_layers (multi-token prediction) are held, not read.
    `first_ranks`: the first stage's workers (they embed); `stage_start`: each worker's first
    layer; `vocab_ranges`: the logits each last-stage worker computes."""
    tallies = [WorkerTally() for _ in range(n_workers)]
    for placement in placements:
        match = _LAYER.match(placement.name)
        layer = int(match.group(1)) if match else None
        runs = layer is None or layer < config.n_layers
        block = _block_of(placement.name)
        elements, block_bytes = type_block(placement.ggml_type)
        for shard in placement.shards:
            counted = tallies[shard.rank]
            counted.weight_bytes += shard.n_bytes
            counted.n_tensors += 1
            if not runs:
                continue
            reads = _decode_reads(placement, shard, config, first_ranks, vocab_ranges)
            counted.decode_bytes += reads
            counted.load.add(block, placement.ggml_type, reads)
            if placement.name != TOKEN_EMBEDDING or config.tied_output:  # a gather: no FLOPs
                counted.load.active_elements[block] += reads * elements // block_bytes
            counted.kv_elements += _kv_elements_held(placement, shard, config)
            heads = _heads_computed(placement, shard, config)
            if heads is not None and layer == stage_start[shard.rank]:
                counted.first_layer_heads = heads
    return tallies


def _block_of(name: str) -> str:
    """Which timed block a tensor's reads belong to."""
    if "attn" in name:
        return "attention"
    if "ffn" in name or "exp_probs" in name:
        return "ffn"
    return "head"


def _decode_reads(placement: TensorPlacement, shard: Shard, config: ModelConfig,
                  first_ranks: set[int], vocab_ranges: Mapping[int, tuple[int, int]]) -> int:
    """Bytes of `shard` one decode token reads: non-expert slices fully, expert slices times
    n_experts_used / n_experts, one token_embd row (and its logits' rows of a tied head)."""
    if placement.name == TOKEN_EMBEDDING:
        row = shard.n_bytes // placement.shape[0]
        reads = row if shard.rank in first_ranks else 0
        if config.tied_output and shard.rank in vocab_ranges:
            v0, v1 = vocab_ranges[shard.rank]
            reads += row * (v1 - v0)
        return reads
    if placement.name.endswith(EXPERT_SUFFIX):
        return shard.n_bytes * config.n_experts_used // config.n_experts
    return shard.n_bytes


def _heads_computed(placement: TensorPlacement, shard: Shard, config: ModelConfig
                   ) -> tuple[int, int] | None:
    """The heads a holder of `shard` attends with, for the one tensor per layer that decides
    it, else None: attn_k's kv heads; MLA: attn_output's query heads (v columns per head)."""
    if config.is_mla:
        if not placement.name.endswith("attn_output.weight"):
            return None
        if shard.axis is None:
            return 0, config.n_heads
        return shard.start // config.value_head_dim, shard.stop // config.value_head_dim
    if not placement.name.endswith("attn_k.weight"):
        return None
    if shard.axis is None:
        return 0, config.n_kv_heads
    return shard.start // config.head_dim, shard.stop // config.head_dim


def _kv_elements_held(placement: TensorPlacement, shard: Shard, config: ModelConfig) -> int:
    """KV-cache elements per context token a holder of `shard` keeps for its layer. GQA: k and
    v of the kv heads of its attn_k rows. MLA: the whole latent (kv_lora_rank + rope values)
    for every holder of attn_kv_a_mqa, whose output is the cached latent, however the heads
    are split (see cluster/placement.py)."""
    if config.is_mla:
        return config.kv_cache_width if placement.name.endswith("attn_kv_a_mqa.weight") else 0
    heads = _heads_computed(placement, shard, config)
    if heads is None:
        return 0
    return (heads[1] - heads[0]) * (config.head_dim + config.value_head_dim)
