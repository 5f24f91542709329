"""`numoe perplexity` against llama-perplexity on the same GGUF and text, and its KLD mode.

The text is a passage of the shipped corpus (cluster/corpus.py), written to a file that both
tools read. The passage is the start of Ezekiel rather than of Genesis: Gemma has all but
memorised Genesis 1 (PPL ~1.8), and there llama.cpp's own settings (flash attention on or off,
F16 or F32 KV cache) move its PPL by 2%, so no engine could be held to 0.5% of it. On Ezekiel
(PPL ~10) those settings move it by 0.3%, and numoe lands 0.2% from its default.
numoe computes in float32 without quantizing activations (its numpy float64-reference backend
gives the same figures); llama.cpp quantizes activations to 8 bits, which costs it a few tenths
of a percent of PPL.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cluster import corpus
from cluster.cli import main
from cluster.kl_divergence import LogProbHeader, LogProbWriter, read_log_probs
from tests.reference import llamacpp
from tests.reference.tiny_models import TinyModel

pytestmark = pytest.mark.slow

PASSAGE_TITLE = "The Book of the Prophet Ezekiel"
PASSAGE_CHARS = 40_000  # ~10k tokens: far more than the chunks below need
PPL_CTX, PPL_CHUNKS = 256, 4
MAX_PPL_RELATIVE_ERROR = 0.005
KLD_CTX, KLD_CHUNKS = 128, 2  # 2 * 63 = 126 scored tokens: llama.cpp's statistics need 100


@pytest.fixture(scope="module")
def passage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    text = corpus.corpus_text()
    start = text.index(PASSAGE_TITLE)
    path = tmp_path_factory.mktemp("perplexity") / "ezekiel.txt"
    path.write_text(text[start:start + PASSAGE_CHARS], encoding="utf-8")
    return path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["perplexity", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def final_estimate(output: str) -> tuple[float, float]:
    found = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", output)
    assert found, output[-2000:]
    return float(found.group(1)), float(found.group(2))


def test_corpus_ships_with_the_package() -> None:
    text = corpus.corpus_text()
    assert len(text) > 4_000_000
    assert text.startswith("The First Book of Moses, called Genesis\n\n1:1 In the beginning")
    assert PASSAGE_TITLE in text


def test_perplexity_agrees_with_llama_perplexity(gemma3_path: Path, passage: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, str(gemma3_path), "-f", str(passage), "-c", str(PPL_CTX),
                         "--chunks", str(PPL_CHUNKS), "-t", "2")
    assert code == 0, err
    running = re.findall(r"\[(\d+)\]([\d.]+),", out)
    assert [int(i) for i, _ in running] == list(range(1, PPL_CHUNKS + 1))
    ours, ours_unc = final_estimate(out)
    assert float(running[-1][1]) == ours

    reference = subprocess.run(
        [str(llamacpp.tool("llama-perplexity")), "-m", str(gemma3_path), "-f", str(passage),
         "-c", str(PPL_CTX), "--chunks", str(PPL_CHUNKS), "-t", "2"],
        capture_output=True, text=True, timeout=300, check=True)
    theirs, theirs_unc = final_estimate(reference.stdout + reference.stderr)
    assert abs(ours - theirs) / theirs <= MAX_PPL_RELATIVE_ERROR, (ours, theirs)
    # The same tokens are scored, so the spread (a property of the text) agrees as closely.
    assert abs(ours_unc / ours - theirs_unc / theirs) <= 0.02 * theirs_unc / theirs


@pytest.fixture(scope="module")
def q4_0_path(gemma3_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model requantised to Q4_0 by llama.cpp (a genuinely different model)."""
    out = tmp_path_factory.mktemp("q4_0") / "gemma-3-270m-q4_0.gguf"
    subprocess.run([str(llamacpp.tool("llama-quantize")), "--allow-requantize",
                    str(gemma3_path), str(out), "Q4_0", "2"],
                   capture_output=True, text=True, timeout=300, check=True)
    return out


