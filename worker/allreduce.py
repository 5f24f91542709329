"""All-reduce of partial sums between the workers of one tensor-parallel group, over ZeroMQ.

After each attention block and each FFN/MoE block every rank holds a partial sum [T, H]; each
must continue with the same full sum. "The same" means bit-identical: the hidden state is
replicated on every rank and must not drift, so every element is added in rank order
0, 1, ..., N-1 by exactly one computation that all ranks either repeat identically or share.

Algorithm, chosen by message size:

* direct (partial <= 64 KiB, or 2 ranks): every rank sends its whole partial to every other
  rank, then each sums all N partials in rank order itself. One network hop; decode sends
  T = 1 rows of 8-28 KiB, where the cost is per-message latency, not bytes, and a second round
  would double it. With 2 ranks nothing beats it at any size (one message each way either way).
* two-phase (larger partials, 3+ ranks): a direct reduce-scatter then an all-gather. The hidden
  axis is split into N column chunks; rank c owns chunk c, receives chunk c of every partial,
  sums them in rank order and sends the result to every rank. Each rank sends
  2 (N-1)/N partials instead of N-1 and adds 1/N of the elements instead of all of them (for
  8 ranks: 1.75 instead of 7 partials per rank), which is what matters for prefill
  (T = 512, H = 7168 is 14 MiB per partial). Each chunk is summed by its owner alone.
Both do the same float32 additions in the same order, so both give the bits of
`((p0 + p1) + p2) + ...` on every rank.

Shapes: a direct message carries the sender's whole [T, H] and is checked exactly. A two-phase
chunk is [T, H/N columns]: a rank whose H differs is caught by the owner of a chunk whose width
differs (there is always one), and the other ranks then time out naming that owner.

Matching: every PARTIAL_SUM carries (step_id, layer_index, site), the sender and its chunk, so a
rank that runs ahead into the next reduction is harmless: its messages are buffered by key until
the slower rank asks for them. Only one reduction of look-ahead is possible, since a rank cannot
finish a reduction without everyone's contribution to it.

Sockets: each rank binds one PULL socket (ipc:// path or tcp:// ephemeral port) and connects one
PUSH socket to every peer. Arrays are copied once before sending (zero-copy after that), so the
caller may overwrite its partial as soon as all_reduce returns even if ZeroMQ is still sending.
An endpoint is used from one thread. Between processes of one host, worker/shm_allreduce.py
does the same through shared memory, an order of magnitude faster for decode-size partials.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import zmq

from cluster.errors import NumoeError
from cluster.protocol import PartialSum, ProtocolError, ReduceSite, decode, encode

DIRECT_MAX_BYTES = 64 * 1024  # above this, 3+ ranks use reduce-scatter + all-gather
# Below this ZeroMQ copies the frame at send (cheaper than tracking a zero-copy buffer); above
# it, frames are sent zero-copy from an array private to the endpoint.
_ZERO_COPY_MIN_BYTES = 64 * 1024
_CLOSE_LINGER_MS = 1000  # queued messages may still reach live peers; dead ones cost 1 s at most
_MAX_IPC_PATH = 100  # sockaddr_un allows 107 bytes; keep a margin

Transport = Literal["ipc", "tcp"]
ReduceKey = tuple[int, int, int]  # (step_id, layer_index, site)
ChunkId = tuple[int, int]  # (sender_rank, chunk_index)


@dataclass
class ReduceStats:
    """Cumulative counters of one endpoint (filled on the hot path, exported at the edge)."""

    calls: int = 0
    seconds: float = 0.0  # wall time inside all_reduce, waiting for peers included
    bytes_sent: int = 0  # all frames sent to peers: type byte, msgpack header and array bytes


def check_partial(partial: np.ndarray) -> None:
    """Refuse what all_reduce cannot sum bit-reproducibly: it wants float32 [T, H] C-order."""
    if not isinstance(partial, np.ndarray):
        raise NumoeError(f"all_reduce needs a numpy array, got {type(partial).__name__}")
    if partial.dtype != np.float32 or partial.ndim != 2 or not partial.flags.c_contiguous:
        raise NumoeError(
            f"all_reduce needs a C-contiguous float32 [T, H] array, got dtype {partial.dtype}, "
            f"shape {partial.shape}, C-contiguous {partial.flags.c_contiguous}; pass "
            f"np.ascontiguousarray(x, dtype=np.float32)"
        )


def sum_in_rank_order(parts: Sequence[np.ndarray]) -> np.ndarray:
    """A new array ((parts[0] + parts[1]) + parts[2]) + ..., element by element in float32."""
    total = np.add(parts[0], parts[1])
    for part in parts[2:]:
        np.add(total, part, out=total)
    return total


def split_bounds(length: int, n_chunks: int) -> list[tuple[int, int]]:
    """[start, stop) of n_chunks near-equal pieces of range(length), the first ones one longer."""
    base, extra = divmod(length, n_chunks)
    bounds = []
    start = 0
    for index in range(n_chunks):
        stop = start + base + (1 if index < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


class ReduceEndpoint:
    """One rank's end of a reduce group."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        transport: Transport = "ipc",
        host_ip: str = "127.0.0.1",
        ipc_dir: str | None = None,
        timeout_s: float = 60.0,
        context: zmq.Context | None = None,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise NumoeError(f"rank {rank} is outside a reduce group of {world_size} rank(s)")
        if transport not in ("ipc", "tcp"):
            raise NumoeError(f"transport {transport!r} is unknown; use 'ipc' or 'tcp'")
        if not timeout_s > 0:
            raise NumoeError(f"timeout_s must be > 0, got {timeout_s}")
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.stats = ReduceStats()
        self._owns_context = context is None
        self._context = zmq.Context() if context is None else context
        self._peers: dict[int, zmq.Socket] = {}  # rank -> PUSH socket connected to it
        self._early: dict[ReduceKey, dict[ChunkId, PartialSum]] = {}  # received, not yet used
        self._silent: set[int] = set()  # peers that timed out: close() does not linger for them
        self._ipc_path: str | None = None
        self._private_dir: str | None = None
        self._closed = False
        self._pull = self._context.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        try:
            self._address = self._bind(transport, host_ip, ipc_dir)
        except BaseException:
            self.close()
            raise

    def _bind(self, transport: Transport, host_ip: str, ipc_dir: str | None) -> str:
        if transport == "tcp":
            try:
                port = self._pull.bind_to_random_port(f"tcp://{host_ip}")
            except zmq.ZMQError as exc:
                raise NumoeError(
                    f"cannot bind a tcp port on {host_ip}: {exc}; pass host_ip = an address of "
                    f"this host that the other workers can reach"
                ) from exc
            return f"tcp://{host_ip}:{port}"
        if ipc_dir is None:
            self._private_dir = tempfile.mkdtemp(prefix="numoe-ar-")
            ipc_dir = self._private_dir
        path = os.path.join(ipc_dir, f"ar-{os.getpid()}-r{self.rank}-{uuid.uuid4().hex[:8]}")
        if len(path.encode()) > _MAX_IPC_PATH:
            raise NumoeError(
                f"ipc socket path {path!r} is {len(path.encode())} bytes, longer than a unix "
                f"socket allows; pass a shorter ipc_dir"
            )
        try:
            self._pull.bind(f"ipc://{path}")
        except zmq.ZMQError as exc:
            raise NumoeError(
                f"cannot bind the ipc socket {path}: {exc}; pass an ipc_dir that exists and "
                f"is writable"
            ) from exc
        self._ipc_path = path
        return f"ipc://{path}"

    @property
    def address(self) -> str:
        """What peers connect to (ipc://path or tcp://ip:port)."""
        return self._address

    def connect(self, addresses: Sequence[str]) -> None:
        """Connect to every peer; addresses[r] is rank r's `address` (own entry ignored)."""
        self._check_open()
        if self._peers:
            raise NumoeError(f"rank {self.rank} is already connected; connect() once per endpoint")
        if len(addresses) != self.world_size:
            raise NumoeError(
                f"connect() got {len(addresses)} address(es) for a group of {self.world_size}; "
                f"pass one per rank, own included"
            )
        for peer, address in enumerate(addresses):
            if peer == self.rank:
                continue
            push = self._context.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, _CLOSE_LINGER_MS)
            push.setsockopt(zmq.SNDTIMEO, max(1, int(self.timeout_s * 1000)))
            try:
                push.connect(address)
            except zmq.ZMQError as exc:
                push.close(linger=0)
                raise NumoeError(
                    f"rank {self.rank} cannot connect to rank {peer} at {address!r}: {exc}; "
                    f"pass the address that rank's endpoint reported"
                ) from exc
            self._peers[peer] = push

    def all_reduce(
        self, partial: np.ndarray, site: ReduceSite, layer: int, step: int
    ) -> np.ndarray:
        """Sum of every rank's partial [T, H] in rank order, as a new array (same on all ranks).

        world_size 1 returns partial itself. Raises NumoeError when a peer does not answer
        within timeout_s or sends a partial of another shape or dtype.
        """
        check_partial(partial)
        if self.world_size == 1:
            self.stats.calls += 1
            return partial
        self._check_open()
        if not self._peers:
            raise NumoeError(f"rank {self.rank}: call connect() before all_reduce()")
        started = time.perf_counter()
        key = (int(step), int(layer), int(ReduceSite(site)))
        hidden = partial.shape[1]
        if partial.nbytes <= DIRECT_MAX_BYTES or self.world_size == 2 or hidden < self.world_size:
            total = self._direct(key, partial)
        else:
            total = self._two_phase(key, partial)
        self.stats.calls += 1
        self.stats.seconds += time.perf_counter() - started
        return total

    def _direct(self, key: ReduceKey, partial: np.ndarray) -> np.ndarray:
        # Zero-copy sends need a private copy: ZeroMQ may still read it after we return.
        outgoing = partial if partial.nbytes < _ZERO_COPY_MIN_BYTES else partial.copy()
        self._send_all(key, outgoing, chunk_index=0, chunk_count=1)
        peers = [(peer, 0) for peer in self._peers]
        received = self._collect(key, peers, partial.shape)  # {(rank, 0): [T, H]}
        parts = [partial if r == self.rank else received[(r, 0)] for r in range(self.world_size)]
        return sum_in_rank_order(parts)  # [T, H]

    def _two_phase(self, key: ReduceKey, partial: np.ndarray) -> np.ndarray:
        n_tokens, hidden = partial.shape
        bounds = split_bounds(hidden, self.world_size)
        count = self.world_size
        # Reduce-scatter: chunk c of our partial goes to its owner, rank c.
        for owner, (start, stop) in enumerate(bounds):
            if owner != self.rank:
                chunk = partial[:, start:stop].copy()  # [T, chunk] private and contiguous
                self._send(owner, key, chunk, chunk_index=owner, chunk_count=count)
        start, stop = bounds[self.rank]
        senders = [(peer, self.rank) for peer in self._peers]
        received = self._collect(key, senders, (n_tokens, stop - start))
        parts = [
            partial[:, start:stop] if r == self.rank else received[(r, self.rank)]
            for r in range(self.world_size)
        ]
        own_chunk = sum_in_rank_order(parts)  # [T, chunk], summed here and nowhere else
        # All-gather: every owner sends its summed chunk to everyone.
        self._send_all(key, own_chunk, chunk_index=self.rank, chunk_count=count)
        total = np.empty_like(partial)  # [T, H]
        total[:, start:stop] = own_chunk
        for owner, (start, stop) in enumerate(bounds):
            if owner != self.rank:
                gathered = self._collect(key, [(owner, owner)], (n_tokens, stop - start))
                total[:, start:stop] = gathered[(owner, owner)]
        return total

    def _send_all(
        self, key: ReduceKey, values: np.ndarray, chunk_index: int, chunk_count: int
    ) -> None:
        for peer in self._peers:
            self._send(peer, key, values, chunk_index, chunk_count)

    def _send(
        self, peer: int, key: ReduceKey, values: np.ndarray, chunk_index: int, chunk_count: int
    ) -> None:
        step, layer, site = key
        frames = encode(PartialSum(step, layer, site, self.rank, chunk_index, chunk_count, values))
        zero_copy = values.nbytes >= _ZERO_COPY_MIN_BYTES  # then values is ours alone
        try:
            self._peers[peer].send_multipart(frames, copy=not zero_copy)
        except zmq.Again as exc:
            raise NumoeError(
                f"rank {self.rank} could not send step {step} layer {layer} "
                f"{ReduceSite(site).name} to rank {peer} within {self.timeout_s:g} s: its "
                f"queue is full; the worker may have died or hung (check its log)"
            ) from exc
        self.stats.bytes_sent += sum(memoryview(frame).nbytes for frame in frames)

    def _collect(
        self, key: ReduceKey, wanted: Sequence[ChunkId], shape: tuple[int, ...]
    ) -> dict[ChunkId, np.ndarray]:
        """The values of the wanted (sender, chunk) messages of key, each checked for shape."""
        deadline = time.monotonic() + self.timeout_s
        pending = self._early.setdefault(key, {})
        missing = [chunk_id for chunk_id in wanted if chunk_id not in pending]
        while missing:
            self._receive_one(deadline, key, missing)
            missing = [chunk_id for chunk_id in missing if chunk_id not in pending]
        found = {chunk_id: self._checked(pending.pop(chunk_id), shape) for chunk_id in wanted}
        if not pending:
            del self._early[key]
        return found

    def _receive_one(self, deadline: float, key: ReduceKey, missing: Sequence[ChunkId]) -> None:
        """Receive one message into self._early, or raise when the deadline passes first."""
        while True:
            try:
                frames = self._pull.recv_multipart(zmq.NOBLOCK, copy=False)
                break
            except zmq.Again:
                remaining_ms = int((deadline - time.monotonic()) * 1000)
                if remaining_ms <= 0 or not self._pull.poll(remaining_ms):
                    raise self._timeout_error(key, missing) from None
        try:
            msg = decode(frames)
        except ProtocolError as exc:
            raise NumoeError(f"rank {self.rank} received a corrupt partial sum: {exc}") from exc
        if not isinstance(msg, PartialSum):
            raise NumoeError(
                f"rank {self.rank}'s reduce socket received a {msg.TYPE.name} message; only "
                f"PARTIAL_SUM belongs there (is another component sending to this address?)"
            )
        if msg.sender_rank not in self._peers:
            raise NumoeError(
                f"rank {self.rank} received a partial sum from rank {msg.sender_rank}, which is "
                f"not a peer in this group of {self.world_size}"
            )
        chunk_id = (msg.sender_rank, msg.chunk_index)
        slot = self._early.setdefault((msg.step_id, msg.layer_index, msg.site), {})
        if chunk_id in slot:
            raise NumoeError(
                f"rank {self.rank} received two partial sums from rank {msg.sender_rank} for "
                f"step {msg.step_id} layer {msg.layer_index} {ReduceSite(msg.site).name} chunk "
                f"{msg.chunk_index}; every reduction needs its own (step, layer, site)"
            )
        slot[chunk_id] = msg

    def _checked(self, msg: PartialSum, shape: tuple[int, ...]) -> np.ndarray:
        values = msg.values
        if not isinstance(values, np.ndarray) or values.dtype != np.float32 or (
            values.shape != shape
        ):
            dtype = values.dtype if isinstance(values, np.ndarray) else "bfloat16"
            raise NumoeError(
                f"rank {self.rank}: rank {msg.sender_rank} sent a {dtype} {list(values.shape)} "
                f"partial for step {msg.step_id} layer {msg.layer_index} "
                f"{ReduceSite(msg.site).name}, expected float32 {list(shape)}; every rank must "
                f"reduce the same tokens and hidden size"
            )
        return values

    def _timeout_error(self, key: ReduceKey, missing: Sequence[ChunkId]) -> NumoeError:
        step, layer, site = key
        ranks = sorted({sender for sender, _ in missing})
        self._silent.update(ranks)
        return NumoeError(
            f"rank {self.rank}: no partial sum from rank(s) {ranks} for step {step} layer {layer} "
            f"{ReduceSite(site).name} within {self.timeout_s:g} s; the worker(s) may have died "
            f"or hung (check their logs), or raise timeout_s if they are only slow"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise NumoeError(f"rank {self.rank}'s reduce endpoint is closed")

    def close(self) -> None:
        """Close the sockets and remove the ipc socket file (and its private directory)."""
        if self._closed:
            return
        self._closed = True
        for peer, push in self._peers.items():
            push.close(linger=0 if peer in self._silent else _CLOSE_LINGER_MS)
        self._peers.clear()
        self._early.clear()
        self._pull.close(linger=0)
        if self._owns_context:
            self._context.term()
        if self._ipc_path is not None:
            try:
                os.unlink(self._ipc_path)
            except FileNotFoundError:
                pass  # libzmq removes the file itself on close
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)

    def __enter__(self) -> ReduceEndpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
