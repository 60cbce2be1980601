"""Every bad input stops with one line naming the culprit, a non-zero exit, no traceback, and
nothing existing changed; where the check needs no model, before the model loads.

Each case runs the script's main() in-process (fast); a few run as real subprocesses too, to show
the same holds for the exit code and stderr a user sees."""
import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image

import checkpoints
import compare_runs
import data
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
     "truncated_ids.pt", False),
    ("ID file is text", train, lambda w: _train(w, "--universal_id_path", str(w / "text_ids.pt")), "text_ids.pt", False),
    ("ID layer absent", train, lambda w: _train(w, "--universal_id_path", str(w / "ids.pt"), "--spatial_id_layer", "5"),
     "layer 5", False),
    ("output dir is a file", train, lambda w: _train(w, "--output_dir", str(w / "a_file")), "a_file", False),
    ("resume folder missing", train, lambda w: _train(w, "--resume_from_checkpoint", str(w / "nockpt")), "nockpt", False),
    ("resume latest without checkpoints", train, lambda w: _train(w, "--resume_from_checkpoint", "latest"),
     "no complete checkpoint", False),
    ("model unknown", train, lambda w: _train(w, "--model_name", str(w / "no_model")), "no_model", False),
    ("eval batch zero", eval_coco, lambda w: _eval(w, "--batch_size", "0"), "--batch_size", False),
    ("eval samples zero (eval)", eval_coco, lambda w: _eval(w, "--eval_max_samples", "0"), "--eval_max_samples", False),
    ("eval budget below one visual token", eval_coco, lambda w: _eval(w, "--max_pixels", "100"), "--max_pixels", False),
    ("eval unparsed share above 1", eval_coco, lambda w: _eval(w, "--max_unparsed_share", "1.5"),
     "--max_unparsed_share", False),
    ("eval json empty", eval_coco, lambda w: _eval(w, "--val_json", str(w / "empty.json")), "empty.json", False),
    ("eval mode unknown", eval_coco, lambda w: _eval(w, "--mode", "vote"), "--mode", False),
    ("eval checkpoint unknown", eval_coco, lambda w: _eval(w, "--ckpt", str(w / "no_ckpt")), "no_ckpt", False),
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


@pytest.mark.fast
def test_at_least_forty_cases_over_five_scripts():
    assert len(CASES) >= 40
    assert {module for _, module, *_ in CASES} == {train, eval_coco, derive_spatial_ids, make_grid_data, compare_runs}


@pytest.mark.fast
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


def test_an_image_damaged_in_the_middle_is_skipped_and_named_when_decoded(world, tmp_path, tiny_path, capsys):
    """The up-front check reads a file's header and ending; damage between them is caught by the
    collator when the image is decoded."""
    grid = tmp_path / "grid"
    shutil.copytree(world / "grid", grid)
    victim = sorted(grid.iterdir())[3]
    whole = victim.read_bytes()
    victim.write_bytes(whole[:60] + whole[-12:])  # header and IEND survive, the pixels do not
    assert data.image_problem(victim) is None
    summary = train.main(_train(world, "--train_dir", str(grid), "--output_dir", str(tmp_path / "run"),
                                "--spatial_holdout_frac", "0", "--batch_size", "4", "--eval_max_samples", "2",
                                "--holdout_max_samples", "2", "--sampler", "shuffle"))  # every question, once
    assert summary["unreadable_images"] == 1
    assert str(victim) in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# One test per class of bad input: refused with one short line naming the culprit, before a model
# loads and with nothing existing changed; then the same command with the input fixed succeeds.
# ---------------------------------------------------------------------------------------------

def _run(module, argv, capsys):
    """(exit status, what main returned, stdout, stderr) of module.main(argv), as a shell sees them."""
    result = None
    try:
        result = module.main(argv)
        code = 0
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    if isinstance(code, str):  # sys.exit("error: ...") prints the text to stderr and exits with 1
        err, code = err + code + "\n", 1
    return code or 0, result, out, err


