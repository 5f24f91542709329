"""All-reduce between ranks: real processes, real ZeroMQ sockets (and shared memory).

Every rank's partial is generated from a seed, so each process recomputes all partials and the
expected sum itself (float32, added in rank order by a plain loop) and checks its result bit for
bit; the parent then checks every rank returned the same bits. Partials mix magnitudes from 1e-3
to 1e3 so that another addition order gives other bits (checked for 3 ranks), i.e. the test
would catch a reduction that sums in arrival order.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from cluster.errors import NumoeError
from cluster.protocol import PartialSum, ReduceSite, decode, encode
from worker.allreduce import DIRECT_MAX_BYTES, ReduceEndpoint

try:
    from worker.shm_allreduce import ShmReduceEndpoint
except ImportError:  # the native library was built without the shm kernel
    ShmReduceEndpoint = None  # type: ignore[assignment,misc]

TRANSPORTS = ["ipc", "tcp"] + (["shm"] if ShmReduceEndpoint is not None else [])
GROUP_TIMEOUT_S = 30.0  # the parent gives up on a hung group after this (a bug, not a result)

ATTN, FFN = ReduceSite.ATTENTION, ReduceSite.FFN
# (step, layer, site, T, H): a prefill step of T=7, then T=1 decode steps; one call big enough
# for the two-phase algorithm when 3+ ranks take part.
CALLS: list[tuple[int, int, ReduceSite, int, int]] = [
    (0, layer, site, 7, 64) for layer in range(3) for site in (ATTN, FFN)
] + [(0, 3, ATTN, 7, 4096), (0, 3, FFN, 7, 7168)] + [
    (step, layer, site, 1, hidden)
    for step in (1, 2)
    for layer, hidden in ((0, 64), (1, 2048), (2, 7168))
    for site in (ATTN, FFN)
]
assert 7 * 4096 * 4 > DIRECT_MAX_BYTES


def make_partial(rank: int, step: int, layer: int, site: int, n_tokens: int, hidden: int) -> Any:
    """Rank's partial for one call: normal values scaled by 10^[-3, 3] (order-sensitive sums)."""
    rng = np.random.default_rng([rank, step, layer, int(site), n_tokens, hidden])
    scale = 10.0 ** rng.integers(-3, 4, (n_tokens, hidden))  # [T, H]
    return (rng.standard_normal((n_tokens, hidden)) * scale).astype(np.float32)  # [T, H]


def expected_sum(world: int, call: tuple[int, int, ReduceSite, int, int]) -> np.ndarray:
    total = make_partial(0, *call)
    for rank in range(1, world):
        total = total + make_partial(rank, *call)  # float32, in rank order
    return total  # [T, H]


def make_endpoint(transport: str, rank: int, world: int, timeout_s: float) -> Any:
    if transport == "shm":
        return ShmReduceEndpoint(rank, world, timeout_s=timeout_s)
    return ReduceEndpoint(rank, world, transport=transport, timeout_s=timeout_s)  # type: ignore[arg-type]


# --- what each spawned rank runs (module level so that spawn can import it) ---


def _scenario_sequence(rank: int, world: int, endpoint: Any) -> dict[str, Any]:
    """All CALLS in order; later ranks sleep now and then so that rank 0 runs ahead."""
    digest = hashlib.sha256()
    for index, call in enumerate(CALLS):
        if rank > 0 and index % (rank + 2) == 1:
            time.sleep(0.005)
        partial = make_partial(rank, *call)
        before = partial.copy()
        step, layer, site, n_tokens, hidden = call
        total = endpoint.all_reduce(partial, site, layer, step)
        assert total.dtype == np.float32 and total.shape == (n_tokens, hidden), call
        assert total is not partial and np.array_equal(partial, before), call
        expected = expected_sum(world, call)
        assert np.array_equal(total.view(np.uint32), expected.view(np.uint32)), call
        digest.update(total.tobytes())
    return {"digest": digest.hexdigest(), "calls": endpoint.stats.calls}


