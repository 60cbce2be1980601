"""From the downloads to the paper's table in one command (`bash reproduce.sh MODEL` calls this).

    bash reproduce.sh qwen2-2b                         # the paper's experiment, seed 0
    SEEDS="0 1 2" PROTOCOL=clean bash reproduce.sh qwen2-2b --lr 1e-4    # extra flags go to train.py
    SEEDS="0 1 2" bash reproduce.sh qwen2-2b --spatial_id_weights 0 1 10 \
        --arm lm_slice="--selector lm_mlp_lastk --spatial_id_weights 0 10" --launcher slurm --slurm_partition gpu

Stages, each skipped when its output is complete, so a killed pipeline rerun with the same command
continues where it stopped:
  1. inputs: the COCO-Spatial JSON, its COCO images, the object renders of the training and the
     ID-extraction images, the model and an existing ID file's provenance, all checked before any
     model loads; each missing one is named on one line with where to get it;
  2. ids: derive_spatial_ids.py on the ID objects, drawn on the fly (the original's recipe under
     --protocol paper); an ID file whose provenance matches (model, protocol, images) is reused;
  3. runs: for each seed the baseline (LM loss, the paper's control arm, `baseline_seed<S>`) and
     each spatial arm at each of its weights (`<arm>_w<W>_seed<S>`; weight 0 is the weight-0
     control), with the run scripts' defaults and the training images drawn on the fly; a run
     with an `end` event, final/README.md and this sweep's arguments (its run_identity.json) is
     complete (skipped); an interrupted one resumes from its latest checkpoint; one trained with
     other arguments is refused before any work (--restart_changed_runs trains it again), and one
     that another process holds is left to it. `--launcher` runs them one after another here, up to
     --max_parallel at once on this machine, or as a SLURM job array (launchers.py);
  4. report: compare_runs.py over every run (with the dose-response across weights), then
     summary.md: our accuracies beside the paper's published figures, and a row per other
     benchmark (What'sUp, VSR, and the hub's sets) whose files are present: the runs evaluate those too
     (train.py --eval_benchmarks), before and after training.

Arms: `spatial` (run_vision_spatial_loss.sh at each --spatial_id_weights) and the baseline always
run; `--arm NAME="FLAGS"` adds a spatial arm whose train.py FLAGS come after the common ones (e.g.
`--arm lm_slice="--selector lm_mlp_lastk"`); `--spatial_id_weights` among FLAGS gives that arm its
own weights.
"""
import argparse
import contextlib
import io
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from scipy import stats

