"""Evaluation inference: generate answers, or score every option, for two-option COCO-Spatial
questions and every benchmark of benchmarks.py. The rules that turn answers into numbers
(readings, accuracy, consistency, circular accuracy, ROC-AUC, report lines) live in scoring.py.

    python eval_coco.py --ckpt runs/baseline/checkpoint-200
    python eval_coco.py --ckpt qwen2-2b --mode score --eval_max_samples 100

`--mode generate` (the original's metric) decodes at most 5 new tokens greedily, batched with
left padding and the KV cache, and reads the answer as the original did. `--mode score` picks the
option of highest log-probability as a whole word: the log-sum-exp over its surface forms
(lowercase, Capitalised, as the answer follows the prompt) of its full token sequence; one forward
pass per batch with the LM head at the answer position scores single-token forms, and each rank of
multi-token form ("beh" + "ind") one more forward with its tokens appended. `--agreement` also
runs `generate` and reports how often the two agree. train.py calls `evaluate` from here.

    python eval_coco.py --ckpt runs/x/final --benchmark all --whatsup_dir data/whatsup --vsr_dir data/vsr

`--benchmark NAME ... | all` evaluates What'sUp's subsets, VSR and the hub's multiple-choice sets
(CV-Bench, BLINK, EmbSpatial-Bench, 3DSRBench; benchmarks.py) with their checks
(evaluate_benchmark): the strict and substring readings side by side, the swapped-objects twin of
every symmetric two-object question, the mirrored image, option-order rotations with circular
accuracy, pair/set accuracy, VSR's ROC-AUC; every row unless --eval_max_samples asks for a
stratified seeded sample; an image budget (--max_pixels). A missing hub file is fetched; each
missing file is named on its own line, and too many unparsed captions stop it, before a model
loads. docs/evaluation.md has the details.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

import benchmarks
import data
import protocols
import scoring
import speedups
from checkpoints import CheckpointError, check_checkpoint_source, load_checkpoint_model
from lm_loss import last_position_logits
from models import ListModelsAction, ModelUnavailableError
from output_paths import output_problem
from scoring import accuracy_report, benchmark_report, format_benchmark_report, format_report

# The image budget's default: 1,024 visual tokens of Qwen2-VL (28 x 28 pixels each after its
# 2 x 2 merge), about 0.8 megapixels; COCO's images (at most 640 x 640 = 409,600) fall under it.
DEFAULT_MAX_PIXELS = 1024 * 28 * 28


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
                     encode_images_once=False, visual_tokens=None, should_stop=None):
    """Greedy answers for `samples`, batched with left padding and the KV cache; with
    `encode_images_once` (and an adapter whose generate takes precomputed image features), each
    distinct image of a batch goes through the vision tower once. A list as `visual_tokens` gets
    each sample's count of visual tokens (visual_token_counts)."""
    tokenizer = processor.tokenizer
    texts = []
    once = encode_images_once and adapter.generate_takes_image_features
    for _, batch in _left_padded_batches(model, processor, adapter, samples, batch_size, progress, desc, once,
                                         should_stop):
        if visual_tokens is not None:
            visual_tokens += visual_token_counts(model, batch)
        prompt_len = batch["input_ids"].shape[1]
        if once:
            batch = adapter.encode_images_once(model, batch)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        texts += tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
    return texts


class OptionForms:
    """Each option word's surface forms and their token ids after the prompt
    (adapter.option_forms), tokenised once per tokenizer; `table()` lists them for a report."""

    def __init__(self, processor, adapter):
        self.processor, self.adapter, self.forms = processor, adapter, {}

    def __call__(self, option):
        if option not in self.forms:
            self.forms[option] = self.adapter.option_forms(self.processor, option)
        return self.forms[option]

    def table(self):
        return {option: [{"text": text, "ids": ids} for text, ids in forms] for option, forms in self.forms.items()}


