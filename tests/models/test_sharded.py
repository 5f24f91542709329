"""Sharded forward passes (tensor parallel, expert parallel, pipeline) against the single process.

Every rank of a plan is a ShardRunner over its own copied slices (load_shards), run in its own
Python thread (the native kernels release the GIL, so ranks really run at once); a stage's
ranks sum their partials with a threading all-reduce written here (barrier, then every rank
adds the partials in rank order: identical bits everywhere), and pipeline stages hand the
hidden state over in-process. The expected values come from the single-process ModelRunner on
the same file, which tests/models/test_tiny_models.py and test_gemma3.py check against
transformers and llama.cpp.

Bounds (max |ours - single| / max |single| over the prompt's and every decode step's logits):
* float32 weights, 1e-5: splitting a product changes only the order of float32 additions
  (measured up to 7.4e-7).
* Q8_0 weights, 3e-4 (measured 3.8e-5): the integer kernels round activations to 8-bit
  blocks, and a float32 reordering that moves a value across a rounding step changes that
  term by up to half a step, so later layers amplify the reordering. The slices themselves
  hold whole blocks, so each block is quantized with the same scale as in the single process.
* Gemma 3 (Q4_K/Q5_0/Q6_K/Q8_0), 0.15 and mean next-token KL 0.01. Gemma's activations have
  large outliers, so the rounding flips above grow from 4e-7 (layers 0-2 agree to that) to
  ~1e-3 of the hidden state by layer 4; measured 3.0e-2 to 4.6e-2 relative error and mean
  KL 0.9e-3 to 3.1e-3 on three prompts, with identical greedy tokens. That is the size of the
  kernels' own quantization noise (the CPU backend vs exact float64 math: KL ~3e-3, bound 0.01
  in test_gemma3.py). With the float64 numpy backend the same 2-way split agrees with the
  single process to 2e-15 (checked by hand: 2.5 min and 7 GB, too heavy for the suite).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import gguf as gguf_py
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QType
from gguf.quants import dequantize

from cluster.errors import NumoeError
from cluster.gguf import GGUFFile, open_gguf
from cluster.model import ModelConfig, TensorMap, load_model_spec
from cluster.placement import ModelSpec, Plan, PlanOptions, Shard, TensorPlacement, make_plan
from cluster.protocol import ReduceSite
from cluster.tokenizer import Tokenizer
from cluster.topology import GIB, Host, NumaNode, Topology, virtual_numa
from tests.kernels.blocks import random_weight
from tests.models.metrics import kl_divergence, max_relative_error
from tests.reference.tiny_models import TinyModel
from worker.backends.cpu import CpuBackend
from worker.model_runner import ModelRunner
from worker.shard_loader import load_shard, load_shards
from worker.shard_runner import AllReduceFn, ShardRunner

N_CTX = 64
N_DECODE = 8
ORDINARY_VOCAB = 151_643  # Qwen2 ids below this are ordinary tokens
BARRIER_TIMEOUT_S = 60.0  # a rank that died leaves the others waiting this long at most
F32_BOUND = 1e-5
QUANTIZED_BOUND = 3e-4
DEEPSEEK_Q8_0_BOUND = 1e-2
GEMMA_BOUND = 0.15
GEMMA_MEAN_KL = 0.01


# --- the threaded cluster ---------------------------------------------------------------------


class ThreadAllReduce:
    """All-reduce among the threads of one stage: each deposits its partial, all wait, each
    sums the partials in rank order (the same additions, so the same bits on every rank), all
    wait again so no slot is overwritten before everyone has read it."""

    def __init__(self, n_ranks: int) -> None:
        self.partials: list[np.ndarray | None] = [None] * n_ranks
        self.keys: list[tuple[ReduceSite, int] | None] = [None] * n_ranks
        self.barrier = threading.Barrier(n_ranks, timeout=BARRIER_TIMEOUT_S)
        self.calls = 0

    def bind(self, index: int) -> AllReduceFn:
        def all_reduce(partial: np.ndarray, site: ReduceSite, layer: int) -> np.ndarray:
            self.partials[index] = partial
            self.keys[index] = (site, layer)
            self.barrier.wait()
            if len(set(self.keys)) != 1:
                raise AssertionError(f"ranks reduce different blocks: {self.keys}")
            total = self.partials[0].copy()  # [T, H]
            for other in self.partials[1:]:
                total += other
            if index == 0:
                self.calls += 1
            self.barrier.wait()
            return total

        return all_reduce


def run_in_threads(calls: Sequence[Callable[[], Any]], barriers: Sequence[threading.Barrier]
                   ) -> list[Any]:
    """Runs each call in its own thread; re-raises the first failure (after breaking the
    barriers, so the other ranks stop waiting for the failed one)."""
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            results[index] = calls[index]()
        except BaseException as error:  # noqa: BLE001 — handed to the main thread
            errors.append(error)
            for barrier in barriers:
                barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


class ThreadedCluster:
    """Every rank of `plan` in-process, each forward running a stage's ranks in threads."""

    def __init__(self, gguf: GGUFFile, config: ModelConfig, plan: Plan) -> None:
        self.plan = plan
        self.reducers = {stage.index: ThreadAllReduce(len(stage.ranks)) for stage in plan.stages}
        barriers = [r.barrier for r in self.reducers.values()]

        def load(rank: int) -> ShardRunner:
            stage = plan.workers[rank].stage
            reduce = self.reducers[stage].bind(plan.stages[stage].ranks.index(rank))
            # Each rank loads on its own thread, as a worker does (first touch by the loader).
            return ShardRunner(config, plan, rank, load_shards(gguf, plan, rank),
                               CpuBackend(n_threads=1), N_CTX, reduce)

        ranks = range(len(plan.workers))
        self.runners = run_in_threads([lambda r=r: load(r) for r in ranks], barriers)

    def forward(self, token_ids: Sequence[int], start: int,
                logits: Literal["last", "all"] = "last") -> np.ndarray:
        """The full logits [1 or T, vocab]: the last stage's slices in vocabulary order."""
        inputs: dict[str, np.ndarray] = {"token_ids": np.asarray(token_ids, np.int64)}
        for stage in self.plan.stages:
            runners = [self.runners[rank] for rank in stage.ranks]
            outputs = run_in_threads(
                [partial(r.forward, start, logits=logits, **inputs) for r in runners],
                [self.reducers[stage.index].barrier])
            if stage.index < len(self.plan.stages) - 1:
                for other in outputs[1:]:  # the all-reduce keeps the replicas bit-identical
                    np.testing.assert_array_equal(other, outputs[0])
                inputs = {"hidden": outputs[0]}
        order = np.argsort([self.plan.workers[rank].vocab[0] for rank in stage.ranks])
        return np.concatenate([outputs[i] for i in order], axis=1)  # [1 or T, vocab]


