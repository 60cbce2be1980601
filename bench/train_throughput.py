"""train.py's own throughput, end to end (the loader, the collator, the step, logging), against the
pure step of bench/full_size_step.py: the paper's spatial arm (`--protocol paper` with spatial
IDs: obj1_groups batches, the spatial-ID loss) on the bench model saved to a folder.

    python bench/train_throughput.py                        # CPU: the tiny bench model, 112 px images
    python bench/train_throughput.py --full_size --bf16 --cell 224 \\
        --step_log runs/gpu_check/full_size_step.txt        # a GPU: Qwen2-VL-2B, the paper's images
    python bench/train_throughput.py --on_the_fly           # images drawn in the loader's workers

It writes (under --out) the model with random weights and its processor, a grid folder (one object
pair, one size, every cell pair: 240 images), a COCO stand-in and random spatial IDs, runs
train.py for --max_steps steps and reads `seconds_per_step` from its metrics.jsonl (wall time per
optimizer step between logs, evaluation and checkpoints excluded); the first log window (warm-up)
is left out. Extra arguments go to train.py (e.g. --no-encode_images_once, --num_workers 8).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch

import common  # also puts the repo on sys.path

import data  # noqa: E402
import make_grid_data  # noqa: E402
import spatial_loss  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The layout of common.grid_folder's images (two built-in objects, one size, every cell pair), as
# train.py's flags for drawing them on the fly (--on_the_fly).
GRID_LAYOUT_FLAGS = ["--objects", *list(make_grid_data.builtin_objects())[:2], "--sizes", "124", "--max_pairs", "1"]


def bench_step_seconds(step_log):
    """The median step time with each distinct image once in the output of full_size_step.py
    (the step with AdamW) or bench_train.py (forward + backward, the `ours_once` row), or None."""
    if not step_log or not Path(step_log).is_file():
        return None
    text = Path(step_log).read_text()
    found = re.findall(r"median of \d+, once: .* step ([0-9.]+) s", text)
    if not found:  # bench_train.py: the first table (samples/s, then median s) holds the times
        found = re.findall(r"\| ours_once: [^|]*\| [0-9.]+ \| ([0-9.]+) \|", text)[:1]
    return float(found[-1]) if found else None


def bench_step_questions(step_log, default):
    """The questions in the logged bench step (full_size_step.py: "batch N (the paper's spatial
    arm)"; bench_train.py: its config line's "batch N,"), else `default`: the per-question
    comparison must divide by the bench's own batch, which need not be train.py's."""
    text = Path(step_log).read_text()
    found = re.search(r"^batch (\d+) \(the paper's spatial arm\)|^config: .*?, batch (\d+),", text, re.M)
    return int(found[1] or found[2]) if found else default


def step_log_name(step_log):
    text = Path(step_log).read_text()
    return "full_size_step.py, with AdamW" if re.search(r"median of \d+, once:", text) else "bench_train.py, no optimizer"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full_size", action="store_true", help="the real Qwen2-VL-2B architecture (for a GPU)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--cell", type=int, default=28, help="grid cell px (images are 4 x cell); 224 = the paper's")
    p.add_argument("--batch_size", type=int, default=15)
    p.add_argument("--max_steps", type=int, default=12)
    p.add_argument("--log_every", type=int, default=3)
    p.add_argument("--layer", type=int, default=11)
    p.add_argument("--out", default="runs/train_throughput")
    p.add_argument("--step_log", default=None, help="full_size_step.py's output, for the ratio")
    p.add_argument("--on_the_fly", action="store_true",
                   help="the loader's workers draw the same grid images on the fly (train.py --train_objects "
                        "builtin) instead of reading the folder's files")
    args, train_args = p.parse_known_args(argv)
    out = Path(args.out)
    device, dtype = common.device_and_dtype(args.bf16)

    vocab = "" if os.environ.get(common.BENCH_VOCAB_ENV, "real") == "real" else "-tiny-vocab"
    model_dir = out / ("qwen2-2b-random" if args.full_size else f"bench-model{vocab}")
    if not (model_dir / "config.json").is_file():
        model, processor, adapter = common.bench_model(args.full_size, device, dtype)
        model.save_pretrained(model_dir)
        adapter.save_processor(processor, model_dir)
        hidden = adapter.lm_hidden_size(model)
        del model
    else:
        hidden = json.loads((model_dir / "config.json").read_text())["text_config"]["hidden_size"]
    grid = common.grid_folder(args.cell, folder=out / f"grid_{args.cell}")
    standin = out / "coco_standin"
    if not (standin / "coco_qa_two_obj_standin.json").is_file():
        make_grid_data.make_coco_standin(standin, make_grid_data.builtin_objects(), n=8, seed=0)
    ids = out / "random_ids.pt"
    gen = torch.Generator().manual_seed(0)
    spatial_loss.save_universal_ids(ids, {args.layer: {(c, r, 124): torch.randn(hidden, generator=gen)
                                                       for c in range(4) for r in range(4)}})
    run = out / "run"
    command = [sys.executable, str(REPO / "train.py"), "--model_name", str(model_dir), "--protocol", "paper",
               *(["--train_objects", "builtin", *GRID_LAYOUT_FLAGS, "--cell", str(args.cell)] if args.on_the_fly
                 else ["--train_dir", str(grid)]), "--val_json", str(standin / "coco_qa_two_obj_standin.json"),
               "--coco_val_dir", str(standin), "--output_dir", str(run), "--overwrite_output_dir",
               "--spatial_holdout_frac", "0", "--universal_id_path", str(ids), "--spatial_id_layer", str(args.layer),
               "--batch_size", str(args.batch_size), "--max_steps", str(args.max_steps),
               "--log_every", str(args.log_every), "--eval_save_steps", "100000", "--eval_mode", "score",
               "--eval_max_samples", "8", *(["--bf16"] if args.bf16 else []), *train_args]
    print("running:", " ".join(command), flush=True)
    subprocess.run(command, check=True)

    config = json.loads((run / "config.json").read_text())
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    windows = [e["seconds_per_step"] for e in events if e["event"] == "train"]
    if len(windows) < 2:
        sys.exit(f"only {len(windows)} logged windows; raise --max_steps or lower --log_every")
    seconds = statistics.median(windows[1:])  # the first window holds the warm-up
    # obj1_groups cuts each 24-question group into 15 + 9: train.py's steps are smaller than the
    # bench's 15 on average, so the comparison is per question. The same sampler, seed and data
    # as the run (no holdout) give its batch sizes.
    samples = data.GridDataset(grid, "paper").samples
    sizes = [len(b) for b in data.make_batch_sampler("obj1_groups", samples, range(len(samples)), args.batch_size,
                                                     seed=config["args"]["seed"])][:args.max_steps]
    mean_batch = statistics.mean(sizes[args.log_every:] or sizes)
    print(f"\ntrain.py end to end: {seconds:.3f} s per step (median of {len(windows) - 1} windows of "
          f"{args.log_every} steps after the first), {mean_batch:.1f} questions per step on average, "
          f"{seconds / mean_batch * 1000:.1f} ms per question; speedups {config['speedups']}, loader {config['loader']}")
    bench = bench_step_seconds(args.step_log)
    if bench is not None:
        questions = bench_step_questions(args.step_log, args.batch_size)
        ratio = (seconds / mean_batch) / (bench / questions)
        print(f"bench step ({step_log_name(args.step_log)}, each distinct image once, {questions} questions): "
              f"{bench:.3f} s, "
              f"{bench / questions * 1000:.1f} ms per question; train.py / bench per question: {ratio:.2f}x "
              f"(target <= 1.10x)")
    return seconds


if __name__ == "__main__":
    main()
