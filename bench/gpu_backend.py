"""Checks and times the CUDA backend (worker/backends/cupy_gpu.py) against the numpy reference.

    python bench/gpu_backend.py [--models A.gguf ...] [--gemma-shaped] [--host | --compile-only]

Self-contained: imports numpy, gguf-py, CuPy and numoe's pure-Python modules only (nothing from
native/ or tests/), so it runs on a bare GPU machine (bench/gpu_check.sh). One PASS/FAIL line per
check with the measured error and its bound, then timings. Exit status 0 when every check
passed, 1 when one failed, 2 when no backend could be built (no CuPy, no GPU).

Checks, each against an independent reference (gguf-py's dequantization, float64 numpy,
NumpyRefBackend(float64)):
  dequantize  every type, random blocks whose f16 scales are random finite bit patterns
              (subnormals and negatives too): bit-exact, also rows picked by id
  matmul      every type, decode path (matvec kernel, T = 1, 3) and prompt path (dequantize +
              cuBLAS, T = 20): max|y - y64| <= 1e-5 max|y64|
  gated_ffn   dense FFN, both paths and both activations: same bound
  moe         routed experts, both paths, with skipped (-1) slots: same bound
  forward     ModelRunner, prompt of 24 then 3 decode steps then a batch of 5 (both product
              paths, the KV cache, sliding windows): max relative logit error <= 1e-4 per step;
              on the --models files and on synthetic GGUFs written here (gemma3: sliding
              window, soft-cap, tied head, GeGLU; qwen3moe; qwen3), which use every type;
              the synthetic ones again with a float16 KV cache on both sides (bound 1e-3)
Timings (GPU only): matvec GB/s on 4096x4096 and 14336x4096 weights, decode tok/s (32 steps
after an 8-token prompt) and prompt tok/s (128 tokens) per model; --gemma-shaped adds a
synthetic model of Gemma 3 270M's shapes and types (about 240 MB, written to a temp dir).
--host runs every check on HostKernels (the kernels' device code built for the CPU), no timings;
--compile-only just compiles the CUDA source with NVRTC (CuPy + NVRTC library, no GPU needed).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFWriter
from gguf import GGMLQuantizationType as QType
from gguf.quants import dequantize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cluster.errors import NumoeError  # noqa: E402 — repo root on the path first
from cluster.gguf import open_gguf  # noqa: E402
from cluster.model import load_model_spec  # noqa: E402
from worker.backends.base import Activation, Backend, WeightData  # noqa: E402
from worker.backends.cuda_kernels import HostKernels  # noqa: E402
from worker.backends.cupy_gpu import CudaKernels, CupyBackend, Kernels  # noqa: E402
from worker.backends.numpy_ref import NumpyRefBackend  # noqa: E402
from worker.model_runner import ModelRunner  # noqa: E402

ALL_TYPES = [QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q5_0, QType.Q4_K,
             QType.Q5_K, QType.Q6_K]
FLOAT_TYPES = {QType.F32, QType.F16, QType.BF16}
PRODUCT_BOUND = 1e-5  # max|y - y64| / max|y64|, float32 products of <= 1024 terms
LOGIT_BOUND = 1e-4  # max relative logit error of a float32 forward pass vs float64
# With a float16 KV cache on both sides: keys rounded from float32 vs from float64 can land on
# neighbouring f16 values (measured on the synthetic models: up to 1.4e-4).
F16_CACHE_LOGIT_BOUND = 1e-3
# Byte offsets of each block's f16 scales, and the largest |code * scale factor| of the type:
# with scale = amplitude / factor, weights stay within about +-amplitude.
_SCALES: dict[QType, tuple[list[int], float]] = {
    QType.Q8_0: ([0], 127.0), QType.Q4_0: ([0], 8.0), QType.Q5_0: ([0], 16.0),
    QType.Q4_K: ([0, 2], 63.0 * 15), QType.Q5_K: ([0, 2], 63.0 * 31),
    QType.Q6_K: ([208], 128.0 * 32),
}
# K-quant mins, as a multiple of d, that centre the weights on zero: E[sc * q] / E[m].
_KQUANT_MIN_RATIO = {QType.Q4_K: 7.5, QType.Q5_K: 15.5}


# --- random weights ---------------------------------------------------------------------------


def _finite_f16_bits(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random f16 bit patterns of every finite value (zeros, subnormals, negatives)."""
    magnitude = rng.integers(0, 0x7C00, shape, dtype=np.uint16)
    return magnitude | (rng.integers(0, 2, shape, dtype=np.uint16) << 15)


