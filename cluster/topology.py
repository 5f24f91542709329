"""Hardware topology: hosts -> NUMA nodes (CPUs, memory, read bandwidth) -> GPUs.

A Topology is frozen data. It comes from one of three places:

* `discover_local()` reads this machine's `/sys/devices/system/node`, keeping only the CPUs this
  process may run on (`os.sched_getaffinity`);
* `load_topology(path)` reads a JSON (or YAML) file describing hardware you may not have, so a
  plan can be made for a 2-socket server on a laptop;
* `virtual_numa(topology, n)` splits a one-node host into n "virtual" nodes, so the cluster code
  path can be exercised on a single-socket machine.

Discovery across several hosts (one Ray node each) is not here yet: it will run
`discover_local()` inside one Ray task per node and join the results into one Topology.

File format (sizes are bytes or strings such as "384GiB" / "24 GB"; GiB = 2**30, GB = 10**9):

    {"hosts": [{"name": "box", "numa_nodes": [
        {"id": 0, "cpus": "0-31", "memory": "384GiB", "read_bandwidth_gbs": 250,
         "gpus": [{"index": 0, "name": "RTX 4090", "memory": "24GiB"}]}]}]}
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cluster.errors import NumoeError

GIB = 1 << 30


class TopologyError(NumoeError):
    """A topology file or discovered topology is invalid (message names the field and the fix)."""


@dataclass(frozen=True)
class Gpu:
    index: int  # device index on its host, as CUDA numbers it
    name: str
    memory_bytes: int


@dataclass(frozen=True)
class NumaNode:
    node_id: int  # the id workers and plans use (virtual nodes count 0..n-1)
    cpus: tuple[int, ...]  # sorted logical CPU ids this node's worker may pin to
    memory_bytes: int
    read_bandwidth_gbs: float | None = None  # measured or declared; None = unknown
    gpus: tuple[Gpu, ...] = ()
    # The kernel's NUMA node that backs this node's memory (for set_mempolicy/mbind). Equal to
    # node_id for real nodes; for virtual nodes several node_ids share one os_node_id.
    os_node_id: int | None = None

    @property
    def memory_node(self) -> int:
        return self.node_id if self.os_node_id is None else self.os_node_id


@dataclass(frozen=True)
class Host:
    name: str
    nodes: tuple[NumaNode, ...]

    @property
    def cpus(self) -> tuple[int, ...]:
        return tuple(sorted(cpu for node in self.nodes for cpu in node.cpus))

    @property
    def memory_bytes(self) -> int:
        return sum(node.memory_bytes for node in self.nodes)


@dataclass(frozen=True)
class Topology:
    hosts: tuple[Host, ...]
    description: str = field(default="")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data in the file format; `Topology.from_dict` reads it back."""
        out: dict[str, Any] = {"hosts": [_host_to_dict(host) for host in self.hosts]}
        if self.description:
            out["description"] = self.description
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Topology:
        return _parse_topology(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# ---------------------------------------------------------------------------------------------
# CPU lists and sizes


def parse_cpu_list(text: str, where: str = "cpus") -> tuple[int, ...]:
    """Linux cpulist syntax ("0-3,8,10-11") -> sorted CPU ids. Empty text -> ()."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if match is None:
            raise TopologyError(
                f"{where}: cannot read CPU list item {part!r}; write CPUs as a list of integers "
                f"or ranges like \"0-31,64-95\""
            )
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise TopologyError(f"{where}: range {part!r} runs backwards; write it as "
                                f"\"{last}-{first}\"")
        cpus.update(range(first, last + 1))
    return tuple(sorted(cpus))


def format_cpu_list(cpus: Iterable[int]) -> str:
    """Sorted CPU ids -> compact ranges: [0, 1, 2, 5] -> "0-2,5"."""
    ordered = sorted(set(cpus))
    runs: list[str] = []
    start = 0
    for i in range(1, len(ordered) + 1):
        if i == len(ordered) or ordered[i] != ordered[i - 1] + 1:
            first, last = ordered[start], ordered[i - 1]
            runs.append(str(first) if first == last else f"{first}-{last}")
            start = i
    return ",".join(runs)


_SIZE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}


def parse_size(value: Any, where: str) -> int:
    """Bytes as a number or a string like "384GiB", "24 GB", "1.5 TiB" -> non-negative int."""
    if isinstance(value, bool):  # bool is an int subclass; `true` is never a size
        raise TopologyError(f"{where}: {value!r} is not a size; give bytes or e.g. \"24GiB\"")
    if isinstance(value, int | float):
        size = value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)
        unit = match.group(2).lower() if match else ""
        if match is None or (unit and unit not in _SIZE_UNITS):
            raise TopologyError(
                f"{where}: cannot read size {value!r}; give bytes or a number with a unit "
                f"(B, KiB, MiB, GiB, TiB, KB, MB, GB, TB), e.g. \"384GiB\""
            )
        size = float(match.group(1)) * _SIZE_UNITS[unit or "b"]
    else:
        raise TopologyError(f"{where}: {value!r} is not a size; give bytes or e.g. \"24GiB\"")
    if size < 0:
        raise TopologyError(f"{where}: size {value!r} is negative; give a size >= 0")
    return int(size)


# ---------------------------------------------------------------------------------------------
# Reading and writing the file format

_TOP_KEYS = {"hosts", "description"}
_HOST_KEYS = {"name", "numa_nodes"}
_NODE_KEYS = {"id", "cpus", "memory", "read_bandwidth_gbs", "gpus", "os_node"}
_GPU_KEYS = {"index", "name", "memory"}


def _check_keys(data: Any, allowed: set[str], required: set[str], where: str) -> None:
    if not isinstance(data, Mapping):
        raise TopologyError(f"{where}: expected an object with keys {sorted(allowed)}, "
                            f"got {type(data).__name__}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise TopologyError(f"{where}: unknown key(s) {unknown}; allowed keys are "
                            f"{sorted(allowed)} (check the spelling)")
    missing = sorted(required - set(data))
    if missing:
        raise TopologyError(f"{where}: missing key(s) {missing}; add them")


def _parse_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TopologyError(f"{where}: {value!r} must be a non-negative integer")
    return value


def _parse_cpus(value: Any, where: str) -> tuple[int, ...]:
    if isinstance(value, str):
        cpus = parse_cpu_list(value, where)
    elif isinstance(value, Sequence):
        cpus = tuple(sorted({_parse_int(cpu, where) for cpu in value}))
        if len(cpus) != len(value):
            raise TopologyError(f"{where}: lists a CPU twice; list each CPU once")
    else:
        raise TopologyError(f"{where}: give CPUs as a list of integers or a string like \"0-31\"")
    if not cpus:
        raise TopologyError(f"{where}: the CPU list is empty; every NUMA node needs at least one "
                            f"CPU (a memory-only node cannot host a worker; leave it out)")
    return cpus


def _parse_gpu(data: Any, where: str) -> Gpu:
    _check_keys(data, _GPU_KEYS, {"index", "memory"}, where)
    name = data.get("name", "GPU")
    if not isinstance(name, str):
        raise TopologyError(f"{where}.name: {name!r} must be a string")
    return Gpu(index=_parse_int(data["index"], f"{where}.index"), name=name,
               memory_bytes=parse_size(data["memory"], f"{where}.memory"))


def _parse_node(data: Any, where: str) -> NumaNode:
    _check_keys(data, _NODE_KEYS, {"id", "cpus", "memory"}, where)
    bandwidth = data.get("read_bandwidth_gbs")
    if bandwidth is not None and (isinstance(bandwidth, bool)
                                  or not isinstance(bandwidth, int | float) or bandwidth <= 0):
        raise TopologyError(f"{where}.read_bandwidth_gbs: {bandwidth!r} must be a positive "
                            f"number of GB/s, or null when unknown")
    gpus_data = data.get("gpus", [])
    if not isinstance(gpus_data, list):
        raise TopologyError(f"{where}.gpus: must be a list of GPU objects")
    os_node = data.get("os_node")
    return NumaNode(
        node_id=_parse_int(data["id"], f"{where}.id"),
        cpus=_parse_cpus(data["cpus"], f"{where}.cpus"),
        memory_bytes=parse_size(data["memory"], f"{where}.memory"),
        read_bandwidth_gbs=None if bandwidth is None else float(bandwidth),
        gpus=tuple(_parse_gpu(gpu, f"{where}.gpus[{i}]") for i, gpu in enumerate(gpus_data)),
        os_node_id=None if os_node is None else _parse_int(os_node, f"{where}.os_node"),
    )


def _parse_host(data: Any, where: str) -> Host:
    _check_keys(data, _HOST_KEYS, {"name", "numa_nodes"}, where)
    name = data["name"]
    if not isinstance(name, str) or not name:
        raise TopologyError(f"{where}.name: {name!r} must be a non-empty string")
    nodes_data = data["numa_nodes"]
    if not isinstance(nodes_data, list) or not nodes_data:
        raise TopologyError(f"{where}.numa_nodes: must be a non-empty list of NUMA node objects")
    nodes = tuple(_parse_node(node, f"{where}.numa_nodes[{i}]")
                  for i, node in enumerate(nodes_data))
    host = Host(name=name, nodes=nodes)
    _validate_host(host, where)
    return host


def _validate_host(host: Host, where: str) -> None:
    """Checks that need all of a host's nodes: unique node ids, CPUs and GPU indexes."""
    seen_ids: set[int] = set()
    cpu_owner: dict[int, int] = {}
    gpu_owner: dict[int, int] = {}
    for i, node in enumerate(host.nodes):
        if node.node_id in seen_ids:
            raise TopologyError(f"{where}.numa_nodes[{i}].id: node id {node.node_id} appears "
                                f"twice on host {host.name!r}; give each node its own id")
        seen_ids.add(node.node_id)
        shared = sorted(cpu for cpu in node.cpus if cpu in cpu_owner)
        if shared:
            raise TopologyError(
                f"{where}.numa_nodes[{i}].cpus: CPU(s) {format_cpu_list(shared)} also belong to "
                f"node {cpu_owner[shared[0]]}; each CPU belongs to exactly one node, so remove "
                f"them from one of the two")
        cpu_owner.update(dict.fromkeys(node.cpus, node.node_id))
        for gpu in node.gpus:
            if gpu.index in gpu_owner:
                raise TopologyError(
                    f"{where}.numa_nodes[{i}].gpus: GPU index {gpu.index} also appears on node "
                    f"{gpu_owner[gpu.index]}; give each GPU of a host its own index")
            gpu_owner[gpu.index] = node.node_id


def _parse_topology(data: Any) -> Topology:
    _check_keys(data, _TOP_KEYS, {"hosts"}, "topology")
    hosts_data = data["hosts"]
    if not isinstance(hosts_data, list) or not hosts_data:
        raise TopologyError("topology.hosts: must be a non-empty list of host objects")
    hosts = tuple(_parse_host(host, f"hosts[{i}]") for i, host in enumerate(hosts_data))
    names = [host.name for host in hosts]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise TopologyError(f"hosts: host name(s) {duplicates} appear twice; give each host a "
                            f"unique name")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise TopologyError("topology.description: must be a string")
    return Topology(hosts=hosts, description=description)


def _host_to_dict(host: Host) -> dict[str, Any]:
    return {"name": host.name, "numa_nodes": [_node_to_dict(node) for node in host.nodes]}


def _node_to_dict(node: NumaNode) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": node.node_id,
        "cpus": format_cpu_list(node.cpus),
        "memory": node.memory_bytes,
        "read_bandwidth_gbs": node.read_bandwidth_gbs,
        "gpus": [{"index": gpu.index, "name": gpu.name, "memory": gpu.memory_bytes}
                 for gpu in node.gpus],
    }
    if node.os_node_id is not None:
        out["os_node"] = node.os_node_id
    return out


