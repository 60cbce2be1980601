"""Preemption: SIGTERM or SIGUSR1 in the middle of a run lets the current optimizer step (or
evaluation batch) finish, saves a checkpoint, logs a `preempted` event and exits with
PREEMPTED_EXIT_CODE (75); the rerun with --resume_from_checkpoint latest redoes an interrupted
evaluation and ends with the weights of an uninterrupted run. Under preemptible_torchrun a signal
to the agent reaches every process, a signal to one process stops all of them after the same step,
and the agent exits 75."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import checkpoints
import eval_coco
import make_grid_data

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
STEPS = 6


@pytest.fixture(scope="module")
def dataset(three_object_grid):
    return three_object_grid


PREEMPTIBLE_TORCHRUN = (sys.executable, str(REPO / "preemptible_torchrun.py"), "--nproc_per_node", "2")


@pytest.fixture(scope="module")
def bench_roots(tmp_path_factory):
    """A stand-in of What'sUp's vg_two_obj: 8 rows, 48 px images."""
    return make_grid_data.make_benchmark_standins(tmp_path_factory.mktemp("bench"), make_grid_data.builtin_objects(48),
                                                  n=8, image_size=48, names=["vg_two_obj"])


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


@pytest.fixture
def sigterm_during(monkeypatch):
    """sigterm_during(desc, batch): from then on, SIGTERM this process as evaluation batch number
    `batch` (1-based) of the pass whose progress label is `desc` (e.g. "COCO-Spatial @2 (score)") is handed
    out; the evaluation's own check comes before the next batch. A SIGTERM nobody handles is
    ignored (not fatal to pytest), so that a run which has given up its handler carries on."""
    original = eval_coco._left_padded_batches
    when = {}

    def counting(model, processor, adapter, samples, batch_size, progress, desc, *rest, **kwargs):
        for n, item in enumerate(original(model, processor, adapter, samples, batch_size, progress, desc, *rest,
                                          **kwargs), 1):
            if (desc, n) == when.get("at"):
                os.kill(os.getpid(), signal.SIGTERM)
            yield item

    monkeypatch.setattr(eval_coco, "_left_padded_batches", counting)
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    yield lambda desc, batch: when.update(at=(desc, batch))
    signal.signal(signal.SIGTERM, previous)


def test_a_stop_during_an_evaluation_saves_the_step_and_the_resume_redoes_the_evaluation(
        dataset, bench_roots, tmp_path, train_here, sigterm_during):
    """Between two benchmarks (step 2) and between two batches of the final evaluation (step 4):
    the step is saved, the evaluation is not logged, the run exits 75; each resume redoes the
    interrupted evaluation. A stop after the final evaluation: its checkpoint is saved, final/ is
    left to the resume. The run ends as an uninterrupted one."""
    flags = ("--max_steps", "4", "--eval_save_steps", "2", "--eval_batch_size", "2",
             "--eval_benchmarks", "vg_two_obj", "--whatsup_dir", bench_roots.whatsup_dir)
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    train_here(_cmd(dataset, straight, *flags)[2:])

    def evals(run):
        return {e["step"]: e for e in _events(run) if e["event"] == "eval"}

    sigterm_during("COCO-Spatial @2 (score)", 2)  # its last batch: the stop is read before vg_two_obj's first
    with pytest.raises(SystemExit) as stop:
        train_here(_cmd(dataset, cut, *flags)[2:])
    assert stop.value.code == checkpoints.PREEMPTED_EXIT_CODE
    assert _events(cut)[-1] | {"signal": "SIGTERM"} == {"event": "preempted", "step": 2, "signal": "SIGTERM",
                                                         "exit_code": 75}
    assert list(evals(cut)) == [0] and not (cut / "predictions" / "step-2.jsonl").exists()
    assert [s for s, _ in checkpoints.list_checkpoints(cut)] == [0, 2]

    sigterm_during("COCO-Spatial @4 (score)", 1)  # the final evaluation, between its two batches
    with pytest.raises(SystemExit) as stop:
        train_here(_cmd(dataset, cut, *flags, "--resume_from_checkpoint", "latest")[2:])
    assert stop.value.code == checkpoints.PREEMPTED_EXIT_CODE
    assert list(evals(cut)) == [0, 2] and _events(cut)[-1]["event"] == "preempted"
    assert [s for s, _ in checkpoints.list_checkpoints(cut)] == [0, 2, 4] and not (cut / "final").exists()

    # its last batch (4 questions asked, 4 swapped, 4 mirrored: 6 batches of 2): the evaluation is
    # complete, final/ is not
    sigterm_during("vg_two_obj @4 (score)", 6)
    with pytest.raises(SystemExit) as stop:
        train_here(_cmd(dataset, cut, *flags, "--resume_from_checkpoint", "latest")[2:])
    assert stop.value.code == checkpoints.PREEMPTED_EXIT_CODE
    assert list(evals(cut)) == [0, 2, 4] and _events(cut)[-1]["event"] == "preempted"
    assert not (cut / "final").exists()

    sigterm_during("none", 0)
    assert train_here(_cmd(dataset, cut, *flags, "--resume_from_checkpoint", "latest")[2:])["step"] == 4
    assert (cut / "final").is_dir() and _events(cut)[-1]["event"] == "end"
    assert list(evals(cut)) == [0, 2, 4]
    for step, event in evals(straight).items():
        for name in ("coco", "vg_two_obj"):
            assert evals(cut)[step][name] == event[name], (step, name)
    a = load_file(str(straight / "checkpoint-4" / checkpoints.TRAINABLE))
    b = load_file(str(cut / "checkpoint-4" / checkpoints.TRAINABLE))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_pids(proc):
    """The train.py processes torchrun started (its children)."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    return sorted(int(pid) for pid in children)


