"""COCO-Spatial evaluation: generate (or score) answers to two-option spatial questions.

    python eval_coco.py --ckpt runs/baseline/checkpoint-200
    python eval_coco.py --ckpt qwen2-2b --mode score --eval_max_samples 100

`--mode generate` (the original's metric) decodes at most 5 new tokens greedily, batched with
left padding and the KV cache, and parses the answer as the original did. `--mode score` compares
the log-probabilities of the two option words in one forward pass per batch and nothing else: the
decoder runs to its last hidden state and the LM head is applied at the last position only
(lm_loss.last_position_logits). `--agreement` also runs `generate` and reports how often the two
agree. train.py calls `evaluate` from here.

    python eval_coco.py --ckpt runs/x/final --benchmark all --whatsup_dir data/whatsup --vsr_dir data/vsr

`--benchmark NAME ... | all` evaluates What'sUp's subsets and VSR (benchmarks.py) with their
checks (evaluate_benchmark): strict reading of generated answers, the swapped-objects twin of every
two-object question, option-order rotations, pair/set accuracy, VSR's ROC-AUC; each missing file
is named on its own line before a model loads. docs/evaluation.md has the details.
"""
import argparse
import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

import benchmarks
import data
import protocols
import speedups
from checkpoints import CheckpointError, check_checkpoint_source, load_checkpoint_model
from lm_loss import last_position_logits
from models import ListModelsAction, ModelUnavailableError
from output_paths import output_problem


def parse_answer(text, options):
    """The original's parsing: the first option (in the options' order) found as a whole word,
    else an option the answer starts with, else "" (counted wrong)."""
    text = text.strip().lower()
    for option in options:
        if re.search(rf"\b{re.escape(option)}\b", text):
            return option
    for option in options:
        if text.startswith(option):
            return option
    return ""


def parse_strict(text, options):
    """(prediction, status) read strictly: the option that the answer's first word is ("in front"
    reads as "front"), status "ok"; an answer that also names another option is wrong ("", "several");
    one that does not start with an option is unparseable ("", "unparseable")."""
    words = re.findall(r"[a-z]+", text.lower())
    if words[:2] == ["in", "front"]:
        words = words[1:]
    if not words or words[0] not in options:
        return "", "unparseable"
    if any(w in options and w != words[0] for w in words[1:]):
        return "", "several"
    return words[0], "ok"


class EvaluationInterrupted(Exception):
    """A stop was requested (the caller's `should_stop()` turned true) between two batches: the
    evaluation is incomplete and must not be reported (train.py saves and exits, and redoes it on
    resume)."""


def _batches(items, size):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _left_padded_batches(model, processor, adapter, samples, batch_size, progress, desc, encode_images_once=False,
                         should_stop=None):
    """(samples, model inputs on the model's device) for each batch of generation prompts, padded
    on the left so every row's answer position is the last column; the tokenizer's padding side
    is restored afterwards. With `encode_images_once`, each distinct image of a batch is kept once
    (the caller hands the batch to adapter.encode_images_once). Before each batch `should_stop()`
    (when given) is asked; true raises EvaluationInterrupted."""
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    collate = data.VLMCollator(processor, adapter, with_answer=False, encode_images_once=encode_images_once)
    device = next(model.parameters()).device
    try:
        # Shown only on a terminal (disable=None): a bar nested under the training bar leaves
        # cursor-movement codes in a log file.
        for chunk in tqdm(list(_batches(samples, batch_size)), desc=desc, disable=None if progress else True,
                          leave=False):
            if should_stop is not None and should_stop():
                raise EvaluationInterrupted(f"{desc}: stopped before a batch, on request")
            yield chunk, data.split_batch(collate(chunk), device)[0]
    finally:
        tokenizer.padding_side = side


@torch.no_grad()
def generate_answers(model, processor, adapter, samples, batch_size=8, max_new_tokens=5, progress=True, desc="eval",
                     encode_images_once=False, should_stop=None):
    """Greedy answers for `samples`, batched with left padding and the KV cache; with
    `encode_images_once` (and an adapter whose generate takes precomputed image features), each
    distinct image of a batch goes through the vision tower once."""
    tokenizer = processor.tokenizer
    texts = []
    once = encode_images_once and adapter.generate_takes_image_features
    for _, batch in _left_padded_batches(model, processor, adapter, samples, batch_size, progress, desc, once,
                                         should_stop):
        prompt_len = batch["input_ids"].shape[1]
        if once:
            batch = adapter.encode_images_once(model, batch)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        texts += tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
    return texts


