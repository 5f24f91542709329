"""`numoe plot` and the sweep-bench readers: the Pareto frontier against a brute-force check,
the images' pixels, llama-sweep-bench's table and jsonl as it prints them, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from cluster.cli import main
from cluster.plot import DPI, FIGURE_SIZE_IN, QuantPoint, load_points, pareto_frontier
from cluster.sweep_results import SweepResult, SweepRow, load_sweep, parse_sweep_table

# ik_llama.cpp's llama-sweep-bench output, as quoted in a discussion thread (the community
# thread in shared/seeds/): settings line, table, then "..." where the poster cut it.
PASTED_TABLE = """\
> main: n_kv_max = 126976, n_batch = 4096, n_ubatch = 4096, flash_attn = 1, n_threads = 64
>
> |    PP |     TG |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |
> |-------|--------|--------|----------|----------|----------|----------|
> |  4096 |   1024 |      0 |   22.752 |   180.03 |   97.566 |    10.50 |
> |  4096 |   1024 |   4096 |   24.661 |   166.09 |  100.495 |    10.19 |
> |  4096 |   1024 |   8192 |   26.795 |   152.86 |  104.519 |     9.80 |
> ...
> | not | a | sweep | row |
"""
# Its --output-format jsonl line, as sweep-bench.cpp formats it (printf "%f").
JSONL_LINE = ('{{"n_kv_max": 2048, "n_batch": 2048, "n_ubatch": 512, "flash_attn": 0, '
              '"n_gpu_layers": 0, "n_threads": 8, "n_threads_batch": 8, "pp": 512, "tg": 128, '
              '"n_kv": {n_kv}, "t_pp": 1.100000, "speed_pp": 465.510000, "t_tg": 2.311000, '
              '"speed_tg": 55.380000 }}')
BLUE = (31, 119, 180)  # matplotlib's C0
ORANGE = (255, 127, 14)  # C1
FRONTIER_GREY = (64, 64, 64)  # "0.25"


def dominated_brute_force(point: QuantPoint, points: list[QuantPoint]) -> bool:
    return any(other.size_gib <= point.size_gib and other.value <= point.value and
               (other.size_gib < point.size_gib or other.value < point.value)
               for other in points)


@pytest.mark.parametrize("seed", range(20))
def test_frontier_is_exactly_the_undominated_points(seed: int) -> None:
    rng = np.random.default_rng(seed)
    count = int(rng.integers(1, 40))
    # A coarse grid makes ties in size, in value and whole duplicates common.
    points = [QuantPoint(f"q{i}", float(rng.integers(1, 12)), float(rng.integers(1, 12)))
              for i in range(count)]
    frontier = pareto_frontier(points)
    expected = {id(p) for p in points if not dominated_brute_force(p, points)}
    assert {id(p) for p in frontier} == expected
    sizes = [p.size_gib for p in frontier]
    assert sizes == sorted(sizes)


def pixels(path: Path) -> np.ndarray:
    rgba = mpimg.imread(path)  # float [height, width, 4] in 0..1
    return np.round(rgba[..., :3] * 255).astype(np.int32)  # [height, width, 3]


def near(rgb: np.ndarray, colour: tuple[int, int, int], tolerance: int = 6) -> int:
    return int(np.sum(np.all(np.abs(rgb - np.array(colour)) <= tolerance, axis=-1)))


def assert_real_chart(path: Path) -> np.ndarray:
    assert path.stat().st_size > 10_000
    rgb = pixels(path)
    assert rgb.shape == (FIGURE_SIZE_IN[1] * DPI, FIGURE_SIZE_IN[0] * DPI, 3)
    non_white = np.mean(np.any(rgb < 250, axis=-1))
    assert 0.02 < non_white < 0.5, non_white  # drawn on, but not a filled blot
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 50  # text, lines, antialiasing
    return rgb


def write_points(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "points.json"
    path.write_text(json.dumps(data))
    return path


COMMUNITY_POINTS = {
    "title": "Test model quantization", "subtitle": "Lower perplexity = Better performance",
    "data": [
        {"name": "IQ1_S", "bpw": 1.745, "ppl": 5.4829, "size": 134.45},
        {"name": "IQ2_KS", "bpw": 2.472, "ppl": "4.0280 +/- 0.02", "size": 190.56},
        {"name": "worse", "bpw": 3.0, "ppl": 4.3, "size": 230, "kld": 0.2},
        {"name": "IQ3_KS", "bpw": 3.545, "ppl": 3.5174, "size": 276.89, "kld": 0.1},
        {"name": "Q8_0", "bpw": 8.504, "ppl": 3.3929, "size": 660.30, "skip": True},
    ]}


def test_community_points_load_with_errors_and_skips(tmp_path: Path) -> None:
    points, title = load_points(write_points(tmp_path, COMMUNITY_POINTS))
    assert [p.name for p in points] == ["IQ1_S", "IQ2_KS", "worse", "IQ3_KS"]
    assert points[1].value == 4.028 and points[1].error == 0.02
    assert title.startswith("Test model quantization")
    assert [p.name for p in pareto_frontier(points)] == ["IQ1_S", "IQ2_KS", "IQ3_KS"]


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_pareto_chart_is_drawn(tmp_path: Path, suffix: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / f"pareto{suffix}"
    assert main(["plot", "pareto", str(write_points(tmp_path, COMMUNITY_POINTS)),
                 "-o", str(output)]) == 0
    assert "4 points, 3 on the frontier" in capsys.readouterr().out
    if suffix == ".svg":
        text = output.read_text()
        assert "<svg" in text and text.count("<path") > 20
        return
    rgb = assert_real_chart(output)
    assert near(rgb, BLUE) > 100  # the filled frontier markers
    assert near(rgb, FRONTIER_GREY, 3) > 100  # the frontier line


def test_pareto_kld_needs_kld_on_every_point(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    points = write_points(tmp_path, COMMUNITY_POINTS)
    assert main(["plot", "pareto", str(points), "--y", "kld", "-o",
                 str(tmp_path / "k.png")]) == 1
    assert "missing kld" in capsys.readouterr().err
    with_kld = [p for p in COMMUNITY_POINTS["data"] if "kld" in p]  # type: ignore[union-attr]
    assert main(["plot", "pareto", str(write_points(tmp_path, with_kld)), "--y", "kld",
                 "-o", str(tmp_path / "k.png")]) == 0
    assert_real_chart(tmp_path / "k.png")


def test_pasted_sweep_bench_table_parses() -> None:
    rows = parse_sweep_table(PASTED_TABLE)
    assert [row.n_kv for row in rows] == [0, 4096, 8192]
    assert rows[1] == SweepRow(pp=4096, tg=1024, n_kv=4096, t_pp=24.661, speed_pp=166.09,
                               t_tg=100.495, speed_tg=10.19)


def test_sweep_files_of_each_kind_load(tmp_path: Path) -> None:
    pasted = tmp_path / "ik_llama.txt"
    pasted.write_text(PASTED_TABLE)
    result = load_sweep(pasted)
    assert (result.engine, result.label, result.n_ubatch, result.n_threads) == \
        ("llama.cpp", "ik_llama", 4096, 64)
    jsonl = tmp_path / "ik.jsonl"
    jsonl.write_text("llama log line\n" + "\n".join(JSONL_LINE.format(n_kv=k)
                                                    for k in (0, 512, 1024)) + "\n")
    from_jsonl = load_sweep(jsonl)
    assert [row.n_kv for row in from_jsonl.rows] == [0, 512, 1024]
    assert from_jsonl.rows[0].speed_tg == 55.38 and from_jsonl.n_kv_max == 2048
    ours = tmp_path / "numoe.json"
    original = SweepResult(engine="numoe", model="m.gguf", model_size_bytes=123, n_kv_max=64,
                           rows=[SweepRow(16, 4, 0, 0.5, 32.0, 0.25, 16.0)])
    ours.write_text(original.to_json())
    assert load_sweep(ours) == original


def test_sweep_chart_puts_two_engines_side_by_side(tmp_path: Path) -> None:
    pasted = tmp_path / "ik_llama.txt"
    pasted.write_text(PASTED_TABLE)
    ours = tmp_path / "numoe.json"
    ours.write_text(SweepResult(engine="numoe", rows=[
        SweepRow(4096, 1024, n_kv, 20.0, 200.0 - n_kv / 100, 90.0, 11.0 - n_kv / 4096)
        for n_kv in (0, 4096, 8192)]).to_json())
    output = tmp_path / "sweep.png"
    assert main(["plot", "sweep", str(ours), str(pasted), "-o", str(output)]) == 0
    rgb = assert_real_chart(output)
    assert near(rgb, BLUE) > 50 and near(rgb, ORANGE) > 50  # one colour per series


def lone_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("numoe: error:"), err
    return err[0]


@pytest.mark.parametrize(("data", "words"), [
    ([], "the list of points is empty"),
    ({"data": [{"name": "x", "ppl": 5.0}]}, "missing size"),
    ([{"name": "x", "size": 1.0, "ppl": "five"}], "'five' is not a number"),
    ({"title": "no data"}, "give a JSON list of points"),
    ([{"name": "x", "size": 0, "ppl": 5.0}], "must be a positive number of GiB"),
])
def test_bad_points_are_one_line_errors(tmp_path: Path, data: object, words: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plot", "pareto", str(write_points(tmp_path, data)), "-o",
                 str(tmp_path / "out.png")]) == 1
    assert words in lone_error(capsys)
    assert not (tmp_path / "out.png").exists()


def test_unreadable_inputs_and_bad_outputs_are_one_line_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    points = write_points(tmp_path, COMMUNITY_POINTS)
    assert main(["plot", "pareto", str(points), "-o", str(tmp_path / "out.jpg")]) == 1
    assert "unknown image format '.jpg'" in lone_error(capsys)
    assert main(["plot", "pareto", str(tmp_path / "missing.json"), "-o", "x.png"]) == 1
    assert "cannot read" in lone_error(capsys)
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    assert main(["plot", "pareto", str(broken), "-o", str(tmp_path / "x.png")]) == 1
    assert "not valid JSON" in lone_error(capsys)
    assert main(["plot", "sweep", str(tmp_path), "-o", str(tmp_path / "x.png")]) == 1
    assert "cannot read sweep file" in lone_error(capsys)
    assert main(["plot", "sweep", str(points), "-o", str(tmp_path / "x.png")]) == 1
    assert "no sweep-bench rows found" in lone_error(capsys)
    partial = tmp_path / "partial.jsonl"
    partial.write_text('{"n_kv": 0, "pp": 512}\n')
    assert main(["plot", "sweep", str(partial), "-o", str(tmp_path / "x.png")]) == 1
    assert "the sweep row lacks tg, t_pp" in lone_error(capsys)
    empty = tmp_path / "empty.txt"
    empty.write_text("no table here\n")
    assert main(["plot", "sweep", str(empty), "-o", str(tmp_path / "x.png")]) == 1
    assert "no sweep-bench rows found" in lone_error(capsys)
    assert main(["plot", "pareto", str(points), "-o",
                 str(tmp_path / "no-such-dir" / "x.png")]) == 1
    assert "cannot write" in lone_error(capsys)
