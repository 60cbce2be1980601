"""Compare run folders written by train.py: accuracy per evaluation step (runs or seed groups),
paired significance on the same questions, a figure and a report.

    python compare_runs.py runs/tiny_baseline_seed0 runs/tiny_spatial_seed0
    python compare_runs.py runs/base_seed{0,1,2} runs/spatial_seed{0,1,2} --out runs/compare_seeds

Seed groups: runs whose config.json "args" are equal except for seed, output_dir and the
bookkeeping flags overwrite_output_dir, resume_from_checkpoint and report_to form one group
(the same experiment under different seeds). --labels overrides this: runs given the same
label form one group, whatever their arguments.

Printed, and written to OUT/report.md: the plain first/last table; per evaluation step the
accuracy of each run (or the seed group's mean ± sample std) overall and per relation, with
question counts, on COCO-Spatial and the holdout pairs; and paired statistics of every group
against the first one on the same questions, at each group's final and best step: McNemar's
exact test and a seeded bootstrap 95% interval of the accuracy difference (resampling
questions). Seed groups are pooled per question by majority vote, a tie counting as wrong
(--pairing majority), or tested run against run of the same seed (--pairing per-seed). The figure
OUT/compare.png shows accuracy over steps (±std band for seed groups) and the LM and spatial-ID
losses. Runs without an "end" event are marked [INCOMPLETE] everywhere.

A spatial run given with its weight-0 control (the same arguments and seed, `--spatial_id_weight
0`) is also compared on the spatial-ID loss itself, step by step over the same batches: the mean
difference over the last half of the steps with a moving-block bootstrap interval, so that
optimisation shows against drift, or its absence does.

--dose_response (reproduce.py's sweeps): spatial runs whose arguments differ only in the seed and
--spatial_id_weight form one arm; per arm and weight, the final accuracy on every evaluated set and
the spatial-ID loss over the last half of the steps, mean ± sample std over seeds; paired tests of
each weight against the arm's weight-0 control and of each arm and weight against the baseline
(runs of the same seed paired: the difference per seed and a paired t-test over seeds, which
measures training noise; and the seeds pooled per question by majority, McNemar and the
bootstrap, which hold the models fixed); the figure OUT/dose_response.png: weight against accuracy
and against the spatial-ID loss.

--lmms_eval BASELINE_OUT OTHER_OUT: instead of run folders, two lmms-eval --output_path folders
written with --log_samples (the general-ability check, docs/evaluation.md): per task both logged,
McNemar and the bootstrap on the same questions (doc_id; doc_hash must agree).
"""
import argparse
import json
import math
import re
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
from scipy import stats

import benchmarks
import scoring

