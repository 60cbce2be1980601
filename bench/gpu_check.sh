#!/usr/bin/env bash
# The GPU checks, one script for a lent GPU machine (nothing here needs the hub):
#   1. the real Qwen2-VL-2B architecture (random weights): one training step of the default
#      selection at the paper's 896 px images, batch 15, bf16, on a batch of the paper's spatial
#      arm, every row's image encoded vs each distinct image once (time, peak memory, gradients,
#      the FLOPs counted by FlopCounterMode split into vision / LM / rest, TFLOP/s and MFU);
#   2. the training-step bench at 448 and 896 px: ours vs the plain `labels=` path, each distinct
#      image once vs every row's image on the spatial and the control arm's batch, counted FLOPs
#      and MFU;
#   3. train.py end to end on the same model and images (the spatial arm, 40 steps) against the
#      step of 1 (target: within 10%), with each image once and without;
#   4. the evaluation bench (score and batched generate vs one question at a time);
#   5. `demo.sh` on CUDA: data, IDs, both runs, evaluation and the report, end to end.
# Each step's output goes to $OUT/<step>.txt (default runs/gpu_check/); a failing step is
# reported and the next one still runs. Usage: bash bench/gpu_check.sh [step ...]
# Issue 18's table alone: `bash bench/gpu_check.sh issue18` (full_size_step: step time once / per
# row, FLOPs and MFU; bench_train_896: images encoded per batch and time saved per arm;
# train_e2e, train_e2e_per_row: train.py's own step time against the bench step).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-runs/gpu_check}"
STEP_TIMEOUT="${STEP_TIMEOUT:-300}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
mkdir -p "$OUT"
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(env full_size_step bench_train_448 bench_train_896 train_e2e train_e2e_per_row bench_eval demo)
# `issue18`: only the steps of issue 18's table (not yet run on a GPU: time them on the first)
[ "${STEPS[*]}" = issue18 ] && STEPS=(env full_size_step bench_train_896 train_e2e train_e2e_per_row)

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
    train_e2e) run_step train_e2e "$PY" bench/train_throughput.py --full_size --bf16 --cell 224 --max_steps 40 \
      --log_every 5 --out "$OUT/train_throughput" --step_log "$OUT/full_size_step.txt" ;;
    train_e2e_per_row) run_step train_e2e_per_row "$PY" bench/train_throughput.py --full_size --bf16 --cell 224 \
      --max_steps 40 --log_every 5 --out "$OUT/train_throughput" --no-encode_images_once ;;
    bench_eval) run_step bench_eval "$PY" bench/bench_eval.py --full_size --bf16 --batch_size 8 --n 32 ;;
    demo) run_step demo env PYTHON="$PY" bash demo.sh ;;
    *) echo "unknown step $step (known: env full_size_step bench_train_448 bench_train_896 train_e2e train_e2e_per_row bench_eval demo)"; exit 2 ;;
  esac
done