def test_under_preemptible_torchrun_a_signal_to_the_agent_or_one_process_stops_all_and_the_agent_exits_75(
        dataset, bench_roots, tmp_path):
    """Two processes evaluating a benchmark, each its share. The cluster signals the agent: every
    process stops at its next safe point (after a step, or between evaluation batches: that
    evaluation stays unlogged) and the agent exits 75. The resumed run redoes what was interrupted
    and goes on until a signal to ONE process stops both: after the same step, or, when it comes
    during an evaluation, through that evaluation's gather. The evaluations logged are one
    process's reports on the same checkpoint."""
    run = tmp_path / "multi"
    flags = ("--eval_save_steps", "2", "--eval_benchmarks", "vg_two_obj", "--whatsup_dir", bench_roots.whatsup_dir)

    def launch(*extra):
        return _cmd(dataset, run, *flags, *extra, launcher=(*PREEMPTIBLE_TORCHRUN, "--master_port", str(_free_port())))

    # After step 1 is logged: the processes stop after step 1, or at step 2's evaluation.
    code, output = _signal_after_step(launch(), run, signal.SIGUSR1, 1)
    assert code == checkpoints.PREEMPTED_EXIT_CODE, output[-3000:]  # plain torchrun: killed by SIGUSR1
    assert "the workers saved and exited 75" in output
    events = _events(run)
    assert events[-1]["event"] == "preempted" and events[-1]["signal"] == "SIGUSR1"  # the agent passed it on
    first_stop = events[-1]["step"]
    assert first_stop in (1, 2) and [e["step"] for e in events if e["event"] == "eval"] == [0]
    assert [s for s, _ in checkpoints.list_checkpoints(run)] == [0, first_stop]

    # SIGTERM to the second process only, after step 3: both stop after step 3, or at step 4's
    # evaluation, where the first process finishes its share and learns of the stop in the gather.
    code, output = _signal_after_step(launch("--resume_from_checkpoint", "latest"), run, signal.SIGTERM, 3,
                                      pid_of=lambda proc: _worker_pids(proc)[-1])
    assert code == checkpoints.PREEMPTED_EXIT_CODE, output[-3000:]  # plain torchrun: 1
    events = _events(run)
    assert events[-1]["event"] == "preempted" and events[-1]["signal"] == "another process's"
    assert events[-1]["step"] in (3, 4) and not any(e["event"] == "end" for e in events)
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 2]  # step 2's once, whether or not the first stop interrupted it
    assert all(e["weights_in_sync"] for e in events if e["event"] == "train")
    assert [s for s, _ in checkpoints.list_checkpoints(run)] == sorted({0, first_stop, 2, events[-1]["step"]})

    reports = eval_coco.main(["--ckpt", str(run / "checkpoint-2"), "--protocol", "clean", "--mode", "score",
                              "--benchmark", "coco_two_obj", "vg_two_obj", "--whatsup_dir", bench_roots.whatsup_dir,
                              "--val_json", str(dataset / "standin" / "coco_qa_two_obj_standin.json"),
                              "--coco_val_dir", str(dataset / "standin"), "--eval_max_samples", "4",
                              "--output", str(tmp_path / "eval")])
    assert reports["vg_two_obj"] == evals[1]["vg_two_obj"] and reports["vg_two_obj"]["consistency"]["n_pairs"] == 4
    assert reports["coco_two_obj"]["correct"] == evals[1]["coco"]["correct"]
    rows = [json.loads(line) for line in (run / "predictions" / "step-2.jsonl").read_text().splitlines()]
    assert Counter((r["set"], r.get("order")) for r in rows) == {("coco", None): 4, ("vg_two_obj", "asked"): 4,
                                                                  ("vg_two_obj", "swapped"): 4,
                                                                  ("vg_two_obj", "mirrored"): 4}  # no pair held out
