"""Spatial finetuning: train a budgeted slice of a VLM on synthetic two-object grid questions,
optionally with the spatial-ID auxiliary loss, and watch COCO-Spatial accuracy move.

    python train.py --model_name tiny --train_dir data/grid --val_json data/coco_standin/coco_qa_two_obj_standin.json \\
        --coco_val_dir data/coco_standin --max_steps 20 --eval_save_steps 10
    python preemptible_torchrun.py --nproc_per_node 4 train.py ...   # torchrun, preemptible (docs/training.md)

Read `main` top to bottom: arguments -> run folder -> data (checked before the model loads) ->
model and the trainable slice -> spatial loss -> optimiser -> evaluate / train / evaluate -> save;
each step is a function of its own, and `TrainingRun` is what they share. A stop signal
(preemption) ends the run at the next safe point, after an optimizer step or between evaluation
batches, with a checkpoint of that step and exit status 75 (_stop_for_resume).
The run folder gets config.json, metrics.jsonl, predictions/step-N.jsonl, checkpoint-N/ and final/.

Several processes: every process takes whole batches (a grouped batch stays one group, so the
spatial loss centres within it with no communication), N batches per step; gradients are
averaged, so N processes train exactly like one process with N times the gradient accumulation.
Each process evaluates its share of every evaluation set (_evaluate_split) and the rows are gathered.
"""
import argparse
import contextlib
import functools
import json
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, gather_object, set_seed
from tqdm.auto import tqdm

import benchmarks
import checkpoints
import data
import grid_sources
import param_selectors
import run_folder
import scoring
import spatial_loss as sl
import speedups
import train_args
from eval_coco import EvaluationInterrupted, evaluate, evaluate_benchmark, load_benchmarks, parsing_for, write_jsonl
from lm_loss import supervised_lm_loss
from models import ModelUnavailableError, load_model_and_processor, merge_lora, model_source
from provenance import run_metadata
from scoring import benchmark_report, format_benchmark_report, format_report


def parse_args(argv=None):
    """train.py's arguments (train_args.py: the parser, its checks, the run's identity)."""
    return train_args.parse_args(argv, description=__doc__)


UNREADABLE_NAMED = 20  # unreadable training images named one per line; the rest are counted

# ---------------------------------------------------------------------------------------------
# Training progress: one dataclass, saved and restored with each checkpoint
# ---------------------------------------------------------------------------------------------

@dataclass
class Progress:
    step: int = 0  # optimizer steps taken (including skipped ones)
    epoch: int = 0
    batches_done: int = 0  # batches of `epoch` consumed by all processes together
    optimizer_steps: int = 0
    skipped_steps: int = 0  # no finite gradient: not applied
    nonfinite_losses: int = 0  # micro-batches whose loss was not finite
    unreadable_images: int = 0  # training images that could not be decoded (left out, named in the log)
    last_eval: dict = field(default_factory=dict)


def training_state(args, progress, optimizer, scheduler, accelerator):
    """Everything needed to continue exactly (the trained tensors themselves go beside it)."""
    return {"progress": asdict(progress), "args": vars(args), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "num_processes": accelerator.num_processes,
            "rng": gather_object([torch.get_rng_state()])}


def restore_training_state(state, optimizer, scheduler, accelerator):
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    if len(rng) == accelerator.num_processes:
        torch.set_rng_state(rng[accelerator.process_index])
    else:
        accelerator.print(f"warning: the checkpoint was written by {len(rng)} processes, this run has "
                          f"{accelerator.num_processes}: random state restarts from --seed")
    return Progress(**state["progress"])


# ---------------------------------------------------------------------------------------------
# Setup steps
# ---------------------------------------------------------------------------------------------

def _holds_run(out):
    """A folder holds a run once it has trained a step or kept a checkpoint; a run that failed
    before its first step leaves nothing that blocks a rerun."""
    metrics = out / "metrics.jsonl"
    if checkpoints.list_checkpoints(out) or (out / "final").exists():
        return True
    return metrics.is_file() and any('"event": "train"' in line for line in metrics.read_text().splitlines())


_held_run_locks = []  # the run folder's lock while main runs (taken by _setup_run_folder, released by main's end)


def _releases_run_lock(main):
    """main, releasing the run folder's lock however it ends (an in-process caller may run again)."""
    @functools.wraps(main)
    def run(argv=None):
        try:
            return main(argv)
        finally:
            while _held_run_locks:
                _held_run_locks.pop().release()
    return run


def _lock_run_folder(out, accelerator):
    """The main process takes the folder's lock for the run's life, before anything in it is read
    or deleted; every process stops in one line when another job holds it."""
    problem = None
    if accelerator.is_main_process:
        try:
            _held_run_locks.append(run_folder.RunLock(out).acquire([sys.executable, *sys.argv]))
        except run_folder.RunFolderLocked as err:
            problem = f"--output_dir {err}; wait for it to end, or choose another --output_dir"
    if accelerator.num_processes > 1:
        problem = broadcast_object_list([problem])[0]
    if problem:
        raise ValueError(problem)


