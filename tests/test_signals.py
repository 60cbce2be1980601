"""A scheduler's stop signal reaches train.py through what stands between them: the run scripts
hand the process over (one seed) or forward SIGTERM/SIGUSR1/SIGUSR2 to it (several seeds, and a
seed stopped at a saved step ends the script with 75 before the next starts); a launcher's
warning handler (TrainJob.checkpoint, called by submitit from a signal handler on the main thread)
never blocks on the Popen lock and leaves no zombie; launcher flags that leave no time to save
parse only when they do, and sbatch's refusals read as one line naming the flag. (A warned local
job that requeues: test_sweeps.py; a warned SLURM job: test_slurm.py.)"""
import contextlib
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

import checkpoints
import launchers
import reproduce

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _events(run):
    path = Path(run) / "metrics.jsonl"
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):  # not written yet, or a line half-written
        return []


def _script_cmd(root, out):
    # The run script's defaults, with a tiny model and data, and steps enough to be stopped midway.
    return ["bash", "run_vision_baseline.sh", "tiny", "--train_dir", str(root / "grid"),
            "--val_json", str(root / "standin" / "coco_qa_two_obj_standin.json"), "--coco_val_dir",
            str(root / "standin"), "--output_dir", str(out), "--batch_size", "4", "--eval_max_samples", "4",
            "--holdout_max_samples", "4", "--eval_mode", "score", "--log_every", "1", "--max_steps", "400",
            "--eval_save_steps", "1000"]