@contextlib.contextmanager
def _model_never_loads(monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the input was checked")

    with monkeypatch.context() as patch:
        for module in (models, train, derive_spatial_ids):
            patch.setattr(module, "load_model_and_processor", no_model)
        yield


def _refused(module, argv, culprit, watched, monkeypatch, capsys):
    """Assert `module.main(argv)` stops with a non-zero status and a last line under 300
    characters naming `culprit`, without a model load or a traceback, leaving every file under the
    `watched` folders as it was. Returns the last line."""
    before = [_snapshot(root) for root in watched]
    with _model_never_loads(monkeypatch):
        code, _, _, err = _run(module, argv, capsys)
    assert code != 0
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert str(culprit) in last, last
    assert len(last) < 300, last
    after = [_snapshot(root) for root in watched]
    assert [{k: v for k, v in a.items() if k in b} for a, b in zip(after, before)] == before
    return last


def _accepted(module, argv, capsys):
    """(what main returned, stdout, stderr) of a command that must succeed, model load included."""
    code, result, out, err = _run(module, argv, capsys)
    assert code == 0, err[-2000:]
    return result, out, err


def _quick_train(w, out_dir, *extra):
    return _train(w, "--output_dir", str(out_dir), "--max_steps", "1", "--batch_size", "4", "--eval_max_samples",
                  "2", "--holdout_max_samples", "2", "--eval_save_steps", "1", *extra)


@pytest.fixture(scope="module")
def good_run(world, tiny_path, tmp_path_factory):
    """The quick training command on the valid inputs: the fixed form of several classes."""
    out = tmp_path_factory.mktemp("good_run") / "run"
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *_quick_train(world, out)], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1]), proc.stderr


def _damaged_copy(src, dst, damage):
    shutil.copytree(src, dst)
    for i, path in enumerate(sorted(dst.rglob("*"))):
        if path.is_file():
            damage(i, path)
    return dst


def truncate(path):
    path.write_bytes(path.read_bytes()[:60])  # the header survives, the pixels and the ending do not


def test_broken_training_images_all_of_them(world, tmp_path, good_run, monkeypatch, capsys):
    truncated = _damaged_copy(world / "grid", tmp_path / "grid_truncated", lambda i, p: truncate(p))
    empty = _damaged_copy(world / "grid", tmp_path / "grid_empty", lambda i, p: p.write_bytes(b""))
    for grid, why in ((truncated, "truncated"), (empty, "empty (0 bytes)")):
        last = _refused(train, _quick_train(world, tmp_path / "run", "--train_dir", str(grid)), grid,
                        [world, grid], monkeypatch, capsys)
        assert why in last and "none of its 30 grid images" in last
    # the check can fail: the same command on the whole images trains
    summary, _ = good_run
    assert summary["event"] == "end" and summary["unreadable_images"] == 0


def test_broken_images_some_of_them_are_skipped_counted_and_named(world, tmp_path, tiny_path, good_run, capsys):
    grid = _damaged_copy(world / "grid", tmp_path / "grid", lambda i, p: truncate(p) if i % 2 else None)
    coco = _damaged_copy(world / "coco", tmp_path / "coco", lambda i, p: truncate(p) if p.suffix == ".jpg" and i % 2
                         else None)
    broken = sorted(str(p) for p in grid.iterdir() if p.stat().st_size == 60)
    broken_coco = sorted(str(p) for p in coco.glob("*.jpg") if p.stat().st_size == 60)
    assert len(broken) == 15 and 0 < len(broken_coco) < 4
    json_path = coco / make_grid_data.STANDIN_JSON
    # training (half the folder broken is above the default --max_unreadable_frac: allowed here)
    summary, _, err = _accepted(train, _quick_train(world, tmp_path / "run", "--train_dir", str(grid), "--val_json",
                                                    str(json_path), "--coco_val_dir", str(coco),
                                                    "--eval_max_samples", "4", "--max_unreadable_frac", "0.5"), capsys)
    assert summary["unreadable_images"] == len(broken)
    assert [path for path in broken + broken_coco if path not in err] == [], err
    # evaluation
    report, out, err = _accepted(eval_coco, _eval(world, "--val_json", str(json_path), "--coco_val_dir", str(coco),
                                                  "--output", str(tmp_path / "preds.jsonl")), capsys)
    assert report["n"] == 4 - len(broken_coco) and report["unreadable_images_left_out"] == len(broken_coco)
    assert all(path in err for path in broken_coco)
    # the check can fail: whole images leave nothing out
    summary, err = good_run
    assert summary["unreadable_images"] == 0 and "unreadable" not in err


