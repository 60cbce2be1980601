import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import eval_coco
import make_grid_data
import models
import spatial_loss
import train

REPO = Path(__file__).resolve().parents[1]
CELLS = [(c, r, 124) for c in range(4) for r in range(4)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    objects = make_grid_data.builtin_objects()
    grid = root / "grid"
    # 2 object pairs (one is held out by default), obj1 in 3 cells each: whole groups of 15 images
    for names in (("red circle", "blue square"), ("green triangle", "yellow star")):
        make_grid_data.make_grid_images(grid, {n: objects[n] for n in names}, cell=28, sizes=(124,),
                                        max_pairs=1, max_images=45, seed=0, progress=False)
    standin = root / "standin"
    make_grid_data.make_coco_standin(standin, objects, n=8, seed=0)
    return {"grid": grid, "json": standin / "coco_qa_two_obj_standin.json", "coco": standin, "root": root}


def _ids(path, layer=11, hidden=64, cells=CELLS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    spatial_loss.save_universal_ids(path, {layer: {c: torch.randn(hidden, generator=gen) for c in cells}})
    return path


def _args(dataset, out, *extra):
    return ["--model_name", "tiny", "--train_dir", str(dataset["grid"]), "--val_json", str(dataset["json"]),
            "--coco_val_dir", str(dataset["coco"]), "--output_dir", str(out), "--batch_size", "6", "--protocol", "clean",
            "--lr", "1e-3", "--holdout_max_samples", "8", "--eval_save_steps", "1000", *extra]


def _events(run, kind):
    lines = (Path(run) / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def test_only_selected_tensors_change_and_all_of_them_do(dataset, tmp_path, tiny_path):
    out = tmp_path / "run"
    train.main(_args(dataset, out, "--max_steps", "3", "--train_biases"))
    config = json.loads((out / "config.json").read_text())
    selected = set(config["selected_parameters"])
    assert len(selected) == 24  # fc1/fc2 weights and biases of the last 6 of 8 vision blocks
    assert all(n.startswith("model.visual.blocks.") and ".mlp." in n for n in selected)
    # Compare loaded models: on disk transformers 5.x writes the older `visual.`/`model.` names.
    before = dict(models.load_model_and_processor("tiny")[0].named_parameters())
    after = dict(models.load_model_and_processor(str(out / "final"))[0].named_parameters())
    assert before.keys() == after.keys()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == selected


def test_schedule_length_equals_optimizer_steps(dataset, tmp_path):
    out = tmp_path / "run"
    grid = data.GridDataset(dataset["grid"])
    sampler = data.GroupedBatchSampler(grid.samples, range(len(grid)), 6, seed=0)
    expected = math.ceil(len(sampler) / 4) * 2  # grad_accum 4, 2 epochs; the last step of an epoch is short
    summary = train.main(_args(dataset, out, "--grad_accum", "4", "--epochs", "2", "--spatial_holdout_frac", "0",
                               "--log_every", "1"))
    config = json.loads((out / "config.json").read_text())
    assert config["total_steps"] == expected
    assert summary["optimizer_steps"] == summary["scheduler_steps"] == expected
    assert summary["skipped_steps"] == 0
    lrs = [e["lr"] for e in _events(out, "train")]
    assert len(lrs) == expected
    assert lrs[-1] == 0.0 and lrs[-2] > 0  # the linear schedule ends exactly at the last step
    assert max(lrs) == pytest.approx(1e-3)


def test_non_finite_steps_are_skipped_and_counted(dataset, tmp_path):
    summary = train.main(_args(dataset, tmp_path / "run", "--max_steps", "4", "--lr", "1e30", "--eval_max_samples", "2"))
    assert summary["nonfinite_losses"] > 0 and summary["skipped_steps"] > 0
    assert summary["optimizer_steps"] + summary["skipped_steps"] == 4


def test_baseline_script_run_folder_and_eval_reproduces_it(dataset, tmp_path):
    out = tmp_path / "baseline"
    cmd = ["bash", str(REPO / "run_vision_baseline.sh"), "tiny", *_args(dataset, out, "--max_steps", "20", "--epochs", "2",
           "--eval_save_steps", "10", "--eval_mode", "score")[2:]]
    env = dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model: tiny in float32 on cpu (--bf16 applies on CUDA only)" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["args"]["param_budget_frac"] == 0.3 and config["args"]["selector"] == "vision_mlp_lastk"
    assert config["versions"]["torch"] == torch.__version__ and "git_commit" in config
    evals = _events(out, "eval")
    assert [e["step"] for e in evals] == [0, 10, 20]
    for step in (0, 10, 20):
        rows = [json.loads(l) for l in (out / "predictions" / f"step-{step}.jsonl").read_text().splitlines()]
        assert {r["set"] for r in rows} == {"coco", "holdout"}
        assert sum(r["set"] == "coco" for r in rows) == 8
        # slim by default: the trained tensors and the training state, not a model copy
        assert sorted(p.name for p in (out / f"checkpoint-{step}").iterdir()) == [
            "checkpoint.json", "trainable.safetensors", "training_state.pt"]
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "tokenizer.json").is_file()
    assert {e["step"] for e in _events(out, "train")} == {5, 10, 15, 20}

    report = eval_coco.main(["--ckpt", str(out / "checkpoint-20"), "--val_json", str(dataset["json"]),
                             "--coco_val_dir", str(dataset["coco"]), "--mode", "score", "--batch_size", "3",
                             "--output", str(tmp_path / "eval.jsonl")])
    assert report["accuracy"] == evals[-1]["coco"]["accuracy"]
    assert report["per_relation"] == evals[-1]["coco"]["per_relation"]
    recorded = [r["prediction"] for r in map(json.loads, (out / "predictions" / "step-20.jsonl").read_text().splitlines())
                if r["set"] == "coco"]
    again = [json.loads(l)["prediction"] for l in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert again == recorded


@pytest.mark.fast
def test_existing_run_is_not_overwritten(dataset, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    history = '{"event": "train", "step": 1}\n'
    (out / "metrics.jsonl").write_text(history)
    with pytest.raises(SystemExit, match="already holds a run"):
        train.main(_args(dataset, out, "--max_steps", "1"))
    assert (out / "metrics.jsonl").read_text() == history


def test_spatial_run_logs_both_losses(dataset, tmp_path):
    ids = _ids(tmp_path / "ids.pt")
    out = tmp_path / "spatial"
    train.main(_args(dataset, out, "--max_steps", "4", "--log_every", "2", "--universal_id_path", str(ids),
                     "--spatial_id_weight", "0.5", "--eval_max_samples", "2"))
    events = _events(out, "train")
    assert len(events) == 2
    for e in events:
        assert 0 <= e["spatial_loss"] <= 2
        assert e["loss"] == pytest.approx(e["lm_loss"] + 0.5 * e["spatial_loss"], rel=1e-5)


@pytest.mark.fast
@pytest.mark.parametrize("case, message", [
    ("missing_cell", "(3, 3, 124)"),
    ("hidden_size", "64"),
    ("layer", "11"),
    ("layer_range", "--spatial_id_layer 40"),
    ("missing_file", "derive_spatial_ids.py --model tiny"),
])
def test_bad_spatial_ids_stop_before_training(dataset, tmp_path, case, message):
    path = tmp_path / "ids.pt"
    layer = "11"
    if case == "missing_cell":
        _ids(path, cells=[c for c in CELLS if c != (3, 3, 124)])
    elif case == "hidden_size":
        _ids(path, hidden=32)
    elif case == "layer":
        _ids(path, layer=5)
    elif case == "layer_range":
        _ids(path)
        layer = "40"
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as err:
        train.main(_args(dataset, out, "--universal_id_path", str(path), "--spatial_id_layer", layer))
    assert message in str(err.value)
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.fast
def test_bad_arguments_and_data_are_reported_before_the_model_loads(dataset, tmp_path, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("model loaded before the data was checked")

    monkeypatch.setattr(train, "load_model_and_processor", no_model)
    with pytest.raises(SystemExit, match="make_grid_data.py"):
        train.main(_args(dataset, tmp_path / "r", "--train_dir", str(tmp_path / "none")))
    with pytest.raises(SystemExit, match="COCO-Spatial images of .* are missing"):
        train.main(_args(dataset, tmp_path / "r", "--coco_val_dir", str(tmp_path)))
    with pytest.raises(SystemExit):
        train.main(_args(dataset, tmp_path / "r", "--universal_id_path", "x.pt", "--sampler", "shuffle"))


def _comparable(run):
    """metrics.jsonl events without the fields that name the run folder or time it."""
    events = [json.loads(l) for l in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in e.items() if k not in ("checkpoint", "seconds_per_step")} for e in events]


def test_resume_from_checkpoint_continues_exactly(dataset, tmp_path):
    import shutil

    common = ["--max_steps", "8", "--eval_save_steps", "3", "--grad_accum", "2", "--epochs", "3",
              "--log_every", "1", "--eval_max_samples", "2", "--holdout_max_samples", "2"]
    straight = tmp_path / "straight"
    train.main(_args(dataset, straight, *common))
    # An interrupted copy: only the history up to checkpoint-3 survived.
    cut = tmp_path / "cut"
    shutil.copytree(straight, cut, ignore=shutil.ignore_patterns("checkpoint-6", "checkpoint-8", "final"))
    train.main(_args(dataset, cut, *common, "--resume_from_checkpoint", "latest"))
    assert _comparable(cut) == _comparable(straight)
    config = json.loads((cut / "config.json").read_text())
    assert config["resumed"][0]["step"] == 3 and config["resumed"][0]["from"].endswith("checkpoint-3")
    a = dict(models.load_model_and_processor(str(straight / "final"))[0].named_parameters())
    b = dict(models.load_model_and_processor(str(cut / "final"))[0].named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a)
    # Forking from a checkpoint into a new folder gives the same run again.
    fork = tmp_path / "fork"
    train.main(_args(dataset, fork, *common, "--resume_from_checkpoint", str(straight / "checkpoint-6"), "--fork"))
    assert _comparable(fork) == _comparable(straight)


@pytest.mark.fast
def test_resume_needs_a_checkpoint(dataset, tmp_path):
    with pytest.raises(SystemExit, match="no complete checkpoint-N"):
        train.main(_args(dataset, tmp_path / "empty", "--resume_from_checkpoint", "latest"))
