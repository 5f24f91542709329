#!/usr/bin/env bash
# Builds llama.cpp, the independent reference that tests and benchmarks compare numoe with,
# from the llama-cpp-python source package (PyPI is the only registry we reach). The result is
# cached: a second run with the same version does nothing. "Built" means every tool below is in
# build/bin, not only that the stamp exists, so a cache from before a tool was added here (e.g.
# llama-server) builds just the missing tools on the next run, reusing the unpacked source.
#   out: $NUMOE_LLAMACPP_DIR (default ~/.cache/numoe/llama-cpp-python-$VERSION)
#        src/      the unpacked source package (llama_cpp python bindings, vendor/llama.cpp)
#        build/bin llama-quantize, llama-perplexity, llama-bench, llama-tokenize, llama-server,
#                  libllama.so and the ggml libraries (the bindings load them via LLAMA_CPP_LIB_PATH)
set -euo pipefail
VERSION="${NUMOE_LLAMACPP_VERSION:-0.3.36}"
OUT="${NUMOE_LLAMACPP_DIR:-$HOME/.cache/numoe/llama-cpp-python-$VERSION}"
STAMP="$OUT/.built"
TOOLS=(llama-quantize llama-perplexity llama-bench llama-tokenize llama-server)
missing=()
for tool in "${TOOLS[@]}"; do
  [ -x "$OUT/build/bin/$tool" ] || missing+=("$tool")
done
if [ -f "$STAMP" ] && [ "${#missing[@]}" -eq 0 ]; then
  echo "llama.cpp reference already built in $OUT"
  exit 0
fi
mkdir -p "$OUT"
if [ ! -f "$OUT/src/vendor/llama.cpp/CMakeLists.txt" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "fetching llama-cpp-python==$VERSION source package"
  python -m pip download --quiet --no-deps --no-binary llama-cpp-python -d "$tmp" \
    "llama-cpp-python==$VERSION"
  rm -rf "$OUT/src"
  mkdir -p "$OUT/src"
  tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$OUT/src" --strip-components=1
fi
echo "building llama.cpp tools: ${missing[*]} (a few minutes on 2 cores)"
# The server's web UI is neither built (needs npm) nor fetched (needs the network): the bench
# only talks to its HTTP API. Re-running cmake on an existing build dir updates its options.
cmake -S "$OUT/src/vendor/llama.cpp" -B "$OUT/build" -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DGGML_NATIVE=ON \
  -DLLAMA_OPENSSL=OFF >"$OUT/cmake.log" 2>&1 \
  || { tail -30 "$OUT/cmake.log"; exit 1; }
cmake --build "$OUT/build" -j "$(nproc)" --target "${TOOLS[@]}" >"$OUT/build.log" 2>&1 \
  || { tail -30 "$OUT/build.log"; exit 1; }
touch "$STAMP"
echo "llama.cpp reference built in $OUT"
