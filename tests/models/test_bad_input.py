"""Bad model files and requests fail with a NumoeError that names the problem and the fix.

The files are written with gguf-py's GGUFWriter: a minimal qwen3 model, then one defect each.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

from cluster.engine import Engine
from cluster.errors import (
    NumoeError,
    TensorShapeError,
    UnsupportedArchitectureError,
    UnsupportedQuantTypeError,
)
from cluster.gguf import open_gguf
from cluster.model import load_model_spec
from tests.reference.tiny_models import TinyModel

N_EMBD, N_HEADS, N_KV_HEADS, HEAD_DIM, N_FF, VOCAB = 32, 2, 1, 32, 64, 64


def qwen3_tensors(n_embd: int = N_EMBD) -> dict[str, tuple[int, ...]]:
    """Every tensor of a 1-layer qwen3 with the sizes above, numpy-order shapes."""
    p = "blk.0."
    return {
        "token_embd.weight": (VOCAB, n_embd),
        "output_norm.weight": (n_embd,),
        p + "attn_norm.weight": (n_embd,),
        p + "attn_q.weight": (N_HEADS * HEAD_DIM, n_embd),
        p + "attn_k.weight": (N_KV_HEADS * HEAD_DIM, n_embd),
        p + "attn_v.weight": (N_KV_HEADS * HEAD_DIM, n_embd),
        p + "attn_output.weight": (n_embd, N_HEADS * HEAD_DIM),
        p + "attn_q_norm.weight": (HEAD_DIM,),
        p + "attn_k_norm.weight": (HEAD_DIM,),
        p + "ffn_norm.weight": (n_embd,),
        p + "ffn_gate.weight": (N_FF, n_embd),
        p + "ffn_up.weight": (N_FF, n_embd),
        p + "ffn_down.weight": (n_embd, N_FF),
    }


def write_model(
    path: Path,
    arch: str = "qwen3",
    shapes: dict[str, tuple[int, ...]] | None = None,
    raw_types: dict[str, GGMLQuantizationType] | None = None,
    n_embd: int = N_EMBD,
) -> Path:
    """A qwen3-style GGUF; `shapes` overrides the tensor list, `raw_types` stores a tensor as
    zero bytes of another ggml type."""
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEADS)
    writer.add_head_count_kv(N_KV_HEADS)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10_000.0)
    rng = np.random.default_rng(0)
    for name, shape in (shapes or qwen3_tensors(n_embd)).items():
        qtype = (raw_types or {}).get(name)
        if qtype is None:
            writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
        else:
            block_size, block_bytes = GGML_QUANT_SIZES[qtype]
            rows = int(np.prod(shape[:-1]))
            raw = np.zeros((rows, shape[-1] // block_size * block_bytes), np.uint8)
            writer.add_tensor(name, raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def spec_error(path: Path) -> NumoeError:
    with open_gguf(path) as gguf, pytest.raises(NumoeError) as caught:
        load_model_spec(gguf)
    return caught.value


def test_valid_minimal_model_loads(tmp_path: Path) -> None:
    with open_gguf(write_model(tmp_path / "ok.gguf")) as gguf:
        config, tensors = load_model_spec(gguf)
    assert (config.architecture, config.n_layers, config.n_embd) == ("qwen3", 1, N_EMBD)
    assert config.tied_output and tensors["output.weight"].name == "token_embd.weight"


def test_unsupported_architecture(tmp_path: Path) -> None:
    error = spec_error(write_model(tmp_path / "mamba.gguf", arch="mamba"))
    assert isinstance(error, UnsupportedArchitectureError)
    message = str(error)
    assert "'mamba'" in message
    for supported in ("qwen3moe", "qwen3", "gemma3"):
        assert supported in message


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q2_K, GGMLQuantizationType.IQ4_XS])
def test_unsupported_quant_type(tmp_path: Path, qtype: GGMLQuantizationType) -> None:
    # A 256-wide model: rows must hold whole K-quant blocks for the file to be well formed.
    path = write_model(tmp_path / "quant.gguf", n_embd=256,
                       raw_types={"blk.0.ffn_up.weight": qtype})
    error = spec_error(path)
    assert isinstance(error, UnsupportedQuantTypeError)
    message = str(error)
    assert "blk.0.ffn_up.weight" in message
    assert qtype.name in message
    assert "Q4_K" in message and "Q8_0" in message  # the supported list
    assert "llama-quantize" in message


def test_missing_tensor(tmp_path: Path) -> None:
    shapes = qwen3_tensors()
    del shapes["blk.0.attn_k.weight"]
    error = spec_error(write_model(tmp_path / "missing.gguf", shapes=shapes))
    assert isinstance(error, TensorShapeError)
    assert "blk.0.attn_k.weight" in str(error) and "missing" in str(error)


def test_mismatched_tensor_shape(tmp_path: Path) -> None:
    shapes = qwen3_tensors() | {"blk.0.ffn_down.weight": (N_EMBD, N_FF * 2)}
    error = spec_error(write_model(tmp_path / "shape.gguf", shapes=shapes))
    assert isinstance(error, TensorShapeError)
    message = str(error)
    assert "blk.0.ffn_down.weight" in message
    assert f"[{N_EMBD}, {N_FF * 2}]" in message  # actual
    assert f"[{N_EMBD}, {N_FF}]" in message  # expected


@pytest.mark.parametrize("make_engine", [
    lambda path: Engine(path, backend="numpy", n_ctx=16),
    lambda path: Engine(path, backend="cpu", n_threads=1, n_ctx=16),
])
def test_oversized_prompt(tiny_qwen3: TinyModel,
                          make_engine: Callable[[Path], Engine]) -> None:
    with make_engine(tiny_qwen3.gguf["q8_0"]) as engine:
        prompt_ids = list(range(100, 110))  # 10 tokens
        with pytest.raises(NumoeError) as caught:
            engine.generate(prompt_ids, max_tokens=7)
        message = str(caught.value)
        assert "10 tokens" in message and "7" in message and "16" in message
        # The same prompt runs once the request fits.
        generation = engine.generate(prompt_ids, max_tokens=6)
        generation.text()
        assert 1 <= generation.stats.generated_tokens <= 6
