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
#      step of 1 (target: within 10%), with each image once and without, with the images drawn on
#      the fly by the loader's workers, with --compile_blocks all and with --liger_kernel;
#   4. the evaluation bench (score and batched generate vs one question at a time);
#   5. `demo.sh` on CUDA: data, IDs, both runs, evaluation and the report, end to end.
# (`env` also prints the cores, the memory and /dev/shm: the loader's workers hand their batches,
# up to 8 workers x 4 prefetched x ~0.25 GB at 896 px, through shared memory.)
# Each step's output goes to $OUT/<step>.txt (default runs/gpu_check/); a failing step is
# reported and the next one still runs; the script exits 1 when a step failed.
# Usage: bash bench/gpu_check.sh [--dry-run] [step ...]   (`make gpu-dry-run` from a fresh clone)
# Issue 18's table alone: `bash bench/gpu_check.sh issue18` (full_size_step: step time once / per
# row, FLOPs and MFU; bench_train_896: images encoded per batch and time saved per arm;
# train_e2e, train_e2e_per_row: train.py's own step time against the bench step).
#
# --dry-run: every step on this machine's CPU at tiny size (the bench model: the tiny Qwen2-VL
# with the tiny tokenizer's vocabulary, BENCH_VOCAB=tiny; 112-224 px images; a few steps and questions), through the same code:
# bf16 weights where the step uses --bf16 (GPU_REHEARSAL=1, speedups.weights_dtype), pinned memory
# asked of the loader (torch leaves the batches unpinned without an accelerator, with a warning),
# 2 loader workers (drawing the images on the fly in three steps), every bench above, compile and Liger (which falls
# back on a CPU), the demo with 2 steps per run. Outputs in runs/gpu_check_dry_run/. 5-9
# minutes on a shared 2-core CPU (docs/performance.md); it finds the script's own bugs before a GPU is lent.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then
  DRY_RUN=1
  shift
fi
# The Python that has the requirements: $PYTHON, else the repo's .venv (make install), else python3.
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ $DRY_RUN = 1 ]; then
  OUT="${OUT:-runs/gpu_check_dry_run}"
  STEP_TIMEOUT="${STEP_TIMEOUT:-300}"
  # BENCH_VOCAB=tiny: the bench model keeps the tiny tokenizer's 603-row head (bench/common.py);
  # the real 151,936 rows made bf16 steps take minutes on CPUs without bf16 instructions.
  export GPU_REHEARSAL=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" BENCH_VOCAB=tiny
  # The bench model (no --full_size), tiny images, one timed round, a few train.py steps.
  FULL_STEP=(--tiny --cell 28 --batch_size 15 --bf16 --repeats 1)
  BENCH_448=(--bf16 --cell 28 --batch_size 8 --repeats 1)
  BENCH_896=(--bf16 --cell 56 --batch_size 8 --repeats 1)
  E2E=(--bf16 --cell 28 --batch_size 15 --max_steps 4 --log_every 1 --num_workers 2)  # 15: full_size_step's
  EVAL=(--bf16 --batch_size 2 --n 4 --image_size 112 --repeats 1)
  DEMO_STEPS_RUN="${DEMO_STEPS:-2}"
else
  OUT="${OUT:-runs/gpu_check}"
  STEP_TIMEOUT="${STEP_TIMEOUT:-300}"
  FULL_STEP=(--cell 224 --batch_size 15 --bf16)
  BENCH_448=(--full_size --bf16 --repeats 5)
  BENCH_896=(--full_size --bf16 --cell 224 --repeats 5)
  E2E=(--full_size --bf16 --cell 224 --max_steps 40 --log_every 5)
  EVAL=(--full_size --bf16 --batch_size 8 --n 32)
  DEMO_STEPS_RUN="${DEMO_STEPS:-60}"
fi
mkdir -p "$OUT"
ALL_STEPS=(env full_size_step bench_train_448 bench_train_896 train_e2e train_e2e_per_row train_e2e_on_the_fly
           train_e2e_compile train_e2e_liger bench_eval demo)
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=("${ALL_STEPS[@]}")
# `issue18`: only the steps of issue 18's table (not yet run on a GPU: time them on the first)
[ "${STEPS[*]}" = issue18 ] && STEPS=(env full_size_step bench_train_896 train_e2e train_e2e_per_row)
for step in "${STEPS[@]}"; do  # an unknown name stops the script before any step runs
  case " ${ALL_STEPS[*]} " in
    *" $step "*) ;;
    *) echo "unknown step $step (known: ${ALL_STEPS[*]}, or issue18 alone)"; exit 2 ;;
  esac
done
if ! "$PY" -c "import torch, transformers" 2> /dev/null; then
  echo "error: $PY cannot import torch and transformers: run \`make install\` first (then .venv/bin/python is used) or set PYTHON"
  exit 2
fi

FAILED=()
run_step() {
  local name=$1
  shift
  echo "== $name: $*"
  local start=$SECONDS
  timeout "$STEP_TIMEOUT" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.txt"
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  [ $rc -eq 0 ] || FAILED+=("$name (exit $rc)")
}

train_e2e() {  # train.py through bench/train_throughput.py, against full_size_step's step
  run_step "$1" "$PY" bench/train_throughput.py "${E2E[@]}" --out "$OUT/train_throughput" \
    --step_log "$OUT/full_size_step.txt" "${@:2}"
}

START=$SECONDS
for step in "${STEPS[@]}"; do
  case $step in
    env) run_step env bash -c "if command -v nvidia-smi > /dev/null; then \
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; else echo 'no nvidia-smi'; fi; \
echo \"\$(nproc) cores\"; free -g | head -2; df -h /dev/shm; $PY -c \
'import torch, transformers, accelerate; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
torch.cuda.get_device_name() if torch.cuda.is_available() else \"NO GPU\"); \
print(\"transformers\", transformers.__version__, \"accelerate\", accelerate.__version__)'" ;;
    full_size_step) run_step full_size_step "$PY" bench/full_size_step.py "${FULL_STEP[@]}" ;;
    bench_train_448) run_step bench_train_448 "$PY" bench/bench_train.py "${BENCH_448[@]}" ;;
    bench_train_896) run_step bench_train_896 "$PY" bench/bench_train.py "${BENCH_896[@]}" ;;
    train_e2e) train_e2e train_e2e ;;
    train_e2e_per_row) train_e2e train_e2e_per_row --no-encode_images_once ;;
    train_e2e_on_the_fly) train_e2e train_e2e_on_the_fly --on_the_fly ;;
    train_e2e_compile) train_e2e train_e2e_compile --on_the_fly --compile_blocks all ;;
    train_e2e_liger) train_e2e train_e2e_liger --on_the_fly --liger_kernel ;;
    bench_eval) run_step bench_eval "$PY" bench/bench_eval.py "${EVAL[@]}" ;;
    demo) run_step demo env PYTHON="$PY" DEMO_STEPS="$DEMO_STEPS_RUN" bash demo.sh ;;
  esac
done
echo "== ${#STEPS[@]} steps in $((SECONDS - START)) s$([ $DRY_RUN = 1 ] && echo ' (dry run, CPU)'); outputs in $OUT/"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "== FAILED: ${FAILED[*]}"
  exit 1
fi
