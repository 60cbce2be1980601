"""A run's identity and its folder's lock (issue 28, items 5, 6, 9a-b): the arguments that define a
run are stored in its folder and checked on every rerun (train.py's resume, reproduce.py's sweep);
a lock keeps a second process off a run folder; seeds are whole numbers >= 0, each run once; run
names carry the exact spatial weight."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import launchers
import reproduce
import run_folder
import train
import train_args

REPO = Path(__file__).resolve().parents[1]


def _args(grid, out, *extra):
    return ["--model_name", "tiny", "--protocol", "clean", "--train_dir", str(grid / "grid"),
            "--val_json", str(grid / "standin" / "coco_qa_two_obj_standin.json"),
            "--coco_val_dir", str(grid / "standin"), "--output_dir", str(out), "--batch_size", "4",
            "--eval_max_samples", "2", "--holdout_max_samples", "2", "--eval_mode", "score", "--max_steps", "2",
            *extra]


@pytest.fixture(scope="module")
def finished(three_object_grid, tmp_path_factory, tiny_path):
    """One finished 2-step tiny run (checkpoint-0, checkpoint-2, final/); tests copy it."""
    out = tmp_path_factory.mktemp("identity") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main(_args(three_object_grid, out))
    finally:
        torch.set_num_threads(threads)
    return out


def _copy(finished, tmp_path):
    return Path(shutil.copytree(finished, tmp_path / "run"))


@pytest.mark.fast
def test_every_train_flag_is_in_the_identity_or_said_why_not():
    dests = {a.dest for a in train_args.build_parser()._actions if a.dest not in ("help", "list_models")}
    identity, free = set(train_args.IDENTITY_ARGS), set(train_args.NOT_IDENTITY)
    assert not identity & free, identity & free
    unclassified = (dests | {"protocol_choices"}) - identity - free
    assert not unclassified, f"put each in train_args.IDENTITY_ARGS or NOT_IDENTITY: {sorted(unclassified)}"
    assert not (identity | free) - dests - {"protocol_choices"}, "no such flag"


def test_a_resume_with_changed_flags_is_refused_in_one_line(finished, three_object_grid, tmp_path, train_here,
                                                            capsys):
    run = _copy(finished, tmp_path)
    stored = json.loads((run / run_folder.IDENTITY_FILE).read_text())
    assert stored == train_args.run_identity(train.parse_args(_args(three_object_grid, run)))
    assert stored["max_steps"] == 2 and stored["sampler"] == "grouped" and "output_dir" not in stored
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as stop:
        train_here(_args(three_object_grid, run, "--resume_from_checkpoint", "latest", "--max_steps", "3",
                         "--lr", "2e-3"))
    line = str(stop.value.code)
    assert line.startswith("error: ") and "\n" not in line and len(line) < 400, line
    assert "--max_steps 2 → 3" in line and "--lr 5e-05 → 0.002" in line and "--overwrite_output_dir" in line, line
    assert (run / "metrics.jsonl").read_text() == before
    # Started again into it without --resume_from_checkpoint: refused (as ever), and the line says
    # that resuming would not do either.
    with pytest.raises(SystemExit) as stop:
        train_here(_args(three_object_grid, run, "--max_steps", "3"))
    line = str(stop.value.code)
    assert "already holds a run trained with other arguments (then → now): --max_steps 2 → 3" in line, line
    assert "--resume_from_checkpoint" not in line and "--fork" in line and "\n" not in line, line
    assert (run / "metrics.jsonl").read_text() == before
    # Flags outside the identity (how often it logs, how large its evaluation batches) may change.
    summary = train_here(_args(three_object_grid, run, "--resume_from_checkpoint", "latest", "--log_every", "3",
                               "--eval_batch_size", "1"))
    assert summary["step"] == 2


def test_a_second_process_is_kept_off_a_locked_run_folder(finished, three_object_grid, tmp_path, train_here):
    run = _copy(finished, tmp_path)
    holder = run_folder.RunLock(run)
    holder.acquire(["python", "train.py", "--output_dir", str(run)])
    kept = sorted(p.name for p in run.iterdir())
    try:
        assert launchers.run_state(run) == "running"
        # A "new" run over it would delete the other job's checkpoints: refused before anything goes.
        with pytest.raises(SystemExit) as stop:
            train_here(_args(three_object_grid, run, "--overwrite_output_dir"))
        line = str(stop.value.code)
        assert "\n" not in line and "in use" in line and f"pid {holder.holder()['pid']}" in line, line
        assert sorted(p.name for p in run.iterdir()) == kept and (run / "checkpoint-2").is_dir()
    finally:
        holder.release()
    assert launchers.run_state(run) == "complete"


@pytest.mark.fast
def test_a_changed_run_is_refused_by_its_job_or_started_over_when_asked(tmp_path):
    # A finished run as its folder shows it, and a stand-in for the run script that records the
    # flags the job gives it.
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "README.md").write_text("card")
    (run / "metrics.jsonl").write_text(json.dumps({"event": "end", "step": 2}) + "\n")
    stored = train_args.run_identity(train.parse_args(["--model_name", "tiny", "--max_steps", "2"]))
    run_folder.write_identity(run, stored)
    seen = tmp_path / "argv.json"
    script = f"import json, sys; open({str(seen)!r}, 'w').write(json.dumps(sys.argv[1:]))"
    now = dict(stored, max_steps=3)
    sweep_run = launchers.Run("baseline_seed0", "baseline", None, 0, run, [sys.executable, "-c", script], now)
    assert launchers.run_state(run, stored) == "complete" and launchers.run_state(run, now) == "changed"
    with pytest.raises(launchers.RunFailed, match="--max_steps 2 → 3"):
        launchers.TrainJob(sweep_run, tmp_path, tmp_path / "logs")()
    assert not seen.exists()
    sweep_run.restart_changed = True
    assert launchers.TrainJob(sweep_run, tmp_path, tmp_path / "logs")() == "done"
    assert json.loads(seen.read_text()) == ["--overwrite_output_dir"]


@pytest.mark.fast
def test_seeds_are_whole_numbers_from_zero_each_run_once(capsys):
    for bad in ("-1", "0 -3", "1.5", "x"):
        with pytest.raises(SystemExit) as stop:
            reproduce.parse_args(["--model", "tiny-warm", "--seeds", bad])
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "argument --seeds" in err and ">= 0" in err, err
    args = reproduce.parse_args(["--model", "tiny-warm", "--seeds", "0 0 1 01"])
    assert args.seeds == ["0", "1"]
    assert "--seeds: 0 0 1 01 gives 2 distinct seeds: 0 1 (each runs once)" in capsys.readouterr().out
    names = [r.name for r in reproduce.plan_runs(args)]
    assert names == ["baseline_seed0", "spatial_w1_seed0", "baseline_seed1", "spatial_w1_seed1"]


@pytest.mark.fast
def test_train_py_seeds_are_whole_numbers_from_zero(capsys):
    for flag in ("--seed", "--data_seed"):
        for bad in ("-1", str(2 ** 32)):
            with pytest.raises(SystemExit):
                train.parse_args(["--model_name", "tiny", flag, bad])
            assert f"argument {flag}: must be >= 0 and < 2**32, not {bad}" in capsys.readouterr().err
        assert getattr(train.parse_args(["--model_name", "tiny", flag, str(2 ** 32 - 1)]), flag.lstrip("-")) == 2 ** 32 - 1


@pytest.mark.fast
def test_run_names_carry_the_exact_weight():
    args = reproduce.parse_args(["--model", "tiny-warm", "--spatial_id_weights", "1", "1.0000001", "1.0", "0.5",
                                 "10"])
    runs = [r for r in reproduce.plan_runs(args) if r.weight is not None]
    assert [r.name for r in runs] == ["spatial_w1_seed0", "spatial_w1.0000001_seed0", "spatial_w0.5_seed0",
                                      "spatial_w10_seed0"]
    for r in runs:  # the run script is given the weight itself, not a rounded one
        given = r.command[r.command.index("--spatial_id_weight") + 1]
        assert float(given) == r.weight and r.identity["spatial_id_weight"] == r.weight


@pytest.mark.fast
def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, run_folder; run_folder.RunLock(sys.argv[1]).acquire(['train.py', "
         "'--output_dir', sys.argv[1]]); print('held', flush=True); time.sleep(60)", str(folder)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(run_folder.RunFolderLocked) as refused:
            run_folder.RunLock(folder).acquire(["second"])
        assert f"in use by pid {holder.pid} on {socket.gethostname()}" in str(refused.value)
        assert f"train.py --output_dir {folder}" in str(refused.value)
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: nothing gets to clean up
        holder.wait()
    assert run_folder.holder(folder) is None and launchers.run_state(folder) == "new"
    run_folder.RunLock(folder).acquire(["third"]).release()


@pytest.mark.fast
def test_a_sweep_rerun_leaves_a_run_that_another_job_trains_to_it(tmp_path, monkeypatch, capsys):
    # The sweep rerun while its SLURM array still runs: the run a job trains now is not queued again.
    args = reproduce.parse_args(["--model", "tiny-warm", "--runs_dir", str(tmp_path), "--launcher", "slurm"])
    runs = reproduce.plan_runs(args)
    queued = {}
    monkeypatch.setattr(reproduce, "ids_provenance_problem", lambda *a: None)
    monkeypatch.setattr(launchers, "launch_slurm", lambda a, jobs, *rest: queued.update(runs=[j.run.name for j in jobs]))
    holder = run_folder.RunLock(runs[0].folder).acquire(["train.py", "--output_dir", str(runs[0].folder)])
    try:
        assert reproduce.stage_runs(args, runs, None) is False
        out = capsys.readouterr().out
        assert f"run baseline_seed0: skipped, {runs[0].folder} is being trained by pid {os.getpid()}" in out, out
        assert queued["runs"] == ["spatial_w1_seed0"]
        job = launchers.TrainJob(runs[0], tmp_path, tmp_path / "logs")
        assert job() == "skipped"  # and so is a job of the first array that starts only now
    finally:
        holder.release()


def test_under_torchrun_every_process_stops_when_another_job_holds_the_folder(three_object_grid, tmp_path,
                                                                              tiny_path):
    # Only the main process takes the lock; the others learn its answer from it, rather than
    # training on into a collective that the main process never reaches.
    run = tmp_path / "run"
    holder = run_folder.RunLock(run).acquire(["train.py", "--output_dir", str(run)])
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(port), str(REPO / "train.py"), *_args(three_object_grid, run)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    finally:
        holder.release()
    refusals = [line for line in done.stderr.splitlines()
                if line.startswith("error: --output_dir") and line.endswith(f"choose another --output_dir")
                and line.count(f"is in use by pid {os.getpid()}") == 1]
    assert done.returncode != 0 and len(refusals) == 2, done.stderr[-3000:]  # one whole line per process
    assert not run.exists()  # the holder made the folder; nothing else was written into it
