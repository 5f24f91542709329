"""`numoe serve`: flags and environment variables, read once here, into a frozen ServeConfig.

    numoe serve [MODEL.gguf] [--host 127.0.0.1] [--port 8000] [--api-key KEY] ...
    numoe serve [MODEL.gguf] --workers N | --virtual-numa N | --topology FILE [--ray-address A]

A flag beats its environment variable, which beats the default. With a cluster flag the model
runs on one worker per NUMA node (Ray actors), each keeping --max-num-seqs KV-cache slots.
The server starts answering at once (/ready is 503 while the model loads); a ready line with
a curl example follows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.cluster_cli import (
    ClusterOptions,
    add_cluster_arguments,
    cluster_options_from_args,
)
from cluster.errors import NumoeError

if TYPE_CHECKING:  # the HTTP stack loads only when `serve` runs, not for every numoe command
    from cluster.server import ServeConfig


@dataclass(frozen=True)
class _Option:
    flags: tuple[str, ...]
    dest: str
    env: str
    kind: Callable[[str], Any]
    default: Any
    help: str


_OPTIONS = (
    _Option(("--host",), "host", "NUMOE_HOST", str, "127.0.0.1",
            "address to listen on; 0.0.0.0 exposes the server to the network"),
    _Option(("--port",), "port", "NUMOE_PORT", int, 8000, "TCP port"),
    _Option(("--api-key",), "api_key", "NUMOE_API_KEY", str, None,
            "require 'Authorization: Bearer KEY' on the API endpoints"),
    _Option(("--max-model-len",), "max_model_len", "NUMOE_MAX_MODEL_LEN", int, None,
            "context tokens per sequence (default: min(4096, the model's))"),
    _Option(("--max-num-seqs",), "max_num_seqs", "NUMOE_MAX_NUM_SEQS", int, 8,
            "sequences in the running batch (KV-cache slots)"),
    _Option(("--max-num-batched-tokens",), "max_num_batched_tokens",
            "NUMOE_MAX_NUM_BATCHED_TOKENS", int, 512, "prompt tokens per prefill chunk"),
    _Option(("--max-queued-requests",), "max_queued_requests", "NUMOE_MAX_QUEUED_REQUESTS",
            int, 64, "requests waiting for a slot before new ones are refused"),
    _Option(("--served-model-name",), "served_model_name", "NUMOE_SERVED_MODEL_NAME", str,
            None, "the model name clients send (default: the GGUF file name without .gguf)"),
    _Option(("-t", "--threads"), "threads", "NUMOE_THREADS", int, None,
            "compute threads (default: the CPUs this process may use)"),
    _Option(("--queue-full-status",), "queue_full_status", "NUMOE_QUEUE_FULL_STATUS", int, 503,
            "HTTP status when the queue is full: 503 or 429"),
)
# The cluster flags (cluster_cli's, shared with `generate`) and their environment variables.
_CLUSTER_ENV = {"workers": ("NUMOE_WORKERS", int), "topology_file": ("NUMOE_TOPOLOGY", str),
                "virtual_numa": ("NUMOE_VIRTUAL_NUMA", int),
                "ray_address": ("NUMOE_RAY_ADDRESS", str)}


def add_serve_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the `serve` sub-command to an argparse sub-parsers object."""
    serve = commands.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="OpenAI-compatible server (/v1/completions, /v1/chat/completions, "
                    "/v1/models, /metrics, ...) with continuous batching. Each flag has an "
                    "environment variable, named in its help; the flag wins.")
    serve.add_argument("model", nargs="?", default=None,
                       help="GGUF model file (default: $NUMOE_MODEL, else the embedded "
                            "Gemma 3 270M Q4_K_M)")
    for option in _OPTIONS:
        default = "none" if option.default is None else option.default
        serve.add_argument(*option.flags, dest=option.dest, type=option.kind, default=None,
                           help=f"{option.help} (env {option.env}; default: {default})")
    serve.add_argument("--chat-template", default=None, metavar="FILE",
                       help="Jinja chat template file replacing the model's (env "
                            "NUMOE_CHAT_TEMPLATE; default: the GGUF's tokenizer.chat_template)")
    add_cluster_arguments(serve)
    serve.epilog = ("cluster flags from the environment: " + ", ".join(
        f"{env} (--{dest.replace('_file', '').replace('_', '-')})"
        for dest, (env, _) in _CLUSTER_ENV.items()))
    serve.set_defaults(handler=run_serve)
    return serve


