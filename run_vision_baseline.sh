#!/usr/bin/env bash
# Baseline (LM loss only) with the original's settings: the MLPs of the last 6 vision blocks under
# a 30% parameter budget, batch 15, evaluation and a checkpoint every 200 steps.
#   bash run_vision_baseline.sh [MODEL] [extra train.py args...]
#   PROTOCOL=clean bash run_vision_baseline.sh qwen2-2b      # our corrected variant (README: Protocols)
#   SEEDS="0 1 2" bash run_vision_baseline.sh qwen2-2b       # one sibling run folder per seed
#   bash run_vision_baseline.sh tiny --max_steps 20          # offline smoke run
# PROTOCOL (default paper) sets the method choices; extra arguments come last, so they override
# the defaults below and the protocol's. With several SEEDS, an --output_dir X becomes X_seed<N>.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
MODEL=qwen2-2b
if [[ $# -gt 0 && "$1" != --* ]]; then MODEL="$1"; shift; fi
PROTOCOL="${PROTOCOL:-paper}"
SEEDS="${SEEDS:-0}"
PY="${PYTHON:-$([[ -x "$here/.venv/bin/python" ]] && echo "$here/.venv/bin/python" || echo python3)}"
read -r -a seeds <<< "$SEEDS"
for seed in "${seeds[@]}"; do
  args=("$@")
  if [[ ${#seeds[@]} -gt 1 ]]; then  # sibling folders: X -> X_seed<N>
    for i in "${!args[@]}"; do
      if [[ "${args[$i]}" == "--output_dir" ]]; then args[$((i + 1))]="${args[$((i + 1))]}_seed${seed}"; fi
      if [[ "${args[$i]}" == --output_dir=* ]]; then args[$i]="${args[$i]}_seed${seed}"; fi
    done
  fi
  "$PY" "$here/train.py" \
    --model_name "$MODEL" \
    --protocol "$PROTOCOL" \
    --seed "$seed" \
    --param_budget_frac 0.3 \
    --batch_size 15 \
    --selector vision_mlp_lastk \
    --bf16 \
    --log_every 5 \
    --eval_save_steps 200 \
    "${args[@]}"
done
