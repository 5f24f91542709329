"""A NUMA worker: one per NUMA node, holding its rank's slices of the model and computing its part
of every step.

The worker is a plain class. The coordinator makes it a Ray actor where it creates it
(`ray.remote(NumaWorker).options(resources={<the node's resource>: 1})`); tests can also run it
in-process. Ray is only the control plane: the public methods below (describe, open, connect,
load, serve, stats, placement). Activations never go through Ray; SHUTDOWN arrives on the inbox.

Everything that computes runs on one dedicated data-plane thread, started by the constructor:

1. it pins itself and the kernels' OpenMP threads (which it creates) to the node's CPUs and binds
   their memory to the node (affinity and memory policy are per thread, so this must happen on
   the thread that computes, not on Ray's method threads);
2. it memory-maps the GGUF and copies its own slices (load_shards), so the pages are first
   touched, hence placed, on the node;
3. it serves the data plane: ZeroMQ messages of cluster/protocol.py on its inbox (a PULL socket)
   -> ShardRunner.forward -> HIDDEN to the next pipeline stage or LOGITS to the coordinator.
   Every failure of a step becomes an ERROR message to the coordinator.

Control calls from Ray's threads reach the data-plane thread through a command queue, so they
also see its affinity and memory policy, and never race a step.

Stage-to-stage routing: every rank of stage s holds the same hidden states after the stage's
last all-reduce, so each rank j of stage s + 1 needs exactly one copy. It receives it from rank
j mod n_s of stage s (n_s = stage s's size): equal sizes pair ranks one to one, a 1-rank stage
feeds every next rank, and extra senders of a larger stage send nothing.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np
import zmq

from cluster.errors import NumoeError
from cluster.placement import Plan, plan_from_dict
from cluster.protocol import (
    BFloat16Array,
    Error,
    Forward,
    Hidden,
    Logits,
    ProtocolError,
    ReduceSite,
    Shutdown,
    decode,
    encode,
)

Transport = Literal["ipc", "tcp"]
_POLL_MS = 10  # how long the idle data-plane thread waits on its inbox before looking at commands
_LINGER_MS = 1000  # at close, queued messages may still reach live peers for this long


@dataclass(frozen=True)
class WorkerOptions:
    """How every worker runs; read once at the edge (CLI) and passed down."""

    backend: str = "cpu"  # "cpu" (native kernels) or "numpy" (the reference)
    n_threads: int | None = None  # compute threads per worker; None: one per CPU of its node
    n_ctx: int = 4096  # tokens of KV cache
    n_slots: int = 1  # KV caches of n_ctx tokens each: sequences batched at once
    kv_cache_dtype: str | None = None  # None: the backend's activation dtype
    isa: str | None = None  # force a kernel instruction set
    bind_memory: bool = True  # set_mempolicy(MPOL_BIND) to the node; False where refused
    reduce_timeout_s: float = 60.0  # an all-reduce peer silent this long is an error
    # "auto": shared memory when a stage's workers share a host (about 20x faster than ZeroMQ
    # ipc: bench/RESULTS.md), tcp across hosts; or force "shm", "ipc" or "tcp".
    reduce_transport: str = "auto"
    send_timeout_s: float = 60.0  # a peer whose queue stays full this long is an error

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkerOptions:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise NumoeError(f"unknown worker option(s) {unknown}; known: {sorted(names)}")
        return cls(**data)


@dataclass
class _DataPlaneCounters:
    """What the worker itself counts around ShardRunner (which counts its own kernels)."""

    steps: int = 0
    step_seconds: float = 0.0  # wall time of steps: compute and sends
    step_errors: int = 0
    bytes_sent: int = 0  # HIDDEN and LOGITS frames
    load_seconds: float = 0.0
    weight_bytes: int = 0  # bytes of weights held, all node-local copies


class NumaWorker:
    """One rank of the plan. Public methods are the control plane (Ray calls them)."""

    def __init__(self, rank: int, plan_json: str, model_path: str,
                 options: Mapping[str, Any], memory_node: int | None = None) -> None:
        """memory_node: the kernel's NUMA node backing this worker's node (virtual nodes share
        the real one); None: the plan's node_id."""
        self.plan: Plan = plan_from_dict(json.loads(plan_json))
        if not 0 <= rank < len(self.plan.workers):
            raise NumoeError(f"rank {rank} is not in the plan ({len(self.plan.workers)} workers)")
        self.rank = rank
        self.me = self.plan.workers[rank]
        self.stage = self.plan.stages[self.me.stage]
        self.is_first_stage = self.me.stage == 0
        self.is_last_stage = self.me.stage == len(self.plan.stages) - 1
        self.model_path = model_path
        self.options = WorkerOptions.from_dict(options)
        self.memory_node = self.me.node_id if memory_node is None else memory_node
        self.counters = _DataPlaneCounters()

        # Data-plane state: touched by the data-plane thread only.
        self._backend: Any = None
        self._runner: Any = None
        self._endpoint: Any = None  # ReduceEndpoint of the stage; None in a 1-rank stage
        self._context: zmq.Context | None = None
        self._inbox: zmq.Socket | None = None
        self._downstream: list[zmq.Socket] = []
        self._coordinator: zmq.Socket | None = None
        self._ipc_paths: list[str] = []
        self._made_dir: str | None = None
        self._step_id = -1
        self._stopping = False

        self._commands: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...], Future]] = (
            queue.Queue())
        self._setup_error: BaseException | None = None
        self._crash: BaseException | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"numoe-data-plane-r{rank}",
                                        daemon=True)
        self._thread.start()

    # --- control plane (any thread) ------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """Where this worker runs: its process, Ray node and an address peers can reach."""
        node_id, ip = _ray_location()
        return {"rank": self.rank, "pid": os.getpid(), "node_id": node_id, "ip": ip,
                "host": self.me.host, "numa_node": self.me.node_id}

    def open(self, inbox_transports: Sequence[Transport], reduce_transport: str,
             ipc_dir: str, host_ip: str | None = None) -> dict[str, Any]:
        """Bind the inbox (one address per transport) and the stage's reduce endpoint.
        Returns {"inbox": {transport: address}, "reduce": address or None}."""
        return self._call(self._open, tuple(inbox_transports), reduce_transport, ipc_dir,
                          host_ip or _ray_location()[1])

    def connect(self, reduce_addresses: Sequence[str], downstream: Sequence[str],
                coordinator: str) -> None:
        """reduce_addresses[tp_rank] of the stage's endpoints; the inboxes of the next stage's
        ranks this rank feeds; the coordinator's inbox."""
        self._call(self._connect, list(reduce_addresses), list(downstream), coordinator)

    def load(self) -> dict[str, Any]:
        """Copy this rank's slices onto the node and build the forward pass."""
        return self._call(self._load)

    def serve(self) -> str:
        """Blocks until the data plane stops (SHUTDOWN); raises what crashed it. The coordinator
        keeps this call pending: its completion is how it learns a worker is gone."""
        self._stopped.wait()
        if self._crash is not None:
            raise self._crash
        return "stopped"

    def stats(self) -> dict[str, Any]:
        """Plain counters: the worker's own, its forward pass's and its all-reduce's."""
        return self._call(self._stats)

    def placement(self) -> dict[str, Any]:
        """The data-plane thread's CPU affinity, its OpenMP threads' CPUs and its memory policy,
        read back from the kernel, beside what the plan asked for."""
        return self._call(self._placement)

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn on the data-plane thread and return its result (or raise its exception)."""
        if self._stopped.is_set():
            reason = f": {self._crash}" if self._crash is not None else ""
            raise NumoeError(f"worker {self.rank}'s data plane has stopped{reason}")
        done: Future = Future()
        self._commands.put((fn, args, done))
        return done.result()

    # --- data-plane thread ---------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._pin_and_bind()
        except BaseException as error:  # reported by every later command
            self._setup_error = error
        try:
            while not self._stopping:
                if self._inbox is None:
                    try:
                        self._run_command(*self._commands.get(timeout=_POLL_MS / 1000))
                    except queue.Empty:
                        pass
                    continue
                if self._inbox.poll(_POLL_MS):
                    self._handle(self._inbox.recv_multipart(copy=False))
                while not self._stopping:
                    try:
                        command = self._commands.get_nowait()
                    except queue.Empty:
                        break
                    self._run_command(*command)
        except BaseException as error:  # a bug in the loop itself: serve() raises it
            self._crash = error
            traceback.print_exc(file=sys.stderr)
        finally:
            self._close_data_plane()
            self._stopped.set()
            self._fail_pending_commands()

    def _run_command(self, fn: Callable[..., Any], args: tuple[Any, ...], done: Future) -> None:
        if not done.set_running_or_notify_cancel():
            return
        try:
            if self._setup_error is not None:
                raise NumoeError(f"worker {self.rank} could not pin to its NUMA node: "
                                 f"{self._setup_error}")
            done.set_result(fn(*args))
        except BaseException as error:  # the caller (a Ray method) raises it
            done.set_exception(error)

    def _fail_pending_commands(self) -> None:
        while True:
            try:
                _, _, done = self._commands.get_nowait()
            except queue.Empty:
                return
            if done.set_running_or_notify_cancel():
                done.set_exception(NumoeError(f"worker {self.rank}'s data plane has stopped"))

    def _pin_and_bind(self) -> None:
        """Pin this thread and its OpenMP team to the node's CPUs, then bind their memory."""
        from cluster.engine import make_backend  # noqa: PLC0415 — loads the native module
        from worker import numa  # noqa: PLC0415

        n_threads = self.options.n_threads or len(self.me.cpus)
        # The backend sets the kernels' thread count first: pinning applies to that team.
        self._backend = make_backend(self.options.backend, n_threads, self.options.isa)
        numa.pin_threads(self.me.cpus)
        if self.options.bind_memory:
            numa.bind_memory(self.memory_node)

    def _open(self, inbox_transports: tuple[Transport, ...], reduce_transport: str,
              ipc_dir: str, host_ip: str) -> dict[str, Any]:
        from worker.allreduce import ReduceEndpoint  # noqa: PLC0415
        from worker.shm_allreduce import ShmReduceEndpoint  # noqa: PLC0415

        if self._inbox is not None:
            raise NumoeError(f"worker {self.rank} is already open; open() once")
        if not os.path.isdir(ipc_dir):  # another host than the coordinator's
            os.makedirs(ipc_dir, exist_ok=True)
            self._made_dir = ipc_dir
        self._context = zmq.Context()
        inbox = self._context.socket(zmq.PULL)
        inbox.setsockopt(zmq.LINGER, 0)
        self._inbox = inbox
        addresses: dict[str, str] = {}
        for transport in inbox_transports:
            if transport == "ipc":
                path = os.path.join(ipc_dir, f"inbox-r{self.rank}")
                inbox.bind(f"ipc://{path}")
                self._ipc_paths.append(path)
                addresses["ipc"] = f"ipc://{path}"
            elif transport == "tcp":
                port = inbox.bind_to_random_port(f"tcp://{host_ip}")
                addresses["tcp"] = f"tcp://{host_ip}:{port}"
            else:
                raise NumoeError(f"transport {transport!r} is unknown; use 'ipc' or 'tcp'")
        reduce_address = None
        if len(self.stage.ranks) > 1 and reduce_transport == "shm":
            self._endpoint = ShmReduceEndpoint(
                self.me.tp_rank, len(self.stage.ranks), timeout_s=self.options.reduce_timeout_s)
            reduce_address = self._endpoint.address
        elif len(self.stage.ranks) > 1:
            self._endpoint = ReduceEndpoint(
                self.me.tp_rank, len(self.stage.ranks), transport=reduce_transport,
                host_ip=host_ip, ipc_dir=ipc_dir, timeout_s=self.options.reduce_timeout_s,
                context=self._context)
            reduce_address = self._endpoint.address
        return {"inbox": addresses, "reduce": reduce_address}

    def _push(self, address: str) -> zmq.Socket:
        assert self._context is not None
        push = self._context.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, _LINGER_MS)
        push.setsockopt(zmq.SNDTIMEO, max(1, int(self.options.send_timeout_s * 1000)))
        push.connect(address)
        return push

    def _connect(self, reduce_addresses: list[str], downstream: list[str],
                 coordinator: str) -> None:
        if self._inbox is None:
            raise NumoeError(f"worker {self.rank}: call open() before connect()")
        if self._endpoint is not None:
            self._endpoint.connect(reduce_addresses)
        self._downstream = [self._push(address) for address in downstream]
        self._coordinator = self._push(coordinator)

    def _load(self) -> dict[str, Any]:
        from cluster.gguf import open_gguf  # noqa: PLC0415
        from cluster.model import load_model_spec  # noqa: PLC0415
        from worker.shard_loader import load_shards  # noqa: PLC0415
        from worker.shard_runner import ShardRunner  # noqa: PLC0415

        if self._runner is not None:
            raise NumoeError(f"worker {self.rank} is already loaded; load() once")
        started = time.perf_counter()
        with open_gguf(self.model_path) as gguf:
            config, _ = load_model_spec(gguf)
            if config.architecture != self.plan.architecture:
                raise NumoeError(
                    f"{self.model_path} is a {config.architecture} model but the plan was made "
                    f"for {self.plan.architecture}; make the plan from this file")
            weights = load_shards(gguf, self.plan, self.rank)  # fresh, node-local copies
            self._runner = ShardRunner(config, self.plan, self.rank, weights, self._backend,
                                       self.options.n_ctx, self._all_reduce,
                                       kv_cache_dtype=self.options.kv_cache_dtype,
                                       n_slots=self.options.n_slots)
        self.counters.weight_bytes = sum(int(w.data.nbytes) for w in weights.values())
        self.counters.load_seconds = time.perf_counter() - started
        return {"rank": self.rank, "weight_bytes": self.counters.weight_bytes,
                "load_seconds": self.counters.load_seconds}

    def _all_reduce(self, partial: np.ndarray, site: ReduceSite, layer: int) -> np.ndarray:
        """The stage's sum of `partial` [T, H] (ShardRunner calls this where a block ends)."""
        if self._endpoint is None:
            return partial
        return self._endpoint.all_reduce(partial, site, layer, self._step_id)

    def _handle(self, frames: list[Any]) -> None:
        try:
            msg = decode(frames)
        except ProtocolError as error:
            self._report(-1, f"worker {self.rank} received a malformed message: {error}")
            return
        if isinstance(msg, Shutdown):
            self._stopping = True
        elif isinstance(msg, Forward) and self.is_first_stage:
            self._step(msg.step_id, msg.positions, msg.sequence_ids, msg.all_logits,
                       msg.rows_alone, token_ids=msg.token_ids)
        elif isinstance(msg, Hidden) and not self.is_first_stage:
            self._step(msg.step_id, msg.positions, msg.sequence_ids, msg.all_logits,
                       msg.rows_alone, hidden=msg.hidden)
        else:
            self._report(getattr(msg, "step_id", -1),
                         f"worker {self.rank} (pipeline stage {self.me.stage}) received a "
                         f"{msg.TYPE.name} message, which it does not take")

    def _step(self, step_id: int, positions: np.ndarray, sequence_ids: np.ndarray,
              all_logits: int, rows_alone: int, token_ids: np.ndarray | None = None,
              hidden: np.ndarray | BFloat16Array | None = None) -> None:
        started = time.perf_counter()
        try:
            if self._runner is None:
                raise NumoeError(f"worker {self.rank} got a step before load()")
            slots, starts, lengths = _chunks(positions, sequence_ids)
            self._step_id = step_id
            mode = "all" if all_logits else "last"
            if token_ids is not None:
                ids = np.asarray(token_ids, np.int64)  # [T]
                vocab = self._runner.config.vocab_size
                bad = ids[(ids < 0) | (ids >= vocab)]
                if len(bad):
                    raise NumoeError(f"token ids {bad[:5].tolist()} are outside the "
                                     f"vocabulary [0, {vocab})")
                out = self._runner.forward_batch(slots, starts, lengths, token_ids=ids,
                                                 logits=mode, rows=bool(rows_alone))
            else:
                as_float = hidden.to_float32() if isinstance(hidden, BFloat16Array) else hidden
                rows = np.array(as_float, dtype=np.float32)  # [T, H] ours, writable
                out = self._runner.forward_batch(slots, starts, lengths, hidden=rows,
                                                 logits=mode, rows=bool(rows_alone))
            out = np.ascontiguousarray(out, dtype=np.float32)
            if self.is_last_stage:
                self._send(self._coordinator, Logits(step_id, self.rank, out,
                                                     vocab_start=self.me.vocab[0]))
            else:
                msg = Hidden(step_id, self.rank, all_logits, np.asarray(positions),
                             np.asarray(sequence_ids), out, rows_alone=rows_alone)
                for push in self._downstream:
                    self._send(push, msg)
        except Exception as error:  # every step failure goes to the coordinator
            self.counters.step_errors += 1
            detail = str(error) if isinstance(error, NumoeError) else (
                f"{type(error).__name__}: {error} (a bug; the worker's log has the traceback)")
            if not isinstance(error, NumoeError):
                traceback.print_exc(file=sys.stderr)
            self._report(step_id, detail)
        finally:
            self.counters.steps += 1
            self.counters.step_seconds += time.perf_counter() - started

    def _send(self, push: zmq.Socket | None, msg: Any) -> None:
        if push is None:
            raise NumoeError(f"worker {self.rank}: call connect() before sending")
        frames = encode(msg)
        try:
            push.send_multipart(frames, copy=False)
        except zmq.Again as error:
            raise NumoeError(
                f"worker {self.rank} could not send {msg.TYPE.name} within "
                f"{self.options.send_timeout_s:g} s: the receiver's queue stays full; it may "
                f"have died or hung") from error
        self.counters.bytes_sent += sum(memoryview(frame).nbytes for frame in frames)

    def _report(self, step_id: int, message: str) -> None:
        """ERROR to the coordinator; if even that fails, the coordinator's timeout catches it."""
        if self._coordinator is None:
            print(f"numoe worker {self.rank}: {message}", file=sys.stderr)
            return
        try:
            self._coordinator.send_multipart(encode(Error(self.rank, int(step_id), message)))
        except zmq.ZMQError:
            print(f"numoe worker {self.rank}: cannot report: {message}", file=sys.stderr)

    def _stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rank": self.rank, "host": self.me.host,
                               "numa_node": self.me.node_id, "stage": self.me.stage,
                               "tp_rank": self.me.tp_rank, **asdict(self.counters)}
        if self._runner is not None:
            out["forward"] = {key: value.tolist() if isinstance(value, np.ndarray) else value
                              for key, value in asdict(self._runner.counters).items()}
        if self._endpoint is not None:
            out["reduce"] = asdict(self._endpoint.stats)
        return out

    def _placement(self) -> dict[str, Any]:
        from native import kernels  # noqa: PLC0415
        from worker import numa  # noqa: PLC0415

        mode, nodes = numa.memory_policy()
        return {"rank": self.rank, "pid": os.getpid(), "thread_id": threading.get_native_id(),
                "planned_cpus": list(self.me.cpus), "memory_node": self.memory_node,
                "affinity": sorted(os.sched_getaffinity(0)),  # this thread's mask
                "openmp_threads": kernels.get_threads(), "thread_cpus": numa.thread_cpus(),
                "memory_policy_mode": mode, "memory_policy_nodes": nodes}

    def _close_data_plane(self) -> None:
        for push in [*self._downstream, self._coordinator]:
            if push is not None:
                push.close(linger=_LINGER_MS)
        self._downstream, self._coordinator = [], None
        if self._endpoint is not None:
            self._endpoint.close()
            self._endpoint = None
        if self._inbox is not None:
            self._inbox.close(linger=0)
            self._inbox = None
        if self._context is not None:
            self._context.term()
            self._context = None
        for path in self._ipc_paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if self._made_dir is not None:
            shutil.rmtree(self._made_dir, ignore_errors=True)


