"""A real Prometheus server (the Debian package's `prometheus` binary) scrapes a real numoe
server on 2 virtual NUMA workers every second; its HTTP API then returns our series, the
per-NUMA-node weight-read bandwidth among them, non-zero after generations."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.reference.server_process import server_process
from tests.reference.tiny_models import TinyModel
from tests.server.conftest import RunningServer, free_port
from tests.server.test_cluster_serve import PROMPT, cluster_serving

pytestmark = pytest.mark.slow

WAIT_S = 30.0  # for Prometheus to start, and for a query to see the series


@pytest.fixture(scope="module")
def served(tiny_qwen3moe: TinyModel) -> Iterator[RunningServer]:
    with cluster_serving(tiny_qwen3moe) as server:
        yield server


@pytest.fixture(scope="module")
def prometheus(served: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prometheus scraping the server's /metrics every second; yields its base URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the `prometheus` binary is not installed (Debian: apt-get install "
                    "prometheus; tests/run-tests.sh installs it where apt is available)")
    directory = tmp_path_factory.mktemp("prometheus")
    target = served.base_url.removeprefix("http://")
    config = directory / "prometheus.yml"
    config.write_text(f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: numoe
    scrape_interval: 1s
    scrape_timeout: 1s
    static_configs:
      - targets: ["{target}"]
""")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with server_process(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"], base + "/-/ready",
            directory / "prometheus.log", "prometheus", timeout_s=WAIT_S):
        yield base


def query_until(prometheus: str, query: str, n_series: int) -> list[dict[str, Any]]:
    """Poll Prometheus' /api/v1/query until `query` returns n_series series (bounded)."""
    deadline = time.monotonic() + WAIT_S
    result: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        response = httpx.get(prometheus + "/api/v1/query", params={"query": query}, timeout=5)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "success", body
        result = body["data"]["result"]
        if len(result) >= n_series:
            return result
        time.sleep(0.5)
    raise AssertionError(f"after {WAIT_S:.0f} s, {query!r} returns {result}")


def test_prometheus_scrapes_our_series(served: RunningServer, prometheus: str) -> None:
    for _ in range(2):
        response = httpx.post(served.base_url + "/v1/completions", timeout=120, json={
            "prompt": PROMPT, "max_tokens": 4, "temperature": 0})
        assert response.status_code == 200, response.text
    model = served.model_name

    running = query_until(prometheus, "numoe:num_requests_running", 1)
    assert running[0]["metric"]["model_name"] == model

    generated = query_until(prometheus, "numoe:generation_tokens_total > 0", 1)
    assert float(generated[0]["value"][1]) >= 2  # at least one token per completion

    bandwidth = query_until(prometheus, "numoe:worker_weight_read_bytes_per_second > 0", 2)
    nodes = sorted(series["metric"]["numa_node"] for series in bandwidth)
    assert len(set(nodes)) == 2, bandwidth
    assert all(float(series["value"][1]) > 0 for series in bandwidth)
    assert all(series["metric"]["job"] == "numoe" for series in bandwidth)
