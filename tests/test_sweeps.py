"""reproduce.py's sweeps (seeds x arms x spatial weights) and launchers (launchers.py, submitit), on
tiny-warm and the demo's inputs drawn on the fly: the local launcher runs 3 runs 2 at a time and
reports all 3, one of them warned as a job nearing its time limit is (saved, requeued, resumed)
(test_reproduce.py kills a sweep and reruns it); the SLURM launcher hands a stand-in
`sbatch` one job array with the partition, the warning signal and requeue, after the ID job and
before the report job (tests/test_slurm.py runs sweeps on a real one-node SLURM); a job warned by
the scheduler stops train.py at a saved step and asks to be requeued."""
import fcntl
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import launchers
import make_grid_data
import reproduce
import run_folder

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHON=sys.executable, PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The COCO-Spatial stand-in and one ID file for every sweep here, derived here once with the
    sweeps' own ID command: these tests need IDs but test none of their derivation (test_reproduce.py
    does). Under pytest-xdist the workers share them: the first to take the lock makes them, the
    others wait for it."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent / "sweeps_shared"  # this session's, every worker's
    else:
        root = tmp_path_factory.mktemp("sweeps")
    root.mkdir(exist_ok=True)
    ids = root / "ids" / "tiny-warm.pt"
    with (root / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (root / "done").is_file():
            standin = make_grid_data.make_coco_standin(root, make_grid_data.builtin_objects(64), n=8, image_size=48,
                                                       seed=0)
            args = reproduce.parse_args(["--model", *_command({"standin": standin, "ids": ids}, root / "runs")[2:]])
            done = subprocess.run(reproduce.ids_command(args), cwd=REPO, env=ENV, capture_output=True, text=True,
                                  timeout=600)
            assert done.returncode == 0 and ids.is_file(), done.stdout[-3000:] + done.stderr[-3000:]
            (root / "done").write_text("")
    return {"standin": root / make_grid_data.STANDIN_JSON, "ids": ids}


def _command(shared, runs_dir, *sweep):
    # The demo's objects and cell (demo.sh), 2 steps and few ID objects, so that each run takes seconds.
    return ["bash", "reproduce.sh", "tiny-warm", "--train_objects", "builtin",
            "--train_object_names", "red circle", "blue square", "green triangle",
            "--id_objects", "builtin", "--id_object_names", "pink heart", "cyan hexagon", "yellow star",
            "--cell", "28", "--sizes", "124", "--val_json", str(shared["standin"]),
            "--coco_val_dir", str(shared["standin"].parent), "--ids", str(shared["ids"]), "--id_layers", "11",
            "--id_max_groups", "12", "--runs_dir", str(runs_dir), *sweep,
            "--max_steps", "2", "--batch_size", "8", "--eval_mode", "score", "--holdout_max_samples", "8"]


def _launches(runs_dir):
    path = runs_dir / "logs" / launchers.LAUNCHES
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _most_at_once(launches):
    """The largest number of runs that were training at the same moment."""
    edges = sorted((e["time"], 1 if e["event"] == "start" else -1) for e in launches)
    running = most = 0
    for _, change in edges:
        running += change
        most = max(most, running)
    return most


def test_local_launcher_runs_three_two_at_a_time_and_reports_all(shared, tmp_path, reproduce_here, trained_steps,
                                                                preempted_then_resumed):
    """...and one run, warned as the launcher warns a job --signal_delay_s before its --timeout_min,
    saves, is requeued, resumes and finishes; the sweep completes."""
    runs_dir = tmp_path / "runs"
    # Three runs (the baseline, the spatial arm at weights 0 and 1), two at a time: the third waits.
    cmd = _command(shared, runs_dir, "--spatial_id_weights", "0", "1", "--launcher", "local", "--max_parallel", "2")
    cmd[cmd.index("--max_steps") + 1] = "12"  # long enough to be warned while it trains
    cmd += ["--log_every", "1"]  # the warning comes once a step is logged
    warned = runs_dir / "baseline_seed0"
    seen = {}

    def warn():  # the USR2 submitit's local controller sends --signal_delay_s before --timeout_min
        deadline = time.time() + 300
        while time.time() < deadline:
            starts = [e for e in _launches(runs_dir) if e["run"] == warned.name and e["event"] == "start"]
            if starts and trained_steps(warned) >= 1:
                environ = Path(f"/proc/{starts[0]['pid']}/environ").read_bytes().split(b"\0")
                seen["timing"] = sorted(v.decode() for v in environ if v.startswith(b"SUBMITIT_LOCAL_") and b"_S=" in v)
                os.kill(starts[0]["pid"], signal.SIGUSR2)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=warn, daemon=True)
    watcher.start()
    code, out, err = reproduce_here(*cmd[2:])
    watcher.join()
    assert code == 0, out[-3000:] + err[-3000:]
    names = ["baseline_seed0", "spatial_w0_seed0", "spatial_w1_seed0"]
    launches = _launches(runs_dir)
    assert sorted(e["run"] for e in launches if e["event"] == "start") == sorted(names + [warned.name])
    assert [e.get("exit_code") for e in launches if e["run"] == warned.name] == [None, 75, None, 0]
    assert all(e["exit_code"] == 0 for e in launches if e["event"] == "end" and e["run"] != warned.name)
    assert _most_at_once(launches) == 2  # two at a time: never more, and they did overlap
    assert {e["CUDA_VISIBLE_DEVICES"] for e in launches} == {""}  # no GPU here: processes on the CPU
    # The job's time limit and its warning's lead are reproduce.py's flags (a day, 90 s).
    assert seen["timing"] == ["SUBMITIT_LOCAL_SIGNAL_DELAY_S=90", "SUBMITIT_LOCAL_TIMEOUT_S=86400"]
    assert 1 <= preempted_then_resumed(warned) < 12
    report = (runs_dir / "compare" / "report.md").read_text()
    for name in names:
        assert launchers.run_state(runs_dir / name) == "complete"
        assert str(runs_dir / name) in report
    assert "| ours: tiny-warm, --protocol paper, seeds 0 |" in (runs_dir / "summary.md").read_text()


