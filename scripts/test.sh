#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: unit tests on a tiny random model,
# plus a few integration tests on the embedded SmolLM2 (marked `integration`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# One intra-op thread: the tiny-model tests are overhead-bound, and two spin-waiting
# OpenMP threads slow them down badly on a busy 2-core machine.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
./.venv/bin/python -m pytest -q --timeout 900 "$@"
