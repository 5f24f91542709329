"""`numoe serve` at the edge: flags over environment over defaults, and a real process that
prints its ready line and answers."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cluster.errors import NumoeError
from cluster.serve_cli import add_serve_parser, ready_line, serve_config
from tests.reference.tiny_models import TinyModel
from tests.server.conftest import free_port, tiny_path

REPO = Path(__file__).resolve().parents[2]
# What cluster/cli.py does with the sub-command, without the rest of the CLI.
_MAIN = ("import argparse, sys; from cluster.serve_cli import add_serve_parser; "
         "p = argparse.ArgumentParser(); add_serve_parser(p.add_subparsers()); "
         "a = p.parse_args(sys.argv[1:]); sys.exit(a.handler(a))")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_flag_beats_environment_beats_default() -> None:
    environ = {"NUMOE_PORT": "9001", "NUMOE_API_KEY": "k", "NUMOE_MAX_NUM_SEQS": "3",
               "NUMOE_MODEL": "/m.gguf"}
    config = serve_config(parse("--port", "9002"), environ)
    assert (config.port, config.api_key, config.max_num_seqs) == (9002, "k", 3)
    assert config.model_path == "/m.gguf" and config.host == "127.0.0.1"
    assert serve_config(parse(), {}).port == 8000
    with pytest.raises(NumoeError, match="NUMOE_PORT"):
        serve_config(parse(), {"NUMOE_PORT": "eighty"})
    with pytest.raises(NumoeError, match="queue-full-status"):
        serve_config(parse("--queue-full-status", "500"), {})


@pytest.mark.slow
def test_serve_process_prints_ready_line_and_answers(tiny_qwen3moe: TinyModel) -> None:
    port = free_port()
    env = {**os.environ, "NUMOE_MAX_MODEL_LEN": "128", "NUMOE_SERVED_MODEL_NAME": "tiny"}
    process = subprocess.Popen(
        [sys.executable, "-c", _MAIN, "serve", tiny_path(tiny_qwen3moe), "--port", str(port),
         "-t", "1", "--max-num-seqs", "2"], cwd=REPO, env=env, stderr=subprocess.PIPE,
        text=True)
    try:
        assert process.stderr is not None
        lines = []
        deadline = time.monotonic() + 60
        while not any("curl" in line for line in lines) and time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            lines.append(line)
        assert any(f"http://127.0.0.1:{port}/v1" in line for line in lines), lines
        assert any("curl" in line and "/v1/chat/completions" in line for line in lines)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
        assert models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == 128
    finally:
        process.send_signal(signal.SIGINT)  # uvicorn shuts down, then re-raises the signal
        process.wait(timeout=30)


def test_chat_template_file_is_read_at_the_edge(tmp_path: Path) -> None:
    template = tmp_path / "chat.jinja"
    template.write_text("{{ messages[0].content }}", encoding="utf-8")
    assert serve_config(parse("--chat-template", str(template)), {}).chat_template == \
        "{{ messages[0].content }}"
    with pytest.raises(NumoeError, match="--chat-template"):
        serve_config(parse(), {"NUMOE_CHAT_TEMPLATE": str(tmp_path / "missing.jinja")})


def test_ready_line_example_fits_the_model() -> None:
    """A model without a chat template (Gemma 3 270M's GGUF) gets a completions example, whose
    body is valid JSON a completions request accepts."""
    config = serve_config(parse("--api-key", "k3y"), {})
    chat = ready_line(config, "m", has_chat_template=True)
    plain = ready_line(config, "m", has_chat_template=False)
    assert "/v1/chat/completions" in chat and "/v1/chat/" not in plain
    body = json.loads(shlex.split(plain.splitlines()[1])[-1])
    assert body == {"model": "m", "prompt": "The capital of France is", "max_tokens": 16}
    assert "Authorization: Bearer k3y" in plain
