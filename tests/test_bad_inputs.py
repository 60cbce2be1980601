"""Every bad input stops with one line naming the culprit, a non-zero exit, no traceback, and
nothing existing changed; where the check needs no model, before the model loads.

Each case runs the script's main() in-process (fast); a few run as real subprocesses too, to show
the same holds for the exit code and stderr a user sees."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import checkpoints
import compare_runs
import derive_spatial_ids
import eval_coco
import make_grid_data
import models
import spatial_loss
import train

REPO = Path(__file__).resolve().parents[1]
MODULES_THAT_LOAD = (train, derive_spatial_ids, models, checkpoints)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small, valid set of inputs; each case breaks one thing."""
    root = tmp_path_factory.mktemp("world")
    objects = make_grid_data.builtin_objects(64)
    make_grid_data.make_grid_images(root / "grid", {n: objects[n] for n in ("red circle", "blue square")},
                                    cell=16, sizes=(124,), max_pairs=2, max_images=30, seed=0, progress=False)
    make_grid_data.make_coco_standin(root / "coco", objects, n=4, image_size=48, seed=0)
    (root / "empty.json").write_text("[]")
    (root / "garbage.json").write_text("{not json")
    (root / "badrow.json").write_text(json.dumps([[1, "A photo of a dog next to a cat", "x"]]))
    (root / "nogrid").mkdir()
    (root / "nogrid" / "holiday.png").write_bytes(b"")
    good_ids = {11: {(c, r, 124): torch.ones(64) for c in range(4) for r in range(4)}}
    spatial_loss.save_universal_ids(root / "ids.pt", good_ids)
    data = (root / "ids.pt").read_bytes()
    (root / "truncated_ids.pt").write_bytes(data[: len(data) // 2])
    (root / "text_ids.pt").write_text("layer 11: some numbers\n")
    (root / "a_file").write_text("not a folder")
    (root / "existing_ids.pt").write_bytes(data)
    run = root / "not_a_run"
    run.mkdir()
    empty_run = root / "empty_run"
    empty_run.mkdir()
    (empty_run / "metrics.jsonl").write_text("")
    nested = root / "bad_nested" / "a_b_c" / "0_0"
    nested.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(nested / "1_0_224.png")
    return root


def _train(w, *extra):
    return ["--model_name", "tiny", "--train_dir", str(w / "grid"), "--val_json",
            str(w / "coco" / make_grid_data.STANDIN_JSON), "--coco_val_dir", str(w / "coco"),
            "--output_dir", str(w / "runs" / "r"), *extra]


def _eval(w, *extra):
    return ["--ckpt", "tiny", "--val_json", str(w / "coco" / make_grid_data.STANDIN_JSON),
            "--coco_val_dir", str(w / "coco"), "--output", str(w / "eval_out.jsonl"), *extra]


def _derive(w, *extra):
    return ["--model", "tiny", "--images", str(w / "grid"), "--out", str(w / "new_ids.pt"), *extra]


def _grid(w, *extra):
    return ["--out_dir", str(w / "grid_out"), "--max_images", "2", *extra]


# (name, module, argv(world), culprit text expected in the last line, may the model load first?)
CASES = [
    ("lr zero", train, lambda w: _train(w, "--lr", "0"), "--lr", False),
    ("lr negative", train, lambda w: _train(w, "--lr", "-1e-4"), "--lr", False),
    ("warmup above 1", train, lambda w: _train(w, "--warmup_frac", "5"), "--warmup_frac", False),
    ("warmup negative", train, lambda w: _train(w, "--warmup_frac", "-0.1"), "--warmup_frac", False),
    ("budget zero", train, lambda w: _train(w, "--param_budget_frac", "0"), "--param_budget_frac", False),
    ("budget above 1", train, lambda w: _train(w, "--param_budget_frac", "1.5"), "--param_budget_frac", False),
    ("batch zero", train, lambda w: _train(w, "--batch_size", "0"), "--batch_size", False),
    ("accum zero", train, lambda w: _train(w, "--grad_accum", "0"), "--grad_accum", False),
    ("epochs zero", train, lambda w: _train(w, "--epochs", "0"), "--epochs", False),
    ("max steps zero", train, lambda w: _train(w, "--max_steps", "0"), "--max_steps", False),
    ("eval samples zero", train, lambda w: _train(w, "--eval_max_samples", "0"), "--eval_max_samples", False),
    ("holdout samples zero", train, lambda w: _train(w, "--holdout_max_samples", "0"), "--holdout_max_samples", False),
    ("workers negative", train, lambda w: _train(w, "--num_workers", "-1"), "--num_workers", False),
    ("last k zero", train, lambda w: _train(w, "--last_k_blocks", "0"), "--last_k_blocks", False),
    ("last k beyond the model", train, lambda w: _train(w, "--last_k_blocks", "99"), "last_k_blocks=99", True),
    ("holdout fraction 1", train, lambda w: _train(w, "--spatial_holdout_frac", "1"), "--spatial_holdout_frac", False),
    ("grad norm zero", train, lambda w: _train(w, "--max_grad_norm", "0"), "--max_grad_norm", False),
    ("spatial weight negative", train, lambda w: _train(w, "--spatial_id_weight", "-1"), "--spatial_id_weight", False),
    ("keep best alone", train, lambda w: _train(w, "--keep_best"), "--keep_best", False),
    ("fork alone", train, lambda w: _train(w, "--fork"), "--fork", False),
    ("shuffled spatial batches", train, lambda w: _train(w, "--universal_id_path", str(w / "ids.pt"), "--sampler",
                                                         "shuffle"), "--sampler", False),
    ("train dir missing", train, lambda w: _train(w, "--train_dir", str(w / "nope")), "nope", False),
    ("train dir without grid images", train, lambda w: _train(w, "--train_dir", str(w / "nogrid")), "nogrid", False),
    ("COCO json missing", train, lambda w: _train(w, "--val_json", str(w / "nope.json")), "nope.json", False),
    ("COCO json empty", train, lambda w: _train(w, "--val_json", str(w / "empty.json")), "empty.json", False),
    ("COCO json not JSON", train, lambda w: _train(w, "--val_json", str(w / "garbage.json")), "garbage.json", False),
    ("COCO row malformed", train, lambda w: _train(w, "--val_json", str(w / "badrow.json")), "row 0", False),
    ("COCO images missing", train, lambda w: _train(w, "--coco_val_dir", str(w / "grid")), "missing", False),
    ("ID file missing", train, lambda w: _train(w, "--universal_id_path", str(w / "nope.pt")), "nope.pt", False),
    ("ID file truncated", train, lambda w: _train(w, "--universal_id_path", str(w / "truncated_ids.pt")),
     "truncated_ids.pt", True),
    ("ID file is text", train, lambda w: _train(w, "--universal_id_path", str(w / "text_ids.pt")), "text_ids.pt", True),
    ("ID layer absent", train, lambda w: _train(w, "--universal_id_path", str(w / "ids.pt"), "--spatial_id_layer", "5"),
     "layer 5", True),
    ("output dir is a file", train, lambda w: _train(w, "--output_dir", str(w / "a_file")), "a_file", False),
    ("resume folder missing", train, lambda w: _train(w, "--resume_from_checkpoint", str(w / "nockpt")), "nockpt", False),
    ("resume latest without checkpoints", train, lambda w: _train(w, "--resume_from_checkpoint", "latest"),
     "no complete checkpoint", False),
    ("model unknown", train, lambda w: _train(w, "--model_name", str(w / "no_model")), "no_model", True),
    ("eval batch zero", eval_coco, lambda w: _eval(w, "--batch_size", "0"), "--batch_size", False),
    ("eval samples zero (eval)", eval_coco, lambda w: _eval(w, "--eval_max_samples", "0"), "--eval_max_samples", False),
    ("eval json empty", eval_coco, lambda w: _eval(w, "--val_json", str(w / "empty.json")), "empty.json", False),
    ("eval mode unknown", eval_coco, lambda w: _eval(w, "--mode", "vote"), "--mode", False),
    ("eval checkpoint unknown", eval_coco, lambda w: _eval(w, "--ckpt", str(w / "no_ckpt")), "no_ckpt", True),
    ("derive images missing", derive_spatial_ids, lambda w: _derive(w, "--images", str(w / "nope")), "nope", False),
    ("derive out exists", derive_spatial_ids, lambda w: _derive(w, "--out", str(w / "existing_ids.pt")),
     "existing_ids.pt", False),
    ("derive batch zero", derive_spatial_ids, lambda w: _derive(w, "--batch_size", "0"), "--batch_size", False),
    ("derive max groups zero", derive_spatial_ids, lambda w: _derive(w, "--max_groups", "0"), "--max_groups", False),
    ("derive pair folder misnamed", derive_spatial_ids, lambda w: _derive(w, "--images", str(w / "bad_nested")),
     "a_b_c", False),
    ("grid cell too small", make_grid_data, lambda w: _grid(w, "--cell", "4"), "--cell", False),
    ("grid size too large", make_grid_data, lambda w: _grid(w, "--sizes", "300"), "--sizes", False),
    ("grid object unknown", make_grid_data, lambda w: _grid(w, "--objects", "unicorn", "red circle"), "unicorn", False),
    ("grid original layout, two sizes", make_grid_data, lambda w: _grid(w, "--layout", "original", "--sizes", "74",
                                                                         "124"), "--layout", False),
    ("grid max pairs zero", make_grid_data, lambda w: _grid(w, "--max_pairs", "0"), "--max_pairs", False),
    ("grid objects dir missing", make_grid_data, lambda w: _grid(w, "--objects_dir", str(w / "no_renders")),
     "no_renders", False),
    ("compare not a run", compare_runs, lambda w: [str(w / "not_a_run")], "not_a_run", False),
    ("compare empty metrics", compare_runs, lambda w: [str(w / "empty_run")], "empty_run", False),
    ("compare labels count", compare_runs, lambda w: [str(w / "not_a_run"), "--labels", "a", "b"], "--labels", False),
]


def _snapshot(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_at_least_forty_cases_over_five_scripts():
    assert len(CASES) >= 40
    assert {module for _, module, *_ in CASES} == {train, eval_coco, derive_spatial_ids, make_grid_data, compare_runs}


@pytest.mark.parametrize("name, module, argv, culprit, may_load", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(world, tiny_path, monkeypatch, capsys, name, module, argv, culprit, may_load):
    if not may_load:
        def no_model(*args, **kwargs):
            raise AssertionError(f"{name}: the model loaded before the input was checked")

        for loader in MODULES_THAT_LOAD:
            if hasattr(loader, "load_model_and_processor"):
                monkeypatch.setattr(loader, "load_model_and_processor", no_model)
    before = _snapshot(world)
    with pytest.raises(SystemExit) as info:
        module.main(argv(world))
    code = info.value.code
    assert code not in (0, None), f"{name}: exit code {code!r}"
    err = capsys.readouterr().err.strip()
    last_line = code if isinstance(code, str) else err.splitlines()[-1]
    assert "Traceback" not in err and "Traceback" not in str(code)
    assert culprit in last_line, f"{name}: {culprit!r} not in {last_line!r}"
    after = _snapshot(world)
    assert {k: v for k, v in after.items() if k in before} == before, f"{name}: changed existing files"


@pytest.mark.parametrize("script, argv, culprit", [
    ("train.py", lambda w: _train(w, "--warmup_frac", "5"), "--warmup_frac"),
    ("train.py", lambda w: _train(w, "--val_json", str(w / "empty.json")), "empty.json"),
    ("derive_spatial_ids.py", lambda w: _derive(w, "--images", str(w / "nope")), "nope"),
])
def test_the_user_sees_one_line_and_a_non_zero_exit(world, script, argv, culprit):
    proc = subprocess.run([sys.executable, str(REPO / script), *argv(world)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert culprit in proc.stderr.strip().splitlines()[-1]


def test_an_undecodable_training_image_is_skipped_and_named(world, tmp_path, tiny_path, capsys):
    import shutil

    grid = tmp_path / "grid"
    shutil.copytree(world / "grid", grid)
    victim = sorted(grid.iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:60])  # the header survives, the pixels do not
    summary = train.main(_train(world, "--train_dir", str(grid), "--output_dir", str(tmp_path / "run"),
                                "--spatial_holdout_frac", "0", "--batch_size", "4", "--eval_max_samples", "2",
                                "--holdout_max_samples", "2", "--sampler", "shuffle"))  # every question, once
    assert summary["unreadable_images"] >= 1
    assert str(victim) in capsys.readouterr().err
