"""NumaWorker as the plain class it is, in this process (no Ray): real ZeroMQ sockets play the
coordinator. A one-worker plan computes exactly what the single-process engine computes; the
pinning stays on the worker's data-plane thread; bad messages come back as ERROR."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from cluster.engine import Engine
from cluster.gguf import open_gguf
from cluster.model import load_model_spec
from cluster.placement import ModelSpec, PlanOptions, make_plan
from cluster.protocol import Error, Forward, Hidden, Logits, Shutdown, decode, encode
from cluster.topology import Host, NumaNode, Topology, discover_local
from tests.cluster.conftest import N_CTX, prompt_ids
from tests.reference.tiny_models import TinyModel
from worker.worker import NumaWorker, WorkerOptions

TIMEOUT_MS = 30_000


@pytest.fixture
def wired(tiny_qwen3moe: TinyModel, tmp_path: Path
          ) -> Iterator[tuple[NumaWorker, zmq.Socket, zmq.Socket]]:
    """(worker, PUSH to its inbox, PULL it reports to)."""
    from native import kernels  # noqa: PLC0415

    threads = kernels.get_threads()  # the worker's backend sets the process-wide count
    path = tiny_qwen3moe.gguf["f32"]
    node = discover_local().hosts[0].nodes[0]
    cpu = sorted(os.sched_getaffinity(0))[-1]
    topology = Topology((Host("here", (NumaNode(0, (cpu,), node.memory_bytes),)),))
    with open_gguf(path) as gguf:
        config, tensors = load_model_spec(gguf)
    plan = make_plan(ModelSpec(config, tensors), topology, PlanOptions(ctx=N_CTX))
    options = WorkerOptions(n_threads=1, n_ctx=N_CTX)
    worker = NumaWorker(0, json.dumps(plan.to_dict()), str(path), options.to_dict(),
                        memory_node=node.memory_node)
    context = zmq.Context()
    coordinator = context.socket(zmq.PULL)
    coordinator.bind(f"ipc://{tmp_path}/coordinator")
    opened = worker.open(["ipc"], "ipc", str(tmp_path))
    worker.connect([], [], f"ipc://{tmp_path}/coordinator")
    worker.load()
    push = context.socket(zmq.PUSH)
    push.connect(opened["inbox"]["ipc"])
    yield worker, push, coordinator
    push.send_multipart(encode(Shutdown("test over")))
    assert worker.serve() == "stopped"
    push.close(linger=0)
    coordinator.close(linger=0)
    context.term()
    kernels.set_threads(threads)


def _step(push: zmq.Socket, coordinator: zmq.Socket, step: int, ids: list[int], start: int,
          all_logits: int = 0) -> object:
    positions = np.arange(start, start + len(ids), dtype=np.int64)
    push.send_multipart(encode(Forward(step, np.array(ids, np.int64), positions,
                                       np.zeros(len(ids), np.int64), all_logits)))
    assert coordinator.poll(TIMEOUT_MS), "no reply from the worker"
    return decode(coordinator.recv_multipart())


def test_one_worker_computes_what_the_single_process_engine_does(
        wired: tuple[NumaWorker, zmq.Socket, zmq.Socket], tiny_qwen3moe: TinyModel) -> None:
    worker, push, coordinator = wired
    ids = prompt_ids(11)
    with Engine(tiny_qwen3moe.gguf["f32"], n_threads=1, n_ctx=N_CTX) as reference:
        expected = reference.runner.forward(ids, 0, logits="all")
        expected_next = reference.runner.forward([42], len(ids))
    reply = _step(push, coordinator, 0, ids, 0, all_logits=1)
    assert isinstance(reply, Logits) and reply.step_id == 0 and reply.vocab_start == 0
    np.testing.assert_array_equal(reply.logits, expected)  # same kernels, same order
    reply = _step(push, coordinator, 1, [42], len(ids))
    assert isinstance(reply, Logits)
    np.testing.assert_array_equal(reply.logits, expected_next)
    stats = worker.stats()
    assert stats["steps"] == 2 and stats["forward"]["tokens"] == len(ids) + 1


def test_pinning_stays_on_the_data_plane_thread(
        wired: tuple[NumaWorker, zmq.Socket, zmq.Socket]) -> None:
    worker, _, _ = wired
    ours = os.sched_getaffinity(0)
    found = worker.placement()
    assert found["affinity"] == found["planned_cpus"] == found["thread_cpus"]
    assert found["pid"] == os.getpid()
    assert os.sched_getaffinity(0) == ours  # this (Ray method / test) thread is not pinned
    assert found["memory_policy_nodes"] == [worker.memory_node]


def test_bad_steps_come_back_as_errors(wired: tuple[NumaWorker, zmq.Socket, zmq.Socket]) -> None:
    _, push, coordinator = wired
    reply = _step(push, coordinator, 5, [1, 2], 3000)  # beyond the context
    assert isinstance(reply, Error) and reply.step_id == 5 and "exceed the context" in \
        reply.message
    hidden = Hidden(6, 9, 0, np.arange(1), np.zeros(1, np.int64), np.zeros((1, 64), np.float32))
    push.send_multipart(encode(hidden))  # the first stage takes token ids, not hidden states
    assert coordinator.poll(TIMEOUT_MS)
    reply = decode(coordinator.recv_multipart())
    assert isinstance(reply, Error) and "received a HIDDEN message" in reply.message
    push.send_multipart([b"\x03", b"not msgpack"])
    assert coordinator.poll(TIMEOUT_MS)
    reply = decode(coordinator.recv_multipart())
    assert isinstance(reply, Error) and "malformed message" in reply.message
    reply = _step(push, coordinator, 7, [5], 0)  # the worker still serves
    assert isinstance(reply, Logits)
