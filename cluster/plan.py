"""The placement plan's types: which worker holds which slice of which tensor, and what each
worker costs. Frozen and JSON-serialisable (`Plan.to_dict` / `plan_from_dict`): plans travel to
workers as JSON, never pickled. cluster/placement.py's `make_plan` is the only producer; the
executors (worker/shard_runner.py, worker/worker.py, cluster/coordinator.py) only read plans.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from cluster.errors import NumoeError
from cluster.predict import Prediction, prediction_from_dict
from cluster.topology import GIB

# Every tensor of an attention block, GQA or MLA: what the attention all-reduce closes.
ATTENTION_BLOCK = re.compile(
    r"blk\.\d+\.attn_(q|k|v|output|q_a|q_b|kv_a_mqa|k_b|v_b|kv_b)\.(weight|bias)")
FFN_BLOCK = re.compile(r"blk\.\d+\.ffn_(gate|up|down)(_exps|_shexp)?\.weight")


class PlanError(NumoeError):
    """The model cannot be placed on the topology (message says where, by how much, and a fix)."""


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
    replicated: bool  # every holder has all of it (each needs it whole)
    pinned: bool  # placed whole on one worker of its stage: by a user override or the GPU rule
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
    node_id: int  # the NUMA node it runs on (a GPU worker: the node its GPU hangs off)
    stage: int  # pipeline stage (index into Plan.stages)
    tp_rank: int  # this worker's index inside its stage
    layers: tuple[int, int]  # [start, stop) of the layers it computes
    vocab: tuple[int, int]  # [start, stop) of the logits it computes; (0, 0) if none
    cpus: tuple[int, ...]
    node_memory_bytes: int  # a GPU worker: its VRAM less PlanOptions.gpu_reserve_bytes
    # [start, stop) of the heads this worker attends with in its first layer: kv heads (GQA),
    # query heads (MLA, whose latent cache every attention worker keeps whole)
    kv_heads: tuple[int, int]
    weight_bytes: int
    kv_bytes: int
    decode_bytes_per_token: int
    bandwidth_gbs: float
    bandwidth_assumed: bool  # True when neither topology nor options gave a bandwidth
    n_tensors: int
    device: str = "cpu"  # "cpu", or "cuda:N" for a GPU worker (N: the CUDA device index)
    compute_gflops: float = 0.0  # sustained FLOP/s the prompt prediction assumes, in GFLOP/s
    # KV-cache bytes one token of context adds to this worker, over all its layers, in the
    # plan's cache type (kv_bytes = this x ctx)
    kv_bytes_per_token: int = 0

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    @property
    def predicted_decode_tok_s(self) -> float:
        """This worker's roofline alone: its bandwidth over its bytes per token."""
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
    prediction: Prediction | None = None  # cluster.predict's speed model of this plan

    @property
    def predicted_decode_tok_s(self) -> float:
        """The speed model's decode tok/s; without one, stages one after another, each bound
        by its slowest worker's roofline."""
        if self.prediction is not None:
            return self.prediction.decode_tok_s
        seconds = 0.0
        for stage in self.stages:
            slowest = min(self.workers[rank].predicted_decode_tok_s for rank in stage.ranks)
            seconds += 1.0 / slowest if slowest > 0 else float("inf")
        return 1.0 / seconds if seconds > 0 else float("inf")

    @property
    def predicted_prompt_tok_s(self) -> float:
        return self.prediction.prompt_tok_s if self.prediction is not None else 0.0

    def shards_of(self, rank: int) -> list[tuple[TensorPlacement, Shard]]:
        """Every tensor `rank` holds, with its piece of it, in file order."""
        return [(tensor, shard) for tensor in self.tensors for shard in tensor.shards
                if shard.rank == rank]

    def block_is_split(self, stage: int, layer: int, block: str) -> bool:
        """Whether the stage's workers each compute a part of `block` ("attention" or "ffn") of
        `layer`, so its output must be all-reduced; False when each computes all of it."""
        prefix = f"blk.{layer}."
        return is_block_split([t for t in self.tensors if t.name.startswith(prefix)], block,
                         set(self.stages[stage].ranks))

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
                          "predicted_prompt_tok_s": self.predicted_prompt_tok_s,
                          "prediction": (None if self.prediction is None
                                         else asdict(self.prediction)),
                          "notes": list(self.notes),
                          "stages": [asdict(stage) for stage in self.stages],
                          "workers": workers, "tensors": tensors})


