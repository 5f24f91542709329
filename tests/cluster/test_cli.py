"""`numoe generate` on NUMA workers as a user runs it: a subprocess that starts its own local Ray,
against the single-process command's output; and the cluster flags' errors."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.cluster_cli import (
    ClusterOptions,
    add_cluster_arguments,
    cluster_options_from_args,
    resolve_topology,
)
from cluster.errors import NumoeError
from cluster.topology import discover_local
from tests.reference.tiny_models import TinyModel

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPT = "The quick brown fox"
N_PREDICT = 8


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def generate(model: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli("generate", str(model), "-p", PROMPT, "-n", str(N_PREDICT), "--temp", "0",
                   "-t", "1", *extra)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [("--virtual-numa", "2"), ("--workers", "2")])
def test_generate_on_two_workers_prints_the_single_process_text(
        tiny_qwen3moe: TinyModel, flags: tuple[str, str]) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs, one per worker")
    model = tiny_qwen3moe.gguf["f32"]
    single = generate(model)
    assert single.returncode == 0, single.stderr
    clustered = generate(model, *flags)
    assert clustered.returncode == 0, clustered.stderr
    assert clustered.stdout == single.stdout
    assert len(single.stdout.strip()) > 0
    assert "Traceback" not in clustered.stderr
    assert "eval time" in clustered.stderr
    if flags[0] == "--workers" and len(discover_local().hosts[0].nodes) == 1:
        assert "note: this machine has 1 NUMA node; --workers 2 splits its CPUs" in \
            clustered.stderr


@pytest.mark.parametrize(("flags", "words"), [
    (("--virtual-numa", "4096"), "--virtual-numa 4096: host"),
    (("--workers", "2", "--virtual-numa", "2"), "give either --workers N or"),
    (("--workers", "0"), "--workers 0: give at least 1 worker"),
    (("--ray-address", "127.0.0.1:1"), "--ray-address needs --topology FILE"),
])
def test_bad_cluster_flags_are_one_line_errors(tiny_qwen3moe: TinyModel, flags: tuple[str, ...],
                                               words: str) -> None:
    result = generate(tiny_qwen3moe.gguf["f32"], *flags)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("numoe: error:"), result.stderr
    assert words in lines[0]


def _options(*argv: str) -> ClusterOptions | None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-t", "--threads", type=int, default=None)
    add_cluster_arguments(parser)
    return cluster_options_from_args(parser.parse_args(list(argv)))


def test_no_cluster_flag_means_one_process() -> None:
    assert _options() is None
    assert _options("-t", "3") is None


def test_options_carry_the_flags() -> None:
    options = _options("--topology", "hw.json", "--ray-address", "head:6379", "-t", "4",
                       "--no-membind")
    assert options == ClusterOptions(topology_file="hw.json", ray_address="head:6379",
                                     threads_per_worker=4, bind_memory=False)


def test_workers_split_a_one_node_machine_into_virtual_nodes() -> None:
    nodes = discover_local().hosts[0].nodes
    if len(nodes) != 1 or len(nodes[0].cpus) < 2:
        pytest.skip("needs a one-node machine with 2 CPUs")
    topology, notes = resolve_topology(ClusterOptions(workers=2))
    virtual = topology.hosts[0].nodes
    assert len(virtual) == 2 and virtual[0].cpus + virtual[1].cpus == nodes[0].cpus
    assert all(node.memory_node == nodes[0].memory_node for node in virtual)
    assert len(notes) == 1 and "splits its CPUs into 2 virtual nodes" in notes[0]
    too_many = len(nodes[0].cpus) + 1
    with pytest.raises(NumoeError, match=rf"ask for at most {too_many - 1} virtual nodes"):
        resolve_topology(ClusterOptions(workers=too_many))
