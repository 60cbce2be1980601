"""reproduce.sh end to end on tiny-warm and the demo's inputs (its objects drawn on the fly, the
COCO-Spatial stand-in): killed after its first finished stage and rerun, it skips that stage; a
missing input stops it with one line per input before any model loads; every run's final/ holds a
model card."""
import os
import sys
from pathlib import Path

import pytest
import yaml

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


def test_killed_after_first_stage_resumes_and_skips_it(tmp_path, standin, reproduce_here, kill_at_line):
    cmd = _command(standin, tmp_path)
    ids = tmp_path / "ids" / "tiny-warm.pt"
    # First try: killed (the whole process group, SIGKILL) as soon as its first stage has finished.
    code, seen = kill_at_line(cmd, "[reproduce] ids: done", REPO, ENV)
    assert code != 0 and any("ids: deriving" in line for line in seen), "".join(seen)
    assert ids.is_file() and ids.with_suffix(".json").is_file()
    ids_time = ids.stat().st_mtime_ns
    assert not (tmp_path / "runs" / "summary.md").exists()

    # The same command again (in this process: the killed one was reproduce.sh): the IDs are reused
    # (not rewritten), the runs and the report follow.
    code, out, err = reproduce_here(*cmd[2:])
    assert code == 0, err[-3000:]
    stages = _stage_lines(out)
    assert any(line.startswith("[reproduce] ids: skipped") for line in stages), stages
    assert not any("ids: deriving" in line for line in stages)
    assert ids.stat().st_mtime_ns == ids_time
    summary = (tmp_path / "runs" / "summary.md").read_text()
    assert "| the paper's published figures (Kang et al., ICLR 2026; Qwen2-VL-2B-Instruct) | 0.77 | 0.85 | 0.91 |" in summary
    assert "| ours: tiny-warm, --protocol paper, seeds 0 |" in summary
    assert "Rows evaluated: coco all " in summary  # every row by default, and summary.md says so
    for kind in ("baseline", "spatial_w1"):
        card = (tmp_path / "runs" / f"{kind}_seed0" / "final" / "README.md").read_text()
        front = yaml.safe_load(card.split("---\n")[1])
        assert front["base_model"] == "tiny-warm" and "protocol-paper" in front["tags"]
        assert "At step 2: COCO-Spatial " in card and "12 tensors" in card

    # And once more: every stage is complete, nothing runs again.
    metrics_time = (tmp_path / "runs" / "baseline_seed0" / "metrics.jsonl").stat().st_mtime_ns
    code, out, err = reproduce_here(*cmd[2:])
    assert code == 0, err[-3000:]
    assert [line.split(":")[0] for line in _stage_lines(out)] == [
        "[reproduce] inputs", "[reproduce] ids", "[reproduce] run baseline_seed0", "[reproduce] run spatial_w1_seed0",
        "[reproduce] report"]
    assert all("skipped" in line for line in _stage_lines(out)[1:])
    assert (tmp_path / "runs" / "baseline_seed0" / "metrics.jsonl").stat().st_mtime_ns == metrics_time

    # With a flag that defines the runs changed, the finished runs are not passed off as this
    # sweep's: refused before any work, one line per run naming it and the flag (then -> now).
    at = cmd.index("--max_steps") + 1
    changed = [*cmd[2:at], "3", *cmd[at + 1:]]
    code, out, err = reproduce_here(*changed)
    assert code == 2, out[-3000:] + err[-3000:]
    assert not any("skipped" in line and "is complete" in line for line in _stage_lines(out))
    refusals = [line for line in err.splitlines() if line.startswith("error: run ")]
    assert [line.split(":")[1].strip() for line in refusals] == ["run baseline_seed0", "run spatial_w1_seed0"], err
    assert all("--max_steps 2 → 3" in line and "--restart_changed_runs" in line for line in refusals), refusals
    assert (tmp_path / "runs" / "baseline_seed0" / "metrics.jsonl").stat().st_mtime_ns == metrics_time