def _form_logprobs(model, adapter, batch, row_forms, first_logprobs):
    """[per row: the log-probability of each of its forms' whole token sequence]: the first token
    from the prompt's last position (`first_logprobs`), the later tokens teacher-forced, one
    extra forward per batch for each rank of multi-token form (rows append their k-th multi-token
    form; rows with fewer repeat their last token, whose logits are not read)."""
    out = [[float(first_logprobs[r, ids[0]]) for ids in forms] for r, forms in enumerate(row_forms)]
    multi = [[(f, ids) for f, ids in enumerate(forms) if len(ids) > 1] for forms in row_forms]
    for k in range(max(map(len, multi), default=0)):
        length = max(len(m[k][1]) - 1 for m in multi if len(m) > k)
        tails = []
        for r, m in enumerate(multi):
            tail = m[k][1][:-1] if len(m) > k else [int(batch["input_ids"][r, -1])]
            tails.append(tail + [tail[-1]] * (length - len(tail)))
        extended = adapter.extend_text(batch, torch.tensor(tails))
        logits = model(**extended, logits_to_keep=length, use_cache=False).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)  # [B, length, V]: position t predicts token t + 1
        for r, m in enumerate(multi):
            if len(m) > k:
                f, ids = m[k]
                out[r][f] += sum(float(logprobs[r, t, ids[t + 1]]) for t in range(len(ids) - 1))
    return out


@torch.no_grad()
def option_logprobs(model, processor, adapter, samples, batch_size=8, progress=True, desc="score",
                    encode_images_once=False, forms=None, visual_tokens=None, should_stop=None):
    """[per sample: each option's log-probability as a whole word]: the log-sum-exp over its
    surface forms (OptionForms: lowercase and Capitalised, as the answer follows the prompt) of
    the probability of the form's full token sequence. One forward pass per batch (LM head at the
    answer position) scores every single-token form; each rank of multi-token form ("beh"+"ind")
    costs one more forward of the batch with those tokens appended (_form_logprobs)."""
    forms = forms or OptionForms(processor, adapter)
    scores = []
    for chunk, batch in _left_padded_batches(model, processor, adapter, samples, batch_size, progress, desc,
                                             encode_images_once, should_stop):
        if visual_tokens is not None:
            visual_tokens += visual_token_counts(model, batch)
        if "image_index" in batch:  # encode each distinct image once for every forward below
            batch = adapter.encode_images_once(getattr(model, "module", model), batch)  # DDP keeps it in .module
        first = torch.log_softmax(last_position_logits(model, adapter, batch), dim=-1)
        row_forms = [[ids for option in s["options"] for _, ids in forms(option)] for s in chunk]
        per_form = _form_logprobs(model, adapter, batch, row_forms, first)
        for s, values in zip(chunk, per_form):
            it = iter(values)
            scores.append([scoring.logsumexp([next(it) for _ in forms(option)]) for option in s["options"]])
    return scores


def score_answers(model, processor, adapter, samples, batch_size=8, progress=True, desc="score",
                  encode_images_once=False, should_stop=None):
    """The option of highest whole-word log-probability (option_logprobs)."""
    scores = option_logprobs(model, processor, adapter, samples, batch_size, progress, desc, encode_images_once,
                             should_stop=should_stop)
    return [scoring.best_option(s["options"], row) for s, row in zip(samples, scores)]


def visual_token_counts(model, batch):
    """[per row: how many image placeholder tokens its prompt holds] (the visual tokens of its image)."""
    config = getattr(model, "config", None)
    token = getattr(config, "image_token_id", None)
    if token is None:
        token = getattr(config, "image_token_index", None)
    if token is None:
        return [None] * batch["input_ids"].shape[0]
    return (batch["input_ids"] == token).sum(dim=1).tolist()


