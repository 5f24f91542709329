"""Placement: (model metadata, topology, options) -> Plan of which worker holds which bytes.

`make_plan` is a pure function of metadata: it reads tensor names, quant types, shapes and byte
sizes (a GGUF's tensor index, no weights) and the topology, and does no I/O. The Plan is frozen
and `to_dict()` gives plain JSON-ready data.

One worker per NUMA node; ranks number the nodes host by host. Across hosts the plan is a
pipeline: host s is stage s and computes a contiguous range of layers (the first stage also
embeds the tokens, the last one applies the LM head). Inside a stage the workers split every
layer (tensor parallel, the default):

* routed expert tensors (`*_exps`) are split along the expert intermediate dimension: gate/up
  rows [a, b) (axis 1 of [E, F, H]), down columns [a, b) (axis 2 of [E, H, F]); a and b are
  multiples of the down tensor's quant block, so every slice holds whole blocks. With
  strategy "expert_parallel" they are split by whole experts instead (axis 0);
* dense FFN and shared-expert tensors are split the same way (gate/up rows, down columns);
* attention is split by KV-head groups: worker r owns kv heads [k0, k1), so q rows of the query
  heads of those groups, k/v rows of those kv heads and the matching attn_output columns;
* the LM head (output.weight) is split by vocabulary rows; each last-stage worker computes the
  logits of its `vocab` range and the coordinator concatenates them. A tied LM head
  (token_embd) is replicated and each worker reads only its rows;
* everything else (embeddings, norms, router) is replicated on the stage's workers.

Every block (attention, FFN) whose tensors are split ends in an all-reduce of the stage's
partial sums; `block_is_split` says which do, so executors never re-derive the layout.
* `PlanOptions.overrides` pins tensors whose name matches a regex whole to one node, the way
  llama.cpp users write `--override-tensor 'blk\\..*\\.ffn_.*_exps\\.=numa0'`.

Bytes per decode token follow bench/roofline.py: non-expert slices fully, expert slices times
n_experts_used / n_experts, one row of token_embd (all of it when it is the tied LM head).
Predicted decode tok/s = min over workers of node read bandwidth / that worker's bytes per
token (communication is not modelled yet).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

from cluster.errors import NumoeError
from cluster.gguf import type_block
from cluster.model import ModelConfig
from cluster.topology import GIB, Host, Topology

STRATEGY_TENSOR_PARALLEL = "tensor_parallel"
STRATEGY_EXPERT_PARALLEL = "expert_parallel"
STRATEGIES = (STRATEGY_TENSOR_PARALLEL, STRATEGY_EXPERT_PARALLEL)
OUTPUT = "output.weight"
OUTPUT_NORM = "output_norm.weight"
TOKEN_EMBEDDING = "token_embd.weight"
EXPERT_SUFFIX = "_exps.weight"
DEFAULT_BANDWIDTH_GBS = 50.0  # assumed per-node read bandwidth when the topology lacks one
_ATTENTION = re.compile(r"blk\.\d+\.attn_(q|k|v|output)\.weight")
_EXPERT = re.compile(r"blk\.\d+\.ffn_(gate|up|down)_exps\.weight")
# Dense FFN and shared experts: split along their intermediate dimension like routed experts.
_DENSE_FFN = re.compile(r"blk\.\d+\.ffn_(gate|up|down)(_shexp)?\.weight")
_FFN_BLOCK = re.compile(r"blk\.\d+\.ffn_(gate|up|down)(_exps|_shexp)?\.weight")
_LAYER = re.compile(r"blk\.(\d+)\.")
_OVERRIDE_NODE = re.compile(r"numa(\d+)")


class PlanError(NumoeError):
    """The model cannot be placed on the topology (message says where, by how much, and a fix)."""


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
    overrides: tuple[tuple[str, str], ...] = ()  # (regex, "numaN"): matching tensors whole to N
    default_bandwidth_gbs: float = DEFAULT_BANDWIDTH_GBS
    strategy: str = STRATEGY_TENSOR_PARALLEL  # how a stage splits the routed experts
    layer_split: tuple[int, ...] = ()  # layers per pipeline stage (default: as even as can be)


@dataclass(frozen=True)
class Shard:
    """One worker's piece of a tensor: the whole tensor when axis is None."""

    rank: int
    axis: int | None
    start: int
    stop: int
    n_bytes: int
    block_aligned: bool = False  # start/stop are multiples of the tensor's quant block


