"""`numoe bench` as a user runs it on a tiny model: the llama-sweep-bench table, its JSON, the
JSON drawn by `numoe plot sweep`, and the exact passes the sweep asks of the runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from cluster.engine import Engine
from cluster.sweep_bench import OrdinaryTokens, Sweep
from cluster.sweep_results import TABLE_HEADER, TABLE_SEPARATOR, load_sweep, parse_sweep_table
from tests.reference.tiny_models import TinyModel

REPO_ROOT = Path(__file__).resolve().parents[2]
CTX, UBATCH = 64, 16  # 4 steps: N_KV = 0, 16, 32, 48


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def test_bench_prints_the_table_and_json_that_plots(tiny_qwen3: TinyModel,
                                                    tmp_path: Path) -> None:
    model = tiny_qwen3.gguf["f32"]
    out_json = tmp_path / "bench.json"
    result = run_cli("bench", str(model), "-c", str(CTX), "-ub", str(UBATCH), "-t", "1",
                     "--json", str(out_json))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert TABLE_HEADER in lines
    assert lines[lines.index(TABLE_HEADER) + 1] == TABLE_SEPARATOR
    rows = parse_sweep_table(result.stdout)
    assert [row.n_kv for row in rows] == [0, 16, 32, 48]
    assert all((row.pp, row.tg) == (UBATCH, UBATCH // 4) for row in rows)
    assert "step 4/4" in result.stderr  # progress on stderr, not in the table

    saved = json.loads(out_json.read_text())
    assert saved["model"] == model.name and saved["model_size_bytes"] == os.path.getsize(model)
    assert (saved["n_kv_max"], saved["n_ubatch"], saved["n_threads"]) == (CTX, UBATCH, 1)
    assert saved["topology"] == "1 process, 1 threads"
    loaded = load_sweep(out_json)
    for printed, stored in zip(rows, loaded.rows, strict=True):  # the table rounds the JSON
        assert stored.speed_pp == pytest.approx(stored.pp / stored.t_pp)
        assert stored.speed_tg == pytest.approx(stored.tg / stored.t_tg)
        assert printed.table_line() == stored.table_line()

    chart = tmp_path / "sweep.png"
    plotted = run_cli("plot", "sweep", str(out_json), "-o", str(chart), "--label", "tiny")
    assert plotted.returncode == 0, plotted.stderr
    rgb = np.round(mpimg.imread(chart)[..., :3] * 255)  # [height, width, 3]
    assert rgb.shape[:2] == (600, 1000)
    assert np.sum(np.all(np.abs(rgb - (31, 119, 180)) <= 6, axis=-1)) > 50  # the series


def test_json_to_stdout_moves_the_table_to_stderr(tiny_qwen3: TinyModel) -> None:
    result = run_cli("bench", str(tiny_qwen3.gguf["f32"]), "-c", "32", "-ub", "16", "-t", "1",
                     "--tg", "2", "--json", "-", "--no-warmup")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [row["n_kv"] for row in data["rows"]] == [0, 16]
    assert [row["tg"] for row in data["rows"]] == [2, 2]
    assert TABLE_HEADER in result.stderr


class RecordingRunner:
    """Stands in for the forward pass and records each call (token count, start)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.ids: list[int] = []

    def forward(self, token_ids: np.ndarray, start: int, logits: str = "last") -> np.ndarray:
        assert logits == "last"
        self.calls.append((len(token_ids), start))
        self.ids.extend(int(i) for i in token_ids)
        return np.zeros((1, 8), np.float32)


def test_sweep_makes_llama_sweep_bench_passes_with_ordinary_tokens(
        tiny_qwen3: TinyModel) -> None:
    with Engine(tiny_qwen3.gguf["f32"], backend="numpy", n_ctx=CTX) as engine:
        runner = RecordingRunner()
        sweep = Sweep(runner, OrdinaryTokens(engine, seed=0), CTX, pp=16, tg=3, n_batch=6)
        rows = list(sweep.rows(lambda text: None))
        expected: list[tuple[int, int]] = []
        for n_kv in (0, 16, 32, 48):
            expected += [(1, n_kv + step) for step in range(3)]  # decode at the depth
            expected += [(6, n_kv), (6, n_kv + 6), (4, n_kv + 12)]  # the prompt, -b 6 chunks
        assert runner.calls == expected
        assert [row.n_kv for row in rows] == [0, 16, 32, 48]
        tokenizer = engine.tokenizer
        assert not any(tokenizer.is_special(i) for i in runner.ids)
        assert len(set(runner.ids)) > len(runner.ids) // 2  # random, not one id repeated


@pytest.mark.parametrize(("flags", "words"), [
    (("-c", "8", "-ub", "16"), "the context (8 tokens) is smaller than one step"),
    (("-c", "0"), "-c/--ctx-size 0 must be a positive number"),
    (("--tg", "0"), "-n/--tg 0 must be a positive number"),
    (("--json", "/no/such/dir/x.json", "-c", "16", "-ub", "16", "--tg", "1"),
     "cannot write --json /no/such/dir/x.json"),
])
def test_bad_bench_flags_are_one_line_errors(tiny_qwen3: TinyModel, flags: tuple[str, ...],
                                             words: str) -> None:
    result = run_cli("bench", str(tiny_qwen3.gguf["f32"]), "-t", "1", *flags)
    assert result.returncode == 1
    lines = [line for line in result.stderr.strip().splitlines()
             if not line.startswith("numoe: step")]
    assert len(lines) == 1 and lines[0].startswith("numoe: error:"), result.stderr
    assert words in lines[0]
