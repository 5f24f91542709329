"""Python face of native/src/numa.c: pin OpenMP threads to CPUs, bind memory to a NUMA node,
measure a node's memory bandwidth with threads pinned to it.

A worker calls `pin_threads(node.cpus)` then `bind_memory(node.memory_node)` before it loads its
weights, so the pages its pinned threads touch first land on its own node. Kernel refusals
(no CAP_SYS_NICE in a container, a node that does not exist) become NumoeError naming the cause.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass

from native._numoe_native import ffi, lib

from cluster.errors import NumoeError

# get_mempolicy modes (<linux/mempolicy.h>), for reading a policy back.
MPOL_DEFAULT = 0
MPOL_PREFERRED = 1
MPOL_BIND = 2
MAX_NODES = 1024  # numa.c's node mask size


class NumaError(NumoeError):
    """The kernel refused to pin threads or bind memory (message names the cause and the fix)."""


@dataclass(frozen=True)
class MemoryBandwidth:
    read_gbs: float  # STREAM-style, 1 GB = 1e9 bytes, best of the repeats
    copy_gbs: float
    triad_gbs: float


def _cpu_array(cpus: Sequence[int], what: str) -> tuple[object, int]:
    if len(cpus) == 0:
        raise NumaError(f"{what}: the CPU list is empty; give at least one CPU id")
    n_cpus = os.cpu_count() or 1
    bad = [cpu for cpu in cpus if not 0 <= int(cpu) < n_cpus]
    if bad:
        raise NumaError(f"{what}: CPU ids {bad} do not exist on this machine "
                        f"(it has CPUs 0-{n_cpus - 1}); check the topology")
    return ffi.new("int[]", [int(cpu) for cpu in cpus]), len(cpus)


def _affinity_error(status: int, cpus: Sequence[int], what: str) -> NumaError:
    reason = os.strerror(-status)
    return NumaError(f"{what}: the kernel refused CPUs {list(cpus)} ({reason}); use CPUs this "
                     f"process may run on, {sorted(os.sched_getaffinity(0))}")


def pin_threads(cpus: Sequence[int]) -> None:
    """Pins OpenMP thread i (of the kernels' thread count; thread 0 = the caller) to
    cpus[i % len(cpus)]."""
    array, n = _cpu_array(cpus, "pin_threads")
    status = lib.numoe_pin_threads(array, n)
    if status != 0:
        raise _affinity_error(status, cpus, "pin_threads")


def allow_threads(cpus: Sequence[int]) -> None:
    """Lets every OpenMP thread (and the caller) run on any of `cpus`: undoes pin_threads."""
    array, n = _cpu_array(cpus, "allow_threads")
    status = lib.numoe_allow_threads(array, n)
    if status != 0:
        raise _affinity_error(status, cpus, "allow_threads")


def thread_cpus() -> list[int]:
    """The CPU each OpenMP thread of one kernel region runs on, by thread number."""
    n = int(lib.numoe_get_threads())
    out = ffi.new("int[]", n)
    lib.numoe_thread_cpus(out, n)
    return list(out)


def bind_memory(node: int, strict: bool = True) -> None:
    """Allocations of the caller and every OpenMP thread come from NUMA node `node`
    (strict: MPOL_BIND, fail rather than spill; else MPOL_PREFERRED)."""
    if not 0 <= node < MAX_NODES:
        raise NumaError(f"bind_memory: node {node} is out of range; NUMA nodes are 0-"
                        f"{MAX_NODES - 1} (see `numoe topology`)")
    status = lib.numoe_bind_memory_node(int(node), 1 if strict else 0)
    if status == 0:
        return
    if -status == errno.EPERM:
        raise NumaError(f"bind_memory: the kernel refused to bind memory to node {node} "
                        f"(set_mempolicy: {os.strerror(-status)}); containers need "
                        f"CAP_SYS_NICE (docker run --cap-add SYS_NICE) or run without binding")
    if -status == errno.EINVAL:
        raise NumaError(f"bind_memory: NUMA node {node} does not exist or this process may not "
                        f"use it (set_mempolicy: {os.strerror(-status)}); pick a node that "
                        f"`numoe topology` lists")
    raise NumaError(f"bind_memory: set_mempolicy for node {node} failed: "
                    f"{os.strerror(-status)}")


def unbind_memory() -> None:
    """Back to the default policy (memory from the node of the CPU that touches it first)."""
    status = lib.numoe_unbind_memory()
    if status != 0:
        raise NumaError(f"unbind_memory: set_mempolicy failed: {os.strerror(-status)}")


def memory_policy() -> tuple[int, list[int]]:
    """The caller's policy read back: (MPOL_* mode, nodes of its mask among the first 64)."""
    mode = ffi.new("int *")
    mask = ffi.new("uint64_t *")
    status = lib.numoe_memory_policy(mode, mask)
    if status != 0:
        raise NumaError(f"memory_policy: get_mempolicy failed: {os.strerror(-status)}")
    return int(mode[0]), [node for node in range(64) if mask[0] >> node & 1]


def membw(cpus: Sequence[int], bytes_per_array: int = 256 << 20,
          repeats: int = 5) -> MemoryBandwidth:
    """Read / copy / triad bandwidth with one thread pinned to each CPU of `cpus` (for this call
    only), over three arrays of `bytes_per_array` bytes first touched by those threads."""
    if repeats < 1:
        raise NumaError(f"membw: repeats must be >= 1, got {repeats}")
    if bytes_per_array < 64 * len(cpus):
        raise NumaError(f"membw: {bytes_per_array} bytes is too small for {len(cpus)} "
                        f"threads; give at least {64 * len(cpus)}")
    array, n = _cpu_array(cpus, "membw")
    out = ffi.new("double[3]")
    status = lib.numoe_membw(array, n, int(bytes_per_array), int(repeats), out, out + 1, out + 2)
    if -status == errno.ENOMEM:
        raise NumaError(f"membw: cannot allocate 3 x {bytes_per_array} bytes; use a smaller "
                        f"--mib")
    if -status == errno.EIO:
        raise RuntimeError("membw: the measured loops produced wrong values (a bug)")
    if status != 0:
        raise _affinity_error(status, cpus, "membw")
    return MemoryBandwidth(float(out[0]), float(out[1]), float(out[2]))