def _scenario_dead_peer(rank: int, world: int, endpoint: Any) -> dict[str, Any]:
    """The last rank has died (see _rank_main); the others must time out naming it."""
    partial = make_partial(rank, 5, 3, FFN, 1, 64)
    started = time.monotonic()
    try:
        endpoint.all_reduce(partial, FFN, 3, 5)
    except NumoeError as exc:
        return {"error": str(exc), "waited_s": time.monotonic() - started}
    return {"error": None}


SCENARIOS: dict[str, Callable[[int, int, Any], dict[str, Any]]] = {
    "sequence": _scenario_sequence,
    "dead_peer": _scenario_dead_peer,
}


def _rank_main(
    rank: int, world: int, scenario: str, timeout_s: float, addresses_in: Any, results: Any
) -> None:
    """One rank: bind on every transport, swap addresses through the parent, run the scenario."""
    try:
        endpoints = {t: make_endpoint(t, rank, world, timeout_s) for t in TRANSPORTS}
        results.put(("address", rank, {t: e.address for t, e in endpoints.items()}))
        addresses = addresses_in.get(timeout=GROUP_TIMEOUT_S)
        for transport, endpoint in endpoints.items():
            endpoint.connect(addresses[transport])
        if scenario == "dead_peer" and rank == world - 1:
            # Die without a word, but first let the queue's feeder thread finish: a process
            # that dies holding the queue's shared write lock would silence the other ranks.
            results.close()
            results.join_thread()
            os._exit(0)
        outcome = {t: SCENARIOS[scenario](rank, world, e) for t, e in endpoints.items()}
        for endpoint in endpoints.values():
            endpoint.close()
        results.put(("result", rank, outcome))
    except BaseException as exc:  # report every failure to the parent, which asserts
        results.put(("result", rank, {"crash": f"{type(exc).__name__}: {exc}"}))


