"""NUMA resources: their names, the `ray start` line that declares them, and the clear error when
the Ray cluster lacks a host's resources (checked before any actor is created)."""

from __future__ import annotations

import json

import pytest

from cluster.coordinator import ClusterRunner
from cluster.errors import NumoeError
from cluster.gguf import open_gguf
from cluster.model import load_model_spec
from cluster.placement import ModelSpec, PlanOptions, make_plan
from cluster.ray_cluster import (
    host_resources,
    missing_resources,
    numa_resource,
    ray_start_command,
    start_local_ray,
)
from cluster.topology import Host, NumaNode, Topology
from tests.cluster.conftest import N_CTX, RayTestCluster
from tests.reference.tiny_models import TinyModel

GIB = 1 << 30
HOST = Host("rack-1.example", (NumaNode(0, (0,), GIB), NumaNode(3, (1,), GIB)))


def test_one_resource_per_numa_node_with_a_safe_name() -> None:
    assert numa_resource("rack-1.example", 3) == "numoe_numa_rack_1_example_3"
    assert host_resources(HOST) == {"numoe_numa_rack_1_example_0": 1.0,
                                    "numoe_numa_rack_1_example_3": 1.0}


def test_ray_start_command_declares_the_host_resources() -> None:
    command = ray_start_command(HOST, "10.0.0.1:6379")
    assert command.startswith("ray start --address=10.0.0.1:6379 --resources='")
    declared = json.loads(command.split("--resources=")[1].strip("'"))
    assert declared == {name: 1 for name in host_resources(HOST)}
    assert ray_start_command(HOST).startswith("ray start --head ")


def test_missing_resources_are_listed_per_host() -> None:
    other = Host("b", (NumaNode(0, (0,), GIB),))
    available = {"numoe_numa_rack_1_example_0": 1.0, "numoe_numa_b_0": 1.0, "CPU": 2.0}
    assert missing_resources(Topology((HOST, other)), available) == {
        "rack-1.example": ["numoe_numa_rack_1_example_3"]}


def test_several_hosts_need_a_ray_cluster() -> None:
    with pytest.raises(NumoeError, match=r"2 hosts, which need a Ray cluster.*"
                                         r"numoe_numa_b_0.*--ray-address"):
        start_local_ray(Topology((HOST, Host("b", (NumaNode(0, (0,), GIB),)))))


@pytest.mark.slow
def test_runner_refuses_a_host_ray_does_not_declare(ray_cluster: RayTestCluster,
                                                    tiny_qwen3moe: TinyModel) -> None:
    path = tiny_qwen3moe.gguf["f32"]
    with open_gguf(path) as gguf:
        config, tensors = load_model_spec(gguf)
    topology = Topology((Host("absent-host", (NumaNode(0, (0,), GIB),)),))
    plan = make_plan(ModelSpec(config, tensors), topology, PlanOptions(ctx=N_CTX))
    with pytest.raises(NumoeError, match=r"no worker slot for NUMA node resource\(s\) "
                                         r"\['numoe_numa_absent_host_0'\].*on host 'absent-host' "
                                         r"run: ray start --head --resources="):
        ClusterRunner(path, plan, N_CTX, topology=topology)