@torch.no_grad()
def option_logprobs(model, processor, adapter, samples, batch_size=8, progress=True, desc="score",
                    encode_images_once=False, should_stop=None):
    """[per sample: the log-probability of each option's first token at the answer position]: one
    forward pass per batch, LM head at the last (answer) position only."""
    scores = []
    option_ids = {}  # tokenise each option list once, not once per question
    for chunk, batch in _left_padded_batches(model, processor, adapter, samples, batch_size, progress, desc,
                                             encode_images_once, should_stop):
        logprobs = torch.log_softmax(last_position_logits(model, adapter, batch), dim=-1)
        for row, sample in zip(logprobs, chunk):
            options = tuple(sample["options"])
            if options not in option_ids:
                option_ids[options] = adapter.option_token_ids(processor, options)  # as the answer follows the prompt
            scores.append(row[option_ids[options]].tolist())
    return scores


def score_answers(model, processor, adapter, samples, batch_size=8, progress=True, desc="score",
                  encode_images_once=False, should_stop=None):
    """The option whose first token has the highest log-probability at the answer position."""
    scores = option_logprobs(model, processor, adapter, samples, batch_size, progress, desc, encode_images_once,
                             should_stop)
    return [s["options"][max(range(len(row)), key=row.__getitem__)] for s, row in zip(samples, scores)]


def accuracy_report(samples, predictions):
    """Accuracy overall and per relation (a sample's `relation`, else its gold answer), with counts."""
    per = defaultdict(lambda: [0, 0])
    for s, p in zip(samples, predictions):
        relation = s.get("relation") or s["answer"]
        per[relation][0] += int(p == s["answer"])
        per[relation][1] += 1
    correct = sum(c for c, _ in per.values())
    n = sum(t for _, t in per.values())
    return {
        "accuracy": correct / n if n else float("nan"),
        "correct": correct,
        "n": n,
        "per_relation": {rel: {"accuracy": c / t, "correct": c, "n": t}
                         for rel, (c, t) in sorted(per.items())},
    }


def evaluate(model, processor, adapter, samples, batch_size=8, mode="generate", max_new_tokens=5, progress=True,
             desc="eval", agreement=False, should_stop=None):
    """(report, prediction rows) for `samples`. The model is left in eval mode; callers that
    train switch it back. `should_stop`: see _left_padded_batches.

    mode="score" runs one forward pass per batch and nothing else; with agreement=True it also
    generates, and the report gains "agreement_with_generate" and "generate_accuracy" (rows'
    "generated" is None without it)."""
    if mode not in ("generate", "score"):
        raise ValueError(f"mode must be 'generate' or 'score', not {mode!r}")
    model.eval()
    texts = parsed = None
    if mode == "generate" or agreement:
        texts = generate_answers(model, processor, adapter, samples, batch_size, max_new_tokens, progress, desc,
                                 should_stop=should_stop)
        parsed = [parse_answer(t, s["options"]) for t, s in zip(texts, samples)]
    if mode == "generate":
        predictions = parsed
    else:
        predictions = score_answers(model, processor, adapter, samples, batch_size, progress, desc + " (score)",
                                    should_stop=should_stop)
    report = accuracy_report(samples, predictions)
    if mode == "score" and agreement:
        agree = sum(a == b for a, b in zip(predictions, parsed))
        report["agreement_with_generate"] = agree / len(samples) if samples else float("nan")
        report["generate_accuracy"] = accuracy_report(samples, parsed)["accuracy"]
    rows = []
    for i, (s, pred) in enumerate(zip(samples, predictions)):
        rows.append({k: s[k] for k in ("row", "image_id", "image_path") if k in s} | {
            "question": s["question"], "answer": s["answer"], "generated": texts[i] if texts else None,
            "prediction": pred, "correct": pred == s["answer"],
        })
    return report, rows


def _grouped_by_image(questions):
    """Question indices with the questions of one image next to each other (first appearance
    order), so a batch holds an image's questions together and encodes the image once."""
    first = {}
    for i, q in enumerate(questions):
        first.setdefault(str(q["image_path"]), len(first))
    return sorted(range(len(questions)), key=lambda i: first[str(questions[i]["image_path"])])