def load_topology(path: str | os.PathLike[str]) -> Topology:
    """Reads a topology file: JSON, or YAML (.yaml/.yml) when PyYAML is installed."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise TopologyError(f"cannot read topology file {str(path)!r}: {error.strerror}; check "
                            f"the --topology path") from error
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml  # noqa: PLC0415 - optional dependency
        except ImportError as error:
            raise TopologyError(f"{path} is YAML but PyYAML is not installed; write the topology "
                                f"as JSON or run `pip install pyyaml`") from error
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise TopologyError(f"{path} is not valid YAML: {error}; fix the file") from error
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise TopologyError(f"{path} is not valid JSON: {error.msg} at line {error.lineno} "
                                f"column {error.colno}; fix the file (YAML files must end in "
                                f".yaml or .yml)") from error
    try:
        return _parse_topology(data)
    except TopologyError as error:
        raise TopologyError(f"{path}: {error}") from error


# ---------------------------------------------------------------------------------------------
# Local discovery


def _read_meminfo_total(path: Path) -> int:
    """MemTotal in bytes from /proc/meminfo or /sys/.../nodeN/meminfo ("Node 0 MemTotal: N kB")."""
    for line in path.read_text().splitlines():
        match = re.search(r"MemTotal:\s+(\d+)\s*kB", line)
        if match:
            return int(match.group(1)) * 1024
    raise TopologyError(f"{path} has no MemTotal line; pass a topology file with --topology")


def discover_local(sys_root: str | os.PathLike[str] = "/sys",
                   proc_root: str | os.PathLike[str] = "/proc",
                   allowed_cpus: Iterable[int] | None = None,
                   host_name: str | None = None) -> Topology:
    """This machine's topology: one host, its NUMA nodes limited to the CPUs we may use.

    Nodes come from <sys_root>/devices/system/node/nodeN/{cpulist,meminfo}. Each node's CPUs are
    intersected with `allowed_cpus` (default: os.sched_getaffinity(0)); nodes left without CPUs
    (memory-only nodes, or nodes outside a cgroup/taskset) are dropped, since no worker can pin
    there. Without a node directory (no NUMA support in the kernel, some containers) the host is
    one node with all allowed CPUs and <proc_root>/meminfo's MemTotal.

    Bandwidth is left None (`numoe membw` measures it) and GPUs are not discovered yet. Ray-based
    discovery across hosts will call this on every host; it is not written yet.
    """
    allowed = set(os.sched_getaffinity(0) if allowed_cpus is None else allowed_cpus)
    name = host_name or socket.gethostname()
    node_root = Path(sys_root) / "devices" / "system" / "node"
    node_dirs = sorted(
        (int(entry.name[4:]), entry)
        for entry in (node_root.iterdir() if node_root.is_dir() else ())
        if re.fullmatch(r"node\d+", entry.name)
    )
    nodes: list[NumaNode] = []
    for node_id, node_dir in node_dirs:
        cpus = tuple(cpu for cpu in parse_cpu_list((node_dir / "cpulist").read_text(),
                                                   str(node_dir / "cpulist"))
                     if cpu in allowed)
        if cpus:
            nodes.append(NumaNode(node_id=node_id, cpus=cpus,
                                  memory_bytes=_read_meminfo_total(node_dir / "meminfo")))
    if not node_dirs:
        nodes.append(NumaNode(node_id=0, cpus=tuple(sorted(allowed)),
                              memory_bytes=_read_meminfo_total(Path(proc_root) / "meminfo")))
    if not nodes:
        raise TopologyError(
            f"none of the CPUs this process may use ({format_cpu_list(allowed)}) belongs to a "
            f"NUMA node under {node_root}; check taskset/cgroup limits or pass --topology FILE")
    return Topology(hosts=(Host(name=name, nodes=tuple(nodes)),))


# ---------------------------------------------------------------------------------------------
# Virtual NUMA


def _split_evenly(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def virtual_numa(topology: Topology, n: int) -> Topology:
    """Splits a one-host, one-node topology into n virtual nodes of contiguous CPUs.

    Memory (and declared bandwidth, which the virtual nodes share) is split evenly; every virtual
    node keeps os_node_id = the real node, so workers bind their memory to a node that exists.
    GPUs stay with virtual node 0.
    """
    if n < 1:
        raise TopologyError(f"--virtual-numa {n}: give a number of virtual nodes >= 1")
    if len(topology.hosts) != 1 or len(topology.hosts[0].nodes) != 1:
        shape = ", ".join(f"{host.name}: {len(host.nodes)} node(s)" for host in topology.hosts)
        raise TopologyError(f"--virtual-numa needs one host with one NUMA node, but the topology "
                            f"has {shape}; drop --virtual-numa to use the real nodes")
    host = topology.hosts[0]
    node = host.nodes[0]
    if n > len(node.cpus):
        raise TopologyError(f"--virtual-numa {n}: host {host.name!r} has only {len(node.cpus)} "
                            f"usable CPU(s) ({format_cpu_list(node.cpus)}); ask for at most "
                            f"{len(node.cpus)} virtual nodes")
    cpu_counts = _split_evenly(len(node.cpus), n)
    memory = _split_evenly(node.memory_bytes, n)
    virtual_nodes: list[NumaNode] = []
    start = 0
    for i in range(n):
        virtual_nodes.append(NumaNode(
            node_id=i,
            cpus=node.cpus[start:start + cpu_counts[i]],
            memory_bytes=memory[i],
            read_bandwidth_gbs=(None if node.read_bandwidth_gbs is None
                                else node.read_bandwidth_gbs / n),
            gpus=node.gpus if i == 0 else (),
            os_node_id=node.memory_node,
        ))
        start += cpu_counts[i]
    return replace(topology, hosts=(Host(name=host.name, nodes=tuple(virtual_nodes)),))


# ---------------------------------------------------------------------------------------------
# Display


def format_topology_table(topology: Topology) -> str:
    """A readable table, one row per NUMA node."""
    header = ("host", "node", "cpus", "cores", "memory GiB", "read GB/s", "gpus")
    rows = [header]
    for host in topology.hosts:
        for node in host.nodes:
            node_label = str(node.node_id)
            if node.os_node_id is not None and node.os_node_id != node.node_id:
                node_label += f" (os {node.os_node_id})"
            gpus = ", ".join(f"{gpu.index}:{gpu.name} {gpu.memory_bytes / GIB:.1f} GiB"
                             for gpu in node.gpus) or "-"
            bandwidth = "-" if node.read_bandwidth_gbs is None else f"{node.read_bandwidth_gbs:.1f}"
            rows.append((host.name, node_label, format_cpu_list(node.cpus), str(len(node.cpus)),
                         f"{node.memory_bytes / GIB:.1f}", bandwidth, gpus))
    widths = [max(len(row[col]) for row in rows) for col in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    if topology.description:
        lines.insert(0, topology.description)
    return "\n".join(lines)