@pytest.mark.fast
def test_a_training_folder_with_too_many_broken_images_stops_before_the_model(world, tmp_path, tiny_path,
                                                                              monkeypatch, capsys):
    """Half the PNGs truncated (a broken download) stops training in one line giving the count,
    the share and the first files; up to --max_unreadable_frac, the broken ones are skipped."""
    grid = _damaged_copy(world / "grid", tmp_path / "grid", lambda i, p: truncate(p) if i % 2 else None)
    first = sorted(p.name for p in grid.iterdir() if p.stat().st_size == 60)[0]
    last = _refused(train, _quick_train(world, tmp_path / "run", "--train_dir", str(grid)), grid, [world, grid],
                    monkeypatch, capsys)
    assert "15 of 30 training images (50%) unreadable" in last and "--max_unreadable_frac 0.05" in last, last
    assert f"{first} (truncated)" in last, last
    # one broken image in 30 (3%) is under the default: trained, counted, named
    one = _damaged_copy(world / "grid", tmp_path / "one", lambda i, p: truncate(p) if i == 7 else None)
    summary, _, err = _accepted(train, _quick_train(world, tmp_path / "run_one", "--train_dir", str(one)), capsys)
    assert summary["unreadable_images"] == 1 and "unreadable" in err


@pytest.mark.fast
def test_missing_coco_images_are_one_short_line(world, tmp_path, monkeypatch, capsys):
    """440 rows whose images are not there: one line under 300 characters naming the folder, the
    first missing file and how many are missing (it listed five full paths before)."""
    rows = [[100 + i, "A photo of a dog to the left of a cat", "A photo of a dog to the right of a cat"]
            for i in range(440)]
    (tmp_path / "coco_qa_two_obj.json").write_text(json.dumps(rows))
    images = tmp_path / "datasets" / "coco" / "images_of_the_validation_split"
    images.mkdir(parents=True)
    for module, argv in ((train, _train(world, "--coco_val_dir", str(images))),
                         (eval_coco, _eval(world, "--coco_val_dir", str(images)))):
        argv[argv.index("--val_json") + 1] = str(tmp_path / "coco_qa_two_obj.json")
        last = _refused(module, argv, images, [world], monkeypatch, capsys)
        assert "440 of the 440" in last and "000000000100.jpg" in last, last


@pytest.mark.parametrize("module, argv, fixed", [
    (eval_coco, lambda w, t: _eval(w, "--output", str(w / "a_file" / "preds.jsonl")),
     lambda w, t: _eval(w, "--output", str(t / "out" / "preds.jsonl"))),
    (derive_spatial_ids, lambda w, t: _derive(w, "--out", str(w / "a_file" / "ids.pt")),
     lambda w, t: _derive(w, "--out", str(t / "out" / "ids.pt"))),
    (make_grid_data, lambda w, t: _grid(w, "--out_dir", str(w / "a_file")),
     lambda w, t: _grid(w, "--out_dir", str(t / "out"))),
    (make_grid_data, lambda w, t: _grid(w, "--out_dir", str(w / "a_file" / "grid")),
     lambda w, t: _grid(w, "--out_dir", str(t / "out" / "grid"))),
], ids=["eval --output", "derive --out", "grid --out_dir a file", "grid --out_dir under a file"])
def test_an_output_path_under_a_regular_file(world, tmp_path, tiny_path, monkeypatch, capsys, module, argv, fixed):
    last = _refused(module, argv(world, tmp_path), world / "a_file", [world], monkeypatch, capsys)
    assert "is a file" in last
    _accepted(module, fixed(world, tmp_path), capsys)
    assert any((tmp_path / "out").rglob("*"))