def evaluate_benchmark(model, processor, adapter, samples, batch_size=8, mode="generate", max_new_tokens=5,
                       consistency=True, option_orders=1, parsing="strict", progress=True, desc="eval",
                       should_stop=None):
    """(report, prediction rows) for the samples of one benchmark (benchmarks.load), with the
    checks: each two-object question also asked with the objects swapped (`consistency`) and
    every question with its options rotated 1 .. option_orders-1 places. Questions of one image
    are batched together and the image encoded once.

    generate mode reads answers with parse_strict (`parsing="original"`: parse_answer, the
    original's reading of COCO-Spatial), score mode takes the option of highest log-probability;
    VSR questions are also scored (ROC-AUC of P(true) - P(false)) in generate mode. `should_stop`:
    see _left_padded_batches."""
    if mode not in ("generate", "score"):
        raise ValueError(f"mode must be 'generate' or 'score', not {mode!r}")
    model.eval()
    questions = benchmarks.with_checks(samples, consistency, option_orders)
    order = _grouped_by_image(questions)
    asked = [questions[i] for i in order]
    texts = statuses = scores = None
    if mode == "generate":
        texts = generate_answers(model, processor, adapter, asked, batch_size, max_new_tokens, progress, desc,
                                 encode_images_once=True, should_stop=should_stop)
        if parsing == "original":
            parsed = [parse_answer(t, q["options"]) for t, q in zip(texts, asked)]
            statuses = ["ok" if p else "unparseable" for p in parsed]
        else:
            parsed, statuses = zip(*[parse_strict(t, q["options"]) for t, q in zip(texts, asked)]) if asked else ((), ())
        predictions = list(parsed)
    if mode == "score" or any(q["kind"] == "vsr" for q in asked):
        scores = option_logprobs(model, processor, adapter, asked, batch_size, progress, desc + " (score)",
                                 encode_images_once=True, should_stop=should_stop)
        if mode == "score":
            predictions = [q["options"][max(range(len(r)), key=r.__getitem__)] for q, r in zip(asked, scores)]
    rows = [None] * len(questions)
    for j, (i, q) in enumerate(zip(order, asked)):
        row = {k: q[k] for k in ("benchmark", "row", "image_id", "image_path", "relation", "order", "rotation")}
        row |= {"question": q["question"], "answer": q["answer"], "generated": texts[j] if texts else None,
                "prediction": predictions[j], "correct": predictions[j] == q["answer"]}
        if statuses is not None:
            row["parse"] = statuses[j]
        if scores is not None and q["kind"] == "vsr":
            probs = dict(zip(q["options"], (float(torch.tensor(v).exp()) for v in scores[j])))
            row["p_true_minus_p_false"] = probs["true"] - probs["false"]
        rows[i] = row
    return benchmark_report(questions, rows), rows