def _identity_changes(args, folder, state=None):
    """["--flag then → now", ...]: how this command's identity (train_args.IDENTITY_ARGS) differs
    from the one recorded in `folder` (its run_identity.json, its config.json, or the training
    `state` of a checkpoint of it); [] when nothing is recorded to compare with."""
    now = train_args.run_identity(args)
    then = run_folder.read_identity(folder, now)
    if then is None and state is not None:
        then = {k: state["args"].get(k) for k in now}
    return [] if then is None else run_folder.identity_changes(then, now)


def _check_identity(args, resume_dir, state, accelerator):
    """A resumed run must be given the arguments that define it: else one line naming the flags
    that differ. --fork may change them: it starts a run of its own."""
    changes = _identity_changes(args, resume_dir.parent, state)
    if changes and args.fork:
        accelerator.print(f"forking {resume_dir} with other arguments (then → now): "
                          f"{run_folder.describe_changes(changes)}")
    elif changes:
        raise ValueError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: {resume_dir.parent} was trained "
                         f"with other arguments (then → now): {run_folder.describe_changes(changes)}; give it its "
                         "own, --fork it into a new --output_dir, or start over with --overwrite_output_dir in place "
                         "of --resume_from_checkpoint")


def _setup_run_folder(args, accelerator):
    """(checkpoint to resume from or None, its training state or None). Holds the folder's lock
    from here to main's end; refuses to mix runs."""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_dir {out}: exists and is not a folder")
    probe_parent = out if out.exists() else next(p for p in out.absolute().parents if p.exists())
    if not probe_parent.is_dir() or not os.access(probe_parent, os.W_OK | os.X_OK):
        raise ValueError(f"--output_dir {out}: {probe_parent} is not writable")
    _lock_run_folder(out, accelerator)
    if not args.resume_from_checkpoint:
        if _holds_run(out) and not args.overwrite_output_dir:
            changes = _identity_changes(args, out)
            if changes:
                raise ValueError(f"{out} already holds a run trained with other arguments (then → now): "
                                 f"{run_folder.describe_changes(changes)}; choose another --output_dir, --fork one "
                                 "of its checkpoints into one, or start over with --overwrite_output_dir")
            raise ValueError(f"{out} already holds a run; choose another --output_dir, pass "
                             "--resume_from_checkpoint latest to continue it, or --overwrite_output_dir")
        return None, None
    resume_dir, warnings = checkpoints.find_resumable(out, args.resume_from_checkpoint)
    for warning in warnings:
        accelerator.print(f"warning: {warning}")
    foreign = resume_dir.resolve().parent != out.resolve()
    if foreign and not args.fork:
        raise ValueError(f"--resume_from_checkpoint {resume_dir} belongs to another run than --output_dir {out}; "
                         "pass --fork to continue it in a new, empty --output_dir")
    if args.fork and out.exists() and any(p.name != run_folder.LOCK_FILE for p in out.iterdir()):
        raise ValueError(f"--fork: --output_dir {out} is not empty")
    state = checkpoints.load_training_state(resume_dir)
    _check_identity(args, resume_dir, state, accelerator)
    return resume_dir, state


def _check_unreadable_share(grid, max_frac, line_budget=280):
    """A folder with more than `max_frac` of its images unreadable stops here, in one line: the
    count, the share and the first files, as many as fit in `line_budget` characters (one at least)."""
    broken = len(grid.unreadable)
    share = broken / (broken + grid.n_images) if broken else 0.0
    if share <= max_frac:
        return
    head = (f"{grid.folder}: {broken} of {broken + grid.n_images} training images ({share:.0%}) unreadable, over "
            f"--max_unreadable_frac {max_frac:g} (a broken download?); first: ")
    names = [f"{Path(grid.unreadable[0][0]).name} ({grid.unreadable[0][1]})"]
    for path, _ in grid.unreadable[1:]:
        if len(head) + len(", ".join(names)) + len(Path(path).name) + 2 > line_budget:
            break
        names.append(Path(path).name)
    raise ValueError(head + ", ".join(names))


