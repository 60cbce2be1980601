"""reproduce.py's SLURM launcher against a real one-node SLURM (Debian's slurm-wlm and munge on
localhost, started by .ci/slurm_localhost.sh, which .ci/run calls before `make test`): a sweep of
three tiny-warm runs with its ID job and report job runs to the end; the scheduler's warning
(`scancel --signal=USR2`, as SLURM sends it before a time limit) during one run makes train.py
save, the job is requeued (SLURM_RESTART_COUNT 1) and resumes from that checkpoint, ending with
the trainable weights of an uninterrupted run; sbatch's refusal of a GPU on a partition without
GPUs is one line naming --gpus_per_run. Skipped, with the reason, where no cluster answers."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import checkpoints
import launchers
import make_grid_data
import reproduce

REPO = Path(__file__).resolve().parents[1]
STEPS = 30  # long enough that the warning comes while the run trains, short enough for seconds a run


def _cluster_answers():
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10).stdout
        nodes = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "is UP" in ping and any(state.strip("*~#") in ("idle", "mix", "alloc") for state in nodes.split())


pytestmark = pytest.mark.skipif(not _cluster_answers(), reason="no SLURM cluster answers here (scontrol ping); "
                                "`bash .ci/slurm_localhost.sh` starts one on localhost (root, Debian), as CI does")


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    return make_grid_data.make_coco_standin(root, make_grid_data.builtin_objects(64), n=6, image_size=48, seed=0)


def _sweep_flags(standin, runs_dir, *more):
    # One seed: the baseline and the spatial arm at weights 0 and 1, on 3 built-in objects drawn at
    # 28 px; no GPU on this cluster (--gpus_per_run 0); a time limit long enough that submitit
    # reads the warning as a preemption, not a timeout (it counts every USR2 as one under 50 min).
    return ["--train_objects", "builtin", "--train_object_names", "red circle", "blue square", "green triangle",
            "--id_objects", "builtin", "--id_object_names", "pink heart", "cyan hexagon", "yellow star",
            "--cell", "28", "--sizes", "124", "--val_json", str(standin), "--coco_val_dir", str(standin.parent),
            "--ids", str(runs_dir / "ids.pt"), "--id_layers", "11", "--id_max_groups", "12", "--runs_dir",
            str(runs_dir), "--spatial_id_weights", "0", "1", "--launcher", "slurm", "--timeout_min", "120", *more,
            "--max_steps", str(STEPS), "--eval_save_steps", "1000", "--batch_size", "4", "--eval_mode", "score",
            "--holdout_max_samples", "4", "--eval_max_samples", "6", "--log_every", "1"]


def _job_state(job_id):
    shown = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True).stdout
    fields = dict(item.split("=", 1) for item in shown.split() if "=" in item)
    return fields.get("JobState"), int(fields.get("Restarts", 0))


def _wait(condition, what, timeout=300, logs=None):
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            tails = "".join(p.read_text()[-1500:] for p in sorted(Path(logs).glob("*_log.out"))) if logs else ""
            pytest.fail(f"{what}: not within {timeout} s\n{tails}")
        time.sleep(0.2)


def _queued(out, what):
    return re.search(rf"^\[reproduce\] {what}: queued .*SLURM job (?:array )?(\d+)", out, re.M).group(1)


def test_a_sweep_runs_to_its_report_and_a_warned_run_requeues_and_ends_as_if_uninterrupted(
        standin, tmp_path, reproduce_here, train_here, trained_steps, preempted_then_resumed, request):
    runs_dir = tmp_path / "runs"
    code, out, err = reproduce_here("tiny-warm", *_sweep_flags(standin, runs_dir, "--gpus_per_run", "0"))
    assert code == 0, out[-3000:] + err[-3000:]
    ids_job, array, report_job = _queued(out, "ids"), _queued(out, "runs"), _queued(out, "report")
    # Should the test fail, nothing it queued is left to run.
    request.addfinalizer(lambda: subprocess.run(["scancel", ids_job, array, report_job], capture_output=True))
    warned = runs_dir / "baseline_seed0"  # the array's task 0

    # The warning, as the scheduler sends it: to the job's step (submitit's process, and train.py,
    # which ignores it); submitit's handler stops train.py at a saved step and requeues the job.
    _wait(lambda: trained_steps(warned) >= 1, "baseline_seed0 trains", logs=runs_dir / "logs")
    subprocess.run(["scancel", "--signal=USR2", f"{array}_0"], check=True)
    _wait(lambda: _job_state(report_job)[0] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), "the report job ends",
          logs=runs_dir / "logs")

    assert [_job_state(j)[0] for j in (ids_job, f"{array}_0", f"{array}_1", f"{array}_2", report_job)] == \
        ["COMPLETED"] * 5, out
    assert _job_state(f"{array}_0")[1] == 1  # requeued once
    assert "| ours: tiny-warm, --protocol paper, seeds 0 |" in (runs_dir / "summary.md").read_text()
    for name in ("baseline_seed0", "spatial_w0_seed0", "spatial_w1_seed0"):
        assert launchers.run_state(runs_dir / name) == "complete"

    assert 1 <= preempted_then_resumed(warned) < STEPS
    launches = [json.loads(line) for line in (runs_dir / "logs" / launchers.LAUNCHES).read_text().splitlines()]
    mine = [(e["event"], e.get("exit_code"), e.get("SLURM_RESTART_COUNT", "0")) for e in launches
            if e["run"] == "baseline_seed0"]
    assert mine == [("start", None, "0"), ("end", 75, "0"), ("start", None, "1"), ("end", 0, "1")], mine

    # The uninterrupted run: the same train.py command, here in this process.
    args = reproduce.parse_args(["--model", "tiny-warm", *_sweep_flags(standin, runs_dir, "--gpus_per_run", "0")])
    command = next(r.command for r in reproduce.plan_runs(args) if r.name == "baseline_seed0")
    stub = tmp_path / "argv.sh"  # the run script with this as its PYTHON prints train.py's arguments
    stub.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import json, sys; print(json.dumps(sys.argv[1:]))' \"$@\"\n")
    stub.chmod(0o755)
    command = [f"PYTHON={stub}" if part.startswith("PYTHON=") else part for part in command]
    argv = json.loads(subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True).stdout)
    straight = tmp_path / "straight"
    argv[argv.index("--output_dir") + 1] = str(straight)
    assert train_here(argv[1:])["step"] == STEPS
    a = load_file(str(straight / f"checkpoint-{STEPS}" / checkpoints.TRAINABLE))
    b = load_file(str(warned / f"checkpoint-{STEPS}" / checkpoints.TRAINABLE))
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


def test_a_gpu_asked_of_a_partition_without_gpus_is_refused_in_one_line(standin, tmp_path, reproduce_here):
    if "gpu" in subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True).stdout:
        pytest.skip("this cluster's default partition has GPUs (sinfo -o %G): nothing to refuse")
    runs_dir = tmp_path / "runs"
    code, out, err = reproduce_here("tiny-warm", *_sweep_flags(standin, runs_dir))  # --gpus_per_run 1, the default
    assert code == 1
    assert err.strip().splitlines() == [
        "error: sbatch refused the job (sbatch: error: Invalid generic resource (gres) specification): --gpus_per_run 1 "
        "asks for GPUs the partition does not have: pass --gpus_per_run 0 or a GPU partition (--slurm_partition)"]
