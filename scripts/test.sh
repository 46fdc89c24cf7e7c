#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: unit tests on a tiny random model,
# plus a few integration tests on the embedded SmolLM2 (marked `integration`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
./.venv/bin/python -m pytest -q --timeout 900 "$@"
