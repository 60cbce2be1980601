"""The spatial loss can be optimised by the default selection, and a weight-0 control shows what
drift alone does: train.py on one fixed batch (one (obj1, cell, obj2) group, every epoch the same
batch) of the random `tiny`, whose IDs agree across object pairs (test_id_diagnostics.py)."""
import json
import shutil

import pytest

import derive_spatial_ids
import make_grid_data
import train

STEPS = 30  # one batch per epoch


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("one_batch")
    renders = make_grid_data.builtin_objects(64)
    everything = root / "all"
    make_grid_data.make_grid_images(everything, {n: renders[n] for n in ("red circle", "blue square")}, cell=28,
                                    sizes=(124,), max_pairs=1, progress=False)
    grid = root / "grid"
    grid.mkdir()
    obj1 = sorted(everything.iterdir())[0].name.split("__")[0]
    for path in everything.glob(f"{obj1}__c0r0__*.png"):  # obj1 fixed in one cell, obj2 in the other 15
        shutil.copy(path, grid)
    extraction = root / "extraction"
    make_grid_data.make_grid_images(extraction, {n: renders[n] for n in ("pink heart", "cyan hexagon", "yellow star",
                                                                          "purple diamond")},
                                    cell=28, sizes=(124,), progress=False, file_layout="extraction")
    ids = root / "tiny_ids.pt"
    derive_spatial_ids.main(["--model", "tiny", "--images", str(extraction), "--out", str(ids), "--layers", "11",
                             "--max_groups", "24"])
    standin = root / "standin"
    make_grid_data.make_coco_standin(standin, renders, n=4, seed=0)
    return {"grid": grid, "ids": ids, "json": standin / "coco_qa_two_obj_standin.json", "coco": standin,
            "n_images": len(list(grid.iterdir()))}


def run(setup, out, *extra):
    """STEPS steps on the one batch; returns the logged train events."""
    train.main(["--model_name", "tiny", "--train_dir", str(setup["grid"]), "--val_json", str(setup["json"]),
                "--coco_val_dir", str(setup["coco"]), "--output_dir", str(out), "--universal_id_path", str(setup["ids"]),
                "--spatial_holdout_frac", "0", "--batch_size", "32", "--epochs", str(STEPS), "--lr", "1e-2",
                "--warmup_frac", "0", "--log_every", "1", "--eval_save_steps", "1000", "--eval_mode", "score",
                "--eval_max_samples", "4"] + list(extra))
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] == "train"]


def test_the_spatial_loss_alone_falls_by_half_and_its_weight0_control_does_not(setup, tmp_path):
    assert setup["n_images"] == 15
    alone = run(setup, tmp_path / "spatial_only", "--lm_loss_weight", "0")
    control = run(setup, tmp_path / "control", "--spatial_id_weight", "0")
    assert len(alone) == len(control) == STEPS
    first, last = alone[0]["spatial_loss"], alone[-1]["spatial_loss"]
    print(f"spatial only: {first:.3f} -> {last:.3f}; weight-0 control: {control[0]['spatial_loss']:.3f} -> "
          f"{control[-1]['spatial_loss']:.3f}")
    # Same batch, same weights before the first update: the two runs are paired.
    assert alone[0]["spatial_loss"] == control[0]["spatial_loss"]
    assert last <= 0.5 * first
    assert control[-1]["spatial_loss"] > 0.9 * control[0]["spatial_loss"]
    # With weight 0 the LM loss sends no gradient: it does not fall, while the control's does.
    assert alone[-1]["lm_loss"] > 0.95 * alone[0]["lm_loss"]
    assert control[-1]["lm_loss"] < 0.97 * control[0]["lm_loss"]
    assert alone[-1]["loss"] == pytest.approx(alone[-1]["spatial_loss"])  # the total is the spatial loss alone


def test_an_lm_loss_weight_of_zero_without_a_spatial_loss_is_refused(setup, tmp_path):
    base = ["--model_name", "tiny", "--train_dir", str(setup["grid"]), "--val_json", str(setup["json"]),
            "--coco_val_dir", str(setup["coco"]), "--output_dir", str(tmp_path / "x"), "--lm_loss_weight", "0"]
    for extra in ([], ["--universal_id_path", str(setup["ids"]), "--spatial_id_weight", "0"]):
        with pytest.raises(SystemExit) as exc:
            train.parse_args(base + extra)
        assert exc.value.code == 2
    with pytest.raises(SystemExit):
        train.parse_args(base[:-1] + ["-1"])
    assert train.parse_args(base + ["--universal_id_path", str(setup["ids"])]).lm_loss_weight == 0
    assert not (tmp_path / "x").exists()
