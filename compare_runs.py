"""Compare run folders side by side: accuracy before and after training, and the losses.

    python compare_runs.py runs/tiny_baseline_seed0 runs/tiny_spatial_seed0
"""
import argparse
import json
import sys
from pathlib import Path


def read_run(folder):
    folder = Path(folder)
    path = folder / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no metrics.jsonl (not a train.py run folder?)")
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    evals = [e for e in events if e["event"] == "eval"]
    train = [e for e in events if e["event"] == "train"]
    if not evals:
        raise ValueError(f"{path}: no evaluation recorded")
    spatial = [e["spatial_loss"] for e in train if "spatial_loss" in e]
    return {
        "run": folder.name,
        "steps": evals[-1]["step"],
        "coco_before": evals[0]["coco"]["accuracy"],
        "coco_after": evals[-1]["coco"]["accuracy"],
        "holdout_before": evals[0].get("holdout", {}).get("accuracy"),
        "holdout_after": evals[-1].get("holdout", {}).get("accuracy"),
        "lm_loss_first": train[0].get("lm_loss") if train else None,
        "lm_loss_last": train[-1].get("lm_loss") if train else None,
        "spatial_first": spatial[0] if spatial else None,
        "spatial_last": spatial[-1] if spatial else None,
    }


def _fmt(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def table(runs):
    header = ["run", "steps", "COCO before", "COCO after", "holdout before", "holdout after",
              "LM loss first→last", "spatial loss first→last"]
    rows = [[r["run"], str(r["steps"]), _fmt(r["coco_before"]), _fmt(r["coco_after"]),
             _fmt(r["holdout_before"]), _fmt(r["holdout_after"]),
             f"{_fmt(r['lm_loss_first'])}→{_fmt(r['lm_loss_last'])}",
             f"{_fmt(r['spatial_first'])}→{_fmt(r['spatial_last'])}" if r["spatial_first"] is not None else "-"]
            for r in runs]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders written by train.py")
    args = parser.parse_args(argv)
    try:
        runs = [read_run(r) for r in args.runs]
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(table(runs))
    return runs


if __name__ == "__main__":
    main()
