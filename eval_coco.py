"""COCO-Spatial evaluation: generate (or score) answers to two-option spatial questions.

    python eval_coco.py --ckpt runs/baseline/checkpoint-200
    python eval_coco.py --ckpt qwen2-2b --mode score --eval_max_samples 100

`--mode generate` (the original's metric) decodes at most 5 new tokens greedily, batched with
left padding and the KV cache, and parses the answer as the original did. `--mode score` compares
the log-probabilities of the two option words in one forward pass per batch and nothing else: the
decoder runs to its last hidden state and the LM head is applied at the last position only
(lm_loss.last_position_logits). `--agreement` also runs `generate` and reports how often the two
agree. train.py calls `evaluate` from here.
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


def _batches(items, size):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _left_padded_batches(model, processor, adapter, samples, batch_size, progress, desc):
    """(samples, model inputs on the model's device) for each batch of generation prompts, padded
    on the left so every row's answer position is the last column; the tokenizer's padding side
    is restored afterwards."""
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    collate = data.VLMCollator(processor, adapter, with_answer=False)
    device = next(model.parameters()).device
    try:
        # Shown only on a terminal (disable=None): a bar nested under the training bar leaves
        # cursor-movement codes in a log file.
        for chunk in tqdm(list(_batches(samples, batch_size)), desc=desc, disable=None if progress else True,
                          leave=False):
            yield chunk, data.split_batch(collate(chunk), device)[0]
    finally:
        tokenizer.padding_side = side


@torch.no_grad()
def generate_answers(model, processor, adapter, samples, batch_size=8, max_new_tokens=5, progress=True, desc="eval"):
    """Greedy answers for `samples`, batched with left padding and the KV cache."""
    tokenizer = processor.tokenizer
    texts = []
    for _, batch in _left_padded_batches(model, processor, adapter, samples, batch_size, progress, desc):
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        texts += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return texts


@torch.no_grad()
def score_answers(model, processor, adapter, samples, batch_size=8, progress=True, desc="score"):
    """The option whose first token has the higher log-probability at the answer position: one
    forward pass per batch, LM head at the last (answer) position only."""
    answers = []
    option_ids = {}  # tokenise each option pair once, not once per question
    for chunk, batch in _left_padded_batches(model, processor, adapter, samples, batch_size, progress, desc):
        logprobs = torch.log_softmax(last_position_logits(model, adapter, batch), dim=-1)
        for row, sample in zip(logprobs, chunk):
            options = tuple(sample["options"])
            if options not in option_ids:
                option_ids[options] = adapter.option_token_ids(processor, options)  # as the answer follows the prompt
            answers.append(options[int(torch.argmax(row[option_ids[options]]))])
    return answers


def accuracy_report(samples, predictions):
    """Accuracy overall and per relation, with counts."""
    per = defaultdict(lambda: [0, 0])
    for s, p in zip(samples, predictions):
        per[s["answer"]][0] += int(p == s["answer"])
        per[s["answer"]][1] += 1
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
             desc="eval", agreement=False):
    """(report, prediction rows) for `samples`. The model is left in eval mode; callers that
    train switch it back.

    mode="score" runs one forward pass per batch and nothing else; with agreement=True it also
    generates, and the report gains "agreement_with_generate" and "generate_accuracy" (rows'
    "generated" is None without it)."""
    if mode not in ("generate", "score"):
        raise ValueError(f"mode must be 'generate' or 'score', not {mode!r}")
    model.eval()
    texts = parsed = None
    if mode == "generate" or agreement:
        texts = generate_answers(model, processor, adapter, samples, batch_size, max_new_tokens, progress, desc)
        parsed = [parse_answer(t, s["options"]) for t, s in zip(texts, samples)]
    if mode == "generate":
        predictions = parsed
    else:
        predictions = score_answers(model, processor, adapter, samples, batch_size, progress, desc + " (score)")
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


def check_data_args(parser, args):
    if args.eval_max_samples is not None and args.eval_max_samples < 1:
        parser.error(f"argument --eval_max_samples: must be >= 1 (or left out for all), not {args.eval_max_samples}")


def default_output(ckpt, mode):
    """Predictions go next to a checkpoint folder, or under eval_outputs/ for an alias or hub id."""
    base = Path(ckpt) if os.path.isdir(ckpt) else Path("eval_outputs") / ckpt.replace("/", "--")
    return base / f"coco_predictions_{mode}.jsonl"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint folder, hub id or alias (e.g. tiny, qwen2-2b)")
    parser.add_argument("--list_models", action=ListModelsAction)
    protocols.add_protocol_arg(parser)
    add_data_args(parser)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--mode", choices=["generate", "score"], default="generate")
    parser.add_argument("--max_new_tokens", type=int, default=5)
    parser.add_argument("--agreement", action="store_true",
                        help="score mode: also generate and report how often score and generate agree (slower)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 weights (CUDA only; float32 on CPU)")
    parser.add_argument("--output", default=None, help="predictions JSONL (default: next to the checkpoint)")
    args = parser.parse_args(argv)
    for flag in ("batch_size", "max_new_tokens"):
        if getattr(args, flag) < 1:
            parser.error(f"argument --{flag}: must be >= 1, not {getattr(args, flag)}")
    check_data_args(parser, args)
    protocols.resolve(args)
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
    try:
        check_checkpoint_source(args.ckpt)
    except (ModelUnavailableError, CheckpointError) as err:
        sys.exit(f"error: --ckpt {err}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = speedups.weights_dtype(args.bf16, device)
    if args.bf16 and dtype != torch.bfloat16:
        print("--bf16 ignored: no CUDA device, evaluating in float32", file=sys.stderr)
    try:
        model, processor, adapter = load_checkpoint_model(args.ckpt, dtype=dtype, device=device)
    except (ModelUnavailableError, CheckpointError) as err:
        sys.exit(f"error: --ckpt {err}")
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