FAKE_SBATCH = """#!/usr/bin/env python3
import json, pathlib, sys
root = pathlib.Path(__file__).resolve().parent
calls = root / "sbatch_calls.jsonl"
n = len(calls.read_text().splitlines()) + 1 if calls.exists() else 1
with calls.open("a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "script": pathlib.Path(sys.argv[-1]).read_text()}) + "\\n")
print(f"Submitted batch job {100 + n}")
"""


def _sbatch_options(script):
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_slurm_launcher_queues_ids_then_one_array_then_the_report(shared, tmp_path, reproduce_here):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", "#!/bin/sh\nexit 0\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{ENV['PATH']}"}
    runs_dir = tmp_path / "runs"
    ids = tmp_path / "ids" / "tiny-warm.pt"  # none yet: the ID stage becomes the first job
    cmd = _command(dict(shared, ids=ids), runs_dir, "--seeds", "0 1", "--spatial_id_weights", "0", "1",
                   "--launcher", "slurm", "--slurm_partition", "gpu-test", "--slurm_account", "lab",
                   "--timeout_min", "120", "--slurm_extra", "qos=high")
    code, out, err = reproduce_here(*cmd[2:], env=env)
    assert code == 0, out[-3000:] + err[-3000:]
    calls = [json.loads(line) for line in (bin_dir / "sbatch_calls.jsonl").read_text().splitlines()]
    assert len(calls) == 3  # ids, the array, the report
    ids_job, array, report = (_sbatch_options(c["script"]) for c in calls)
    for options in (ids_job, array, report):
        assert {"--partition=gpu-test", "--account=lab", "--time=120", "--signal=USR2@90", "--requeue",
                "--qos=high"} <= set(options), options
    assert "--array=0-5%6" in array  # 2 seeds x (baseline, weight 0, weight 1)
    assert "--gpus-per-node=1" in array and not any(o.startswith("--gpus-per-node") for o in report)
    assert "--dependency=afterok:101" in array and "--dependency=afterany:102" in report
    assert not any(o.startswith("--array") for o in ids_job)
    # The array's jobs are the six runs, each a TrainJob named by arm, weight and seed.
    pickles = sorted((runs_dir / "logs").glob("*_submitted.pkl"))
    jobs = [pickle.loads(p.read_bytes()).function for p in pickles]
    names = sorted(j.run.name for j in jobs if isinstance(j, launchers.TrainJob))
    assert names == sorted(f"{arm}_seed{s}" for s in (0, 1) for arm in ("baseline", "spatial_w0", "spatial_w1"))
    assert not ids.exists() and "[reproduce] ids: queued as SLURM job 101" in out

    # A finished run (with this sweep's arguments) is not queued again: the rerun's array has five jobs.
    done = runs_dir / "spatial_w1_seed0"
    (done / "final").mkdir(parents=True)
    (done / "final" / "README.md").write_text("card")
    (done / "metrics.jsonl").write_text(json.dumps({"event": "end", "step": 2}) + "\n")
    planned = {r.name: r for r in reproduce.plan_runs(reproduce.parse_args(["--model", *cmd[2:]]))}
    run_folder.write_identity(done, planned["spatial_w1_seed0"].identity)
    code, out, err = reproduce_here(*cmd[2:], env=env)
    assert code == 0, out[-3000:] + err[-3000:]
    calls = [json.loads(line) for line in (bin_dir / "sbatch_calls.jsonl").read_text().splitlines()]
    assert "--array=0-4%5" in _sbatch_options(calls[4]["script"])
    assert "[reproduce] run spatial_w1_seed0: skipped" in out


