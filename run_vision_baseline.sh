#!/usr/bin/env bash
# Baseline spatial finetuning with the original's settings: the MLPs of the last 6 vision blocks
# under a 30% parameter budget, LM loss only.
#   bash run_vision_baseline.sh [MODEL] [extra train.py args...]
#   bash run_vision_baseline.sh tiny --max_steps 20          # offline smoke run
# Extra arguments come last, so they override the defaults below.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
MODEL=qwen2-2b
if [[ $# -gt 0 && "$1" != --* ]]; then MODEL="$1"; shift; fi
PY="${PYTHON:-$([[ -x "$here/.venv/bin/python" ]] && echo "$here/.venv/bin/python" || echo python3)}"
exec "$PY" "$here/train.py" \
  --model_name "$MODEL" \
  --param_budget_frac 0.3 \
  --batch_size 15 \
  --selector vision_mlp_lastk \
  --eval_max_samples 500 \
  --bf16 \
  --log_every 5 \
  --eval_save_steps 200 \
  "$@"