def is_block_split(layer_tensors: Sequence[TensorPlacement], block: str, ranks: set[int]) -> bool:
    pattern = ATTENTION_BLOCK if block == "attention" else FFN_BLOCK
    for tensor in layer_tensors:
        if pattern.fullmatch(tensor.name):
            held = [s for s in tensor.shards if s.rank in ranks]
            if len(ranks) > 1 and not (tensor.replicated and len(held) == len(ranks)):
                return True
    return False


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
        prediction = data.get("prediction")
        return Plan(strategy=data["strategy"], architecture=data["architecture"],
                    ctx=int(data["ctx"]),
                    stages=tuple(StagePlan(**_fields_of(StagePlan, s)) for s in data["stages"]),
                    workers=tuple(WorkerPlan(**_fields_of(WorkerPlan, w))
                                  for w in data["workers"]),
                    tensors=tensors, notes=tuple(data.get("notes", ())),
                    prediction=None if prediction is None else prediction_from_dict(prediction))
    except (KeyError, TypeError, ValueError) as error:
        raise PlanError(f"not a numoe plan ({error}); make one with `numoe plan --json`") \
            from error


# ---------------------------------------------------------------------------------------------


def format_plan_table(plan: Plan) -> str:
    """A readable per-worker table plus the plan's predictions and notes."""
    from cluster.topology import format_cpu_list  # noqa: PLC0415

    header = ("rank", "stage", "layers", "worker", "cpus", "tensors", "weights GiB", "KV GiB",
              "KV B/tok", "total GiB", "free GiB", "MB/token", "roofline tok/s")
    rows = [header]
    for w in plan.workers:
        where = f"{w.host}:{w.device}" if w.device != "cpu" else f"{w.host}:numa{w.node_id}"
        rows.append((str(w.rank), str(w.stage), f"{w.layers[0]}-{w.layers[1] - 1}", where,
                     format_cpu_list(w.cpus), str(w.n_tensors), f"{w.weight_bytes / GIB:.2f}",
                     f"{w.kv_bytes / GIB:.2f}", str(w.kv_bytes_per_token),
                     f"{w.total_bytes / GIB:.2f}",
                     f"{(w.node_memory_bytes - w.total_bytes) / GIB:.2f}",
                     f"{w.decode_bytes_per_token / 1e6:.1f}", f"{w.predicted_decode_tok_s:.1f}"))
    widths = [max(len(row[col]) for row in rows) for col in range(len(header))]
    n_gpus = sum(1 for w in plan.workers if w.device != "cpu")
    lines = [f"plan: {plan.strategy}, {plan.architecture}, ctx {plan.ctx}, "
             f"{len(plan.workers)} worker(s)" + (f" ({n_gpus} GPU)" if n_gpus else "")]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip() for row in rows]
    prediction = plan.prediction
    if prediction is not None:
        parts = {"attention": 0.0, "ffn": 0.0, "head": 0.0, "overhead": 0.0}
        for stage in prediction.stages:
            parts["attention"] += stage.attention_s
            parts["ffn"] += stage.ffn_s
            parts["head"] += stage.head_s
            parts["overhead"] += stage.overhead_s
        parts["overhead"] += prediction.handoff_s
        detail = ", ".join(f"{key} {1000 * value:.2f}" for key, value in parts.items())
        lines.append(f"predicted decode: {prediction.decode_tok_s:.2f} tok/s at depth "
                     f"{prediction.decode_depth} (ms per token: {detail})")
        lines.append(f"predicted prompt: {prediction.prompt_tok_s:.1f} tok/s (compute bound)")
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)
