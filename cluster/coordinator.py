"""The coordinator: runs a model on NUMA worker actors as if it were one ModelRunner.

    runner = ClusterRunner("model.gguf", plan, n_ctx=4096, topology=topology)
    logits = runner.forward([1, 2, 3], start=0, logits="last")  # float32 [1, vocab]
    runner.forward_batch([SequenceChunk(slot, start, ids), ...])  # float32 [n_chunks, vocab]
    runner.worker_stats()                                      # counters per worker
    runner.close()

Ray (already initialized: cluster/ray_cluster.py) creates one actor per plan worker, on the node
whose NUMA resource it asks for, and carries the control calls: open sockets, connect, load,
stats, placement. The coordinator never holds weights: it reads the plan, and the engine around
it opens only the GGUF's metadata (config, tokenizer).

Data plane (ZeroMQ, cluster/protocol.py; ipc:// between processes of one Ray node, tcp://
between nodes):

    coordinator --FORWARD--> every rank of stage 0
    stage s     --HIDDEN---> stage s + 1 (rank j of s + 1 from rank j mod n_s of s)
    last stage  --LOGITS---> coordinator, one vocab slice per rank, joined by vocab offset
    any rank    --ERROR----> coordinator

A step never hangs: the coordinator polls its inbox with a short timeout and, between polls,
asks Ray whether any worker's pending `serve()` call has ended (the actor died or its data
plane crashed), and gives up after step_timeout_s in any case. After a failed step the runner
refuses further steps (the workers' KV caches and reductions are out of step): close it and
start a new one.

Continuous batching (worker/batch.py): each worker keeps options.n_slots KV caches; a FORWARD
carries several sequences' tokens, its sequence_ids being their slots, and the last stage
returns one logits row per sequence (its last token). forward_batch sends one FORWARD per
batch-invariant pass of the call.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TextIO

import numpy as np
import zmq

from cluster.errors import NumoeError
from cluster.placement import Plan, WorkerPlan
from cluster.protocol import (
    BFloat16Array,
    Error,
    Forward,
    Logits,
    ProtocolError,
    Shutdown,
    decode,
    encode,
)
from cluster.ray_cluster import RaySession, check_resources, numa_resource
from cluster.topology import Topology
from worker.batch import SequenceChunk, check_chunks
from worker.worker import NumaWorker, WorkerOptions

_POLL_MS = 50  # between looks at the workers' liveness while waiting for a step
_MAX_CONCURRENCY = 4  # serve() blocks one actor thread; stats/placement need others
_SHUTDOWN_GRACE_S = 5.0


class ClusterRunner:
    """forward(token_ids, start, logits) over the plan's workers; same contract as ModelRunner."""

    def __init__(self, model_path: str | Path, plan: Plan, n_ctx: int, *,
                 topology: Topology | None = None, options: WorkerOptions | None = None,
                 step_timeout_s: float = 600.0, startup_timeout_s: float = 600.0,
                 ray_session: RaySession | None = None, progress: TextIO | None = None) -> None:
        """topology: where the plan's nodes came from, for each worker's real memory node
        (virtual nodes share one); None: the plan's node ids are real nodes. ray_session:
        closed with the runner (the CLI's private Ray instance). progress: where loading
        progress goes (None: nowhere)."""
        self.plan = plan
        self._progress = progress
        self.topology = topology  # None when the plan's node ids are real nodes
        self.n_ctx = n_ctx
        self._ray_session = ray_session
        self.step_timeout_s = step_timeout_s
        self.options = WorkerOptions(**{**(options or WorkerOptions()).to_dict(), "n_ctx": n_ctx})
        last_stage = plan.stages[-1]
        self.vocab_size = max(plan.workers[rank].vocab[1] for rank in last_stage.ranks)
        self._slices = {rank: plan.workers[rank].vocab for rank in last_stage.ranks}
        self._step = 0
        self._broken: str | None = None
        self._closed = False
        self._handles: dict[int, Any] = {}
        self._serving: dict[Any, int] = {}  # pending serve() ref -> rank
        self._where: dict[int, dict[str, Any]] = {}  # rank -> describe()
        self._push: dict[int, zmq.Socket] = {}  # rank -> PUSH to its inbox
        # rank -> its Ray node and the addresses it was wired with (for logs and tests)
        self.wiring: dict[int, dict[str, Any]] = {}
        self._ipc_dir = tempfile.mkdtemp(prefix="numoe-")
        # Socket files go even when the runner is never closed (a crashed script).
        weakref.finalize(self, shutil.rmtree, self._ipc_dir, ignore_errors=True)
        self._context = zmq.Context()
        self._inbox = self._context.socket(zmq.PULL)
        self._inbox.setsockopt(zmq.LINGER, 0)
        try:
            if n_ctx <= 0:
                raise NumoeError(f"context size {n_ctx} must be a positive number of tokens")
            self._start(str(model_path), topology, startup_timeout_s)
        except BaseException:
            self.close()
            raise

    # --- startup -----------------------------------------------------------------------------

    def _start(self, model_path: str, topology: Topology | None, timeout_s: float) -> None:
        import ray  # noqa: PLC0415

        if not ray.is_initialized():
            raise NumoeError("Ray is not running in this process; start it with "
                             "cluster.ray_cluster.start_local_ray(topology) or join_ray(...)")
        plan = self.plan
        if topology is not None:
            check_resources(topology)
        missing = [numa_resource(w.host, w.node_id) for w in plan.workers
                   if ray.cluster_resources().get(numa_resource(w.host, w.node_id), 0) < 1]
        if missing:
            raise NumoeError(f"the Ray cluster declares no resource {missing}; start Ray with "
                             f"one resource per NUMA node (cluster/ray_cluster.py)")
        plan_json = json.dumps(plan.to_dict())
        actor = ray.remote(NumaWorker)
        for worker in plan.workers:
            self._handles[worker.rank] = actor.options(
                name=None, num_cpus=0, resources={numa_resource(worker.host, worker.node_id): 1},
                max_concurrency=_MAX_CONCURRENCY, max_restarts=0,
            ).remote(worker.rank, plan_json, model_path, self.options.to_dict(),
                     _memory_node(worker, topology))
        described = self._gather("start", {r: h.describe.remote()
                                           for r, h in self._handles.items()}, timeout_s)
        self._where = described
        here_node, here_ip = _ray_here()

        # Inboxes: ipc for senders on the same Ray node, tcp for senders elsewhere.
        senders = {w.rank: [here_node] + [described[r]["node_id"] for r in self._upstream(w)]
                   for w in plan.workers}
        opened = self._gather("open", {
            w.rank: self._handles[w.rank].open.remote(
                _transports(described[w.rank]["node_id"], senders[w.rank]),
                _reduce_transport(self.options.reduce_transport,
                                  {described[r]["node_id"] for r in plan.stages[w.stage].ranks}),
                self._ipc_dir, described[w.rank]["ip"])
            for w in plan.workers}, timeout_s)
        worker_nodes = [described[w.rank]["node_id"] for w in plan.workers]
        own = {"ipc": f"ipc://{self._ipc_dir}/coordinator"}
        self._inbox.bind(own["ipc"])
        if any(node != here_node for node in worker_nodes):
            own["tcp"] = f"tcp://{here_ip}:{self._inbox.bind_to_random_port(f'tcp://{here_ip}')}"

        connects = {}
        for w in plan.workers:
            node = described[w.rank]["node_id"]
            stage = plan.stages[w.stage]
            self.wiring[w.rank] = {
                "node_id": node,
                "inbox": _pick(opened[w.rank]["inbox"], here_node, node),  # what we send to
                "reduce": [opened[r]["reduce"] for r in stage.ranks] if len(stage.ranks) > 1
                else [],
                "downstream": [_pick(opened[r]["inbox"], node, described[r]["node_id"])
                               for r in self._downstream(w)],
                "coordinator": _pick(own, node, here_node),
            }
            wiring = self.wiring[w.rank]
            connects[w.rank] = self._handles[w.rank].connect.remote(
                wiring["reduce"], wiring["downstream"], wiring["coordinator"])
        self._gather("connect", connects, timeout_s)
        for w in plan.workers:
            push = self._context.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(self.wiring[w.rank]["inbox"])
            self._push[w.rank] = push

        self.load_info = self._load_all(timeout_s)
        self._serving = {h.serve.remote(): r for r, h in self._handles.items()}

    def _load_all(self, timeout_s: float) -> dict[int, Any]:
        """Every worker's load(), with a progress line as each finishes and every 10 s."""
        import ray  # noqa: PLC0415

        refs = {h.load.remote(): r for r, h in self._handles.items()}
        total_gib = sum(w.weight_bytes for w in self.plan.workers) / 2**30
        self._say(f"loading {total_gib:.2f} GiB of weights onto {len(refs)} workers")
        started = time.monotonic()
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=10.0)
            elapsed = time.monotonic() - started
            for ref in done:
                w = self.plan.workers[refs[ref]]
                self._say(f"loaded {self._name(w.rank)}: {w.weight_bytes / 2**30:.2f} GiB "
                          f"after {elapsed:.1f} s ({len(refs) - len(pending)}/{len(refs)})")
            if not done:
                self._say(f"still loading {len(pending)} of {len(refs)} workers after "
                          f"{elapsed:.0f} s")
            if elapsed > timeout_s:
                break  # _gather names the late workers
        return self._gather("load", {r: ref for ref, r in refs.items()}, timeout_s)

    def _say(self, line: str) -> None:
        if self._progress is not None:
            print(f"numoe: {line}", file=self._progress, flush=True)

    def _upstream(self, worker: WorkerPlan) -> list[int]:
        """Ranks that send HIDDEN to `worker` (none on the first stage)."""
        if worker.stage == 0:
            return []
        previous = self.plan.stages[worker.stage - 1].ranks
        return [previous[worker.tp_rank % len(previous)]]

    def _downstream(self, worker: WorkerPlan) -> list[int]:
        """Ranks of the next stage that `worker` feeds: those j with j mod n_s == its tp_rank."""
        if worker.stage == len(self.plan.stages) - 1:
            return []
        size = len(self.plan.stages[worker.stage].ranks)
        following = self.plan.stages[worker.stage + 1].ranks
        return [rank for j, rank in enumerate(following) if j % size == worker.tp_rank]

    def _gather(self, what: str, refs: dict[int, Any], timeout_s: float) -> dict[int, Any]:
        """ray.get of one control call per rank; failures become NumoeError naming the rank."""
        import ray  # noqa: PLC0415
        from ray.exceptions import GetTimeoutError  # noqa: PLC0415

        results: dict[int, Any] = {}
        for rank, ref in refs.items():
            try:
                results[rank] = ray.get(ref, timeout=timeout_s)
            except GetTimeoutError as error:
                raise NumoeError(
                    f"{self._name(rank)} did not finish {what} within {timeout_s:g} s; Ray "
                    f"could not place or start it (check `ray status` for its NUMA resource)"
                ) from error
            except Exception as error:  # RayTaskError wraps the worker's own exception
                cause = getattr(error, "cause", None) or error
                raise NumoeError(f"{self._name(rank)} failed during {what}: "
                                 f"{_first_line(cause)}") from error
        return results

    def _name(self, rank: int) -> str:
        worker = self.plan.workers[rank]
        where = self._where.get(rank, {})
        pid = f", pid {where['pid']}" if "pid" in where else ""
        return f"worker {rank} (host {worker.host}, NUMA node {worker.node_id}{pid})"

    # --- steps -------------------------------------------------------------------------------

    @property
    def n_slots(self) -> int:
        """KV-cache slots of every worker: sequences forward_batch can hold at once."""
        return self.options.n_slots

    def forward_batch(self, chunks: Sequence[SequenceChunk]) -> np.ndarray:
        """Logits of each chunk's last token, float32 [len(chunks), vocab], each row what
        that sequence gives alone (worker/batch.py). A chunk at 0 reuses its slot."""
        self._check_usable()
        check_chunks(chunks, self.n_slots, self.n_ctx, self.vocab_size)
        ids = np.fromiter((t for c in chunks for t in c.token_ids), np.int64)  # [sum T]
        positions = np.concatenate([np.arange(c.start, c.start + len(c.token_ids))
                                    for c in chunks]).astype(np.int64)  # [sum T]
        slots = np.concatenate([np.full(len(c.token_ids), c.slot)
                                for c in chunks]).astype(np.int64)  # [sum T]
        return self._run_step(ids, positions, slots, False, len(chunks), rows_alone=True)

    def _check_usable(self) -> None:
        if self._closed:
            raise NumoeError("the cluster runner is closed")
        if self._broken is not None:
            raise NumoeError(f"the cluster failed earlier ({self._broken}); its workers are "
                             f"out of step: close it and start a new one")

    def forward(self, token_ids: Sequence[int] | np.ndarray, start: int,
                logits: Literal["last", "all"] = "last") -> np.ndarray:
        """Logits for the new tokens of slot 0: float32 [1, vocab] for the last one, or
        [T, vocab]."""
        self._check_usable()
        ids = np.asarray(token_ids, dtype=np.int64)  # [T]
        n_tokens = len(ids)
        if n_tokens == 0:
            raise ValueError("forward needs at least one token")
        if start < 0 or start + n_tokens > self.n_ctx:
            raise ValueError(
                f"positions [{start}, {start + n_tokens}) exceed the context of {self.n_ctx}")
        all_logits = logits == "all"
        return self._run_step(ids, np.arange(start, start + n_tokens, dtype=np.int64),
                              np.zeros(n_tokens, np.int64), all_logits,
                              n_tokens if all_logits else 1)

    def _run_step(self, ids: np.ndarray, positions: np.ndarray, slots: np.ndarray,
                  all_logits: bool, rows: int, rows_alone: bool = False) -> np.ndarray:
        """One FORWARD (token t of slot slots[t] at positions[t]) -> logits [rows, vocab]."""
        step = self._step
        self._step += 1
        try:
            frames = encode(Forward(step, ids, positions, slots, all_logits=int(all_logits),
                                    rows_alone=int(rows_alone)))
            for rank in self.plan.stages[0].ranks:
                self._push[rank].send_multipart(frames)
            return self._collect(step, rows)
        except NumoeError as error:
            self._broken = str(error)
            raise

    def _collect(self, step: int, rows: int) -> np.ndarray:
        out = np.empty((rows, self.vocab_size), dtype=np.float32)  # [rows, vocab]
        waiting = dict(self._slices)
        deadline = time.monotonic() + self.step_timeout_s
        while waiting:
            if not self._inbox.poll(_POLL_MS):
                self._check_alive(step)
                if time.monotonic() > deadline:
                    names = ", ".join(self._name(rank) for rank in sorted(waiting))
                    raise NumoeError(f"step {step}: no logits from {names} within "
                                     f"{self.step_timeout_s:g} s; they may be hung (see their "
                                     f"Ray logs)")
                continue
            try:
                msg = decode(self._inbox.recv_multipart(copy=False))
            except ProtocolError as error:
                raise NumoeError(f"step {step}: a worker sent a malformed message: {error}") \
                    from error
            if isinstance(msg, Error):
                where = f"step {msg.step_id}" if msg.step_id >= 0 else "outside a step"
                raise NumoeError(f"{self._name(msg.worker_rank)} failed ({where}): "
                                 f"{msg.message}")
            if not isinstance(msg, Logits):
                raise NumoeError(f"step {step}: the coordinator received a {msg.TYPE.name} "
                                 f"message; only LOGITS and ERROR belong there")
            if msg.step_id != step:
                continue  # a late reply to an abandoned step
            self._place(msg, waiting, out)
        return out

    def _place(self, msg: Logits, waiting: dict[int, tuple[int, int]], out: np.ndarray) -> None:
        """Copy one vocab slice into out[:, v0:v1] after checking it is the one expected."""
        expected = waiting.pop(msg.sender_rank, None)
        if expected is None:
            raise NumoeError(f"step {msg.step_id}: unexpected logits from rank "
                             f"{msg.sender_rank} (not a waiting last-stage rank)")
        v0, v1 = expected
        values = msg.logits.to_float32() if isinstance(msg.logits, BFloat16Array) else msg.logits
        if msg.vocab_start != v0 or values.shape != (out.shape[0], v1 - v0):
            raise NumoeError(
                f"step {msg.step_id}: {self._name(msg.sender_rank)} sent logits "
                f"{list(values.shape)} at vocab offset {msg.vocab_start}; the plan says "
                f"[{out.shape[0]}, {v1 - v0}] at {v0}")
        out[:, v0:v1] = values

    def _check_alive(self, step: int) -> None:
        """Raise naming the first worker whose serve() call has ended (died or crashed)."""
        import ray  # noqa: PLC0415
        from ray.exceptions import RayActorError  # noqa: PLC0415

        refs = list(self._serving)
        ended, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ended:
            rank = self._serving.pop(ref)
            try:
                ray.get(ref)
                why = "stopped serving"
            except RayActorError:
                why = "died (its process is gone)"
            except Exception as error:  # serve() raised: the data-plane thread crashed
                why = f"crashed: {_first_line(getattr(error, 'cause', None) or error)}"
            raise NumoeError(f"step {step}: {self._name(rank)} {why}; close this runner and "
                             f"start a new one")

    def unhealthy(self) -> str | None:
        """Why this cluster cannot serve, or None: it failed earlier, or a worker's serve()
        call has ended (its process died or its data plane stopped). No remote call: safe to
        poll from another thread (a health check) while a step runs."""
        if self._broken is not None:
            return self._broken
        import ray  # noqa: PLC0415

        serving = dict(self._serving)  # a copy: the engine thread may pop a finished call
        if not serving:
            return None
        ended, _ = ray.wait(list(serving), num_returns=len(serving), timeout=0)
        if not ended:
            return None
        names = ", ".join(self._name(serving[ref]) for ref in ended)
        return f"{names} stopped serving (died or crashed); restart the server"

    # --- reports -----------------------------------------------------------------------------

    def worker_stats(self, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """Each worker's counters (weights bytes read, kernel / all-reduce seconds, tokens per
        expert per layer, ...), by rank."""
        stats = self._gather("stats", {r: h.stats.remote() for r, h in self._handles.items()},
                             timeout_s)
        return [stats[rank] for rank in sorted(stats)]

    def worker_placement(self, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """Each worker's data-plane thread affinity, OpenMP thread CPUs and memory policy."""
        found = self._gather("placement", {r: h.placement.remote()
                                           for r, h in self._handles.items()}, timeout_s)
        return [found[rank] for rank in sorted(found)]

    def worker_pids(self) -> dict[int, int]:
        return {rank: int(where["pid"]) for rank, where in self._where.items()}

    # --- shutdown ----------------------------------------------------------------------------

    def close(self) -> None:
        """SHUTDOWN to every worker, a short grace, then ray.kill; removes the ipc files."""
        if self._closed:
            return
        self._closed = True
        import ray  # noqa: PLC0415

        frames = encode(Shutdown("coordinator closing"))
        for push in self._push.values():
            try:
                push.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # that worker is gone or full; ray.kill below ends it
        if self._serving and self._broken is None:  # broken: workers may be stuck; no grace
            ray.wait(list(self._serving), num_returns=len(self._serving),
                     timeout=_SHUTDOWN_GRACE_S)
        for handle in self._handles.values():
            try:
                ray.kill(handle, no_restart=True)
            except Exception:  # already dead
                pass
        for push in self._push.values():
            push.close(linger=0)
        self._inbox.close(linger=0)
        self._context.term()
        shutil.rmtree(self._ipc_dir, ignore_errors=True)
        if self._ray_session is not None:
            self._ray_session.close()

    def __enter__(self) -> ClusterRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _memory_node(worker: WorkerPlan, topology: Topology | None) -> int:
    """The kernel NUMA node backing the worker's (possibly virtual) node."""
    if topology is None:
        return worker.node_id
    for host in topology.hosts:
        if host.name == worker.host:
            for node in host.nodes:
                if node.node_id == worker.node_id:
                    return node.memory_node
    raise NumoeError(f"the plan places worker {worker.rank} on {worker.host} node "
                     f"{worker.node_id}, which the topology does not have; make the plan from "
                     f"this topology")


def _reduce_transport(choice: str, stage_nodes: set[str]) -> str:
    """How a stage's workers all-reduce: shared memory or ipc on one host, tcp across hosts."""
    one_host = len(stage_nodes) == 1
    if choice == "auto":
        return "shm" if one_host else "tcp"
    if choice not in ("shm", "ipc", "tcp"):
        raise NumoeError(f"reduce transport {choice!r} is unknown; use auto, shm, ipc or tcp")
    if choice in ("shm", "ipc") and not one_host:
        raise NumoeError(f"reduce transport {choice!r} needs a stage's workers on one host; "
                         f"this stage spans {len(stage_nodes)} Ray nodes: use tcp or auto")
    return choice


def _transports(node: str, sender_nodes: Sequence[str]) -> list[str]:
    """What an inbox on `node` binds: ipc for senders on its node, tcp for any elsewhere."""
    transports = []
    if node in sender_nodes:
        transports.append("ipc")
    if any(sender != node for sender in sender_nodes):
        transports.append("tcp")
    return transports


def _pick(addresses: dict[str, str], sender_node: str, receiver_node: str) -> str:
    return addresses["ipc" if sender_node == receiver_node else "tcp"]


def _ray_here() -> tuple[str, str]:
    import ray  # noqa: PLC0415

    return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
