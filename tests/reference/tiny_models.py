"""Tiny random-weight Hugging Face models, converted to GGUF by llama.cpp's own converter.

They are the independent reference for numoe's forward pass: transformers (CPU torch, eager
attention) gives the expected logits, and llama.cpp's `convert_hf_to_gguf.py` writes the GGUF
files that numoe loads, so neither the weights layout nor the metadata comes from numoe.

Shapes follow the official configs scaled down (Qwen3-30B-A3B for `qwen3moe`, Qwen3-0.6B for
`qwen3`), keeping the features that matter: q-projection width != hidden size, grouped-query
attention, q/k RMS norms, normalised top-k routing, untied vs tied output embedding.
The vocabulary is the real Qwen2 one (151936 ids) from llama.cpp's `ggml-vocab-qwen2.gguf`, so
hidden sizes stay small to keep the F32 files under ~100 MB.

Builds are cached under ~/.cache/numoe/test-models/<name>-<hash>/; the hash covers the config,
seed, weight recipe, BUILD_VERSION and the llama.cpp version, so a change to any rebuilds.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from tests.reference import llamacpp

# Bump when the build recipe below changes in a way the hash cannot see.
BUILD_VERSION = 2
CACHE_ROOT = Path.home() / ".cache" / "numoe" / "test-models"
GGUF_TYPES = ("f32", "f16", "q8_0")

# Random weights at the default init (std 0.02) give nearly flat logits, so greedy tokens would
# flip on rounding noise. Scaling every non-norm weight makes the top logit stand clear.
WEIGHT_SCALE = 3.0
# Norm weights default to exactly 1.0, which would hide a kernel that ignores them (or adds 1 to
# them, as Gemma does): draw them around 1 instead.
NORM_WEIGHT_SPREAD = 0.2

QWEN2_BOS_ID = 151643  # <|endoftext|>
QWEN2_EOS_ID = 151645  # <|im_end|>

# Scaled-down Qwen3-30B-A3B: q width (4 x 32) is twice the hidden size, as in the real model
# (32 x 128 vs 2048); 2 KV heads so attention can be split two ways by KV-head group.
QWEN3MOE_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 64,
    "intermediate_size": 192,  # unused: every layer is sparse, as in Qwen3-30B-A3B
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "hidden_act": "silu",
    "use_sliding_window": False,
    "sliding_window": None,
}

# Scaled-down Qwen3-0.6B: tied embeddings, q width (4 x 64) twice the hidden size.
QWEN3_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "intermediate_size": 384,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "hidden_act": "silu",
    "use_sliding_window": False,
    "sliding_window": None,
}


@dataclass(frozen=True)
class TinySpec:
    name: str
    model_class: str  # transformers class name
    config_class: str
    config: dict[str, Any]
    seed: int
    # Model-specific weights recipe run after the generic one, (model, generator) -> None: e.g.
    # DeepSeek's router bias is a buffer that starts at zero, so the generic scaling skips it.
    # Its qualified name enters the cache hash.
    adjust_weights: Callable[[Any, Any], None] | None = None


SPECS: dict[str, TinySpec] = {
    "qwen3moe": TinySpec("qwen3moe", "Qwen3MoeForCausalLM", "Qwen3MoeConfig", QWEN3MOE_CONFIG, 7),
    "qwen3": TinySpec("qwen3", "Qwen3ForCausalLM", "Qwen3Config", QWEN3_CONFIG, 11),
}


@dataclass(frozen=True)
class TinyModel:
    name: str  # "qwen3moe" | "qwen3"
    hf_dir: Path  # saved HF model + tokenizer; load with transformers for reference logits
    gguf: dict[str, Path]  # {"f32": ..., "f16": ..., "q8_0": ...}


def tiny_model(name: str) -> TinyModel:
    """The tiny model `name`, built on first use (about a minute) and reused from the cache."""
    if name not in SPECS:
        raise ValueError(f"unknown tiny model {name!r}; known: {sorted(SPECS)}")
    return cached_model(SPECS[name])


def cached_model(spec: TinySpec) -> TinyModel:
    """The tiny model `spec` describes, built on first use and reused from the cache."""
    name = spec.name
    final_dir = CACHE_ROOT / f"{name}-{_spec_hash(spec)}"
    if not _is_complete(final_dir):
        CACHE_ROOT.mkdir(parents=True, exist_ok=True)
        # One builder at a time across processes; the others wait, then find it complete.
        with open(CACHE_ROOT / f".{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not _is_complete(final_dir):
                _build(spec, final_dir)
    return _model_in(name, final_dir)


def _spec_hash(spec: TinySpec) -> str:
    recipe = {
        "spec": [spec.model_class, spec.config_class, spec.config, spec.seed],
        "weights": [WEIGHT_SCALE, NORM_WEIGHT_SPREAD],
        "types": GGUF_TYPES,
        "build_version": BUILD_VERSION,
        "llamacpp": llamacpp.VERSION,
    }
    if spec.adjust_weights is not None:  # only when set, so the older models keep their hash
        recipe["adjust_weights"] = spec.adjust_weights.__qualname__
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def _model_in(name: str, directory: Path) -> TinyModel:
    gguf = {kind: directory / f"{name}-{kind}.gguf" for kind in GGUF_TYPES}
    return TinyModel(name=name, hf_dir=directory / "hf", gguf=gguf)


def _is_complete(directory: Path) -> bool:
    # The directory only appears by an atomic rename after every file was written.
    return (directory / "COMPLETE").exists()


def _build(spec: TinySpec, final_dir: Path) -> None:
    """Write into a temporary sibling directory, then rename: a crash leaves no half cache."""
    work = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=final_dir.parent))
    try:
        hf_dir = work / "hf"
        _save_hf_model(spec, hf_dir)
        model = _model_in(spec.name, work)
        for kind, path in model.gguf.items():
            _convert(hf_dir, kind, path, model_name=f"tiny-{spec.name}")
        (work / "COMPLETE").write_text(json.dumps({"spec": spec.name}))
        work.chmod(0o755)  # mkdtemp makes it private
        if final_dir.exists():  # stale, incomplete leftover from an older layout
            shutil.rmtree(final_dir)
        os.rename(work, final_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _save_hf_model(spec: TinySpec, hf_dir: Path) -> None:
    import torch  # noqa: PLC0415 — heavy; only needed while building
    import transformers  # noqa: PLC0415

    tokenizer = qwen2_tokenizer()
    config_class = getattr(transformers, spec.config_class)
    config = config_class(
        vocab_size=len(tokenizer),
        bos_token_id=QWEN2_BOS_ID,
        eos_token_id=QWEN2_EOS_ID,
        **spec.config,
    )
    torch.manual_seed(spec.seed)
    model = getattr(transformers, spec.model_class)(config).to(torch.float32).eval()
    generator = torch.Generator().manual_seed(spec.seed + 1)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "norm" in name:
                spread = torch.rand(param.shape, generator=generator) * 2 - 1
                param.copy_(1.0 + NORM_WEIGHT_SPREAD * spread)
            else:
                param.mul_(WEIGHT_SCALE)
        if spec.adjust_weights is not None:
            spec.adjust_weights(model, generator)
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)


@cache
def qwen2_tokenizer() -> Any:
    """The Qwen2 tokenizer from the vocab GGUF that ships with llama.cpp (offline, ~15 s)."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    models_dir = llamacpp.source_dir() / "models"
    return AutoTokenizer.from_pretrained(models_dir, gguf_file="ggml-vocab-qwen2.gguf")


