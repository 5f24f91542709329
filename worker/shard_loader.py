"""One worker's weights: the slices the placement plan gives its rank, copied out of the GGUF.

Every slice is a fresh array the calling thread allocates and fills, never a view into the
file's mapping: a worker loads on a thread pinned to its NUMA node, and Linux places a page on
the node of the thread that first touches it, so the copy makes the worker's weights node-local
(a mmap view would leave them wherever the page cache put the file). Whole tensors the worker
holds (replicated norms and embeddings, pinned blocks) are copied too, for the same reason.

A slice is whole quant blocks, so copying bytes is enough (no requantization):

* along an axis before the last (rows of [F, H], experts of [E, F, H], rows of each expert of
  [E, F, H]), an index of the axis is `inner` contiguous bytes, and the slice is a contiguous
  chunk of them per outer index;
* along the last axis (columns, e.g. attn_output and ffn_down), each row keeps the blocks
  [start / block, stop / block): the plan puts column bounds on block boundaries.
"""

from __future__ import annotations

import numpy as np

from cluster.errors import NumoeError
from cluster.gguf import GGML_TYPE_NAMES, GGUFFile, type_block
from cluster.placement import Plan, Shard, TensorPlacement
from worker.backends.base import WeightData


def load_shards(gguf: GGUFFile, plan: Plan, rank: int) -> dict[str, WeightData]:
    """Every tensor `rank` holds, as a WeightData of its slice's shape over fresh bytes."""
    if not 0 <= rank < len(plan.workers):
        raise NumoeError(f"rank {rank} is not in the plan, which has {len(plan.workers)} "
                         f"worker(s) (ranks 0-{len(plan.workers) - 1})")
    return {tensor.name: load_shard(gguf, tensor, shard) for tensor, shard in plan.shards_of(rank)}


def load_shard(gguf: GGUFFile, tensor: TensorPlacement, shard: Shard) -> WeightData:
    """One tensor's slice `shard`, copied into a new array by the calling thread."""
    _check_matches_file(gguf, tensor)
    source = gguf.tensor_data(tensor.name)  # uint8 [n_bytes], a view into the mapping
    shape = shard_shape(tensor.shape, shard)
    out = np.empty(shard.n_bytes, np.uint8)  # untouched until the copy below
    if shard.axis is None:
        np.copyto(out, source)
        return WeightData(tensor.name, tensor.ggml_type, shape, out)
    outer, units, unit_bytes, start, stop = _unit_layout(tensor, shard)
    if (stop - start) * unit_bytes * outer != shard.n_bytes:
        raise NumoeError(f"{tensor.name}: the plan's slice {shard.start}:{shard.stop} on axis "
                         f"{shard.axis} should hold {(stop - start) * unit_bytes * outer} bytes, "
                         f"the plan says {shard.n_bytes}; the plan is corrupt: make it again")
    units_view = source.reshape(outer, units, unit_bytes)  # [outer, units, unit_bytes]
    np.copyto(out.reshape(outer, stop - start, unit_bytes), units_view[:, start:stop])
    return WeightData(tensor.name, tensor.ggml_type, shape, out)


def shard_shape(shape: tuple[int, ...], shard: Shard) -> tuple[int, ...]:
    """The shape of `shard`'s slice of a tensor of `shape`."""
    if shard.axis is None:
        return tuple(shape)
    sliced = list(shape)
    sliced[shard.axis] = shard.stop - shard.start
    return tuple(sliced)


def _unit_layout(tensor: TensorPlacement, shard: Shard) -> tuple[int, int, int, int, int]:
    """The tensor's bytes as [outer, units, unit_bytes] with the slice `units[start:stop]`:
    indices of the axis, or quant blocks of each row when the axis is the last."""
    axis, shape = shard.axis, tensor.shape
    assert axis is not None
    if not 0 <= axis < len(shape) or not 0 <= shard.start < shard.stop <= shape[axis]:
        raise NumoeError(f"{tensor.name} {list(shape)}: the plan's slice {shard.start}:"
                         f"{shard.stop} on axis {axis} lies outside it; the plan is corrupt: "
                         f"make it again")
    outer = int(np.prod(shape[:axis], dtype=np.int64))
    if axis < len(shape) - 1:
        return outer, shape[axis], tensor.n_bytes // (outer * shape[axis]), shard.start, shard.stop
    block, block_bytes = type_block(tensor.ggml_type)
    if shard.start % block or shard.stop % block:
        raise NumoeError(f"{tensor.name}: columns {shard.start}:{shard.stop} cut through its "
                         f"quant blocks of {block}; the plan is corrupt: make it again")
    return outer, shape[axis] // block, block_bytes, shard.start // block, shard.stop // block


def _check_matches_file(gguf: GGUFFile, tensor: TensorPlacement) -> None:
    info = gguf.tensors.get(tensor.name)
    found = None if info is None else (info.ggml_type, tuple(info.shape), info.n_bytes)
    if found != (tensor.ggml_type, tuple(tensor.shape), tensor.n_bytes):
        what = "is missing" if info is None else (
            f"is type {info.type_name} shape {list(info.shape)} ({info.n_bytes} bytes)")
        expected = GGML_TYPE_NAMES.get(tensor.ggml_type, f"type{tensor.ggml_type}")
        raise NumoeError(
            f"{gguf.path}: tensor {tensor.name} {what}, but the plan expects type {expected} "
            f"shape {list(tensor.shape)} ({tensor.n_bytes} bytes): the plan was made for "
            f"another file; make the plan from this file (`numoe plan`)")