# --- plans ------------------------------------------------------------------------------------


def one_node(n_cpus: int = 8) -> Topology:
    """A one-host, one-node machine described in memory (the CPU ids are only labels here)."""
    return Topology(hosts=(Host("box", (NumaNode(0, tuple(range(n_cpus)), 16 * GIB),)),))


def two_hosts() -> Topology:
    """Two hosts of two (virtual) NUMA nodes each: a 2-stage pipeline of 2-way stages."""
    host = virtual_numa(one_node(), 2).hosts[0]
    return Topology(hosts=(replace(host, name="a"), replace(host, name="b")))


SCENARIOS: dict[str, tuple[Callable[[], Topology], PlanOptions]] = {
    "tp2": (lambda: virtual_numa(one_node(), 2), PlanOptions(ctx=N_CTX)),
    "tp3": (lambda: virtual_numa(one_node(), 3), PlanOptions(ctx=N_CTX)),
    "ep2": (lambda: virtual_numa(one_node(), 2),
            PlanOptions(ctx=N_CTX, strategy="expert_parallel")),
    "pp2x2": (two_hosts, PlanOptions(ctx=N_CTX)),
    # Blocks pinned whole to one worker: the other contributes zeros and keeps no KV cache for
    # layer 2; layer 1's experts live on worker 0 only.
    "tp2-pinned": (lambda: virtual_numa(one_node(), 2), PlanOptions(ctx=N_CTX, overrides=(
        (r"blk\.1\.ffn_(gate|up|down)_exps\.weight", "numa0"),
        (r"blk\.2\.attn_(q|k|v|output)\.weight", "numa1")))),
}


@pytest.fixture(scope="module")
def files() -> Iterator[dict[str, tuple[GGUFFile, ModelConfig, TensorMap]]]:
    """Open GGUF files by path, kept open for the module (runners hold views into them)."""
    opened: dict[str, tuple[GGUFFile, ModelConfig, TensorMap]] = {}
    yield opened
    for gguf, _, _ in opened.values():
        gguf.close()


def open_model(files: dict[str, tuple[GGUFFile, ModelConfig, TensorMap]], path: Path
               ) -> tuple[GGUFFile, ModelConfig, TensorMap]:
    if str(path) not in files:
        gguf = open_gguf(path)
        files[str(path)] = (gguf, *load_model_spec(gguf))
    return files[str(path)]