import benchmarks
import checkpoints
import data
import grid_sources
import launchers
import run_folder
import scoring
import train_args
from launchers import Run, TrainJob, run_changes, run_state
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
    p.add_argument("--seeds", default="0",
                   help="space-separated seeds (whole numbers >= 0, each run once): one baseline and one spatial run each")
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
    p.add_argument("--hub_dir", default=None, help="the hub's sets as REPO_ID/FILE (eval_coco.py --hub_dir; default: the "
                   "hub cache); those present are evaluated (fetch them first: eval_coco.py --benchmark NAME)")
    p.add_argument("--ids", default=None, help="ID file (default embeds/universal_id_90/<model>.pt)")
    p.add_argument("--id_layout", choices=("extraction", "flat"), default="extraction",
                   help="derive_spatial_ids.py --layout: the original's extraction images (transparent canvas) or "
                        "the flat training layout (the demo's, for a model that learnt its code on white)")
    p.add_argument("--id_layers", default="all", help="derive_spatial_ids.py --layers")
    p.add_argument("--id_max_groups", type=int, default=None, help="derive_spatial_ids.py --max_groups")
    p.add_argument("--runs_dir", default=None, help="where the runs and the report go (default runs/reproduce_<model>)")
    sweep = p.add_argument_group("sweep")
    sweep.add_argument("--spatial_id_weights", type=float, nargs="+", default=[1.0], metavar="W",
                       help="the spatial arm runs at each weight (default 1, the paper's); 0 = the weight-0 control")
    sweep.add_argument("--arm", action="append", default=[], metavar='NAME="FLAGS"',
                       help="another spatial arm: train.py FLAGS after the common ones, and optionally its own "
                            "--spatial_id_weights; repeatable. E.g. --arm lm_slice=\"--selector lm_mlp_lastk\"")
    sweep.add_argument("--diagnose_checkpoints", action="store_true",
                       help="ID strength against accuracy: id_diagnostics.py agreement and the spatial loss at every "
                            "saved checkpoint of the spatial runs, beside that checkpoint's accuracy")
    sweep.add_argument("--restart_changed_runs", action="store_true",
                       help="train again from the start every run whose folder holds it with other arguments "
                            "(train_args.IDENTITY_ARGS; default: such a sweep is refused, naming the runs and flags)")
    sweep.add_argument("--report_only", action="store_true",
                       help="write the report from the runs there are, train nothing (the SLURM launcher's last job)")
    launch = p.add_argument_group("launchers (launchers.py, through submitit)")
    launch.add_argument("--launcher", choices=launchers.LAUNCHERS, default="serial",
                        help="serial: one run after another here; local: up to --max_parallel at once on this "
                             "machine, one GPU each (or CPU processes); slurm: a job array")
    launch.add_argument("--max_parallel", type=int, default=None,
                        help="runs at once (local: default the number of GPUs, 1 on a CPU; slurm: the array's %%N)")
    launch.add_argument("--gpus_per_run", type=int, default=1,
                        help="slurm: GPUs per job, 0 or 1 (train.py is one process; 0 on a partition without GPUs)")
    launch.add_argument("--cpus_per_run", type=int, default=None, help="slurm: CPUs per job (--cpus-per-task)")
    launch.add_argument("--timeout_min", type=int, default=24 * 60,
                        help="a job's time limit in minutes (slurm --time; a local job's too); a run that reaches "
                             "it is stopped at a saved step and requeued")
    launch.add_argument("--signal_delay_s", type=int, default=90,
                        help="local and slurm: the warning signal's lead on the end of a job (--signal=USR2@N); "
                             f"at least {launchers.MIN_SIGNAL_DELAY_S}, the time train.py is given to save plus the "
                             "requeue's")
    launch.add_argument("--slurm_partition", default=None)
    launch.add_argument("--slurm_account", default=None)
    launch.add_argument("--slurm_extra", nargs="+", default=[], metavar="KEY=VALUE",
                        help="more sbatch options, e.g. qos=high constraint=a100 exclusive")
    args, train_extra = p.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.train_extra = train_extra
    seeds = args.seeds.split()
    if not seeds or not all(s.isascii() and s.isdigit() and int(s) < 2 ** 32 for s in seeds):
        p.error(f"argument --seeds: space-separated whole numbers >= 0 (and < 2**32), not {args.seeds!r}")
    args.seeds = _each_once([str(int(s)) for s in seeds], "--seeds", "seeds", given=seeds)
    args.spatial_id_weights = _check_weights(p, "--spatial_id_weights", args.spatial_id_weights)
    args.arms = [("spatial", [], args.spatial_id_weights)] + [_parse_arm(p, spec, args.spatial_id_weights)
                                                               for spec in args.arm]
    names = [name for name, _, _ in args.arms]
    if len(set(names)) != len(names):
        p.error(f"argument --arm: arm names must differ, not {' '.join(names)}")
    set_by_sweep = [flag for flag in train_extra if flag.split("=")[0] in SWEEP_FLAGS]
    if set_by_sweep:
        p.error(f"argument {set_by_sweep[0]}: the sweep sets it per run (use --seeds, --spatial_id_weights, --runs_dir)")
    for flag in ("max_parallel", "gpus_per_run", "timeout_min", "signal_delay_s", "cpus_per_run"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "gpus_per_run" else 1):
            p.error(f"argument --{flag}: must be >= {0 if flag == 'gpus_per_run' else 1}, not {value}")
    if problem := launchers.launch_flag_problem(args):
        p.error(problem)
    args.gpus = launchers.visible_gpus(torch.cuda.device_count()) if args.launcher == "local" else []
    if args.launcher == "local":
        args.max_parallel = args.max_parallel or max(1, len(args.gpus))
        if args.gpus and args.max_parallel > len(args.gpus):
            p.error(f"argument --max_parallel: {args.max_parallel} runs at once with one GPU each, but "
                    f"{len(args.gpus)} GPU(s) are visible")
    name = Path(args.model).name
    args.ids = args.ids or f"embeds/universal_id_90/{name}.pt"
    args.runs_dir = Path(args.runs_dir or f"runs/reproduce_{name}")
    args.benchmarks = []  # the other benchmarks the runs evaluate: main fills it from the files present
    return args


