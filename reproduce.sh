#!/usr/bin/env bash
# From the downloads to the paper's table in one command: check every input, derive (or reuse) the
# spatial IDs, train the baseline and the spatial-ID run for each seed, compare them beside the
# paper's published figures. Rerun the same command after a kill: finished stages are skipped and
# an interrupted run resumes from its latest checkpoint.
#   bash reproduce.sh [MODEL] [reproduce.py flags] [extra train.py flags...]
#   bash reproduce.sh qwen2-2b                          # the paper's experiment (README: Running real experiments)
#   SEEDS="0 1 2" PROTOCOL=clean bash reproduce.sh qwen2-2b --lr 1e-4
# Inputs (defaults): data/coco_qa_two_obj.json, data/coco/, data/renders/ (training objects),
# data/id_renders/ (ID objects); `python reproduce.py --help` lists the flags that change them.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
MODEL=qwen2-2b
if [[ $# -gt 0 && "$1" != --* ]]; then MODEL="$1"; shift; fi
PY="${PYTHON:-$([[ -x "$here/.venv/bin/python" ]] && echo "$here/.venv/bin/python" || echo python3)}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-0}" TOKENIZERS_PARALLELISM=false
exec "$PY" "$here/reproduce.py" --model "$MODEL" --protocol "${PROTOCOL:-paper}" --seeds "${SEEDS:-0}" "$@"
