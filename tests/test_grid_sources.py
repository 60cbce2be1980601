"""Grid images drawn on the fly (grid_sources.py) against make_grid_data.py's files from the same
arguments: the same layouts, order, questions and pixels; a training run from the objects equals
one from the folder; ID derivation from the objects equals one from the extraction folder."""
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import derive_spatial_ids
import grid_sources
import make_grid_data
import train

OBJECTS = ["red circle", "blue square", "green triangle"]
LAYOUT_FLAGS = ["--cell", "28", "--sizes", "74", "124", "--max_pairs", "4", "--objects", *OBJECTS]


def _renderer(*flags, transparent=False):
    args = train.parse_args(["--train_objects", "builtin", *flags])
    return grid_sources.renderer_from_args(args, "--train_objects", transparent=transparent)


def _pixels(image):
    return np.asarray(image.convert("RGB"))


def _strip(sample):
    return {k: v for k, v in sample.items() if k not in ("image_path", "image")}


@pytest.mark.parametrize("variation", [[], ["--local_variation"]])
def test_rendered_grid_equals_make_grid_data_files(tmp_path, variation):
    folder = tmp_path / "grid"
    make_grid_data.main(["--out_dir", str(folder), *LAYOUT_FLAGS, "--seed", "3", *variation])
    on_disk = data.GridDataset(folder, "paper")
    rendered = grid_sources.RenderedGridDataset(_renderer(*LAYOUT_FLAGS, "--grid_seed", "3", *variation), "paper")

    # The same questions, in the same order (so the same holdout split and batches), same names.
    assert [_strip(s) for s in rendered.samples] == [_strip(s) for s in on_disk.samples]
    assert [Path(s["image_path"]).name for s in rendered.samples] == [Path(s["image_path"]).name for s in on_disk.samples]
    assert rendered.n_images == on_disk.n_images == 4 * 2 * 240
    train_a, hold_a = data.split_holdout(rendered.samples, 0.34, seed=1)
    assert (train_a, hold_a) == data.split_holdout(on_disk.samples, 0.34, seed=1)
    for name in data.SAMPLERS:
        assert (data.make_batch_sampler(name, rendered.samples, train_a, 15, seed=2).epoch_batches()
                == data.make_batch_sampler(name, on_disk.samples, train_a, 15, seed=2).epoch_batches())

    # Pixel for pixel on a sample of layouts, through the collator's image loading.
    picks = random.Random(0).sample(range(len(rendered)), 12)
    for i in picks:
        drawn = rendered[i]["image"]()
        assert np.array_equal(_pixels(drawn), _pixels(data.load_image(on_disk[i]["image_path"]))), on_disk[i]["image_path"]

    # The comparison can fail: another grid seed (variation draws differ) or another layout's image.
    if variation:
        other_seed = grid_sources.RenderedGridDataset(_renderer(*LAYOUT_FLAGS, "--grid_seed", "4", *variation), "paper")
        assert not all(np.array_equal(_pixels(other_seed[i]["image"]()), _pixels(data.load_image(on_disk[i]["image_path"])))
                       for i in picks)
    i, j = picks[:2]
    assert not np.array_equal(_pixels(rendered[j]["image"]()), _pixels(data.load_image(on_disk[i]["image_path"])))


def test_rendered_extraction_set_equals_make_grid_data_files(tmp_path):
    folder = tmp_path / "extraction"
    make_grid_data.main(["--out_dir", str(folder), "--layout", "extraction", *LAYOUT_FLAGS])
    items, kind, _ = data.read_extraction_set(folder)
    renderer = _renderer(*LAYOUT_FLAGS, transparent=True)
    rendered = grid_sources.rendered_items(renderer, nested=True)
    assert kind == "nested"
    assert [lay for _, lay in rendered] == [lay for _, lay in items]  # same order: the same derivation batches
    assert [p.relative_to("<rendered>") for p, _ in rendered] == [p.relative_to(folder) for p, _ in items]
    for k in random.Random(1).sample(range(len(items)), 8):
        assert np.array_equal(_pixels(renderer.render(rendered[k][1])), _pixels(data.load_image(items[k][0])))
    # On a white canvas (the flat layout's) the same layout is not the same image.
    assert not np.array_equal(_pixels(_renderer(*LAYOUT_FLAGS).render(rendered[0][1])), _pixels(data.load_image(items[0][0])))


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    root = tmp_path_factory.mktemp("standin")
    make_grid_data.make_coco_standin(root, make_grid_data.builtin_objects(64), n=4, image_size=48, seed=0)
    return root


