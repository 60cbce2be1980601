"""Runs that scale and survive: two processes (torchrun, CPU/gloo) train exactly like one process
with twice the accumulation; a run killed during or after a checkpoint save resumes to the same
weights; slim checkpoints, rotation, and a final/ folder the standard Auto classes load."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import checkpoints
import data
import eval_coco
import spatial_loss

REPO = Path(__file__).resolve().parents[1]
CELLS = [(c, r, 124) for c in range(4) for r in range(4)]


@pytest.fixture(scope="module")
def dataset(three_object_grid, tmp_path_factory):
    root = three_object_grid
    gen = torch.Generator().manual_seed(0)
    ids = tmp_path_factory.mktemp("run_ids") / "ids.pt"
    spatial_loss.save_universal_ids(ids, {11: {c: torch.randn(64, generator=gen) for c in CELLS}})
    return {"grid": root / "grid", "json": root / "standin" / "coco_qa_two_obj_standin.json",
            "coco": root / "standin", "ids": ids}


def _args(dataset, out, *extra):
    return ["--model_name", "tiny", "--protocol", "clean", "--train_dir", str(dataset["grid"]),
            "--val_json", str(dataset["json"]), "--coco_val_dir", str(dataset["coco"]), "--output_dir", str(out),
            "--batch_size", "4", "--lr", "1e-3", "--eval_max_samples", "6", "--holdout_max_samples", "6",
            "--eval_mode", "score", "--log_every", "1", *extra]


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
                PYTHONUNBUFFERED="1")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _events(run, kind):
    return [e for e in map(json.loads, (Path(run) / "metrics.jsonl").read_text().splitlines()) if e["event"] == kind]


def test_two_processes_train_like_one_with_twice_the_accumulation(dataset, tmp_path, tiny_path, train_here):
    # The spatial arm: its step runs the baseline's (the LM loss) and adds the spatial loss, whose
    # centring over the batch is what splitting a batch across processes could break.
    extra = ["--max_steps", "3", "--universal_id_path", str(dataset["ids"])]
    multi, single = tmp_path / "multi", tmp_path / "single"
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
          str(REPO / "train.py"), *_args(dataset, multi, *extra)], tmp_path)
    train_here(_args(dataset, single, *extra, "--grad_accum", "2"))  # one process: this one

    # one run folder, written once
    assert json.loads((multi / "config.json").read_text())["num_processes"] == 2
    assert len(_events(multi, "end")) == 1
    trains = _events(multi, "train")
    assert [e["step"] for e in trains] == [1, 2, 3]
    assert all(e["weights_in_sync"] for e in trains)  # every process holds the same weights after every step
    assert all("spatial_loss" in e for e in trains)
    # the same weights as one process over the same global batches
    a = load_file(str(multi / "checkpoint-3" / checkpoints.TRAINABLE))
    b = load_file(str(single / "checkpoint-3" / checkpoints.TRAINABLE))
    assert a.keys() == b.keys() and len(a) == 12
    start = load_file(str(single / "checkpoint-0" / checkpoints.TRAINABLE))
    assert any(not torch.equal(start[k], b[k]) for k in b)  # it trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    # the split, gathered evaluation equals one process evaluating the same checkpoint
    last = _events(multi, "eval")[-1]
    report = eval_coco.main(["--ckpt", str(multi / "checkpoint-3"), "--protocol", "clean", "--mode", "score",
                             "--val_json", str(dataset["json"]), "--coco_val_dir", str(dataset["coco"]),
                             "--eval_max_samples", "6", "--output", str(tmp_path / "eval.jsonl")])
    assert report["correct"] == last["coco"]["correct"] and report["n"] == last["coco"]["n"] == 6


@pytest.mark.fast
def test_each_process_evaluates_whole_images_and_together_all_questions():
    import train

    samples = [{"image_path": f"img{i % 5}.png"} for i in range(12)] + [{"image_path": None}, {"image": b"x"}]
    shares = [train._image_share(samples, 3, rank) for rank in range(3)]
    assert sorted(i for share in shares for i in share) == list(range(len(samples)))  # each question once
    for share in shares:  # an image's questions on one process
        paths = {samples[i]["image_path"] for i in share if samples[i].get("image_path")}
        assert all(samples[j].get("image_path") not in paths for other in shares if other is not share for j in other)
    # round robin over images in order of first appearance: img0, img3, the bytes / img1, img4 / img2, the None
    assert [len(share) for share in shares] == [3 + 2 + 1, 3 + 2, 2 + 1]


def _trainable(run, step):
    return load_file(str(Path(run) / f"checkpoint-{step}" / checkpoints.TRAINABLE))


def _kill_when(cmd, cwd, ready, timeout=600):
    """Start `cmd`, SIGKILL it as soon as `ready()` holds; returns once it is dead."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while not ready():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()