def random_weight(qtype: QType, shape: tuple[int, ...], rng: np.random.Generator,
                  amplitude: float | None = 0.1) -> np.ndarray:
    """GGUF bytes uint8 [prod(shape[:-1]), row_bytes] of a random weight of numpy `shape`.

    Quantized types are random bytes (every code pattern is a valid block) with the f16 scales
    set so that |w| stays within about `amplitude`; amplitude None draws the scales (and the
    F16/BF16 values) as random finite bit patterns instead, to test dequantization."""
    n_rows, n_in = int(np.prod(shape[:-1])), shape[-1]
    block_elements, block_bytes = GGML_QUANT_SIZES[qtype]
    if qtype in FLOAT_TYPES:
        if amplitude is None and qtype != QType.F32:
            # Below 0x7C00 in magnitude: finite as f16, and as bf16 (exponent < 0xFF).
            return _finite_f16_bits(rng, (n_rows, n_in)).view(np.uint8)
        values = rng.standard_normal((n_rows, n_in), dtype=np.float32)
        values *= np.float32((amplitude or 1.0) / 3)
        if qtype == QType.F32:
            return values.view(np.uint8)
        if qtype == QType.F16:
            return values.astype(np.float16).view(np.uint8)
        return np.ascontiguousarray((values.view(np.uint32) >> 16).astype(np.uint16)
                                    ).view(np.uint8)  # bf16: the top half of each float32
    n_blocks = n_in // block_elements
    raw = rng.integers(0, 256, (n_rows, n_blocks, block_bytes), dtype=np.uint8)
    offsets, factor = _SCALES[qtype]
    for index, offset in enumerate(offsets):
        if amplitude is None:
            bits = _finite_f16_bits(rng, (n_rows, n_blocks))
        else:
            d = rng.uniform(0.5, 1.0, (n_rows, n_blocks)) * amplitude / factor
            if index == 1:  # dmin of Q4_K / Q5_K
                d *= _KQUANT_MIN_RATIO[qtype]
            bits = d.astype(np.float16).view(np.uint16)
        raw[..., offset : offset + 2] = bits.view(np.uint8).reshape(n_rows, n_blocks, 2)
    return raw.reshape(n_rows, n_blocks * block_bytes)


def reference_values(raw: np.ndarray, qtype: QType, shape: tuple[int, ...]) -> np.ndarray:
    """gguf-py's float32 values of `raw` (bytes [rows, row_bytes]) with numpy `shape`."""
    return np.asarray(dequantize(raw, qtype), dtype=np.float32).reshape(shape)


def weight_data(name: str, qtype: QType, raw: np.ndarray, shape: tuple[int, ...]) -> WeightData:
    return WeightData(name, int(qtype), shape, np.ascontiguousarray(raw).reshape(-1))


# --- synthetic models ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticSpec:
    """A small random model in llama.cpp's tensor names and metadata; `types` cycle over the
    layers' matrices so every weight type appears."""

    arch: str  # qwen3moe | qwen3 | gemma3
    vocab: int
    n_embd: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_ff: int  # dense FFN width, or one expert's
    n_experts: int = 0
    n_experts_used: int = 0
    sliding_window: int = 0
    softcap: float = 0.0
    tied: bool = True
    embd_type: QType = QType.Q6_K
    types: tuple[QType, ...] = tuple(ALL_TYPES)
    role_types: dict[str, QType] = field(default_factory=dict)  # fixed type per role, if any


