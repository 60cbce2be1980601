"""train.py's command line: its parser (every flag range-checked when parsed), and the one list
of arguments that define a run (its identity), beside the list of those that do not, with why.

A room of its own so that reproduce.py computes a run's identity exactly as train.py does, from the
train.py command a run script would start, without importing an entry script. A flag added to
the parser goes into IDENTITY_ARGS or NOT_IDENTITY (tests/test_run_identity.py checks that every
flag is in one of them): docs/training.md explains the split.
"""
import argparse
import importlib.util
import json
import math
from pathlib import Path

import data
import grid_sources
import param_selectors
import protocols
import spatial_loss as sl
import speedups
from eval_coco import add_benchmark_args, add_data_args, check_data_args
from models import ListModelsAction

def _range_checks(p, args):
    """Every numeric argument's range, checked at parse time: one line naming the flag."""
    def need(ok, flag, what):
        if not ok:
            p.error(f"argument --{flag}: {what}, not {getattr(args, flag)!r}")

    for flag in ("batch_size", "grad_accum", "epochs", "eval_save_steps", "log_every", "eval_batch_size"):
        need(getattr(args, flag) is None or getattr(args, flag) >= 1, flag, "must be >= 1")
    for flag in ("max_steps", "holdout_max_samples", "save_steps", "save_total_limit"):
        need(getattr(args, flag) is None or getattr(args, flag) >= 1, flag, "must be >= 1 (or left out)")
    need(args.lr > 0 and math.isfinite(args.lr), "lr", "must be a finite number > 0")
    need(0 <= args.weight_decay < 1, "weight_decay", "must be in [0, 1)")
    need(0 <= args.warmup_frac < 1, "warmup_frac", "must be in [0, 1) (a fraction of the optimizer steps)")
    need(args.max_grad_norm > 0, "max_grad_norm", "must be > 0")
    need(0 <= args.spatial_holdout_frac < 1, "spatial_holdout_frac", "must be in [0, 1)")
    need(0 <= args.max_unreadable_frac <= 1, "max_unreadable_frac", "must be in [0, 1] (a share of the images)")
    need(0 < args.param_budget_frac <= 1, "param_budget_frac", "must be in (0, 1] (a fraction of all parameters)")
    need(args.last_k_blocks >= 1, "last_k_blocks", "must be >= 1")
    need(args.num_workers is None or args.num_workers >= 0, "num_workers", "must be >= 0")
    need(args.spatial_id_layer >= 0, "spatial_id_layer", "must be >= 0 (0 = the input embeddings)")
    need(args.spatial_id_weight >= 0 and math.isfinite(args.spatial_id_weight), "spatial_id_weight", "must be >= 0")
    need(args.lm_loss_weight >= 0 and math.isfinite(args.lm_loss_weight), "lm_loss_weight", "must be >= 0")
    for flag in ("seed", "data_seed"):  # the range numpy's and Python's seeding take (accelerate's set_seed)
        need(0 <= getattr(args, flag) < 2 ** 32, flag, "must be >= 0 and < 2**32")



