#!/usr/bin/env bash
# The offline demo (make demo): tiny model -> grid data + COCO-Spatial stand-in -> spatial IDs ->
# baseline and spatial-loss runs with the same seed and sampler -> side-by-side accuracies.
# No GPU, no downloads. The stand-in is NOT COCO-Spatial: the numbers only show the pipeline works.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
export PYTHON="$PY" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
GRID=data/demo_grid
EXTRACTION=data/demo_extraction
STANDIN=data/demo_coco_standin
IDS=embeds/universal_id_90/tiny.pt
STEPS=${DEMO_STEPS:-60}
# Score mode: the random tiny model's free generations are never "left"/"right", so generate-mode
# accuracy is 0 everywhere; comparing the option words' log-probabilities gives readable numbers.
COMMON=(--train_dir "$GRID" --val_json "$STANDIN/coco_qa_two_obj_standin.json" --coco_val_dir "$STANDIN"
        --max_steps "$STEPS" --eval_save_steps $((STEPS / 2)) --log_every 10 --batch_size 8 --lr 3e-3
        --eval_mode score --holdout_max_samples 64 --seed 0 --overwrite_output_dir)

echo "== 1/5 built-in tiny model"
"$PY" -c "import models; print(models.ensure_tiny_model())"

echo "== 2/5 grid images, an ID-extraction set of other objects, and the COCO-Spatial stand-in"
rm -rf "$GRID" "$EXTRACTION" "$STANDIN"
"$PY" make_grid_data.py --out_dir "$GRID" --cell 28 --sizes 124 --max_pairs 8 --seed 0 \
  --objects "red circle" "blue square" "green triangle" "yellow star" "purple diamond" "orange cross" \
  --coco_standin "$STANDIN" --standin_size 48
"$PY" make_grid_data.py --out_dir "$EXTRACTION" --layout extraction --cell 28 --sizes 124 --seed 0 \
  --objects "pink heart" "cyan hexagon"

echo "== 3/5 spatial IDs of the tiny model (the original's procedure, on the extraction set)"
"$PY" derive_spatial_ids.py --model tiny --images "$EXTRACTION" --out "$IDS" --overwrite

echo "== 4/5 baseline and spatial-loss runs ($STEPS steps each)"
bash run_vision_baseline.sh tiny "${COMMON[@]}" --output_dir runs/demo_baseline
bash run_vision_spatial_loss.sh tiny "${COMMON[@]}" --output_dir runs/demo_spatial

echo "== 5/5 side by side (stand-in data: a pipeline check, not a result)"
"$PY" compare_runs.py runs/demo_baseline runs/demo_spatial --brief