def _chunks(positions: np.ndarray, sequence_ids: np.ndarray
            ) -> tuple[list[int], list[int], list[int]]:
    """A step's tokens as chunks (slots, starts, lengths): runs of one sequence id (its
    KV-cache slot) at consecutive positions."""
    if len(positions) == 0:
        raise NumoeError("a step needs at least one token")
    positions = np.asarray(positions, np.int64)  # [T]
    sequence_ids = np.asarray(sequence_ids, np.int64)  # [T]
    # A chunk begins where the sequence changes or the positions stop counting up by one.
    breaks = (sequence_ids[1:] != sequence_ids[:-1]) | (positions[1:] != positions[:-1] + 1)
    firsts = np.concatenate([[0], np.flatnonzero(breaks) + 1])  # [n_chunks]
    ends = np.append(firsts[1:], len(positions))
    slots = sequence_ids[firsts].tolist()
    if len(set(slots)) != len(slots):
        raise NumoeError(f"a step's tokens of one sequence must be consecutive positions in "
                         f"one run; got sequence ids {sequence_ids.tolist()[:16]} at positions "
                         f"{positions.tolist()[:16]}")
    return slots, positions[firsts].tolist(), (ends - firsts).tolist()


def _ray_location() -> tuple[str, str]:
    """(Ray node id, IP address peers can reach) of this process; ("local", 127.0.0.1) when
    not in a Ray cluster (in-process tests)."""
    import ray  # noqa: PLC0415

    if not ray.is_initialized():
        return "local", "127.0.0.1"
    return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()