def build_parser(description=None):
    """train.py's parser, before the checks that parse_args makes on what it parsed."""
    p = argparse.ArgumentParser(prog="train.py", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", default="qwen2-2b", help="alias (tiny, qwen2-2b, ...), hub id or local folder")
    p.add_argument("--list_models", action=ListModelsAction)
    protocols.add_protocol_arg(p)
    p.add_argument("--train_dir", default=None,
                   help="folder of grid images (make_grid_data.py); default data/grid unless --train_objects")
    p.add_argument("--max_unreadable_frac", type=float, default=0.05,
                   help="largest share of --train_dir's images that may be unreadable (left out, named); above it "
                        "training stops before the model loads: a folder that broken is a broken download")
    p.add_argument("--train_question_style", choices=data.QUESTION_STYLES, default=None,
                   help="grid question wording: paper = bare names, clean = 'the {name}' (default: --protocol)")
    add_data_args(p)
    add_benchmark_args(p, "--eval_benchmarks", help_default="none: COCO-Spatial and the holdout pairs only")
    p.add_argument("--output_dir", default=None, help="run folder (default runs/<model>_<baseline|spatial>_seed<seed>)")
    p.add_argument("--overwrite_output_dir", action="store_true", help="replace the run in --output_dir")
    p.add_argument("--resume_from_checkpoint", default=None,
                   help="continue from a checkpoint-N folder, or 'latest' in --output_dir")
    p.add_argument("--fork", action="store_true",
                   help="with --resume_from_checkpoint of another run: continue it in a new, empty --output_dir")
    p.add_argument("--seed", type=int, default=0, help="model-side randomness and the order of the data")
    p.add_argument("--data_seed", type=int, default=0,
                   help="the holdout split and the evaluated holdout subset, kept apart from --seed so that "
                        "runs of several seeds answer the same questions (paired comparisons)")
    p.add_argument("--report_to", choices=("none", "tensorboard", "wandb"), default="none",
                   help="also log losses and accuracies there (the package must be installed)")
    p.add_argument("--batch_size", type=int, default=15, help="questions per batch, per process")
    p.add_argument("--grad_accum", type=int, default=1, help="batches per optimizer step, per process")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--warmup_frac", type=float, default=0.03)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--sampler", choices=tuple(data.SAMPLERS), default=None,
                   help="shuffle: plain shuffle; obj1_groups: the original's (obj1, cell, obj2) groups; grouped: "
                        "(pair, cell, size, question) groups. Default by --protocol: paper = shuffle for the "
                        "baseline, obj1_groups with the spatial loss; clean = grouped")
    p.add_argument("--spatial_holdout_frac", type=float, default=0.15, help="share of object pairs held out")
    p.add_argument("--holdout_max_samples", type=int, default=500, help="holdout questions evaluated (seeded subset)")
    p.add_argument("--eval_batch_size", type=int, default=None, help="default: --batch_size")
    p.add_argument("--eval_mode", choices=["generate", "score"], default="generate")
    p.add_argument("--eval_save_steps", type=int, default=200, help="evaluate every N optimizer steps")
    p.add_argument("--save_steps", type=int, default=None, help="checkpoint every N steps (default: --eval_save_steps)")
    p.add_argument("--save_total_limit", type=int, default=None, help="keep only the newest N checkpoints")
    p.add_argument("--keep_best", action="store_true", help="with --save_total_limit: also keep the best by COCO accuracy")
    p.add_argument("--merge_lora", action="store_true",
                   help="with --lora_rank: final/ holds the model with the adapters merged in (a plain checkpoint)")
    p.add_argument("--save_full_checkpoints", action="store_true",
                   help="checkpoints hold the whole model too (default: only the trained tensors + training state)")
    p.add_argument("--log_every", type=int, default=5, help="log the mean losses every N optimizer steps")
    p.add_argument("--bf16", action="store_true", help="bfloat16 weights on CUDA (float32 with a notice on CPU)")
    p.add_argument("--grad_checkpointing", action="store_true")
    p.add_argument("--num_workers", type=int, default=None,
                   help="DataLoader workers (image loading + processing); default 0 on a CPU, up to 8 per "
                        "process on CUDA (speedups.loader_settings)")
    # Speed-ups: none changes what is trained (each is checked equal to the plain path in tests/).
    p.add_argument("--encode_images_once", action=argparse.BooleanOptionalAction, default=True,
                   help="run the vision tower once per distinct image of a batch and share its features with "
                        "every question about it (same loss and gradients; --no-encode_images_once: per row)")
    p.add_argument("--compile_blocks", choices=speedups.COMPILE_CHOICES, default="none",
                   help="torch.compile the vision blocks, the LM layers or both (falls back to eager with a warning)")
    p.add_argument("--liger_kernel", action="store_true",
                   help="Liger's fused kernels where they support the family (CUDA and liger-kernel needed; "
                        "else a warning and the plain kernels)")
    param_selectors.add_selector_args(p)
    grid_sources.add_render_args(p, "--train_objects", "training images")
    # Spatial-ID auxiliary loss (off unless --universal_id_path is given).
    p.add_argument("--universal_id_path", default=None, help="universal spatial IDs (derive_spatial_ids.py)")
    p.add_argument("--spatial_id_layer", type=int, default=sl.DEFAULT_SPATIAL_ID_LAYER, help="hidden_states index: 0 = embeddings")
    p.add_argument("--spatial_id_weight", type=float, default=1.0,
                   help="weight of the spatial-ID loss; 0 = a control that logs the loss but sends no gradient")
    p.add_argument("--lm_loss_weight", type=float, default=1.0,
                   help="weight of the LM (answer) loss; 0 with --universal_id_path = a spatial-only run")
    p.add_argument("--spatial_head", choices=["none", "linear"], default="none")
    p.add_argument("--allow_holdout_in_ids", action="store_true",
                   help="do not warn when holdout pairs were among the pairs the IDs were derived from")
    return p