SETS = {"coco": "COCO-Spatial", "holdout": "holdout pairs"}
# Arguments that do not change what a run computes: runs differing only in these are seeds of
# one experiment.
GROUPING_IGNORES = ("seed", "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "report_to")
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
INCOMPLETE = "[INCOMPLETE]"


class CompareError(Exception):
    """A problem with the input; main() prints it as one line and exits non-zero."""


# --- reading run folders ---------------------------------------------------------------------

def read_jsonl(path, partial_last_line_ok=False):
    """The JSON objects of a .jsonl file. With partial_last_line_ok, a broken last line (a run
    still writing, or killed mid-write) is skipped with a warning instead of refused."""
    lines = [(n, line) for n, line in enumerate(Path(path).read_text().splitlines(), start=1) if line.strip()]
    events = []
    for number, line in lines:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            event = None
        if isinstance(event, dict):
            events.append(event)
        elif partial_last_line_ok and number == lines[-1][0]:
            print(f"warning: {path}: line {number} is cut short (run still writing, or killed); ignored",
                  file=sys.stderr)
        else:
            raise CompareError(f"{path}: line {number} is not a JSON object")
    return events


def load_run(folder):
    """Everything compare_runs needs from one run folder, or a CompareError naming what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CompareError(f"{folder}: no such folder")
    metrics_path, config_path = folder / "metrics.jsonl", folder / "config.json"
    if not metrics_path.is_file():
        raise CompareError(f"{folder}: not a run folder (no metrics.jsonl; runs are written by train.py)")
    if not config_path.is_file():
        raise CompareError(f"{folder}: not a run folder (no config.json; runs are written by train.py)")
    events = read_jsonl(metrics_path, partial_last_line_ok=True)
    if not events:
        raise CompareError(f"{metrics_path}: empty (no events recorded; did the run start?)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError:
        config = None
    # Without its arguments a run could not be grouped with its seeds.
    if not isinstance(config, dict) or not isinstance(config.get("args"), dict):
        raise CompareError(f"{config_path}: not a train.py config (a JSON object with \"args\")")
    # One entry per step: a resumed run may have re-logged a step; the later one wins.
    evals = {e.get("step"): e for e in events if e.get("event") == "eval"}
    if not evals:
        raise CompareError(f"{metrics_path}: no evaluation recorded")
    for step, event in evals.items():
        if not isinstance(step, int) or "accuracy" not in event.get("coco", {}):
            raise CompareError(f"{metrics_path}: an eval event lacks a step or a COCO accuracy: {json.dumps(event)[:120]}")
    ends = [e for e in events if e.get("event") == "end"]
    return {
        "name": folder.name,
        "folder": folder,
        "config": config,
        "args": config["args"],
        "evals": [evals[s] for s in sorted(evals)],
        "train": [e for e in events if e.get("event") == "train"],
        "end": ends[-1] if ends else None,
    }


def is_complete(run):
    return run["end"] is not None


def run_label(run):
    return run["name"] if is_complete(run) else f"{run['name']} {INCOMPLETE}"


def summary_row(run):
    """The plain first/last numbers of one run."""
    evals, train = run["evals"], run["train"]
    spatial = [e["spatial_loss"] for e in train if "spatial_loss" in e]
    return {
        "run": run_label(run),
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


def read_run(folder):
    return summary_row(load_run(folder))


def _fmt(value, digits=3):
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def table(rows):
    """The plain table, first thing printed (rows from summary_row)."""
    header = ["run", "steps", "COCO before", "COCO after", "holdout before", "holdout after",
              "LM loss first→last", "spatial loss first→last"]
    cells = [[r["run"], str(r["steps"]), _fmt(r["coco_before"]), _fmt(r["coco_after"]),
              _fmt(r["holdout_before"]), _fmt(r["holdout_after"]),
              f"{_fmt(r['lm_loss_first'])}→{_fmt(r['lm_loss_last'])}",
              f"{_fmt(r['spatial_first'])}→{_fmt(r['spatial_last'])}" if r["spatial_first"] is not None else "-"]
             for r in rows]
    widths = [max(len(row[i]) for row in [header] + cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in [header] + cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --- seed groups -----------------------------------------------------------------------------

def grouping_key(args, ignores=GROUPING_IGNORES):
    """What runs of one experiment share: their arguments less `ignores`."""
    return json.dumps({k: v for k, v in args.items() if k not in ignores}, sort_keys=True, default=str)


def automatic_group_name(runs):
    if len(runs) == 1:
        return runs[0]["name"]
    # runs/x_seed0, runs/x_seed1 -> x
    stripped = {re.sub(r"[_-]?seed\d+", "", r["name"]) for r in runs}
    if len(stripped) == 1 and stripped != {""}:
        return stripped.pop()
    return f"{runs[0]['name']}+{len(runs) - 1}"


def group_runs(runs, labels=None):
    """[{"name", "runs"}] in order of first appearance: by --labels when given, else by config args."""
    if labels is not None and len(labels) != len(runs):
        raise CompareError(f"--labels gives {len(labels)} labels for {len(runs)} runs; give one per run")
    keys = labels if labels is not None else [grouping_key(r["args"]) for r in runs]
    grouped = {}
    for key, run in zip(keys, runs):
        grouped.setdefault(key, []).append(run)
    groups = []
    for key, members in grouped.items():
        name = key if labels is not None else automatic_group_name(members)
        # Two automatic names may coincide (same folder name under two parents): number them.
        taken = [g["name"] for g in groups]
        if name in taken:
            name = f"{name} ({len(taken) + 1})"
        groups.append({"name": name, "runs": members})
    return groups


def group_label(group):
    incomplete = [r["name"] for r in group["runs"] if not is_complete(r)]
    if not incomplete:
        return group["name"]
    if len(group["runs"]) == 1:
        return f"{group['name']} {INCOMPLETE}"
    return f"{group['name']} {INCOMPLETE}: {', '.join(incomplete)}"


# --- accuracy per evaluation step ------------------------------------------------------------

def mean_std(values):
    """Mean and sample standard deviation (ddof=1; None for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def reports_at(group, step, set_name):
    """The accuracy reports of the group's runs that evaluated `set_name` at `step`."""
    reports = []
    for run in group["runs"]:
        event = next((e for e in run["evals"] if e["step"] == step), None)
        if event is not None and set_name in event:
            reports.append(event[set_name])
    return reports


def accuracy_cell(reports, relation=None):
    """'0.600 (29/48)' for one run, '0.600 ± 0.100 (n=48)' for a seed group, '-' when absent."""
    parts = [r if relation is None else r.get("per_relation", {}).get(relation) for r in reports]
    parts = [p for p in parts if p is not None]
    if not parts:
        return "-"
    if len(parts) == 1:
        return f"{parts[0]['accuracy']:.3f} ({parts[0]['correct']}/{parts[0]['n']})"
    mean, std = mean_std([p["accuracy"] for p in parts])
    ns = sorted({p["n"] for p in parts})
    n = str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
    return f"{mean:.3f} ± {std:.3f} (n={n})"


def group_steps(group):
    return sorted({e["step"] for r in group["runs"] for e in r["evals"]})


def step_table(groups, set_name):
    """Markdown table: one row per (step, group), overall and per-relation accuracy; None if
    no run evaluated this set."""
    relations = sorted({rel for g in groups for r in g["runs"] for e in r["evals"]
                        for rel in e.get(set_name, {}).get("per_relation", {})})
    rows = []
    for step in sorted({s for g in groups for s in group_steps(g)}):
        for g in groups:
            reports = reports_at(g, step, set_name)
            if not reports:
                continue
            rows.append([step, group_label(g), f"{len(reports)}/{len(g['runs'])}", accuracy_cell(reports)]
                        + [accuracy_cell(reports, rel) for rel in relations])
    if not rows:
        return None
    return markdown_table(["step", "run / group", "runs", "all"] + relations, rows)


# --- paired statistics -----------------------------------------------------------------------

def mcnemar_exact(b, c):
    """Two-sided exact McNemar p-value: b and c are the discordant counts (A right/B wrong and
    A wrong/B right); under H0 each discordant pair goes either way with probability 1/2."""
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    tail = Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2 ** n)  # exact, no float underflow
    return float(min(Fraction(1), 2 * tail))


def bootstrap_interval(a, b, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED, level=0.95):
    """Percentile bootstrap interval of mean(b) - mean(a), resampling questions (paired: one
    index picks both runs' answer to the same question)."""
    diff = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    rng = np.random.default_rng(seed)
    means = []
    chunk = max(1, 2_000_000 // len(diff))  # resamples per batch: about 16 MB of indices at most
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, len(diff), size=(min(chunk, resamples - start), len(diff)))
        means.append(diff[idx].mean(axis=1))
    means = np.concatenate(means)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def question_key(row):
    """The identity of one question: its set, its question text and where it came from. COCO rows
    carry their row in the JSON and the image id, which survive a moved image folder; grid
    (holdout) rows carry only the image path."""
    where = (row.get("row"), row.get("image_id"))
    if where == (None, None):
        where = (row.get("image_path"),)
    return (row.get("set", "coco"), *where, row.get("question"))


def predictions_path(run, step):
    return run["folder"] / "predictions" / f"step-{step}.jsonl"


def load_correctness(run, step, set_name):
    """{question key: correct} of one run's saved predictions at `step` on `set_name`."""
    path = predictions_path(run, step)
    if not path.is_file():
        raise CompareError(f"{path}: missing; the paired test needs the per-question predictions "
                           f"train.py saves at each evaluation")
    correct, seen = {}, {}
    for row in read_jsonl(path):
        if row.get("set", "coco") != set_name or row.get("order", "asked") != "asked" or row.get("rotation"):
            continue  # a benchmark's swapped and option-rotated questions are its checks, not its score
        key = question_key(row)
        # Identical rows (same question text, no row/image id) stay distinct by their order.
        seen[key] = seen.get(key, 0) + 1
        if "correct" not in row:
            raise CompareError(f"{path}: a row has no \"correct\" field: {json.dumps(row)[:120]}")
        correct[key + (seen[key],)] = bool(row["correct"])
    if not correct:
        raise CompareError(f"{path}: no {SETS.get(set_name, set_name)} predictions")
    return correct


def same_questions_or_fail(first, first_path, other, other_path, set_name):
    if first.keys() == other.keys():
        return
    only_first, only_other = len(first.keys() - other.keys()), len(other.keys() - first.keys())
    raise CompareError(f"the {SETS.get(set_name, set_name)} questions differ between {first_path} "
                       f"({len(first)} questions, {only_first} not in the other) and {other_path} "
                       f"({len(other)}, {only_other} not in the first); a paired test needs the same questions")


def group_correctness(group, step, set_name, reference=None):
    """(question keys, correct per question, first predictions file) of a group at `step`: a seed
    group's runs vote and a question counts as right when most of them got it right (a tie, which
    an even number of seeds can give, counts as wrong). `reference` is ({key: ...}, path) that
    every run's questions must equal."""
    per_run = []
    for run in group["runs"]:
        correct = load_correctness(run, step, set_name)
        path = predictions_path(run, step)
        if reference is None:
            reference = (correct, path)
        same_questions_or_fail(reference[0], reference[1], correct, path, set_name)
        per_run.append(correct)
    keys = sorted(per_run[0], key=repr)
    votes = np.array([[r[k] for k in keys] for r in per_run], dtype=int)  # runs × questions
    return keys, votes.sum(axis=0) * 2 > len(per_run), predictions_path(group["runs"][0], step)


def common_steps(group, set_name):
    """Steps at which every run of the group evaluated `set_name`."""
    steps = [{e["step"] for e in r["evals"] if set_name in e} for r in group["runs"]]
    return sorted(set.intersection(*steps))


def final_and_best_steps(group, set_name):
    """The last step every run reached, and the step of the best mean accuracy (earliest on a
    tie). The best step is chosen on the same questions it is tested on: optimistic."""
    steps = common_steps(group, set_name)
    if not steps:
        return None, None
    def mean_accuracy(step):
        return mean_std([r["accuracy"] for r in reports_at(group, step, set_name)])[0]
    best = max(steps, key=lambda s: (mean_accuracy(s), -s))
    return steps[-1], best


def paired_comparison(reference, other, set_name, ref_step, other_step):
    """McNemar and bootstrap of `other` against `reference` on the same questions; every number is
    of the (pooled) right/wrong answers, so they describe one and the same comparison."""
    keys, ref, ref_path = group_correctness(reference, ref_step, set_name)
    _, oth, _ = group_correctness(other, other_step, set_name, reference=(dict.fromkeys(keys), ref_path))
    return paired_stats(ref, oth)


def paired_stats(ref, other):
    """McNemar and bootstrap of two right/wrong lists over the same questions, in the same order."""
    ref, oth = np.asarray(ref, dtype=bool), np.asarray(other, dtype=bool)
    b = int(np.sum(ref & ~oth))  # reference right, other wrong
    c = int(np.sum(~ref & oth))
    low, high = bootstrap_interval(ref, oth)
    return {"n": len(ref), "ref_acc": float(ref.mean()), "other_acc": float(oth.mean()),
            "b": b, "c": c, "p": mcnemar_exact(b, c),
            "diff": float(oth.mean() - ref.mean()), "low": low, "high": high}


def single(run):
    return {"name": run["name"], "runs": [run]}


def seed_pairs(reference, other):
    """(reference run, other run) pairs with the same config seed; two single runs pair whatever
    their seeds."""
    if len(reference["runs"]) == len(other["runs"]) == 1:
        return [(reference["runs"][0], other["runs"][0])]
    by_seed = {r["args"].get("seed"): r for r in other["runs"]}
    pairs = [(r, by_seed[r["args"].get("seed")]) for r in reference["runs"] if r["args"].get("seed") in by_seed]
    if not pairs:
        raise CompareError(f"--pairing per-seed: {group_label(reference)} and {group_label(other)} share no "
                           f"seed; use --pairing majority")
    return pairs


def comparisons(groups, pairing):
    """(reference, other) units to test, each group against the first: whole groups (majority
    vote), or runs of the same seed as one-run groups (per-seed)."""
    reference = groups[0]
    for other in groups[1:]:
        if pairing == "majority":
            yield reference, other
        else:
            for ref_run, other_run in seed_pairs(reference, other):
                yield single(ref_run), single(other_run)


def stat_cells(s):
    """The table cells of one paired_stats result, from the question count to the p-value."""
    return [s["n"], f"{s['ref_acc']:.3f}", f"{s['other_acc']:.3f}", f"{s['diff']:+.3f}",
            f"[{s['low']:+.3f}, {s['high']:+.3f}]", f"{s['c']} / {s['b']}", f"{s['p']:.4g}"]


def paired_rows(groups, set_name, pairing="majority"):
    rows = []
    for reference, other in comparisons(groups, pairing):
        ref_final, ref_best = final_and_best_steps(reference, set_name)
        other_final, other_best = final_and_best_steps(other, set_name)
        if ref_final is None or other_final is None:
            continue
        for which, ref_step, other_step in (("final", ref_final, other_final), ("best", ref_best, other_best)):
            s = paired_comparison(reference, other, set_name, ref_step, other_step)
            rows.append([which, f"{group_label(other)} @{other_step} vs {group_label(reference)} @{ref_step}",
                         *stat_cells(s)])
    return rows


def learning_check(group, set_name):
    """McNemar and bootstrap of a group's final step against its first evaluation (step 0 when
    it evaluated before training), on the same questions; None without two common steps."""
    steps = common_steps(group, set_name)
    if len(steps) < 2:
        return None
    result = paired_comparison(group, group, set_name, steps[0], steps[-1])
    return dict(result, first_step=steps[0], final_step=steps[-1])


def learning_rows(groups, set_name):
    rows = []
    for group in groups:
        s = learning_check(group, set_name)
        if s is not None:
            rows.append([group_label(group), f"@{s['first_step']} → @{s['final_step']}", *stat_cells(s)])
    return rows


LEARNING_HEADER = ["run or group", "steps", "questions", "acc first", "acc final", "difference",
                   "bootstrap 95% CI", "discordant (final only / first only)", "McNemar exact p"]
LEARNING_NOTE = ("Each run (seed groups pooled per question by majority vote) against itself before "
                 "training, on the same questions: a small p with a positive difference says training "
                 "changed the answers for the better, not only the loss.")


PAIRED_HEADER = ["step", "comparison", "questions", "acc reference", "acc other", "difference",
                 "bootstrap 95% CI", "discordant (other only / ref only)", "McNemar exact p"]

PAIRING_NOTES = {
    "majority": "Seed groups are pooled per question by majority vote of their seeds (a tie counts as "
                "wrong); the accuracies here are of those pooled answers and can differ from the seed "
                "means above.",
    "per-seed": "Per seed: each run is tested against the reference group's run of the same seed "
                "(two single runs are paired whatever their seeds); a seed without a partner is left out.",
}


def paired_note(reference, pairing):
    return (f"Paired on the same questions, each group against the first ({reference}). "
            f"{PAIRING_NOTES[pairing]} McNemar's exact test: two-sided binomial test of the discordant "
            f"questions (right in one, wrong in the other) against 1/2. The difference is other − reference; "
            f"its 95% interval is a percentile bootstrap over questions ({BOOTSTRAP_RESAMPLES:,} resamples, "
            f"seed {BOOTSTRAP_SEED}). \"final\" is the last step every run of a group reached; \"best\" is "
            f"a group's step of highest mean accuracy on this same set, so its p-value is optimistic.")


# --- the spatial loss against its weight-0 control -------------------------------------------

# A weight-0 control differs from its spatial run in the loss weight alone: same seed, so the same
# batches in the same order, and the same starting weights. Bookkeeping flags may differ too.
CONTROL_MAY_DIFFER = ("spatial_id_weight", "output_dir", "overwrite_output_dir", "resume_from_checkpoint",
                      "report_to")
BLOCK_BOOTSTRAP_RESAMPLES = 10_000
SPATIAL_CONTROL_TITLE = "spatial-ID loss against its weight-0 control (same seed, same batches)"
SPATIAL_CONTROL_HEADER = ["run", "weight-0 control", "steps paired", "step-1 difference",
                          "spatial loss, last half (run / control)", "difference", "95% interval",
                          "reading"]
SPATIAL_CONTROL_NOTE = (
    "Both runs log the spatial-ID loss at every logging step; the control's loss sends no gradient, so "
    "its curve is what drift alone does to the loss (the LM loss moving the same weights). The "
    "difference is run minus control, averaged over the last half of the paired steps; the interval "
    "is a moving-block bootstrap over steps (blocks of about the square root of the number of steps, "
    "so that neighbouring, correlated steps are resampled together; seed 0). The step-1 difference "
    "checks the pairing: before the first update both runs see the same batch with the same weights, "
    "so it is 0 when the batches are the same (checked only when both log every step).")


def is_weight0_control(run):
    args = run["args"]
    return bool(args.get("universal_id_path")) and args.get("spatial_id_weight") == 0


def spatial_points(run):
    """{step: logged spatial-ID loss}."""
    return {e["step"]: e["spatial_loss"] for e in run["train"] if e.get("spatial_loss") is not None}


def block_bootstrap_interval(values, resamples=BLOCK_BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED, level=0.95,
                             block=None):
    """Percentile interval of the mean of a series by a moving-block bootstrap: resamples built
    from random runs of `block` consecutive values (default about sqrt(n)), which keeps the
    correlation between neighbouring steps that a plain bootstrap would break."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    block = block or max(1, round(math.sqrt(n)))
    block = min(block, n)
    n_blocks = math.ceil(n / block)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n - block + 1, size=(resamples, n_blocks))
    idx = (starts[:, :, None] + np.arange(block)[None, None, :]).reshape(resamples, -1)[:, :n]
    means = values[idx].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def spatial_vs_control(run, control):
    """The paired comparison of a spatial run's logged spatial-ID loss with its control's."""
    a, c = spatial_points(run), spatial_points(control)
    steps = sorted(set(a) & set(c))
    if len(steps) < 2:
        return None
    half = steps[len(steps) // 2:]
    diff = [a[s] - c[s] for s in half]
    mean = sum(diff) / len(diff)
    low, high = block_bootstrap_interval(diff)
    every_step = run["args"].get("log_every") == 1 and control["args"].get("log_every") == 1
    first = a[steps[0]] - c[steps[0]] if every_step and steps[0] == 1 else None
    return {"steps": len(steps), "first_difference": first, "run_mean": sum(a[s] for s in half) / len(half),
            "control_mean": sum(c[s] for s in half) / len(half), "difference": mean, "low": low, "high": high}


def spatial_control_rows(runs):
    """One row per spatial run (spatial_id_weight > 0) that has a weight-0 control among `runs`."""
    controls = {}
    for r in runs:
        if is_weight0_control(r):
            controls.setdefault(grouping_key(r["args"], CONTROL_MAY_DIFFER), r)
    rows = []
    for r in runs:
        if not r["args"].get("universal_id_path") or is_weight0_control(r):
            continue
        control = controls.get(grouping_key(r["args"], CONTROL_MAY_DIFFER))
        stats = spatial_vs_control(r, control) if control is not None else None
        if stats is None:
            continue
        if stats["high"] < 0:
            reading = "below the control: the loss is optimised beyond drift"
        elif stats["low"] > 0:
            reading = "above the control"
        else:
            reading = "no difference from the control: drift"
        first = stats["first_difference"]
        if first is not None and abs(first) > 1e-5:
            reading += f"; NOT PAIRED: the step-1 losses differ by {first:.2g}, so the batches or weights differ"
        rows.append([run_label(r), run_label(control), stats["steps"], "-" if first is None else f"{first:.2g}",
                     f"{_fmt(stats['run_mean'])} / {_fmt(stats['control_mean'])}", f"{stats['difference']:+.4f}",
                     f"[{stats['low']:+.4f}, {stats['high']:+.4f}]", reading])
    return rows


# --- dose-response: arms across spatial-ID weights ---------------------------------------------

# Runs of one arm differ in the seed and the spatial-ID weight only.
ARM_IGNORES = GROUPING_IGNORES + ("spatial_id_weight",)
DOSE_TITLE = "dose-response: final accuracy and spatial-ID loss per arm and weight"
DOSE_PAIRED_TITLE = "dose-response: paired tests against the weight-0 control and the baseline"
DOSE_NOTE = (
    "Cells: mean ± sample std over seeds (seeds in the third column) of each run's last evaluation; the "
    "spatial-ID loss is each run's mean over the last half of its logged steps. Weight 0 is the weight-0 "
    "control: the spatial arm's batches with the loss logged but sending no gradient.")
DOSE_PAIRED_HEADER = ["comparison", "measure", "seeds paired", "difference per seed (mean ± sd)",
                      "paired t-test p (seeds)", "pooled answers: difference [95% CI]", "McNemar p (pooled)"]
DOSE_PAIRED_NOTE = (
    "Differences are the row's arm and weight minus its reference, run against run of the same seed (same "
    "data order; the weight-0 control also has the same batches). The t-test over seeds measures training "
    "noise (few seeds: wide); the pooled columns take each side's seeds by majority per question (a tie "
    "counts as wrong) and test the answers with McNemar and a bootstrap over questions, which hold the "
    "trained models fixed. '-' where a side lacks the measure or fewer than 2 seeds pair.")


def spatial_weight(group):
    """The group's spatial-ID weight; None for runs without the spatial loss (a baseline)."""
    args = group["runs"][0]["args"]
    return args.get("spatial_id_weight") if args.get("universal_id_path") else None


def dose_arms(groups):
    """([(arm name, [(weight, group)] by weight)], the first baseline group or None)."""
    arms = {}
    for g in groups:
        if spatial_weight(g) is not None:
            arms.setdefault(grouping_key(g["runs"][0]["args"], ARM_IGNORES), []).append((spatial_weight(g), g))
    named = []
    for members in arms.values():
        members.sort(key=lambda m: m[0])
        # spatial_w10_seed0 or spatial_w10 -> spatial
        name = re.sub(r"[_-]?w[0-9.e+-]+$", "", re.sub(r"[_-]?seed\d+", "", members[0][1]["name"])) or members[0][1]["name"]
        if name in [n for n, _ in named]:
            name = f"{name} ({len(named) + 1})"
        named.append((name, members))
    baseline = next((g for g in groups if spatial_weight(g) is None), None)
    return named, baseline


def final_accuracy(run, set_name):
    event = next((e for e in reversed(run["evals"]) if set_name in e), None)
    return event[set_name]["accuracy"] if event else None


def last_half_spatial_loss(run):
    points = spatial_points(run)
    steps = sorted(points)[len(points) // 2:]
    return sum(points[s] for s in steps) / len(steps) if steps else None


def _mean_sd_cell(values, digits=3):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean, sd = mean_std(values)
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def dose_measures(groups):
    """[(measure name, function of a run)]: every evaluated set's final accuracy, the spatial loss."""
    sets = [name for name in SETS if any(final_accuracy(r, name) is not None for g in groups for r in g["runs"])]
    return [(f"{SETS[name]} accuracy", (lambda n: lambda run: final_accuracy(run, n))(name)) for name in sets] \
        + [("spatial-ID loss, last half", last_half_spatial_loss)]


def dose_rows(groups):
    arms, baseline = dose_arms(groups)
    measures = dose_measures(groups)
    rows = []
    units = ([("baseline", "-", baseline)] if baseline else []) + [(name, f"{w:g}", g) for name, members in arms
                                                                     for w, g in members]
    for name, weight, g in units:
        rows.append([name, weight, len(g["runs"])] + [_mean_sd_cell([f(r) for r in g["runs"]], 4 if "loss" in m else 3)
                                                      for m, f in measures])
    return ["arm", "weight", "seeds"] + [m for m, _ in measures], rows


def _seed_paired(reference, other, measure):
    """Per-seed differences other - reference of `measure` (runs of the same seed)."""
    by_seed = {r["args"].get("seed"): r for r in reference["runs"]}
    diffs = []
    for run in other["runs"]:
        ref = by_seed.get(run["args"].get("seed"))
        if ref is not None and measure(run) is not None and measure(ref) is not None:
            diffs.append(measure(run) - measure(ref))
    return diffs


def _paired_t_p(diffs):
    if len(diffs) < 2 or np.std(diffs) == 0:
        return None
    return float(stats.ttest_1samp(diffs, 0.0).pvalue)


def dose_paired_rows(groups):
    arms, baseline = dose_arms(groups)
    comparisons_ = []
    for name, members in arms:
        control = next((g for w, g in members if w == 0), None)
        for w, g in members:
            if control is not None and w != 0:
                comparisons_.append((f"{name} w={w:g} vs its weight-0 control", control, g))
            if baseline is not None:
                comparisons_.append((f"{name} w={w:g} vs baseline", baseline, g))
    rows = []
    for label, reference, other in comparisons_:
        for measure, f in dose_measures(groups):
            if "loss" in measure and spatial_weight(reference) is None:
                continue  # the baseline logs no spatial-ID loss
            diffs = _seed_paired(reference, other, f)
            if not diffs:
                continue
            p = _paired_t_p(diffs)
            pooled = ["-", "-"]
            set_name = next((k for k, v in SETS.items() if measure == f"{v} accuracy"), None)
            if set_name is not None:
                ref_final, _ = final_and_best_steps(reference, set_name)
                other_final, _ = final_and_best_steps(other, set_name)
                if ref_final is not None and other_final is not None:
                    st = paired_comparison(reference, other, set_name, ref_final, other_final)
                    pooled = [f"{st['diff']:+.3f} [{st['low']:+.3f}, {st['high']:+.3f}]", f"{st['p']:.4g}"]
            digits = 4 if "loss" in measure else 3
            mean, sd = mean_std(diffs)
            rows.append([label, measure, len(diffs), f"{mean:+.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else ""),
                         "-" if p is None else f"{p:.3g}", *pooled])
    return rows


def dose_sections(groups):
    header, rows = dose_rows(groups)
    sections = [(DOSE_TITLE, markdown_table(header, rows) + "\n\n" + DOSE_NOTE)]
    paired = dose_paired_rows(groups)
    if paired:
        sections.append((DOSE_PAIRED_TITLE, markdown_table(DOSE_PAIRED_HEADER, paired) + "\n\n" + DOSE_PAIRED_NOTE))
    return sections


def plot_dose_response(groups, path):
    """Weight against each set's final accuracy and against the spatial-ID loss: one line per arm
    (mean ± sd over seeds, each seed a faint dot), the baseline as a band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms, baseline = dose_arms(groups)
    measures = dose_measures(groups)
    fig, axes = plt.subplots(1, len(measures), figsize=(5 * len(measures), 4.2))
    for ax, (measure, f) in zip(np.atleast_1d(axes), measures):
        for i, (name, members) in enumerate(arms):
            weights, means, sds = [], [], []
            for w, g in members:
                values = [f(r) for r in g["runs"] if f(r) is not None]
                if not values:
                    continue
                mean, sd = mean_std(values)
                weights.append(w)
                means.append(mean)
                sds.append(sd or 0.0)
                ax.plot([w] * len(values), values, "o", color=f"C{i}", alpha=0.3, ms=4)
            if weights:
                ax.errorbar(weights, means, yerr=sds, marker="osD^v"[i % 5], color=f"C{i}", capsize=4,
                            label=f"{name} (mean ± sd over seeds)")
        if baseline is not None and "loss" not in measure:
            values = [f(r) for r in baseline["runs"] if f(r) is not None]
            if values:
                mean, sd = mean_std(values)
                ax.axhline(mean, color="gray", ls="--", label="baseline (mean ± sd)")
                ax.axhspan(mean - (sd or 0), mean + (sd or 0), color="gray", alpha=0.15)
        ax.set_xscale("symlog", linthresh=1)
        top = max((w for _, members in arms for w, _ in members), default=1)
        ax.set_xlim(-0.5, max(top, 1) * 1.6)  # the baseline band would stretch the axis below 0
        ax.set_xlabel("spatial-ID loss weight (0 = weight-0 control)")
        ax.set_ylabel(measure)
        ax.set_title(measure)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- figure ----------------------------------------------------------------------------------

def curve(group, points_of_run):
    """(steps, mean, std) over the runs of a group; at each step, over the runs that logged it
    (as in the tables), so an incomplete seed does not cut the group's curve short."""
    per_run = [dict(points_of_run(r)) for r in group["runs"]]
    steps = sorted({s for p in per_run for s in p})
    stats = [mean_std([p[s] for p in per_run if s in p]) for s in steps]
    return steps, [m for m, _ in stats], [sd or 0.0 for _, sd in stats]


def accuracy_points(set_name):
    return lambda run: [(e["step"], e[set_name]["accuracy"]) for e in run["evals"] if set_name in e]


def loss_points(name):
    return lambda run: [(e["step"], e[name]) for e in run["train"] if e.get(name) is not None]


def plot(groups, path):
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display on servers; must come before pyplot
        import matplotlib.pyplot as plt
    except ImportError:
        raise CompareError("the figure needs matplotlib: pip install matplotlib") from None
    panels = [("COCO-Spatial accuracy", accuracy_points("coco")),
              ("holdout-pair accuracy", accuracy_points("holdout")),
              ("LM loss", loss_points("lm_loss")),
              ("spatial-ID loss", loss_points("spatial_loss"))]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (title, points) in zip(axes.flat, panels):
        drawn = False
        for i, g in enumerate(groups):
            steps, mean, std = curve(g, points)
            if not steps:
                continue
            drawn = True
            incomplete = any(not is_complete(r) for r in g["runs"])
            label = g["name"] + (f" ({len(g['runs'])} seeds, ±std)" if len(g["runs"]) > 1 else "") \
                + (" INCOMPLETE" if incomplete else "")
            color = f"C{i}"
            # Distinct open markers keep a run visible where another one lies exactly on top of it.
            ax.plot(steps, mean, marker="osD^v"[i % 5], ms=7 - i % 4, mfc="none", color=color, label=label,
                    ls="--" if incomplete else "-")
            if len(g["runs"]) > 1:
                ax.fill_between(steps, np.subtract(mean, std), np.add(mean, std), color=color, alpha=0.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy" if "accuracy" in title else "loss (mean of the logging window)")
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged by these runs", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- report ----------------------------------------------------------------------------------

def provenance_rows(groups):
    rows = []
    for g in groups:
        for r in g["runs"]:
            config = r["config"]
            commit = (config.get("git_commit") or "-")[:12] + (" (dirty)" if config.get("git_dirty") else "")
            rows.append([run_label(r), g["name"], r["args"].get("seed", "-"), r["args"].get("protocol", "-"),
                         commit, str(r["folder"])])
    return rows


def command_lines(groups):
    """Each run's exact command, and the command of every resume, as markdown list items."""
    lines = []
    for r in (r for g in groups for r in g["runs"]):
        lines.append(f"- {run_label(r)}: `{r['config'].get('command', '-')}`")
        for resumed in r["config"].get("resumed", []):
            lines.append(f"  - resumed at step {resumed.get('step')}: `{resumed.get('command', '-')}`")
    return "\n".join(lines)


def default_out(groups, first_folder):
    names = "_vs_".join(re.sub(r"[^A-Za-z0-9_.-]+", "-", g["name"]) for g in groups)
    return Path(first_folder).parent / f"compare_{names}"[:120]


def evaluated_sets(groups):
    """{set name: title}: COCO-Spatial and the holdout pairs, then each benchmark that some run
    evaluated (train.py --eval_benchmarks), in benchmarks.NAMES order."""
    found = {key for g in groups for r in g["runs"] for e in r["evals"] for key in e}
    return dict(SETS) | {name: name for name in benchmarks.NAMES if name in found}


def rows_note(groups, set_name):
    """Which rows of `set_name` the runs evaluated ("all 2,247 rows", "500 of 2,247 rows, sampled
    (seed 0)"), from the evaluation reports; several notes when the runs differ, "" when no report
    records it."""
    notes = sorted({scoring.selection_note(e[set_name]["selection"]) for g in groups for r in g["runs"]
                    for e in r["evals"] if isinstance(e.get(set_name), dict) and e[set_name].get("selection")})
    return f" Rows: {'; '.join(notes)}." if notes else ""


def build_sections(groups, pairing="majority"):
    """[(title, text)] of everything after the plain table."""
    sets = evaluated_sets(groups)
    sections = [("Runs and seed groups", markdown_table(
        ["run", "group", "seed", "protocol", "git commit", "folder"], provenance_rows(groups))
        + "\n\nCommands:\n\n" + command_lines(groups))]
    for set_name, title in sets.items():
        text = step_table(groups, set_name)
        if text is not None:
            sections.append((f"{title}: accuracy per evaluation step", text + "\n\nCells: accuracy (correct/n) for "
                             "one run; mean ± sample std over seeds (n questions per seed) for a seed group. "
                             "'runs' counts the group's runs evaluated at that step." + rows_note(groups, set_name)))
    for set_name, title in sets.items():
        rows = learning_rows(groups, set_name)
        if rows:
            sections.append((f"{title}: did training change the answers? (first vs final step)",
                             markdown_table(LEARNING_HEADER, rows) + "\n\n" + LEARNING_NOTE))
    rows = spatial_control_rows([r for g in groups for r in g["runs"]])
    if rows:
        sections.append((SPATIAL_CONTROL_TITLE, markdown_table(SPATIAL_CONTROL_HEADER, rows) + "\n\n" + SPATIAL_CONTROL_NOTE))
    if len(groups) > 1:
        for set_name, title in sets.items():
            rows = paired_rows(groups, set_name, pairing)
            if rows:
                sections.append((f"{title}: paired statistics ({pairing})",
                                  markdown_table(PAIRED_HEADER, rows) + "\n\n"
                                  + paired_note(group_label(groups[0]), pairing)))
    return sections


def write_report(out, plain, sections, figure, extra_figures=()):
    lines = ["# Run comparison", "", "```", plain, "```", ""]
    if INCOMPLETE in plain:
        lines += [f"Runs marked {INCOMPLETE} have no \"end\" event: they stopped early or are still running.", ""]
    for title, text in sections:
        lines += [f"## {title}", "", text, ""]
    lines += ["## Figure", "", f"![accuracy and losses over steps]({figure.name})", ""]
    for title, path in extra_figures:
        lines += [f"![{title}]({path.name})", ""]
    (out / "report.md").write_text("\n".join(lines))


# --- lmms-eval's logged samples (general ability, before and after finetuning) ----------------

# Keys of a logged sample (lmms-eval --log_samples) that are not metrics; the others are the task's
# per-question metric values.
LMMS_SAMPLE_KEYS = {"doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "token_counts", "doc_hash",
                    "input", "input_media"}
# Where a per-question metric that is a dict keeps its right/wrong (cv_bench/blink/embspatial:
# is_correct; pope, mme, 3dsrbench: score).
LMMS_CORRECT_FIELDS = ("is_correct", "correct", "score", "acc", "accuracy", "exact_match")


def lmms_correct(sample):
    """(metric, right or wrong) of one logged sample: its first metric whose value, or whose
    dict's is_correct/score/..., is 0 or 1; None when none is (a judge-scored task, say)."""
    for key, value in sample.items():
        if key in LMMS_SAMPLE_KEYS:
            continue
        if isinstance(value, dict):
            value = next((value[f] for f in LMMS_CORRECT_FIELDS if f in value), None)
        if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
            return key, bool(value)
    return None


def read_lmms_samples(folder):
    """{task: {doc_id: (doc_hash, right or wrong)}} from the newest *_samples_<task>.jsonl of each
    task under an lmms-eval --output_path, and [tasks whose samples hold no right/wrong]."""
    files = sorted(Path(folder).rglob("*_samples_*.jsonl"))
    if not files:
        raise CompareError(f"{folder}: no lmms-eval samples (*_samples_<task>.jsonl); run lmms_eval with --log_samples")
    newest = {}
    for path in files:  # names start with lmms-eval's date id, so the last one sorted is the newest
        newest[path.name.split("_samples_", 1)[1][:-len(".jsonl")]] = path
    tasks, unscored = {}, []
    for task, path in sorted(newest.items()):
        rows = {}
        for sample in read_jsonl(path):
            got = lmms_correct(sample)
            if got is None:
                unscored.append(task)
                break
            rows[sample["doc_id"]] = (sample.get("doc_hash"), got[1])
        else:
            tasks[task] = rows
    return tasks, unscored


def lmms_rows(reference, other, reference_label, other_label):
    """Markdown rows: per task both folders logged, McNemar and the bootstrap of `other` against
    `reference` on the same questions (doc_id, and doc_hash where both logged it)."""
    rows = []
    for task in sorted(set(reference) & set(other)):
        ref, oth = reference[task], other[task]
        if set(ref) != set(oth):
            raise CompareError(f"lmms-eval task {task}: {len(ref)} and {len(oth)} logged questions, not the same "
                               f"ones (evaluate both with the same --limit)")
        changed = [d for d in ref if ref[d][0] and oth[d][0] and ref[d][0] != oth[d][0]]
        if changed:
            raise CompareError(f"lmms-eval task {task}: question {changed[0]} differs between the two (doc_hash)")
        order = sorted(ref, key=str)
        s = paired_stats([ref[d][1] for d in order], [oth[d][1] for d in order])
        rows.append([task, f"{other_label} vs {reference_label}", *stat_cells(s)])
    return rows


def main_lmms(reference, other, labels):
    """compare_runs.py --lmms_eval BASELINE_OUT OTHER_OUT: paired tests per task on lmms-eval's
    logged samples."""
    try:
        (ref, ref_unscored), (oth, oth_unscored) = read_lmms_samples(reference), read_lmms_samples(other)
        rows = lmms_rows(ref, oth, *labels)
    except (CompareError, OSError, ValueError) as err:
        sys.exit(f"error: {err}")
    left_out = sorted(set(ref_unscored) | set(oth_unscored) | (set(ref) ^ set(oth)))
    text = markdown_table(["task"] + PAIRED_HEADER[1:], rows)
    print(f"## lmms-eval: paired statistics per task\n\n{text}")
    if left_out:
        print(f"\nnot compared ({len(left_out)}): {', '.join(left_out)} (logged by one side only, or no per-question "
              "right/wrong in the samples)")
    return {"rows": rows, "left_out": left_out}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="run folders written by train.py")
    parser.add_argument("--lmms_eval", nargs=2, metavar=("BASELINE_OUT", "OTHER_OUT"), default=None,
                        help="instead of run folders: two lmms-eval --output_path folders run with --log_samples; "
                             "paired tests per task on the same questions (--labels: their two labels)")
    parser.add_argument("--labels", nargs="+", help="one label per run; runs with the same label form one "
                                                    "seed group (default: group by config args, see above)")
    parser.add_argument("--pairing", choices=("majority", "per-seed"), default="majority",
                        help="paired tests of seed groups: pool each group's seeds per question by majority "
                             "vote (default), or test run against run of the same seed")
    parser.add_argument("--out", help="folder for report.md and compare.png "
                                      "(default: compare_<groups> next to the first run)")
    parser.add_argument("--brief", action="store_true",
                        help="print only the plain table, the holdout first-vs-final test, the holdout paired "
                             "statistics against the first group, the spatial loss against its weight-0 control and "
                             "where the report went (the report is complete)")
    parser.add_argument("--dose_response", action="store_true",
                        help="per arm and spatial-ID weight: final accuracies and spatial loss (mean ± sd over seeds), "
                             "paired tests against the weight-0 control and the baseline, OUT/dose_response.png")
    args = parser.parse_args(argv)
    if args.lmms_eval:
        if args.runs:
            parser.error("argument --lmms_eval: compares two lmms-eval folders, not run folders as well")
        if args.labels and len(args.labels) != 2:
            parser.error(f"argument --labels: {len(args.labels)} labels for the two --lmms_eval folders")
        return main_lmms(*args.lmms_eval, args.labels or [Path(p).name for p in args.lmms_eval])
    if not args.runs:
        parser.error("the following arguments are required: runs (or --lmms_eval BASELINE_OUT OTHER_OUT)")
    if args.labels and len(args.labels) != len(args.runs):
        parser.error(f"argument --labels: {len(args.labels)} labels for {len(args.runs)} runs (one per run)")
    try:
        runs = [load_run(r) for r in args.runs]
        groups = group_runs(runs, args.labels)
        plain = table([summary_row(r) for r in runs])
        print(plain)
        sections = build_sections(groups, args.pairing)
        if args.dose_response:
            sections = dose_sections(groups) + sections
        # --brief keeps the questions a demo asks: did training change the holdout answers, do the
        # runs differ from the first on them, and is the spatial loss optimised beyond drift?
        shown = [(t, x) for t, x in sections if not args.brief or t.startswith(f"{SETS['holdout']}: did training")
                 or t.startswith(f"{SETS['holdout']}: paired statistics") or t == SPATIAL_CONTROL_TITLE
                 or t.startswith("dose-response")]
        for title, text in shown:
            print(f"\n## {title}\n\n{text}")
        out = Path(args.out) if args.out else default_out(groups, args.runs[0])
        out.mkdir(parents=True, exist_ok=True)
        figure = out / "compare.png"
        plot(groups, figure)
        extra = []
        if args.dose_response:
            extra.append(("weight against accuracy and the spatial-ID loss", out / "dose_response.png"))
            plot_dose_response(groups, extra[-1][1])
        write_report(out, plain, sections, figure, extra)
    except (CompareError, OSError) as err:  # OSError: an unreadable run or an unwritable --out
        sys.exit(f"error: {err}")
    print(f"\nreport: {out / 'report.md'}\nfigure: {figure}" + "".join(f"\nfigure: {path}" for _, path in extra))
    return {"runs": runs, "groups": groups, "out": out}


if __name__ == "__main__":
    main()