def evaluate(model, processor, adapter, samples, batch_size=8, mode="generate", max_new_tokens=5, progress=True,
             desc="eval", agreement=False, should_stop=None):
    """(report, prediction rows) for `samples`. The model is left in eval mode; callers that
    train switch it back. `should_stop`: see _left_padded_batches.

    mode="score" picks the option of highest whole-word log-probability (option_logprobs); with
    agreement=True it also generates, and the report gains "agreement_with_generate" and
    "generate_accuracy" (rows' "generated" is None without it). Generated answers are read as
    the original did (scoring.read_original)."""
    if mode not in ("generate", "score"):
        raise ValueError(f"mode must be 'generate' or 'score', not {mode!r}")
    model.eval()
    texts = parsed = None
    forms = OptionForms(processor, adapter)
    if mode == "generate" or agreement:
        texts = generate_answers(model, processor, adapter, samples, batch_size, max_new_tokens, progress, desc,
                                 should_stop=should_stop)
        parsed = [scoring.read_original(t, s["options"])[0] for t, s in zip(texts, samples)]
    if mode == "generate":
        predictions = parsed
    else:
        scores = option_logprobs(model, processor, adapter, samples, batch_size, progress, desc + " (score)",
                                 forms=forms, should_stop=should_stop)
        predictions = [scoring.best_option(s["options"], row) for s, row in zip(samples, scores)]
    rows = []
    for i, (s, pred) in enumerate(zip(samples, predictions)):
        rows.append({k: s[k] for k in ("row", "image_id", "image_path") if k in s} | {
            "question": s["question"], "answer": s["answer"], "generated": texts[i] if texts else None,
            "prediction": pred, "correct": pred == s["answer"],
        })
    report = scoring.report_from_rows(samples, rows)
    if mode == "score":
        report["option_forms"] = forms.table()
    if mode == "score" and agreement:
        agree = sum(a == b for a, b in zip(predictions, parsed))
        report["agreement_with_generate"] = agree / len(samples) if samples else float("nan")
        report["generate_accuracy"] = accuracy_report(samples, parsed)["accuracy"]
    return report, rows


def _grouped_by_image(questions):
    """Question indices with the questions of one image next to each other (first appearance
    order), so a batch holds an image's questions together and encodes the image once."""
    first = {}
    for i, q in enumerate(questions):
        first.setdefault(str(q["image_path"]), len(first))
    return sorted(range(len(questions)), key=lambda i: first[str(questions[i]["image_path"])])


def _listed_options(question):
    """The question's options in its benchmark's own order, whatever order the prompt listed
    them in, so that no reading depends on a rotation."""
    bench = benchmarks.BENCHMARKS.get(question["benchmark"])
    own = [o for o in bench.options if o in question["options"]] if bench else []
    return own if len(own) == len(question["options"]) else sorted(question["options"])


def evaluate_benchmark(model, processor, adapter, samples, batch_size=8, mode="generate", max_new_tokens=5,
                       consistency=True, option_orders=1, parsing="strict", progress=True, desc="eval", mirror=True,
                       should_stop=None):
    """(report, prediction rows) for the samples of one benchmark (benchmarks.load), with the
    checks (benchmarks.with_checks): each two-object question of a symmetric relation also asked
    with the objects swapped (`consistency`), each What'sUp question of the image flipped left to
    right (`mirror`), and every question with its options rotated 1 .. option_orders-1 places.
    Questions of one image are batched together and the image encoded once.

    generate mode reads answers with the named reading (`parsing`: "strict", "substring" or
    "original"; scoring.read), always in the benchmark's own option order; the report also has
    the strict and substring readings side by side. score mode takes the option of highest
    whole-word log-probability; VSR questions are also scored in generate mode (ROC-AUC of
    log P(true) - log P(false)). `should_stop`: see _left_padded_batches."""
    if mode not in ("generate", "score"):
        raise ValueError(f"mode must be 'generate' or 'score', not {mode!r}")
    model.eval()
    questions = benchmarks.with_checks(samples, consistency, option_orders, mirror)
    order = _grouped_by_image(questions)
    asked = [questions[i] for i in order]
    texts = statuses = scores = None
    forms, visual = OptionForms(processor, adapter), []
    if mode == "generate":
        texts = generate_answers(model, processor, adapter, asked, batch_size, max_new_tokens, progress, desc,
                                 encode_images_once=True, visual_tokens=visual,
                                 should_stop=should_stop)
        got = [scoring.read(parsing, t, _listed_options(q), q["answer"]) for t, q in zip(texts, asked)]
        predictions, statuses = [p for p, _ in got], [st for _, st in got]
    if mode == "score" or any(q["kind"] == "vsr" for q in asked):
        scores = option_logprobs(model, processor, adapter, asked, batch_size, progress, desc + " (score)",
                                 encode_images_once=True, forms=forms, visual_tokens=None if visual else visual,
                                 should_stop=should_stop)
        if mode == "score":
            predictions = [scoring.best_option(q["options"], r) for q, r in zip(asked, scores)]
    rows = [None] * len(questions)
    for j, (i, q) in enumerate(zip(order, asked)):
        row = {k: q[k] for k in ("benchmark", "row", "image_id", "image_path", "relation", "order", "rotation")}
        row |= {"question": q["question"], "answer": q["answer"], "generated": texts[j] if texts else None,
                "prediction": predictions[j], "correct": predictions[j] == q["answer"],
                "visual_tokens": visual[j] if visual else None}
        if statuses is not None:
            row["parse"] = statuses[j]
        if scores is not None and q["kind"] == "vsr":
            logp = dict(zip(q["options"], scores[j]))
            row["margin_true_false"] = logp["true"] - logp["false"]
        rows[i] = row
    report = benchmark_report(questions, rows)
    if forms.forms:
        report["option_forms"] = forms.table()
    return report, rows