# train.py flags the sweep sets for each run itself.
SWEEP_FLAGS = {"--output_dir", "--seed", "--spatial_id_weight", "--universal_id_path", "--resume_from_checkpoint",
               "--overwrite_output_dir"}
ARM_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")


def _each_once(values, flag, noun, given=None):
    """Each value once, in the order given; a repeat (the same run twice, two jobs in one folder)
    is said in one line."""
    unique = list(dict.fromkeys(values))
    if len(unique) < len(values):
        log(f"{flag}: {' '.join(map(str, given or values))} gives {len(unique)} distinct {noun}: "
            f"{' '.join(map(str, unique))} (each runs once)")
    return unique


def _check_weights(p, flag, weights):
    bad = [w for w in weights if not (math.isfinite(w) and w >= 0)]
    if bad:
        p.error(f"argument {flag}: weights must be finite and >= 0, not {bad[0]}")
    return _each_once(weights, flag, "weights", given=[weight_name(w) for w in weights])


def _parse_arm(p, spec, default_weights):
    """(name, train.py flags, weights) of one --arm NAME="FLAGS"."""
    name, sep, flags = spec.partition("=")
    if not sep or not ARM_NAME.fullmatch(name) or name in ("baseline", "spatial"):
        p.error(f"argument --arm: NAME=\"FLAGS\" with a NAME of letters, digits, _ . - other than baseline and "
                f"spatial, not {spec!r}")
    try:
        tokens = shlex.split(flags)
    except ValueError as err:
        p.error(f"argument --arm {name}: {err} in {flags!r}")
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--spatial_id_weights", type=float, nargs="+", default=default_weights)
    known, train_flags = own.parse_known_args(tokens)
    if not train_flags:
        p.error(f"argument --arm {name}: gives no train.py flag, so it would repeat the spatial arm")
    for flag in train_flags:
        if flag.split("=")[0] in SWEEP_FLAGS:
            p.error(f"argument --arm {name}: {flag} is set by the sweep for each run")
    return name, train_flags, _check_weights(p, f"--arm {name} --spatial_id_weights", known.spatial_id_weights)


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
    return grid_sources.renderer_from_args(namespace, "--source", transparent=which == "id" and args.id_layout == "extraction")


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
    wanted = {"model": args.model, "protocol": args.protocol, "images": renderer.describe(),
              "layout": "nested" if args.id_layout == "extraction" else "flat"}
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
    run(ids_command(args))
    log(f"ids: done, {args.ids}")


def weight_name(weight):
    """The weight as a run's name and its command show it, exactly: 1.0 -> "1", 0.5 -> "0.5",
    1.0000001 -> "1.0000001" (the shortest form that reads back as the same float; only digits,
    ".", "e", "+" and "-", so a safe folder name)."""
    short = f"{weight:g}"
    return short if float(short) == weight else repr(float(weight))


def train_command(args, seed, folder, weight=None, arm_flags=()):
    """The run script's command for one run (the baseline when `weight` is None), without the
    resume flags, which the job adds when it starts."""
    script = "run_vision_baseline.sh" if weight is None else "run_vision_spatial_loss.sh"
    cmd = ["bash", script, args.model, "--train_objects", args.train_objects, *layout_flags(args, "train"),
           "--val_json", args.val_json, "--coco_val_dir", args.coco_val_dir, "--output_dir", str(folder)]
    if weight is not None:
        cmd += ["--universal_id_path", args.ids]
    if args.benchmarks:
        cmd += ["--eval_benchmarks", *args.benchmarks, "--whatsup_dir", args.whatsup_dir, "--vsr_dir", args.vsr_dir]
        if getattr(args, "hub_dir", None):
            cmd += ["--hub_dir", args.hub_dir]
    gpu = args.gpus_per_run > 0 if args.launcher == "slurm" else torch.cuda.is_available()
    if gpu:  # two workers draw and process images faster than an H200 trains on them
        cmd += ["--num_workers", "2"]
    cmd += [*args.train_extra, *arm_flags]
    if weight is not None:
        cmd += ["--spatial_id_weight", weight_name(weight)]
    return ["env", f"PROTOCOL={args.protocol}", f"SEEDS={seed}", f"PYTHON={sys.executable}", *cmd]