def plan_for(config: ModelConfig, tensors: TensorMap, scenario: str) -> Plan:
    topology, options = SCENARIOS[scenario]
    return make_plan(ModelSpec(config, tensors), topology(), options)


def random_prompt(seed: int, n_tokens: int = 16) -> list[int]:
    return [int(i) for i in np.random.default_rng(seed).integers(0, ORDINARY_VOCAB, n_tokens)]


# --- comparison -------------------------------------------------------------------------------


def compare_greedy(cluster: ThreadedCluster, single: ModelRunner, prompt: list[int],
                   n_decode: int) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    """The prompt as one batch (every position's logits), then n_decode single-token steps fed
    the single process's greedy token. Returns the cluster's and the single process's logits
    [T + n_decode, vocab] and both greedy continuations."""
    ours = [cluster.forward(prompt, 0, logits="all")]  # [T, vocab]
    expected = [single.forward(prompt, 0, logits="all")]
    our_tokens, expected_tokens = [], []
    for step in range(n_decode):
        our_tokens.append(int(np.argmax(ours[-1][-1])))
        expected_tokens.append(int(np.argmax(expected[-1][-1])))
        position = len(prompt) + step
        ours.append(cluster.forward([expected_tokens[-1]], position))  # [1, vocab]
        expected.append(single.forward([expected_tokens[-1]], position))
    return (np.concatenate(ours).astype(np.float64), np.concatenate(expected).astype(np.float64),
            our_tokens, expected_tokens)


def check_against_single(files: dict, path: Path, scenario: str, bound: float,
                         prompt: list[int], n_decode: int = N_DECODE,
                         max_mean_kl: float | None = None) -> ThreadedCluster:
    gguf, config, tensors = open_model(files, path)
    plan = plan_for(config, tensors, scenario)
    cluster = ThreadedCluster(gguf, config, plan)
    single = ModelRunner(config, tensors, gguf, CpuBackend(n_threads=1), N_CTX)
    ours, expected, our_tokens, expected_tokens = compare_greedy(cluster, single, prompt,
                                                                 n_decode)
    error = max_relative_error(expected, ours)
    mean_kl = float(kl_divergence(expected, ours).mean())
    print(f"{path.name} {scenario}: max relative logit error {error:.2e}, mean KL {mean_kl:.1e}")
    assert our_tokens == expected_tokens
    assert error <= bound, f"max relative logit error {error:.2e} > {bound:.0e}"
    if max_mean_kl is not None:
        assert mean_kl <= max_mean_kl
    return cluster


# --- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_qwen3moe_f32_matches_single_process(files: dict, tiny_qwen3moe: TinyModel,
                                             scenario: str) -> None:
    cluster = check_against_single(files, tiny_qwen3moe.gguf["f32"], scenario, F32_BOUND,
                                   random_prompt(1))
    plan = cluster.plan
    # The scenario really splits what it says (a plan that split nothing would pass too).
    stage = plan.stages[0]
    assert plan.block_is_split(0, stage.layers[0], "ffn")
    assert any(reducer.calls > 0 for reducer in cluster.reducers.values())
    if scenario == "tp2-pinned":
        held = [{t.name for t, _ in plan.shards_of(rank)} for rank in (0, 1)]
        assert "blk.1.ffn_gate_exps.weight" in held[0] - held[1]
        assert "blk.2.attn_q.weight" in held[1] - held[0]
        config = cluster.runners[0].config
        assert [len(r.cache.layer_keys[2]) for r in cluster.runners] == [0, config.n_kv_heads]


@pytest.mark.parametrize("scenario", ["tp2", "ep2"])
def test_qwen3moe_q8_0_matches_single_process(files: dict, tiny_qwen3moe: TinyModel,
                                              scenario: str) -> None:
    check_against_single(files, tiny_qwen3moe.gguf["q8_0"], scenario, QUANTIZED_BOUND,
                         random_prompt(2))


def test_qwen3_dense_tied_head_matches_single_process(files: dict, tiny_qwen3: TinyModel
                                                      ) -> None:
    cluster = check_against_single(files, tiny_qwen3.gguf["f32"], "tp2", F32_BOUND,
                                   random_prompt(3))
    (a0, a1), (b0, b1) = (w.vocab for w in cluster.plan.workers)  # each its own rows
    assert a0 == 0 < a1 == b0 < b1 == cluster.runners[0].config.vocab_size