def write_jsonl(path, rows):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def add_data_args(parser):
    """COCO-Spatial flags shared with train.py."""
    parser.add_argument("--val_json", default="data/coco_qa_two_obj.json",
                        help="COCO-Spatial rows [image_id, true_caption, false_caption]")
    parser.add_argument("--coco_val_dir", default="data/coco", help="folder of COCO val2017 {id:012d}.jpg images")
    parser.add_argument("--eval_max_samples", type=int, default=None,
                        help="evaluate a random sample of N rows per benchmark, stratified by relation and seeded "
                             "(--eval_sample_seed), never a prefix (default: every row)")
    parser.add_argument("--eval_sample_seed", type=int, default=0,
                        help="seed of --eval_max_samples' sample (default 0)")
    parser.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="image budget: at most this many pixels per image, resized keeping its aspect (Qwen "
                             "families: 28 x 28 pixels per visual token; fixed-size families resize anyway); default "
                             f"{DEFAULT_MAX_PIXELS:,} = 1,024 visual tokens (docs/evaluation.md has the arithmetic)")
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
    parser.add_argument("--hub_dir", default=None,
                        help="the hub's sets (CV-Bench, BLINK, EmbSpatial, 3DSRBench) as REPO_ID/FILE under this "
                             "folder (default: the Hugging Face hub cache, a missing file fetched there unless "
                             "HF_HUB_OFFLINE=1)")
    parser.add_argument("--consistency", action=argparse.BooleanOptionalAction, default=True,
                        help="also ask every two-object question with the objects swapped (default: on)")
    parser.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=True,
                        help="also ask every What'sUp question of its image flipped left to right, left and right "
                             "swapped in the gold (default: on)")
    parser.add_argument("--option_orders", type=int, default=1,
                        help="ask each question with its option list in this many rotations (default 1: as listed); "
                             "above 1 the report adds circular accuracy (right under every rotation)")
    parser.add_argument("--max_unparsed_share", type=float, default=0.01,
                        help="stop before a model loads when more than this share of a benchmark's rows have a caption "
                             "that does not parse (default 0.01); below it they are left out, counted and named")


def data_roots(args):
    return benchmarks.DataRoots(val_json=args.val_json, coco_val_dir=args.coco_val_dir, whatsup_dir=args.whatsup_dir,
                                vg_image_dir=args.vg_image_dir, controlled_dir=args.controlled_dir,
                                vsr_dir=args.vsr_dir, hub_dir=args.hub_dir)


def parsing_for(name, protocol, reading=None):
    """How generate mode reads answers (the headline; the report has strict and substring side by
    side anyway): `reading` when named, else the original's reading for COCO-Spatial under the
    paper protocol (today's numbers) and strict everywhere else."""
    if reading:
        return reading
    return "original" if name == "coco_two_obj" and protocol == "paper" else "strict"