@pytest.fixture(scope="module")
def model_folders(tiny_path, tmp_path_factory):
    """A complete copy of the tiny model, one without weights, one with half a model.safetensors,
    and a GPT-2 folder (a language model, not a VLM)."""
    root = tmp_path_factory.mktemp("model_folders")
    complete = shutil.copytree(tiny_path, root / "complete")
    no_weights = shutil.copytree(tiny_path, root / "no_weights")
    (no_weights / "model.safetensors").unlink()
    half = shutil.copytree(tiny_path, root / "half_written")
    weights = (half / "model.safetensors").read_bytes()
    (half / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
    transformers.GPT2LMHeadModel(config).save_pretrained(root / "gpt2")
    return {"complete": complete, "no_weights": no_weights, "half_written": half, "gpt2": root / "gpt2"}


@pytest.mark.parametrize("kind, culprit", [("no_weights", "no weights"), ("half_written", "truncated"),
                                           ("gpt2", "not a vision-language model")])
def test_a_model_folder_that_cannot_load(world, tmp_path, model_folders, monkeypatch, capsys, kind, culprit):
    """No weights, a half-written model.safetensors (a copy interrupted mid-way), a folder that is
    not a VLM: as train.py --model_name and as eval_coco.py --ckpt."""
    folder = model_folders[kind]
    for module, argv in ((train, _quick_train(world, tmp_path / "run", "--model_name", str(folder))),
                         (eval_coco, _eval(world, "--ckpt", str(folder), "--output", str(tmp_path / "p.jsonl")))):
        last = _refused(module, argv, folder, [world, folder], monkeypatch, capsys)
        assert culprit in last and ("--model_name" in last or "--ckpt" in last)
    # the check can fail: the complete copy trains and evaluates
    complete = str(model_folders["complete"])
    summary, _, _ = _accepted(train, _quick_train(world, tmp_path / "run", "--model_name", complete), capsys)
    assert summary["event"] == "end"
    report, _, _ = _accepted(eval_coco, _eval(world, "--ckpt", complete, "--output", str(tmp_path / "p.jsonl")),
                             capsys)
    assert report["n"] == 4


def test_a_model_that_does_not_exist_is_named_in_a_short_line(world, tmp_path, good_run, monkeypatch, capsys):
    for module, argv, culprit in (
            (eval_coco, _eval(world, "--ckpt", str(tmp_path / "no_such_dir")), tmp_path / "no_such_dir"),
            (train, _quick_train(world, tmp_path / "run", "--model_name", str(tmp_path / "no_such_dir")),
             tmp_path / "no_such_dir"),
            (eval_coco, _eval(world, "--ckpt", "no-such-alias"), "no-such-alias"),
            (derive_spatial_ids, _derive(world, "--model", "no-such-org/no-such-model"), "no-such-org/no-such-model")):
        last = _refused(module, argv, culprit, [world], monkeypatch, capsys)
        assert "--list_models" in last and "qwen2-2b" not in last  # the aliases sit behind the hint
    # --list_models lists them
    code, _, out, _ = _run(eval_coco, ["--list_models"], capsys)
    assert code == 0 and "qwen2-2b" in out and "Qwen/Qwen2-VL-2B-Instruct" in out and "tiny-warm" in out
    # the check can fail: an existing model evaluates (and trains: good_run)
    report, _, _ = _accepted(eval_coco, _eval(world, "--ckpt", "tiny", "--output", str(tmp_path / "p.jsonl")), capsys)
    assert report["n"] == 4 and good_run[0]["event"] == "end"


@pytest.fixture(scope="module")
def id_files(tmp_path_factory, tiny_path):
    """A valid ID file for the tiny model (layer 2, every cell of size 124) and one per problem."""
    root = tmp_path_factory.mktemp("id_files")
    hidden = models.model_source("tiny")[1].get_text_config().hidden_size
    torch.manual_seed(0)
    cells = {(c, r, 124): torch.randn(hidden) for c in range(4) for r in range(4)}
    spatial_loss.save_universal_ids(root / "good.pt", {2: cells})
    spatial_loss.save_universal_ids(root / "missing_layer.pt", {1: cells})
    nan = dict(cells)
    nan[(1, 1, 124)] = torch.full((hidden,), float("nan"))
    spatial_loss.save_universal_ids(root / "nan.pt", {2: nan})
    torch.save({2: {"universal": cells}, "made_by": argparse.Namespace(tool="x")}, root / "pickle.pt")
    spatial_loss.save_universal_ids(root / "missing_cells.pt", {2: {k: v for k, v in cells.items() if k[0] < 2}})
    good = (root / "good.pt").read_bytes()
    (root / "truncated.pt").write_bytes(good[: len(good) // 2])
    (root / "text.pt").write_text("layer 2: 0.1 0.2 0.3\n")
    torch.save([cells[(0, 0, 124)]], root / "list.pt")
    return root


@pytest.mark.parametrize("kind, what", [("missing_layer", "layer 2"), ("nan", "not finite"),
                                        ("pickle", "non-tensor"), ("missing_cells", "no ID for 8 cell(s)"),
                                        ("truncated", "not a readable"), ("text", "not a readable"),
                                        ("list", "found a list")])
def test_a_bad_id_file_is_found_before_the_model_loads(world, tmp_path, id_files, monkeypatch, capsys, kind, what):
    argv = lambda path: _quick_train(world, tmp_path / "run", "--universal_id_path", str(path),  # noqa: E731
                                     "--spatial_id_layer", "2", "--allow_holdout_in_ids")
    last = _refused(train, argv(id_files / f"{kind}.pt"), id_files / f"{kind}.pt", [world, id_files], monkeypatch,
                    capsys)
    assert what in last
    if kind == "missing_layer":  # the check can fail: the same command with a valid file trains (once)
        summary, _, _ = _accepted(train, argv(id_files / "good.pt"), capsys)
        assert summary["event"] == "end" and summary["step"] == 1


@pytest.mark.fast
def test_a_derivation_from_a_single_image_is_refused(world, tmp_path, tiny_path, monkeypatch, capsys):
    one = tmp_path / "one_image"
    one.mkdir()
    shutil.copy(sorted((world / "grid").iterdir())[0], one)
    for recipe in ("paper", "clean"):
        last = _refused(derive_spatial_ids, _derive(world, "--images", str(one), "--id_recipe", recipe,
                                                    "--out", str(tmp_path / f"{recipe}.pt")),
                        one, [world, one], monkeypatch, capsys)
        assert "group of >= 2" in last and not (tmp_path / f"{recipe}.pt").exists()
    # the check can fail: the same command on a set with groups of two derives
    for recipe in ("paper", "clean"):
        (_, stats), _, _ = _accepted(derive_spatial_ids, _derive(world, "--id_recipe", recipe, "--out",
                                                                 str(tmp_path / f"{recipe}.pt"), "--layers", "2"), capsys)
        assert stats["groups"] >= 2 and (tmp_path / f"{recipe}.pt").is_file()


@pytest.mark.fast
@pytest.mark.parametrize("name", ["assistant", "a"])
def test_the_paper_recipe_reads_the_subject_after_the_image(world, tiny, monkeypatch, name):
    """A name that also occurs in the system prompt ("You are a helpful assistant.") is read in
    the question, after the image, not in the system prompt."""
    model, processor, adapter = tiny
    tokenizer = processor.tokenizer
    token = derive_spatial_ids.subject_token(tokenizer, name)
    image_token = derive_spatial_ids.image_token_id(model)
    seen = []

    def record_positions(model, adapter, inputs, positions, layers):
        for row, position in zip(inputs["input_ids"].tolist(), positions.tolist()):
            seen.append((row, position))
        return torch.zeros(len(positions), len(layers), adapter.lm_hidden_size(model))

    monkeypatch.setattr(derive_spatial_ids, "collect_states", record_positions)
    paths = sorted((world / "grid").iterdir())[:3]
    layout = data.GridLayout("red circle", (0, 0), name, (1, 0), 124)
    derive_spatial_ids.hidden_at_subject(model, processor, adapter, [(p, layout) for p in paths], batch_size=2,
                                         layers=[2])
    assert len(seen) == 3
    for row, position in seen:
        tokens = tokenizer.convert_ids_to_tokens(row)
        image_at = max(i for i, t in enumerate(row) if t == image_token)
        assert tokens.index(token) < image_at  # the whole-prompt search would read the system prompt
        assert position == tokens.index(token, image_at + 1)  # the first occurrence in the question
