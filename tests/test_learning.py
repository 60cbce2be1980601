"""Training teaches something, end to end: finetuning only the default selection of `tiny-warm`
(the MLPs of its last 6 vision blocks) raises its held-out-pair accuracy in generate mode, paired
on the same questions (McNemar p < 0.01, at least 200 questions); with the training answers
swapped the same run does not, so the check can fail."""
import pytest

import compare_runs
import data
import make_grid_data
import models
import train

# Built-in objects: tiny-warm was pretrained on other ones (tiny_warm.PRETRAIN_OBJECTS).
OBJECTS = ("red circle", "blue square", "green triangle", "yellow star", "purple diamond", "orange cross")
STEPS = 60


@pytest.fixture(scope="module")
def warm():
    return models.ensure_tiny_model(alias="tiny-warm")


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    renders = make_grid_data.builtin_objects(64)
    make_grid_data.make_grid_images(root / "grid", {n: renders[n] for n in OBJECTS}, cell=28, sizes=(124,),
                                    max_pairs=8, seed=0, progress=False)
    make_grid_data.make_coco_standin(root / "standin", renders, n=8, image_size=48, seed=0)
    return root


def finetune(root, out):
    train.main(["--model_name", "tiny-warm", "--train_dir", str(root / "grid"),
                "--val_json", str(root / "standin" / make_grid_data.STANDIN_JSON),
                "--coco_val_dir", str(root / "standin"), "--output_dir", str(out),
                "--max_steps", str(STEPS), "--eval_save_steps", str(STEPS), "--batch_size", "8", "--lr", "3e-3",
                "--eval_mode", "generate", "--holdout_max_samples", "256", "--seed", "0"])
    run = compare_runs.load_run(out)
    return compare_runs.learning_check({"name": run["name"], "runs": [run]}, "holdout")


def learned(check):
    return check["n"] >= 200 and check["diff"] > 0 and check["p"] < 0.01


def test_finetuning_the_default_selection_raises_holdout_accuracy(warm, grid, tmp_path):
    check = finetune(grid, tmp_path / "run")
    assert check["first_step"] == 0 and check["final_step"] == STEPS
    assert 0.55 <= check["ref_acc"] <= 0.9, f"tiny-warm should start above chance, below perfect: {check}"
    assert learned(check), check


def test_swapped_answers_do_not_raise_it(warm, grid, tmp_path, monkeypatch):
    collate = data.VLMCollator.__call__

    def swapped(self, samples):
        if self.with_answer:  # training batches only: evaluation still scores the true answers
            samples = [dict(s, answer=make_grid_data.OPPOSITE[s["answer"]]) for s in samples]
        return collate(self, samples)

    monkeypatch.setattr(data.VLMCollator, "__call__", swapped)
    check = finetune(grid, tmp_path / "run")
    assert not learned(check), check
    assert check["diff"] <= 0, check
