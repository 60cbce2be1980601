"""Seeds: --seed moves model-side randomness and data order, --data_seed alone moves the holdout
split; SEEDS="..." in the run scripts gives one sibling run per seed. --report_to mirrors the
metrics (a stand-in wandb module records what it is given)."""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import data
import make_grid_data
import train
import train_args

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("seed_data")
    objects = make_grid_data.builtin_objects(64)
    names = ("red circle", "blue square", "green triangle", "yellow star")
    make_grid_data.make_grid_images(root / "grid", {n: objects[n] for n in names}, cell=16, sizes=(124,),
                                    max_pairs=12, seed=0, progress=False)
    make_grid_data.make_coco_standin(root / "coco", objects, n=4, image_size=48, seed=0)
    return root


def _args(root, out, *extra):
    return ["--model_name", "tiny", "--train_dir", str(root / "grid"), "--val_json",
            str(root / "coco" / make_grid_data.STANDIN_JSON), "--coco_val_dir", str(root / "coco"),
            "--output_dir", str(out), "--batch_size", "4", "--eval_max_samples", "2", "--holdout_max_samples", "20",
            "--eval_mode", "score", "--max_steps", "1", "--spatial_holdout_frac", "0.3", *extra]


def _holdout_questions(run):
    rows = [json.loads(line) for line in (Path(run) / "predictions" / "step-0.jsonl").read_text().splitlines()]
    return [r["question"] for r in rows if r["set"] == "holdout"]


def test_seed_keeps_the_holdout_and_data_seed_moves_it(dataset, tmp_path, tiny_path):
    runs = {}
    for name, extra in (("s0", []), ("s1", ["--seed", "1"]), ("d1", ["--data_seed", "1"])):
        train.main(_args(dataset, tmp_path / name, *extra))
        runs[name] = json.loads((tmp_path / name / "config.json").read_text())
    assert runs["s0"]["holdout_pairs"] == runs["s1"]["holdout_pairs"]
    assert _holdout_questions(tmp_path / "s0") == _holdout_questions(tmp_path / "s1")
    assert runs["s0"]["holdout_pairs"] != runs["d1"]["holdout_pairs"]
    # while --seed does move the data order
    grid = data.GridDataset(dataset / "grid", "paper")
    orders = [list(data.make_batch_sampler("shuffle", grid.samples, range(len(grid.samples)), 4, seed))
              for seed in (0, 1)]
    assert orders[0] != orders[1]


def test_seeds_in_the_run_script_give_sibling_runs(dataset, tmp_path, tiny_path):
    env = dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1", SEEDS="0 1")
    out = tmp_path / "base"
    proc = subprocess.run(["bash", str(REPO / "run_vision_baseline.sh"), "tiny",
                           *_args(dataset, out)[2:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for seed in (0, 1):
        config = json.loads((tmp_path / f"base_seed{seed}" / "config.json").read_text())
        assert config["args"]["seed"] == seed and config["args"]["protocol"] == "paper"
    assert not out.exists()


def test_report_to_mirrors_the_metrics(dataset, tmp_path, tiny_path, monkeypatch):
    logged, inits = [], []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: inits.append(kwargs)
    fake.log = lambda values, step: logged.append((step, values))
    fake.__spec__ = types.SimpleNamespace(name="wandb")
    # find_spec answers from sys.modules. (Patching find_spec for every name once made accelerate's
    # cached HPU probe import habana_frameworks, so this test failed when it ran first.)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "reported"
    train.main(_args(dataset, out, "--report_to", "wandb", "--log_every", "1"))
    assert inits and inits[0]["name"] == "reported"
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]
    trains = [e for e in events if e["event"] == "train"]
    eval_logs = [(step, v) for step, v in logged if "eval/coco_accuracy" in v]
    train_logs = [(step, v) for step, v in logged if "train/lm_loss" in v]
    assert [(step, v["eval/coco_accuracy"]) for step, v in eval_logs] == [(e["step"], e["coco"]["accuracy"]) for e in evals]
    assert [(step, v["train/lm_loss"]) for step, v in train_logs] == [(e["step"], e["lm_loss"]) for e in trains]


@pytest.mark.fast
def test_report_to_an_uninstalled_package_is_one_line(capsys, monkeypatch):
    find_spec = train_args.importlib.util.find_spec
    monkeypatch.setattr(train_args.importlib.util, "find_spec",
                        lambda name, *rest: None if name == "tensorboard" else find_spec(name, *rest))
    with pytest.raises(SystemExit):
        train.parse_args(["--report_to", "tensorboard"])
    assert "tensorboard is not installed" in capsys.readouterr().err.strip().splitlines()[-1]