# What the run scripts run instead of Python when reproduce.py reads their train.py command.
ARGV_PRINTER = "#!/bin/sh\nprintf '%s\\000' \"$@\"\n"


def identity_from_script(run, printer):
    """The arguments that define `run` (train_args.run_identity), from the train.py command its run
    script would start: the script runs with `printer` in place of Python (a shell start, not
    Python's imports), and train.py's own parser reads what it prints. A command train.py would
    refuse stops the sweep here, in one line naming the run."""
    start = run.command.index("bash")
    command = [f"PYTHON={printer}" if i < start and part.startswith("PYTHON=") else part
               for i, part in enumerate(run.command)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: run {run.name}: its run script failed ({(done.stderr.strip() or '?').splitlines()[-1]})")
    argv = done.stdout.split("\0")[:-1]
    told = io.StringIO()
    try:
        with contextlib.redirect_stderr(told), contextlib.redirect_stdout(told):
            parsed = train_args.parse_args(argv[1:])
    except SystemExit:
        sys.exit(f"error: run {run.name}: {(told.getvalue().strip() or 'train.py would stop').splitlines()[-1]}")
    return train_args.run_identity(parsed)


def plan_runs(args):
    """Every run of the sweep, seed by seed (a sweep stopped early has whole seeds): the baseline,
    then each arm at each of its weights; each with the arguments that define it."""
    runs = []
    for seed in args.seeds:
        folder = args.runs_dir / f"baseline_seed{seed}"
        runs.append(Run(folder.name, "baseline", None, int(seed), folder, train_command(args, seed, folder)))
        for arm, flags, weights in args.arms:
            for weight in weights:
                folder = args.runs_dir / f"{arm}_w{weight_name(weight)}_seed{seed}"
                runs.append(Run(folder.name, arm, weight, int(seed), folder,
                                train_command(args, seed, folder, weight, flags)))
    with tempfile.TemporaryDirectory() as tmp:
        printer = Path(tmp) / "print_argv"
        printer.write_text(ARGV_PRINTER)
        printer.chmod(0o755)
        for r in runs:
            r.identity = identity_from_script(r, printer)
            r.restart_changed = args.restart_changed_runs
    return runs


def ids_command(args):
    cmd = [sys.executable, "derive_spatial_ids.py", "--model", args.model, "--protocol", args.protocol,
           "--id_objects", args.id_objects, *layout_flags(args, "id"), "--layout", args.id_layout,
           "--layers", args.id_layers, "--out", args.ids, "--overwrite"]
    if args.id_max_groups:
        cmd += ["--max_groups", str(args.id_max_groups)]
    return cmd


def _evaluations(folder):
    """The eval events of one run, in order."""
    events = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [e for e in events if e["event"] == "eval"]


def _first_last(evals, set_name="coco"):
    """(accuracy at the first evaluation, at the last) on `set_name` of one run's eval events."""
    evals = [e for e in evals if set_name in e]
    return (evals[0][set_name]["accuracy"], evals[-1][set_name]["accuracy"]) if evals else None


def _mean_std(values):
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:.3f}"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.3f} ± {std:.3f}"


def paper_weight_runs(runs):
    """The spatial arm's runs at the paper's weight (1), or at its smallest non-zero weight."""
    spatial = [r for r in runs if r.arm == "spatial" and r.weight]
    weight = 1.0 if any(r.weight == 1.0 for r in spatial) else min((r.weight for r in spatial), default=None)
    return [r for r in spatial if r.weight == weight], weight


def summary_table(args, runs, evals):
    """Our COCO-Spatial accuracy before training, after the LM-loss control and after the
    spatial-ID loss (mean ± sample std over seeds), beside the paper's published figures."""
    baselines = [r.folder for r in runs if r.arm == "baseline"]
    spatials, weight = paper_weight_runs(runs)
    before = [_first_last(evals[f])[0] for f in baselines]
    base = [_first_last(evals[f])[1] for f in baselines]
    spatial = [_first_last(evals[r.folder])[1] for r in spatials]
    seeds = " ".join(args.seeds)
    return "\n".join([
        "| COCO-Spatial accuracy | before training | after the LM-loss control | with the spatial-ID loss"
        + (f" (weight {weight_name(weight)})" if weight not in (None, 1.0) else "") + " |",
        "|---|---|---|---|",
        f"| ours: {args.model}, --protocol {args.protocol}, seeds {seeds} | {_mean_std(before) if before else '-'} "
        f"| {_mean_std(base) if base else '-'} | {_mean_std(spatial) if spatial else '-'} |",
        f"| the paper's published figures (Kang et al., ICLR 2026; {PAPER['model']}) | {PAPER['before']:.2f} "
        f"| {PAPER['baseline']:.2f} | {PAPER['spatial']:.2f} |",
    ])


