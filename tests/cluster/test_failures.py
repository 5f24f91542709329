"""Failures on a real local Ray: a worker that raises during a step, and a worker process that
dies between steps, become NumoeError naming the worker, within a bounded time, never a hang;
close() then ends every worker and removes the ipc files."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import numpy as np
import pytest

from cluster.coordinator import ClusterRunner
from cluster.errors import NumoeError
from cluster.gguf import open_gguf
from cluster.model import load_model_spec
from cluster.placement import ModelSpec, PlanOptions, make_plan
from tests.cluster.conftest import N_CTX, RayTestCluster, prompt_ids
from tests.reference.tiny_models import TinyModel
from worker.worker import WorkerOptions

pytestmark = pytest.mark.slow
# A step's worst case here: Ray notices the dead process (about a second), plus the poll.
DEATH_NOTICED_WITHIN_S = 30.0


@pytest.fixture
def runner(ray_cluster: RayTestCluster, tiny_qwen3moe: TinyModel) -> Iterator[ClusterRunner]:
    path = tiny_qwen3moe.gguf["f32"]
    with open_gguf(path) as gguf:
        config, tensors = load_model_spec(gguf)
    plan = make_plan(ModelSpec(config, tensors), ray_cluster.local, PlanOptions(ctx=N_CTX))
    # A short reduce timeout, so the surviving worker gives up soon after its peer dies.
    options = WorkerOptions(n_threads=1, reduce_timeout_s=5.0, send_timeout_s=5.0)
    runner = ClusterRunner(path, plan, N_CTX, topology=ray_cluster.local, options=options,
                           step_timeout_s=120.0)
    yield runner
    runner.close()


def test_a_step_that_raises_in_a_worker_is_an_error_naming_it(runner: ClusterRunner) -> None:
    runner.forward(prompt_ids(0), 0)
    bad_id = runner.vocab_size + 7  # the coordinator passes ids on; the workers check them
    with pytest.raises(NumoeError, match=rf"worker [01] \(host .*, NUMA node [01], pid \d+\) "
                                         rf"failed \(step 1\): token ids \[{bad_id}\] are "
                                         rf"outside the vocabulary"):
        runner.forward([bad_id], 16)
    with pytest.raises(NumoeError, match="failed earlier.*start a new one"):
        runner.forward([1], 17)


@pytest.mark.parametrize("how", ["sigkill", "ray_kill"])
def test_a_dead_worker_is_named_without_hanging(runner: ClusterRunner, how: str) -> None:
    import ray  # noqa: PLC0415

    logits = runner.forward(prompt_ids(1), 0)
    assert np.isfinite(logits).all()
    victim = 1
    pid = runner.worker_pids()[victim]
    if how == "sigkill":
        os.kill(pid, signal.SIGKILL)
    else:
        ray.kill(runner._handles[victim], no_restart=True)
    _wait_until_dead(pid)  # ray.kill only asks; let the process be gone before the step
    started = time.monotonic()
    # Worker 0 takes the step and waits for its dead peer in the all-reduce; the coordinator
    # must notice the death rather than wait for logits that never come.
    with pytest.raises(NumoeError, match=rf"worker {victim} \(host .*, NUMA node {victim}, "
                                         rf"pid {pid}\) died"):
        runner.forward([11], 16)
    assert time.monotonic() - started < DEATH_NOTICED_WITHIN_S


def test_close_ends_workers_and_removes_ipc_files(runner: ClusterRunner) -> None:
    import ray  # noqa: PLC0415

    runner.forward(prompt_ids(2), 0)
    ipc_dir = runner._ipc_dir
    assert os.listdir(ipc_dir)  # the coordinator's and the workers' inbox sockets
    pids = runner.worker_pids()
    serving = list(runner._serving)
    runner.close()
    assert not os.path.exists(ipc_dir)
    done, _ = ray.wait(serving, num_returns=len(serving), timeout=0)
    assert len(done) == len(pids)  # every worker's serve() call ended
    for pid in pids.values():
        _wait_until_dead(pid)
    with pytest.raises(NumoeError, match="closed"):
        runner.forward([1], 0)


def _wait_until_dead(pid: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        assert time.monotonic() < deadline, f"process {pid} still runs after {timeout_s} s"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too (its parent, the raylet, has not reaped it yet).
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
