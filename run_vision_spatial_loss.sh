#!/usr/bin/env bash
# Spatial-ID finetuning: the baseline's settings plus the auxiliary loss that pulls the hidden
# state at obj2's token (LM layer 11) towards the model's universal spatial IDs.
#   bash run_vision_spatial_loss.sh [MODEL] [extra train.py args...]
# IDs are read from embeds/universal_id_90/MODEL.pt; derive them first with
#   python derive_spatial_ids.py --model MODEL --images data/grid --out embeds/universal_id_90/MODEL.pt
# Weight 1 is the seed's documented value (the original script passed 10): override with
# --spatial_id_weight. Extra arguments come last, so they override the defaults.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
MODEL=qwen2-2b
if [[ $# -gt 0 && "$1" != --* ]]; then MODEL="$1"; shift; fi
exec bash "$here/run_vision_baseline.sh" "$MODEL" \
  --universal_id_path "embeds/universal_id_90/${MODEL}.pt" \
  --spatial_id_weight 1 \
  "$@"