@dataclass(frozen=True)
class TensorPlacement:
    name: str
    ggml_type: int
    shape: tuple[int, ...]
    n_bytes: int
    replicated: bool  # every worker holds all of it
    pinned: bool  # placed whole by a user override
    shards: tuple[Shard, ...]

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(shard.rank for shard in self.shards)


@dataclass(frozen=True)
class StagePlan:
    """One pipeline stage: a host's workers, which compute layers [start, stop) together."""

    index: int
    host: str
    layers: tuple[int, int]
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class WorkerPlan:
    rank: int
    host: str
    node_id: int
    stage: int  # pipeline stage (index into Plan.stages)
    tp_rank: int  # this worker's index inside its stage
    layers: tuple[int, int]  # [start, stop) of the layers it computes
    vocab: tuple[int, int]  # [start, stop) of the logits it computes; (0, 0) off the last stage
    cpus: tuple[int, ...]
    node_memory_bytes: int
    kv_heads: tuple[int, int]  # [start, stop) of the kv heads this worker attends over
    weight_bytes: int
    kv_bytes: int
    decode_bytes_per_token: int
    bandwidth_gbs: float
    bandwidth_assumed: bool  # True when the topology gave no bandwidth for this node
    n_tensors: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    @property
    def predicted_decode_tok_s(self) -> float:
        if self.decode_bytes_per_token == 0:
            return float("inf")
        return self.bandwidth_gbs * 1e9 / self.decode_bytes_per_token


