#!/usr/bin/env bash
# The test command (README's second command; .ci/run runs exactly this). Installs numoe with its
# test extras (compiling the native kernels), builds the llama.cpp reference once (cached in
# ~/.cache/numoe), then runs pytest. pytest's "no tests collected" (exit 5) is not a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e '.[test]' || exit 1
bash bench/build_llamacpp.sh || exit 1
# tests/server/test_prometheus.py scrapes with a real Prometheus; without apt (or root) it skips.
if ! command -v prometheus >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus; } \
        >/dev/null 2>&1 || echo "run-tests: could not install prometheus; its test will skip" >&2
fi
python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then exit 0; fi
exit "$rc"