def parse_args(argv=None, description=None):
    """train.py's arguments, checked, with the protocol's choices and the defaults that depend on
    other flags resolved (so that the same command gives the same identity wherever it is parsed)."""
    p = build_parser(description)
    args = p.parse_args(argv)
    args.protocol_choices = protocols.resolve(args, arm="spatial" if args.universal_id_path else "baseline")

    _range_checks(p, args)
    check_data_args(p, args)
    grid_sources.check_render_flags(p, args, "--train_objects")
    if args.train_objects is not None and args.train_dir is not None:
        p.error("argument --train_objects: draws the training images on the fly; give it or --train_dir, not both")
    if args.train_objects is None and args.train_dir is None:
        args.train_dir = "data/grid"
    if args.report_to != "none" and importlib.util.find_spec(args.report_to) is None:
        p.error(f"argument --report_to: {args.report_to} is not installed (pip install {args.report_to})")
    if args.keep_best and not args.save_total_limit:
        p.error("argument --keep_best: needs --save_total_limit N")
    if args.merge_lora and not getattr(args, "lora_rank", 0):
        p.error("argument --merge_lora: needs --lora_rank R")
    if args.fork and not args.resume_from_checkpoint:
        p.error("argument --fork: needs --resume_from_checkpoint")
    if args.universal_id_path and not data.SAMPLERS[args.sampler]:
        p.error(f"argument --sampler: the spatial loss centres over a batch with obj1 fixed, which "
                f"{args.sampler} batches do not keep; use obj1_groups or grouped")
    if args.lm_loss_weight == 0 and not (args.universal_id_path and args.spatial_id_weight > 0):
        p.error("argument --lm_loss_weight: 0 leaves nothing to train; a spatial-only run also needs "
                "--universal_id_path and --spatial_id_weight > 0")
    if args.universal_id_path and args.batch_size < 2:
        p.error("argument --batch_size: the spatial loss centres over the batch, so it must be >= 2")
    if args.output_dir is None:
        kind = "spatial" if args.universal_id_path else "baseline"
        args.output_dir = f"runs/{Path(args.model_name).name}_{kind}_seed{args.seed}"
    args.eval_batch_size = args.eval_batch_size or args.batch_size
    args.save_steps = args.save_steps or args.eval_save_steps
    return args



# The arguments that define a run: what it trains (model, data, selection, loss, optimiser,
# schedule, length, seeds, numerics) and what each number it records measures (the COCO-Spatial
# and holdout questions and how answers are read). A run folder keeps them (run_identity.json);
# a rerun that resumes it must give the same values (train.py), and a sweep skips a finished run
# only when its values are this sweep's (reproduce.py).
IDENTITY_ARGS = (
    # model and method choices (the protocol's, resolved)
    "model_name", "protocol", "train_question_style", "question_style", "sampler", "projector", "last_k_of",
    # training data and the holdout split
    "train_dir", "train_objects", "objects", "cell", "sizes", "no_same_row_or_col", "local_variation", "bg_dir",
    "max_pairs", "max_images", "grid_seed", "spatial_holdout_frac", "data_seed",
    # what trains
    "selector", "last_k_blocks", "param_budget_frac", "bitfit_bias_only", "train_biases", "no_lm_head",
    "lora_rank", "lora_alpha", "lora_dropout",
    # the losses
    "universal_id_path", "spatial_id_layer", "spatial_id_weight", "lm_loss_weight", "spatial_head",
    # optimiser, schedule, length, randomness, numerics
    "seed", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_frac", "max_grad_norm", "epochs",
    "max_steps", "bf16",
    # what the recorded accuracies measure
    "val_json", "coco_val_dir", "eval_max_samples", "eval_sample_seed", "holdout_max_samples", "eval_mode",
    # what the model sees of an image (the budget applies to the processor, in training too)
    "max_pixels",
)

# Every other argument, with why it may differ between the runs of one identity.
NOT_IDENTITY = {
    "output_dir": "where the run is, not what it is",
    "overwrite_output_dir": "how this invocation treats the folder",
    "resume_from_checkpoint": "how this invocation starts",
    "fork": "how this invocation starts",
    "report_to": "logging",
    "log_every": "logging",
    "max_unreadable_frac": "a threshold to stop at: unreadable images are left out whatever it is",
    "allow_holdout_in_ids": "silences a warning",
    "eval_save_steps": "how often it evaluates and saves (evaluation draws no random numbers)",
    "save_steps": "how often it saves",
    "save_total_limit": "which checkpoints are kept",
    "keep_best": "which checkpoints are kept",
    "save_full_checkpoints": "what a checkpoint holds besides the trained tensors",
    "merge_lora": "how final/ stores the same weights",
    "eval_batch_size": "evaluation speed and memory",
    "num_workers": "loading speed",
    "grad_checkpointing": "memory: recomputes the same activations",
    "encode_images_once": "a speed-up, tested equal to the plain path",
    "compile_blocks": "a speed-up, tested equal to the plain path",
    "liger_kernel": "a speed-up, tested equal to the plain path",
    "eval_benchmarks": "extra measurements under their own names; the run's training and its COCO-Spatial and "
                       "holdout numbers stay the same",
    "whatsup_dir": "where --eval_benchmarks' files are",
    "vg_image_dir": "where --eval_benchmarks' files are",
    "controlled_dir": "where --eval_benchmarks' files are",
    "vsr_dir": "where --eval_benchmarks' files are",
    "hub_dir": "where --eval_benchmarks' files are",
    "consistency": "extra measurements of --eval_benchmarks",
    "option_orders": "extra measurements of --eval_benchmarks",
    "mirror": "extra measurements of --eval_benchmarks",
    "max_unparsed_share": "a gate on --eval_benchmarks' files before the model loads; what passes is the same",
    "protocol_choices": "derived: the resolved choices are flags of the identity",
}


def run_identity(args):
    """{flag: value} of the arguments in IDENTITY_ARGS, as JSON stores them."""
    values = vars(args)
    return json.loads(json.dumps({flag: values[flag] for flag in IDENTITY_ARGS}))
