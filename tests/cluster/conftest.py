"""A real local Ray cluster for the cluster tests, started once for this package (and stopped
after it, so the rest of the suite runs without Ray's processes).

The head raylet stands for this machine split into 2 virtual NUMA nodes (CPU 0 and CPU 1): it
declares their two NUMA resources, so `ClusterRunner` / `numoe generate --virtual-numa 2` place
one worker on each. test_multihost.py adds a second raylet standing for another host.
Ray takes about 0.9 GB and 5-10 s to start; the object store is kept at its minimum (numoe's
activations never go through it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from cluster.ray_cluster import OBJECT_STORE_BYTES, host_resources
from cluster.topology import Topology, discover_local, virtual_numa

N_CTX = 256
PROMPT_LEN = 16
N_STEPS = 8
ORDINARY_VOCAB = 151_643  # Qwen2 ids below this are ordinary tokens (no control tokens)


@dataclass(frozen=True)
class RayTestCluster:
    cluster: object  # ray.cluster_utils.Cluster
    local: Topology  # this machine as 2 virtual nodes; the head declares their resources


@pytest.fixture(scope="package")
def ray_cluster() -> Iterator[RayTestCluster]:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("the cluster tests need 2 CPUs (one per virtual NUMA node)")
    import ray  # noqa: PLC0415
    from ray.cluster_utils import Cluster  # noqa: PLC0415

    local = virtual_numa(discover_local(), 2)
    cluster = Cluster(initialize_head=True, connect=True, head_node_args={
        "num_cpus": 2, "resources": host_resources(local.hosts[0]),
        "object_store_memory": OBJECT_STORE_BYTES, "include_dashboard": False})
    try:
        yield RayTestCluster(cluster, local)
    finally:
        ray.shutdown()
        cluster.shutdown()


def prompt_ids(seed: int, length: int = PROMPT_LEN) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(i) for i in rng.integers(0, ORDINARY_VOCAB, length)]


def greedy(forward: object, prompt: list[int], n_steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy continuation through any runner's forward(ids, start, logits="last"): the chosen
    ids and the logits of every step [n_steps, vocab]."""
    logits = forward(prompt, 0, logits="last")[0]  # type: ignore[operator]  # [vocab]
    chosen, rows = [], []
    for step in range(n_steps):
        rows.append(logits)
        chosen.append(int(np.argmax(logits)))
        if step + 1 < n_steps:
            logits = forward([chosen[-1]], len(prompt) + step, logits="last")[0]  # type: ignore
    return chosen, np.stack(rows)


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """max |ours - ref| / max |ref|, in float64."""
    ours64, ref64 = ours.astype(np.float64), reference.astype(np.float64)
    return float(np.max(np.abs(ours64 - ref64)) / np.max(np.abs(ref64)))


def mapped_rss_bytes(path: Path, address: int) -> int:
    """Resident bytes of the mapping of `path` that holds `address`, from /proc/self/smaps."""
    target = str(Path(path).resolve())
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
                start, stop = (int(part, 16) for part in fields[0].split("-"))
                inside = start <= address < stop and fields[-1] == target
            elif inside and fields[0] == "Rss:":
                return int(fields[1]) * 1024
    raise AssertionError(f"no mapping of {target} holds address {address:#x}")
