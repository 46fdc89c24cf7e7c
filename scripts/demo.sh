#!/usr/bin/env bash
# Set up (if needed) and climb the demo ladder on SST-2 with the embedded SmolLM2-135M:
# zero-shot -> few-shot (8 examples) -> LoRA. About 9 minutes on 2 CPU cores once .venv is built.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
./.venv/bin/lmladder run examples/sst2.yaml --out runs/sst2 "$@"