def load_benchmarks(names, args):
    """{name: samples} of every named benchmark, or SystemExit with one line per missing file
    (what it is and where to get it), all before a model loads."""
    roots = data_roots(args)
    missing = benchmarks.missing_files(names, roots, fetch_missing=True)
    if missing:
        sys.exit("error: missing benchmark files:\n" + "\n".join(missing))
    loaded, too_many = {}, []
    limit = getattr(args, "max_unparsed_share", 0.01)
    for name in names:
        unreadable, unparsed = [], []
        try:
            loaded[name] = benchmarks.load(name, roots, args.question_style, args.eval_max_samples, unreadable,
                                           getattr(args, "eval_sample_seed", 0), unparsed)
        except (FileNotFoundError, ValueError) as err:
            sys.exit(f"error: {err}")
        if unparsed:
            total = loaded[name][0]["selection"]["of"]
            line = (f"{name}: {len(unparsed)} of {total} rows have a caption that does not parse and are left out: "
                    + "; ".join(f"row {row} {caption!r}" for row, caption, _ in unparsed[:5])
                    + (f"; and {len(unparsed) - 5} more" if len(unparsed) > 5 else ""))
            print(f"warning: {line}", file=sys.stderr)
            if len(unparsed) > limit * total:
                too_many.append(f"{line} (more than --max_unparsed_share {limit:g})")
        if unreadable:
            print(f"warning: {name}: left out {len(unreadable)} questions whose image cannot be read: "
                  f"{data.named_problems([(path, why) for _, path, why in unreadable])}", file=sys.stderr)
    if too_many:
        sys.exit("error: captions that do not parse:\n" + "\n".join(too_many))
    return loaded


def images_over_budget(samples, max_pixels):
    """[(path, width, height)] of the distinct images of `samples` with more than `max_pixels`
    pixels (read from the file headers only)."""
    over, seen = [], set()
    for s in samples:
        path = str(s["image_path"])
        if path in seen or not max_pixels:
            continue
        seen.add(path)
        try:
            with Image.open(path) as img:
                width, height = img.size
        except OSError:
            continue  # unreadable images are counted where they are left out
        if width * height > max_pixels:
            over.append((path, width, height))
    return over


def apply_image_budget(processor, adapter, max_pixels, samples_by_name):
    """Bound the processor's pixels per image (adapter.image_budget) and warn, one line per
    benchmark, naming the images the budget resizes; the bound in force (None: the family resizes
    every image to its own fixed size)."""
    bound = adapter.image_budget(processor, max_pixels)
    if bound is None:
        return None
    for name, samples in samples_by_name.items():
        over = images_over_budget(samples, bound)
        if over:
            path, width, height = over[0]
            print(f"warning: {name}: {len(over)} images have more than the budget of {bound:,} pixels (--max_pixels) "
                  f"and are resized to it (first: {path}, {width}x{height})", file=sys.stderr)
    return bound


def check_data_args(parser, args):
    if getattr(args, "option_orders", 1) < 1:
        parser.error(f"argument --option_orders: must be >= 1, not {args.option_orders}")
    if args.eval_max_samples is not None and args.eval_max_samples < 1:
        parser.error(f"argument --eval_max_samples: must be >= 1 (or left out for all), not {args.eval_max_samples}")
    if getattr(args, "max_pixels", 1) is not None and getattr(args, "max_pixels", 1) < 28 * 28:
        parser.error(f"argument --max_pixels: must be at least {28 * 28} (one visual token), not {args.max_pixels}")
    if not 0 <= getattr(args, "max_unparsed_share", 0) <= 1:
        parser.error(f"argument --max_unparsed_share: must be between 0 and 1, not {args.max_unparsed_share}")


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
    apply_image_budget(processor, adapter, args.max_pixels, loaded)
    reports = {}
    for name, samples in loaded.items():
        report, rows = evaluate_benchmark(model, processor, adapter, samples, args.batch_size, args.mode,
                                          args.max_new_tokens, args.consistency, args.option_orders,
                                          parsing_for(name, args.protocol, args.reading), desc=name, mirror=args.mirror)
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
    parser.add_argument("--reading", choices=scoring.READINGS, default=None,
                        help="--benchmark, generate mode: the headline reading of answers (default: original for "
                             "coco_two_obj under --protocol paper, else strict); strict and substring are always "
                             "reported side by side")
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
                                         unreadable=unreadable, sample_seed=args.eval_sample_seed)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    if unreadable:
        print(f"warning: left out {len(unreadable)} of {len(samples) + len(unreadable)} questions whose image cannot "
              f"be read: {data.named_problems([(path, why) for _, path, why in unreadable])}", file=sys.stderr)
    model, processor, adapter = load_model(args)
    apply_image_budget(processor, adapter, args.max_pixels, {"COCO-Spatial": samples})
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
