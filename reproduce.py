"""From the downloads to the paper's table in one command (`bash reproduce.sh MODEL` calls this).

    bash reproduce.sh qwen2-2b                         # the paper's experiment, seed 0
    SEEDS="0 1 2" PROTOCOL=clean bash reproduce.sh qwen2-2b --lr 1e-4    # extra flags go to train.py

Stages, each skipped when its output is complete, so a killed pipeline rerun with the same command
continues where it stopped:
  1. inputs: the COCO-Spatial JSON, its COCO images, the object renders of the training and the
     ID-extraction images, the model and an existing ID file's provenance, all checked before any
     model loads; each missing one is named on one line with where to get it;
  2. ids: derive_spatial_ids.py on the ID objects, drawn on the fly (the original's recipe under
     --protocol paper); an ID file whose provenance matches (model, protocol, images) is reused;
  3. runs: for each seed the baseline (LM loss, the paper's control arm) and the spatial-ID run,
     with the run scripts' defaults and the training images drawn on the fly; a run with an `end`
     event and final/README.md is complete; an interrupted one resumes from its latest checkpoint;
  4. report: compare_runs.py over every run, then summary.md: our accuracies beside the paper's
     published figures, and a row per other benchmark (What'sUp, VSR) whose files are present:
     the runs evaluate those too (train.py --eval_benchmarks), before and after training.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

import benchmarks
import data
import grid_sources
from models import ModelUnavailableError, model_source
from spatial_loss import DEFAULT_SPATIAL_ID_LAYER

REPO = Path(__file__).resolve().parent
# Kang et al. (ICLR 2026), Qwen2-VL-2B-Instruct on COCO-Spatial: the published figures.
PAPER = {"model": "Qwen2-VL-2B-Instruct", "before": 0.77, "baseline": 0.85, "spatial": 0.91}
WHERE = {
    "val_json": "coco_qa_two_obj.json from the What'sUp benchmark (GitHub amitakamath/whatsup_vlms, its data/ folder)",
    "coco": "COCO 2017 validation images: http://images.cocodataset.org/zips/val2017.zip, unzipped so the images "
            "are {id:012d}.jpg in the folder or its val2017/",
    "objects": "one RGBA {object}.png per object ('_' for a space), such as the paper's published Objaverse renders; "
               "or 'builtin' for the 12 drawn objects",
}


def log(message):
    print(f"[reproduce] {message}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="alias (qwen2-2b, tiny-warm, ...), hub id or local folder")
    p.add_argument("--protocol", choices=("paper", "clean"), default="paper")
    p.add_argument("--seeds", default="0", help="space-separated seeds: one baseline and one spatial run each")
    p.add_argument("--train_objects", default="data/renders", metavar="DIR|builtin",
                   help="objects of the training images, drawn on the fly")
    p.add_argument("--id_objects", default="data/id_renders", metavar="DIR|builtin",
                   help="objects of the ID-extraction images (the paper: 10 objects the training does not use)")
    p.add_argument("--train_object_names", nargs="+", default=None, metavar="NAME", help="a subset of --train_objects")
    p.add_argument("--id_object_names", nargs="+", default=None, metavar="NAME", help="a subset of --id_objects")
    p.add_argument("--cell", type=int, default=None, help="cell size in px for both image sets (default 224)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="object sizes for both image sets (default all 4)")
    p.add_argument("--val_json", default="data/coco_qa_two_obj.json")
    p.add_argument("--coco_val_dir", default="data/coco")
    p.add_argument("--whatsup_dir", default="data/whatsup",
                   help="What'sUp's files (eval_coco.py --whatsup_dir); its benchmarks present there are evaluated too")
    p.add_argument("--vsr_dir", default="data/vsr", help="VSR's data/ folder (eval_coco.py --vsr_dir); evaluated if present")
    p.add_argument("--ids", default=None, help="ID file (default embeds/universal_id_90/<model>.pt)")
    p.add_argument("--id_layers", default="all", help="derive_spatial_ids.py --layers")
    p.add_argument("--id_max_groups", type=int, default=None, help="derive_spatial_ids.py --max_groups")
    p.add_argument("--runs_dir", default=None, help="where the runs and the report go (default runs/reproduce_<model>)")
    args, train_extra = p.parse_known_args(argv)
    args.train_extra = train_extra
    args.seeds = args.seeds.split()
    if not args.seeds or not all(s.lstrip("-").isdigit() for s in args.seeds):
        p.error(f"argument --seeds: space-separated integers, not {' '.join(args.seeds)!r}")
    name = Path(args.model).name
    args.ids = args.ids or f"embeds/universal_id_90/{name}.pt"
    args.runs_dir = Path(args.runs_dir or f"runs/reproduce_{name}")
    return args


def layout_flags(args, which):
    """make_grid_data.py's layout flags of one image set, as train.py / derive_spatial_ids.py take them."""
    flags = []
    if args.cell is not None:
        flags += ["--cell", str(args.cell)]
    if args.sizes is not None:
        flags += ["--sizes", *map(str, args.sizes)]
    names = args.train_object_names if which == "train" else args.id_object_names
    if names:
        flags += ["--objects", *names]
    return flags


