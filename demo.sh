#!/usr/bin/env bash
# The offline demo (make demo): tiny-warm (the tiny Qwen2-VL pretrained briefly on grid questions
# about other objects) -> grid data + COCO-Spatial stand-in -> spatial IDs -> baseline and
# spatial-loss runs with the same seed and sampler -> side-by-side accuracies and a report.
# No GPU, no downloads. A sandbox that shows training teaching something, not the paper's result;
# the stand-in is NOT COCO-Spatial.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
export PYTHON="$PY" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
GRID=data/demo_grid
EXTRACTION=data/demo_extraction
STANDIN=data/demo_coco_standin
MODEL=tiny-warm
IDS=embeds/universal_id_90/tiny-warm.pt
STEPS=${DEMO_STEPS:-60}
# Generate mode (tiny-warm answers "left"/"right" itself); 256 holdout questions, enough for the
# paired test of step 0 against the last step that compare_runs prints.
COMMON=(--train_dir "$GRID" --val_json "$STANDIN/coco_qa_two_obj_standin.json" --coco_val_dir "$STANDIN"
        --max_steps "$STEPS" --eval_save_steps $((STEPS / 2)) --log_every 10 --batch_size 8 --lr 3e-3
        --eval_mode generate --holdout_max_samples 256 --seed 0 --overwrite_output_dir)

echo "== 1/5 tiny-warm (shipped in weights/tiny-warm-v1/, checked against its SHA256SUMS)"
"$PY" -c "import models; print(models.ensure_tiny_model(alias='$MODEL'))"

echo "== 2/5 grid images, an ID-extraction set of other objects, and the COCO-Spatial stand-in"
rm -rf "$GRID" "$EXTRACTION" "$STANDIN"
# The built-in objects in tiny-warm's colours (it was pretrained on a red heart, a blue hexagon and
# a green pentagon): 3 pairs, one held out.
"$PY" make_grid_data.py --out_dir "$GRID" --cell 28 --sizes 124 --seed 0 \
  --objects "red circle" "blue square" "green triangle" \
  --coco_standin "$STANDIN" --standin_size 48
"$PY" make_grid_data.py --out_dir "$EXTRACTION" --layout extraction --cell 28 --sizes 124 --seed 0 \
  --objects "pink heart" "cyan hexagon"

echo "== 3/5 spatial IDs of $MODEL (the original's procedure, on the extraction set)"
"$PY" derive_spatial_ids.py --model "$MODEL" --images "$EXTRACTION" --out "$IDS" --overwrite

echo "== 4/5 baseline and spatial-loss runs ($STEPS steps each)"
bash run_vision_baseline.sh "$MODEL" "${COMMON[@]}" --output_dir runs/demo_baseline
bash run_vision_spatial_loss.sh "$MODEL" "${COMMON[@]}" --output_dir runs/demo_spatial

echo "== 5/5 side by side, and step 0 against the last step on the same holdout questions"
"$PY" compare_runs.py runs/demo_baseline runs/demo_spatial --brief
