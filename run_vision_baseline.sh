#!/usr/bin/env bash
# Baseline (LM loss only) with the original's settings: the MLPs of the last 6 vision blocks under
# a 30% parameter budget, batch 15, evaluation and a checkpoint every 200 steps.
#   bash run_vision_baseline.sh [MODEL] [extra train.py args...]
#   PROTOCOL=clean bash run_vision_baseline.sh qwen2-2b      # our corrected variant (README: Protocols)
#   SEEDS="0 1 2" bash run_vision_baseline.sh qwen2-2b       # one sibling run folder per seed
#   bash run_vision_baseline.sh tiny --max_steps 20          # offline smoke run
# PROTOCOL (default paper) sets the method choices; extra arguments come last, so they override
# the defaults below and the protocol's. With several SEEDS, an --output_dir X becomes X_seed<N>.
# Signals (a scheduler's stop, docs/training.md): with one seed this script becomes train.py
# (exec), so they reach it directly; with several, SIGTERM, SIGUSR1 and SIGUSR2 are forwarded to
# the running train.py (USR2 as TERM), and a seed stopped at a saved step (exit 75) ends the script with 75
# before the next seed starts.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
MODEL=qwen2-2b
if [[ $# -gt 0 && "$1" != --* ]]; then MODEL="$1"; shift; fi
PROTOCOL="${PROTOCOL:-paper}"
SEEDS="${SEEDS:-0}"
PY="${PYTHON:-$([[ -x "$here/.venv/bin/python" ]] && echo "$here/.venv/bin/python" || echo python3)}"
PREEMPTED=75  # checkpoints.PREEMPTED_EXIT_CODE: stopped at a saved step, rerun to resume
read -r -a seeds <<< "$SEEDS"

train() {  # train.py with this script's defaults for seed $1, then the extra arguments
  local seed="$1"; shift
  $EXEC "$PY" "$here/train.py" \
    --model_name "$MODEL" \
    --protocol "$PROTOCOL" \
    --seed "$seed" \
    --param_budget_frac 0.3 \
    --batch_size 15 \
    --selector vision_mlp_lastk \
    --bf16 \
    --log_every 5 \
    --eval_save_steps 200 \
    "$@"
}

EXEC=""
if [[ ${#seeds[@]} -eq 1 ]]; then
  EXEC=exec  # one seed: train.py takes this process over, and every signal sent to it
  train "${seeds[0]}" "$@"
fi

# Several seeds: each train.py runs in the background so that a trap runs as soon as a signal
# arrives (bash runs a trap only after a foreground child exits); `wait` returns early when a
# trapped signal interrupts it, so it waits again until the child itself has ended.
child="" stopped=""
forward() {
  stopped="$1"
  if [[ -n "$child" ]]; then kill -s "$1" "$child" 2>/dev/null || true; fi
}
trap 'forward TERM' TERM
trap 'forward USR1' USR1
# USR2 (a scheduler's warning) reaches train.py as TERM, the stop it saves on (it has no handler for
# USR2, whose default would end it unsaved); a no-op where the caller ignores USR2 (launchers.py).
trap 'forward TERM' USR2
for seed in "${seeds[@]}"; do
  if [[ -n "$stopped" ]]; then exit "$PREEMPTED"; fi  # stopped between two seeds: the next one never starts
  args=("$@")
  for i in "${!args[@]}"; do  # sibling folders: X -> X_seed<N>
    if [[ "${args[$i]}" == "--output_dir" ]]; then args[$((i + 1))]="${args[$((i + 1))]}_seed${seed}"; fi
    if [[ "${args[$i]}" == --output_dir=* ]]; then args[$i]="${args[$i]}_seed${seed}"; fi
  done
  # A background command ignores SIGINT in a script; the subshell gives train.py back Ctrl-C.
  (trap - INT; EXEC=exec; train "$seed" "${args[@]}") &
  child=$!
  code=0
  wait "$child" || code=$?
  while [[ -n "$stopped" ]]; do  # a trap ran: `wait` may have returned early (128 + N), wait again
    again=0
    wait "$child" || again=$?
    if [[ $again -eq 127 ]]; then break; fi  # the child had already ended: `code` is its status
    code=$again
    if ! kill -0 "$child" 2>/dev/null; then break; fi
  done
  child=""
  if [[ $code -ne 0 ]]; then exit "$code"; fi
done