def vsr_auc(labels, margins):
    """ROC-AUC of `margins` (P(true) - P(false)) against the gold labels (True = the caption holds);
    NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score  # heavy (scipy); only VSR needs it

    if len(set(labels)) < 2:
        return float("nan")
    return float(roc_auc_score([int(x) for x in labels], margins))


def controlled_pair_set_accuracy(samples, correct):
    """What'sUp's pair and set accuracy of a controlled set: a pair (left/right, or on/under resp.
    front/behind, of one object pair) counts when both of its questions are right, a set when all
    four are; over the pairs and sets present."""
    by_key = defaultdict(dict)
    for s, ok in zip(samples, correct):
        by_key[s["pair_key"]][s["relation"]] = ok
    opposites = [("left", "right"), tuple(samples[0]["options"][2:4])] if samples else []
    pairs = [all(d[r] for r in pair) for d in by_key.values() for pair in opposites if all(r in d for r in pair)]
    sets = [all(d.values()) for d in by_key.values() if len(d) == 4]
    return {"pair_accuracy": sum(pairs) / len(pairs) if pairs else float("nan"), "pairs": len(pairs),
            "set_accuracy": sum(sets) / len(sets) if sets else float("nan"), "sets": len(sets)}


def benchmark_report(questions, rows):
    """The report of evaluate_benchmark: accuracy overall and per relation on the questions as
    asked, the share of answers that could not be parsed (and that named several options), the
    consistency of the swapped questions, the accuracy under each option order and its spread,
    What'sUp's pair and set accuracy (controlled sets), VSR's ROC-AUC."""
    base = [(q, r) for q, r in zip(questions, rows) if r["order"] == "asked" and r["rotation"] == 0]
    samples, base_rows = [q for q, _ in base], [r for _, r in base]
    report = accuracy_report(samples, [r["prediction"] for r in base_rows])
    report["benchmark"] = samples[0]["benchmark"] if samples else None
    report["released_rows"] = benchmarks.BENCHMARKS[report["benchmark"]].released_rows if samples else None
    if base_rows and "parse" in base_rows[0]:
        report["unparseable"] = sum(r["parse"] == "unparseable" for r in base_rows) / len(base_rows)
        report["several_options"] = sum(r["parse"] == "several" for r in base_rows) / len(base_rows)
    swapped = {r["row"]: r for r in rows if r["order"] == "swapped" and r["rotation"] == 0}
    if swapped:
        pairs = [(r, swapped[r["row"]]) for r in base_rows if r["row"] in swapped]
        report["consistency"] = {
            "n_pairs": len(pairs),
            "accuracy_asked": sum(a["correct"] for a, _ in pairs) / len(pairs),
            "accuracy_swapped": sum(b["correct"] for _, b in pairs) / len(pairs),
            # the two answers say the same thing: the swapped one is the first one's opposite
            "consistent": sum(bool(a["prediction"]) and b["prediction"] == benchmarks.OPPOSITE[a["prediction"]]
                              for a, b in pairs) / len(pairs),
            "both_correct": sum(a["correct"] and b["correct"] for a, b in pairs) / len(pairs),
        }
    rotations = sorted({r["rotation"] for r in rows if r["order"] == "asked"})
    if len(rotations) > 1:
        accuracies = {}
        for k in rotations:
            got = [r["correct"] for r in rows if r["order"] == "asked" and r["rotation"] == k]
            accuracies[k] = sum(got) / len(got)
        report["option_order"] = {"accuracy_by_rotation": accuracies,
                                  "spread": max(accuracies.values()) - min(accuracies.values())}
    if samples and samples[0]["kind"] == "controlled":
        report |= controlled_pair_set_accuracy(samples, [r["correct"] for r in base_rows])
    if base_rows and "p_true_minus_p_false" in base_rows[0]:
        report["auc"] = vsr_auc([s["answer"] == "true" for s in samples], [r["p_true_minus_p_false"] for r in base_rows])
    return report


def format_benchmark_report(report):
    """One line: format_report's, then the checks that ran."""
    name = report["benchmark"]
    line = format_report(report, name)
    extra = []
    if report.get("released_rows") and report["n"] != report["released_rows"]:
        extra.append(f"{report['n']} of the {report['released_rows']:,} released rows")
    if "unparseable" in report:
        extra.append(f"unparseable {report['unparseable']:.3f}, several options {report['several_options']:.3f}")
    if "consistency" in report:
        c = report["consistency"]
        extra.append(f"swapped objects: accuracy {c['accuracy_asked']:.4f} as asked, {c['accuracy_swapped']:.4f} "
                     f"swapped, consistent {c['consistent']:.4f} of {c['n_pairs']} pairs")
    if "option_order" in report:
        o = report["option_order"]
        extra.append("option order: accuracy " + "/".join(f"{a:.4f}" for a in o["accuracy_by_rotation"].values())
                     + f", spread {o['spread']:.4f}")
    if "pair_accuracy" in report:
        extra.append(f"pair accuracy {report['pair_accuracy']:.4f}, set accuracy {report['set_accuracy']:.4f}")
    if "auc" in report:
        extra.append(f"ROC-AUC {report['auc']:.4f}")
    return line + "".join(f"; {e}" for e in extra)


def write_jsonl(path, rows):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def format_report(report, name="COCO-Spatial"):
    parts = [f"{rel} {r['correct']}/{r['n']}" for rel, r in report["per_relation"].items()]
    line = f"{name}: accuracy {report['accuracy']:.4f} ({report['correct']}/{report['n']}); " + ", ".join(parts)
    if "agreement_with_generate" in report:
        line += (f"; score vs generate agreement {report['agreement_with_generate']:.4f}"
                 f" (generate accuracy {report['generate_accuracy']:.4f})")
    return line