def _renderer(args, which):
    """The GridRenderer the stage's script will build from the same flags (ValueError: one line)."""
    namespace = argparse.Namespace(cell=args.cell, sizes=args.sizes, no_same_row_or_col=None, local_variation=None,
                                   bg_dir=None, max_pairs=None, max_images=None, grid_seed=None,
                                   objects=args.train_object_names if which == "train" else args.id_object_names,
                                   source=args.train_objects if which == "train" else args.id_objects)
    return grid_sources.renderer_from_args(namespace, "--source", transparent=which == "id")


def check_inputs(args):
    """[one line per problem]: every input, before any model loads."""
    problems = []
    json_path = Path(args.val_json)
    if not json_path.is_file():
        problems.append(f"missing: COCO-Spatial questions --val_json {json_path}: get {WHERE['val_json']}")
    coco_dir = Path(args.coco_val_dir)
    if not coco_dir.is_dir():
        problems.append(f"missing: COCO images --coco_val_dir {coco_dir}: get {WHERE['coco']}")
    elif json_path.is_file():
        try:
            data.load_coco_spatial(json_path, coco_dir, unreadable=[])
        except FileNotFoundError as err:
            problems.append(f"missing: {err} Get {WHERE['coco']}")
        except ValueError as err:
            problems.append(f"bad input: {err}")
    renderers = {}
    for which, flag, source in (("train", "--train_objects", args.train_objects), ("id", "--id_objects", args.id_objects)):
        if source != grid_sources.BUILTIN and not Path(source).is_dir():
            problems.append(f"missing: object renders {flag} {source}: get {WHERE['objects']}")
            continue
        try:
            renderers[which] = _renderer(args, which)
        except ValueError as err:
            problems.append(f"bad input: {flag} {source}: {str(err).removeprefix('argument --source: ')}")
    try:
        model_source(args.model)
    except ModelUnavailableError as err:
        problems.append(f"model: --model {err}")
    return problems, renderers


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------

def run(cmd):
    """Run one stage's command; its failure ends the pipeline with its exit code (its own message
    already printed)."""
    log("$ " + shlex.join(cmd))
    code = subprocess.call(cmd, cwd=REPO)
    if code != 0:
        log(f"stopped: the command above exited with {code}; rerun the same command to continue")
        sys.exit(code)


def ids_provenance_problem(args, renderer):
    """None when the ID file at args.ids can be reused, else why not. A .pt without its provenance
    JSON (written last) is a derivation that was interrupted."""
    pt, provenance = Path(args.ids), Path(args.ids).with_suffix(".json")
    if not pt.is_file():
        return "absent"
    if not provenance.is_file():
        return "incomplete (no provenance JSON: interrupted)"
    try:
        found = json.loads(provenance.read_text())
    except ValueError:
        return "incomplete (unreadable provenance JSON)"
    wanted = {"model": args.model, "protocol": args.protocol, "images": renderer.describe(), "layout": "nested"}
    different = [f"{k}: {found.get(k)!r} (want {v!r})" for k, v in wanted.items() if found.get(k) != v]
    if DEFAULT_SPATIAL_ID_LAYER not in found.get("layers", []):
        different.append(f"layers: {found.get('layers')} lack layer {DEFAULT_SPATIAL_ID_LAYER}")
    return "; ".join(different) or None