def _sigterm_the_script_after_a_step(cmd, run, env, trained_steps, sig=signal.SIGTERM):
    """Start `cmd` in a session of its own, send `sig` to its own process once `run` has trained a step;
    (its exit status, its output, the pids of its session still running once it has ended, which
    are then killed)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while trained_steps(run) < 1:
            assert proc.poll() is None, "the run ended before the signal: " + proc.stdout.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, sig)
        output, _ = proc.communicate(timeout=120)
        return proc.returncode, output, subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True,
                                                       text=True).stdout.split()
    finally:
        with contextlib.suppress(ProcessLookupError):  # an orphaned train.py (the defect tested) ends with the test
            os.killpg(proc.pid, signal.SIGKILL)


def _assert_saved_and_preempted(run):
    last = _events(run)[-1]
    assert last["event"] == "preempted" and last["signal"] == "SIGTERM", last
    assert [s for s, _ in checkpoints.list_checkpoints(run)][-1] == last["step"] >= 1


def test_sigterm_to_the_run_script_reaches_train_py_which_saves_and_exits_75(three_object_grid, tmp_path,
                                                                             trained_steps):
    out = tmp_path / "one"
    code, output, left = _sigterm_the_script_after_a_step(_script_cmd(three_object_grid, out), out, ENV,
                                                          trained_steps)
    assert (code, left) == (checkpoints.PREEMPTED_EXIT_CODE, []), output[-3000:]
    _assert_saved_and_preempted(out)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2], ids=["TERM", "USR2"])
def test_with_several_seeds_the_script_forwards_sigterm_and_stops_before_the_next_seed(three_object_grid, tmp_path,
                                                                                        trained_steps, sig):
    """USR2 (a scheduler's warning, not ignored upstream) reaches train.py as TERM: forwarded as
    USR2 it would end train.py unsaved (USR2's default action)."""
    out = tmp_path / "seeds"
    code, output, left = _sigterm_the_script_after_a_step(_script_cmd(three_object_grid, out),
                                                          Path(f"{out}_seed0"), dict(ENV, SEEDS="0 1"), trained_steps,
                                                          sig)
    assert (code, left) == (checkpoints.PREEMPTED_EXIT_CODE, []), output[-3000:]
    _assert_saved_and_preempted(Path(f"{out}_seed0"))
    assert not Path(f"{out}_seed1").exists()  # the next seed never started


# ---------------------------------------------------------------------------------------------
# TrainJob.checkpoint, as submitit calls it: from a signal handler on the main thread
# ---------------------------------------------------------------------------------------------

# A stand-in for train.py (the handler's timing is the point, not training): on SIGTERM it takes
# half a second "to save", then exits 75.
STAND_IN = ("import pathlib, signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: (time.sleep(0.5), sys.exit(75)))\n"
            "pathlib.Path(sys.argv[1]).write_text('ready')\n"
            "time.sleep(120)\n")


def _zombie(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return False


def _warned_while_it_waits(job, ready):
    """Run `job` on the main thread and, once its child has written `ready`, send this process the
    warning (USR2), handled as submitit's SignalHandler does: job.checkpoint() on the main thread.
    Returns (what the handler saw, the RunFailed the job ended with)."""
    seen = {}

    def handler(signum, frame):
        start = time.monotonic()
        seen["resubmission"] = job.checkpoint()
        seen["seconds"] = time.monotonic() - start
        seen["pid"], seen["zombie"] = job._process.pid, _zombie(job._process.pid)

    def warn_when_ready():
        while not ready.exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGUSR2)

    previous = signal.signal(signal.SIGUSR2, handler)
    try:
        threading.Thread(target=warn_when_ready, daemon=True).start()
        with pytest.raises(launchers.RunFailed) as stopped:
            job()  # the main thread waits for its child here when the warning comes
    finally:
        signal.signal(signal.SIGUSR2, previous)
    return seen, stopped.value


@pytest.mark.fast
def test_the_warning_handler_on_the_main_thread_returns_once_train_py_has_exited(tmp_path):
    ready = tmp_path / "ready"
    run = launchers.Run("baseline_seed0", "baseline", None, 0, tmp_path / "run",
                        [sys.executable, "-c", STAND_IN, str(ready)])
    job = launchers.TrainJob(run, tmp_path, tmp_path / "logs", grace_s=10)  # a blocked handler sits out all 10 s
    seen, stopped = _warned_while_it_waits(job, ready)
    assert seen["seconds"] < 5, f"the handler took {seen['seconds']:.1f} s (train.py exits 0.5 s after SIGTERM)"
    assert not seen["zombie"]
    assert stopped.code == 75 and "preempted" in str(stopped)
    requeued = pickle.loads(pickle.dumps(seen["resubmission"].function))  # submitit pickles it for the requeue
    assert isinstance(requeued, launchers.TrainJob) and requeued.run == run and requeued._process is None


@pytest.mark.fast
def test_a_warned_id_or_report_job_stops_its_command_and_is_requeued_to_run_it_again(tmp_path):
    """The sweep's ID and report jobs (CommandJob) get the same warning: their command is stopped
    (before, it ran on, orphaned, beside the requeued job's own) and the job is requeued whole."""
    ready = tmp_path / "ready"
    command = [sys.executable, "-c", STAND_IN, str(ready)]
    job = launchers.CommandJob("ids", command, tmp_path, grace_s=10)
    seen, stopped = _warned_while_it_waits(job, ready)
    assert seen["seconds"] < 5, f"the handler took {seen['seconds']:.1f} s"
    assert not Path(f"/proc/{seen['pid']}").exists()  # stopped and reaped: neither running on nor a zombie
    assert stopped.code == 75  # the stand-in's exit on SIGTERM
    requeued = pickle.loads(pickle.dumps(seen["resubmission"].function))
    assert isinstance(requeued, launchers.CommandJob) and requeued.command == command and requeued._process is None


@pytest.mark.fast
def test_launcher_flags_with_room_to_save_parse():
    # Their refusals are among test_sweeps.py's bad sweep flags.
    args = reproduce.parse_args(["--model", "tiny-warm", "--launcher", "local", "--timeout_min", "3",
                                 "--signal_delay_s", "100", "--gpus_per_run", "1"])
    assert (args.timeout_min, args.signal_delay_s, args.gpus_per_run) == (3, 100, 1)
    assert reproduce.parse_args(["--model", "tiny-warm", "--launcher", "serial", "--signal_delay_s", "5"])


@pytest.mark.fast
def test_sbatch_refusals_become_one_line_naming_the_flag():
    args = reproduce.parse_args(["--model", "tiny-warm", "--launcher", "slurm", "--slurm_partition", "gpu"])
    line = launchers.sbatch_refusal("sbatch: error: Invalid generic resource (gres) specification\n", args)
    assert line == ("sbatch refused the job (sbatch: error: Invalid generic resource (gres) specification): "
                    "--gpus_per_run 1 asks for GPUs the partition does not have: pass --gpus_per_run 0 or a GPU "
                    "partition (--slurm_partition)")
    line = launchers.sbatch_refusal("sbatch: error: invalid partition specified: gpu\n", args)
    assert "--slurm_partition gpu: not a partition of this cluster" in line and "\n" not in line
    line = launchers.sbatch_refusal("sbatch: error: Batch job submission failed: Invalid account or "
                                    "account/partition combination specified\n", args)
    assert "): --slurm_account None (with --slurm_partition gpu): not an account you may use" in line