def serve_config(args: argparse.Namespace, environ: Mapping[str, str]) -> ServeConfig:
    """Flags over environment over defaults, checked."""
    from cluster.server import ServeConfig  # noqa: PLC0415
    values: dict[str, Any] = {}
    for option in _OPTIONS:
        value = getattr(args, option.dest)
        if value is None and environ.get(option.env):
            try:
                value = option.kind(environ[option.env])
            except ValueError:
                raise NumoeError(f"{option.env}={environ[option.env]!r} is not a valid "
                                 f"{option.kind.__name__}") from None
        values[option.dest] = option.default if value is None else value
    for name in ("max_num_seqs", "max_num_batched_tokens"):
        if values[name] < 1:
            raise NumoeError(f"--{name.replace('_', '-')} must be at least 1")
    if values["max_queued_requests"] < 0:
        raise NumoeError("--max-queued-requests must be >= 0")
    if values["queue_full_status"] not in (429, 503):
        raise NumoeError("--queue-full-status must be 503 or 429")
    model = args.model or environ.get("NUMOE_MODEL") or None
    template_file = args.chat_template or environ.get("NUMOE_CHAT_TEMPLATE") or None
    template = None
    if template_file is not None:
        try:
            template = Path(template_file).read_text(encoding="utf-8")
        except OSError as error:
            raise NumoeError(f"cannot read the chat template {template_file}: "
                             f"{error.strerror}; check the --chat-template path") from None
    cluster = _cluster_options(args, environ)
    if cluster is not None:  # -t/--threads (flag or env) is each worker's thread count
        cluster = dataclasses.replace(cluster, threads_per_worker=values["threads"])
    return ServeConfig(model_path=model, chat_template=template, cluster=cluster, **values)


def _cluster_options(args: argparse.Namespace, environ: Mapping[str, str]) -> ClusterOptions | None:
    """The cluster flags, each missing one taken from its environment variable."""
    filled = argparse.Namespace(**vars(args))
    for dest, (env, kind) in _CLUSTER_ENV.items():
        if getattr(filled, dest, None) is None and environ.get(env):
            try:
                setattr(filled, dest, kind(environ[env]))
            except ValueError:
                raise NumoeError(f"{env}={environ[env]!r} is not a valid "
                                 f"{kind.__name__}") from None
    filled.threads = None  # checked with the other serve options; set by the caller
    return cluster_options_from_args(filled)


def ready_line(config: ServeConfig, model_name: str, has_chat_template: bool = True) -> str:
    """The ready line with a curl example that works for this model: chat when it has a chat
    template, a plain completion otherwise (Gemma 3 270M's GGUF ships none)."""
    base = f"http://{config.host}:{config.port}"
    auth = f" -H {shlex.quote('Authorization: Bearer ' + config.api_key)}" \
        if config.api_key else ""
    if has_chat_template:
        path, request = "chat/completions", {
            "model": model_name, "messages": [{"role": "user", "content": "Hello"}]}
    else:
        path, request = "completions", {
            "model": model_name, "prompt": "The capital of France is", "max_tokens": 16}
    body = shlex.quote(json.dumps(request))
    return (f"numoe: ready: serving {model_name} at {base}/v1\n"
            f"  curl {base}/v1/{path} -H 'Content-Type: application/json'{auth} -d {body}")


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn  # noqa: PLC0415 — only `serve` needs the HTTP stack

    from cluster.server import ServerState, create_app  # noqa: PLC0415

    config = serve_config(args, os.environ)
    state = ServerState(config)
    app = create_app(state)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port,
                                           log_level="warning"))

    def load() -> None:
        print(f"numoe: loading {config.model_path or 'the embedded default model'} ...",
              file=sys.stderr, flush=True)
        try:
            state.load()
        except NumoeError as error:
            print(f"numoe: error: {error}", file=sys.stderr, flush=True)
            server.should_exit = True
            return
        engine = state.engine
        assert engine is not None
        print(f"numoe: loaded {engine.config.architecture} in {engine.load_seconds:.1f} s "
              f"({config.max_num_seqs} slots, context {engine.n_ctx})", file=sys.stderr)
        template = state.chat_template
        print(ready_line(config, state.model_name,
                         template is not None and template.available),
              file=sys.stderr, flush=True)

    loader = threading.Thread(target=load, name="numoe-load", daemon=True)
    print(f"numoe: listening on http://{config.host}:{config.port} (GET /ready is 503 until "
          "the model has loaded)", file=sys.stderr, flush=True)
    loader.start()
    try:
        server.run()
    finally:
        state.close()
    return 1 if state.load_error is not None else 0