def add_data_args(parser):
    """COCO-Spatial flags shared with train.py."""
    parser.add_argument("--val_json", default="data/coco_qa_two_obj.json",
                        help="COCO-Spatial rows [image_id, true_caption, false_caption]")
    parser.add_argument("--coco_val_dir", default="data/coco", help="folder of COCO val2017 {id:012d}.jpg images")
    parser.add_argument("--eval_max_samples", type=int, default=None, help="evaluate the first N questions only")
    parser.add_argument("--question_style", choices=data.QUESTION_STYLES, default=None,
                        help="COCO question wording: paper = the original code's exact wording, clean = "
                             "'the {name}' (default: --protocol)")


def add_benchmark_args(parser, flag="--benchmark", default=None, help_default="today's COCO-Spatial evaluation"):
    """The benchmark names and a data-root flag per source (shared with train.py)."""
    parser.add_argument(flag, nargs="+", default=default, choices=list(benchmarks.NAMES) + ["all"], metavar="NAME",
                        help=f"benchmarks to evaluate: {', '.join(benchmarks.NAMES)}, or all (default: "
                             f"{help_default}); coco_two_obj reads --val_json and --coco_val_dir")
    parser.add_argument("--whatsup_dir", default="data/whatsup",
                        help="What'sUp's JSON files (coco_qa_one_obj.json, vg_qa_*.json, controlled_*_dataset.json)")
    parser.add_argument("--vg_image_dir", default=None, help="What'sUp's vg_images/ (default: WHATSUP_DIR/vg_images)")
    parser.add_argument("--controlled_dir", default=None,
                        help="folder holding controlled_images/ and controlled_clevr/ (default: --whatsup_dir)")
    parser.add_argument("--vsr_dir", default="data/vsr",
                        help="VSR's data/ folder: splits/zeroshot/test.jsonl (the pinned split) and images/")
    parser.add_argument("--consistency", action=argparse.BooleanOptionalAction, default=True,
                        help="also ask every two-object question with the objects swapped (default: on)")
    parser.add_argument("--option_orders", type=int, default=1,
                        help="ask each question with its option list in this many rotations (default 1: as listed)")


def data_roots(args):
    return benchmarks.DataRoots(val_json=args.val_json, coco_val_dir=args.coco_val_dir, whatsup_dir=args.whatsup_dir,
                                vg_image_dir=args.vg_image_dir, controlled_dir=args.controlled_dir,
                                vsr_dir=args.vsr_dir)


def parsing_for(name, protocol):
    """How generate mode reads answers: the original's reading for COCO-Spatial under the paper
    protocol (today's numbers), strictly everywhere else."""
    return "original" if name == "coco_two_obj" and protocol == "paper" else "strict"


def load_benchmarks(names, args):
    """{name: samples} of every named benchmark, or SystemExit with one line per missing file
    (what it is and where to get it), all before a model loads."""
    roots = data_roots(args)
    missing = benchmarks.missing_files(names, roots)
    if missing:
        sys.exit("error: missing benchmark files:\n" + "\n".join(missing))
    loaded = {}
    for name in names:
        unreadable = []
        try:
            loaded[name] = benchmarks.load(name, roots, args.question_style, args.eval_max_samples, unreadable)
        except (FileNotFoundError, ValueError) as err:
            sys.exit(f"error: {err}")
        if unreadable:
            print(f"warning: {name}: left out {len(unreadable)} questions whose image cannot be read: "
                  f"{data.named_problems([(path, why) for _, path, why in unreadable])}", file=sys.stderr)
    return loaded


def check_data_args(parser, args):
    if getattr(args, "option_orders", 1) < 1:
        parser.error(f"argument --option_orders: must be >= 1, not {args.option_orders}")
    if args.eval_max_samples is not None and args.eval_max_samples < 1:
        parser.error(f"argument --eval_max_samples: must be >= 1 (or left out for all), not {args.eval_max_samples}")


def default_output(ckpt, mode):
    """Predictions go next to a checkpoint folder, or under eval_outputs/ for an alias or hub id."""
    base = Path(ckpt) if os.path.isdir(ckpt) else Path("eval_outputs") / ckpt.replace("/", "--")
    return base / f"coco_predictions_{mode}.jsonl"