def test_kill_during_and_after_a_save_then_resume_latest(dataset, tmp_path, tiny_path, train_here):
    # Full checkpoints take long enough to write that the kill lands inside the save.
    common = ["--max_steps", "6", "--eval_save_steps", "2", "--save_full_checkpoints"]
    straight = tmp_path / "straight"
    train_here(_args(dataset, straight, *common))  # the runs that are not killed train in this process

    # Killed while checkpoint-4 is being written (its temporary folder exists): latest is checkpoint-2.
    for attempt in range(3):  # the kill races the save; a lost race (checkpoint-4 already there) retries
        run = tmp_path / f"killed{attempt}"
        cmd = [sys.executable, str(REPO / "train.py"), *_args(dataset, run, *common)]
        _kill_when(cmd, tmp_path, lambda: any(run.glob(".checkpoint-4.tmp*")))
        if not (run / "checkpoint-4").exists():
            break
    assert [s for s, _ in checkpoints.list_checkpoints(run)] == [0, 2]
    assert any(run.glob(".checkpoint-4.tmp*"))  # what the kill left: ignored, then cleared
    # Killed again, right after checkpoint-4 landed.
    _kill_when(cmd + ["--resume_from_checkpoint", "latest"], tmp_path, lambda: (run / "checkpoint-4").exists())
    assert 4 in [s for s, _ in checkpoints.list_checkpoints(run)]
    train_here(cmd[2:] + ["--resume_from_checkpoint", "latest"])

    a, b = _trainable(straight, 6), _trainable(run, 6)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert _events(run, "eval") == _events(straight, "eval")
    assert len(_events(run, "end")) == 1


def test_damaged_checkpoint_is_skipped_by_name(dataset, tmp_path, tiny_path, capsys):
    import train

    run = tmp_path / "run"
    train.main(_args(dataset, run, "--max_steps", "4", "--eval_save_steps", "2"))
    (run / "checkpoint-4" / checkpoints.TRAINING_STATE).write_bytes(b"\0" * 10)  # truncated
    folder, warnings = checkpoints.find_resumable(run, "latest")
    assert folder.name == "checkpoint-2"
    assert len(warnings) == 1 and "checkpoint-4" in warnings[0]


def test_checkpoints_are_slim_rotated_and_final_loads_with_auto_classes(dataset, tmp_path, tiny_path):
    import train
    from transformers import AutoModelForImageTextToText

    run = tmp_path / "run"
    train.main(_args(dataset, run, "--max_steps", "6", "--eval_save_steps", "2", "--save_total_limit", "2"))
    assert [s for s, _ in checkpoints.list_checkpoints(run)] == [4, 6]
    ckpt = run / "checkpoint-6"
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint.json", "trainable.safetensors", "training_state.pt"]
    info = json.loads((ckpt / "checkpoint.json").read_text())
    assert info["base_model"] == "tiny" and info["step"] == 6 and len(info["tensors"]) == 12
    assert all(oct(p.stat().st_mode & 0o777) == "0o644" for p in ckpt.iterdir())
    assert not list(run.glob(".*tmp*"))  # no temporary folder left behind

    # final/: a complete model; the processor names the standard class
    final = run / "final"
    model = AutoModelForImageTextToText.from_pretrained(final)
    trained = _trainable(run, 6)
    params = dict(model.named_parameters())
    for name, value in trained.items():
        assert torch.equal(params[name], value)
    assert json.loads((final / "processor_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"
    assert (final / "video_preprocessor_config.json").is_file()
    try:
        import torchvision  # noqa: F401  (the standard Qwen2-VL processor needs it)
    except Exception:
        processor = None
    else:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(final)
        assert type(processor).__name__ == "Qwen2VLProcessor"
    if processor is None:  # this machine cannot build the standard class: our loader reads the same folder
        import models

        model, processor, _ = models.load_model_and_processor(str(final))
    # it answers a question with the image in the inputs: the answer depends on the image
    sample = data.GridDataset(dataset["grid"], "clean").samples[0]
    messages = data.user_messages(sample["question"])
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with Image.open(sample["image_path"]) as img:
        image = img.convert("RGB")
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    assert "pixel_values" in inputs and (inputs["input_ids"] == model.config.image_token_id).sum() > 0
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
        other = model(**dict(inputs, pixel_values=torch.zeros_like(inputs["pixel_values"]))).logits[0, -1]
    assert not torch.allclose(logits, other)


def test_another_runs_checkpoint_needs_fork_and_an_empty_folder(dataset, tmp_path, tiny_path):
    import train

    a = tmp_path / "a"
    train.main(_args(dataset, a, "--max_steps", "2"))
    b = tmp_path / "b"
    train.main(_args(dataset, b, "--max_steps", "2"))
    before = (b / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit, match="--fork"):
        train.main(_args(dataset, b, "--max_steps", "4", "--resume_from_checkpoint", str(a / "checkpoint-2")))
    with pytest.raises(SystemExit, match="not empty"):
        train.main(_args(dataset, b, "--max_steps", "4", "--resume_from_checkpoint", str(a / "checkpoint-2"), "--fork"))
    assert (b / "metrics.jsonl").read_text() == before
    fork = tmp_path / "fork"
    train.main(_args(dataset, fork, "--max_steps", "4", "--resume_from_checkpoint", str(a / "checkpoint-2"), "--fork"))
    assert [e["step"] for e in _events(fork, "eval")] == [0, 2, 4]


@pytest.mark.fast
def test_a_run_that_failed_before_its_first_step_does_not_block_a_rerun(dataset, tmp_path, tiny_path, monkeypatch):
    import train

    run = tmp_path / "run"

    def broken_evaluate(*args, **kwargs):
        raise RuntimeError("out of memory at the first evaluation")

    monkeypatch.setattr(train, "evaluate", broken_evaluate)
    with pytest.raises(RuntimeError):
        train.main(_args(dataset, run, "--max_steps", "1"))
    monkeypatch.undo()
    summary = train.main(_args(dataset, run, "--max_steps", "1"))
    assert summary["step"] == 1