def benchmark_table(args, runs, evals):
    """A row per other benchmark the runs evaluated: before training, after the LM-loss control,
    with the spatial-ID loss at the paper's weight (mean ± sample std over seeds); None without any."""
    baselines = [r.folder for r in runs if r.arm == "baseline"]
    spatials = [r.folder for r in paper_weight_runs(runs)[0]]
    rows = []
    for name in args.benchmarks:
        ends = {f: _first_last(evals[f], name) for f in baselines + spatials}
        if not all(ends.values()):
            continue  # files added after the runs: `eval_coco.py --benchmark` evaluates their final/
        rows.append(f"| {name} | {_mean_std([ends[f][0] for f in baselines])} "
                    f"| {_mean_std([ends[f][1] for f in baselines])} | {_mean_std([ends[f][1] for f in spatials])} |")
    if not rows:
        return None
    return "\n".join(["| benchmark (ours; no published figure) | before training | after the LM-loss control "
                      "| with the spatial-ID loss |", "|---|---|---|---|", *rows])


def rows_line(evals, set_names):
    """"Rows evaluated: coco all 440 rows; vsr 500 of 1,222 rows, sampled (seed 0)" from the runs'
    last evaluation reports ("" when none records its rows)."""
    notes = {}
    for name in set_names:
        found = {scoring.selection_note(e[name]["selection"]) for events in evals.values() for e in events[-1:]
                 if isinstance(e.get(name), dict) and e[name].get("selection")}
        if found:
            notes[name] = " / ".join(sorted(found))
    return ("Rows evaluated: " + "; ".join(f"{name} {note}" for name, note in notes.items()) + ".") if notes else ""


def stage_report(args, runs):
    out = args.runs_dir / "compare"
    report, summary = out / "report.md", args.runs_dir / "summary.md"
    present = [r for r in runs if (r.folder / "metrics.jsonl").is_file()]
    missing = [r.name for r in runs if r not in present]
    if not present:
        sys.exit(f"error: report: none of the {len(runs)} runs has started in {args.runs_dir}")
    newest_run = max((r.folder / "metrics.jsonl").stat().st_mtime for r in present)
    diagnosed = not args.diagnose_checkpoints or (out / "id_strength.md").is_file()
    if summary.is_file() and report.is_file() and report.stat().st_mtime >= newest_run and not missing and diagnosed:
        log(f"report: skipped, {report} is newer than every run")
        print(summary.read_text())
        return
    run([sys.executable, "compare_runs.py", *(str(r.folder) for r in present), "--brief", "--dose_response",
         "--out", str(out)])
    evals = {r.folder: _evaluations(r.folder) for r in present}  # each metrics.jsonl read once
    table = summary_table(args, present, evals)
    others = benchmark_table(args, present, evals)
    if others:
        table += "\n\nOther benchmarks, strict reading of answers (eval_coco.py --benchmark; consistency and " \
                 "per-relation numbers in the runs' metrics.jsonl):\n\n" + others
    rows = rows_line(evals, ["coco", *args.benchmarks])
    if rows:
        table += "\n\n" + rows
    strength = stage_diagnose(args, present) if args.diagnose_checkpoints else ""
    if strength:
        (out / "id_strength.md").write_text(strength)
        print(strength)
    standin = "standin" in args.val_json
    summary.write_text("\n".join([
        f"# Reproduction: {args.model}", "",
        table, "",
        "Before training: the first run's step-0 evaluation. The paper's row is copied from the paper, not measured here"
        + (f"; ours is on a synthetic STAND-IN ({args.val_json}), not COCO-Spatial, so the rows do not compare."
           if standin else "."), "",
        f"Full comparison (dose-response across weights, per relation, paired tests, figures): {report}",
        *([f"ID strength against accuracy: {out / 'id_strength.md'}"] if strength else []),
        f"Runs: {', '.join(str(r.folder) for r in present)}; IDs: {args.ids}",
        *([f"NOT STARTED: {', '.join(missing)}"] if missing else []), ""]))
    log(f"report: done, {summary}")
    print(summary.read_text())