def load_model(args):
    """(model, processor, adapter) of --ckpt, its files checked first (once); SystemExit naming --ckpt."""
    try:
        source = check_checkpoint_source(args.ckpt)
    except (ModelUnavailableError, CheckpointError) as err:
        sys.exit(f"error: --ckpt {err}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = speedups.weights_dtype(args.bf16, device)
    if args.bf16 and dtype != torch.bfloat16:
        print("--bf16 ignored: no CUDA device, evaluating in float32", file=sys.stderr)
    try:
        return load_checkpoint_model(args.ckpt, dtype=dtype, device=device, source=source)
    except (ModelUnavailableError, CheckpointError) as err:
        sys.exit(f"error: --ckpt {err}")


def main_benchmarks(parser, args):
    """--benchmark: every named benchmark with its checks; {name: report}."""
    names = benchmarks.resolve_names(args.benchmark)
    base = Path(args.ckpt) if os.path.isdir(args.ckpt) else Path("eval_outputs") / args.ckpt.replace("/", "--")
    out_dir = Path(args.output) if args.output else base / f"benchmark_predictions_{args.mode}"
    problem = output_problem(out_dir, kind="folder")
    if problem:
        parser.error(f"argument --output: {problem}")
    loaded = load_benchmarks(names, args)
    model, processor, adapter = load_model(args)
    reports = {}
    for name, samples in loaded.items():
        report, rows = evaluate_benchmark(model, processor, adapter, samples, args.batch_size, args.mode,
                                          args.max_new_tokens, args.consistency, args.option_orders,
                                          parsing_for(name, args.protocol), desc=name)
        reports[name] = report
        print(format_benchmark_report(report))
        write_jsonl(out_dir / f"{name}.jsonl", rows)
    (out_dir / "report.json").write_text(json.dumps(reports, indent=1) + "\n")
    print(f"predictions and report: {out_dir}")
    return reports


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint folder, hub id or alias (e.g. tiny, qwen2-2b)")
    parser.add_argument("--list_models", action=ListModelsAction)
    protocols.add_protocol_arg(parser)
    add_data_args(parser)
    add_benchmark_args(parser)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--mode", choices=["generate", "score"], default="generate")
    parser.add_argument("--max_new_tokens", type=int, default=5)
    parser.add_argument("--agreement", action="store_true",
                        help="score mode: also generate and report how often score and generate agree (slower)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 weights (CUDA only; float32 on CPU)")
    parser.add_argument("--output", default=None, help="predictions JSONL (default: next to the checkpoint); with "
                        "--benchmark a folder: NAME.jsonl per benchmark and report.json")
    args = parser.parse_args(argv)
    for flag in ("batch_size", "max_new_tokens"):
        if getattr(args, flag) < 1:
            parser.error(f"argument --{flag}: must be >= 1, not {getattr(args, flag)}")
    check_data_args(parser, args)
    protocols.resolve(args)
    if args.benchmark is not None:
        return main_benchmarks(parser, args)
    output = args.output or default_output(args.ckpt, args.mode)
    problem = output_problem(output)
    if problem:
        parser.error(f"argument --output: {problem}")

    # Data and the checkpoint's files first: a missing image, a malformed row or a model folder
    # without complete weights stops us before the model loads.
    unreadable = []
    try:
        samples = data.load_coco_spatial(args.val_json, args.coco_val_dir, args.question_style, args.eval_max_samples,
                                         unreadable=unreadable)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    if unreadable:
        print(f"warning: left out {len(unreadable)} of {len(samples) + len(unreadable)} questions whose image cannot "
              f"be read: {data.named_problems([(path, why) for _, path, why in unreadable])}", file=sys.stderr)
    model, processor, adapter = load_model(args)
    report, rows = evaluate(model, processor, adapter, samples, args.batch_size, args.mode, args.max_new_tokens,
                            agreement=args.agreement)
    if unreadable:
        report["unreadable_images_left_out"] = len(unreadable)
    print(format_report(report) + (f" ({len(unreadable)} questions left out: image unreadable)" if unreadable else ""))
    write_jsonl(output, rows)
    print(f"predictions: {output}")
    return report


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ModelUnavailableError, CheckpointError) as err:  # user-facing: no traceback
        sys.exit(f"error: {err}")
