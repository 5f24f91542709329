#!/usr/bin/env bash
# The CUDA backend's check (bench/gpu_backend.py) on a GPU machine that has CuPy and numpy but
# no network, no numoe build and no gguf-py.
#
#   bash bench/gpu_check.sh --prepare   # on the dev machine: fill .gpucheck/ (about 53 MiB)
#   bash bench/gpu_check.sh             # on the GPU machine: install the wheels, run the check
#
# .gpucheck/ holds the tiny Qwen3-MoE and Qwen3 Q8_0 GGUFs (tests/reference/tiny_models.py) and
# gguf-py's wheel; it must be ignored by git (echo /.gpucheck/ >> .git/info/exclude) and carried
# to the GPU machine. The check writes its own synthetic models (every weight type, Gemma 3
# features, a Gemma-3-270M-shaped one for timing) to a temp dir. Output: one PASS/FAIL line per
# check, then timings; also saved to $OUT/gpu_check.log when $OUT is set. Exit status: 0 all
# passed, 1 a check failed, 2 no GPU backend (CuPy or the GPU missing).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${GPUCHECK_DIR:-.gpucheck}"  # GPUCHECK_DIR: another folder, for trying the script

if [[ "${1:-}" == "--prepare" ]]; then
    mkdir -p "$DIR/wheels"
    for name in qwen3moe qwen3; do
        # Built by llama.cpp's converter on first use, then cached in ~/.cache/numoe/test-models.
        src=$(python3 -c "from tests.reference.tiny_models import tiny_model
print(tiny_model('$name').gguf['q8_0'])")
        cp "$src" "$DIR/"
    done
    version=$(python3 -c "import importlib.metadata as m; print(m.version('gguf'))")
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$DIR/wheels" "gguf==$version"
    du -shc "$DIR"/*
    git check-ignore -q "$DIR" || echo "warning: $DIR is not ignored by git; run:" \
        "echo /$DIR/ >> .git/info/exclude"
    exit 0
fi

site=/tmp/numoe-gpucheck-site
if compgen -G "$DIR/wheels/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" \
        "$DIR"/wheels/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
shopt -s nullglob
models=("$DIR"/*.gguf)
log="${OUT:-/tmp}/gpu_check.log"
mkdir -p "$(dirname "$log")"
PYTHONUNBUFFERED=1 python3 bench/gpu_backend.py --gemma-shaped --models "${models[@]}" "$@" \
    2>&1 | tee "$log"