SYNTHETIC: dict[str, SyntheticSpec] = {
    "gemma3": SyntheticSpec("gemma3", 512, 256, 6, 4, 2, 64, 512, sliding_window=8,
                            softcap=30.0),
    "qwen3moe": SyntheticSpec("qwen3moe", 512, 256, 3, 4, 2, 64, 256, n_experts=8,
                              n_experts_used=2, tied=False, embd_type=QType.Q4_K),
    "qwen3": SyntheticSpec("qwen3", 512, 256, 2, 4, 1, 64, 512, embd_type=QType.Q8_0),
}
# Gemma 3 270M's shapes and (roughly) its Q4_K_M file's types, for timing only.
GEMMA3_270M_SHAPED = SyntheticSpec(
    "gemma3", 262_144, 640, 18, 4, 1, 256, 2048, sliding_window=512, softcap=0.0,
    embd_type=QType.Q8_0,
    role_types={"attn_q": QType.Q5_0, "attn_k": QType.Q5_0, "attn_v": QType.Q8_0,
                "attn_output": QType.Q4_K, "ffn_gate": QType.Q5_0, "ffn_up": QType.Q5_0,
                "ffn_down": QType.Q6_K})


def write_synthetic_model(spec: SyntheticSpec, path: Path, seed: int = 0) -> Path:
    s, rng = spec, np.random.default_rng(seed)
    writer = GGUFWriter(path, s.arch)
    writer.add_block_count(s.n_layers)
    writer.add_context_length(4096)
    writer.add_embedding_length(s.n_embd)
    writer.add_feed_forward_length(s.n_ff)
    writer.add_head_count(s.n_heads)
    writer.add_head_count_kv(s.n_kv_heads)
    writer.add_key_length(s.head_dim)
    writer.add_value_length(s.head_dim)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    if s.n_experts:
        writer.add_expert_count(s.n_experts)
        writer.add_expert_used_count(s.n_experts_used)
        writer.add_expert_feed_forward_length(s.n_ff)
    if s.sliding_window:
        writer.add_sliding_window(s.sliding_window)
    if s.softcap:
        writer.add_final_logit_softcapping(s.softcap)

    def matrix(name: str, qtype: QType, shape: tuple[int, ...]) -> None:
        writer.add_tensor(name, random_weight(qtype, shape, rng).reshape(*shape[:-1], -1),
                          raw_dtype=qtype)

    def norm(name: str, n: int) -> None:
        writer.add_tensor(name, (1.0 + 0.2 * rng.uniform(-1, 1, n)).astype(np.float32))

    q_width, kv_width = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    matrix("token_embd.weight", s.embd_type, (s.vocab, s.n_embd))
    norm("output_norm.weight", s.n_embd)
    if not s.tied:
        matrix("output.weight", QType.Q8_0, (s.vocab, s.n_embd))
    experts = (s.n_experts,) if s.n_experts else ()
    ffn = "_exps" if s.n_experts else ""
    roles = [("attn_q", (q_width, s.n_embd)), ("attn_k", (kv_width, s.n_embd)),
             ("attn_v", (kv_width, s.n_embd)), ("attn_output", (s.n_embd, q_width)),
             ("ffn_gate" + ffn, (*experts, s.n_ff, s.n_embd)),
             ("ffn_up" + ffn, (*experts, s.n_ff, s.n_embd)),
             ("ffn_down" + ffn, (*experts, s.n_embd, s.n_ff))]
    for layer in range(s.n_layers):
        p = f"blk.{layer}."
        for index, (role, shape) in enumerate(roles):
            qtype = s.role_types.get(role, s.types[(layer * len(roles) + index) % len(s.types)])
            matrix(p + role + ".weight", qtype, shape)
        for name in ("attn_norm", "ffn_norm"):
            norm(p + name + ".weight", s.n_embd)
        for name in ("attn_q_norm", "attn_k_norm"):
            norm(p + name + ".weight", s.head_dim)
        if s.arch == "gemma3":
            norm(p + "post_attention_norm.weight", s.n_embd)
            norm(p + "post_ffw_norm.weight", s.n_embd)
        if s.n_experts:
            writer.add_tensor(p + "ffn_gate_inp.weight",
                              rng.standard_normal((s.n_experts, s.n_embd), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- checks ---------------------------------------------------------------------------------------


def relative_error(reference: np.ndarray, ours: Any) -> float:
    ours = np.asarray(ours, dtype=np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def dequantize_mismatches(kernels: Kernels, qtype: QType, seed: int = 0) -> tuple[int, int]:
    """(differing values, values) of the dequantize kernel vs gguf-py, all rows and rows by id."""
    rng = np.random.default_rng(seed)
    n_rows, n_in = 7, 1000 if qtype in FLOAT_TYPES else 1024  # 1000: a partial last chunk
    raw = random_weight(qtype, (n_rows, n_in), rng, amplitude=None)
    reference = reference_values(raw, qtype, (n_rows, n_in))
    data = kernels.upload(np.ascontiguousarray(raw).reshape(-1))
    row_ids = np.array([4, 0, 6, 4], np.int32)
    ours = kernels.download(kernels.dequantize(int(qtype), data, raw.shape[1], n_in, n_rows))
    picked = kernels.download(kernels.dequantize(int(qtype), data, raw.shape[1], n_in,
                                                 len(row_ids), kernels.upload(row_ids)))
    differ = int((ours.view(np.uint32) != reference.view(np.uint32)).sum())
    differ += int((picked.view(np.uint32) != reference[row_ids].view(np.uint32)).sum())
    return differ, ours.size + picked.size


def matmul_error(backend: CupyBackend, qtype: QType, n_tokens: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    shape = (300, 1000 if qtype in FLOAT_TYPES else 1024)  # 300 rows: a partial warp block
    raw = random_weight(qtype, shape, rng)
    weights = reference_values(raw, qtype, shape).astype(np.float64)
    x = rng.standard_normal((n_tokens, shape[1]), dtype=np.float32)
    ours = backend.matmul(backend.load_weight(weight_data("w", qtype, raw, shape)),
                          backend.kernels.upload(x))
    return relative_error(x.astype(np.float64) @ weights.T, backend.kernels.download(ours))


def _ffn_weights(types: tuple[QType, QType, QType], n_embd: int, n_ff: int, n_experts: int,
                 rng: np.random.Generator) -> list[WeightData]:
    experts = (n_experts,) if n_experts else ()
    shapes = [(*experts, n_ff, n_embd), (*experts, n_ff, n_embd), (*experts, n_embd, n_ff)]
    return [weight_data(name, qtype, random_weight(qtype, shape, rng), shape)
            for name, qtype, shape in zip(("gate", "up", "down"), types, shapes, strict=True)]


def ffn_error(backend: CupyBackend, types: tuple[QType, QType, QType], n_tokens: int,
              activation: Activation, n_experts: int = 0, skip_slots: bool = False,
              seed: int = 0) -> float:
    """gated_ffn (n_experts 0) or moe (top-3 of n_experts) vs NumpyRefBackend(float64)."""
    rng = np.random.default_rng(seed)
    n_embd, n_ff, n_used = 256, 256, 3
    tensors = _ffn_weights(types, n_embd, n_ff, n_experts, rng)
    reference = NumpyRefBackend(np.float64)
    ref_weights = [reference.load_weight(t) for t in tensors]
    our_weights = [backend.load_weight(t) for t in tensors]
    x = rng.standard_normal((n_tokens, n_embd), dtype=np.float32)
    device_x = backend.kernels.upload(x)
    if not n_experts:
        expected = reference.gated_ffn(x.astype(np.float64), *ref_weights, activation)
        ours = backend.gated_ffn(device_x, *our_weights, activation)
        return relative_error(expected, backend.kernels.download(ours))
    ids = np.stack([rng.permutation(n_experts)[:n_used] for _ in range(n_tokens)]).astype(
        np.int32)  # [T, K], distinct experts per token
    if skip_slots:
        ids[rng.uniform(size=ids.shape) < 0.3] = -1
    probs = rng.uniform(0.1, 1.0, ids.shape).astype(np.float32)  # [T, K]
    expected = reference.moe(x.astype(np.float64), ids, probs, *ref_weights, activation)
    ours = backend.moe(device_x, backend.kernels.upload(ids), backend.kernels.upload(probs),
                       *our_weights, activation)
    return relative_error(expected, backend.kernels.download(ours))


def forward_errors(path: Path, make_backend: Callable[[], Backend], n_ctx: int = 64,
                   kv_cache_dtype: str | None = None) -> list[float]:
    """Max relative logit errors vs NumpyRefBackend(float64), per step: a 24-token prompt
    (logits of all), 3 single-token decode steps, then a 5-token batch. kv_cache_dtype
    "float16" rounds both runners' caches to f16."""
    gguf = open_gguf(path)
    config, tensors = load_model_spec(gguf)
    reference = ModelRunner(config, tensors, gguf, NumpyRefBackend(np.float64), n_ctx,
                            kv_cache_dtype)
    ours = ModelRunner(config, tensors, gguf, make_backend(), n_ctx, kv_cache_dtype)
    rng = np.random.default_rng(0)
    prompt = [int(i) for i in rng.integers(0, min(config.vocab_size, 150_000), 32)]
    steps = [(prompt[:24], 0)] + [([prompt[24 + i]], 24 + i) for i in range(3)]
    steps.append((prompt[27:32], 27))
    errors = []
    for ids, start in steps:
        expected = reference.forward(ids, start, logits="all")
        got = ours.forward(ids, start, logits="all")
        if not isinstance(got, np.ndarray):
            raise TypeError(f"forward returned {type(got).__name__}, not host numpy logits")
        errors.append(relative_error(expected, got))
    return errors


class Report:
    MAX_TRACEBACKS = 3  # the first failures' tracebacks; the rest get one line each

    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def line(self, ok: bool, name: str, detail: str) -> None:
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)

    def run(self, name: str, check: Callable[[], tuple[bool, str]]) -> None:
        try:
            ok, detail = check()
        except Exception as error:  # noqa: BLE001 — report every failing check, keep going
            hint = ""
            if isinstance(error, TypeError) and "numpy.ndarray" in str(error):
                hint = (" [CuPy refuses host arrays; Gemma's embedding scale in "
                        "worker/shard_runner.py _input: `out * np.asarray(self.config."
                        "embedding_scale, dtype=out.dtype)` must become `out * "
                        "out.dtype.type(self.config.embedding_scale)`]")
            if self.failed < self.MAX_TRACEBACKS:
                traceback.print_exc()
            ok, detail = False, f"{type(error).__name__}: {error}{hint}"
        self.line(ok, name, detail)


def run_checks(report: Report, make_backend: Callable[[], CupyBackend], kernels: Kernels,
               model_paths: list[Path], scratch: Path) -> None:
    for qtype in ALL_TYPES:
        def dequant(qtype: QType = qtype) -> tuple[bool, str]:
            differ, total = dequantize_mismatches(kernels, qtype)
            return differ == 0, f"{differ} of {total} values differ from gguf-py (bound 0)"
        report.run(f"dequantize {qtype.name}", dequant)
    backend = make_backend()
    for qtype in ALL_TYPES:
        for n_tokens in (1, 3, 20):
            def product(qtype: QType = qtype, n_tokens: int = n_tokens) -> tuple[bool, str]:
                error = matmul_error(backend, qtype, n_tokens)
                return error <= PRODUCT_BOUND, f"rel error {error:.2e} (bound {PRODUCT_BOUND})"
            report.run(f"matmul {qtype.name} T={n_tokens}", product)
    type_sets = [(QType.Q4_K, QType.Q5_K, QType.Q6_K), (QType.Q8_0, QType.Q4_0, QType.Q5_0),
                 (QType.F16, QType.BF16, QType.F32)]
    cases = [(types, n_tokens, activation, n_experts, skip)
             for types in type_sets for n_tokens in (1, 4, 20)
             for activation, n_experts, skip in (("gelu_tanh", 0, False), ("silu", 8, False),
                                                 ("silu", 8, True))]
    for types, n_tokens, activation, n_experts, skip in cases:
        def ffn(types: Any = types, n_tokens: int = n_tokens, activation: Any = activation,
                n_experts: int = n_experts, skip: bool = skip) -> tuple[bool, str]:
            error = ffn_error(backend, types, n_tokens, activation, n_experts, skip)
            return error <= PRODUCT_BOUND, f"rel error {error:.2e} (bound {PRODUCT_BOUND})"
        kind = f"moe{' skip' if skip else ''}" if n_experts else "gated_ffn"
        report.run(f"{kind} {'/'.join(t.name for t in types)} {activation} T={n_tokens}", ffn)
    paths = list(model_paths)
    for name, spec in SYNTHETIC.items():
        paths.append(write_synthetic_model(spec, scratch / f"synthetic-{name}.gguf"))
    runs = [(path, None, LOGIT_BOUND) for path in paths]
    runs += [(path, "float16", F16_CACHE_LOGIT_BOUND) for path in paths[-len(SYNTHETIC):]]
    for path, cache, bound in runs:
        def forward(path: Path = path, cache: str | None = cache,
                    bound: float = bound) -> tuple[bool, str]:
            errors = forward_errors(path, make_backend, kv_cache_dtype=cache)
            steps = " ".join(f"{e:.1e}" for e in errors)
            return max(errors) <= bound, f"rel logit error per step {steps} (bound {bound})"
        report.run(f"forward {path.name}{' f16 cache' if cache else ''}", forward)


# --- timings (GPU only) -------------------------------------------------------------------------


def time_matvec(kernels: CudaKernels, qtype: QType, n_out: int, n_in: int,
                repeats: int = 50) -> float:
    """Weight GB/s of the decode kernel (one token) on a random [n_out, n_in] weight."""
    cp = kernels.xp
    raw = random_weight(qtype, (n_out, n_in), np.random.default_rng(1))
    data = kernels.upload(raw.reshape(-1))
    x = cp.asarray(np.random.default_rng(2).standard_normal((1, n_in), dtype=np.float32))
    for _ in range(3):
        kernels.matvec(int(qtype), data, raw.shape[1], 0, None, x, 1, n_out, n_in, 1)
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(repeats):
        kernels.matvec(int(qtype), data, raw.shape[1], 0, None, x, 1, n_out, n_in, 1)
    end.record()
    end.synchronize()
    seconds = cp.cuda.get_elapsed_time(start, end) / 1e3 / repeats
    return raw.nbytes / seconds / 1e9


def time_model(path: Path, make_backend: Callable[[], Backend], n_decode: int = 32,
               n_prompt: int = 128) -> tuple[float, float]:
    """(decode tok/s over n_decode steps after an 8-token prompt, prompt tok/s of n_prompt)."""
    gguf = open_gguf(path)
    config, tensors = load_model_spec(gguf)
    runner = ModelRunner(config, tensors, gguf, make_backend(), n_prompt + n_decode + 8)
    rng = np.random.default_rng(0)
    ids = [int(i) for i in rng.integers(0, min(config.vocab_size, 150_000), n_prompt)]
    runner.forward(ids[:8], 0)
    for step in range(3):  # warm-up: kernels compiled, memory pools grown
        runner.forward([ids[8 + step]], 8 + step)
    begin = time.perf_counter()
    for step in range(n_decode):
        runner.forward([ids[step % n_prompt]], 8 + step)  # returns host logits: synchronised
    decode = n_decode / (time.perf_counter() - begin)
    runner.forward(ids, 0)
    begin = time.perf_counter()
    runner.forward(ids, 0)
    return decode, n_prompt / (time.perf_counter() - begin)


def run_timings(kernels: CudaKernels, make_backend: Callable[[], CupyBackend],
                model_paths: list[Path]) -> None:
    print("\n| weight | shape | matvec GB/s |\n|---|---|---|")
    for qtype in (QType.Q4_K, QType.Q6_K, QType.Q8_0, QType.Q5_0):
        for n_out, n_in in ((4096, 4096), (14336, 4096)):
            gbs = time_matvec(kernels, qtype, n_out, n_in)
            print(f"| {qtype.name} | {n_out}x{n_in} | {gbs:.0f} |", flush=True)
    print("\n| model | decode tok/s | prompt (128) tok/s |\n|---|---|---|")
    for path in model_paths:
        decode, prompt = time_model(path, make_backend)
        print(f"| {path.name} | {decode:.1f} | {prompt:.0f} |", flush=True)


def compile_only() -> int:
    """Compile the kernels with NVRTC for sm_90 (no GPU needed: CuPy and the NVRTC library,
    e.g. pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12) and check every kernel is there."""
    from cupy_backends.cuda.libs import nvrtc  # noqa: PLC0415 — optional, this mode only

    from worker.backends.cuda_kernels import KERNEL_NAMES, SOURCE  # noqa: PLC0415

    program = nvrtc.createProgram(SOURCE, "numoe_kernels.cu", [], [])
    try:
        nvrtc.compileProgram(program, ["-arch=compute_90", "-std=c++17"])
    except nvrtc.NVRTCError:
        print(f"FAIL nvrtc compile:\n{nvrtc.getProgramLog(program)}")
        return 1
    ptx = nvrtc.getPTX(program)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    names = [f"{kind}_{name}" for name in KERNEL_NAMES.values()
             for kind in ("dequantize", "matvec")]
    missing = [name for name in names if f".entry {name}(" not in ptx]
    print(f"{'FAIL' if missing else 'PASS'} nvrtc compile: {len(names) - len(missing)} of "
          f"{len(names)} kernels in the PTX{', missing ' + ', '.join(missing) if missing else ''}")
    return 1 if missing else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, nargs="*", default=[],
                        help="GGUF files to check and time (qwen3moe, qwen3 or gemma3)")
    parser.add_argument("--gemma-shaped", action="store_true",
                        help="also time a synthetic model of Gemma 3 270M's shapes (~240 MB)")
    parser.add_argument("--host", action="store_true",
                        help="run the checks on HostKernels (CPU build of the kernels)")
    parser.add_argument("--compile-only", action="store_true",
                        help="only compile the kernels with NVRTC (needs CuPy, not a GPU)")
    args = parser.parse_args(argv)
    if args.compile_only:
        return compile_only()
    try:
        kernels: Kernels = HostKernels() if args.host else CudaKernels()
    except NumoeError as error:
        print(f"ERROR: {error}", file=sys.stderr)
        return 2

    def make_backend() -> CupyBackend:
        return CupyBackend(kernels=kernels)

    if isinstance(kernels, CudaKernels):
        cp = kernels.xp
        name = cp.cuda.runtime.getDeviceProperties(kernels.device.id)["name"]
        name = name.decode() if isinstance(name, bytes) else name
        print(f"device {name}, CuPy {cp.__version__}, CUDA runtime "
              f"{cp.cuda.runtime.runtimeGetVersion()}, numpy {np.__version__}")
    report = Report()
    with tempfile.TemporaryDirectory(prefix="numoe-gpu-check-") as scratch:
        begin = time.perf_counter()
        run_checks(report, make_backend, kernels, args.models, Path(scratch))
        print(f"\n{report.passed} passed, {report.failed} failed "
              f"({time.perf_counter() - begin:.0f} s)", flush=True)
        if isinstance(kernels, CudaKernels):
            timed = list(args.models)
            timed += [Path(scratch) / f"synthetic-{name}.gguf" for name in SYNTHETIC]
            if args.gemma_shaped:
                timed.append(write_synthetic_model(GEMMA3_270M_SHAPED,
                                                   Path(scratch) / "gemma3-270m-shaped.gguf"))
            try:
                run_timings(kernels, make_backend, timed)
            except Exception:  # noqa: BLE001 — the checks above already decided the status
                traceback.print_exc()
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
