"""Generate the MoE benchmark model: Qwen3-30B-A3B's shapes with fewer layers, random weights.

    python bench/make_moe_model.py [--layers 6] [--out PATH] [--keep-f16]

Every layer has Qwen3-30B-A3B's real shapes (hidden 2048, 32 q / 4 kv heads of 128, 128 experts,
top-8, expert FFN 768), so one layer costs what it costs in the real model; only the layer count
is cut, from 48 to 6, to fit the benchmark machine (2 cores, 24 GiB). The Q4_K_M file is about
2.5 GiB; a token reads about 0.45 GB (8 of 128 experts per layer, attention, output head).

Steps (each skipped when its output exists):
1. Write an F16 GGUF (~8.6 GB) with gguf-py's GGUFWriter, in llama.cpp's qwen3moe tensor names and
   metadata, one tensor at a time (generated, written, freed: memory stays < 1 GB). The
   tokenizer metadata is copied from llama.cpp's ggml-vocab-qwen2.gguf, so prompts tokenize.
2. Quantize it with llama.cpp's own `llama-quantize ... Q4_K_M`.
3. Load it with llama.cpp's bindings and generate a few tokens.

Reproducible: tensor i is drawn from np.random.default_rng([seed, i]), so the same arguments
give the same F16 bytes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.reference import llamacpp  # noqa: E402 — repo root on the path first

DEFAULT_OUT = Path.home() / ".cache" / "numoe" / "bench-models" / "qwen3moe-bench-Q4_K_M.gguf"
GIB = 1024**3
# Default init (std 0.02) times 3, as for the tiny test models: logits stand clear of noise.
WEIGHT_STD = 0.06
NORM_WEIGHT_SPREAD = 0.2  # norm weights drawn from 1 +- 0.2, not all exactly 1
QWEN2_VOCAB = 151_936  # entries in ggml-vocab-qwen2.gguf (for the disk-space estimate)


@dataclass(frozen=True)
class BenchModelSpec:
    """Qwen3-30B-A3B (config.json) with n_layers instead of 48."""

    n_layers: int = 6
    hidden: int = 2048
    n_heads: int = 32
    n_kv_heads: int = 4
    head_dim: int = 128
    n_experts: int = 128
    experts_per_token: int = 8
    expert_ffn: int = 768
    dense_ffn: int = 6144  # metadata only: every layer is MoE, as in the real model
    context_length: int = 40960
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    seed: int = 0


# (GGUF name, numpy shape [rows, cols...], kind) — kind picks dtype and init.
TensorPlan = list[tuple[str, tuple[int, ...], str]]


def tensor_plan(spec: BenchModelSpec, vocab: int) -> TensorPlan:
    q_width, kv_width = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    gate_up_shape = (spec.n_experts, spec.expert_ffn, spec.hidden)  # [expert, ffn, hidden]
    down_shape = (spec.n_experts, spec.hidden, spec.expert_ffn)  # [expert, hidden, ffn]
    plan: TensorPlan = [("token_embd.weight", (vocab, spec.hidden), "linear")]
    for layer in range(spec.n_layers):
        prefix = f"blk.{layer}."
        plan += [
            (prefix + "attn_norm.weight", (spec.hidden,), "norm"),
            (prefix + "attn_q.weight", (q_width, spec.hidden), "linear"),
            (prefix + "attn_k.weight", (kv_width, spec.hidden), "linear"),
            (prefix + "attn_v.weight", (kv_width, spec.hidden), "linear"),
            (prefix + "attn_q_norm.weight", (spec.head_dim,), "norm"),
            (prefix + "attn_k_norm.weight", (spec.head_dim,), "norm"),
            (prefix + "attn_output.weight", (spec.hidden, q_width), "linear"),
            (prefix + "ffn_norm.weight", (spec.hidden,), "norm"),
            # The router stays F32, as convert_hf_to_gguf.py leaves it.
            (prefix + "ffn_gate_inp.weight", (spec.n_experts, spec.hidden), "router"),
            (prefix + "ffn_gate_exps.weight", gate_up_shape, "linear"),
            (prefix + "ffn_up_exps.weight", gate_up_shape, "linear"),
            (prefix + "ffn_down_exps.weight", down_shape, "linear"),
        ]
    plan += [
        ("output_norm.weight", (spec.hidden,), "norm"),
        ("output.weight", (vocab, spec.hidden), "linear"),
    ]
    return plan


def tensor_dtype(kind: str) -> np.dtype:
    return np.dtype(np.float16 if kind == "linear" else np.float32)


def generate_tensor(shape: tuple[int, ...], kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "norm":
        return (1.0 + NORM_WEIGHT_SPREAD * rng.uniform(-1, 1, shape)).astype(np.float32)
    out = np.empty(shape, dtype=tensor_dtype(kind))
    # Row blocks of ~16M values keep the float32 scratch small for the 400 MB expert tensors.
    rows = out.reshape(-1, shape[-1])  # [rows, cols] view
    step = max(1, (1 << 24) // shape[-1])
    for start in range(0, rows.shape[0], step):
        block = rng.standard_normal((min(step, rows.shape[0] - start), shape[-1]), np.float32)
        rows[start : start + step] = block * np.float32(WEIGHT_STD)
    return out


def copy_tokenizer(writer: GGUFWriter, vocab_path: Path) -> int:
    """Copy every tokenizer.* key from a llama.cpp vocab GGUF; return the vocabulary size."""
    reader = GGUFReader(vocab_path)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        main_type = field.types[0]
        sub_type = field.types[1] if main_type == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), main_type, sub_type)
    return len(reader.fields["tokenizer.ggml.tokens"].data)


def write_f16_gguf(spec: BenchModelSpec, path: Path, vocab_path: Path) -> None:
    writer = GGUFWriter(path, "qwen3moe")
    writer.add_type("model")
    writer.add_name(f"qwen3moe-bench-{spec.n_layers}L (random weights, Qwen3-30B-A3B shapes)")
    writer.add_block_count(spec.n_layers)
    writer.add_context_length(spec.context_length)
    writer.add_embedding_length(spec.hidden)
    writer.add_feed_forward_length(spec.dense_ffn)
    writer.add_head_count(spec.n_heads)
    writer.add_head_count_kv(spec.n_kv_heads)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_layer_norm_rms_eps(spec.rms_norm_eps)
    writer.add_expert_count(spec.n_experts)
    writer.add_expert_used_count(spec.experts_per_token)
    writer.add_expert_feed_forward_length(spec.expert_ffn)
    writer.add_file_type(LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(2)
    vocab = copy_tokenizer(writer, vocab_path)

    write_tensors(writer, tensor_plan(spec, vocab), spec.seed, generate_tensor)


def plan_bytes(plan: TensorPlan) -> int:
    """F16/F32 bytes of every tensor of a plan."""
    return sum(int(np.prod(shape)) * tensor_dtype(kind).itemsize for _, shape, kind in plan)


def write_tensors(writer: GGUFWriter, plan: TensorPlan, seed: int,
                  generate: Callable[[tuple[int, ...], str, np.random.Generator], np.ndarray]
                  ) -> None:
    """Tensor infos, header and metadata, then each tensor generated from
    np.random.default_rng([seed, index]), written and freed (memory stays one tensor), with a
    progress line per expert tensor; closes the writer."""
    for name, shape, kind in plan:
        dtype = tensor_dtype(kind)
        writer.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    total_bytes = plan_bytes(plan)
    written, start = 0, time.perf_counter()
    for index, (name, shape, kind) in enumerate(plan):
        writer.write_tensor_data(generate(shape, kind, np.random.default_rng([seed, index])))
        written += int(np.prod(shape)) * tensor_dtype(kind).itemsize
        if name.endswith("exps.weight") or index == len(plan) - 1:
            print(
                f"  {name:32s} {written / GIB:6.2f} / {total_bytes / GIB:.2f} GiB"
                f"  ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    writer.close()


def quantize(f16_path: Path, out_path: Path, threads: int) -> None:
    command = [str(llamacpp.tool("llama-quantize")), str(f16_path), str(out_path), "Q4_K_M"]
    result = subprocess.run([*command, str(threads)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"llama-quantize failed:\n{result.stderr[-4000:]}")


def verify(path: Path, threads: int) -> None:
    """llama.cpp loads the file and generates; the logits must be finite and not flat."""
    bindings = llamacpp.bindings()
    llm = bindings.Llama(
        model_path=str(path), n_ctx=256, n_threads=threads, logits_all=True, verbose=False
    )
    prompt = llm.tokenize(b"The capital of France is", add_bos=False)
    start = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - start
    generated: list[int] = []
    start = time.perf_counter()
    for _ in range(8):
        logits = np.asarray(llm.scores[llm.n_tokens - 1])  # [vocab]
        if not np.isfinite(logits).all() or logits.std() < 1e-3:
            raise RuntimeError(f"{path}: llama.cpp produced bad logits (std {logits.std()})")
        generated.append(int(np.argmax(logits)))
        llm.eval([generated[-1]])
    decode_s = (time.perf_counter() - start) / len(generated)
    text = llm.detokenize(generated).decode(errors="replace")
    print(f"llama.cpp: prompt {len(prompt)} tokens in {prefill_s:.2f} s; decode "
          f"{1 / decode_s:.1f} tok/s ({threads} threads); greedy {generated} {text!r}")  # fmt: skip


def build_q4_k_m(out: Path, f16_bytes: int, what: str, write_f16: Callable[[Path], None],
                 threads: int, keep_f16: bool) -> None:
    """Steps 1 and 2 of a benchmark model: the F16 GGUF (write_f16(path), unless it exists),
    then llama-quantize to Q4_K_M at `out`; skipped when `out` exists. Checks the disk first;
    partial files never take the final names."""
    f16_path = out.with_name(out.name.replace("Q4_K_M", "F16") if "Q4_K_M" in out.name
                             else out.stem + "-F16.gguf")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        print(f"{out} exists ({out.stat().st_size / GIB:.2f} GiB): skipping generation")
        return
    need = (0 if f16_path.exists() else f16_bytes) + f16_bytes // 3 + GIB
    free = shutil.disk_usage(out.parent).free
    print(f"disk: {free / GIB:.1f} GiB free in {out.parent}, need about {need / GIB:.1f} GiB")
    if free < need:
        sys.exit(f"not enough disk space in {out.parent}: free {free / GIB:.1f} GiB, "
                 f"need {need / GIB:.1f} GiB; pass --out on a larger disk")  # fmt: skip
    start = time.perf_counter()
    if not f16_path.exists():
        print(f"writing {f16_path} ({f16_bytes / GIB:.2f} GiB, {what})", flush=True)
        partial = f16_path.with_suffix(".partial")
        write_f16(partial)
        os.replace(partial, f16_path)
    f16_done = time.perf_counter()
    print(f"F16 ready in {f16_done - start:.0f} s; quantizing to Q4_K_M...", flush=True)
    partial = out.with_suffix(".partial")
    quantize(f16_path, partial, threads)
    os.replace(partial, out)
    print(f"Q4_K_M written in {time.perf_counter() - f16_done:.0f} s: {out} "
          f"({out.stat().st_size / GIB:.2f} GiB)")  # fmt: skip
    if not keep_f16:
        f16_path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=BenchModelSpec.n_layers)
    parser.add_argument("--seed", type=int, default=BenchModelSpec.seed)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--keep-f16", action="store_true", help="keep the F16 intermediate")
    args = parser.parse_args()
    spec = BenchModelSpec(n_layers=args.layers, seed=args.seed)
    build_q4_k_m(args.out, plan_bytes(tensor_plan(spec, QWEN2_VOCAB)), str(spec),
                 lambda path: write_f16_gguf(spec, path, llamacpp.vocab_file("qwen2")),
                 args.threads, args.keep_f16)
    verify(args.out, args.threads)


if __name__ == "__main__":
    main()
