"""All-reduce through shared memory, for the workers of one host: ReduceEndpoint's fast path.

Each rank creates a segment file in /dev/shm (Linux), maps every peer's segment, and reduces
through native/src/shm_reduce.c: a rank copies its partial into its own segment and publishes
it with a sequence number (C11 release store); peers spin on that number (acquire load), then
each sums all partials in rank order itself, so every rank gets the same bits as numpy's
((p0 + p1) + p2) + .... No messages, no sockets, no kernel calls while peers are on time: a
decode-size reduction costs a few microseconds instead of the tens that ZeroMQ ipc takes.

Lockstep is by count, not by key: every rank must call all_reduce in the same order (as the
layer loop does). Each round carries its (step, layer, site, T, H, offset) key, and a peer with
another key is an error, as is one that does not answer within timeout_s. After an error the
endpoint refuses further calls (its rounds are out of step with its peers'); rebuild the group.
Partials larger than capacity_bytes go through in several rounds of capacity_bytes each.

The caller's thread spins for 50 us, yields until 1 ms, then sleeps 20 us between looks, so a
rank that waits long (a slow peer, an oversubscribed test machine) does not starve the others.
Each rank zero-fills its own segment at creation, so its pages sit on its NUMA node. The file
is unlinked after the first successful round (every peer has mapped it by then) or on close.
"""

from __future__ import annotations

import errno
import mmap
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
from native._numoe_native import ffi, lib

from cluster.errors import NumoeError
from cluster.protocol import ReduceSite
from worker.allreduce import ReduceStats, check_partial

ADDRESS_PREFIX = "shm://"
DEFAULT_CAPACITY_BYTES = 4 << 20  # one [T=128, H=7168] float32 partial per round; 8 MiB/rank
_KEY_LEN = lib.NUMOE_SHM_KEY_LEN


