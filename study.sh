#!/usr/bin/env bash
# The sandbox's dose-response (make study): tiny-spatial at the demo's settings (demo.sh: 60 steps,
# batch 8, lr 3e-3, generate-mode evaluation of 256 held-out questions at steps 0, 30, 60), 3 seeds:
#   - the paper's slice (vision MLPs): the spatial-ID loss at weights 0 (the weight-0 control), 1,
#     10 and 100, and the baseline;
#   - the LM's last 6 MLPs (--selector lm_mlp_lastk), which build the state the loss reads at layer
#     11: weights 0 and 10, as the contrast.
# 21 runs through reproduce.py's local launcher, 2 at a time on the CPU, then the report: mean ± sd
# over seeds per arm and weight, paired tests against the weight-0 control and the baseline, the
# dose-response figure (runs/study_tiny-spatial/compare/). Rerun after a kill: finished runs are skipped.
# A sandbox, not the paper's result; the stand-in is NOT COCO-Spatial.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
export PYTHON="$PY" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
RUNS=${STUDY_RUNS:-runs/study_tiny-spatial}
STANDIN=data/study_coco_standin
STEPS=${STUDY_STEPS:-60}
SEEDS=${STUDY_SEEDS:-"0 1 2"}

# The demo's COCO-Spatial stand-in (its three objects), drawn once.
if [[ ! -f "$STANDIN/coco_qa_two_obj_standin.json" ]]; then
  "$PY" make_grid_data.py --coco_standin "$STANDIN" --standin_only --standin_size 48 --seed 0 \
    --objects "brown ring" "gray arrow" "black pentagon"
fi
# The demo's data, drawn on the fly: three objects in colours tiny-spatial never saw (one pair held
# out), IDs from four other objects on a flat white set.
exec "$PY" reproduce.py --model tiny-spatial --protocol paper --seeds "$SEEDS" \
  --train_objects builtin --train_object_names "brown ring" "gray arrow" "black pentagon" \
  --id_objects builtin --id_object_names "red circle" "green triangle" "purple diamond" "pink heart" --id_layout flat \
  --cell 28 --sizes 124 --val_json "$STANDIN/coco_qa_two_obj_standin.json" --coco_val_dir "$STANDIN" \
  --ids "$RUNS/ids/tiny-spatial.pt" --runs_dir "$RUNS" \
  --spatial_id_weights 0 1 10 100 --arm lm_slice="--selector lm_mlp_lastk --spatial_id_weights 0 10" \
  --launcher local --max_parallel "${STUDY_PARALLEL:-2}" "$@" \
  --max_steps "$STEPS" --eval_save_steps $((STEPS / 2)) --log_every 1 --batch_size 8 --lr 3e-3 \
  --eval_mode generate --holdout_max_samples 256