@pytest.mark.fast
def test_a_warned_job_stops_train_py_at_a_saved_step_and_asks_to_be_requeued(tmp_path):
    # A stand-in for train.py: exits 75 on SIGTERM, as train.py does after saving.
    ready = tmp_path / "ready"
    script = (f"import pathlib, signal, sys, time\n"
              f"signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))\n"
              f"pathlib.Path({str(ready)!r}).write_text('x')\n"
              f"time.sleep(60)\n")
    run = launchers.Run("spatial_w1_seed0", "spatial", 1.0, 0, tmp_path / "run", [sys.executable, "-c", script])
    job = launchers.TrainJob(run, tmp_path, tmp_path / "logs")
    outcome = {}

    def call():
        try:
            job()
        except launchers.RunFailed as err:
            outcome["error"] = err

    thread = threading.Thread(target=call)
    thread.start()
    while not ready.exists():
        time.sleep(0.01)
    os.kill(job._process.pid, signal.SIGUSR2)  # the scheduler's warning reaches every process: ignored
    time.sleep(0.2)
    assert job._process.poll() is None
    resubmission = job.checkpoint()  # what submitit calls on the warning
    thread.join(timeout=10)
    assert outcome["error"].code == 75 and "preempted" in str(outcome["error"])
    requeued = pickle.loads(pickle.dumps(resubmission.function))  # submitit pickles it for the requeue
    assert isinstance(requeued, launchers.TrainJob) and requeued.run == run and requeued._process is None
    assert [e["event"] for e in _launches(tmp_path)] == ["start", "end"]


@pytest.mark.fast
@pytest.mark.parametrize("flags, message", [
    (["--gpus_per_run", "2"], "argument --gpus_per_run: 2 GPUs per run, but train.py runs as one process"),
    (["--launcher", "local", "--signal_delay_s", "30"], "argument --signal_delay_s: a warning 30 s ahead cannot "
                                                         "cover a save"),
    (["--launcher", "slurm", "--signal_delay_s", "85"], "pass >= 90"),
    (["--launcher", "local", "--timeout_min", "1"], "argument --signal_delay_s: a warning 90 s ahead of a 1-minute"),
    (["--arm", "lm_slice"], "argument --arm: NAME=\"FLAGS\""),
    (["--arm", "spatial=--selector lm_mlp_lastk"], "other than baseline and spatial"),
    (["--arm", "lm=--spatial_id_weights 0 10"], "argument --arm lm: gives no train.py flag"),
    (["--arm", "lm=--selector lm_mlp_lastk --seed 3"], "argument --arm lm: --seed is set by the sweep"),
    (["--spatial_id_weights", "1", "-2"], "argument --spatial_id_weights: weights must be finite and >= 0, not -2.0"),
    (["--output_dir", "x"], "argument --output_dir: the sweep sets it per run"),
    (["--launcher", "local", "--max_parallel", "0"], "argument --max_parallel: must be >= 1, not 0"),
])
def test_bad_sweep_flags_stop_with_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as stop:
        reproduce.parse_args(["--model", "tiny-warm", *flags])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err and len(err) < 300, err
    # The same flags made good parse.
    args = reproduce.parse_args(["--model", "tiny-warm", "--spatial_id_weights", "0", "10", "10",
                                 "--arm", "lm=--selector lm_mlp_lastk --spatial_id_weights 0"])
    assert args.arms == [("spatial", [], [0.0, 10.0]), ("lm", ["--selector", "lm_mlp_lastk"], [0.0])]
    assert [r.name for r in reproduce.plan_runs(args)] == ["baseline_seed0", "spatial_w0_seed0", "spatial_w10_seed0",
                                                           "lm_w0_seed0"]


@pytest.mark.fast
def test_local_jobs_get_the_gpus_this_process_may_use(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert launchers.visible_gpus(2) == [0, 1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")  # a job's own CUDA_VISIBLE_DEVICES replaces this
    assert launchers.visible_gpus(2) == [2, 5]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert launchers.visible_gpus(0) == []