class ShmReduceEndpoint:
    """One rank's end of a reduce group whose ranks share a host (same interface as
    ReduceEndpoint: address, connect, all_reduce, stats, close)."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        timeout_s: float = 60.0,
        capacity_bytes: int = DEFAULT_CAPACITY_BYTES,
        shm_dir: str = "/dev/shm",
    ) -> None:
        if not 1 <= world_size <= 64 or not 0 <= rank < world_size:
            raise NumoeError(
                f"rank {rank} is outside a shared-memory reduce group of {world_size} rank(s) "
                f"(1 to 64 ranks)"
            )
        if not timeout_s > 0:
            raise NumoeError(f"timeout_s must be > 0, got {timeout_s}")
        if capacity_bytes < 4:
            raise NumoeError(f"capacity_bytes must hold one float32, got {capacity_bytes}")
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.stats = ReduceStats()
        self._capacity = capacity_bytes // 4  # float32 values per round
        self._segment_bytes = int(lib.numoe_shm_segment_bytes(self._capacity))
        self._maps: dict[int, mmap.mmap] = {}  # rank -> its mapped segment
        self._views: list[Any] = []  # ffi buffers over the maps; released before unmapping
        self._segments: Any = None  # void *[world_size] for the C call
        self._seq = 0  # rounds done; the C side uses seq = 1, 2, ...
        # Out-parameters of the C call, allocated once (the call is on the decode hot path).
        self._key = ffi.new("int64_t[]", _KEY_LEN)  # step, layer, site, T, H, offset
        self._fault_ranks = ffi.new("uint64_t *")
        self._peer_key = ffi.new("int64_t[]", _KEY_LEN + 1)  # a faulty peer's key, then its n
        self._broken: str | None = None
        self._closed = False
        self._path: str | None = os.path.join(
            shm_dir, f"numoe-ar-{os.getpid()}-r{rank}-{uuid.uuid4().hex[:8]}"
        )
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise NumoeError(
                f"cannot create the shared-memory segment {self._path}: {exc}; pass a shm_dir "
                f"on a writable tmpfs (the default /dev/shm is Linux's)"
            ) from exc
        try:
            os.ftruncate(fd, self._segment_bytes)
            self._maps[rank] = mmap.mmap(fd, self._segment_bytes)
        except OSError as exc:
            os.close(fd)
            self._unlink()
            raise NumoeError(
                f"cannot size the shared-memory segment {self._path} to "
                f"{self._segment_bytes} bytes: {exc}; free space in {shm_dir} or lower "
                f"capacity_bytes"
            ) from exc
        os.close(fd)
        # First touch by the owner: the pages land on this rank's NUMA node.
        np.frombuffer(self._maps[rank], np.uint8)[:] = 0
        self._address = ADDRESS_PREFIX + self._path

    @property
    def address(self) -> str:
        """What peers connect to: shm:// and the segment's path."""
        return self._address

    def connect(self, addresses: Sequence[str]) -> None:
        """Map every peer's segment; addresses[r] is rank r's `address` (own entry ignored)."""
        self._check_usable()
        if self._segments is not None:
            raise NumoeError(f"rank {self.rank} is already connected; connect() once per endpoint")
        if len(addresses) != self.world_size:
            raise NumoeError(
                f"connect() got {len(addresses)} address(es) for a group of {self.world_size}; "
                f"pass one per rank, own included"
            )
        for peer, address in enumerate(addresses):
            if peer != self.rank:
                self._maps[peer] = self._map_peer(peer, address)
        self._views = [ffi.from_buffer(self._maps[r]) for r in range(self.world_size)]
        self._segments = ffi.new("void *[]", self._views)

    def _map_peer(self, peer: int, address: str) -> mmap.mmap:
        if not address.startswith(ADDRESS_PREFIX):
            raise NumoeError(
                f"rank {peer}'s address {address!r} is not a shared-memory address "
                f"({ADDRESS_PREFIX}...); every rank of the group must use ShmReduceEndpoint"
            )
        path = address.removeprefix(ADDRESS_PREFIX)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise NumoeError(
                f"rank {self.rank} cannot open rank {peer}'s segment {path}: {exc}; shared "
                f"memory only works between processes of one host (use the ZeroMQ endpoint "
                f"across hosts)"
            ) from exc
        try:
            size = os.fstat(fd).st_size
            if size != self._segment_bytes:
                raise NumoeError(
                    f"rank {peer}'s segment {path} has {size} bytes, this rank's has "
                    f"{self._segment_bytes}; give every rank the same capacity_bytes"
                )
            return mmap.mmap(fd, size)
        finally:
            os.close(fd)

    def all_reduce(
        self, partial: np.ndarray, site: ReduceSite, layer: int, step: int
    ) -> np.ndarray:
        """Sum of every rank's partial [T, H] in rank order, as a new array (same on all ranks).

        world_size 1 returns partial itself. Raises NumoeError when a peer does not answer
        within timeout_s or reduces another (step, layer, site) or shape.
        """
        check_partial(partial)
        if self.world_size == 1:
            self.stats.calls += 1
            return partial
        self._check_usable()
        if self._segments is None:
            raise NumoeError(f"rank {self.rank}: call connect() before all_reduce()")
        started = time.perf_counter()
        site = ReduceSite(site)
        n_tokens, hidden = partial.shape
        total = np.empty_like(partial)  # [T, H]
        values = partial.reshape(-1)  # [T * H] views, no copy
        flat_total = total.reshape(-1)
        key = self._key
        key[0:5] = [int(step), int(layer), int(site), n_tokens, hidden]
        for offset in range(0, max(values.size, 1), self._capacity):
            stop = min(offset + self._capacity, values.size)
            key[5] = offset
            self._seq += 1
            status = lib.numoe_shm_all_reduce(
                self._segments, self.world_size, self.rank, self._capacity, self._seq, key,
                ffi.from_buffer("float[]", values[offset:stop]), stop - offset,
                self.timeout_s, ffi.from_buffer("float[]", flat_total[offset:stop], True),
                self._fault_ranks, self._peer_key,
            )
            if status != 0:
                error = self._error(status, self._fault_ranks[0], list(key), list(self._peer_key))
                self._broken = str(error)
                raise error
            if self._path is not None:
                self._unlink()  # every peer has mapped our segment: it finished this round
            self.stats.bytes_sent += 4 * (stop - offset)
        self.stats.calls += 1
        self.stats.seconds += time.perf_counter() - started
        return total

    def _error(
        self, status: int, ranks_mask: int, key: list[int], peer_key: list[int]
    ) -> NumoeError:
        ranks = [r for r in range(self.world_size) if ranks_mask >> r & 1]
        step, layer, site, n_tokens, hidden, offset = key
        ours = f"step {step} layer {layer} {ReduceSite(site).name}"
        if status == -errno.ETIMEDOUT:
            return NumoeError(
                f"rank {self.rank}: no partial sum from rank(s) {ranks} for {ours} within "
                f"{self.timeout_s:g} s; the worker(s) may have died or hung (check their logs), "
                f"or raise timeout_s if they are only slow"
            )
        if status == -errno.EPROTO:
            p_step, p_layer, p_site, p_tokens, p_hidden, p_offset, p_n = peer_key
            p_site_name = ReduceSite(p_site).name if p_site in (0, 1) else f"site {p_site}"
            return NumoeError(
                f"rank {self.rank}: rank {ranks[0]} is at step {p_step} layer {p_layer} "
                f"{p_site_name} with a [{p_tokens}, {p_hidden}] partial (elements {p_offset}.."
                f"{p_offset + p_n}), expected {ours} with [{n_tokens}, {hidden}] (elements "
                f"{offset}..); every rank must run the same reductions in the same order"
            )
        raise AssertionError(f"numoe_shm_all_reduce returned {status}")  # a bug in our call

    def _check_usable(self) -> None:
        if self._closed:
            raise NumoeError(f"rank {self.rank}'s shared-memory reduce endpoint is closed")
        if self._broken is not None:
            raise NumoeError(
                f"rank {self.rank}'s shared-memory reduce endpoint failed earlier and is out of "
                f"step with its peers ({self._broken}); rebuild the reduce group"
            )

    def _unlink(self) -> None:
        if self._path is not None:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass
            self._path = None

    def close(self) -> None:
        """Unmap every segment and remove this rank's segment file if it is still there."""
        if self._closed:
            return
        self._closed = True
        self._unlink()
        self._segments = None
        for view in self._views:
            ffi.release(view)
        self._views = []
        for mapping in self._maps.values():
            mapping.close()
        self._maps.clear()

    def __enter__(self) -> ShmReduceEndpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
