"""NUMA primitives (worker/numa.py over native/src/numa.c): thread pinning read back per OpenMP
thread, memory binding read back with get_mempolicy (or the clear refusal where the sandbox forbids
it), the bandwidth probe, and the `numoe membw` command."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.topology import discover_local
from native import kernels
from worker import numa

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_FILE = REPO_ROOT / "deploy" / "topologies" / "2socket-2gpu.json"


@pytest.fixture
def restore_threads() -> Iterator[list[int]]:
    """Yields the allowed CPUs; afterwards every OpenMP thread and the policy are as before."""
    allowed = sorted(os.sched_getaffinity(0))
    threads = kernels.get_threads()
    yield allowed
    kernels.set_threads(threads)
    numa.allow_threads(allowed)
    os.sched_setaffinity(0, allowed)
    numa.unbind_memory()


def test_pin_threads_puts_each_openmp_thread_on_its_cpu(restore_threads: list[int]) -> None:
    allowed = restore_threads
    if len(allowed) < 2:
        pytest.skip("needs 2 allowed CPUs to tell pinned threads apart")
    kernels.set_threads(2)
    order = [allowed[1], allowed[0]]  # reversed, so the default placement cannot pass
    numa.pin_threads(order)
    for _ in range(3):  # the pool's threads keep their masks across regions
        assert numa.thread_cpus() == order
    assert os.sched_getaffinity(0) == {order[0]}  # thread 0 is the caller

    numa.allow_threads(allowed)
    assert os.sched_getaffinity(0) == set(allowed)


def test_pin_threads_rejects_cpus_that_do_not_exist(restore_threads: list[int]) -> None:
    with pytest.raises(numa.NumaError, match="do not exist"):
        numa.pin_threads([os.cpu_count() or 1])
    with pytest.raises(numa.NumaError, match="empty"):
        numa.pin_threads([])


def test_bind_memory_to_node_zero(restore_threads: list[int]) -> None:
    """Binds and reads the policy back; where the sandbox refuses set_mempolicy, checks that the
    refusal is the clear error instead and says so in the skip reason."""
    try:
        numa.bind_memory(0)
    except numa.NumaError as error:
        message = str(error)
        assert "node 0" in message and "set_mempolicy" in message
        pytest.skip(f"the kernel refused set_mempolicy here; the clear error was checked: "
                    f"{message}")
    assert numa.memory_policy() == (numa.MPOL_BIND, [0])
    numa.bind_memory(0, strict=False)
    assert numa.memory_policy() == (numa.MPOL_PREFERRED, [0])
    numa.unbind_memory()
    assert numa.memory_policy() == (numa.MPOL_DEFAULT, [])


def test_bind_memory_to_a_missing_node_is_a_clear_error(restore_threads: list[int]) -> None:
    missing = max(node.memory_node for node in discover_local().hosts[0].nodes) + 1
    with pytest.raises(numa.NumaError, match=rf"node {missing} does not exist.*numoe topology"):
        numa.bind_memory(missing)
    with pytest.raises(numa.NumaError, match="out of range"):
        numa.bind_memory(numa.MAX_NODES)


def test_membw_values_are_positive_finite_and_affinity_restored(
        restore_threads: list[int]) -> None:
    allowed = restore_threads
    before = os.sched_getaffinity(0)
    # The C side checks the read sum, the copied and the triad values exactly (else RuntimeError).
    result = numa.membw(allowed, 4 << 20, repeats=2)
    for value in (result.read_gbs, result.copy_gbs, result.triad_gbs):
        assert math.isfinite(value) and value > 0
    assert os.sched_getaffinity(0) == before  # pinned for the call only
    with pytest.raises(numa.NumaError, match="repeats"):
        numa.membw(allowed, 4 << 20, repeats=0)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cluster.cli", "membw", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_membw_json_has_one_row_per_virtual_node() -> None:
    result = _cli("--virtual-numa", "2", "--mib", "32", "--repeats", "1", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    nodes = report["nodes"]
    assert [row["node"] for row in nodes] == [0, 1]
    assert nodes[0]["cpus"] != nodes[1]["cpus"]
    for row in nodes:
        assert all(row[key] > 0 for key in ("read_gbs", "copy_gbs", "triad_gbs"))


def test_cli_membw_refuses_a_topology_of_other_hardware() -> None:
    if set(range(64)) <= os.sched_getaffinity(0):
        pytest.skip("this machine really has the example's 64 CPUs")
    result = _cli("--topology", str(EXAMPLE_FILE), "--mib", "1", "--repeats", "1")
    assert result.returncode == 1
    assert "membw measures this machine" in result.stderr
