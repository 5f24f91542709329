"""`numoe bench --virtual-numa 2`: the sweep through the cluster's runner, one worker per
virtual NUMA node of the package's Ray cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.cli import main
from cluster.sweep_results import TABLE_HEADER, parse_sweep_table
from tests.cluster.conftest import RayTestCluster
from tests.reference.tiny_models import TinyModel


def test_bench_runs_on_two_workers(ray_cluster: RayTestCluster, tiny_qwen3moe: TinyModel,
                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "cluster.json"
    code = main(["bench", str(tiny_qwen3moe.gguf["f32"]), "-c", "32", "-ub", "16", "--tg", "2",
                 "-t", "1", "--virtual-numa", "2", "--json", str(out_json)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert TABLE_HEADER in captured.out
    assert [row.n_kv for row in parse_sweep_table(captured.out)] == [0, 16]
    saved = json.loads(out_json.read_text())
    assert saved["topology"].startswith("2 workers (")
    assert saved["topology"].count("/node") == 2  # from the cluster runner's own plan
    assert [row["n_kv"] for row in saved["rows"]] == [0, 16]
    assert all(row["speed_pp"] > 0 and row["speed_tg"] > 0 for row in saved["rows"])
