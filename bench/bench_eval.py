"""Evaluation: score mode (one forward per batch, head at the last position) and batched
left-padded generation, against generating one question at a time (the original's evaluation),
on the COCO-format stand-in (make_grid_data.make_coco_standin) at --image_size px.

    python bench/bench_eval.py                     # CPU: bench model, 16 questions, 448 px
    python bench/bench_eval.py --n 40 --full_size --bf16   # a GPU

Time: the paths alternate in one process; peak memory: each path in a fresh process (see
bench/common.py). Generation decodes --max_new_tokens greedily (random weights rarely stop early).
"""
import argparse
import sys
import tempfile
from pathlib import Path

import common

import data  # noqa: E402
import make_grid_data  # noqa: E402
from eval_coco import generate_answers, score_answers  # noqa: E402

PATHS = {"generate_1": "generate, one question at a time", "generate_batched": "generate, batched",
         "score": "score: one forward per batch"}


def standin(folder, n, image_size):
    folder = Path(folder)
    json_path = folder / make_grid_data.STANDIN_JSON
    if not json_path.is_file():
        make_grid_data.make_coco_standin(folder, make_grid_data.builtin_objects(), n=n, image_size=image_size)
    return data.load_coco_spatial(json_path, folder, "clean", n)


def worker(args):
    device, dtype = common.device_and_dtype(args.bf16)
    model, processor, adapter = common.bench_model(args.full_size, device, dtype)
    samples = standin(args.data_dir, args.n, args.image_size)
    lengths = data.VLMCollator(processor, adapter, with_answer=False)(samples[:4])["attention_mask"].sum(1)
    kw = dict(progress=False)
    fns = {
        "generate_1": lambda: generate_answers(model, processor, adapter, samples, 1, args.max_new_tokens, **kw),
        "generate_batched": lambda: generate_answers(model, processor, adapter, samples, args.batch_size,
                                                     args.max_new_tokens, **kw),
        "score": lambda: score_answers(model, processor, adapter, samples, args.batch_size, **kw),
    }
    common.worker(args._worker, fns, args.repeats, device,
                  {"prompt_tokens": int(lengths.max()), "device": device, "dtype": str(dtype)})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16, help="questions per evaluation pass")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--image_size", type=int, default=448)
    p.add_argument("--max_new_tokens", type=int, default=5)
    p.add_argument("--data_dir", default=None, help="reuse a stand-in folder (made if empty)")
    common.add_bench_args(p)
    args = p.parse_args(argv)
    if args._worker:
        return worker(args)
    args.data_dir = args.data_dir or tempfile.mkdtemp(prefix="bench_standin_")
    standin(args.data_dir, args.n, args.image_size)
    argv = list(argv if argv is not None else sys.argv[1:]) + ["--data_dir", args.data_dir]
    results = common.measure(Path(__file__), argv, list(PATHS))
    plain_name = f"plain: {PATHS['generate_1']}"
    rows = [{"path": plain_name if name == "generate_1" else f"ours: {PATHS[name]}", "per_s": args.n / r["seconds"],
             "seconds": r["seconds"], "cpu_seconds": r["cpu_seconds"], "peak_gib": r["peak_gib"], "vs": plain_name} for name, r in results.items()]
    r = results["generate_1"]
    config = (f"{common.model_description(args, r)}, {args.n} COCO-format stand-in questions, {args.image_size} px images, "
              f"prompts up to {r['prompt_tokens']} tokens, batch {args.batch_size}, {args.max_new_tokens} new tokens, "
              f"median of {args.repeats} alternating rounds after 1 warm-up; peak memory per path in its own process")
    common.print_table("evaluation (questions/s)", config, rows, "questions")
    return results


if __name__ == "__main__":
    main()