def stage_ids(args, renderer):
    problem = ids_provenance_problem(args, renderer)
    if problem is None:
        log(f"ids: skipped, {args.ids} is complete and its provenance matches (model, protocol, images)")
        return
    if not problem.startswith(("absent", "incomplete")):
        # Someone else's IDs: never overwritten silently.
        sys.exit(f"error: --ids {args.ids} was derived from other inputs ({problem}); move it away or pass --ids PATH")
    log(f"ids: deriving {args.ids} ({problem})")
    cmd = [sys.executable, "derive_spatial_ids.py", "--model", args.model, "--protocol", args.protocol,
           "--id_objects", args.id_objects, *layout_flags(args, "id"), "--layers", args.id_layers,
           "--out", args.ids, "--overwrite"]
    if args.id_max_groups:
        cmd += ["--max_groups", str(args.id_max_groups)]
    run(cmd)
    log(f"ids: done, {args.ids}")


def run_state(folder):
    """"complete", "interrupted" (has a checkpoint to resume from) or "new"."""
    metrics = folder / "metrics.jsonl"
    if metrics.is_file() and (folder / "final" / "README.md").is_file():
        events = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if events and events[-1]["event"] == "end":
            return "complete"
    if any(p.name.startswith("checkpoint-") for p in folder.glob("checkpoint-*")):
        return "interrupted"
    return "new"


def stage_run(args, kind, seed):
    folder = args.runs_dir / f"{kind}_seed{seed}"
    state = run_state(folder)
    label = f"{kind} seed {seed}"
    if state == "complete":
        log(f"run {label}: skipped, {folder} is complete (end event, final/README.md)")
        return folder
    script = "run_vision_baseline.sh" if kind == "baseline" else "run_vision_spatial_loss.sh"
    cmd = ["bash", script, args.model, "--train_objects", args.train_objects, *layout_flags(args, "train"),
           "--val_json", args.val_json, "--coco_val_dir", args.coco_val_dir, "--output_dir", str(folder)]
    if kind == "spatial":
        cmd += ["--universal_id_path", args.ids]
    if args.benchmarks:
        cmd += ["--eval_benchmarks", *args.benchmarks, "--whatsup_dir", args.whatsup_dir, "--vsr_dir", args.vsr_dir]
    if torch.cuda.is_available():  # two workers draw and process images faster than an H200 trains on them
        cmd += ["--num_workers", "2"]
    cmd += args.train_extra
    if state == "interrupted":
        log(f"run {label}: resuming {folder} from its latest checkpoint")
        cmd += ["--resume_from_checkpoint", "latest"]
    else:
        log(f"run {label}: training into {folder}")
        cmd += ["--overwrite_output_dir"]  # a folder with no checkpoint holds nothing to keep
    env_cmd = ["env", f"PROTOCOL={args.protocol}", f"SEEDS={seed}", f"PYTHON={sys.executable}", *cmd]
    run(env_cmd)
    log(f"run {label}: done, {folder}")
    return folder


def _end(folder, set_name="coco"):
    """(accuracy at the first evaluation, at the last) of one run on `set_name`."""
    events = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [e for e in events if e["event"] == "eval" and set_name in e]
    return (evals[0][set_name]["accuracy"], evals[-1][set_name]["accuracy"]) if evals else None


def _mean_std(values):
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:.3f}"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.3f} ± {std:.3f}"


def summary_table(args, baselines, spatials):
    """Our COCO-Spatial accuracy before training, after the LM-loss control and after the
    spatial-ID loss (mean ± sample std over seeds), beside the paper's published figures."""
    baseline_ends = [_end(f) for f in baselines]  # each metrics.jsonl read once
    before = [first for first, _ in baseline_ends]
    base = [last for _, last in baseline_ends]
    spatial = [_end(f)[1] for f in spatials]
    seeds = " ".join(args.seeds)
    return "\n".join([
        "| COCO-Spatial accuracy | before training | after the LM-loss control | with the spatial-ID loss |",
        "|---|---|---|---|",
        f"| ours: {args.model}, --protocol {args.protocol}, seeds {seeds} | {_mean_std(before)} | {_mean_std(base)} "
        f"| {_mean_std(spatial)} |",
        f"| the paper's published figures (Kang et al., ICLR 2026; {PAPER['model']}) | {PAPER['before']:.2f} "
        f"| {PAPER['baseline']:.2f} | {PAPER['spatial']:.2f} |",
    ])


