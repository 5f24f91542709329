"""`numoe generate` as a user runs it: a subprocess, text on stdout, timings on stderr."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cluster.gguf import open_gguf
from cluster.tokenizer import Tokenizer
from tests.reference.tiny_models import TinyModel, reference_greedy

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPT = "The quick brown fox"
N_PREDICT = 8


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_generate_streams_greedy_text_and_timings(tiny_qwen3: TinyModel, backend: str) -> None:
    path = tiny_qwen3.gguf["f32"]
    result = run_cli("generate", str(path), "-p", PROMPT, "-n", str(N_PREDICT), "--temp", "0",
                     "-t", "1", "--backend", backend)
    assert result.returncode == 0, result.stderr

    # Expected text: transformers' greedy continuation of the same prompt ids, decoded.
    with open_gguf(path) as gguf:
        tokenizer = Tokenizer.from_gguf(gguf)
        prompt_ids = tokenizer.encode(PROMPT)
        expected_ids = reference_greedy(tiny_qwen3, prompt_ids, N_PREDICT)
        stop = [i for i, token in enumerate(expected_ids) if token in
                tokenizer.end_of_generation_ids]
        expected_ids = expected_ids[: stop[0]] if stop else expected_ids
        expected_text = tokenizer.decode(expected_ids)
    assert result.stdout == expected_text + "\n"

    assert f"/ {len(prompt_ids):5d} tokens" in result.stderr  # prompt eval line
    assert "eval time" in result.stderr and "tokens per second" in result.stderr


def test_missing_model_file_is_one_line_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    result = run_cli("generate", str(missing), "-p", "hi", "-n", "4")
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("numoe: error:") and str(missing) in lines[0]
    assert "Traceback" not in result.stderr


def test_oversized_request_is_one_line_error(tiny_qwen3: TinyModel) -> None:
    result = run_cli("generate", str(tiny_qwen3.gguf["f32"]), "-p", PROMPT, "-n", "100",
                     "-c", "32", "--backend", "numpy")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "context size (32)" in lines[0], result.stderr