def run_group(world: int, scenario: str, timeout_s: float) -> dict[int, dict[str, Any]]:
    """Start world spawned ranks, relay their addresses, return {rank: {transport: outcome}}."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    inboxes = [ctx.Queue() for _ in range(world)]
    procs = [
        ctx.Process(
            target=_rank_main, args=(rank, world, scenario, timeout_s, inboxes[rank], results)
        )
        for rank in range(world)
    ]
    for proc in procs:
        proc.start()
    addresses: dict[int, dict[str, str]] = {}
    outcomes: dict[int, dict[str, Any]] = {}
    survivors = range(world - 1) if scenario == "dead_peer" else range(world)
    deadline = time.monotonic() + GROUP_TIMEOUT_S
    try:
        while len(outcomes) < len(survivors):
            try:
                kind, rank, payload = results.get(timeout=0.2)
            except queue.Empty:
                lost = [r for r in survivors if r not in outcomes and not procs[r].is_alive()]
                codes = {r: procs[r].exitcode for r in lost}
                assert not lost, f"rank(s) died without a result, exit codes {codes}"
                assert time.monotonic() < deadline, (
                    f"group hung: addresses from {sorted(addresses)}, results from "
                    f"{sorted(outcomes)}"
                )
                continue
            if kind == "address":
                addresses[rank] = payload
                if len(addresses) == world:
                    by_transport = {t: [addresses[r][t] for r in range(world)] for t in TRANSPORTS}
                    for inbox in inboxes:
                        inbox.put(by_transport)
            else:
                assert "crash" not in payload, f"rank {rank}: {payload['crash']}"
                outcomes[rank] = payload
        return outcomes
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        for by_transport in addresses.values():  # what a rank that died could not remove
            remove_endpoint_files(by_transport.values())


def remove_endpoint_files(addresses: Iterable[str]) -> None:
    for address in addresses:
        for prefix in ("ipc://", "shm://"):
            if address.startswith(prefix):
                path = Path(address.removeprefix(prefix))
                path.unlink(missing_ok=True)
                if prefix == "ipc://" and path.parent.name.startswith("numoe-ar-"):
                    shutil.rmtree(path.parent, ignore_errors=True)


# --- tests ---


@pytest.mark.parametrize("world", [2, 3])
def test_processes_reduce_in_rank_order_bit_identical(world: int) -> None:
    outcomes = run_group(world, "sequence", timeout_s=10.0)
    for transport in TRANSPORTS:
        digests = {outcomes[rank][transport]["digest"] for rank in range(world)}
        assert len(digests) == 1, f"{transport}: ranks disagree"
        assert all(outcomes[r][transport]["calls"] == len(CALLS) for r in range(world))
    if world == 3:  # the data is order-sensitive, so the bit-exact check above means something
        call = CALLS[-1]
        parts = [make_partial(rank, *call) for rank in range(world)]
        reversed_order = (parts[2] + parts[1]) + parts[0]
        assert not np.array_equal(reversed_order, expected_sum(world, call))
        exact = np.sum([p.astype(np.float64) for p in parts], axis=0)
        np.testing.assert_allclose(expected_sum(world, call), exact, rtol=1e-5, atol=1e-3)


def test_dead_peer_times_out_naming_it() -> None:
    outcomes = run_group(3, "dead_peer", timeout_s=0.5)
    for rank in (0, 1):
        for transport in TRANSPORTS:
            outcome = outcomes[rank][transport]
            assert outcome["error"] is not None, f"rank {rank} {transport}: no error"
            assert "rank(s) [2]" in outcome["error"], outcome["error"]
            assert "step 5 layer 3 FFN" in outcome["error"], outcome["error"]
            assert outcome["waited_s"] >= 0.45  # waited for the timeout, not less


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_world_size_one_returns_partial(transport: str) -> None:
    endpoint = make_endpoint(transport, 0, 1, timeout_s=1.0)
    endpoint.connect([endpoint.address])
    partial = make_partial(0, 0, 0, ATTN, 7, 64)
    assert endpoint.all_reduce(partial, ATTN, 0, 0) is partial
    assert endpoint.stats.calls == 1
    endpoint.close()


class RawPeer:
    """Rank 1 of a 2-rank group made of bare sockets, to send messages in any order."""

    def __init__(self, context: zmq.Context) -> None:
        self.inbox = context.socket(zmq.PULL)
        port = self.inbox.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.outbox = context.socket(zmq.PUSH)

    def send(self, step: int, layer: int, site: ReduceSite, values: np.ndarray) -> None:
        self.outbox.send_multipart(encode(PartialSum(step, layer, int(site), 1, 0, 1, values)))

    def received(self) -> PartialSum:
        assert self.inbox.poll(5000), "the endpoint sent nothing"
        msg = decode(self.inbox.recv_multipart())
        assert isinstance(msg, PartialSum)
        return msg

    def close(self) -> None:
        self.inbox.close(linger=0)
        self.outbox.close(linger=0)


@pytest.fixture
def raw_pair() -> Any:
    context = zmq.Context()
    peer = RawPeer(context)
    endpoint = ReduceEndpoint(0, 2, transport="tcp", timeout_s=2.0, context=context)
    endpoint.connect([endpoint.address, peer.address])
    peer.outbox.connect(endpoint.address)
    yield endpoint, peer
    endpoint.close()
    peer.close()
    context.term()


def test_messages_of_a_rank_running_ahead_are_matched_by_key(raw_pair: Any) -> None:
    endpoint, peer = raw_pair
    calls = [(0, 0, ATTN, 7, 64), (0, 0, FFN, 7, 64), (1, 0, ATTN, 1, 64), (1, 1, ATTN, 1, 64)]
    for call in reversed(calls):  # the peer is ahead: its later reductions arrive first
        peer.send(call[0], call[1], call[2], make_partial(1, *call))
    time.sleep(0.05)  # let them all land in the endpoint's queue before the first all_reduce
    for call in calls:
        step, layer, site, _, _ = call
        total = endpoint.all_reduce(make_partial(0, *call), site, layer, step)
        assert np.array_equal(total, expected_sum(2, call))
        sent = peer.received()
        assert (sent.step_id, sent.layer_index, sent.site, sent.sender_rank) == (
            step, layer, int(site), 0,
        )
        assert np.array_equal(sent.values, make_partial(0, *call))
    assert endpoint.stats.calls == len(calls)
    assert endpoint.stats.bytes_sent > sum(4 * t * h for *_, t, h in calls)


def test_shape_mismatch_is_an_error(raw_pair: Any) -> None:
    endpoint, peer = raw_pair
    peer.send(4, 2, FFN, np.zeros((1, 9), np.float32))
    expected = r"rank 1 sent a float32 \[1, 9\].*expected float32 \[1, 8\]"
    with pytest.raises(NumoeError, match=expected):
        endpoint.all_reduce(np.zeros((1, 8), np.float32), FFN, 2, 4)
    peer.send(4, 3, FFN, np.zeros((2, 8), np.float16))
    with pytest.raises(NumoeError, match=r"float16 \[2, 8\]"):
        endpoint.all_reduce(np.zeros((2, 8), np.float32), FFN, 3, 4)


def test_bad_input_is_an_error(raw_pair: Any) -> None:
    endpoint, _ = raw_pair
    with pytest.raises(NumoeError, match="C-contiguous float32"):
        endpoint.all_reduce(np.zeros((2, 8), np.float64), FFN, 0, 0)
    with pytest.raises(NumoeError, match="C-contiguous float32"):
        endpoint.all_reduce(np.zeros((8, 2), np.float32).T, FFN, 0, 0)
    with pytest.raises(NumoeError, match="already connected"):
        endpoint.connect([endpoint.address, endpoint.address])


def test_close_removes_ipc_files() -> None:
    with tempfile.TemporaryDirectory(prefix="ar") as ipc_dir:
        endpoints = [ReduceEndpoint(r, 2, "ipc", ipc_dir=ipc_dir, timeout_s=2.0) for r in (0, 1)]
        paths = [Path(e.address.removeprefix("ipc://")) for e in endpoints]
        assert all(p.parent == Path(ipc_dir) and p.exists() for p in paths)
        for endpoint in endpoints:
            endpoint.connect([e.address for e in endpoints])
            endpoint.close()
        assert list(Path(ipc_dir).iterdir()) == []
    private = ReduceEndpoint(0, 2, "ipc", timeout_s=2.0)
    private_dir = Path(private.address.removeprefix("ipc://")).parent
    assert private_dir.is_dir()
    private.close()
    assert not private_dir.exists()
    with pytest.raises(NumoeError, match="closed"):
        private.all_reduce(np.zeros((1, 8), np.float32), ATTN, 0, 0)


def test_dead_peer_send_timeout_is_quiet_on_close() -> None:
    """A queued message to a peer that never existed must not make close() hang."""
    endpoint = ReduceEndpoint(0, 2, "tcp", timeout_s=0.3)
    endpoint.connect([endpoint.address, "tcp://127.0.0.1:9"])
    with pytest.raises(NumoeError, match=r"rank\(s\) \[1\] for step 0 layer 0 ATTENTION"):
        endpoint.all_reduce(np.ones((1, 8), np.float32), ATTN, 0, 0)
    started = time.monotonic()
    endpoint.close()
    assert time.monotonic() - started < 3.0


# --- shared memory: two ranks as two threads of this process (the C call releases the GIL) ---

needs_shm = pytest.mark.skipif(ShmReduceEndpoint is None, reason="native shm kernel not built")


def run_threads(endpoints: list[Any], work: Callable[[int, Any], Any]) -> list[Any]:
    """work(rank, endpoint) on one thread per rank; returns results or raised exceptions."""
    outcomes: list[Any] = [None] * len(endpoints)

    def target(rank: int) -> None:
        try:
            outcomes[rank] = work(rank, endpoints[rank])
        except Exception as exc:
            outcomes[rank] = exc

    threads = [threading.Thread(target=target, args=(r,)) for r in range(len(endpoints))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=GROUP_TIMEOUT_S)
    return outcomes


def shm_group(world: int, **options: Any) -> list[Any]:
    endpoints = [ShmReduceEndpoint(r, world, **options) for r in range(world)]
    for endpoint in endpoints:
        endpoint.connect([e.address for e in endpoints])
    return endpoints


@needs_shm
def test_shm_partials_above_capacity_go_in_rounds() -> None:
    endpoints = shm_group(3, timeout_s=5.0, capacity_bytes=4 * 100)  # 100 floats a round
    calls = [(0, 0, ATTN, 7, 64), (0, 0, FFN, 1, 100), (1, 2, FFN, 3, 7), (1, 3, ATTN, 0, 64)]

    def work(rank: int, endpoint: Any) -> list[np.ndarray]:
        return [endpoint.all_reduce(make_partial(rank, *c), c[2], c[1], c[0]) for c in calls]

    outcomes = run_threads(endpoints, work)
    for rank, totals in enumerate(outcomes):
        assert not isinstance(totals, Exception), f"rank {rank}: {totals}"
        for call, total in zip(calls, totals, strict=True):
            assert np.array_equal(total.view(np.uint32), expected_sum(3, call).view(np.uint32))
    assert endpoints[0].stats.calls == len(calls)
    assert endpoints[0].stats.bytes_sent == 4 * sum(t * h for *_, t, h in calls)
    for endpoint in endpoints:
        endpoint.close()


@needs_shm
def test_shm_mismatch_is_an_error_and_breaks_the_endpoint() -> None:
    endpoints = shm_group(2, timeout_s=5.0)

    def work(rank: int, endpoint: Any) -> np.ndarray:
        return endpoint.all_reduce(np.zeros((1, 8 + rank), np.float32), FFN, 2, 4)

    outcomes = run_threads(endpoints, work)
    assert isinstance(outcomes[0], NumoeError)
    assert "rank 1 is at step 4 layer 2 FFN with a [1, 9] partial" in str(outcomes[0])
    assert "expected step 4 layer 2 FFN with [1, 8]" in str(outcomes[0])
    assert "rank 0 is at step 4 layer 2 FFN with a [1, 8] partial" in str(outcomes[1])
    with pytest.raises(NumoeError, match="out of step with its peers"):
        endpoints[0].all_reduce(np.zeros((1, 8), np.float32), FFN, 3, 4)
    for endpoint in endpoints:
        endpoint.close()


@needs_shm
def test_shm_segment_files_are_removed() -> None:
    endpoints = shm_group(2, timeout_s=5.0)
    paths = [Path(e.address.removeprefix("shm://")) for e in endpoints]
    assert all(p.exists() for p in paths)
    ones = np.ones((1, 8), np.float32)
    outcomes = run_threads(endpoints, lambda r, e: e.all_reduce(ones, ATTN, 0, 0))
    assert all(np.array_equal(total, np.full((1, 8), 2, np.float32)) for total in outcomes)
    assert not any(p.exists() for p in paths)  # unlinked once every peer had mapped them
    for endpoint in endpoints:
        endpoint.close()
    unused = ShmReduceEndpoint(0, 2)
    path = Path(unused.address.removeprefix("shm://"))
    assert path.exists()
    unused.close()
    assert not path.exists()


@needs_shm
def test_shm_capacity_mismatch_is_an_error() -> None:
    small, large = ShmReduceEndpoint(0, 2, capacity_bytes=1024), ShmReduceEndpoint(1, 2)
    with pytest.raises(NumoeError, match="same capacity_bytes"):
        small.connect([small.address, large.address])
    with pytest.raises(NumoeError, match="not a shared-memory address"):
        large.connect(["ipc:///tmp/x", large.address])
    small.close()
    large.close()