@pytest.mark.parametrize("scenario", ["tp2", "tp3", "ep2", "pp2x2"])
@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_deepseek_matches_single_process(files: dict, tiny_deepseek: TinyModel, scenario: str,
                                         dtype: str) -> None:
    """DeepSeek-V3's MLA split by heads (the latent path and cache on every worker), shared
    and routed experts split, the grouped router replicated: same tokens as one process."""
    # Q8_0: as for Gemma, an activation rounding flip grows through the layers; measured at
    # one decode position of tp3 (5.2e-3; routing identical, every other position < 1e-5).
    bound, max_kl = (F32_BOUND, None) if dtype == "f32" else (DEEPSEEK_Q8_0_BOUND, 1e-5)
    cluster = check_against_single(files, tiny_deepseek.gguf[dtype], scenario, bound,
                                   random_prompt(4), max_mean_kl=max_kl)
    plan, config = cluster.plan, cluster.runners[0].config
    stage = plan.stages[0]
    assert plan.block_is_split(0, stage.layers[0], "attention")
    heads = [cluster.runners[rank].layers[0].attention.n_heads for rank in stage.ranks]
    assert sum(heads) == config.n_heads and min(heads) >= 1
    for rank in stage.ranks:  # the latent cache is replicated, not split
        assert cluster.runners[rank].cache.latents.shape[-1] == config.kv_cache_width


@pytest.mark.slow
def test_gemma3_two_way_matches_single_process(files: dict, gemma3_path: Path) -> None:
    gguf, _, _ = open_model(files, gemma3_path)
    prompt = Tokenizer.from_gguf(gguf).encode("The history of the Roman Empire began when",
                                              add_special=True, parse_special=True)
    cluster = check_against_single(files, gemma3_path, "tp2", GEMMA_BOUND, prompt,
                                   n_decode=16, max_mean_kl=GEMMA_MEAN_KL)
    plan = cluster.plan
    assert not plan.block_is_split(0, 0, "attention")  # one kv head: replicated
    assert plan.block_is_split(0, 0, "ffn")


def test_decode_reads_the_planned_bytes(files: dict, tiny_qwen3moe: TinyModel,
                                        tiny_qwen3: TinyModel) -> None:
    """One decode token reads, on every rank, exactly the bytes the plan predicts per token:
    with tensor-parallel experts every rank holds a slice of each of the top-k experts, so
    it reads k/E of its expert bytes, all of its other slices, its embedding row (first stage)
    and its vocabulary rows (last stage)."""
    for path, scenario in ((tiny_qwen3moe.gguf["f32"], "pp2x2"),
                           (tiny_qwen3.gguf["q8_0"], "tp2")):
        gguf, config, tensors = open_model(files, path)
        plan = plan_for(config, tensors, scenario)
        cluster = ThreadedCluster(gguf, config, plan)
        prompt = random_prompt(4)
        cluster.forward(prompt, 0)
        before = [r.counters.weight_bytes_read for r in cluster.runners]
        cluster.forward([prompt[0]], len(prompt))
        read = [r.counters.weight_bytes_read - b for r, b in zip(cluster.runners, before,
                                                                 strict=True)]
        assert read == [w.decode_bytes_per_token for w in plan.workers]
        single = ModelRunner(config, tensors, gguf, CpuBackend(n_threads=1), N_CTX)
        single.forward(prompt, 0)
        before_single = single.counters.weight_bytes_read
        single.forward([prompt[0]], len(prompt))
        read_single = single.counters.weight_bytes_read - before_single
        assert read_single == single.plan.workers[0].decode_bytes_per_token


def test_expert_tokens_count_the_routing(files: dict, tiny_qwen3moe: TinyModel) -> None:
    """Each rank counts every (token, slot) of its stage's layers: rows sum to tokens x top-k,
    a stage's ranks agree, other stages' layers stay 0, and the counts equal the single
    process's routing of the same tokens."""
    gguf, config, tensors = open_model(files, tiny_qwen3moe.gguf["f32"])
    plan = plan_for(config, tensors, "pp2x2")
    cluster = ThreadedCluster(gguf, config, plan)
    single = ModelRunner(config, tensors, gguf, CpuBackend(n_threads=1), N_CTX)
    prompt = random_prompt(5)
    compare_greedy(cluster, single, prompt, n_decode=3)
    n_tokens = len(prompt) + 3
    for runner in cluster.runners:
        counts = runner.counters.expert_tokens  # [n_layers, n_experts]
        mine = list(runner.layer_range)
        others = [layer for layer in range(config.n_layers) if layer not in mine]
        assert (counts[mine].sum(axis=1) == n_tokens * config.n_experts_used).all()
        assert not counts[others].any()
        np.testing.assert_array_equal(counts[mine], single.counters.expert_tokens[mine])
        assert runner.counters.tokens == n_tokens and runner.counters.forward_calls == 4
        split_blocks = 2 * len(mine)  # attention and FFN of every layer, each forward
        assert runner.counters.all_reduce_calls == 4 * split_blocks