def _setup_data(args, accelerator):
    """Grid questions, the holdout split, COCO-Spatial, the ID file's provenance: every data
    problem surfaces here, before the (slow) model load."""
    renderer = grid_sources.renderer_from_args(args, "--train_objects")
    if renderer is None:
        grid = data.GridDataset(args.train_dir, args.train_question_style)
    else:  # the same questions as make_grid_data.py's folder from the same flags; images drawn in the workers
        grid = grid_sources.RenderedGridDataset(renderer, args.train_question_style)
    source = args.train_dir or f"--train_objects {args.train_objects}"
    _check_unreadable_share(grid, args.max_unreadable_frac)
    accelerator.print(grid.report())
    for path, why in grid.unreadable[:UNREADABLE_NAMED]:
        accelerator.print(f"warning: skipped unreadable training image {path} ({why})", file=sys.stderr)
    if len(grid.unreadable) > UNREADABLE_NAMED:
        accelerator.print(f"warning: ... and {len(grid.unreadable) - UNREADABLE_NAMED} more unreadable training "
                          "images", file=sys.stderr)
    train_idx, holdout_idx = data.split_holdout(grid.samples, args.spatial_holdout_frac, args.data_seed)
    if not train_idx:
        raise ValueError(f"{source}: the holdout split left no training samples")
    unreadable = []
    coco = data.load_coco_spatial(args.val_json, args.coco_val_dir, args.question_style, args.eval_max_samples,
                                  unreadable=unreadable, sample_seed=args.eval_sample_seed)
    if not coco:
        raise ValueError(f"{args.val_json}: no COCO-Spatial questions (an empty list?)")
    if unreadable:
        accelerator.print(f"warning: left out {len(unreadable)} COCO-Spatial questions whose image cannot be read: "
                          f"{data.named_problems([(path, why) for _, path, why in unreadable])}", file=sys.stderr)
    if args.universal_id_path:
        if not Path(args.universal_id_path).is_file():
            raise FileNotFoundError(
                f"universal spatial IDs not found: {args.universal_id_path}. Derive them from the model with "
                f"`python derive_spatial_ids.py --model {args.model_name} --images DIR --out {args.universal_id_path}` "
                "(DIR: an extraction set, make_grid_data.py --layout extraction)"
            )
        holdout_pairs = {frozenset((grid.samples[i]["obj1"], grid.samples[i]["obj2"])) for i in holdout_idx}
        for warning in sl.check_provenance(args.universal_id_path, args.model_name, holdout_pairs,
                                           args.allow_holdout_in_ids):
            accelerator.print(f"warning: {warning}")
    holdout = [grid.samples[i] for i in holdout_idx]
    if len(holdout) > args.holdout_max_samples:
        rng = torch.Generator().manual_seed(args.data_seed)
        keep = sorted(torch.randperm(len(holdout), generator=rng)[:args.holdout_max_samples].tolist())
        holdout = [holdout[i] for i in keep]
    sampler = data.make_batch_sampler(args.sampler, grid.samples, train_idx, args.batch_size, args.seed)
    sampler.shard(accelerator.num_processes, accelerator.process_index)
    if len(sampler) == 0:
        raise ValueError(f"{source}: no training batch of >= 2 questions for each of "
                         f"{accelerator.num_processes} process(es) (groups too small for --batch_size {args.batch_size}?)")
    return grid, coco, holdout, train_idx, holdout_idx, sampler


def _check_model_and_ids(args, grid):
    """The model's config and the ID file, both read before the (slow) weights: a model that
    cannot be had, a folder without complete weights, a layer the model lacks and every problem of
    the ID file stop here. Returns (the checked models.ModelSource, which the load takes as it is;
    the IDs of --spatial_id_layer, None without the spatial loss)."""
    try:
        source = model_source(args.model_name)
    except ModelUnavailableError as err:
        raise ValueError(f"--model_name {err}") from None
    if not args.universal_id_path:
        return source, None
    n_layers = source.config.get_text_config().num_hidden_layers
    if args.spatial_id_layer > n_layers:
        raise ValueError(f"--spatial_id_layer {args.spatial_id_layer} is outside 0..{n_layers} for {args.model_name}")
    needed = {(*s["cell2"], s["size"]) for s in grid.samples}
    return source, sl.load_universal_ids(args.universal_id_path, args.spatial_id_layer,
                                         source.adapter.lm_hidden_size(source.config), needed_keys=needed)


def _setup_model(args, accelerator, resume_dir, source):
    """(model, processor, adapter, selection): the base model (`source`, checked by
    _check_model_and_ids) with the trainable slice chosen and, when resuming, the checkpoint's
    trained tensors applied."""
    dtype = speedups.weights_dtype(args.bf16, accelerator.device)
    accelerator.print(f"model: {args.model_name} in {str(dtype).removeprefix('torch.')} on {accelerator.device}"
                      + (" (--bf16 applies on CUDA only)" if args.bf16 and dtype != torch.bfloat16 else ""))
    model, processor, adapter = load_model_and_processor(args.model_name, dtype=dtype, device=accelerator.device,
                                                         source=source)
    adapter.image_budget(processor, args.max_pixels)  # --max_pixels (eval_coco.py's image budget)
    selection = param_selectors.select_from_args(model, adapter, args)
    accelerator.print(selection.summary())
    if resume_dir is not None:
        tensors = checkpoints.read_trainable(resume_dir)
        checkpoints.apply_trainable(model, {k: v for k, v in tensors.items()
                                            if not k.startswith(checkpoints.SPATIAL_HEAD_PREFIX)}, source=str(resume_dir))
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model, processor, adapter, selection


def _setup_spatial_loss(args, ids, accelerator, resume_dir, model):
    """The loss over `ids` (checked before the model loaded; see _check_model_and_ids)."""
    if ids is None:
        return None
    spatial_loss = sl.SpatialIDLoss(ids, head=args.spatial_head).to(accelerator.device)
    if resume_dir is not None:
        head = {k: v for k, v in checkpoints.read_trainable(resume_dir).items()
                if k.startswith(checkpoints.SPATIAL_HEAD_PREFIX)}
        if head:
            checkpoints.apply_trainable(model, head, spatial_loss, source=str(resume_dir))
    accelerator.print(f"spatial loss: layer {args.spatial_id_layer}, weight {args.spatial_id_weight}, "
                      f"{len(ids)} IDs from {args.universal_id_path}")
    return spatial_loss


