"""The lmms-eval tier (`make test-lmms`, run by .cache/lmms-venv's python, not part of `make
test`): one lmms-eval task, offline, on the tiny Qwen2-VL checkpoint through lmms-eval's own
`qwen2_vl` model class (what a run's final/ is loaded with), over a local task file reading a
parquet file this test writes (BLINK's Spatial_Relation schema, the stand-in's rows); then
compare_runs --lmms_eval pairs the logged samples of two such evaluations."""
import json
import os
import subprocess
import sys
from pathlib import Path

import benchmarks
import compare_runs
import make_grid_data as mg
import models

ROOT = Path(__file__).resolve().parent.parent

TASK = """task: tiny_blink_relation
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {parquet}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
process_results: !function utils.process_results
generation_kwargs:
  max_new_tokens: 3
  do_sample: false
metric_list:
  - metric: tiny_acc
    aggregation: mean
    higher_is_better: true
"""

UTILS = '''import io
from PIL import Image


def doc_to_visual(doc):
    image = doc["image_1"]
    return [image.convert("RGB") if hasattr(image, "convert") else Image.open(io.BytesIO(image["bytes"])).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["prompt"]


def process_results(doc, results):
    answer = results[0].strip().lstrip("(")[:1].upper()
    return {"tiny_acc": float(answer == doc["answer"].strip("()"))}
'''


def run_lmms(tmp_path, checkpoint, out):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "qwen2_vl",
           "--model_args", f"pretrained={checkpoint},device_map=cpu,max_pixels=50176",
           "--tasks", "tiny_blink_relation", "--include_path", str(tmp_path / "tasks"), "--batch_size", "1",
           "--device", "cpu", "--output_path", str(out), "--log_samples"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    # lmms-eval logs an error and still exits 0 (a task not found, a model that does not load): the
    # samples file is the proof that it ran
    samples = sorted(Path(out).rglob("*_samples_tiny_blink_relation.jsonl"))
    assert done.returncode == 0 and len(samples) == 1, (done.stdout[-3000:], done.stderr[-3000:])
    return samples[0]


def test_one_task_offline_on_the_tiny_checkpoint(tmp_path, capsys):
    roots = mg.make_benchmark_standins(tmp_path / "standin", mg.builtin_objects(48), n=4, image_size=56,
                                       names=["blink_relation"])
    parquet = Path(roots.hub_dir) / benchmarks.BLINK_RELATION.repo_id / benchmarks.BLINK_RELATION.filename
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_blink_relation.yaml").write_text(TASK.format(parquet=parquet))
    (tmp_path / "tasks" / "utils.py").write_text(UTILS)
    checkpoint = models.ensure_tiny_model()  # a complete from_pretrained folder, as a run's final/
    samples = run_lmms(tmp_path, checkpoint, tmp_path / "a")
    run_lmms(tmp_path, checkpoint, tmp_path / "b")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [r["doc_id"] for r in rows] == [0, 1, 2, 3] and all(r["tiny_acc"] in (0.0, 1.0) for r in rows)
    result = compare_runs.main(["--lmms_eval", str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "a", "b"])
    assert result["rows"][0][:3] == ["tiny_blink_relation", "b vs a", 4] and result["left_out"] == []
