"""Placement: (model metadata, topology, options) -> Plan of which worker holds which bytes.

`make_plan` is a pure function of metadata: it reads tensor names, quant types, shapes and byte
sizes (a GGUF's tensor index, no weights) and the topology, and does no I/O. The Plan is frozen
and `to_dict()` gives plain JSON-ready data.

Strategy of this first cut: tensor parallel across the NUMA nodes of ONE host, one worker per
node (rank i = the i-th node of the host):

* routed expert tensors (`*_exps`) are split along the expert intermediate dimension: gate/up
  rows [a, b) (axis 1 of [E, F, H]), down columns [a, b) (axis 2 of [E, H, F]); a and b are
  multiples of the down tensor's quant block, so every slice holds whole blocks;
* attention is split by KV-head groups: worker r owns kv heads [k0, k1), so q rows of the query
  heads of those groups, k/v rows of those kv heads and the matching attn_output columns;
* everything else (embeddings, LM head, norms, router, dense FFN) is replicated on every worker;
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
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from cluster.errors import NumoeError
from cluster.gguf import type_block
from cluster.model import ModelConfig
from cluster.topology import GIB, Host, NumaNode, Topology

STRATEGY_TENSOR_PARALLEL = "tensor_parallel"
TOKEN_EMBEDDING = "token_embd.weight"
EXPERT_SUFFIX = "_exps.weight"
DEFAULT_BANDWIDTH_GBS = 50.0  # assumed per-node read bandwidth when the topology lacks one
_ATTENTION = re.compile(r"blk\.\d+\.attn_(q|k|v|output)\.weight")
_EXPERT = re.compile(r"blk\.\d+\.ffn_(gate|up|down)_exps\.weight")
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
    host: str | None = None  # which host to plan on (default: the only one)


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
class WorkerPlan:
    rank: int
    host: str
    node_id: int
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
    workers: tuple[WorkerPlan, ...]
    tensors: tuple[TensorPlacement, ...]
    notes: tuple[str, ...] = field(default=())  # assumptions and fallbacks, in words

    @property
    def predicted_decode_tok_s(self) -> float:
        return min(worker.predicted_decode_tok_s for worker in self.workers)

    def to_dict(self) -> dict[str, Any]:
        workers = []
        for worker in self.workers:
            data = asdict(worker)
            data["cpus"] = list(worker.cpus)
            data["kv_heads"] = list(worker.kv_heads)
            data["total_bytes"] = worker.total_bytes
            data["predicted_decode_tok_s"] = worker.predicted_decode_tok_s
            workers.append(data)
        tensors = []
        for tensor in self.tensors:
            data = asdict(tensor)
            data["shape"] = list(tensor.shape)
            data["ranks"] = list(tensor.ranks)
            data["shards"] = [asdict(shard) for shard in tensor.shards]
            tensors.append(data)
        return {"strategy": self.strategy, "architecture": self.architecture, "ctx": self.ctx,
                "predicted_decode_tok_s": self.predicted_decode_tok_s,
                "notes": list(self.notes), "workers": workers, "tensors": tensors}


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


def _choose_host(topology: Topology, options: PlanOptions) -> Host:
    if options.host is not None:
        for host in topology.hosts:
            if host.name == options.host:
                return host
        raise PlanError(f"host {options.host!r} is not in the topology (hosts: "
                        f"{[h.name for h in topology.hosts]}); pick one of those")
    if len(topology.hosts) != 1:
        raise PlanError(f"the topology has {len(topology.hosts)} hosts; planning across hosts "
                        f"(pipeline parallel) is not written yet: name one host")
    return topology.hosts[0]


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
                     kv_ranges: list[tuple[int, int]]) -> tuple[Shard, ...]:
    kind = _ATTENTION.fullmatch(name).group(1)  # type: ignore[union-attr]
    group = config.n_heads // config.n_kv_heads
    unit, axis = {"q": (group * config.head_dim, 0), "k": (config.head_dim, 0),
                  "v": (config.value_head_dim, 0),
                  "output": (group * config.value_head_dim, len(tensor.shape) - 1)}[kind]
    return tuple(
        Shard(rank, axis, k0 * unit, k1 * unit, _slice_bytes(tensor, axis, k0 * unit, k1 * unit),
              block_aligned=kind == "output")
        for rank, (k0, k1) in enumerate(kv_ranges))


def _expert_ranges(config: ModelConfig, tensors: Mapping[str, TensorLike], layer_prefix: str,
                   n_workers: int) -> list[tuple[int, int]]:
    down = tensors[layer_prefix + "ffn_down_exps.weight"]
    block = type_block(down.ggml_type)[0]
    units = config.n_ff_expert // block
    if units * block != config.n_ff_expert:
        raise PlanError(f"{down.name}: expert width {config.n_ff_expert} is not a multiple of its "
                        f"quant block {block}; the file is corrupt: re-convert it")
    return [(a * block, b * block) for a, b in _even_ranges(units, n_workers)]


def make_plan(model: ModelSpec, topology: Topology, options: PlanOptions) -> Plan:
    config = model.config
    host = _choose_host(topology, options)
    nodes: tuple[NumaNode, ...] = host.nodes
    n_workers = len(nodes)
    rank_of_node = {node.node_id: rank for rank, node in enumerate(nodes)}
    if options.ctx < 0:
        raise PlanError(f"--ctx {options.ctx}: give a context of at least 0 tokens")
    pins: list[tuple[re.Pattern[str], int]] = []
    for pattern, target in options.overrides:
        match = _OVERRIDE_NODE.fullmatch(target)
        node_id = int(match.group(1)) if match else -1
        if node_id not in rank_of_node:
            raise PlanError(f"override {pattern}={target}: host {host.name!r} has nodes "
                            f"{sorted(rank_of_node)}; pin to one of numa"
                            f"{', numa'.join(map(str, sorted(rank_of_node)))}")
        pins.append((re.compile(pattern), rank_of_node[node_id]))

    notes: list[str] = []
    unique = {tensor.name: tensor for tensor in model.tensors.values()}  # drop aliases
    kv_ranges, why_replicated = _attention_split(config, unique, n_workers)
    if why_replicated:
        notes.append(why_replicated)
    expert_ranges: dict[str, list[tuple[int, int]]] = {}

    placements: list[TensorPlacement] = []
    for name, tensor in unique.items():
        pinned_rank = next((rank for regex, rank in pins if regex.search(name)), None)
        replicated = pinned = False
        if pinned_rank is not None:
            pinned = True
            shards = (Shard(pinned_rank, None, 0, 0, tensor.n_bytes),)
        elif _EXPERT.fullmatch(name) and n_workers > 1:
            prefix = name[: name.index("ffn_")]
            if prefix not in expert_ranges:
                expert_ranges[prefix] = _expert_ranges(config, unique, prefix, n_workers)
            axis = 2 if "down" in name else 1
            shards = tuple(Shard(rank, axis, a, b, _slice_bytes(tensor, axis, a, b),
                                 block_aligned=True)
                           for rank, (a, b) in enumerate(expert_ranges[prefix]))
        elif _ATTENTION.fullmatch(name) and kv_ranges is not None and n_workers > 1:
            shards = _split_attention(name, tensor, config, kv_ranges)
        else:
            replicated = True
            shards = tuple(Shard(rank, None, 0, 0, tensor.n_bytes) for rank in range(n_workers))
        placements.append(TensorPlacement(name, tensor.ggml_type, tuple(tensor.shape),
                                          tensor.n_bytes, replicated, pinned, shards))

    workers = _worker_plans(config, host, placements, kv_ranges, options, notes)
    for worker in workers:
        if worker.total_bytes > worker.node_memory_bytes:
            shortfall = (worker.total_bytes - worker.node_memory_bytes) / GIB
            raise PlanError(
                f"the model does not fit: worker {worker.rank} on host {host.name!r} node "
                f"{worker.node_id} needs {worker.total_bytes / GIB:.2f} GiB (weights "
                f"{worker.weight_bytes / GIB:.2f} + KV cache {worker.kv_bytes / GIB:.2f}) but "
                f"the node has {worker.node_memory_bytes / GIB:.2f} GiB, {shortfall:.2f} GiB "
                f"short; use more NUMA nodes, a smaller quant type, or a lower --ctx")
    return Plan(STRATEGY_TENSOR_PARALLEL, config.architecture, options.ctx, tuple(workers),
                tuple(placements), tuple(notes))


def _worker_plans(config: ModelConfig, host: Host, placements: Sequence[TensorPlacement],
                  kv_ranges: list[tuple[int, int]] | None, options: PlanOptions,
                  notes: list[str]) -> list[WorkerPlan]:
    n_workers = len(host.nodes)
    weight = [0] * n_workers
    per_token = [0] * n_workers
    counts = [0] * n_workers
    for placement in placements:
        for shard in placement.shards:
            weight[shard.rank] += shard.n_bytes
            counts[shard.rank] += 1
            if placement.name == TOKEN_EMBEDDING:
                per_token[shard.rank] += (shard.n_bytes if config.tied_output
                                          else shard.n_bytes // placement.shape[0])
            elif placement.name.endswith(EXPERT_SUFFIX):
                per_token[shard.rank] += (shard.n_bytes * config.n_experts_used
                                          // config.n_experts)
            else:
                per_token[shard.rank] += shard.n_bytes
    kv_per_head = (config.n_layers * options.ctx * (config.head_dim + config.value_head_dim)
                   * options.kv_bytes_per_element)
    workers = []
    for rank, node in enumerate(host.nodes):
        heads = kv_ranges[rank] if kv_ranges is not None else (0, config.n_kv_heads)
        assumed = node.read_bandwidth_gbs is None
        if assumed:
            notes.append(f"node {node.node_id}: read bandwidth unknown, assumed "
                         f"{options.default_bandwidth_gbs:g} GB/s (run `numoe membw`)")
        workers.append(WorkerPlan(
            rank=rank, host=host.name, node_id=node.node_id, cpus=node.cpus,
            node_memory_bytes=node.memory_bytes, kv_heads=heads, weight_bytes=weight[rank],
            kv_bytes=kv_per_head * (heads[1] - heads[0]),
            decode_bytes_per_token=per_token[rank],
            bandwidth_gbs=(options.default_bandwidth_gbs if assumed
                           else float(node.read_bandwidth_gbs)),  # type: ignore[arg-type]
            bandwidth_assumed=assumed, n_tensors=counts[rank]))
    return workers


def format_plan_table(plan: Plan) -> str:
    """A readable per-worker table plus the plan's notes and predicted decode speed."""
    from cluster.topology import format_cpu_list  # noqa: PLC0415

    header = ("rank", "node", "cpus", "tensors", "weights GiB", "KV GiB", "total GiB",
              "MB/token", "pred tok/s")
    rows = [header]
    for w in plan.workers:
        rows.append((str(w.rank), f"{w.host}:{w.node_id}", format_cpu_list(w.cpus),
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