def test_loader_refuses_a_plan_for_another_file(files: dict, tiny_qwen3moe: TinyModel) -> None:
    _, config, tensors = open_model(files, tiny_qwen3moe.gguf["f32"])
    plan = plan_for(config, tensors, "tp2")
    q8_gguf, _, _ = open_model(files, tiny_qwen3moe.gguf["q8_0"])
    with pytest.raises(NumoeError, match="another file"):
        load_shards(q8_gguf, plan, 0)


def test_runner_refuses_weights_of_another_plan(files: dict, tiny_qwen3moe: TinyModel) -> None:
    gguf, config, tensors = open_model(files, tiny_qwen3moe.gguf["f32"])
    weights = load_shards(gguf, plan_for(config, tensors, "tp3"), 0)
    with pytest.raises(NumoeError, match="load_shards"):
        ShardRunner(config, plan_for(config, tensors, "tp2"), 0, weights, CpuBackend(), N_CTX,
                    ThreadAllReduce(1).bind(0))


# --- the loader -------------------------------------------------------------------------------


def _write_gguf(path: Path, tensors: dict[str, tuple[QType, np.ndarray]]) -> None:
    """A GGUF holding raw quantized tensors: name -> (type, uint8 [..., row_bytes])."""
    writer = gguf_py.GGUFWriter(str(path), "numoe-test")
    for name, (qtype, raw) in tensors.items():
        writer.add_tensor(name, raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _slice_bytes(qtype: QType, shape: tuple[int, ...], axis: int, start: int, stop: int) -> int:
    """Bytes of [start, stop) along `axis`, from gguf-py's block sizes."""
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    sliced = list(shape)
    sliced[axis] = stop - start
    return int(np.prod(sliced)) // block * block_bytes


# (type, shape, slices (axis, start, stop)): every axis kind, block-aligned column bounds.
LOADER_CASES = {
    "q8_0-experts": (QType.Q8_0, (3, 64, 96), [(0, 1, 3), (1, 16, 48), (2, 32, 96)]),
    "q8_0-matrix": (QType.Q8_0, (64, 96), [(0, 8, 40), (1, 0, 64)]),
    "q4_k-experts": (QType.Q4_K, (3, 8, 768), [(0, 0, 2), (1, 2, 6), (2, 256, 768)]),
    "q6_k-matrix": (QType.Q6_K, (12, 512), [(0, 5, 12), (1, 256, 512)]),
}


@pytest.mark.parametrize("case", list(LOADER_CASES))
def test_loaded_slice_dequantizes_to_the_slice_of_the_whole(tmp_path: Path, case: str) -> None:
    """gguf-py's dequantization of each loaded slice equals the same slice of gguf-py's
    dequantization of the whole tensor; the slices are fresh arrays, not views of the file."""
    qtype, shape, slices = LOADER_CASES[case]
    raw, values = random_weight(qtype, int(np.prod(shape[:-1])), shape[-1],
                                np.random.default_rng(len(case)))
    whole = values.reshape(shape)  # gguf-py's values of the whole tensor
    _write_gguf(tmp_path / "t.gguf", {"t": (qtype, raw.reshape(*shape[:-1], -1))})
    with open_gguf(tmp_path / "t.gguf") as gguf:
        info = gguf.tensors["t"]
        assert tuple(info.shape) == shape
        tensor = TensorPlacement("t", int(qtype), shape, info.n_bytes, False, False, ())
        for axis, start, stop in [(None, 0, 0), *slices]:
            if axis is None:
                shard, expected = Shard(0, None, 0, 0, info.n_bytes), whole
            else:
                shard = Shard(0, axis, start, stop, _slice_bytes(qtype, shape, axis, start, stop))
                expected = np.take(whole, np.arange(start, stop), axis=axis)
            loaded = load_shard(gguf, tensor, shard)
            assert loaded.shape == expected.shape
            assert loaded.data.flags.owndata
            assert not np.shares_memory(loaded.data, gguf.tensor_data("t"))
            block, block_bytes = GGML_QUANT_SIZES[qtype]
            rows = loaded.data.reshape(-1, loaded.shape[-1] // block * block_bytes)
            got = dequantize(rows, qtype).reshape(loaded.shape)
            np.testing.assert_array_equal(got, expected)
        with pytest.raises(NumoeError, match="quant blocks"):
            misaligned = Shard(0, len(shape) - 1, 1, shape[-1], info.n_bytes)
            load_shard(gguf, tensor, misaligned)
