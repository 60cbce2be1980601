"""Preemption: SIGTERM or SIGUSR1 in the middle of a run lets the current optimizer step finish,
saves a checkpoint, logs a `preempted` event and exits with PREEMPTED_EXIT_CODE (75); the rerun
with --resume_from_checkpoint latest ends with the weights of an uninterrupted run. Under torchrun
a signal to one process stops every process after the same step."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import checkpoints

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
STEPS = 6


@pytest.fixture(scope="module")
def dataset(three_object_grid):
    return three_object_grid


def _cmd(root, out, *extra, launcher=(sys.executable,)):
    # --eval_save_steps beyond --max_steps: the only checkpoints a run writes on its own are at step
    # 0 and at the end, so a checkpoint in between is the one the signal asked for.
    return [*launcher, str(REPO / "train.py"), "--model_name", "tiny", "--protocol", "clean",
            "--train_dir", str(root / "grid"), "--val_json", str(root / "standin" / "coco_qa_two_obj_standin.json"),
            "--coco_val_dir", str(root / "standin"), "--output_dir", str(out), "--batch_size", "4", "--lr", "1e-3",
            "--eval_max_samples", "4", "--holdout_max_samples", "4", "--eval_mode", "score", "--log_every", "1",
            "--max_steps", str(STEPS), "--eval_save_steps", "100", *extra]


def _events(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _trained_steps(run):
    try:
        return max((e["step"] for e in _events(run) if e["event"] == "train"), default=0)
    except (OSError, ValueError):  # not written yet, or a line half-written
        return 0


def _signal_after_step(cmd, run, signum, step, pid_of=None, timeout=600):
    """Start `cmd`; once the run has logged `step`, send `signum` (to pid_of(proc) when given);
    returns (exit status, output)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while _trained_steps(run) < step:
        assert proc.poll() is None, "the run ended before the signal: " + proc.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.01)
    os.kill(pid_of(proc) if pid_of else proc.pid, signum)
    output, _ = proc.communicate(timeout=timeout)
    return proc.returncode, output


def _final_trainable(run):
    return load_file(str(Path(run) / f"checkpoint-{STEPS}" / checkpoints.TRAINABLE))


def test_sigterm_mid_run_saves_then_the_resume_equals_an_uninterrupted_run(dataset, tmp_path, train_here):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert train_here(_cmd(dataset, straight)[2:])["step"] == STEPS

    code, output = _signal_after_step(_cmd(dataset, cut), cut, signal.SIGTERM, 2)
    assert code == checkpoints.PREEMPTED_EXIT_CODE == 75, output[-3000:]
    last = _events(cut)[-1]
    assert last["event"] == "preempted" and last["signal"] == "SIGTERM"
    stopped_at = last["step"]
    assert 2 <= stopped_at < STEPS  # the step that was running finished, then it stopped
    assert _trained_steps(cut) == stopped_at and not (cut / "final").exists()
    assert [s for s, _ in checkpoints.list_checkpoints(cut)] == [0, stopped_at]
    assert f"preempted (SIGTERM): stopped after step {stopped_at}" in output

    assert train_here(_cmd(dataset, cut, "--resume_from_checkpoint", "latest")[2:])["step"] == STEPS
    assert json.loads((cut / "config.json").read_text())["resumed"][0]["step"] == stopped_at
    a, b = _final_trainable(straight), _final_trainable(cut)
    assert a.keys() == b.keys() and len(a) == 12
    start = load_file(str(straight / "checkpoint-0" / checkpoints.TRAINABLE))
    assert any(not torch.equal(start[k], a[k]) for k in a)  # it trained
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    # Without the saved step the resume would start from step 0's weights and end elsewhere: the
    # checkpoint the signal wrote is what makes the weights equal.
    stopped = load_file(str(cut / f"checkpoint-{stopped_at}" / checkpoints.TRAINABLE))
    assert any(not torch.equal(start[k], stopped[k]) for k in a)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_pids(proc):
    """The train.py processes torchrun started (its children)."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    return sorted(int(pid) for pid in children)


def test_under_torchrun_a_signal_to_one_process_stops_all_after_the_same_step(dataset, tmp_path):
    run = tmp_path / "multi"
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(_free_port()))
    # SIGUSR1 to the second process only: the first learns it through the per-step all-reduce.
    code, output = _signal_after_step(_cmd(dataset, run, launcher=torchrun), run, signal.SIGUSR1, 1,
                                      pid_of=lambda proc: _worker_pids(proc)[-1])
    assert code != 0, output[-3000:]
    assert re.search(r"exitcode\s*:\s*75", output), output[-3000:]  # torchrun names each process's status
    events = _events(run)
    assert events[-1]["event"] == "preempted" and events[-1]["signal"] == "another process's"
    stopped_at = events[-1]["step"]
    assert 1 <= stopped_at < STEPS and not any(e["event"] == "end" for e in events)
    assert [s for s, _ in checkpoints.list_checkpoints(run)] == [0, stopped_at]
