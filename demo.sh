#!/usr/bin/env bash
# The offline demo (make demo): tiny-spatial (the tiny Qwen2-VL pretrained on grid questions and
# taught a position code shared by all objects; weights shipped) -> grid data + COCO-Spatial
# stand-in -> spatial IDs from objects it never trained on, and their diagnostics -> the
# baseline, the spatial-loss run and its weight-0 control (same seed, same batches) ->
# side-by-side accuracies, the spatial loss against the control, and a report.
# No GPU, no downloads. A sandbox, not the paper's result; the stand-in is NOT COCO-Spatial.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
export PYTHON="$PY" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
GRID=data/demo_grid
EXTRACTION=data/demo_extraction
STANDIN=data/demo_coco_standin
MODEL=tiny-spatial
IDS=embeds/universal_id_90/tiny-spatial.pt
STEPS=${DEMO_STEPS:-60}
# Generate mode (tiny-spatial answers "left"/"right" itself); 256 holdout questions, enough for the
# paired test of step 0 against the last step that compare_runs prints. Every step is logged, so
# the spatial run and its control can be paired step by step.
COMMON=(--train_dir "$GRID" --val_json "$STANDIN/coco_qa_two_obj_standin.json" --coco_val_dir "$STANDIN"
        --max_steps "$STEPS" --eval_save_steps $((STEPS / 2)) --log_every 1 --batch_size 8 --lr 3e-3
        --eval_mode generate --holdout_max_samples 256 --seed 0 --overwrite_output_dir)

echo "== 1/6 $MODEL (shipped in weights/, checked against its SHA256SUMS)"
"$PY" -c "import models; print(models.ensure_tiny_model(alias='$MODEL'))"

echo "== 2/6 grid images, an ID-extraction set of other objects, and the COCO-Spatial stand-in"
rm -rf "$GRID" "$EXTRACTION" "$STANDIN"
# Three built-in objects in colours tiny-spatial never saw (brown, gray, black): 3 pairs, one held
# out from the finetuning; it starts near chance on them, so finetuning has something to teach.
"$PY" make_grid_data.py --out_dir "$GRID" --cell 28 --sizes 124 --seed 0 \
  --objects "brown ring" "gray arrow" "black pentagon" \
  --coco_standin "$STANDIN" --standin_size 48
# The IDs come from four objects tiny-spatial never trained on (every pair has one that shares no
# object with it, which the diagnostics' agreement and probe need), on white like its training
# images (a flat set: the extraction layout's black canvas is read too, see docs/spatial-ids.md).
"$PY" make_grid_data.py --out_dir "$EXTRACTION" --cell 28 --sizes 124 --seed 0 \
  --objects "red circle" "green triangle" "purple diamond" "pink heart"

echo "== 3/6 spatial IDs of $MODEL (the original's procedure, on the ID objects)"
"$PY" derive_spatial_ids.py --model "$MODEL" --images "$EXTRACTION" --out "$IDS" --overwrite

echo "== 4/6 does $MODEL hold universal spatial IDs? (Figure 5, universality, probe)"
"$PY" id_diagnostics.py --ids "$IDS" --out runs/demo_id_diagnostics

echo "== 5/6 baseline, spatial-loss run and its weight-0 control ($STEPS steps each)"
bash run_vision_baseline.sh "$MODEL" "${COMMON[@]}" --output_dir runs/demo_baseline
bash run_vision_spatial_loss.sh "$MODEL" "${COMMON[@]}" --output_dir runs/demo_spatial
# The control: the spatial run's sampler, seed and batches, its loss logged but weighted 0.
bash run_vision_spatial_loss.sh "$MODEL" "${COMMON[@]}" --spatial_id_weight 0 --output_dir runs/demo_spatial_w0

echo "== 6/6 side by side; step 0 against the last step; the spatial loss against its control"
# The weight-0 control first: the paired tests compare every run with it (same batches as the
# spatial run, the LM loss alone).
"$PY" compare_runs.py runs/demo_spatial_w0 runs/demo_spatial runs/demo_baseline --brief
echo "ID diagnostics: runs/demo_id_diagnostics/diagnostics.md, runs/demo_id_diagnostics/figure5.png"
