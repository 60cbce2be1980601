"""reproduce.sh end to end on tiny-warm and the demo's inputs (its objects drawn on the fly, the
COCO-Spatial stand-in): a sweep with a control, an arm of its own and --diagnose_checkpoints, killed
after its finished stages (the IDs, the baseline) and rerun, skips them and finishes; rerun with a
flag that defines the runs changed, it is refused; a missing input stops it with one line per
input before any model loads; every run's final/ holds a model card."""
import json
import os
import sys
from pathlib import Path

import pytest
import yaml

import launchers
import make_grid_data

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHON=sys.executable)


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce_standin")
    return make_grid_data.make_coco_standin(root, make_grid_data.builtin_objects(64), n=8, image_size=48, seed=0)


def _command(standin, root, *override):
    # The demo's objects and cell (demo.sh), fewer steps and ID objects, so that it runs in seconds.
    return ["bash", "reproduce.sh", "tiny-warm", "--train_objects", "builtin",
            "--train_object_names", "red circle", "blue square", "green triangle",
            "--id_objects", "builtin", "--id_object_names", "pink heart", "cyan hexagon", "yellow star",
            "--cell", "28", "--sizes", "124", "--val_json", str(standin), "--coco_val_dir", str(standin.parent),
            "--ids", str(root / "ids" / "tiny-warm.pt"), "--id_layers", "11", "--id_max_groups", "12", "--runs_dir", str(root / "runs"),
            *override, "--max_steps", "2", "--batch_size", "8", "--eval_mode", "score", "--holdout_max_samples", "8"]


def _stage_lines(text):
    return [line for line in text.splitlines() if line.startswith("[reproduce]") and not line.startswith("[reproduce] $")]


def test_missing_inputs_stop_before_any_model_with_one_line_each(tmp_path, standin, reproduce_here):
    cmd = _command(standin, tmp_path, "--train_objects", str(tmp_path / "renders"),
                   "--val_json", str(tmp_path / "coco_qa_two_obj.json"))
    code, out, err = reproduce_here(*cmd[2:])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith(f"error: missing: COCO-Spatial questions --val_json {tmp_path / 'coco_qa_two_obj.json'}: get")
    assert "amitakamath/whatsup_vlms" in lines[0]
    assert lines[1].startswith(f"error: missing: object renders --train_objects {tmp_path / 'renders'}: get")
    assert _stage_lines(out) == [] and "Loading weights" not in out + err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "ids").exists()