@cache
def _hf_tokenizer(hf_dir: Path) -> Any:
    from transformers import AutoTokenizer  # noqa: PLC0415

    return AutoTokenizer.from_pretrained(hf_dir)


def tokenizer(model: TinyModel) -> Any:
    """The model's tokenizer as saved beside it (fast: tokenizer.json, not the vocab GGUF)."""
    return _hf_tokenizer(model.hf_dir)


def _convert(hf_dir: Path, outtype: str, outfile: Path, model_name: str) -> None:
    source = llamacpp.source_dir()
    # The converter must use the gguf-py it ships with, not whichever version pip installed.
    env = {**os.environ, "PYTHONPATH": str(source / "gguf-py")}
    command = [
        sys.executable, str(source / "convert_hf_to_gguf.py"), str(hf_dir),
        "--outtype", outtype, "--outfile", str(outfile), "--model-name", model_name,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"convert_hf_to_gguf.py failed for {hf_dir} ({outtype}):\n{result.stderr[-4000:]}"
        )


@cache
def _load_hf(hf_dir: Path) -> Any:
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    # Eager attention and the eager per-expert loop: the plainest code paths (grouped_mm has no
    # float64 kernel), in float64 so the reference's own rounding is negligible.
    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float64, attn_implementation="eager", experts_implementation="eager"
    )
    return model.eval()


def reference_logits(model: TinyModel, token_ids: list[int]) -> np.ndarray:
    """transformers' logits for every position: [T, vocab] float64 (the model runs in float64)."""
    import torch  # noqa: PLC0415

    hf = _load_hf(model.hf_dir)
    with torch.no_grad():
        out = hf(torch.tensor([token_ids], dtype=torch.long), use_cache=False)
    return out.logits[0].numpy()  # [T, vocab]


def reference_greedy(model: TinyModel, prompt_ids: list[int], n_new: int) -> list[int]:
    """transformers' greedy continuation: exactly n_new ids (end-of-text does not stop it)."""
    import torch  # noqa: PLC0415
    from transformers import GenerationConfig  # noqa: PLC0415

    hf = _load_hf(model.hf_dir)
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=n_new,
        min_new_tokens=n_new,
        eos_token_id=None,
        pad_token_id=QWEN2_BOS_ID,
    )
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt_ids], dtype=torch.long), generation_config=config)
    return out[0, len(prompt_ids) :].tolist()
