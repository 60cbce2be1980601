"""Evaluation: score mode (one forward per batch, head at the last position) and batched
left-padded generation, against generating one question at a time (the original's evaluation),
on the COCO-format stand-in (make_grid_data.make_coco_standin) at --image_size px.

    python bench/bench_eval.py                     # CPU: bench model, 16 questions, 448 px
    python bench/bench_eval.py --n 40 --full_size --bf16   # a GPU
    python bench/bench_eval.py --benchmark all     # every benchmark's stand-in, with its checks,
                                                   # against today's COCO-Spatial evaluation

With --benchmark: eval_coco.evaluate_benchmark over --n rows of each named benchmark's stand-in
(make_grid_data.make_benchmark_standins), the swapped-objects twins included and counted as
questions, in generate and score mode, against today's evaluate() on --n rows of the COCO
stand-in. questions/s counts every question asked.

Time: the paths alternate in one process; peak memory: each path in a fresh process (see
bench/common.py). Generation decodes --max_new_tokens greedily (random weights rarely stop early).
"""
import argparse
import sys
import tempfile
from pathlib import Path

import common
import torch  # noqa: E402

import benchmarks  # noqa: E402
import data  # noqa: E402
import make_grid_data  # noqa: E402
import eval_coco  # noqa: E402
from eval_coco import evaluate, evaluate_benchmark, generate_answers, score_answers  # noqa: E402
from lm_loss import last_position_logits  # noqa: E402

PATHS = {"generate_1": "generate, one question at a time", "generate_batched": "generate, batched",
         "score": "score: one forward per batch"}


def standin(folder, n, image_size):
    folder = Path(folder)
    json_path = folder / make_grid_data.STANDIN_JSON
    if not json_path.is_file():
        make_grid_data.make_coco_standin(folder, make_grid_data.builtin_objects(), n=n, image_size=image_size)
    return data.load_coco_spatial(json_path, folder, "clean", n)


BENCHMARK_PATHS = {"coco_generate": "today's COCO-Spatial evaluation, generate", "coco_score": "today's COCO-Spatial "
                   "evaluation, score", "benchmarks_generate": "benchmarks with their checks, generate",
                   "benchmarks_score": "benchmarks with their checks, score",
                   "benchmarks_first_token": "benchmarks with their checks, first-token score (the former rule)"}


def first_token_predictions(model, processor, adapter, samples, batch_size):
    """The former score rule, kept here as the plain path whole-word scoring is timed against: each
    option's first token at the answer position only (one forward per batch), same questions and
    batches as evaluate_benchmark."""
    questions = benchmarks.with_checks(samples)
    asked = [questions[i] for i in eval_coco._grouped_by_image(questions)]
    ids, predictions = {}, []
    with torch.no_grad():
        for chunk, batch in eval_coco._left_padded_batches(model, processor, adapter, asked, batch_size, False, "",
                                                           True):
            logits = last_position_logits(model, adapter, batch)
            for row, q in zip(logits, chunk):
                options = tuple(q["options"])
                ids.setdefault(options, adapter.option_token_ids(processor, options))
                predictions.append(options[int(row[ids[options]].argmax())])
    return predictions


def benchmark_standins(folder, n, image_size, names):
    folder = Path(folder) / "benchmarks"
    roots = benchmarks.DataRoots(val_json=str(folder / "coco" / make_grid_data.STANDIN_JSON),
                                 coco_val_dir=str(folder / "coco"), whatsup_dir=str(folder / "whatsup"),
                                 vsr_dir=str(folder / "vsr"), hub_dir=str(folder / "hub"))
    if benchmarks.missing_files(["coco_two_obj", *names], roots):
        roots = make_grid_data.make_benchmark_standins(folder, make_grid_data.builtin_objects(), n=n,
                                                       image_size=image_size, names=["coco_two_obj", *names])
    return roots