def test_a_killed_sweep_rerun_skips_what_finished_and_a_changed_one_is_refused(tmp_path, standin, reproduce_here,
                                                                               kill_at_line):
    """One seed: the baseline, the spatial arm at weight 0 (the control) and an arm of its own on the
    LM's MLPs, with --diagnose_checkpoints. Killed (the whole process group, SIGKILL) once the IDs
    are derived and the baseline has trained, then rerun: both are skipped, the rest follow."""
    cmd = _command(standin, tmp_path, "--spatial_id_weights", "0",
                   "--arm", "lm_slice=--selector lm_mlp_lastk --spatial_id_weights 1", "--diagnose_checkpoints")
    runs, ids = tmp_path / "runs", tmp_path / "ids" / "tiny-warm.pt"
    code, seen = kill_at_line(cmd, "[reproduce] run baseline_seed0: done", REPO, ENV)
    assert code != 0 and any("ids: deriving" in line for line in seen), "".join(seen)
    assert ids.is_file() and ids.with_suffix(".json").is_file()
    ids_time = ids.stat().st_mtime_ns
    finished = runs / "baseline_seed0" / "metrics.jsonl"
    finished_time = finished.stat().st_mtime_ns
    assert launchers.run_state(runs / "lm_slice_w1_seed0") == "new" and not (runs / "summary.md").exists()

    # The same command again (in this process: the killed one was reproduce.sh).
    code, out, err = reproduce_here(*cmd[2:])
    assert code == 0, out[-3000:] + err[-3000:]
    stages = _stage_lines(out)
    assert any(line.startswith("[reproduce] ids: skipped") for line in stages), stages
    assert not any("ids: deriving" in line for line in stages)
    assert "[reproduce] run baseline_seed0: skipped" in out
    assert "[reproduce] run spatial_w0_seed0: training" in out and "[reproduce] run lm_slice_w1_seed0: training" in out
    assert ids.stat().st_mtime_ns == ids_time and finished.stat().st_mtime_ns == finished_time  # neither redone
    config = json.loads((runs / "lm_slice_w1_seed0" / "config.json").read_text())["args"]
    assert (config["selector"], config["spatial_id_weight"], config["seed"]) == ("lm_mlp_lastk", 1.0, 0)
    control = json.loads((runs / "spatial_w0_seed0" / "config.json").read_text())["args"]
    assert (control["selector"], control["spatial_id_weight"]) == ("vision_mlp_lastk", 0.0)
    summary = (runs / "summary.md").read_text()
    assert "| the paper's published figures (Kang et al., ICLR 2026; Qwen2-VL-2B-Instruct) | 0.77 | 0.85 | 0.91 |" in summary
    assert "| ours: tiny-warm, --protocol paper, seeds 0 |" in summary
    assert "Rows evaluated: coco all " in summary  # every row by default, and summary.md says so
    for kind in ("baseline", "spatial_w0"):
        card = (runs / f"{kind}_seed0" / "final" / "README.md").read_text()
        front = yaml.safe_load(card.split("---\n")[1])
        assert front["base_model"] == "tiny-warm" and "protocol-paper" in front["tags"]
        assert "At step 2: COCO-Spatial " in card and "12 tensors" in card

    # --diagnose_checkpoints: every checkpoint of the spatial runs (steps 0 and 2), the baseline's none,
    # in one id_diagnostics.py process for the sweep.
    assert sum("[reproduce] diagnose: " in line for line in out.splitlines()) == 1
    strength = (runs / "compare" / "id_strength.md").read_text()
    rows = [line.split(" | ") for line in strength.splitlines() if line.startswith("| ") and "_seed0" in line]
    assert [(r[0], r[1]) for r in rows] == [("| spatial_w0_seed0", "0"), ("| spatial_w0_seed0", "2"),
                                            ("| lm_slice_w1_seed0", "0"), ("| lm_slice_w1_seed0", "2")]
    # Step 0 is the same model in both runs: the same agreement and loss. The diagnostics read each
    # checkpoint's own trained tensors: the LM slice's step 2 gives another loss than its step 0.
    assert rows[0][2:4] == rows[2][2:4]

    def diagnosed(step):
        return json.loads((runs / "lm_slice_w1_seed0" / "id_diagnostics" / f"checkpoint-{step}" /
                           "diagnostics.json").read_text())

    assert diagnosed(2)["info"]["model"] == str(runs / "lm_slice_w1_seed0" / "checkpoint-2")
    assert diagnosed(2)["layers"]["11"]["spatial_loss_step0"] != diagnosed(0)["layers"]["11"]["spatial_loss_step0"]
    holdout = [e for e in map(json.loads, (runs / "lm_slice_w1_seed0" / "metrics.jsonl").read_text().splitlines())
               if e["event"] == "eval" and e["step"] == 2][0]["holdout"]["accuracy"]
    assert rows[3][5].strip(" |") == f"{holdout:.3f}"  # beside that checkpoint's own accuracy

    # And once more: every stage is complete, nothing runs again.
    code, out, err = reproduce_here(*cmd[2:])
    assert code == 0, err[-3000:]
    assert [line.split(":")[0] for line in _stage_lines(out)] == [
        "[reproduce] inputs", "[reproduce] ids", "[reproduce] run baseline_seed0", "[reproduce] run spatial_w0_seed0",
        "[reproduce] run lm_slice_w1_seed0", "[reproduce] report"]
    assert all("skipped" in line for line in _stage_lines(out)[1:])
    assert finished.stat().st_mtime_ns == finished_time

    # With a flag that defines the runs changed, the finished runs are not passed off as this
    # sweep's: refused before any work, one line per run naming it and the flag (then -> now).
    at = cmd.index("--max_steps") + 1
    changed = [*cmd[2:at], "3", *cmd[at + 1:]]
    code, out, err = reproduce_here(*changed)
    assert code == 2, out[-3000:] + err[-3000:]
    assert not any("skipped" in line and "is complete" in line for line in _stage_lines(out))
    refusals = [line for line in err.splitlines() if line.startswith("error: run ")]
    assert [line.split(":")[1].strip() for line in refusals] == [
        "run baseline_seed0", "run spatial_w0_seed0", "run lm_slice_w1_seed0"], err
    assert all("--max_steps 2 → 3" in line and "--restart_changed_runs" in line for line in refusals), refusals
    assert finished.stat().st_mtime_ns == finished_time
