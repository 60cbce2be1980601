"""compare_runs.py on synthetic run folders (no models): statistics against hand-computed values,
seed groups, incomplete runs, the figure, the report and the bad-input messages."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import compare_runs as cr

REPO = Path(__file__).resolve().parents[1]
RELATIONS = ("left", "right")


def _report(answers, correct):
    per = {}
    for answer, ok in zip(answers, correct):
        c, n = per.get(answer, (0, 0))
        per[answer] = (c + ok, n + 1)
    total = sum(correct)
    return {"accuracy": total / len(correct), "correct": total, "n": len(correct),
            "per_relation": {rel: {"accuracy": c / n, "correct": c, "n": n} for rel, (c, n) in sorted(per.items())}}


def write_run(folder, coco, holdout=None, *, seed=0, args=None, complete=True, spatial=True, questions=None):
    """A run folder as train.py writes it. `coco` / `holdout`: {step: [correct per question]}; question i
    asks about relation RELATIONS[i % 2]."""
    folder = Path(folder)
    (folder / "predictions").mkdir(parents=True)
    run_args = {"model_name": "tiny", "lr": 1e-3, "seed": seed, "output_dir": str(folder), "protocol": "paper",
                **(args or {})}
    (folder / "config.json").write_text(json.dumps({"args": run_args, "command": f"train.py --seed {seed}",
                                                    "git_commit": "abc123def4567890", "git_dirty": False}))
    events = []
    for step in sorted(coco):
        if step:
            train = {"event": "train", "step": step, "lr": 1e-3, "lm_loss": 2.0 / (1 + step), "loss": 2.0 / (1 + step)}
            if spatial:
                train["spatial_loss"] = 1.0 / (1 + step)
            events.append(train)
        rows, event = [], {"event": "eval", "step": step}
        for set_name, by_step in (("coco", coco), ("holdout", holdout)):
            if by_step is None:
                continue
            correct = by_step[step]
            answers = [RELATIONS[i % 2] for i in range(len(correct))]
            event[set_name] = _report(answers, correct)
            for i, (answer, ok) in enumerate(zip(answers, correct)):
                other = RELATIONS[(i + 1) % 2]
                question = (questions or {}).get(i, f"Is thing {i} to the left or right of the other?")
                rows.append({"set": set_name, "row": i if set_name == "coco" else None,
                             "image_path": f"img/{set_name}_{i}.png", "question": question,
                             "answer": answer, "prediction": answer if ok else other, "correct": bool(ok)})
        events.append(event)
        (folder / "predictions" / f"step-{step}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if complete:
        events.append({"event": "end", "step": max(coco)})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return folder


def bools(n_correct, n):
    return [True] * n_correct + [False] * (n - n_correct)


def error_of(argv):
    with pytest.raises(SystemExit) as exc:
        cr.main([str(a) for a in argv])
    assert isinstance(exc.value.code, str), exc.value.code
    return exc.value.code


# --- statistics against hand-computed values -----------------------------------------------

@pytest.mark.fast
@pytest.mark.parametrize("b, c, p", [
    (0, 5, 0.0625),            # 2 * (1/2)^5
    (5, 0, 0.0625),            # symmetric
    (3, 3, 1.0),               # b = c
    (0, 0, 1.0),               # no discordant pairs
    (2, 8, 0.109375),          # 2 * (1 + 10 + 45) / 1024
    (1, 9, 0.021484375),       # 2 * (1 + 10) / 1024
    (4, 5, 1.0),               # 2 * P(X <= 4 | n=9) = 2 * 256/512, capped at 1
])
def test_mcnemar_exact_matches_hand_computed_values(b, c, p):
    assert cr.mcnemar_exact(b, c) == pytest.approx(p, abs=1e-12)


@pytest.mark.fast
def test_mcnemar_exact_survives_many_discordant_pairs():
    p = cr.mcnemar_exact(400, 600)  # 2^1000 overflows a float; exact fractions do not
    assert 0 < p < 1e-9


@pytest.mark.fast
def test_bootstrap_of_identical_answers_is_exactly_zero():
    a = [True, False] * 100
    assert cr.bootstrap_interval(a, a) == (0.0, 0.0)


@pytest.mark.fast
def test_bootstrap_interval_matches_the_normal_approximation():
    # 400 questions: the other run fixes 60 the reference got wrong and breaks 20 it got right.
    ref = bools(200, 400)
    other = list(ref)
    for i in range(60):
        other[200 + i] = True
    for i in range(20):
        other[i] = False
    d = np.array(other, float) - np.array(ref, float)
    se = d.std() / math.sqrt(len(d))  # by hand: sqrt((80/400 - 0.1^2) / 400) = 0.02179
    low, high = cr.bootstrap_interval(ref, other)
    assert low > 0  # a clear difference: the interval excludes 0
    assert low == pytest.approx(0.1 - 1.96 * se, abs=0.006)
    assert high == pytest.approx(0.1 + 1.96 * se, abs=0.006)
    assert cr.bootstrap_interval(ref, other) == (low, high)  # seeded: reproducible


@pytest.mark.fast
def test_identical_runs_give_p_1_and_a_zero_interval(tmp_path):
    correct = {0: bools(5, 10), 10: bools(7, 10)}
    runs = [cr.load_run(write_run(tmp_path / name, correct)) for name in ("a", "b")]
    groups = cr.group_runs(runs, labels=["a", "b"])
    result = cr.paired_comparison(groups[0], groups[1], "coco", 10, 10)
    assert result["p"] == 1.0 and result["b"] == result["c"] == 0
    assert result["low"] == result["high"] == result["diff"] == 0.0


@pytest.mark.fast
def test_paired_counts_and_p_value_on_run_folders(tmp_path):
    # Reference right on 0-4; other right on 0-9: five discordant questions, all one way.
    ref = write_run(tmp_path / "ref", {0: bools(5, 10), 10: bools(5, 10)})
    other = write_run(tmp_path / "other", {0: bools(5, 10), 10: bools(10, 10)}, args={"lr": 2e-3})
    groups = cr.group_runs([cr.load_run(ref), cr.load_run(other)])
    result = cr.paired_comparison(groups[0], groups[1], "coco", 10, 10)
    assert (result["b"], result["c"], result["n"]) == (0, 5, 10)
    assert result["p"] == pytest.approx(0.0625)
    assert result["diff"] == pytest.approx(0.5) and result["low"] > 0


def test_first_vs_final_step_of_one_run(tmp_path, capsys):
    # Step 0: right on questions 0-4; step 20: right on 2-9. Discordant: 0, 1 lost; 5-9 gained.
    run = cr.load_run(write_run(tmp_path / "run", {0: bools(5, 10), 10: bools(5, 10), 20: bools(0, 2) + bools(8, 8)},
                                holdout={0: bools(3, 10), 10: bools(3, 10), 20: bools(3, 10)}))
    coco = cr.learning_check(cr.single(run), "coco")
    assert (coco["first_step"], coco["final_step"], coco["n"], coco["b"], coco["c"]) == (0, 20, 10, 2, 5)
    assert coco["p"] == pytest.approx(2 * (1 + 7 + 21) / 2 ** 7)  # two-sided binomial, 2 of 7
    assert coco["diff"] == pytest.approx(0.3)
    unchanged = cr.learning_check(cr.single(run), "holdout")
    assert unchanged["p"] == 1.0 and unchanged["low"] == unchanged["high"] == 0.0
    # One evaluation only: nothing to compare.
    single_eval = cr.load_run(write_run(tmp_path / "once", {0: bools(5, 10)}))
    assert cr.learning_check(cr.single(single_eval), "coco") is None
    # --brief prints the holdout row and nothing else beyond the plain table.
    cr.main([str(tmp_path / "run"), "--brief", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "holdout pairs: did training change the answers?" in out and "| run | @0 → @20 | 10 | 0.300 | 0.300 |" in out
    assert "paired statistics" not in out and "accuracy per evaluation step" not in out


@pytest.mark.fast
def test_majority_vote_counts_a_tie_as_wrong(tmp_path):
    # Two seeds: question 0 right in both, 1 right in one (tie), 2 right in none.
    runs = [cr.load_run(write_run(tmp_path / f"s{seed}", {0: c}, seed=seed))
            for seed, c in ((0, [True, True, False]), (1, [True, False, False]))]
    (group,) = cr.group_runs(runs)
    keys, majority, _ = cr.group_correctness(group, 0, "coco")
    assert majority.tolist() == [True, False, False]


# --- seed groups and tables ----------------------------------------------------------------

def seed_groups(tmp_path, complete=True):
    # Baseline: 3 seeds with 5, 6, 7 of 10 right at step 10; spatial: one run (other lr).
    base = [write_run(tmp_path / f"base_seed{s}", {0: bools(5, 10), 10: bools(5 + s, 10)}, seed=s,
                      complete=complete or s != 2) for s in range(3)]
    spatial = write_run(tmp_path / "spatial_seed0", {0: bools(5, 10), 10: bools(9, 10)}, args={"lr": 3e-3})
    return base, spatial


@pytest.mark.fast
def test_runs_differing_only_in_seed_form_one_group(tmp_path):
    base, spatial = seed_groups(tmp_path)
    groups = cr.group_runs([cr.load_run(f) for f in base + [spatial]])
    assert [(g["name"], len(g["runs"])) for g in groups] == [("base", 3), ("spatial_seed0", 1)]


@pytest.mark.fast
def test_labels_override_the_grouping(tmp_path):
    base, spatial = seed_groups(tmp_path)
    runs = [cr.load_run(f) for f in base + [spatial]]
    groups = cr.group_runs(runs, labels=["x", "y", "y", "x"])
    assert [(g["name"], [r["name"] for r in g["runs"]]) for g in groups] == [
        ("x", ["base_seed0", "spatial_seed0"]), ("y", ["base_seed1", "base_seed2"])]
    with pytest.raises(cr.CompareError, match="2 labels for 4 runs"):
        cr.group_runs(runs, labels=["x", "y"])


@pytest.mark.fast
def test_seed_group_table_gives_mean_and_sample_std(tmp_path):
    base, spatial = seed_groups(tmp_path)
    groups = cr.group_runs([cr.load_run(f) for f in base + [spatial]])
    table = cr.step_table(groups, "coco")
    rows = {(cells[0], cells[1]): cells[2:] for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:])}
    # Step 10, overall: 0.5, 0.6, 0.7 -> mean 0.6, sample std 0.1.
    assert rows[("10", "base")] == ["3/3", "0.600 ± 0.100 (n=10)",
                                        # left = even questions 0,2,4,6,8: 3/5, 3/5, 4/5 -> 0.667 ± 0.115
                                        "0.667 ± 0.115 (n=5)",
                                        # right = odd questions 1,3,5,7,9: 2/5, 3/5, 3/5
                                        "0.533 ± 0.115 (n=5)"]
    assert rows[("10", "spatial_seed0")] == ["1/1", "0.900 (9/10)", "1.000 (5/5)", "0.800 (4/5)"]
    assert rows[("0", "base")][1] == "0.500 ± 0.000 (n=10)"


@pytest.mark.fast
def test_mean_std_by_hand():
    assert cr.mean_std([0.5, 0.6, 0.7]) == pytest.approx((0.6, 0.1))
    assert cr.mean_std([0.8]) == (0.8, None)


@pytest.mark.fast
def test_incomplete_runs_are_marked_in_every_table(tmp_path):
    base, spatial = seed_groups(tmp_path, complete=False)
    out = tmp_path / "cmp"
    result = cr.main([str(f) for f in base + [spatial]] + ["--out", str(out)])
    report = (out / "report.md").read_text()
    sections = report.split("## ")
    # The plain table, the run list, the per-step table and the paired table all carry the mark.
    assert "base_seed2 [INCOMPLETE]" in sections[0]
    for title in ("Runs and seed groups", "COCO-Spatial: accuracy per evaluation step",
                  "COCO-Spatial: paired statistics"):
        (section,) = [s for s in sections if s.startswith(title)]
        assert "[INCOMPLETE]" in section, title
    assert cr.group_label(result["groups"][0]) == "base [INCOMPLETE]: base_seed2"
    assert cr.group_label(result["groups"][1]) == "spatial_seed0"


@pytest.mark.fast
def test_complete_runs_are_not_marked(tmp_path):
    base, spatial = seed_groups(tmp_path)
    out = tmp_path / "cmp"
    cr.main([str(f) for f in base + [spatial]] + ["--out", str(out)])
    assert "INCOMPLETE" not in (out / "report.md").read_text()


# --- figure and report ---------------------------------------------------------------------

@pytest.mark.fast
def test_report_and_figure_next_to_the_first_run(tmp_path, capsys):
    base, spatial = seed_groups(tmp_path)
    result = cr.main([str(f) for f in base + [spatial]])
    out = tmp_path / "compare_base_vs_spatial_seed0"
    assert result["out"] == out
    printed = capsys.readouterr().out
    assert printed.startswith("run ")  # the plain table comes first
    assert printed.rstrip().endswith(f"report: {out / 'report.md'}\nfigure: {out / 'compare.png'}")
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    report = (out / "report.md").read_text()
    assert "![accuracy and losses over steps](compare.png)" in report
    assert "- base_seed1: `train.py --seed 1`" in report and "abc123def456" in report and "| paper |" in report


@pytest.mark.fast
def test_paired_section_of_the_report(tmp_path):
    base, spatial = seed_groups(tmp_path)
    out = tmp_path / "cmp"
    cr.main([str(f) for f in base + [spatial]] + ["--out", str(out)])
    report = (out / "report.md").read_text()
    (section,) = [s for s in report.split("## ") if s.startswith("COCO-Spatial: paired statistics")]
    lines = [line for line in section.splitlines() if line.startswith("| final") or line.startswith("| best")]
    assert len(lines) == 2
    # Final step 10: majority vote of seeds (5, 6, 7 right of the first questions) is right on 0-5;
    # spatial is right on 0-8: 3 discordant, all for spatial -> p = 2/8 = 0.25.
    final = [c.strip() for c in lines[0].strip("|").split("|")]
    assert final[2:] == ["10", "0.600", "0.900", "+0.300", final[6], "3 / 0", "0.25"]
    assert section.startswith("COCO-Spatial: paired statistics (majority)") and "majority vote" in section


@pytest.mark.fast
def test_per_seed_pairing_tests_runs_of_the_same_seed(tmp_path):
    base = [write_run(tmp_path / f"base_seed{s}", {0: bools(5, 10), 10: bools(5 + s, 10)}, seed=s) for s in range(3)]
    spatial = [write_run(tmp_path / f"spatial_seed{s}", {0: bools(5, 10), 10: bools(9, 10)}, seed=s,
                         args={"lr": 3e-3}) for s in (2, 0)]  # seed 1 missing; order differs
    groups = cr.group_runs([cr.load_run(f) for f in base + spatial])
    rows = [r for r in cr.paired_rows(groups, "coco", "per-seed") if r[0] == "final"]
    # seed 0: reference right on 0-4, other on 0-8 -> 4 discordant: p = 2/16; seed 2: 0-6 vs 0-8 -> 2: p = 0.5
    assert [(r[1], r[7], r[8]) for r in rows] == [
        ("spatial_seed0 @10 vs base_seed0 @10", "4 / 0", "0.125"),
        ("spatial_seed2 @10 vs base_seed2 @10", "2 / 0", "0.5")]
    lonely = cr.group_runs([cr.load_run(base[1])] + [cr.load_run(f) for f in spatial])
    with pytest.raises(cr.CompareError, match="share no seed"):
        cr.paired_rows(lonely, "coco", "per-seed")


# --- bad input ------------------------------------------------------------------------------

@pytest.mark.fast
def test_not_a_run_folder(tmp_path):
    (tmp_path / "notes").mkdir()
    message = error_of([tmp_path / "notes"])
    assert message.startswith("error: ") and "notes: not a run folder (no metrics.jsonl" in message
    assert "no such folder" in error_of([tmp_path / "missing"])


@pytest.mark.fast
def test_empty_metrics(tmp_path):
    run = write_run(tmp_path / "run", {0: bools(1, 2)})
    (run / "metrics.jsonl").write_text("")
    assert error_of([run]) == f"error: {run / 'metrics.jsonl'}: empty (no events recorded; did the run start?)"
    (run / "metrics.jsonl").write_text('{"event": "train", "step": 1}\n')
    assert error_of([run]) == f"error: {run / 'metrics.jsonl'}: no evaluation recorded"


@pytest.mark.fast
def test_a_cut_short_last_line_is_skipped_with_a_warning(tmp_path, capsys):
    run = write_run(tmp_path / "run", {0: bools(1, 2)}, complete=False)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"event": "train", "step": 3, "lm_lo')  # a run killed mid-write
    loaded = cr.load_run(run)
    assert len(loaded["evals"]) == 1 and not cr.is_complete(loaded)
    assert "line 2 is cut short" in capsys.readouterr().err


@pytest.mark.fast
def test_broken_metrics_and_config(tmp_path):
    run = write_run(tmp_path / "run", {0: bools(1, 2)})
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text('["not", "an", "event"]\n' + text)
    assert error_of([run]) == f"error: {run / 'metrics.jsonl'}: line 1 is not a JSON object"
    run = write_run(tmp_path / "run2", {0: bools(1, 2)})
    (run / "config.json").write_text("{}")
    assert error_of([run]).startswith(f"error: {run / 'config.json'}: not a train.py config")


@pytest.mark.fast
def test_missing_predictions_for_the_paired_test(tmp_path):
    a = write_run(tmp_path / "a", {0: bools(1, 2)})
    b = write_run(tmp_path / "b", {0: bools(2, 2)}, args={"lr": 1.0})
    (b / "predictions" / "step-0.jsonl").unlink()
    message = error_of([a, b])
    assert message.startswith(f"error: {b / 'predictions' / 'step-0.jsonl'}: missing")


@pytest.mark.fast
def test_different_questions_are_refused_naming_both_files(tmp_path):
    a = write_run(tmp_path / "a", {0: bools(1, 3)})
    b = write_run(tmp_path / "b", {0: bools(1, 3)}, args={"lr": 1.0}, questions={2: "Another question?"})
    message = error_of([a, b])
    assert "questions differ" in message
    assert str(a / "predictions" / "step-0.jsonl") in message and str(b / "predictions" / "step-0.jsonl") in message


@pytest.mark.fast
def test_coco_questions_match_by_row_even_if_the_images_moved(tmp_path):
    a = write_run(tmp_path / "a", {0: bools(1, 3)}, holdout={0: bools(1, 3)})
    b = write_run(tmp_path / "b", {0: bools(2, 3)}, holdout={0: bools(2, 3)}, args={"lr": 1.0})
    rows = (b / "predictions" / "step-0.jsonl").read_text().replace('"img/', '"/elsewhere/img/')
    (b / "predictions" / "step-0.jsonl").write_text(rows)
    groups = cr.group_runs([cr.load_run(a), cr.load_run(b)])
    assert cr.paired_comparison(groups[0], groups[1], "coco", 0, 0)["c"] == 1
    # Grid images are known by path only: moved images are other questions.
    with pytest.raises(cr.CompareError, match="holdout pairs questions differ"):
        cr.paired_comparison(groups[0], groups[1], "holdout", 0, 0)


@pytest.mark.fast
def test_an_incomplete_seed_does_not_cut_the_group_curve_short(tmp_path):
    full = write_run(tmp_path / "x_seed0", {0: bools(2, 10), 10: bools(4, 10), 20: bools(6, 10)}, seed=0)
    cut = write_run(tmp_path / "x_seed1", {0: bools(4, 10), 10: bools(6, 10)}, seed=1, complete=False)
    (group,) = cr.group_runs([cr.load_run(full), cr.load_run(cut)])
    steps, mean, std = cr.curve(group, cr.accuracy_points("coco"))
    assert steps == [0, 10, 20]
    assert mean == pytest.approx([0.3, 0.5, 0.6]) and std == pytest.approx([0.1414, 0.1414, 0.0], abs=1e-4)


@pytest.mark.fast
def test_unwritable_out_is_one_line(tmp_path):
    run = write_run(tmp_path / "run", {0: bools(1, 2)})
    (tmp_path / "file").write_text("")
    assert error_of([run, "--out", tmp_path / "file"]).startswith("error: ")


def test_bad_input_exits_non_zero_without_a_traceback(tmp_path):
    (tmp_path / "notes").mkdir()
    proc = subprocess.run([sys.executable, str(REPO / "compare_runs.py"), str(tmp_path / "notes")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'notes'}: not a run folder "
                                                "(no metrics.jsonl; runs are written by train.py)"]


# --- the spatial loss against its weight-0 control ---------------------------------------------

def write_spatial_run(folder, losses, *, weight=1.0, seed=0, log_every=1):
    """A spatial run (or, with weight 0, its control) logging `losses` at steps 1..n."""
    folder = write_run(folder, {0: bools(3, 4), len(losses): bools(3, 4)}, seed=seed,
                       args={"universal_id_path": "ids.pt", "spatial_id_weight": weight, "log_every": log_every})
    events = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    events = [e for e in events if e["event"] != "train"]
    events[1:1] = [{"event": "train", "step": step, "lm_loss": 0.5, "spatial_loss": loss}
                   for step, loss in enumerate(losses, start=1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return folder


@pytest.mark.fast
def test_block_bootstrap_interval_by_hand():
    values = [0.1, -0.3, 0.2, 0.4, -0.1, 0.0, 0.3, -0.2]
    assert cr.block_bootstrap_interval([0.25] * 9) == pytest.approx((0.25, 0.25))
    # One block as long as the series: every resample is the series itself.
    assert cr.block_bootstrap_interval(values, block=len(values)) == pytest.approx((0.05, 0.05))
    low, high = cr.block_bootstrap_interval(values)
    assert low < sum(values) / len(values) < high


@pytest.mark.fast
def test_a_spatial_run_below_its_control_reads_as_optimised(tmp_path):
    control = [1.0 - 0.001 * s for s in range(20)]
    spatial = [control[0]] + [c - 0.1 for c in control[1:]]
    runs = [cr.load_run(write_spatial_run(tmp_path / "spatial", spatial)),
            cr.load_run(write_spatial_run(tmp_path / "control", control, weight=0.0))]
    [row] = cr.spatial_control_rows(runs)
    assert row[:4] == ["spatial", "control", 20, "0"]
    assert row[5] == "-0.1000" and row[6] == "[-0.1000, -0.1000]"  # hand: -0.1 at each of the last 10 steps
    assert row[7].startswith("below the control")


@pytest.mark.fast
def test_a_spatial_run_that_moves_like_its_control_reads_as_drift(tmp_path):
    noise = [0.0, 0.02, -0.03, 0.01, 0.03, -0.02, -0.01, 0.02, -0.02, 0.01, 0.0, -0.01]
    control = [1.0 - 0.01 * s for s in range(12)]
    spatial = [c + n for c, n in zip(control, noise)]
    runs = [cr.load_run(write_spatial_run(tmp_path / "spatial", spatial)),
            cr.load_run(write_spatial_run(tmp_path / "control", control, weight=0.0))]
    [row] = cr.spatial_control_rows(runs)
    assert row[7].startswith("no difference from the control")


@pytest.mark.fast
def test_a_control_that_saw_other_batches_is_flagged_or_not_paired(tmp_path):
    control = [0.9] * 10
    runs = [cr.load_run(write_spatial_run(tmp_path / "spatial", [1.0] * 10)),
            cr.load_run(write_spatial_run(tmp_path / "control", control, weight=0.0))]
    [row] = cr.spatial_control_rows(runs)
    assert "NOT PAIRED" in row[7]  # step 1 is before any update: a difference there means other batches
    other_seed = cr.load_run(write_spatial_run(tmp_path / "control_seed1", control, weight=0.0, seed=1))
    assert cr.spatial_control_rows([runs[0], other_seed]) == []  # another seed: not its control


@pytest.mark.fast
def test_brief_prints_the_spatial_loss_against_its_control(tmp_path, capsys):
    control = [1.0 - 0.001 * s for s in range(10)]
    spatial = [control[0]] + [c - 0.05 for c in control[1:]]
    runs = [write_spatial_run(tmp_path / "spatial", spatial), write_spatial_run(tmp_path / "control", control, weight=0.0)]
    cr.main([str(r) for r in runs] + ["--brief", "--out", str(tmp_path / "cmp")])
    out = capsys.readouterr().out
    assert cr.SPATIAL_CONTROL_TITLE in out and "below the control" in out
    assert cr.SPATIAL_CONTROL_TITLE in (tmp_path / "cmp" / "report.md").read_text()
