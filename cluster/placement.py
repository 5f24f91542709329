"""Placement: (model metadata, topology, options) -> Plan of which worker holds which bytes.

`make_plan` is a pure function of metadata: it reads tensor names, quant types, shapes and byte
sizes (a GGUF's tensor index, or a built-in description from cluster.catalog; no weights) and
the topology, and does no I/O. The Plan is frozen and `to_dict()` gives plain JSON-ready data.

One CPU worker per NUMA node; ranks number the nodes host by host. Across hosts the plan is a
pipeline: host s is stage s and computes a contiguous range of layers (the first stage also
embeds the tokens, the last one applies the LM head). Inside a stage the CPU workers split every
layer (tensor parallel, the default):

* routed expert tensors (`*_exps`) are split along the expert intermediate dimension: gate/up
  rows [a, b) (axis 1 of [E, F, H]), down columns [a, b) (axis 2 of [E, H, F]); a and b are
  multiples of the down tensor's quant block, so every slice holds whole blocks. With
  strategy "expert_parallel" they are split by whole experts instead (axis 0);
* dense FFN and shared-expert tensors are split the same way (gate/up rows, down columns);
  one fewer quant blocks wide than the stage has workers is held whole by one worker (rotating
  with the layer; the others add zeros to the FFN all-reduce, as for a pinned block);
* attention is split by KV-head groups: worker r owns kv heads [k0, k1), so q rows (and biases)
  of the query heads of those groups, k/v rows of those kv heads and the matching attn_output
  columns. Multi-head latent attention (MLA: DeepSeek, Kimi) is split by query heads, its latent
  path replicated: worker r owns heads [h0, h1), so those heads' rows of attn_q_b (attn_q when
  q_lora_rank is 0; nope + rope rows per head), attn_k_b / attn_v_b (axis 0, one per head) or
  attn_kv_b (nope + v rows per head), and attn_output columns [h0 * v, h1 * v) (block aligned;
  when head bounds miss its quant blocks the whole MLA block is replicated, with a note). Every
  worker holds attn_q_a, attn_kv_a_mqa and their norms, computes the latent itself and keeps
  the whole latent KV cache (kv_lora_rank + qk_rope_head_dim values per token and layer): the
  latent cache is replicated. Every head reads every cached latent position, so splitting the
  heads cannot partition that cache; partitioning it by position would need a softmax merge
  across workers in every layer, one more collective on the latency path, to save a cache
  that is small (576 values per token per layer for DeepSeek-V3). `mla_head_layout` gives
  each MLA tensor's (axis, elements per head) for executors;
* the LM head (output.weight) is split by vocabulary rows; each last-stage worker computes the
  logits of its `vocab` range and the coordinator concatenates them. A tied LM head
  (token_embd) is replicated and each worker reads only its rows;
* everything else (embeddings, norms, router) is replicated on the stage's workers.

A host with a GPU gets one GPU worker more (the last rank of its stage, `device` "cuda:N"),
the KTransformers split: it holds every attention tensor, the dense FFN and shared-expert
tensors of the layers it runs, the LM head, and with them the KV cache; the routed experts (and
their router) stay on the CPU workers, split as above. Those tensors are "pinned" to the GPU
worker (the CPU workers contribute zeros to the block's all-reduce). Embeddings and norms stay
replicated, since every worker keeps its own copy of the residual stream. `PlanOptions.gpu`:
"auto" uses the GPU when that part fits in its memory (else a note and a CPU-only plan), "on"
refuses when it does not fit, "off" never uses one. One GPU per host: the largest.

Every block (attention, FFN) whose tensors are not all held whole by every stage worker ends in
an all-reduce of the stage's partial sums; `block_is_split` says which do, so executors never
re-derive the layout. `PlanOptions.overrides` pins tensors whose name a regex finds, the way
llama.cpp users write `-ot 'blk\\..*\\.ffn_.*_exps\\.=numa0'`: to a node (numaN), to the GPU
(gpuN or cudaN), or off the GPU (cpu: the CPU layout above).

Bytes per decode token follow bench/roofline.py: non-expert slices fully, expert slices times
n_experts_used / n_experts, one row of token_embd (all of it when it is the tied LM head).
Layers past config.n_layers (a multi-token-prediction head, GLM-4.6's layer 92) are held by the
last stage's CPU workers and never read. cluster/predict.py turns the bytes into predicted decode
and prompt tok/s.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cluster.gguf import type_block
from cluster.model import ModelConfig
from cluster.plan import (  # noqa: F401 - the plan's types are part of placement's interface
    ATTENTION_BLOCK,
    FFN_BLOCK,
    Plan,
    PlanError,
    Shard,
    StagePlan,
    TensorPlacement,
    WorkerPlan,
    format_plan_table,
    is_block_split,
    plan_from_dict,
)
from cluster.predict import (
    EXPERT_SUFFIX,  # noqa: F401 - part of this module's interface since it was first written
    TOKEN_EMBEDDING,
    Calibration,
    WorkerLoad,
    WorkerRate,
    gpu_spec,
    predict,
    tally,
)
from cluster.topology import GIB, Gpu, Host, Topology

STRATEGY_TENSOR_PARALLEL = "tensor_parallel"
STRATEGY_EXPERT_PARALLEL = "expert_parallel"
STRATEGIES = (STRATEGY_TENSOR_PARALLEL, STRATEGY_EXPERT_PARALLEL)
GPU_MODES = ("auto", "on", "off")
OUTPUT = "output.weight"
OUTPUT_NORM = "output_norm.weight"
DEFAULT_BANDWIDTH_GBS = 50.0  # assumed per-node read bandwidth when the topology lacks one
# Split by kv heads: q/k/v rows with their biases, attn_output columns (no output bias here).
_ATTENTION = re.compile(r"blk\.\d+\.attn_(q|k|v|output)\.(weight|bias)(?<!output\.bias)")
# MLA tensors split by query heads (see the module docstring); the rest of MLA is replicated.
_MLA_HEADS = re.compile(r"blk\.\d+\.attn_(q|q_b|k_b|v_b|kv_b|output)\.weight")
# MLA's latent path: replicated on a stage's CPU workers while the heads are split.
_MLA_LATENT = re.compile(r"blk\.\d+\.attn_(q_a|kv_a_mqa)\.weight")
_EXPERT = re.compile(r"blk\.\d+\.ffn_(gate|up|down)_exps\.weight")
# Dense FFN and shared experts: split along their intermediate dimension like routed experts.
_DENSE_FFN = re.compile(r"blk\.\d+\.ffn_(gate|up|down)(_shexp)?\.weight")
_ROUTER = re.compile(r"blk\.\d+\.(ffn_gate_inp\.weight|exp_probs_b\.bias)")
_LAYER = re.compile(r"blk\.(\d+)\.")
_PIN_TARGET = re.compile(r"(numa|gpu|cuda)(\d+)|cpu", re.IGNORECASE)


class TensorLike(Protocol):
    """What placement reads of a tensor: cluster.gguf.TensorInfo, or a built-in description."""

    @property
    def name(self) -> str: ...
    @property
    def ggml_type(self) -> int: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def n_bytes(self) -> int: ...


@dataclass(frozen=True)
class ModelSpec:
    config: ModelConfig
    tensors: Mapping[str, TensorLike]  # name -> tensor; aliases (tied "output.weight") ignored


@dataclass(frozen=True)
class PlanOptions:
    ctx: int = 4096  # tokens of KV cache each worker reserves
    kv_bytes_per_element: int = 2  # f16 KV cache
    # (regex, target): matching tensors whole to "numaN" or "gpuN", or off the GPU ("cpu")
    overrides: tuple[tuple[str, str], ...] = ()
    default_bandwidth_gbs: float = DEFAULT_BANDWIDTH_GBS
    strategy: str = STRATEGY_TENSOR_PARALLEL  # how a stage splits the routed experts
    layer_split: tuple[int, ...] = ()  # layers per pipeline stage (default: as even as can be)
    gpu: str = "auto"  # "auto" | "on" | "off": see the module docstring
    gpu_bandwidth_gbs: float = 0.0  # 0 = by the GPU's name (cluster.predict.KNOWN_GPUS)
    gpu_reserve_bytes: int = GIB  # VRAM left for the CUDA context, activations and workspaces
    decode_depth: int = 0  # tokens already in the KV cache when decode speed is predicted
    calibration: Calibration = field(default_factory=Calibration)  # the speed model's constants


def parse_override(text: str) -> tuple[str, str]:
    """`REGEX=TARGET` (llama.cpp's --override-tensor form) -> (regex, target), TARGET one of
    numaN, gpuN / cudaN (normalised to gpuN) or cpu, in any case."""
    pattern, sep, target = text.rpartition("=")
    match = _PIN_TARGET.fullmatch(target)
    if not sep or not pattern or match is None:
        raise PlanError(f"--override-tensor {text!r}: write REGEX=numaN, REGEX=gpuN or "
                        f"REGEX=cpu, e.g. 'blk\\..*\\.ffn_.*_exps\\.=numa0'")
    try:
        re.compile(pattern)
    except re.error as error:
        raise PlanError(f"--override-tensor {text!r}: {pattern!r} is not a valid regular "
                        f"expression ({error}); fix the pattern") from error
    if match.group(1) is None:
        return pattern, "cpu"
    kind = "numa" if match.group(1).lower() == "numa" else "gpu"
    return pattern, f"{kind}{int(match.group(2))}"


def _even_ranges(units: int, parts: int, rotate: int = 0) -> list[tuple[int, int]]:
    """`parts` contiguous ranges covering [0, units), sizes differing by at most one. The
    `units % parts` larger ranges go to parts rotate*extra, rotate*extra + 1, ... (mod parts),
    so rotating by the layer index spreads the remainder evenly over the workers."""
    base, extra = divmod(units, parts)
    larger = {(rotate * extra + i) % parts for i in range(extra)}
    ranges, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i in larger else 0)
        ranges.append((start, stop))
        start = stop
    return ranges


def _slice_bytes(tensor: TensorLike, axis: int, start: int, stop: int) -> int:
    """Bytes of [start, stop) along `axis`. Exact: rows hold whole blocks, and column bounds are
    block multiples (checked by the callers), so bytes are proportional to the range."""
    total = tensor.n_bytes * (stop - start)
    assert total % tensor.shape[axis] == 0, (tensor.name, axis, start, stop)
    return total // tensor.shape[axis]


def _stage_layers(n_layers: int, n_stages: int, layer_split: tuple[int, ...]
                  ) -> list[tuple[int, int]]:
    """[start, stop) of each pipeline stage's layers."""
    if not layer_split:
        return _even_ranges(n_layers, n_stages)
    if len(layer_split) != n_stages or sum(layer_split) != n_layers or min(layer_split) < 1:
        raise PlanError(f"--layer-split {','.join(map(str, layer_split))}: give one positive "
                        f"layer count per host ({n_stages} hosts) summing to the model's "
                        f"{n_layers} layers")
    ranges, start = [], 0
    for count in layer_split:
        ranges.append((start, start + count))
        start += count
    return ranges


def _attention_split(config: ModelConfig, tensors: Mapping[str, TensorLike],
                     n_workers: int) -> tuple[list[tuple[int, int]] | None, str | None]:
    """Head ranges per worker (kv heads; MLA: query heads), or None (and why) when attention
    must be replicated."""
    units = config.n_heads if config.is_mla else config.n_kv_heads
    what = "MLA attention" if config.is_mla else "attention"
    if n_workers == 1:
        return [(0, units)], None
    if units < n_workers:
        return None, (f"{what} replicated: {units} {'' if config.is_mla else 'kv '}heads "
                      f"cannot be shared by {n_workers} workers")
    # attn_output columns per unit: a kv-head group's value heads, or one MLA head's values
    group = 1 if config.is_mla else config.n_heads // config.n_kv_heads
    ranges = _even_ranges(units, n_workers)
    for name, tensor in tensors.items():
        if name.endswith("attn_output.weight"):
            block = type_block(tensor.ggml_type)[0]
            if any((k * group * config.value_head_dim) % block for k, _ in ranges):
                return None, (f"{what} replicated: {name}'s quant blocks ({block} columns) "
                              f"do not align with {'head' if config.is_mla else 'kv-head group'}"
                              f" bounds")
    return ranges, None


def _split_attention(name: str, tensor: TensorLike, config: ModelConfig,
                     kv_ranges: list[tuple[int, int]], ranks: Sequence[int]) -> tuple[Shard, ...]:
    kind = _ATTENTION.fullmatch(name).group(1)  # type: ignore[union-attr]
    group = config.n_heads // config.n_kv_heads
    unit, axis = {"q": (group * config.head_dim, 0), "k": (config.head_dim, 0),
                  "v": (config.value_head_dim, 0),
                  "output": (group * config.value_head_dim, len(tensor.shape) - 1)}[kind]
    return tuple(
        Shard(rank, axis, k0 * unit, k1 * unit, _slice_bytes(tensor, axis, k0 * unit, k1 * unit),
              block_aligned=kind == "output")
        for rank, (k0, k1) in zip(ranks, kv_ranges, strict=True))


def mla_head_layout(kind: str, config: ModelConfig, n_dims: int) -> tuple[int, int]:
    """(axis, elements per head) of an MLA tensor split by heads: `kind` is what follows
    "attn_" (q, q_b, k_b, v_b, kv_b, output); head h owns [h * unit, (h + 1) * unit)."""
    per_head = {"q": (0, config.head_dim), "q_b": (0, config.head_dim),  # nope then rope rows
                "k_b": (0, 1), "v_b": (0, 1),  # [heads, kv_lora, nope], [heads, v, kv_lora]
                "kv_b": (0, config.mla_nope_dim + config.value_head_dim),  # nope k, then v rows
                "output": (n_dims - 1, config.value_head_dim)}  # v columns per head
    return per_head[kind]


def _split_mla(name: str, tensor: TensorLike, config: ModelConfig,
               head_ranges: list[tuple[int, int]], ranks: Sequence[int]) -> tuple[Shard, ...]:
    kind = _MLA_HEADS.fullmatch(name).group(1)  # type: ignore[union-attr]
    axis, unit = mla_head_layout(kind, config, len(tensor.shape))
    return tuple(
        Shard(rank, axis, h0 * unit, h1 * unit, _slice_bytes(tensor, axis, h0 * unit, h1 * unit),
              block_aligned=kind == "output")
        for rank, (h0, h1) in zip(ranks, head_ranges, strict=True))


def _block_ranges(down: TensorLike, width: int, n_workers: int, layer: int
                  ) -> list[tuple[int, int]]:
    """Even ranges of an FFN's intermediate dimension whose bounds are multiples of the down
    tensor's quant block, so the down columns of every slice hold whole blocks. When the blocks
    do not divide evenly (Qwen3-30B's 768-wide experts are 3 K-quant blocks), which worker gets
    the larger slice rotates with the layer, so over the layers every worker reads the same."""
    block = type_block(down.ggml_type)[0]
    units = width // block
    if units * block != width:
        raise PlanError(f"{down.name}: intermediate width {width} is not a multiple of its "
                        f"quant block {block}; the file is corrupt: re-convert it")
    if units < n_workers:
        raise PlanError(f"{down.name}: {units} quant blocks wide cannot be split over "
                        f"{n_workers} workers; use fewer NUMA nodes per host")
    return [(a * block, b * block) for a, b in _even_ranges(units, n_workers, rotate=layer)]


def _too_narrow_to_split(name: str, tensors: Mapping[str, TensorLike], n_workers: int) -> bool:
    """A dense or shared-expert FFN whose intermediate width is fewer quant blocks than
    workers (a tiny model's one-block shared expert), so column slices of whole blocks cannot
    give every worker a part."""
    if _DENSE_FFN.fullmatch(name) is None:
        return False
    down = tensors[name.replace("_gate", "_down").replace("_up", "_down")]
    return down.shape[-1] // type_block(down.ggml_type)[0] < n_workers


def _blocks_do_not_divide(down: TensorLike, n_workers: int) -> bool:
    """Whether an FFN's intermediate width is not a whole number of quant blocks per worker."""
    return (down.shape[-1] // type_block(down.ggml_type)[0]) % n_workers != 0


def _split_ffn(name: str, tensor: TensorLike, tensors: Mapping[str, TensorLike],
               ranks: Sequence[int], options: PlanOptions, config: ModelConfig,
               cache: dict[str, list[tuple[int, int]]]) -> tuple[Shard, ...]:
    """Shards of a routed-expert, shared-expert or dense FFN tensor over a stage's `ranks`."""
    is_down = "_down" in name
    expert = _EXPERT.fullmatch(name) is not None
    down_name = name.replace("_gate", "_down").replace("_up", "_down")
    if expert and options.strategy == STRATEGY_EXPERT_PARALLEL or (
            expert and _blocks_do_not_divide(tensors[down_name], len(ranks))
            and config.n_experts >= len(ranks)):
        # Whole experts. Under tensor parallel too when the expert width is not a multiple of
        # (workers x quant block): column slices must hold whole blocks, so widths would differ
        # (Qwen3-30B: 3 blocks over 2 workers -> 512/256) and, since every layer ends in an
        # all-reduce, each layer would wait for the worker with the wider slice: measured 0.87
        # of the single process against 0.95 with whole experts (bench/RESULTS.md).
        if config.n_experts < len(ranks):
            raise PlanError(f"expert parallel: {config.n_experts} experts cannot be shared by "
                            f"{len(ranks)} workers; use --strategy tensor_parallel")
        ranges = _even_ranges(config.n_experts, len(ranks))
        return tuple(Shard(rank, 0, a, b, _slice_bytes(tensor, 0, a, b))
                     for rank, (a, b) in zip(ranks, ranges, strict=True))
    if down_name not in cache:
        down = tensors[down_name]
        cache[down_name] = _block_ranges(down, down.shape[-1], len(ranks),
                                         _layer_of(down_name) or 0)
    axis = len(tensor.shape) - 1 if is_down else len(tensor.shape) - 2
    return tuple(Shard(rank, axis, a, b, _slice_bytes(tensor, axis, a, b),
                       block_aligned=is_down)
                 for rank, (a, b) in zip(ranks, cache[down_name], strict=True))


def _layer_of(name: str) -> int | None:
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def _holding_stages(name: str, config: ModelConfig, stage_layers: list[tuple[int, int]]
                    ) -> list[int]:
    """Which pipeline stages need tensor `name`."""
    last = len(stage_layers) - 1
    layer = _layer_of(name)
    if layer is not None:
        if layer >= config.n_layers:  # multi-token-prediction layers: held, never run
            return [last]
        return [s for s, (a, b) in enumerate(stage_layers) if a <= layer < b]
    if name == TOKEN_EMBEDDING:
        return sorted({0, last}) if config.tied_output else [0]
    if name in (OUTPUT, OUTPUT_NORM):
        return [last]
    return list(range(len(stage_layers)))  # model-wide small tensors (e.g. rope factors)


# --- the layout -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pin:
    regex: re.Pattern[str]
    kind: str  # "numa" | "gpu" | "cpu"
    index: int  # node id or GPU index; -1 for cpu


@dataclass(frozen=True)
class _StageGpu:
    """The GPU a stage uses and the node it hangs off."""

    gpu: Gpu
    node_index: int  # index into the host's nodes

    def driver_cpu(self, host: Host) -> int:
        """The CPU the GPU worker's host thread runs on (taken from its node's CPU worker)."""
        return host.nodes[self.node_index].cpus[-1]


@dataclass(frozen=True)
class _Stage:
    plan: StagePlan
    cpu_ranks: tuple[int, ...]
    gpu_rank: int | None
    gpu: _StageGpu | None


def make_plan(model: ModelSpec, topology: Topology, options: PlanOptions) -> Plan:
    config = model.config
    _check_options(options)
    hosts = topology.hosts
    stage_layers = _stage_layers(config.n_layers, len(hosts), options.layer_split)
    pins = _compile_pins(options, hosts)
    unique = {tensor.name: tensor for tensor in model.tensors.values()}  # drop aliases
    gpus = [_choose_gpu(host, pins, options) for host in hosts]
    if options.gpu == "on" and not any(gpus):
        raise PlanError("--gpu on, but the topology has no GPU; add one to the topology file "
                        "or use --gpu auto")
    fallbacks: list[str] = []
    while True:
        notes: list[str] = []
        stages = _stages(hosts, stage_layers, gpus)
        placements = _place(config, unique, hosts, stages, stage_layers, pins, options, notes)
        _check_blocks(placements)
        workers, loads, rates = _worker_plans(config, hosts, stages, placements, options, notes)
        over = [w for w in workers if w.device != "cpu" and w.total_bytes > w.node_memory_bytes]
        if not over:
            break
        for worker in over:
            message = _gpu_shortfall(worker, options)
            pinned_here = any(p.kind == "gpu" for p in pins)
            if options.gpu == "on" or pinned_here:
                raise PlanError(f"{message}; use --gpu off, a lower --ctx, or pin less to it")
            fallbacks.append(f"{message}; planned without it")
            gpus[worker.stage] = None
    for worker in workers:
        if worker.device == "cpu" and worker.total_bytes > worker.node_memory_bytes:
            shortfall = (worker.total_bytes - worker.node_memory_bytes) / GIB
            raise PlanError(
                f"the model does not fit: worker {worker.rank} on host {worker.host!r} node "
                f"{worker.node_id} needs {worker.total_bytes / GIB:.2f} GiB (weights "
                f"{worker.weight_bytes / GIB:.2f} + KV cache {worker.kv_bytes / GIB:.2f}) but "
                f"the node has {worker.node_memory_bytes / GIB:.2f} GiB, {shortfall:.2f} GiB "
                f"short; use more NUMA nodes, a smaller quant type, or a lower --ctx")
    fallbacks += [_idle_gpus_note(host, chosen) for host, chosen in zip(hosts, gpus, strict=True)
                  if chosen is not None and sum(len(node.gpus) for node in host.nodes) > 1]
    stage_plans = tuple(stage.plan for stage in stages)
    moe_layers = {_layer_of(p.name) for p in placements if _EXPERT.fullmatch(p.name)}
    prediction = predict(
        [s.ranks for s in stage_plans], [s.layers[1] - s.layers[0] for s in stage_plans],
        [config.n_experts_used * sum(layer in moe_layers for layer in range(*s.layers))
         for s in stage_plans],
        _reduces_per_stage(placements, stage_plans), rates, loads, options.calibration,
        options.decode_depth)
    return Plan(options.strategy, config.architecture, options.ctx, stage_plans,
                tuple(workers), tuple(placements), tuple(fallbacks + notes), prediction)


def _check_options(options: PlanOptions) -> None:
    if options.ctx < 0:
        raise PlanError(f"--ctx {options.ctx}: give a context of at least 0 tokens")
    if options.strategy not in STRATEGIES:
        raise PlanError(f"strategy {options.strategy!r} is unknown; choose one of "
                        f"{', '.join(STRATEGIES)}")
    if options.gpu not in GPU_MODES:
        raise PlanError(f"--gpu {options.gpu!r}: choose one of {', '.join(GPU_MODES)}")
    if options.decode_depth < 0:
        raise PlanError(f"--depth {options.decode_depth}: give at least 0 tokens")


def _gpu_shortfall(worker: WorkerPlan, options: PlanOptions) -> str:
    short = (worker.total_bytes - worker.node_memory_bytes) / GIB
    return (f"GPU {worker.device} on host {worker.host!r} would hold "
            f"{worker.total_bytes / GIB:.2f} GiB (weights {worker.weight_bytes / GIB:.2f} + KV "
            f"cache {worker.kv_bytes / GIB:.2f}) but has {worker.node_memory_bytes / GIB:.2f} "
            f"GiB free after a {options.gpu_reserve_bytes / GIB:.2f} GiB reserve, "
            f"{short:.2f} GiB short")


def _choose_gpu(host: Host, pins: Sequence[_Pin], options: PlanOptions) -> _StageGpu | None:
    """The host's GPU the plan uses: one the pins name, else the one with the most memory."""
    if options.gpu == "off":
        return None
    found = [_StageGpu(gpu, i) for i, node in enumerate(host.nodes) for gpu in node.gpus]
    named = {p.index for p in pins if p.kind == "gpu"}
    chosen = [g for g in found if g.gpu.index in named] or found
    if len({g.gpu.index for g in chosen}) > 1 and named:
        raise PlanError(f"overrides pin tensors to GPUs {sorted(named)} of host {host.name!r}; "
                        f"numoe plans one GPU worker per host: pin to one of them")
    if not chosen:
        return None
    return max(chosen, key=lambda g: (g.gpu.memory_bytes, -g.gpu.index))


def _idle_gpus_note(host: Host, chosen: _StageGpu) -> str:
    idle = [gpu.index for node in host.nodes for gpu in node.gpus if gpu.index != chosen.gpu.index]
    return (f"{host.name}: plans GPU {chosen.gpu.index} only (one GPU worker per host); "
            f"GPU {', '.join(map(str, idle))} stays idle")


def _stages(hosts: Sequence[Host], stage_layers: list[tuple[int, int]],
            gpus: Sequence[_StageGpu | None]) -> list[_Stage]:
    stages, next_rank = [], 0
    for index, host in enumerate(hosts):
        cpu_ranks = tuple(range(next_rank, next_rank + len(host.nodes)))
        gpu_rank = next_rank + len(host.nodes) if gpus[index] is not None else None
        ranks = cpu_ranks + ((gpu_rank,) if gpu_rank is not None else ())
        next_rank += len(ranks)
        stages.append(_Stage(StagePlan(index, host.name, stage_layers[index], ranks),
                             cpu_ranks, gpu_rank, gpus[index]))
    return stages


def _on_gpu_by_default(name: str, config: ModelConfig) -> bool:
    """The KTransformers split: what every token reads goes to the GPU; routed experts don't."""
    layer = _layer_of(name)
    if layer is not None:
        return layer < config.n_layers and bool(
            ATTENTION_BLOCK.fullmatch(name) or _DENSE_FFN.fullmatch(name))
    return name == OUTPUT


def _place(config: ModelConfig, unique: Mapping[str, TensorLike], hosts: Sequence[Host],
           stages: Sequence[_Stage], stage_layers: list[tuple[int, int]], pins: Sequence[_Pin],
           options: PlanOptions, notes: list[str]) -> list[TensorPlacement]:
    kv_ranges: list[list[tuple[int, int]] | None] = []
    for stage in stages:
        ranges, why_replicated = _attention_split(config, unique, len(stage.cpu_ranks))
        kv_ranges.append(ranges)
        attention_on_cpu = stage.gpu_rank is None or any(p.kind == "cpu" for p in pins)
        if why_replicated and len(stage.cpu_ranks) > 1 and attention_on_cpu:
            notes.append(f"{stage.plan.host}: {why_replicated}")
    ffn_ranges: list[dict[str, list[tuple[int, int]]]] = [{} for _ in stages]
    gpu_expert_layers = {_layer_of(name) for name in unique
                         if _EXPERT.fullmatch(name) and _pin_of(name, pins, "gpu")}

    placements: list[TensorPlacement] = []
    narrow: set[str] = set()  # dense / shared-expert FFNs held whole by one worker
    for name, tensor in unique.items():
        shards: list[Shard] = []
        pinned = False
        for s in _holding_stages(name, config, stage_layers):
            stage = stages[s]
            cpu = stage.cpu_ranks
            pin = next((p for p in pins if p.regex.search(name)), None)
            to_gpu = stage.gpu_rank is not None and (pin is None or pin.kind != "cpu") and (
                (pin is not None and pin.kind == "gpu") or _on_gpu_by_default(name, config))
            if pin is not None and pin.kind == "numa":
                pinned = True
                shards.append(Shard(_rank_of_node(hosts[s], stage.plan, pin.index, name), None,
                                    0, 0, tensor.n_bytes))
            elif pin is not None and pin.kind == "gpu" and (
                    stage.gpu is None or stage.gpu.gpu.index != pin.index):
                raise PlanError(f"override pins {name} to gpu{pin.index}, but host "
                                f"{stage.plan.host!r}, which computes it, has no such GPU in "
                                f"the plan; pin it to a GPU of that host or to a numa node")
            elif to_gpu:
                pinned = True
                shards.append(Shard(stage.gpu_rank, None, 0, 0,  # type: ignore[arg-type]
                                    tensor.n_bytes))
            elif len(cpu) > 1 and _too_narrow_to_split(name, unique, len(cpu)):
                # Whole on one CPU worker, rotating with the layer; the others add zeros to
                # the FFN all-reduce, as for a pinned block.
                pinned = True
                narrow.add(name.removesuffix(".weight").replace("_gate", "")
                           .replace("_up", "").replace("_down", ""))
                shards.append(Shard(cpu[(_layer_of(name) or 0) % len(cpu)], None, 0, 0,
                                    tensor.n_bytes))
            elif len(cpu) > 1 and (_EXPERT.fullmatch(name) or _DENSE_FFN.fullmatch(name)):
                shards += _split_ffn(name, tensor, unique, cpu, options, config, ffn_ranges[s])
            elif len(cpu) > 1 and config.is_mla and _MLA_HEADS.fullmatch(name) and \
                    kv_ranges[s] is not None:
                shards += _split_mla(name, tensor, config, kv_ranges[s], cpu)
            elif len(cpu) > 1 and not config.is_mla and _ATTENTION.fullmatch(name) and \
                    kv_ranges[s] is not None:
                shards += _split_attention(name, tensor, config, kv_ranges[s], cpu)
            elif len(cpu) > 1 and name == OUTPUT:
                shards += [Shard(rank, 0, a, b, _slice_bytes(tensor, 0, a, b))
                           for rank, (a, b) in zip(cpu, _even_ranges(tensor.shape[0], len(cpu)),
                                                   strict=True)]
            else:
                holders = _replica_holders(name, stage, pin, gpu_expert_layers)
                shards += [Shard(rank, None, 0, 0, tensor.n_bytes) for rank in holders]
        replicated = all(shard.axis is None for shard in shards) and not pinned
        placements.append(TensorPlacement(name, tensor.ggml_type, tuple(tensor.shape),
                                          tensor.n_bytes, replicated, pinned, tuple(shards)))
    if narrow:
        notes.append(f"{len(narrow)} dense or shared-expert FFN(s) (e.g. {min(narrow)}) are "
                     f"fewer quant blocks wide than a stage has CPU workers: each is held "
                     f"whole by one worker, rotating with the layer")
    for stage, ranges_of in zip(stages, ffn_ranges, strict=True):
        whole = sorted({_layer_of(p.name) for p in placements if _EXPERT.fullmatch(p.name)
                        and any(sh.axis == 0 and sh.rank in stage.cpu_ranks for sh in p.shards)})
        if whole and options.strategy != STRATEGY_EXPERT_PARALLEL:
            notes.append(f"{stage.plan.host}: routed experts of {len(whole)} layer(s) split "
                         f"whole (expert parallel): their width is not a whole number of quant "
                         f"blocks per worker, and uneven slices would stall every layer's "
                         f"all-reduce")
        uneven = [(name, ranges) for name, ranges in ranges_of.items()
                  if len({b - a for a, b in ranges}) > 1]
        if uneven:
            name, ranges = uneven[0]
            notes.append(f"{stage.plan.host}: FFN slices are uneven ({name}: "
                         f"{'/'.join(str(b - a) for a, b in ranges)} columns, whole quant "
                         f"blocks each; the larger slice rotates over the workers layer by "
                         f"layer)")
    return placements


def _replica_holders(name: str, stage: _Stage, pin: _Pin | None,
                     gpu_expert_layers: set[int | None]) -> tuple[int, ...]:
    """Who holds a whole copy: the CPU workers for blocks kept off the GPU and for routers (the
    GPU routes nothing unless experts are pinned to it); every worker for the rest."""
    if stage.gpu_rank is None:
        return stage.cpu_ranks
    off_gpu = (pin is not None and pin.kind == "cpu") or bool(
        ATTENTION_BLOCK.fullmatch(name) or FFN_BLOCK.fullmatch(name) or name == OUTPUT)
    if _ROUTER.fullmatch(name):
        off_gpu = _layer_of(name) not in gpu_expert_layers
    return stage.cpu_ranks if off_gpu else stage.plan.ranks


def _pin_of(name: str, pins: Sequence[_Pin], kind: str) -> bool:
    pin = next((p for p in pins if p.regex.search(name)), None)
    return pin is not None and pin.kind == kind


def _compile_pins(options: PlanOptions, hosts: Sequence[Host]) -> list[_Pin]:
    pins = []
    node_ids = sorted({node.node_id for host in hosts for node in host.nodes})
    gpu_ids = sorted({gpu.index for host in hosts for node in host.nodes for gpu in node.gpus})
    for pattern, target in options.overrides:
        match = _PIN_TARGET.fullmatch(target)
        kind = "cpu" if match is None or match.group(1) is None else (
            "numa" if match.group(1).lower() == "numa" else "gpu")
        index = int(match.group(2)) if match is not None and match.group(2) else -1
        if match is None or (kind == "numa" and index not in node_ids):
            raise PlanError(f"override {pattern}={target}: the topology has nodes {node_ids}; "
                            f"pin to one of numa{', numa'.join(map(str, node_ids))}")
        if kind == "gpu" and (index not in gpu_ids or options.gpu == "off"):
            where = ("--gpu off plans no GPU worker" if options.gpu == "off"
                     else f"the topology has GPUs {gpu_ids}")
            raise PlanError(f"override {pattern}={target}: {where}; pin to a GPU the plan uses "
                            f"or to a numa node")
        pins.append(_Pin(re.compile(pattern), kind, index))
    return pins


def _rank_of_node(host: Host, stage: StagePlan, node_id: int, name: str) -> int:
    for tp_rank, node in enumerate(host.nodes):
        if node.node_id == node_id:
            return stage.ranks[tp_rank]
    raise PlanError(f"override pins {name} to numa{node_id}, but host {host.name!r}, which "
                    f"computes that tensor's layers, has nodes "
                    f"{[node.node_id for node in host.nodes]}; pin to one of those")


def _check_blocks(placements: Sequence[TensorPlacement]) -> None:
    """Within a layer, a block's tensors (attention q/k/v/output or MLA's; FFN gate/up/down)
    must be laid out alike: all split, all replicated, or all pinned to one worker. A pin that
    catches only some of them would leave a worker holding half a product. MLA's latent path
    (attn_q_a, attn_kv_a_mqa) is the exception: replicated beside split heads, since every
    worker computes the latent its heads read."""
    layouts: dict[tuple[str, str], dict[str, str]] = {}
    for tensor in placements:
        match = _LAYER.match(tensor.name)
        if match is None:
            continue
        if ATTENTION_BLOCK.fullmatch(tensor.name):
            part = "attn"
        elif FFN_BLOCK.fullmatch(tensor.name):
            kind = FFN_BLOCK.fullmatch(tensor.name).group(2) or ""  # type: ignore[union-attr]
            part = f"ffn{kind}"
        else:
            continue
        if tensor.pinned:
            layout = f"pinned to rank {tensor.shards[0].rank}"
        else:
            layout = "replicated" if tensor.replicated else "split"
        layouts.setdefault((match.group(1), part), {})[tensor.name] = layout
    for (layer, part), found in layouts.items():
        kinds = set(found.values())
        if part == "attn" and kinds == {"split", "replicated"} and all(
                _MLA_LATENT.fullmatch(name) for name, layout in found.items()
                if layout == "replicated"):
            continue
        if len(kinds) > 1:
            detail = ", ".join(f"{name}: {layout}" for name, layout in found.items())
            raise PlanError(f"layer {layer}: the {part} tensors are placed differently "
                            f"({detail}); pin a block's tensors together, e.g. "
                            f"'blk\\.{layer}\\.ffn_.*_exps\\.=numa0'")


# --- per-worker totals ------------------------------------------------------------------------


def _vocab_ranges(config: ModelConfig, last: _Stage, placements: Sequence[TensorPlacement]
                  ) -> dict[int, tuple[int, int]]:
    """[start, stop) of the logits each last-stage worker computes: its rows of output.weight,
    or, with a tied head, an even share among the workers holding token_embd (the GPU alone
    when it is one of them)."""
    by_name = {p.name: p for p in placements}
    ranks = set(last.plan.ranks)
    if not config.tied_output and OUTPUT in by_name:
        return {s.rank: (s.start, s.stop) if s.axis == 0 else (0, config.vocab_size)
                for s in by_name[OUTPUT].shards if s.rank in ranks}
    holders = [s.rank for s in by_name[TOKEN_EMBEDDING].shards if s.rank in ranks]
    if last.gpu_rank in holders:
        holders = [last.gpu_rank]  # type: ignore[list-item]
    return dict(zip(holders, _even_ranges(config.vocab_size, len(holders)), strict=True))


def _worker_plans(config: ModelConfig, hosts: Sequence[Host], stages: Sequence[_Stage],
                  placements: Sequence[TensorPlacement], options: PlanOptions,
                  notes: list[str]) -> tuple[list[WorkerPlan], list[WorkerLoad],
                                             list[WorkerRate]]:
    n_workers = sum(len(stage.plan.ranks) for stage in stages)
    vocab_ranges = _vocab_ranges(config, stages[-1], placements)
    tallies = tally(config, placements, n_workers, set(stages[0].plan.ranks),
                    {rank: s.plan.layers[0] for s in stages for rank in s.plan.ranks},
                    vocab_ranges)
    workers, rates = [], []
    for stage in stages:
        host = hosts[stage.plan.index]
        gpu_cpu = stage.gpu.driver_cpu(host) if stage.gpu is not None else None
        for tp_rank, rank in enumerate(stage.plan.ranks):
            is_gpu = rank == stage.gpu_rank
            node = host.nodes[stage.gpu.node_index if is_gpu else tp_rank]  # type: ignore[union-attr]
            if is_gpu:
                gpu = stage.gpu.gpu  # type: ignore[union-attr]
                known_bw, tflops, known = gpu_spec(gpu.name)
                bandwidth = options.gpu_bandwidth_gbs or known_bw
                assumed = not known and not options.gpu_bandwidth_gbs
                if assumed:
                    notes.append(f"{host.name} GPU {gpu.index} ({gpu.name!r}): not in the known "
                                 f"GPU table, assumed {bandwidth:g} GB/s (set gpu_bandwidth_gbs)")
                cpus: tuple[int, ...] = (gpu_cpu,)  # type: ignore[assignment]
                memory = gpu.memory_bytes - options.gpu_reserve_bytes
                device = f"cuda:{gpu.index}"
                gflops = tflops * 1000 * options.calibration.gpu_compute_efficiency
            else:
                assumed = node.read_bandwidth_gbs is None
                if assumed:
                    notes.append(f"{host.name} node {node.node_id}: read bandwidth unknown, "
                                 f"assumed {options.default_bandwidth_gbs:g} GB/s (run "
                                 f"`numoe membw`)")
                bandwidth = (options.default_bandwidth_gbs if assumed
                             else float(node.read_bandwidth_gbs))  # type: ignore[arg-type]
                cpus = tuple(c for c in node.cpus if c != gpu_cpu) or node.cpus
                memory, device = node.memory_bytes, "cpu"
                gflops = len(cpus) * options.calibration.core_gflops
            counted = tallies[rank]
            counted.load.kv_bytes_per_context_token = (counted.kv_elements
                                                       * options.kv_bytes_per_element)
            rates.append(WorkerRate(device, len(cpus), bandwidth, gflops))
            workers.append(WorkerPlan(
                rank=rank, host=host.name, node_id=node.node_id, stage=stage.plan.index,
                tp_rank=tp_rank, layers=stage.plan.layers,
                vocab=vocab_ranges.get(rank, (0, 0)), cpus=cpus, node_memory_bytes=memory,
                kv_heads=counted.first_layer_heads, weight_bytes=counted.weight_bytes,
                kv_bytes=counted.kv_elements * options.ctx * options.kv_bytes_per_element,
                kv_bytes_per_token=counted.kv_elements * options.kv_bytes_per_element,
                decode_bytes_per_token=counted.decode_bytes, bandwidth_gbs=bandwidth,
                bandwidth_assumed=assumed, n_tensors=counted.n_tensors, device=device,
                compute_gflops=gflops))
    return workers, [counted.load for counted in tallies], rates


def _reduces_per_stage(placements: Sequence[TensorPlacement], stages: Sequence[StagePlan]
                       ) -> list[int]:
    """All-reduces per token in each stage: one per split block of each layer it runs."""
    by_layer: dict[int, list[TensorPlacement]] = {}
    for placement in placements:
        layer = _layer_of(placement.name)
        if layer is not None:
            by_layer.setdefault(layer, []).append(placement)
    counts = []
    for stage in stages:
        ranks = set(stage.ranks)
        counts.append(sum(is_block_split(by_layer.get(layer, []), block, ranks)
                          for layer in range(*stage.layers) for block in ("attention", "ffn")))
    return counts
