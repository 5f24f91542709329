"""`numoe serve --virtual-numa 2`: the server on 2 NUMA workers (a real local Ray, started by
the server's own runner and stopped with it, so no other module's Ray holds the NUMA
resources meanwhile) answers the openai client with the single-process engine's greedy text,
shows its plan and topology, and exports each worker's weight-read bandwidth."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.engine import Engine
from cluster.sampling import SamplingParams
from cluster.serve_cli import add_serve_parser, serve_config
from cluster.topology import Topology, discover_local, virtual_numa
from tests.reference.tiny_models import TinyModel
from tests.server.conftest import RunningServer, running_server

pytestmark = pytest.mark.slow

PROMPT = "The quick brown fox"
MAX_TOKENS = 8
N_CTX = 128
BANDWIDTH = "numoe:worker_weight_read_bytes_per_second"


def model_path(model: TinyModel) -> Path:
    return model.gguf["f32"]  # float weights: the cluster's reduction order changes no argmax


@contextmanager
def cluster_serving(model: TinyModel) -> Iterator[RunningServer]:
    """A loaded server on 2 virtual NUMA workers, configured as `numoe serve` parses it."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("serving on 2 workers needs 2 CPUs, one per virtual NUMA node")
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", str(model_path(model)), "--virtual-numa", "2", "-t", "1",
                              "--max-num-seqs", "2", "--max-model-len", str(N_CTX)])
    config = serve_config(args, environ={})
    with running_server(config, load=False) as server:
        server.state.load()
        yield server


@pytest.fixture(scope="module")
def cluster_server(tiny_qwen3moe: TinyModel) -> Iterator[RunningServer]:
    with cluster_serving(tiny_qwen3moe) as server:
        yield server


def bandwidth_by_node(metrics_text: str) -> dict[str, float]:
    """numa_node -> the worker weight-read bandwidth gauge, from /metrics' text."""
    return {sample.labels["numa_node"]: sample.value
            for family in text_string_to_metric_families(metrics_text)
            for sample in family.samples if sample.name == BANDWIDTH}


def test_config_from_flags_and_environment() -> None:
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    flags = serve_config(parser.parse_args(["serve", "--workers", "2", "-t", "3"]), {})
    assert flags.cluster is not None
    assert (flags.cluster.workers, flags.cluster.threads_per_worker) == (2, 3)
    env = serve_config(parser.parse_args(["serve"]),
                       {"NUMOE_VIRTUAL_NUMA": "2", "NUMOE_THREADS": "1"})
    assert env.cluster is not None
    assert (env.cluster.virtual_numa, env.cluster.threads_per_worker) == (2, 1)
    assert serve_config(parser.parse_args(["serve"]), {}).cluster is None


def test_completion_equals_single_process(cluster_server: RunningServer,
                                          tiny_qwen3moe: TinyModel) -> None:
    with Engine(model_path(tiny_qwen3moe), n_threads=1, n_ctx=N_CTX) as engine:
        expected = engine.generate(PROMPT, MAX_TOKENS, SamplingParams(temperature=0)).text()
    client = openai.OpenAI(base_url=cluster_server.base_url + "/v1", api_key="unused",
                           max_retries=0)
    result = client.completions.create(model=cluster_server.model_name, prompt=PROMPT,
                                       max_tokens=MAX_TOKENS, temperature=0)
    assert expected
    assert result.choices[0].text == expected


def test_plan_and_topology(cluster_server: RunningServer) -> None:
    plan = httpx.get(cluster_server.base_url + "/v1/cluster/plan")
    assert plan.status_code == 200
    assert len(plan.json()["workers"]) == 2
    topology = httpx.get(cluster_server.base_url + "/v1/cluster/topology")
    assert topology.status_code == 200
    served = Topology.from_dict(topology.json())
    expected = virtual_numa(discover_local(), 2)
    assert [[n.cpus for n in h.nodes] for h in served.hosts] == \
        [[n.cpus for n in h.nodes] for h in expected.hosts]
    workers = plan.json()["workers"]
    assert sorted(w["node_id"] for w in workers) == [n.node_id for n in expected.hosts[0].nodes]


def test_bandwidth_per_numa_node_after_a_generation(cluster_server: RunningServer) -> None:
    base = cluster_server.base_url
    httpx.get(base + "/metrics")  # a baseline: the gauge covers the steps since the last scrape
    response = httpx.post(base + "/v1/completions", timeout=120, json={
        "prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    assert response.status_code == 200
    metrics = httpx.get(base + "/metrics", timeout=120)
    assert metrics.status_code == 200
    bandwidth = bandwidth_by_node(metrics.text)
    assert len(bandwidth) == 2, bandwidth
    assert all(value > 0 for value in bandwidth.values()), bandwidth