def _train_losses(tmp_path, standin, name, *source):
    out = tmp_path / name
    train.main(["--model_name", "tiny", *source, "--val_json", str(standin / make_grid_data.STANDIN_JSON),
                "--coco_val_dir", str(standin), "--output_dir", str(out), "--protocol", "clean", "--batch_size", "6",
                "--lr", "1e-3", "--max_steps", "3", "--log_every", "1", "--eval_save_steps", "1000",
                "--holdout_max_samples", "4", "--eval_mode", "score"])
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [e["loss"] for e in events if e["event"] == "train"], [e for e in events if e["event"] == "eval"]


def test_training_from_objects_equals_training_from_folder(tmp_path, standin, tiny_path):
    flags = ["--cell", "28", "--sizes", "124", "--no_same_row_or_col", "--max_pairs", "4", "--objects", *OBJECTS]
    folder = tmp_path / "grid"
    make_grid_data.main(["--out_dir", str(folder), *flags])
    from_files, evals_files = _train_losses(tmp_path, standin, "files", "--train_dir", str(folder))
    # One DataLoader worker: the images are drawn there, from the pickled-free forked dataset.
    from_objects, evals_objects = _train_losses(tmp_path, standin, "objects", "--train_objects", "builtin", *flags,
                                                "--num_workers", "1")
    assert len(from_files) == 3 and all(np.isfinite(from_files))
    assert from_objects == from_files
    assert [e["holdout"]["accuracy"] for e in evals_objects] == [e["holdout"]["accuracy"] for e in evals_files]
    # A different image set gives different losses: the comparison above can fail.
    other, _ = _train_losses(tmp_path, standin, "other", "--train_objects", "builtin", *flags, "--grid_seed", "1",
                             "--local_variation")
    assert other != from_files


def test_derivation_from_objects_equals_derivation_from_folder(tmp_path, tiny_path):
    flags = ["--cell", "28", "--sizes", "124", "--objects", "pink heart", "cyan hexagon"]
    folder = tmp_path / "extraction"
    make_grid_data.main(["--out_dir", str(folder), "--layout", "extraction", *flags])
    common = ["--model", "tiny", "--layers", "11", "--batch_size", "16", "--max_groups", "3"]
    derive_spatial_ids.main([*common, "--images", str(folder), "--out", str(tmp_path / "files.pt")])
    derive_spatial_ids.main([*common, "--id_objects", "builtin", *flags, "--out", str(tmp_path / "objects.pt")])
    a = torch.load(tmp_path / "files.pt", weights_only=True)[11]["universal"]
    b = torch.load(tmp_path / "objects.pt", weights_only=True)[11]["universal"]
    assert a.keys() == b.keys() and len(a) == 16
    assert all(torch.equal(a[k], b[k]) for k in a)
    provenance = json.loads((tmp_path / "objects.json").read_text())
    assert provenance["images"].startswith("rendered on the fly: objects=builtin (pink heart, cyan hexagon)")


@pytest.mark.fast
@pytest.mark.parametrize("argv, expected", [
    (["--cell", "28"], "argument --cell: a layout flag for images drawn on the fly; it needs --train_objects"),
    (["--train_objects", "builtin", "--train_dir", "x"], "give it or --train_dir, not both"),
])
def test_flag_errors_at_parse_time(argv, expected, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert expected in capsys.readouterr().err


@pytest.mark.fast
@pytest.mark.parametrize("argv, expected", [
    (["--train_objects", "nowhere"], "argument --train_objects: objects folder not found: nowhere"),
    (["--train_objects", "builtin", "--objects", "red circle", "plaid zebra"], "argument --objects: unknown object(s) ['plaid zebra']"),
    (["--train_objects", "builtin", "--sizes", "300"], "argument --sizes: [300] not in 1..224"),
])
def test_bad_render_flags_stop_before_the_model_with_one_line(argv, expected):
    args = train.parse_args(argv)
    with pytest.raises(ValueError) as err:
        grid_sources.renderer_from_args(args, "--train_objects")
    assert expected in str(err.value) and "\n" not in str(err.value)