@dataclass(frozen=True)
class Plan:
    strategy: str
    architecture: str
    ctx: int
    stages: tuple[StagePlan, ...]
    workers: tuple[WorkerPlan, ...]
    tensors: tuple[TensorPlacement, ...]
    notes: tuple[str, ...] = field(default=())  # assumptions and fallbacks, in words

    @property
    def predicted_decode_tok_s(self) -> float:
        """Stages run one after another; a stage's workers in parallel (the slowest bounds it)."""
        seconds = 0.0
        for stage in self.stages:
            slowest = min(self.workers[rank].predicted_decode_tok_s for rank in stage.ranks)
            seconds += 1.0 / slowest if slowest > 0 else float("inf")
        return 1.0 / seconds if seconds > 0 else float("inf")

    def shards_of(self, rank: int) -> list[tuple[TensorPlacement, Shard]]:
        """Every tensor `rank` holds, with its piece of it, in file order."""
        return [(tensor, shard) for tensor in self.tensors for shard in tensor.shards
                if shard.rank == rank]

    def block_is_split(self, stage: int, layer: int, block: str) -> bool:
        """Whether the stage's workers each compute a part of `block` ("attention" or "ffn") of
        `layer`, so its output must be all-reduced; False when each computes all of it."""
        prefix = f"blk.{layer}."
        pattern = _ATTENTION if block == "attention" else _FFN_BLOCK
        ranks = set(self.stages[stage].ranks)
        for tensor in self.tensors:
            if tensor.name.startswith(prefix) and pattern.fullmatch(tensor.name):
                held = [s for s in tensor.shards if s.rank in ranks]
                if len(ranks) > 1 and not (tensor.replicated and len(held) == len(ranks)):
                    return True
        return False

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data; `plan_from_dict` turns it back into the same Plan."""
        workers = []
        for worker in self.workers:
            data = asdict(worker)
            data["total_bytes"] = worker.total_bytes
            data["predicted_decode_tok_s"] = worker.predicted_decode_tok_s
            workers.append(data)
        tensors = []
        for tensor in self.tensors:
            data = asdict(tensor)
            data["ranks"] = list(tensor.ranks)
            tensors.append(data)
        return _jsonable({"strategy": self.strategy, "architecture": self.architecture,
                          "ctx": self.ctx, "predicted_decode_tok_s": self.predicted_decode_tok_s,
                          "notes": list(self.notes),
                          "stages": [asdict(stage) for stage in self.stages],
                          "workers": workers, "tensors": tensors})


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


def _fields_of(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """The dataclass fields of `cls` from `data` (derived keys such as total_bytes dropped),
    lists turned back into tuples."""
    names = {f.name for f in fields(cls)}
    return {key: tuple(value) if isinstance(value, list) else value
            for key, value in data.items() if key in names}


def plan_from_dict(data: Mapping[str, Any]) -> Plan:
    """The inverse of Plan.to_dict: how a plan travels to workers (as JSON, never pickled)."""
    try:
        tensors = tuple(
            TensorPlacement(**{**_fields_of(TensorPlacement, t),
                               "shards": tuple(Shard(**s) for s in t["shards"])})
            for t in data["tensors"])
        return Plan(strategy=data["strategy"], architecture=data["architecture"],
                    ctx=int(data["ctx"]),
                    stages=tuple(StagePlan(**_fields_of(StagePlan, s)) for s in data["stages"]),
                    workers=tuple(WorkerPlan(**_fields_of(WorkerPlan, w))
                                  for w in data["workers"]),
                    tensors=tensors, notes=tuple(data.get("notes", ())))
    except (KeyError, TypeError, ValueError) as error:
        raise PlanError(f"not a numoe plan ({error}); make one with `numoe plan --json`") \
            from error


# ---------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[str, str]:
    """`REGEX=numaN` (llama.cpp's --override-tensor form) -> (regex, "numaN")."""
    pattern, sep, target = text.rpartition("=")
    if not sep or not pattern or _OVERRIDE_NODE.fullmatch(target) is None:
        raise PlanError(f"--override-tensor {text!r}: write REGEX=numaN, e.g. "
                        f"'blk\\..*\\.ffn_.*_exps\\.=numa0'")
    try:
        re.compile(pattern)
    except re.error as error:
        raise PlanError(f"--override-tensor {text!r}: {pattern!r} is not a valid regular "
                        f"expression ({error}); fix the pattern") from error
    return pattern, target


def _even_ranges(units: int, parts: int) -> list[tuple[int, int]]:
    base, extra = divmod(units, parts)
    ranges, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
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
    """kv-head ranges per worker, or None (and why) when attention must be replicated."""
    if n_workers == 1:
        return [(0, config.n_kv_heads)], None
    if config.n_kv_heads < n_workers:
        return None, (f"attention replicated: {config.n_kv_heads} kv heads cannot be shared by "
                      f"{n_workers} workers")
    group = config.n_heads // config.n_kv_heads
    ranges = _even_ranges(config.n_kv_heads, n_workers)
    for name, tensor in tensors.items():
        if name.endswith("attn_output.weight"):
            block = type_block(tensor.ggml_type)[0]
            if any((k * group * config.value_head_dim) % block for k, _ in ranges):
                return None, (f"attention replicated: {name}'s quant blocks ({block} columns) "
                              f"do not align with kv-head groups")
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


def _block_ranges(down: TensorLike, width: int, n_workers: int) -> list[tuple[int, int]]:
    """Even ranges of an FFN's intermediate dimension whose bounds are multiples of the down
    tensor's quant block, so the down columns of every slice hold whole blocks."""
    block = type_block(down.ggml_type)[0]
    units = width // block
    if units * block != width:
        raise PlanError(f"{down.name}: intermediate width {width} is not a multiple of its "
                        f"quant block {block}; the file is corrupt: re-convert it")
    if units < n_workers:
        raise PlanError(f"{down.name}: {units} quant blocks wide cannot be split over "
                        f"{n_workers} workers; use fewer NUMA nodes per host")
    return [(a * block, b * block) for a, b in _even_ranges(units, n_workers)]


def _split_ffn(name: str, tensor: TensorLike, tensors: Mapping[str, TensorLike],
               ranks: Sequence[int], options: PlanOptions, config: ModelConfig,
               cache: dict[str, list[tuple[int, int]]]) -> tuple[Shard, ...]:
    """Shards of a routed-expert, shared-expert or dense FFN tensor over a stage's `ranks`."""
    is_down = "_down" in name
    expert = _EXPERT.fullmatch(name) is not None
    if expert and options.strategy == STRATEGY_EXPERT_PARALLEL:
        if config.n_experts < len(ranks):
            raise PlanError(f"expert parallel: {config.n_experts} experts cannot be shared by "
                            f"{len(ranks)} workers; use --strategy tensor_parallel")
        ranges = _even_ranges(config.n_experts, len(ranks))
        return tuple(Shard(rank, 0, a, b, _slice_bytes(tensor, 0, a, b))
                     for rank, (a, b) in zip(ranks, ranges, strict=True))
    down_name = name.replace("_gate", "_down").replace("_up", "_down")
    if down_name not in cache:
        down = tensors[down_name]
        cache[down_name] = _block_ranges(down, down.shape[-1], len(ranks))
    axis = len(tensor.shape) - 1 if is_down else len(tensor.shape) - 2
    return tuple(Shard(rank, axis, a, b, _slice_bytes(tensor, axis, a, b),
                       block_aligned=is_down)
                 for rank, (a, b) in zip(ranks, cache[down_name], strict=True))


def _holding_stages(name: str, config: ModelConfig, stage_layers: list[tuple[int, int]]
                    ) -> list[int]:
    """Which pipeline stages need tensor `name`."""
    last = len(stage_layers) - 1
    match = _LAYER.match(name)
    if match:
        layer = int(match.group(1))
        return [s for s, (a, b) in enumerate(stage_layers) if a <= layer < b]
    if name == TOKEN_EMBEDDING:
        return sorted({0, last}) if config.tied_output else [0]
    if name in (OUTPUT, OUTPUT_NORM):
        return [last]
    return list(range(len(stage_layers)))  # model-wide small tensors (e.g. rope factors)


def make_plan(model: ModelSpec, topology: Topology, options: PlanOptions) -> Plan:
    config = model.config
    if options.ctx < 0:
        raise PlanError(f"--ctx {options.ctx}: give a context of at least 0 tokens")
    if options.strategy not in STRATEGIES:
        raise PlanError(f"strategy {options.strategy!r} is unknown; choose one of "
                        f"{', '.join(STRATEGIES)}")
    hosts = topology.hosts
    stage_layers = _stage_layers(config.n_layers, len(hosts), options.layer_split)
    stages: list[StagePlan] = []
    next_rank = 0
    for index, host in enumerate(hosts):
        ranks = tuple(range(next_rank, next_rank + len(host.nodes)))
        next_rank += len(host.nodes)
        stages.append(StagePlan(index, host.name, stage_layers[index], ranks))

    pins = _compile_pins(options, hosts)
    notes: list[str] = []
    unique = {tensor.name: tensor for tensor in model.tensors.values()}  # drop aliases
    kv_ranges: list[list[tuple[int, int]] | None] = []
    for stage in stages:
        ranges, why_replicated = _attention_split(config, unique, len(stage.ranks))
        kv_ranges.append(ranges)
        if why_replicated and len(stage.ranks) > 1:
            notes.append(f"{stage.host}: {why_replicated}")
    ffn_ranges: list[dict[str, list[tuple[int, int]]]] = [{} for _ in stages]

    placements: list[TensorPlacement] = []
    for name, tensor in unique.items():
        shards: list[Shard] = []
        pinned = False
        for s in _holding_stages(name, config, stage_layers):
            stage = stages[s]
            ranks = stage.ranks
            pinned_node = next((node for regex, node in pins if regex.search(name)), None)
            if pinned_node is not None:
                pinned = True
                shards.append(Shard(_rank_of_node(hosts[s], stage, pinned_node, name), None, 0, 0,
                                    tensor.n_bytes))
            elif len(ranks) > 1 and (_EXPERT.fullmatch(name) or _DENSE_FFN.fullmatch(name)):
                shards += _split_ffn(name, tensor, unique, ranks, options, config, ffn_ranges[s])
            elif len(ranks) > 1 and _ATTENTION.fullmatch(name) and kv_ranges[s] is not None:
                shards += _split_attention(name, tensor, config, kv_ranges[s], ranks)
            elif len(ranks) > 1 and name == OUTPUT:
                shards += [Shard(rank, 0, a, b, _slice_bytes(tensor, 0, a, b))
                           for rank, (a, b) in zip(ranks, _even_ranges(tensor.shape[0],
                                                                       len(ranks)), strict=True)]
            else:
                shards += [Shard(rank, None, 0, 0, tensor.n_bytes) for rank in ranks]
        replicated = all(shard.axis is None for shard in shards) and not pinned
        placements.append(TensorPlacement(name, tensor.ggml_type, tuple(tensor.shape),
                                          tensor.n_bytes, replicated, pinned, tuple(shards)))

    _check_blocks(placements)
    workers = _worker_plans(config, hosts, stages, placements, kv_ranges, options, notes)
    for worker in workers:
        if worker.total_bytes > worker.node_memory_bytes:
            shortfall = (worker.total_bytes - worker.node_memory_bytes) / GIB
            raise PlanError(
                f"the model does not fit: worker {worker.rank} on host {worker.host!r} node "
                f"{worker.node_id} needs {worker.total_bytes / GIB:.2f} GiB (weights "
                f"{worker.weight_bytes / GIB:.2f} + KV cache {worker.kv_bytes / GIB:.2f}) but "
                f"the node has {worker.node_memory_bytes / GIB:.2f} GiB, {shortfall:.2f} GiB "
                f"short; use more NUMA nodes, a smaller quant type, or a lower --ctx")
    return Plan(options.strategy, config.architecture, options.ctx, tuple(stages),
                tuple(workers), tuple(placements), tuple(notes))


def _compile_pins(options: PlanOptions, hosts: Sequence[Host]
                  ) -> list[tuple[re.Pattern[str], int]]:
    pins = []
    node_ids = sorted({node.node_id for host in hosts for node in host.nodes})
    for pattern, target in options.overrides:
        match = _OVERRIDE_NODE.fullmatch(target)
        node_id = int(match.group(1)) if match else -1
        if node_id not in node_ids:
            raise PlanError(f"override {pattern}={target}: the topology has nodes {node_ids}; "
                            f"pin to one of numa{', numa'.join(map(str, node_ids))}")
        pins.append((re.compile(pattern), node_id))
    return pins


def _rank_of_node(host: Host, stage: StagePlan, node_id: int, name: str) -> int:
    for tp_rank, node in enumerate(host.nodes):
        if node.node_id == node_id:
            return stage.ranks[tp_rank]
    raise PlanError(f"override pins {name} to numa{node_id}, but host {host.name!r}, which "
                    f"computes that tensor's layers, has nodes "
                    f"{[node.node_id for node in host.nodes]}; pin to one of those")


def _check_blocks(placements: Sequence[TensorPlacement]) -> None:
    """Within a layer, a block's tensors (attention q/k/v/output; FFN gate/up/down) must be laid
    out alike: all split, all replicated, or all pinned to one worker. A pin that catches only
    some of them would leave a worker holding half a product."""
    layouts: dict[tuple[str, str], dict[tuple[str, str], str]] = {}
    for tensor in placements:
        match = _LAYER.match(tensor.name)
        if match is None:
            continue
        if _ATTENTION.fullmatch(tensor.name):
            block, part = "attention", "attn"
        elif _FFN_BLOCK.fullmatch(tensor.name):
            kind = _FFN_BLOCK.fullmatch(tensor.name).group(2) or ""  # type: ignore[union-attr]
            block, part = "ffn", f"ffn{kind}"
        else:
            continue
        if tensor.pinned:
            layout = f"pinned to rank {tensor.shards[0].rank}"
        else:
            layout = "replicated" if tensor.replicated else "split"
        layouts.setdefault((match.group(1), part), {})[(tensor.name, block)] = layout
    for (layer, part), found in layouts.items():
        if len(set(found.values())) > 1:
            detail = ", ".join(f"{name}: {layout}" for (name, _), layout in found.items())
            raise PlanError(f"layer {layer}: the {part} tensors are placed differently "
                            f"({detail}); pin a block's tensors together, e.g. "
                            f"'blk\\.{layer}\\.ffn_.*_exps\\.=numa0'")


def _worker_plans(config: ModelConfig, hosts: Sequence[Host], stages: Sequence[StagePlan],
                  placements: Sequence[TensorPlacement],
                  kv_ranges: Sequence[list[tuple[int, int]] | None], options: PlanOptions,
                  notes: list[str]) -> list[WorkerPlan]:
    n_workers = sum(len(stage.ranks) for stage in stages)
    weight = [0] * n_workers
    per_token = [0] * n_workers
    counts = [0] * n_workers
    kv_heads_held = [0] * n_workers  # summed over layers
    last = stages[-1]
    vocab_ranges = dict(zip(last.ranks, _even_ranges(config.vocab_size, len(last.ranks)),
                            strict=True))
    for placement in placements:
        for shard in placement.shards:
            rank = shard.rank
            weight[rank] += shard.n_bytes
            counts[rank] += 1
            if placement.name == TOKEN_EMBEDDING:
                row = shard.n_bytes // placement.shape[0]
                reads = row if rank in stages[0].ranks else 0
                if config.tied_output and rank in vocab_ranges:
                    v0, v1 = vocab_ranges[rank]
                    reads += row * (v1 - v0)
                per_token[rank] += reads
            elif placement.name.endswith(EXPERT_SUFFIX):
                per_token[rank] += shard.n_bytes * config.n_experts_used // config.n_experts
            else:
                per_token[rank] += shard.n_bytes
            if placement.name.endswith("attn_k.weight"):
                kv_heads_held[rank] += ((shard.stop - shard.start) // config.head_dim
                                        if shard.axis is not None else config.n_kv_heads)
    kv_per_head_layer = (options.ctx * (config.head_dim + config.value_head_dim)
                         * options.kv_bytes_per_element)
    workers = []
    for stage in stages:
        host = hosts[stage.index]
        for tp_rank, (rank, node) in enumerate(zip(stage.ranks, host.nodes, strict=True)):
            ranges = kv_ranges[stage.index]
            heads = ranges[tp_rank] if ranges is not None else (0, config.n_kv_heads)
            assumed = node.read_bandwidth_gbs is None
            if assumed:
                notes.append(f"{host.name} node {node.node_id}: read bandwidth unknown, assumed "
                             f"{options.default_bandwidth_gbs:g} GB/s (run `numoe membw`)")
            workers.append(WorkerPlan(
                rank=rank, host=host.name, node_id=node.node_id, stage=stage.index,
                tp_rank=tp_rank, layers=stage.layers, vocab=vocab_ranges.get(rank, (0, 0)),
                cpus=node.cpus, node_memory_bytes=node.memory_bytes, kv_heads=heads,
                weight_bytes=weight[rank], kv_bytes=kv_per_head_layer * kv_heads_held[rank],
                decode_bytes_per_token=per_token[rank],
                bandwidth_gbs=(options.default_bandwidth_gbs if assumed
                               else float(node.read_bandwidth_gbs)),  # type: ignore[arg-type]
                bandwidth_assumed=assumed, n_tensors=counts[rank]))
    return workers


def format_plan_table(plan: Plan) -> str:
    """A readable per-worker table plus the plan's notes and predicted decode speed."""
    from cluster.topology import format_cpu_list  # noqa: PLC0415

    header = ("rank", "stage", "layers", "node", "cpus", "tensors", "weights GiB", "KV GiB",
              "total GiB", "MB/token", "pred tok/s")
    rows = [header]
    for w in plan.workers:
        rows.append((str(w.rank), str(w.stage), f"{w.layers[0]}-{w.layers[1] - 1}",
                     f"{w.host}:{w.node_id}", format_cpu_list(w.cpus),
                     str(w.n_tensors), f"{w.weight_bytes / GIB:.3f}", f"{w.kv_bytes / GIB:.3f}",
                     f"{w.total_bytes / GIB:.3f}", f"{w.decode_bytes_per_token / 1e6:.2f}",
                     f"{w.predicted_decode_tok_s:.1f}"))
    widths = [max(len(row[col]) for row in rows) for col in range(len(header))]
    lines = [f"plan: {plan.strategy}, {plan.architecture}, ctx {plan.ctx}, "
             f"{len(plan.workers)} worker(s)"]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip() for row in rows]
    lines.append(f"predicted decode: {plan.predicted_decode_tok_s:.1f} tok/s "
                 f"(slowest worker; communication not modelled)")
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)
