"""A real uvicorn server on a free loopback port, in a background thread, per test module."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn

from cluster.engine import Engine
from cluster.server import ServeConfig, ServerState, create_app, open_engine
from tests.reference.tiny_models import TinyModel


@dataclass
class RunningServer:
    base_url: str  # http://127.0.0.1:PORT
    state: ServerState

    @property
    def engine(self) -> Engine:
        assert self.state.engine is not None
        return self.state.engine

    @property
    def model_name(self) -> str:
        return self.state.model_name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_server(config: ServeConfig, load: bool = True) -> Iterator[RunningServer]:
    """Serve `config` (port chosen here) until the block ends; load=False leaves the model
    unloaded, as during a slow load."""
    port = free_port()
    config = ServeConfig(**{**config.__dict__, "port": port})
    state = ServerState(config)
    if load:
        state.attach(open_engine(config))
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", state)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        state.close()


def tiny_path(model: TinyModel) -> str:
    return str(Path(model.gguf["q8_0"]))


@pytest.fixture(scope="module")
def qwen3moe_server(tiny_qwen3moe: TinyModel) -> Iterator[RunningServer]:
    """The tiny Qwen3-MoE (it has Qwen3's chat template), 4 slots, 512-token chunks."""
    config = ServeConfig(model_path=tiny_path(tiny_qwen3moe), max_model_len=256,
                         max_num_seqs=4, threads=2)
    with running_server(config) as server:
        yield server


@pytest.fixture(scope="module")
def reference_engine(tiny_qwen3moe: TinyModel) -> Iterator[Engine]:
    """An independent single-process engine on the same file: what one request alone gives."""
    with Engine(tiny_path(tiny_qwen3moe), n_threads=2, n_ctx=256) as engine:
        yield engine
