"""final/ and every full checkpoint carry a model card (README.md, Hugging Face convention) that
names the base model, the protocol, the selection and the accuracies the run measured."""
import json

import yaml

import make_grid_data
import train


def _card(folder):
    text = (folder / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def test_final_and_full_checkpoints_carry_a_model_card(tmp_path, tiny_path):
    objects = make_grid_data.builtin_objects(64)
    make_grid_data.make_coco_standin(tmp_path / "coco", objects, n=4, image_size=48, seed=0)
    out = tmp_path / "run"
    argv = ["--model_name", "tiny", "--train_objects", "builtin", "--cell", "28", "--sizes", "124", "--max_pairs", "4",
            "--no_same_row_or_col", "--objects", "red circle", "blue square", "green triangle",
            "--val_json", str(tmp_path / "coco" / make_grid_data.STANDIN_JSON), "--coco_val_dir", str(tmp_path / "coco"),
            "--output_dir", str(out), "--protocol", "clean", "--batch_size", "6", "--max_steps", "2",
            "--eval_save_steps", "1", "--holdout_max_samples", "4", "--eval_mode", "score", "--save_full_checkpoints"]
    summary = train.main(argv)
    config = json.loads((out / "config.json").read_text())
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]

    front, body = _card(out / "final")
    assert front["base_model"] == "tiny" and front["library_name"] == "transformers"
    assert {"protocol-clean", "lm-loss-baseline"} <= set(front["tags"])
    assert "- protocol: `clean`" in body
    assert f"{len(config['selected_parameters'])} tensors, {config['selected_count']:,} of" in body
    assert len(config["selected_parameters"]) == 12
    assert all(f"- `{name}`" in body for name in config["selected_parameters"])
    assert "rendered on the fly: objects=builtin" in body  # the data it trained on
    last = evals[-1]
    assert last["step"] == 2 and last["coco"]["accuracy"] == summary["coco_accuracy"]
    assert (f"At step 2: COCO-Spatial {summary['coco_accuracy']:.3f} ({last['coco']['correct']}/{last['coco']['n']}), "
            f"held-out object pairs {summary['holdout_accuracy']:.3f}") in body
    table = [line for line in body.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(line.split("|")[1]) for line in table] == [0, 1, 2]
    assert "python train.py " + " ".join(argv[:4]) in body
    assert config["git_commit"] and config["git_commit"] in body

    # A full checkpoint's card describes the model at its own step.
    front1, body1 = _card(out / "checkpoint-1")
    assert front1["base_model"] == "tiny" and "(step 1)" in body1
    assert [int(line.split("|")[1]) for line in body1.splitlines() if line.startswith("| ") and line[2].isdigit()] == [0, 1]