def _setup_optimizer(args, model, spatial_loss, total_steps):
    params = [p for p in model.parameters() if p.requires_grad]
    if spatial_loss is not None:
        params += [p for p in spatial_loss.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, math.ceil(args.warmup_frac * total_steps),
                                                             total_steps)
    return params, optimizer, scheduler


def _start_metrics(args, out, config, progress, resume_dir):
    """config.json and metrics.jsonl: fresh, or the history up to the resumed checkpoint (what came
    after it is about to be redone). Returns the open metrics file."""
    for stale in out.glob(".*.tmp*"):  # what a run killed while saving left behind
        shutil.rmtree(stale, ignore_errors=True)
    if resume_dir is None:
        for stale in [p for _, p in checkpoints.list_checkpoints(out)] + [out / "final", out / "predictions"]:
            shutil.rmtree(stale, ignore_errors=True)  # --overwrite_output_dir: nothing of the old run stays
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
        run_folder.write_identity(out, train_args.run_identity(args))
        return (out / "metrics.jsonl").open("w")
    source = resume_dir.parent
    history = [line for line in (source / "metrics.jsonl").read_text().splitlines() if line.strip()]
    kept = [line for line in history if json.loads(line)["event"] != "end" and json.loads(line)["step"] <= progress.step]
    if (source / "config.json").exists():
        config = json.loads((source / "config.json").read_text())  # the run's identity stays its own
    resumed = {"from": str(resume_dir), "step": progress.step, **run_metadata()}
    config.setdefault("resumed", []).append(resumed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    run_folder.write_identity(out, train_args.run_identity(args))  # checked equal, or a --fork's own
    metrics = (out / "metrics.jsonl").open("w")
    metrics.write("".join(line + "\n" for line in kept))
    return metrics


def _scalars(event):
    """{name: number} of a metrics event, for TensorBoard / W&B."""
    if event["event"] == "train":
        return {f"train/{k}": event[k] for k in ("loss", "lm_loss", "spatial_loss", "lr", "grad_norm") if k in event}
    if event["event"] == "eval":
        out = {}
        for name in ("coco", "holdout", *benchmarks.NAMES):
            if name in event:
                out[f"eval/{name}_accuracy"] = event[name]["accuracy"]
                out.update({f"eval/{name}_{rel}": r["accuracy"] for rel, r in event[name]["per_relation"].items()})
        return out
    return {}


def _setup_reporter(args, out, config):
    """A function that mirrors each event's scalars to --report_to, or None."""
    if args.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))

        def report(event):
            for name, value in _scalars(event).items():
                writer.add_scalar(name, value, event["step"])
            writer.flush()
        return report
    if args.report_to == "wandb":
        import wandb

        wandb.init(project="spatial-finetuning", name=out.name, dir=str(out), config=config)
        return lambda event: wandb.log(_scalars(event), step=event["step"]) if _scalars(event) else None
    return None


# ---------------------------------------------------------------------------------------------
# One step of work
# ---------------------------------------------------------------------------------------------

def _loss_step(forward_model, model, adapter, batch, spatial_loss, args, device):
    """(total loss, LM loss, spatial loss or None) of one micro-batch. The LM head runs only where
    a label is set (lm_loss.py): full-vocabulary logits at every position were most of a step's
    time and memory."""
    inputs, target_positions, cells = data.split_batch(batch, device)
    if spatial_loss is None:
        lm = supervised_lm_loss(forward_model, adapter, inputs).loss
        return args.lm_loss_weight * lm, lm, None
    with sl.capture_layer(model, adapter, args.spatial_id_layer) as captured:
        lm = supervised_lm_loss(forward_model, adapter, inputs).loss
    aux = spatial_loss(sl.gather_target_states(captured.states, target_positions), cells)
    return args.lm_loss_weight * lm + args.spatial_id_weight * aux, lm, aux


def make_loader(grid, batch_sampler, processor, adapter, args, device_type, processes=1):
    """(the training DataLoader, its settings for config.json): workers collate (and draw images on
    the fly) with speedups.loader_settings' defaults, pinned memory on CUDA; they ignore the stop
    signals, which are the main process's (checkpoints.StopRequest)."""
    settings = speedups.loader_settings(device_type, args.num_workers, processes)
    collate = data.VLMCollator(processor, adapter, skip_unreadable=True, encode_images_once=args.encode_images_once)
    loader = torch.utils.data.DataLoader(grid, batch_sampler=batch_sampler, collate_fn=collate, **settings,
                                         worker_init_fn=checkpoints.ignore_stop_signals)
    return loader, settings


def _weights_in_sync(params, accelerator):
    """True when every process holds the same trained tensors (a cheap checksum per tensor)."""
    sums = [float(p.detach().double().sum()) for p in params]
    return all(other == sums for other in gather_object([sums]))




# ---------------------------------------------------------------------------------------------
# The run's shared state, and the steps main calls with it
# ---------------------------------------------------------------------------------------------

EVAL_SPLIT_TITLES = {"coco": "COCO-Spatial", "holdout": "holdout pairs"}  # the rest of eval_sets: benchmark names