def benchmark_worker(args, model, processor, adapter, device, dtype):
    names = benchmarks.resolve_names(args.benchmark)
    roots = benchmark_standins(args.data_dir, args.n, args.image_size, names)
    coco = benchmarks.load("coco_two_obj", roots, "clean", args.n)
    loaded = {name: benchmarks.load(name, roots, "clean", args.n) for name in names}
    kw = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, progress=False)

    def all_benchmarks(mode):
        return lambda: [evaluate_benchmark(model, processor, adapter, samples, mode=mode, **kw)
                        for samples in loaded.values()]

    fns = {"coco_generate": lambda: evaluate(model, processor, adapter, coco, mode="generate", **kw),
           "coco_score": lambda: evaluate(model, processor, adapter, coco, mode="score", **kw),
           "benchmarks_generate": all_benchmarks("generate"), "benchmarks_score": all_benchmarks("score"),
           "benchmarks_first_token": lambda: [first_token_predictions(model, processor, adapter, samples,
                                                                      args.batch_size) for samples in loaded.values()]}
    questions = sum(len(benchmarks.with_checks(samples)) for samples in loaded.values())
    common.worker(args._worker, fns, args.repeats, device,
                  {"device": device, "dtype": str(dtype), "coco_questions": len(coco), "questions": questions,
                   "images": sum(len({s["image_path"] for s in samples}) for samples in loaded.values())})


def benchmark_main(args, argv):
    names = benchmarks.resolve_names(args.benchmark)
    benchmark_standins(args.data_dir, args.n, args.image_size, names)
    results = common.measure(Path(__file__), argv, list(BENCHMARK_PATHS))
    r = results["coco_generate"]
    rows = []
    for name, label in BENCHMARK_PATHS.items():
        mode = name.split("_")[1]
        plain = name.startswith("coco") or name == "benchmarks_first_token"
        count = r["coco_questions"] if name.startswith("coco") else r["questions"]
        vs = ("benchmarks_first_token" if name == "benchmarks_score"
              else "coco_" + ("score" if mode == "first" else mode))
        rows.append({"path": f"{'plain' if plain else 'ours'}: {label}",
                     "per_s": count / results[name]["seconds"], "seconds": results[name]["seconds"],
                     "cpu_seconds": results[name]["cpu_seconds"], "peak_gib": results[name]["peak_gib"],
                     "vs": f"plain: {BENCHMARK_PATHS[vs]}"})
    config = (f"{common.model_description(args, r)}; today's path: {r['coco_questions']} COCO-format stand-in questions; "
              f"ours: {', '.join(names)}, {args.n} stand-in rows each, {r['questions']} questions with the swapped "
              f"twins on {r['images']} images; {args.image_size} px, batch {args.batch_size}, {args.max_new_tokens} "
              f"new tokens, median of {args.repeats} alternating rounds after 1 warm-up")
    common.print_table("evaluation on every benchmark (questions/s)", config, rows, "questions")
    return results


def worker(args):
    device, dtype = common.device_and_dtype(args.bf16)
    model, processor, adapter = common.bench_model(args.full_size, device, dtype)
    if args.benchmark:
        return benchmark_worker(args, model, processor, adapter, device, dtype)
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
    p.add_argument("--benchmark", nargs="+", default=None, choices=list(benchmarks.NAMES) + ["all"], metavar="NAME",
                   help="time eval_coco.evaluate_benchmark on these benchmarks' stand-ins (or all) against today's "
                        "COCO-Spatial evaluation")
    common.add_bench_args(p)
    args = p.parse_args(argv)
    if args._worker:
        return worker(args)
    args.data_dir = args.data_dir or tempfile.mkdtemp(prefix="bench_standin_")
    argv = list(argv if argv is not None else sys.argv[1:]) + ["--data_dir", args.data_dir]
    if args.benchmark:
        return benchmark_main(args, argv)
    standin(args.data_dir, args.n, args.image_size)
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
