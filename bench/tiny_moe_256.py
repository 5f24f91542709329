"""A random-weight tiny qwen3moe whose rows are 256 wide, so K-quants apply to it.

The tiny MoE of tests/reference/tiny_models.py has hidden size 64: every weight row is shorter
than a K-quant block (256 values), so `llama-quantize` falls back to a legacy type for every
tensor (Q6_K -> Q8_0, Q5_K -> Q5_1, Q4_K -> Q5_0). This one is the same recipe (the same
builder, weights scaled the same way, Qwen2 tokenizer) with hidden size, head width x heads and
expert FFN width all multiples of 256, and only its F32 GGUF is written.

    python bench/tiny_moe_256.py        # prints the F32 GGUF's path, building it once (~1 min)
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# The builder's steps are private to the test module; reused rather than copied.
from tests.reference.tiny_models import (  # noqa: E402 — repo root on the path first
    SPECS,
    _convert,
    _save_hf_model,
)

OUT = Path.home() / ".cache" / "numoe" / "bench-models" / "tiny-qwen3moe-256-f32.gguf"
CONFIG_CHANGES = {"hidden_size": 256, "head_dim": 64, "num_attention_heads": 8,
                  "num_key_value_heads": 2, "moe_intermediate_size": 256,
                  "intermediate_size": 768}


def tiny_moe_256() -> Path:
    """The F32 GGUF, built on first use."""
    if OUT.is_file():
        return OUT
    base = SPECS["qwen3moe"]
    spec = replace(base, name="qwen3moe-256", config={**base.config, **CONFIG_CHANGES})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tiny_moe_256_"))
    try:
        _save_hf_model(spec, work / "hf")
        partial = work / OUT.name
        _convert(work / "hf", "f32", partial, model_name="tiny-qwen3moe-256")
        shutil.move(partial, OUT)  # complete files only appear under OUT's name
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return OUT


if __name__ == "__main__":
    print(tiny_moe_256())
