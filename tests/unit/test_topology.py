"""Topology: discovery from a (fake and real) /sys tree, the file format, validation, virtual NUMA,
and the `numoe topology` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.errors import NumoeError
from cluster.topology import (
    GIB,
    Gpu,
    Host,
    NumaNode,
    Topology,
    TopologyError,
    discover_local,
    format_cpu_list,
    load_topology,
    parse_cpu_list,
    parse_size,
    virtual_numa,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_FILE = REPO_ROOT / "deploy" / "topologies" / "2socket-2gpu.json"


def make_fake_sys(root: Path, nodes: dict[int, tuple[str, int]]) -> Path:
    """Writes <root>/devices/system/node/nodeN/{cpulist,meminfo} as the kernel lays them out.
    `nodes` maps node id -> (cpulist text, MemTotal in kB)."""
    node_root = root / "devices" / "system" / "node"
    node_root.mkdir(parents=True)
    # Files the kernel puts beside the node directories; discovery must ignore them.
    (node_root / "online").write_text(f"0-{max(nodes)}\n")
    (node_root / "possible").write_text(f"0-{max(nodes)}\n")
    for node_id, (cpulist, mem_kb) in nodes.items():
        node_dir = node_root / f"node{node_id}"
        node_dir.mkdir()
        (node_dir / "cpulist").write_text(cpulist + "\n")
        (node_dir / "meminfo").write_text(
            f"Node {node_id} MemTotal:       {mem_kb} kB\n"
            f"Node {node_id} MemFree:        {mem_kb // 2} kB\n"
        )
    return root


def two_socket_dict() -> dict:
    return {
        "hosts": [{
            "name": "box",
            "numa_nodes": [
                {"id": 0, "cpus": "0-31", "memory": "384GiB",
                 "gpus": [{"index": 0, "name": "RTX 4090", "memory": "24 GB"}]},
                {"id": 1, "cpus": list(range(32, 64)), "memory": 384 * GIB,
                 "read_bandwidth_gbs": 230.5},
            ],
        }],
    }


# --- CPU lists and sizes -------------------------------------------------------------------------


def test_cpu_list_parse_and_format_round_trip() -> None:
    cpus = parse_cpu_list("0-3,8,10-11\n")
    assert cpus == (0, 1, 2, 3, 8, 10, 11)
    assert format_cpu_list(cpus) == "0-3,8,10-11"
    assert format_cpu_list(reversed(cpus)) == "0-3,8,10-11"
    assert parse_cpu_list("") == ()


def test_sizes_accept_bytes_and_units() -> None:
    assert parse_size(1024, "memory") == 1024
    assert parse_size("384GiB", "memory") == 384 * 2**30
    assert parse_size("24 GB", "memory") == 24 * 10**9
    assert parse_size("1.5 TiB", "memory") == 3 * 2**39
    with pytest.raises(TopologyError, match=r"memory.*'24 GX'.*384GiB"):
        parse_size("24 GX", "memory")


# --- discovery -----------------------------------------------------------------------------------


def test_discover_two_nodes_from_fake_sys(tmp_path: Path) -> None:
    sys_root = make_fake_sys(tmp_path / "sys", {0: ("0-3,8-11", 1000), 1: ("4-7,12-15", 2000)})
    topology = discover_local(sys_root=sys_root, allowed_cpus=range(16), host_name="fake")
    (host,) = topology.hosts
    assert host.name == "fake"
    assert [node.node_id for node in host.nodes] == [0, 1]
    assert host.nodes[0].cpus == (0, 1, 2, 3, 8, 9, 10, 11)
    assert host.nodes[1].cpus == (4, 5, 6, 7, 12, 13, 14, 15)
    assert host.nodes[0].memory_bytes == 1000 * 1024
    assert host.nodes[1].memory_bytes == 2000 * 1024
    assert all(node.read_bandwidth_gbs is None for node in host.nodes)


def test_discover_intersects_with_affinity(tmp_path: Path) -> None:
    # node2 is memory-only (empty cpulist, like CXL memory); node1 lies outside our affinity.
    sys_root = make_fake_sys(tmp_path / "sys",
                             {0: ("0-3", 1000), 1: ("4-7", 1000), 2: ("", 4000)})
    topology = discover_local(sys_root=sys_root, allowed_cpus={1, 2, 9}, host_name="fake")
    (node,) = topology.hosts[0].nodes
    assert node.node_id == 0
    assert node.cpus == (1, 2)

    with pytest.raises(TopologyError, match="taskset"):
        discover_local(sys_root=sys_root, allowed_cpus={9}, host_name="fake")


def test_discover_falls_back_to_proc_meminfo(tmp_path: Path) -> None:
    (tmp_path / "sys").mkdir()  # no devices/system/node
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "meminfo").write_text("MemTotal:       4096 kB\nMemFree:        1024 kB\n")
    topology = discover_local(sys_root=tmp_path / "sys", proc_root=proc,
                              allowed_cpus={3, 1}, host_name="flat")
    (node,) = topology.hosts[0].nodes
    assert node.cpus == (1, 3)
    assert node.memory_bytes == 4096 * 1024


def test_real_local_discovery_matches_affinity() -> None:
    topology = discover_local()
    (host,) = topology.hosts
    assert set(host.cpus) == os.sched_getaffinity(0)
    assert len(host.cpus) == len(set(host.cpus))  # no CPU in two nodes
    physical_bytes = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    # Per-node MemTotal excludes some early-boot reservations, so it is a bit below the total.
    assert 0.5 * physical_bytes < host.memory_bytes <= physical_bytes


def test_cli_discovery_follows_a_restricted_affinity() -> None:
    """A process started with a narrower affinity mask (as `taskset` would) sees only those CPUs."""
    first_cpu = min(os.sched_getaffinity(0))
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "topology", "--json"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=60,
        preexec_fn=lambda: os.sched_setaffinity(0, {first_cpu}),
    )
    topology = Topology.from_dict(json.loads(result.stdout))
    assert topology.hosts[0].cpus == (first_cpu,)


# --- file format ---------------------------------------------------------------------------------


def test_json_file_round_trip(tmp_path: Path) -> None:
    original = Topology.from_dict(two_socket_dict())
    path = tmp_path / "topology.json"
    path.write_text(original.to_json())
    assert load_topology(path) == original
    assert Topology.from_dict(json.loads(json.dumps(original.to_dict()))) == original


def test_two_socket_values_parsed() -> None:
    topology = Topology.from_dict(two_socket_dict())
    node0, node1 = topology.hosts[0].nodes
    assert node0.cpus == tuple(range(32))
    assert node1.cpus == tuple(range(32, 64))
    assert node0.memory_bytes == 384 * 2**30
    assert node0.gpus == (Gpu(index=0, name="RTX 4090", memory_bytes=24 * 10**9),)
    assert node0.read_bandwidth_gbs is None
    assert node1.read_bandwidth_gbs == 230.5


def test_committed_two_socket_example() -> None:
    topology = load_topology(EXAMPLE_FILE)
    (host,) = topology.hosts
    assert [len(node.cpus) for node in host.nodes] == [32, 32]
    assert set(host.cpus) == set(range(64))
    assert [node.memory_bytes for node in host.nodes] == [384 * GIB, 384 * GIB]
    gpus = [gpu for node in host.nodes for gpu in node.gpus]
    assert [(gpu.index, gpu.memory_bytes) for gpu in gpus] == [(0, 24 * GIB), (1, 24 * GIB)]


def test_yaml_file(tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml")
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(two_socket_dict()))
    assert load_topology(path) == Topology.from_dict(two_socket_dict())


def test_yaml_without_pyyaml_says_use_json(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "yaml", None)  # makes `import yaml` raise ImportError
    path = tmp_path / "topology.yml"
    path.write_text("hosts: []\n")
    with pytest.raises(NumoeError, match=r"JSON.*pip install pyyaml"):
        load_topology(path)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(NumoeError, match="--topology"):
        load_topology(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"hosts": [}')
    with pytest.raises(NumoeError, match="line 1 column"):
        load_topology(bad)


def _with_node0(**changes: object) -> dict:
    data = two_socket_dict()
    data["hosts"][0]["numa_nodes"][0].update(changes)
    return data


@pytest.mark.parametrize(("data", "expected"), [
    (_with_node0(cpus="30-40"),
     r"hosts\[0\]\.numa_nodes\[1\]\.cpus: CPU\(s\) 32-40 also belong to node 0.*remove"),
    (_with_node0(cpus=[]), r"hosts\[0\]\.numa_nodes\[0\]\.cpus: the CPU list is empty"),
    (_with_node0(cpus=""), r"numa_nodes\[0\]\.cpus: the CPU list is empty"),
    (_with_node0(memory=-1), r"numa_nodes\[0\]\.memory: size -1 is negative"),
    (_with_node0(memory="-2GiB"), r"numa_nodes\[0\]\.memory: size '-2GiB' is negative"),
    (_with_node0(gpus=[{"index": 0, "memory": "-24GiB"}]),
     r"numa_nodes\[0\]\.gpus\[0\]\.memory: size '-24GiB' is negative"),
    (_with_node0(memroy="1GiB"),
     r"numa_nodes\[0\]: unknown key\(s\) \['memroy'\].*check the spelling"),
    (_with_node0(read_bandwidth_gbs=-5), r"read_bandwidth_gbs: -5 must be a positive"),
    (_with_node0(id=1), r"numa_nodes\[1\]\.id: node id 1 appears twice"),
    (_with_node0(cpus="5-2"), r"range '5-2' runs backwards"),
    ({"hosts": [], "sockets": 2}, r"topology: unknown key\(s\) \['sockets'\]"),
    ({"hosts": []}, r"topology\.hosts: must be a non-empty list"),
    ({"hosts": [{"name": "a"}]}, r"hosts\[0\]: missing key\(s\) \['numa_nodes'\]"),
])
def test_validation_errors_name_field_and_fix(data: dict, expected: str) -> None:
    with pytest.raises(TopologyError, match=expected):
        Topology.from_dict(data)


def test_validation_error_from_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(_with_node0(cpu="0-3")))
    with pytest.raises(TopologyError, match=r"typo\.json: hosts\[0\]\.numa_nodes\[0\]"):
        load_topology(path)


# --- virtual NUMA --------------------------------------------------------------------------------


def one_node_topology(cpus: tuple[int, ...], memory_bytes: int) -> Topology:
    node = NumaNode(node_id=0, cpus=cpus, memory_bytes=memory_bytes, read_bandwidth_gbs=60.0)
    return Topology(hosts=(Host(name="one", nodes=(node,)),))


def test_virtual_numa_splits_cpus_and_memory() -> None:
    source = one_node_topology(cpus=(0, 1, 2, 3, 4), memory_bytes=1001)
    split = virtual_numa(source, 2)
    nodes = split.hosts[0].nodes
    assert [node.node_id for node in nodes] == [0, 1]
    assert nodes[0].cpus + nodes[1].cpus == source.hosts[0].nodes[0].cpus
    assert abs(len(nodes[0].cpus) - len(nodes[1].cpus)) <= 1
    assert sum(node.memory_bytes for node in nodes) == 1001
    assert abs(nodes[0].memory_bytes - nodes[1].memory_bytes) <= 1
    assert all(node.memory_node == 0 for node in nodes)  # both bind to the one real node
    assert Topology.from_dict(split.to_dict()) == split


def test_virtual_numa_rejects_too_many_nodes_and_multi_node_hosts() -> None:
    with pytest.raises(TopologyError, match="at most 2 virtual nodes"):
        virtual_numa(one_node_topology(cpus=(0, 1), memory_bytes=GIB), 3)
    with pytest.raises(TopologyError, match="drop --virtual-numa"):
        virtual_numa(load_topology(EXAMPLE_FILE), 2)


def test_virtual_numa_of_this_machine() -> None:
    local = discover_local()
    if len(local.hosts[0].nodes) != 1:
        pytest.skip("this machine has several NUMA nodes; --virtual-numa is for one-node hosts")
    allowed = os.sched_getaffinity(0)
    split = virtual_numa(local, len(allowed))
    assert [len(node.cpus) for node in split.hosts[0].nodes] == [1] * len(allowed)
    assert set(split.hosts[0].cpus) == allowed


# --- CLI -----------------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cluster.cli", "topology", *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


def test_cli_json_parses_and_matches_affinity() -> None:
    result = run_cli("--json")
    assert result.returncode == 0, result.stderr
    topology = Topology.from_dict(json.loads(result.stdout))
    assert set(topology.hosts[0].cpus) == os.sched_getaffinity(0)


def test_cli_table_for_file() -> None:
    result = run_cli("--topology", str(EXAMPLE_FILE))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any("0-31" in line and "384.0" in line and "24.0 GiB" in line for line in lines)
    assert any("32-63" in line for line in lines)


def test_cli_user_error_is_one_line() -> None:
    result = run_cli("--topology", str(EXAMPLE_FILE), "--virtual-numa", "2")
    assert result.returncode == 1
    assert result.stderr.startswith("numoe: error:") and result.stderr.count("\n") == 1
