#!/usr/bin/env bash
# The GPU checks, one script for a lent GPU machine (nothing here needs the hub):
#   1. the real Qwen2-VL-2B architecture (random weights): one training step of the default
#      selection at the paper's 896 px images, batch 15, bf16 (time, peak memory, gradients);
#   2. the training-step bench, ours vs the plain `labels=` path, at 448 and 896 px;
#   3. the evaluation bench (score and batched generate vs one question at a time);
#   4. `demo.sh` on CUDA: data, IDs, both runs, evaluation and the report, end to end.
# Each step's output goes to $OUT/<step>.txt (default runs/gpu_check/); a failing step is
# reported and the next one still runs. Usage: bash bench/gpu_check.sh [step ...]
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-runs/gpu_check}"
STEP_TIMEOUT="${STEP_TIMEOUT:-300}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
mkdir -p "$OUT"
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(env full_size_step bench_train_448 bench_train_896 bench_eval demo)

run_step() {
  local name=$1
  shift
  echo "== $name: $*"
  local start=$SECONDS
  timeout "$STEP_TIMEOUT" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.txt"
  echo "== $name: exit $rc after $((SECONDS - start)) s"
}

for step in "${STEPS[@]}"; do
  case $step in
    env) run_step env bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c \
'import torch, transformers, accelerate; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
torch.cuda.get_device_name() if torch.cuda.is_available() else \"NO GPU\"); \
print(\"transformers\", transformers.__version__, \"accelerate\", accelerate.__version__)'" ;;
    full_size_step) run_step full_size_step "$PY" bench/full_size_step.py --cell 224 --batch_size 15 --bf16 ;;
    bench_train_448) run_step bench_train_448 "$PY" bench/bench_train.py --full_size --bf16 --repeats 5 ;;
    bench_train_896) run_step bench_train_896 "$PY" bench/bench_train.py --full_size --bf16 --cell 224 --repeats 5 ;;
    bench_eval) run_step bench_eval "$PY" bench/bench_eval.py --full_size --bf16 --batch_size 8 --n 32 ;;
    demo) run_step demo env PYTHON="$PY" bash demo.sh ;;
    *) echo "unknown step $step (known: env full_size_step bench_train_448 bench_train_896 bench_eval demo)"; exit 2 ;;
  esac
done