def _events(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def diagnose_images(args):
    """The ID objects' images written to a folder once (id_diagnostics.py reads a folder), with the
    layout and flags the IDs were derived from."""
    folder = args.runs_dir / "diagnose_images"
    done = folder / ".complete"
    if not done.is_file():
        source = [] if args.id_objects == grid_sources.BUILTIN else ["--objects_dir", args.id_objects]
        run([sys.executable, "make_grid_data.py", "--out_dir", str(folder), *source, *layout_flags(args, "id"),
             "--layout", args.id_layout])
        done.write_text("")
    return folder


STRENGTH_TITLE = "ID strength against accuracy at every saved checkpoint (--diagnose_checkpoints)"


def stage_diagnose(args, runs):
    """ID strength against accuracy: id_diagnostics.py on every saved checkpoint of the spatial runs
    (ID agreement and the spatial loss the IDs give, at the loss's layer), beside the accuracy the
    run measured at that step; Spearman's rho over all of them. Each checkpoint's diagnostics are
    kept in RUN/id_diagnostics/checkpoint-N/ and not redone. Returns the markdown."""
    layer = DEFAULT_SPATIAL_ID_LAYER
    if "--spatial_id_layer" in args.train_extra:
        layer = int(args.train_extra[args.train_extra.index("--spatial_id_layer") + 1])
    images = diagnose_images(args)
    sets = ("coco", "holdout")
    rows, points = [], []
    diagnosed = [r for r in runs if r.weight is not None and run_state(r.folder, r.identity) == "complete"]
    undone = [folder for r in diagnosed for _, folder in checkpoints.list_checkpoints(r.folder)
              if not (r.folder / "id_diagnostics" / folder.name / "diagnostics.json").is_file()]
    if undone:  # one process for the sweep's checkpoints: the images and questions prepared once
        log(f"diagnose: {', '.join(str(f) for f in undone)}")
        run([sys.executable, "id_diagnostics.py", "--ids", args.ids, "--checkpoints", *map(str, undone),
             "--out_in_runs", "--images", str(images), "--layers", str(layer),
             *(["--max_groups", str(args.id_max_groups)] if args.id_max_groups else [])])
    for r in diagnosed:
        evals = {e["step"]: e for e in _events(r.folder) if e["event"] == "eval"}
        for step, folder in checkpoints.list_checkpoints(r.folder):
            out = r.folder / "id_diagnostics" / folder.name
            found = json.loads((out / "diagnostics.json").read_text())["layers"][str(layer)]
            accuracy = {name: evals.get(step, {}).get(name, {}).get("accuracy") for name in sets}
            agreement, loss = found.get("id_agreement"), found.get("spatial_loss_step0")
            points.append((agreement, loss, accuracy))
            rows.append(f"| {r.name} | {step} | {_num(agreement)} | {_num(loss, 4)} | "
                        + " | ".join(_num(accuracy[name]) for name in sets) + " |")
    if not rows:
        return ""
    lines = [f"## {STRENGTH_TITLE}", "",
             "| run | checkpoint step | ID agreement | spatial loss | COCO-Spatial accuracy | holdout accuracy |",
             "|---|---|---|---|---|---|", *rows, ""]
    for name in sets:
        for label, index in (("ID agreement", 0), ("spatial loss", 1)):
            pairs = [(p[index], p[2][name]) for p in points if p[index] is not None and p[2][name] is not None]
            if len(pairs) >= 3 and len({a for a, _ in pairs}) > 1 and len({b for _, b in pairs}) > 1:
                rho, pvalue = stats.spearmanr(*zip(*pairs))
                lines.append(f"- {label} against {name} accuracy: Spearman rho {rho:+.2f} (p {pvalue:.3g}, "
                             f"{len(pairs)} checkpoints)")
    lines += ["", f"Layer {layer}; IDs {args.ids}; images {images} (the ID objects). *ID agreement*: cosine between "
              "one object pair's per-cell states and those of the pairs sharing no object with it (the checkpoint's "
              "own code); *spatial loss*: the loss these IDs give the checkpoint over the spatial arm's batches of "
              "those images (id_diagnostics.py). Checkpoints of one run are not independent: read rho as a "
              "description, not a test.", ""]
    return "\n".join(lines)


def _num(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def check_ids_owner(args, renderer):
    """Someone else's IDs stop us now, not after the baseline runs."""
    if Path(args.ids).is_file():
        problem = ids_provenance_problem(args, renderer)
        if problem and not problem.startswith("incomplete"):
            sys.exit(f"error: --ids {args.ids} was derived from other inputs ({problem}); move it away or pass --ids PATH")


def stage_runs(args, runs, renderer):
    """The IDs, then every run that is not complete, through --launcher; the report after them
    (queued as the last job under slurm). Returns False when the report must wait (slurm)."""
    log_dir = args.runs_dir / "logs"
    states = {r.name: run_state(r.folder, r.identity) for r in runs}
    changed = [r for r in runs if states[r.name] == "changed"]
    if changed and not args.restart_changed_runs:  # before any work: never passed off as this sweep's
        for r in changed:
            print(f"error: run {r.name}: {r.folder} holds it trained with other arguments (then → now): "
                  f"{run_folder.describe_changes(run_changes(r.folder, r.identity))}; rerun with those, or pass "
                  "--restart_changed_runs to train it again from the start", file=sys.stderr)
        sys.exit(2)
    if args.launcher != "slurm":
        stage_ids(args, renderer)
    pending = []
    for r in runs:
        if states[r.name] == "complete":
            log(f"run {r.name}: skipped, {r.folder} is complete (end event, final/README.md, the same arguments)")
        elif states[r.name] == "running":
            log(f"run {r.name}: skipped, {r.folder} is being trained by {run_folder.describe_holder(r.folder)}")
        else:
            if states[r.name] == "changed":
                log(f"run {r.name}: {r.folder} holds it with other arguments "
                    f"({run_folder.describe_changes(run_changes(r.folder, r.identity))}): training it again from "
                    "the start (--restart_changed_runs)")
            # The warning's lead, less the requeue's margin, is train.py's time to save.
            pending.append(TrainJob(r, REPO, log_dir, grace_s=args.signal_delay_s - launchers.REQUEUE_MARGIN_S))
    if args.launcher == "slurm":
        ids_job = None
        if ids_provenance_problem(args, renderer) is not None:
            log(f"ids: {args.ids} is to be derived first")
            ids_job = launchers.CommandJob("ids", ids_command(args), REPO)
        report_job = launchers.CommandJob("report", [sys.executable, str(REPO / "reproduce.py"), *args.argv,
                                                     "--report_only"], REPO)
        launchers.launch_slurm(args, pending, ids_job, report_job, log_dir, log)
        log("queued; the same command again later skips what finished and queues the rest")
        return False
    if args.launcher == "serial":
        launchers.launch_serial(pending, log)
        return True
    log(f"runs: {len(pending)} to train, up to {args.max_parallel} at once on "
        + (f"GPUs {args.gpus}" if args.gpus else "the CPU") + f" (local launcher; logs in {log_dir})")
    failures = launchers.launch_local(pending, log, log_dir, args.max_parallel, args.gpus, args.timeout_min,
                                      args.signal_delay_s)
    if failures:
        log(f"stopped: {len(failures)} run(s) did not finish ({', '.join(name for name, _ in failures)}); "
            "rerun the same command to continue")
        sys.exit(1)
    return True


def main(argv=None):
    args = parse_args(argv)
    os.chdir(REPO)
    problems, renderers = check_inputs(args)
    if problems:
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    check_ids_owner(args, renderers["id"])
    roots = benchmarks.DataRoots(val_json=args.val_json, coco_val_dir=args.coco_val_dir, whatsup_dir=args.whatsup_dir,
                                 vsr_dir=args.vsr_dir, hub_dir=args.hub_dir)
    args.benchmarks = [n for n in benchmarks.present(roots) if n != "coco_two_obj"]
    absent = [n for n in benchmarks.NAMES if n != "coco_two_obj" and n not in args.benchmarks]
    log(f"inputs: ok (training images {renderers['train'].describe()}; COCO-Spatial {args.val_json}; also evaluated: "
        f"{', '.join(args.benchmarks) or 'no other benchmark'}"
        + (f"; files absent for {', '.join(absent)}: eval_coco.py --benchmark NAME says where to get them)"
           if absent else ")"))
    runs = plan_runs(args)
    if args.report_only or stage_runs(args, runs, renderers["id"]):
        stage_report(args, runs)


if __name__ == "__main__":
    main()
