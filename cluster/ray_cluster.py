"""Ray as numoe's control plane: start or join a Ray cluster whose nodes declare one custom
resource per NUMA node, so each worker actor lands on the host that owns its node.

Resource naming: NUMA node N of topology host H is the resource `numoe_numa_<H>_<N>` (H with
every character outside [A-Za-z0-9] replaced by "_"), amount 1. A worker actor asks for 1 of
its node's resource and 0 CPUs, so exactly one worker fits per node and Ray's own CPU
accounting never blocks it.

* One host: `start_local_ray(topology)` starts a private Ray instance on this machine declaring
  the host's resources (what `numoe generate --workers/--virtual-numa/--topology` does).
* Several hosts: start Ray on each host with that host's resources (`ray_start_command` prints
  the exact command line), then `join_ray(address, topology)` checks every resource is there.
* Tests simulate hosts with several raylets on one machine (`ray.cluster_utils.Cluster`), each
  declaring one topology host's resources (`host_resources`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass

from cluster.errors import NumoeError
from cluster.topology import Host, Topology

RESOURCE_PREFIX = "numoe_numa_"
# The object store holds nothing of ours (activations go over ZeroMQ): keep it at Ray's minimum.
OBJECT_STORE_BYTES = 96 << 20


def numa_resource(host: str, node_id: int) -> str:
    """The Ray custom resource standing for NUMA node `node_id` of topology host `host`."""
    return f"{RESOURCE_PREFIX}{re.sub(r'[^A-Za-z0-9]', '_', host)}_{node_id}"


def host_resources(host: Host) -> dict[str, float]:
    """The resources a Ray node must declare to stand for `host`: 1 per NUMA node."""
    return {numa_resource(host.name, node.node_id): 1.0 for node in host.nodes}


def ray_start_command(host: Host, head_address: str | None = None) -> str:
    """The `ray start` line to run on `host` so its workers can be placed there."""
    resources = json.dumps({name: int(amount) for name, amount in host_resources(host).items()},
                           separators=(",", ":"))
    where = f"--address={head_address}" if head_address else "--head"
    return f"ray start {where} --resources='{resources}'"


def missing_resources(topology: Topology, available: dict[str, float]) -> dict[str, list[str]]:
    """Per host, the NUMA resources the Ray cluster does not declare."""
    missing: dict[str, list[str]] = {}
    for host in topology.hosts:
        absent = [name for name in host_resources(host) if available.get(name, 0.0) < 1.0]
        if absent:
            missing[host.name] = absent
    return missing


def check_resources(topology: Topology, head_address: str | None = None) -> None:
    """Raise NumoeError naming every host whose NUMA resources the connected Ray cluster lacks,
    with the command that declares them."""
    import ray  # noqa: PLC0415

    missing = missing_resources(topology, ray.cluster_resources())
    if not missing:
        return
    hosts = {host.name: host for host in topology.hosts}
    fixes = "; ".join(f"on host {name!r} run: {ray_start_command(hosts[name], head_address)}"
                      for name in missing)
    raise NumoeError(
        f"the Ray cluster has no worker slot for NUMA node resource(s) "
        f"{sorted(r for names in missing.values() for r in names)}; start Ray on each host "
        f"with its NUMA resources ({fixes})")


@dataclass
class RaySession:
    """A connection to Ray; `close()` disconnects (and, for a local instance, stops Ray) only
    when this session made the connection."""

    connected_here: bool
    address: str | None = None

    def close(self) -> None:
        import ray  # noqa: PLC0415

        if self.connected_here and ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> RaySession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def start_local_ray(topology: Topology, num_cpus: int | None = None) -> RaySession:
    """A private Ray instance on this machine declaring the NUMA resources of the topology's
    one host. If Ray is already initialized in this process, checks its resources instead."""
    import ray  # noqa: PLC0415

    if len(topology.hosts) != 1:
        commands = "; ".join(ray_start_command(host, "HEAD:6379") for host in topology.hosts)
        raise NumoeError(
            f"the topology has {len(topology.hosts)} hosts, which need a Ray cluster: start "
            f"Ray on each host with its NUMA resources ({commands}; the first host may use "
            f"--head instead of --address) and pass --ray-address HEAD:6379")
    if ray.is_initialized():
        check_resources(topology)
        return RaySession(connected_here=False)
    ray.init(
        address="local",  # never join another Ray instance that happens to run here
        num_cpus=num_cpus if num_cpus is not None else len(os.sched_getaffinity(0)),
        resources=host_resources(topology.hosts[0]),
        object_store_memory=OBJECT_STORE_BYTES,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,  # workers report through ERROR messages; stdout stays the text
    )
    return RaySession(connected_here=True)


def join_ray(address: str, topology: Topology) -> RaySession:
    """Connect to a running Ray cluster and check it declares every NUMA resource."""
    import ray  # noqa: PLC0415

    if ray.is_initialized():
        check_resources(topology, address)
        return RaySession(connected_here=False, address=address)
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as error:
        raise NumoeError(f"cannot connect to the Ray cluster at {address!r} ({error}); start "
                         f"it with `ray start --head` and pass its address") from error
    session = RaySession(connected_here=True, address=address)
    try:
        check_resources(topology, address)
    except NumoeError:
        session.close()
        raise
    return session
