#!/usr/bin/env bash
# The GPU check (issue 16): one script, at most ~8 minutes on one H100, that measures on a
# CUDA machine what CPU runs cannot: the demo ladder in bf16, full fine-tuning MFU of a
# 0.5B-class model, lmladder's LoRA vs TRL (tokens/s, memory), QLoRA through bitsandbytes,
# and vLLM when it is installed. Each check runs in its own process under its own timeout
# and writes one row of a markdown table; a failed or timed-out check writes its row and
# the next one runs. Without CUDA it prints "no CUDA" (and the table header) and exits 0.
#
#   bash bench/gpu_check.sh                 # table -> $OUT/gpu_check.md if $OUT is set, else ./gpu_check.md
#   GPU_CHECK_STEPS="env mfu" bash bench/gpu_check.sh   # some checks only
#
# Env: PYTHON (default .venv/bin/python, else python3), GPU_CHECK_BUDGET_S (total seconds, default 470),
# GPU_CHECK_MODEL (local weights for the MFU check), GPU_CHECK_LIMIT_TEST (ladder test rows, default 200),
# GPU_CHECK_WORK (scratch folder, default /tmp/lmladder-gpu-check), GPU_CHECK_TIMEOUT_S (caps every check).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; TABLE="$OUT/gpu_check.md"; else TABLE="./gpu_check.md"; fi
BUDGET=${GPU_CHECK_BUDGET_S:-470}
STEPS=${GPU_CHECK_STEPS:-"env ladder mfu lora qlora vllm"}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false

header="| check | result | numbers | seconds |
|---|---|---|---:|"

cuda=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if [ "$cuda" != "1" ]; then
  echo "no CUDA: torch.cuda.is_available() is false here (or torch does not import); nothing measured"
  echo "$header"
  exit 0
fi

{
  echo "GPU check, $(date -u +%Y-%m-%dT%H:%MZ), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  echo
  echo "$header"
} > "$TABLE"
echo "$header"

timeout_for() {  # seconds each check may take
  case "$1" in
    env) echo 60 ;; ladder) echo 150 ;; mfu) echo 70 ;; lora) echo 100 ;; qlora) echo 60 ;; vllm) echo 150 ;; *) echo 60 ;;
  esac
}

start=$SECONDS
for step in $STEPS; do
  t=$(timeout_for "$step")
  left=$((BUDGET - (SECONDS - start)))
  if [ "$left" -lt 20 ]; then
    line="| $step | skipped | the ${BUDGET} s budget is spent | 0 |"
  else
    [ "$t" -gt "$left" ] && t=$left
    [ -n "${GPU_CHECK_TIMEOUT_S:-}" ] && [ "$t" -gt "$GPU_CHECK_TIMEOUT_S" ] && t=$GPU_CHECK_TIMEOUT_S
    s0=$SECONDS
    rc=0
    out=$(timeout --kill-after=10 "$t" "$PY" bench/gpu_check.py "$step" 2>"/tmp/gpu_check.$step.err") || rc=$?
    line=$(printf '%s\n' "$out" | grep '^| ' | tail -1 || true)
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
      line="| $step | timed out after ${t} s | (stderr: /tmp/gpu_check.$step.err) | $t |"
    elif [ "$rc" -ne 0 ] || [ -z "$line" ]; then
      err=$(tail -1 "/tmp/gpu_check.$step.err" 2>/dev/null | tr '|' '/' | cut -c1-150 || true)
      line="| $step | failed (exit $rc) | ${err:-no output} | $((SECONDS - s0)) |"
    fi
  fi
  echo "$line" | tee -a "$TABLE"
done
echo
echo "table: $TABLE ($((SECONDS - start)) s)"