def benchmark_table(args, baselines, spatials):
    """A row per other benchmark the runs evaluated: before training, after the LM-loss control,
    with the spatial-ID loss (mean ± sample std over seeds); None without any."""
    rows = []
    for name in args.benchmarks:
        if not all(_end(f, name) for f in baselines + spatials):
            continue  # files added after the runs: `eval_coco.py --benchmark` evaluates their final/
        before = [_end(f, name)[0] for f in baselines]
        rows.append(f"| {name} | {_mean_std(before)} | {_mean_std([_end(f, name)[1] for f in baselines])} "
                    f"| {_mean_std([_end(f, name)[1] for f in spatials])} |")
    if not rows:
        return None
    return "\n".join(["| benchmark (ours; no published figure) | before training | after the LM-loss control "
                      "| with the spatial-ID loss |", "|---|---|---|---|", *rows])


def stage_report(args, baselines, spatials):
    out = args.runs_dir / "compare"
    report, summary = out / "report.md", args.runs_dir / "summary.md"
    newest_run = max((f / "metrics.jsonl").stat().st_mtime for f in baselines + spatials)
    if summary.is_file() and report.is_file() and report.stat().st_mtime >= newest_run:
        log(f"report: skipped, {report} is newer than every run")
        print(summary.read_text())
        return
    run([sys.executable, "compare_runs.py", *map(str, baselines + spatials), "--brief", "--out", str(out)])
    table = summary_table(args, baselines, spatials)
    others = benchmark_table(args, baselines, spatials)
    if others:
        table += "\n\nOther benchmarks, strict reading of answers (eval_coco.py --benchmark; consistency and " \
                 "per-relation numbers in the runs' metrics.jsonl):\n\n" + others
    standin = "standin" in args.val_json
    summary.write_text("\n".join([
        f"# Reproduction: {args.model}", "",
        table, "",
        "Before training: the first run's step-0 evaluation. The paper's row is copied from the paper, not measured here"
        + (f"; ours is on a synthetic STAND-IN ({args.val_json}), not COCO-Spatial, so the rows do not compare."
           if standin else "."), "",
        f"Full comparison (per relation, paired tests, figure): {report}",
        f"Runs: {', '.join(str(f) for f in baselines + spatials)}; IDs: {args.ids}", ""]))
    log(f"report: done, {summary}")
    print(summary.read_text())


def main(argv=None):
    args = parse_args(argv)
    os.chdir(REPO)
    problems, renderers = check_inputs(args)
    if problems:
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    if Path(args.ids).is_file():  # someone else's IDs stop us now, not after the baseline runs
        problem = ids_provenance_problem(args, renderers["id"])
        if problem and not problem.startswith("incomplete"):
            sys.exit(f"error: --ids {args.ids} was derived from other inputs ({problem}); move it away or pass --ids PATH")
    roots = benchmarks.DataRoots(val_json=args.val_json, coco_val_dir=args.coco_val_dir, whatsup_dir=args.whatsup_dir,
                                 vsr_dir=args.vsr_dir)
    args.benchmarks = [n for n in benchmarks.present(roots) if n != "coco_two_obj"]
    absent = [n for n in benchmarks.NAMES if n != "coco_two_obj" and n not in args.benchmarks]
    log(f"inputs: ok (training images {renderers['train'].describe()}; COCO-Spatial {args.val_json}; also evaluated: "
        f"{', '.join(args.benchmarks) or 'no other benchmark'}"
        + (f"; files absent for {', '.join(absent)}: eval_coco.py --benchmark NAME says where to get them)"
           if absent else ")"))
    stage_ids(args, renderers["id"])
    baselines, spatials = [], []
    for seed in args.seeds:
        baselines.append(stage_run(args, "baseline", seed))
        spatials.append(stage_run(args, "spatial", seed))
    stage_report(args, baselines, spatials)


if __name__ == "__main__":
    main()
