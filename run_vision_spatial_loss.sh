#!/usr/bin/env bash
# Spatial-ID finetuning: the baseline's settings plus the auxiliary loss that pulls the hidden
# state at obj2's token (LM layer 11) towards the model's universal spatial IDs, weight 1, as the
# original's script passed (its train.py default was 0.5).
#   bash run_vision_spatial_loss.sh [MODEL] [extra train.py args...]
# IDs are read from embeds/universal_id_90/MODEL.pt; derive them first with
#   python make_grid_data.py --layout extraction --out_dir data/extraction --objects_dir renders/
#   python derive_spatial_ids.py --model MODEL --images data/extraction --out embeds/universal_id_90/MODEL.pt
# PROTOCOL (default paper) sets the method choices; extra arguments come last and override.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
MODEL=qwen2-2b
if [[ $# -gt 0 && "$1" != --* ]]; then MODEL="$1"; shift; fi
exec bash "$here/run_vision_baseline.sh" "$MODEL" \
  --universal_id_path "embeds/universal_id_90/${MODEL}.pt" \
  --spatial_id_weight 1 \
  "$@"