@pytest.fixture(scope="module")
def base_run(gemma3_path: Path, passage: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma's own log-probabilities over KLD_CHUNKS chunks, saved as a KLD base."""
    path = tmp_path_factory.mktemp("kld") / "gemma.lp"
    code = main(["perplexity", str(gemma3_path), "-f", str(passage), "-c", str(KLD_CTX),
                 "--chunks", str(KLD_CHUNKS), "-t", "2", "--save-logits", str(path)])
    assert code == 0
    return path


def kld_report(capsys: pytest.CaptureFixture[str], model: Path, base: Path) -> tuple[dict, str]:
    code, out, err = run(capsys, str(model), "--kl-divergence-base", str(base),
                         "--kl-divergence", "-t", "2", "--json")
    assert code == 0, err
    return json.loads(out), err


def test_saved_base_holds_the_text_tokens(base_run: Path, passage: Path,
                                          gemma3_path: Path) -> None:
    header, tokens, log_probs = read_log_probs(base_run)
    assert (header.n_ctx, header.n_chunk, header.first) == (KLD_CTX, KLD_CHUNKS, KLD_CTX // 2)
    expected = subprocess.run(
        [str(llamacpp.tool("llama-tokenize")), "-m", str(gemma3_path), "-f", str(passage),
         "--ids", "--log-disable"], capture_output=True, text=True, timeout=120, check=True)
    ids = [int(t) for t in re.findall(r"\d+", expected.stdout.strip().splitlines()[-1])]
    assert tokens.ravel().tolist() == ids[:KLD_CTX * KLD_CHUNKS]
    probabilities = np.exp(log_probs[0].astype(np.float64)).sum(axis=1)  # [scored]
    np.testing.assert_allclose(probabilities, 1.0, rtol=1e-5)


def test_kld_of_the_model_against_itself_is_zero(capsys: pytest.CaptureFixture[str],
                                                 gemma3_path: Path, base_run: Path) -> None:
    report, err = kld_report(capsys, gemma3_path, base_run)
    kld = report["kld"]
    assert kld["count"] == KLD_CHUNKS * (KLD_CTX // 2 - 1)
    assert kld["kld_mean"] == 0.0 and kld["kld_max"] == 0.0
    assert kld["same_top"] == 1.0
    assert kld["ppl"] == kld["ppl_base"]
    assert "====== KL divergence statistics ======" in err
    assert "Same top p: 100.000" in err


def llamacpp_kld(base_model: Path, model: Path, passage: Path, work: Path) -> dict[str, float]:
    """llama-perplexity's own KLD run (its base file, its format) on the same chunks."""
    binary = str(llamacpp.tool("llama-perplexity"))
    base = work / "llamacpp-base.bin"
    common = ["-c", str(KLD_CTX), "-t", "2", "--kl-divergence-base", str(base)]
    subprocess.run([binary, "-m", str(base_model), "-f", str(passage), "--chunks",
                    str(KLD_CHUNKS), *common], capture_output=True, timeout=300, check=True)
    result = subprocess.run([binary, "-m", str(model), *common, "--kl-divergence"],
                            capture_output=True, text=True, timeout=300, check=True)
    output = result.stdout + result.stderr
    mean = re.search(r"Mean +KLD: +([\d.]+)", output)
    same_top = re.search(r"Same top p: +([\d.]+)", output)
    assert mean and same_top, output[-2000:]
    return {"kld_mean": float(mean.group(1)), "same_top": float(same_top.group(1)) / 100}


def test_kld_of_a_q4_0_requantisation_is_positive(capsys: pytest.CaptureFixture[str],
                                                  gemma3_path: Path, q4_0_path: Path,
                                                  base_run: Path, passage: Path,
                                                  tmp_path: Path) -> None:
    report, err = kld_report(capsys, q4_0_path, base_run)
    kld = report["kld"]
    assert kld["kld_mean"] > 0 and kld["kld_min"] >= -1e-6
    # llama.cpp measures the same divergence (measured: 0.427 here against its 0.442; its
    # 8-bit activations and 16-bit log-prob store add a few percent).
    reference = llamacpp_kld(gemma3_path, q4_0_path, passage, tmp_path)
    assert abs(kld["kld_mean"] - reference["kld_mean"]) <= 0.1 * reference["kld_mean"]
    assert abs(kld["same_top"] - reference["same_top"]) <= 0.03
    assert kld["kld_max"] >= kld["kld_99.9"] >= kld["kld_median"] >= kld["kld_min"]
    assert kld["same_top"] < 1.0
    assert kld["ppl"] != kld["ppl_base"]
    for label in ("Mean    KLD", "Maximum KLD", "99.9%   KLD", "Median  KLD", " 1.0%   KLD",
                  "Minimum KLD", "Same top p"):
        assert label in err


# --- bad input: one clear line, exit 1 ---------------------------------------------------


def error_line(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code, out, err = run(capsys, *args)
    assert code == 1
    lines = err.strip().splitlines()
    assert lines[-1].startswith("numoe: error:") and "Traceback" not in err
    return lines[-1]


def test_missing_text_file(capsys: pytest.CaptureFixture[str], tiny_qwen3: TinyModel,
                           tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    line = error_line(capsys, str(tiny_qwen3.gguf["f32"]), "-f", str(missing))
    assert str(missing) in line and "no such text file" in line


def test_text_too_short_names_the_tokens_needed(capsys: pytest.CaptureFixture[str],
                                                tiny_qwen3: TinyModel, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("In the beginning was the Word.", encoding="utf-8")
    line = error_line(capsys, str(tiny_qwen3.gguf["f32"]), "-f", str(short), "-c", "64")
    assert "needs at least 128" in line


@pytest.mark.parametrize("ctx", ["2", "255", "0"])
def test_bad_context_size(capsys: pytest.CaptureFixture[str], tiny_qwen3: TinyModel,
                          ctx: str) -> None:
    line = error_line(capsys, str(tiny_qwen3.gguf["f32"]), "-c", ctx)
    assert f"-c/--ctx-size {ctx}" in line


def test_kld_base_from_another_vocabulary(capsys: pytest.CaptureFixture[str],
                                          tiny_qwen3: TinyModel, gemma3_path: Path,
                                          passage: Path, tmp_path: Path) -> None:
    base = tmp_path / "qwen.lp"
    code, _, err = run(capsys, str(tiny_qwen3.gguf["f32"]), "-f", str(passage), "-c", "16",
                       "--chunks", "2", "--kl-divergence-base", str(base))  # saves, as llama.cpp
    assert code == 0, err
    line = error_line(capsys, str(gemma3_path), "--kl-divergence-base", str(base),
                      "--kl-divergence")
    assert "vocabulary" in line and "151936" in line


def test_kld_base_with_another_context(capsys: pytest.CaptureFixture[str], gemma3_path: Path,
                                       base_run: Path) -> None:
    line = error_line(capsys, str(gemma3_path), "--kl-divergence-base", str(base_run),
                      "--kl-divergence", "-c", str(2 * KLD_CTX))
    assert f"-c {KLD_CTX}" in line


def test_damaged_or_foreign_kld_base(capsys: pytest.CaptureFixture[str], gemma3_path: Path,
                                     tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.bin"
    foreign.write_bytes(b"_logits_" + bytes(64))  # llama.cpp's own format
    line = error_line(capsys, str(gemma3_path), "--kl-divergence-base", str(foreign),
                      "--kl-divergence")
    assert "not a numoe log-prob file" in line

    truncated = tmp_path / "truncated.lp"
    writer = LogProbWriter(truncated, LogProbHeader(n_ctx=8, n_vocab=10, n_chunk=1, first=4,
                                                    model="m"), np.zeros((1, 8), np.int32))
    writer.close()  # no chunk written
    line = error_line(capsys, str(gemma3_path), "--kl-divergence-base", str(truncated),
                      "--kl-divergence")
    assert "truncated" in line
