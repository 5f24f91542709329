"""llama.cpp, the independent end-to-end reference, built from the llama-cpp-python sdist.

`bench/build_llamacpp.sh` builds it once into a cache directory; this module finds the tools and
loads the ctypes bindings from the same source package, so bindings and library always match.
Tests and benchmarks share it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSION = os.environ.get("NUMOE_LLAMACPP_VERSION", "0.3.36")


def llamacpp_dir() -> Path:
    default = Path.home() / ".cache" / "numoe" / f"llama-cpp-python-{VERSION}"
    return Path(os.environ.get("NUMOE_LLAMACPP_DIR", default))


@cache
def ensure_built() -> Path:
    """Build llama.cpp if the cache lacks it (a few minutes, once); return its directory."""
    root = llamacpp_dir()
    if not (root / ".built").exists():
        subprocess.run(["bash", str(REPO_ROOT / "bench" / "build_llamacpp.sh")], check=True)
    return root


def tool(name: str) -> Path:
    """Path of a llama.cpp executable, e.g. tool('llama-quantize')."""
    path = ensure_built() / "build" / "bin" / name
    if not path.exists():  # a cache built before this tool joined the script's targets
        subprocess.run(["bash", str(REPO_ROOT / "bench" / "build_llamacpp.sh")], check=True)
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: delete {llamacpp_dir()} and rebuild")
    return path


def source_dir() -> Path:
    """vendor/llama.cpp inside the sdist: convert_hf_to_gguf.py, gguf-py, models/ggml-vocab-*."""
    return ensure_built() / "src" / "vendor" / "llama.cpp"


def vocab_file(name: str) -> Path:
    """A vocab-only GGUF shipped with llama.cpp, e.g. vocab_file('qwen2')."""
    return source_dir() / "models" / f"ggml-vocab-{name}.gguf"


@cache
def bindings() -> ModuleType:
    """The llama_cpp ctypes package from the same sdist, bound to the library built above."""
    root = ensure_built()
    os.environ["LLAMA_CPP_LIB_PATH"] = str(root / "build" / "bin")
    sys.path.insert(0, str(root / "src"))
    import llama_cpp  # noqa: PLC0415 — importable only once the path above is set

    return llama_cpp


def load_model(path: str | os.PathLike, n_ctx: int = 128) -> Any:
    """A llama_cpp.Llama with every position's logits and an F32 KV cache (the default F16
    cache alone moves small models' logits by ~5e-4 relative)."""
    llama_cpp = bindings()
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                           verbose=False)


def logits(path: str | os.PathLike, token_ids: list[int]) -> np.ndarray:
    """llama.cpp's logits for every position of a plain token-id prompt: [T, vocab] float64."""
    llm = load_model(path)
    llm.eval(token_ids)
    return np.array(llm.scores[: len(token_ids)], dtype=np.float64)


def greedy(path: str | os.PathLike, prompt_ids: list[int], n_new: int) -> list[int]:
    """llama.cpp's greedy continuation of a plain token-id prompt (no template, no BOS added)."""
    llm = load_model(path)
    llm.eval(prompt_ids)
    new_ids: list[int] = []
    for _ in range(n_new):
        next_id = int(np.argmax(llm.scores[llm.n_tokens - 1]))  # ties -> lowest id
        new_ids.append(next_id)
        llm.eval([next_id])
    return new_ids
