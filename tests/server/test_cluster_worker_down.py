"""A cluster worker killed while the server idles: /health turns 503 naming it before any
request notices, and the next request gets an error response instead of hanging. Its own
module: it breaks its server, and the cluster tests of one module share their Ray."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from tests.reference.tiny_models import TinyModel
from tests.server.test_cluster_serve import cluster_serving

pytestmark = pytest.mark.slow


def test_health_names_a_dead_worker_and_requests_fail_fast(tiny_qwen3moe: TinyModel) -> None:
    with cluster_serving(tiny_qwen3moe) as server, httpx.Client(base_url=server.base_url,
                                                               timeout=60) as client:
        assert client.get("/health").status_code == 200
        runner = server.state.scheduler.runner
        pid = runner.worker_pids()[1]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while (health := client.get("/health")).status_code == 200:
            assert time.monotonic() < deadline, "/health still 200 30 s after a worker died"
            time.sleep(0.2)
        assert health.status_code == 503
        message = health.json()["error"]["message"]
        assert "worker 1" in message and f"pid {pid}" in message, message

        started = time.monotonic()
        reply = client.post("/v1/completions", json={
            "model": server.state.model_name, "prompt": "hello", "max_tokens": 4})
        assert reply.status_code >= 500, reply.text
        assert "error" in reply.json()
        assert time.monotonic() - started < 30
