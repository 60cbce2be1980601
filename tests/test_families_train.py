"""train.py and derive_spatial_ids.py end to end on every family's tiny model: IDs derived by the
paper recipe, then a spatial-loss run whose loss, checkpoint and evaluation all work, and whose
trained tensors are exactly the default selection."""
import json

import pytest
import torch

import checkpoints
import derive_spatial_ids as dsi
import make_grid_data as mg
import train

FAMILIES = ["tiny-qwen2.5", "tiny-llava", "tiny-mllama", "tiny-internvl", "tiny-gemma3"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families_train")
    objects = mg.builtin_objects(64)
    mg.make_grid_images(root / "grid", {n: objects[n] for n in ("red circle", "blue square")}, cell=28,
                        sizes=(124,), max_pairs=2, max_images=45, seed=0, progress=False)
    mg.make_grid_images(root / "ext", {n: objects[n] for n in ("pink heart", "cyan hexagon")}, cell=28,
                        sizes=(124,), max_pairs=1, seed=0, progress=False, file_layout="extraction")
    mg.make_coco_standin(root / "coco", objects, n=4, image_size=64, seed=0)
    return root


@pytest.mark.parametrize("family", FAMILIES)
def test_derive_then_train_with_the_spatial_loss(family, folders, tmp_path):
    ids = tmp_path / "ids.pt"
    dsi.main(["--model", family, "--images", str(folders / "ext"), "--out", str(ids), "--batch_size", "16"])
    assert json.loads(ids.with_suffix(".json").read_text())["model"] == family
    out = tmp_path / "run"
    summary = train.main(["--model_name", family, "--train_dir", str(folders / "grid"),
                          "--val_json", str(folders / "coco" / mg.STANDIN_JSON), "--coco_val_dir", str(folders / "coco"),
                          "--output_dir", str(out), "--universal_id_path", str(ids), "--spatial_id_layer", "2",
                          "--max_steps", "2", "--batch_size", "4", "--eval_max_samples", "2",
                          "--holdout_max_samples", "2", "--log_every", "1", "--eval_mode", "score"])
    assert summary["optimizer_steps"] == 2
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trains = [e for e in events if e["event"] == "train"]
    assert all(0 <= e["spatial_loss"] <= 2 and torch.isfinite(torch.tensor(e["lm_loss"])) for e in trains)
    config = json.loads((out / "config.json").read_text())
    before = checkpoints.read_trainable(out / "checkpoint-0")
    after = checkpoints.read_trainable(out / "checkpoint-2")
    assert sorted(before) == sorted(after) == sorted(config["selected_parameters"])
    assert any(not torch.equal(before[k], after[k]) for k in before)