@dataclass
class TrainingRun:
    """What the steps of a run share once main has set it up."""
    args: argparse.Namespace
    accelerator: Accelerator
    out: Path
    model: torch.nn.Module
    processor: object
    adapter: object
    spatial_loss: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    progress: Progress
    total_steps: int
    eval_sets: dict  # {"coco": samples, "holdout": samples, benchmark name: samples, ...}, evaluated in this order
    stop: checkpoints.StopRequest
    command: str  # how this run was started, for the model card
    metrics: object = None  # the open metrics.jsonl (main process only)
    reporter: object = None  # mirrors events to --report_to (main process only)
    saved_steps: set = field(default_factory=set)  # steps whose checkpoint-N this run folder holds

    def log(self, event):
        if self.accelerator.is_main_process:
            self.metrics.write(json.dumps(event) + "\n")
            self.metrics.flush()
            if self.reporter is not None:
                self.reporter(event)


class TrainWindow:
    """The losses and wall time of the optimizer steps since the last `train` event (the loader's
    waits included, evaluation and checkpoints not): train.py's own throughput, against
    bench/full_size_step.py's step."""

    def __init__(self):
        self.losses = {"loss": [], "lm_loss": [], "spatial_loss": []}
        self.restart_clock()

    def restart_clock(self):
        self.start, self.steps = time.perf_counter(), 0

    def add(self, loss, lm_loss, aux):
        self.losses["loss"].append(loss.item())
        self.losses["lm_loss"].append(lm_loss.item())
        if aux is not None:
            self.losses["spatial_loss"].append(aux.item())

    def close(self):
        """{mean loss per kind, seconds_per_step}; starts the next window."""
        means = {k: sum(v) / len(v) for k, v in self.losses.items() if v}
        means["seconds_per_step"] = (time.perf_counter() - self.start) / max(self.steps, 1)
        self.__init__()
        return means


def _setup_accelerator():
    # Unused-parameter handling: a selected block whose output the LM never reads (LLaVA's last
    # vision block under --protocol paper) gets no gradient, which plain DDP treats as an error.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        sys.exit(f"error: train.py trains data-parallel (DDP), not {accelerator.distributed_type.name}: the trained "
                 "slice is small, so sharding its optimizer state saves nothing, and every model here fits one "
                 "GPU in bf16. Launch with a MULTI_GPU config (configs/accelerate/) or torchrun")
    return accelerator


def _setup_speedups(args, model, adapter, accelerator):
    speed = {"encode_images_once": args.encode_images_once,
             **speedups.compile_blocks(model, adapter, args.compile_blocks)}
    if args.liger_kernel:
        speed.update(speedups.apply_liger(model, accelerator.device))
    return speed


def _run_config(args, grid, train_idx, holdout_idx, selection, plan, speed, loader_settings):
    """config.json's content: the arguments, the resolved protocol, what produced the run, the plan
    (`plan`: processes, total and per-epoch steps) and what it trains on."""
    return {"args": vars(args), "protocol": args.protocol, "protocol_choices": args.protocol_choices,
            **run_metadata(), **plan, "selected_parameters": selection.names,
            "selected_count": selection.selected_params, "total_parameters": selection.total_params,
            "train_images": args.train_dir or grid.folder,
            "train_questions": len(train_idx), "holdout_questions": len(holdout_idx),
            "speedups": speed, "loader": loader_settings,
            "holdout_pairs": sorted({" | ".join(sorted((grid.samples[i]["obj1"], grid.samples[i]["obj2"])))
                                     for i in holdout_idx})}


