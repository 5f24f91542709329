"""A server in a subprocess (numoe serve, llama-server, Prometheus): up once a URL answers 200,
stopped when the block ends. Shared by the server tests and bench/serve_throughput.py.

Output goes to a log file, not a pipe: nobody drains a pipe, and a full one stalls the server.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

LOG_TAIL_CHARS = 4000


class ServerProcessError(RuntimeError):
    """The server exited, or did not answer in time; the message ends with its log's tail."""


def _tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]


@contextmanager
def server_process(command: Sequence[str], ready_url: str, log_path: Path, name: str,
                   timeout_s: float, cwd: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    with open(log_path, "wb") as log:
        process = subprocess.Popen(list(command), cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise ServerProcessError(f"{name} exited with {process.returncode}:\n"
                                         f"{_tail(log_path)}")
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise ServerProcessError(f"{name} did not become ready in {timeout_s:.0f} s:\n"
                                         f"{_tail(log_path)}")
            time.sleep(0.2)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