def _stop_requested(stop, accelerator):
    """True on every process once any of them got a stop signal (SIGTERM, SIGUSR1): the flag is
    summed across processes after each optimizer step, so that all of them stop after the same one."""
    if accelerator.num_processes == 1:
        return stop.requested()
    flag = torch.tensor([float(stop.requested())], device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() > 0


def _image_share(samples, processes, index):
    """The indices of `samples` that process `index` evaluates: every `processes`-th image in order
    of first appearance, with all of its questions, so that an image is encoded once and the
    swapped and rotated twins evaluate_benchmark derives from a question stay with it. A question
    without an image path (an image given as bytes) counts as an image of its own."""
    first = {}
    keys = [str(s["image_path"]) if s.get("image_path") else ("row", i) for i, s in enumerate(samples)]
    return [i for i, key in enumerate(keys) if first.setdefault(key, len(first)) % processes == index]


def _evaluate_split(run, name, samples, desc):
    """(report, rows) of one evaluation set, each process answering its share (COCO-Spatial and the
    holdout: every N-th question; a benchmark: every N-th image, see _image_share); the rows are
    gathered and the report built from all of them on every process, as one process would.

    A stop request is read between batches, on each process alone; the processes then agree in the
    one gather every set ends with, so all of them raise EvaluationInterrupted after the same set
    and none waits in a collective the others never reach."""
    args, accelerator = run.args, run.accelerator
    processes, benchmark = accelerator.num_processes, name not in EVAL_SPLIT_TITLES
    mine = (_image_share(samples, processes, accelerator.process_index) if benchmark
            else list(range(accelerator.process_index, len(samples), processes)))
    share = [samples[i] for i in mine]
    try:
        if benchmark:
            report, rows = evaluate_benchmark(run.model, run.processor, run.adapter, share, args.eval_batch_size,
                                              args.eval_mode, consistency=args.consistency,
                                              option_orders=args.option_orders,
                                              parsing=parsing_for(name, args.protocol),
                                              progress=accelerator.is_main_process, desc=desc,
                                              mirror=args.mirror, should_stop=run.stop.requested)
        else:
            report, rows = evaluate(run.model, run.processor, run.adapter, share, args.eval_batch_size,
                                    args.eval_mode, progress=accelerator.is_main_process, desc=desc,
                                    should_stop=run.stop.requested)
    except EvaluationInterrupted:
        if processes == 1:
            raise
        report, rows = None, None
    if processes == 1:
        return report, rows
    shares = gather_object([(mine, rows)])  # [(indices, rows) of each process]
    if any(share_rows is None for _, share_rows in shares):
        raise EvaluationInterrupted(f"{desc}: a process was asked to stop")
    if benchmark:  # the questions each process asked, in the order of its rows
        questions = [q for idx, _ in shares for q in benchmarks.with_checks([samples[i] for i in idx], args.consistency,
                                                                           args.option_orders, args.mirror)]
        rows = [row for _, share_rows in shares for row in share_rows]
        gathered = benchmark_report(questions, rows)
    else:
        by_index = sorted(((i, row) for idx, share_rows in shares for i, row in zip(idx, share_rows)),
                          key=lambda pair: pair[0])
        rows = [row for _, row in by_index]
        gathered = scoring.report_from_rows(samples, rows)
    if "option_forms" in report:  # one tokenizer for all processes: the forms this one scored
        gathered["option_forms"] = report["option_forms"]
    return gathered, rows


def _evaluate(run, step):
    """The `eval` event of `step` (every set of run.eval_sets) and predictions/step-N.jsonl; the
    model is back in training mode after it. EvaluationInterrupted leaves nothing written."""
    event, rows = {"event": "eval", "step": step}, []
    for name, samples in run.eval_sets.items():
        if not samples:
            continue
        title = EVAL_SPLIT_TITLES.get(name, name)
        report, set_rows = _evaluate_split(run, name, samples, desc=f"{title} @{step}")
        event[name] = report
        rows += [dict(r, set=name) for r in set_rows]
        line = format_report(report, title) if name in EVAL_SPLIT_TITLES else format_benchmark_report(report)
        run.accelerator.print(f"step {step} {line}")
    if run.accelerator.is_main_process:
        write_jsonl(run.out / "predictions" / f"step-{step}.jsonl", rows)
    run.progress.last_eval = event
    run.model.train()
    return event


def _model_card(run, step):
    """The model card of the model at `step` (main process: it reads the run folder's files)."""
    events = [json.loads(line) for line in (run.out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return checkpoints.model_card(json.loads((run.out / "config.json").read_text()),
                                  [e for e in events if e["event"] == "eval"], step, run.command)


def _save_checkpoint(run, step):
    """checkpoint-N of `step`: the trained tensors and the training state (main process), rotation,
    a `checkpoint` event; every process waits for it."""
    args, progress = run.args, run.progress
    run.saved_steps.add(step)
    state = training_state(args, progress, run.optimizer, run.scheduler, run.accelerator)
    if run.accelerator.is_main_process:
        folder = run.out / f"checkpoint-{step}"
        info = {"base_model": args.model_name, "step": step,
                "coco_accuracy": progress.last_eval.get("coco", {}).get("accuracy")
                if progress.last_eval.get("step") == step else None}
        checkpoints.save_checkpoint(folder, run.model, run.processor, run.adapter, state, info, run.spatial_loss,
                                    full=args.save_full_checkpoints,
                                    card=_model_card(run, step) if args.save_full_checkpoints else None)
        for deleted in checkpoints.rotate(run.out, args.save_total_limit, args.keep_best):
            run.accelerator.print(f"removed {deleted} (--save_total_limit {args.save_total_limit})")
        run.log({"event": "checkpoint", "step": step, "checkpoint": str(folder)})
    run.accelerator.wait_for_everyone()


def _evaluate_and_save_as_scheduled(run, step, resumed=False):
    """The schedule at `step` (0, after an optimizer step, or the step a run resumes at): evaluate
    every --eval_save_steps and checkpoint every --save_steps, both before the last step (_finish
    does that one). At a resumed step only an evaluation still missing (one a stop interrupted)
    runs, and its checkpoint is written again to record it. Returns whether anything ran."""
    args, progress = run.args, run.progress
    if step >= run.total_steps:
        return False
    evaluated = step % args.eval_save_steps == 0 and progress.last_eval.get("step") != step
    if evaluated:
        run.log(_evaluate(run, step))
    saving = step % args.save_steps == 0 and (evaluated or not (resumed or step in run.saved_steps))
    if saving:
        _save_checkpoint(run, step)
    return evaluated or saving


def _optimizer_step(run, params):
    """Clip, step (unless no gradient is finite: then skipped, and counted), zero; returns the
    gradient norm."""
    progress = run.progress
    grad_norm = run.accelerator.clip_grad_norm_(params, run.args.max_grad_norm)
    if torch.isfinite(grad_norm):
        run.optimizer.step()
        run.scheduler.step()
        progress.optimizer_steps += 1
    else:
        progress.skipped_steps += 1
    run.optimizer.zero_grad(set_to_none=True)
    progress.step += 1
    return grad_norm


def _log_train(run, window, grad_norm, params):
    """A `train` event every --log_every steps and at the last: the window's mean losses and the
    counters (and whether the processes' weights agree)."""
    progress = run.progress
    if progress.step % run.args.log_every and progress.step != run.total_steps:
        return
    event = {"event": "train", "step": progress.step, "epoch": progress.epoch, "lr": run.scheduler.get_last_lr()[0],
             "grad_norm": float(grad_norm), "optimizer_steps": progress.optimizer_steps,
             "skipped_steps": progress.skipped_steps, "nonfinite_losses": progress.nonfinite_losses,
             "unreadable_images": progress.unreadable_images, **window.close()}
    if run.accelerator.num_processes > 1:
        event["weights_in_sync"] = _weights_in_sync(params, run.accelerator)
    run.log(event)


def _stop_for_resume(run):
    """A stop was requested: checkpoint this step (unless it is saved), log `preempted` (an
    interrupted evaluation stays unlogged, so the resume redoes it) and exit PREEMPTED_EXIT_CODE."""
    step, signal_name = run.progress.step, run.stop.signal or "another process's"
    if step not in run.saved_steps:
        _save_checkpoint(run, step)
    run.log({"event": "preempted", "step": step, "signal": signal_name, "exit_code": checkpoints.PREEMPTED_EXIT_CODE})
    if run.accelerator.is_main_process:
        run.metrics.close()
    run.accelerator.print(f"preempted ({run.stop.signal or 'another process'}): stopped after step {step}, saved "
                          f"{run.out / f'checkpoint-{step}'}; continue with --resume_from_checkpoint latest")
    run.stop.restore()
    run.accelerator.wait_for_everyone()
    raise SystemExit(checkpoints.PREEMPTED_EXIT_CODE)


def _finish(run, speed):
    """The last step's evaluation and checkpoint, then (unless a stop came meanwhile: _stop_for_resume)
    final/ and the `end` event, whose summary it returns."""
    args, progress = run.args, run.progress
    evaluated = progress.last_eval.get("step") != progress.step
    if evaluated:
        run.log(_evaluate(run, progress.step))
    if evaluated or progress.step not in run.saved_steps:
        _save_checkpoint(run, progress.step)
    if _stop_requested(run.stop, run.accelerator):
        _stop_for_resume(run)  # final/ comes from this checkpoint on resume
    run.stop.restore()
    if run.accelerator.is_main_process:
        if args.merge_lora:
            merge_lora(run.model)  # after the last checkpoint: final/ becomes a plain full model
        checkpoints.save_final(run.out / "final", run.model, run.processor, run.adapter,
                               card=_model_card(run, progress.step))
    summary = {"event": "end", "step": progress.step, "speedups": speed, "optimizer_steps": progress.optimizer_steps,
               "skipped_steps": progress.skipped_steps, "nonfinite_losses": progress.nonfinite_losses,
               "unreadable_images": progress.unreadable_images,
               "scheduler_steps": run.scheduler.last_epoch, "coco_accuracy": progress.last_eval["coco"]["accuracy"],
               "holdout_accuracy": progress.last_eval.get("holdout", {}).get("accuracy")}
    run.log(summary)
    if run.accelerator.is_main_process:
        run.metrics.close()
    run.accelerator.print(f"done: {progress.step} steps, {progress.optimizer_steps} optimizer updates "
                          f"({progress.skipped_steps} skipped: no finite gradient; {progress.nonfinite_losses} "
                          f"micro-batches with a non-finite loss; {progress.unreadable_images} unreadable training "
                          f"images left out); run folder {run.out}")
    run.accelerator.wait_for_everyone()
    return summary


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

@_releases_run_lock
def main(argv=None):
    args = parse_args(argv)
    accelerator = _setup_accelerator()
    is_main, processes = accelerator.is_main_process, accelerator.num_processes
    set_seed(args.seed)

    # 1. run folder and resume point, 2. data: every input problem stops us here, before the model
    try:
        resume_dir, state = _setup_run_folder(args, accelerator)
        grid, coco, holdout, train_idx, holdout_idx, batch_sampler = _setup_data(args, accelerator)
        source, ids = _check_model_and_ids(args, grid)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    # --eval_benchmarks: every file checked now (one line per missing one), before the model loads
    benchmark_sets = load_benchmarks(benchmarks.resolve_names(args.eval_benchmarks), args) if args.eval_benchmarks else {}
    steps_per_epoch = math.ceil(len(batch_sampler) / args.grad_accum)
    total_steps = min(steps_per_epoch * args.epochs, args.max_steps or math.inf)
    accelerator.print(f"train: {len(train_idx)} questions in {len(batch_sampler) * processes} batches/epoch "
                      f"({processes} process(es) x {len(batch_sampler)}); holdout: {len(holdout_idx)} questions "
                      f"({len(holdout)} evaluated); COCO-Spatial: {len(coco)}; {total_steps} optimizer steps")

    # 3. model and trainable slice, 4. spatial loss, 5. optimiser, schedule and speed-ups
    try:
        model, processor, adapter, selection = _setup_model(args, accelerator, resume_dir, source)
        spatial_loss = _setup_spatial_loss(args, ids, accelerator, resume_dir, model)
    except (ValueError, ModelUnavailableError) as err:
        sys.exit(f"error: {err}")
    params, optimizer, scheduler = _setup_optimizer(args, model, spatial_loss, total_steps)
    progress = Progress(unreadable_images=len(grid.unreadable))
    if state is not None:
        progress = restore_training_state(state, optimizer, scheduler, accelerator)
    speed = _setup_speedups(args, model, adapter, accelerator)
    forward_model = accelerator.prepare(model) if processes > 1 else model
    loader, loader_settings = make_loader(grid, batch_sampler, processor, adapter, args, accelerator.device.type,
                                          processes)

    # 6. run folder files (main process only). From here a stop signal (preemption, time limit)
    # ends the run at the next safe point: after an optimizer step, or between two evaluation
    # batches; it then saves this step and exits PREEMPTED_EXIT_CODE (_stop_for_resume).
    plan = {"num_processes": processes, "total_steps": total_steps, "steps_per_epoch": steps_per_epoch}
    config = _run_config(args, grid, train_idx, holdout_idx, selection, plan, speed, loader_settings)
    out = Path(args.output_dir)
    run = TrainingRun(args, accelerator, out, model, processor, adapter, spatial_loss, optimizer, scheduler,
                      progress, total_steps, {"coco": coco, "holdout": holdout, **benchmark_sets},
                      checkpoints.StopRequest(), "python train.py " + shlex.join(sys.argv[1:] if argv is None else argv),
                      _start_metrics(args, out, config, progress, resume_dir) if is_main else None,
                      _setup_reporter(args, out, config) if is_main else None)
    if state is not None:
        accelerator.print(f"resuming from {resume_dir}: step {progress.step}, epoch {progress.epoch}, "
                          f"{progress.batches_done} batches into it")

    # 7. evaluate before training (or what a stop interrupted at the resumed step), 8. the loop:
    # micro-batches -> one optimizer step -> log / evaluate / save -> stop?
    try:
        _evaluate_and_save_as_scheduled(run, progress.step, resumed=state is not None)
        model.train()
        window, micro, stopped = TrainWindow(), 0, False
        bar = tqdm(total=total_steps, initial=progress.step, desc="train", disable=not is_main, dynamic_ncols=True,
                   mininterval=1 if sys.stderr.isatty() else 30)  # a log file gets a line every 30 s
        for epoch in range(progress.epoch, args.epochs):
            if progress.step >= total_steps or stopped:
                break
            first = progress.batches_done if epoch == progress.epoch else 0  # global batches already trained
            batch_sampler.set_epoch(epoch, skip=first)
            local_batches = len(batch_sampler)
            for b, batch in enumerate(loader):
                if micro == 0:  # the epoch's last step may gather fewer micro-batches
                    accum_n = min(args.grad_accum, local_batches - b)
                for path in batch.pop("unreadable_images", []):
                    progress.unreadable_images += 1
                    print(f"warning: skipped unreadable training image {path}", file=sys.stderr)
                micro += 1
                sync = (contextlib.nullcontext() if micro == accum_n or processes == 1
                        else accelerator.no_sync(forward_model))
                with sync:
                    loss, lm_loss, aux = _loss_step(forward_model, model, adapter, batch, spatial_loss, args,
                                                    accelerator.device)
                    # Backward even when the loss is not finite, so that every process joins the
                    # gradient exchange; the step is then skipped below on all of them alike.
                    accelerator.backward(loss / accum_n)
                if torch.isfinite(loss):
                    window.add(loss, lm_loss, aux)
                else:
                    progress.nonfinite_losses += 1
                if micro < accum_n:
                    continue

                grad_norm, micro = _optimizer_step(run, params), 0
                progress.epoch, progress.batches_done = epoch, first + (b + 1) * processes
                window.steps += 1
                bar.update(1)
                if window.losses["loss"]:
                    bar.set_postfix(loss=f"{window.losses['loss'][-1]:.4f}")
                _log_train(run, window, grad_norm, params)
                if _evaluate_and_save_as_scheduled(run, progress.step):
                    window.restart_clock()
                stopped = _stop_requested(run.stop, accelerator)
                if progress.step >= total_steps or stopped:
                    break
        bar.close()
        if stopped:
            _stop_for_resume(run)
        # 9. final evaluation, checkpoint and model
        return _finish(run, speed)
    except EvaluationInterrupted:
        _stop_for_resume(run)
    finally:
        run.stop.restore()


if __name__ == "__main__":
    try:
        try:
            main()
        except (FileNotFoundError, ModelUnavailableError) as err:  # user-facing: no traceback
            sys.exit(f"error: {err}")
    except SystemExit as stop:
        if isinstance(stop.code, str):
            # One write for the message and its newline: under torchrun every process may refuse
            # at once, and the interpreter writes the two apart, so the lines would run together.
            sys.stderr.write(stop.code + "\n")
            sys.stderr.flush()
            raise SystemExit(1) from None
        raise
