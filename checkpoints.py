"""Checkpoints: what a run keeps, written so that a kill at any moment leaves nothing half-made.

    checkpoint-N/                      (at each evaluation)
      trainable.safetensors            the trained tensors, by parameter name (the selected slice,
                                       and the spatial head's weights when there is one)
      training_state.pt                optimizer, schedule, progress, RNG, arguments (resume)
      checkpoint.json                  base model, step, tensor names, COCO accuracy
      model.safetensors, config.json,  only with --save_full_checkpoints: the whole model and
      processor files, README.md       processor (from_pretrained loads it) and its model card
    final/                             the whole model and processor, README.md (the model card)

A checkpoint is written into a hidden temporary folder and renamed into place, so a
`checkpoint-N/` folder always holds a complete checkpoint; one damaged later (a truncated file)
is skipped, by name, when resuming from `latest`. Files are 0644 and folders 0755 whatever the
umask, so a run can be read by the rest of a group.

Preemption: a cluster that is about to stop a job sends SIGTERM (SLURM's preemption and time
limit) or the signal the job asked for (`sbatch --signal=USR1@90`). `StopRequest` turns either into
a flag that the loop reads after each optimizer step and the evaluation before each batch; the run
then saves a checkpoint, logs a `preempted` event and exits with PREEMPTED_EXIT_CODE, and
`--resume_from_checkpoint latest` continues it exactly (an interrupted evaluation is redone).
"""
import contextlib
import json
import os
import shutil
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import models
from run_folder import PREEMPTED_EXIT_CODE, STOP_SIGNALS, list_checkpoints  # noqa: F401 (torch-free, in run_folder)

CHECKPOINT_JSON = "checkpoint.json"
TRAINABLE = "trainable.safetensors"
TRAINING_STATE = "training_state.pt"
MODEL_CARD = "README.md"  # the Hugging Face model-card convention: YAML front matter, then Markdown
SPATIAL_HEAD_PREFIX = "spatial_loss."  # tensors of the spatial loss's head in trainable.safetensors


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names it."""



class StopRequest:
    """Remembers that SIGTERM or SIGUSR1 arrived (`.signal`: its name, None until then) instead of
    dying at once; the run decides when to stop (after the current optimizer step, or before the
    next evaluation batch). `restore()` puts the previous handlers back."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signal = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def requested(self):
        """Whether a stop signal has arrived (in this process)."""
        return self.signal is not None

    def _handle(self, signum, frame):
        self.signal = self.signal or signal.Signals(signum).name

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def ignore_stop_signals(worker_id=None):
    """DataLoader workers' init: a cluster signals every process of a job, and a worker killed by
    it would end the run before its main process could save; the main process stops them."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _publish(folder):
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)


@contextlib.contextmanager
def atomic_folder(target):
    """Yield a temporary folder beside `target`; on success make it `target` (replacing an older
    one), on failure remove it. Nothing else ever sees a half-written `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _publish(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old{os.getpid()}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_model(folder, model, processor, adapter, card=None):
    """The whole model and processor, loadable with from_pretrained (and AutoProcessor where the
    family's standard processor class can be built), and its model card when given."""
    model.save_pretrained(folder)
    if hasattr(adapter, "save_processor"):
        adapter.save_processor(processor, folder)
    else:
        processor.save_pretrained(folder)
    if card:
        (Path(folder) / MODEL_CARD).write_text(card)


def trainable_tensors(model, spatial_loss=None):
    """{name: tensor} of everything that trains: the model's selected parameters and the spatial
    loss's learned head, if any."""
    tensors = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if spatial_loss is not None:
        tensors.update({SPATIAL_HEAD_PREFIX + name: p.detach() for name, p in spatial_loss.named_parameters()})
    return tensors


def save_checkpoint(folder, model, processor, adapter, state, info, spatial_loss=None, full=False, card=None):
    """Write one checkpoint atomically (see the module docstring). `state` goes to
    training_state.pt, `info` (JSON) to checkpoint.json, which is written last; a full checkpoint
    also gets `card` (model_card's text) as README.md."""
    with atomic_folder(folder) as tmp:
        tensors = {k: v.contiguous().cpu() for k, v in trainable_tensors(model, spatial_loss).items()}
        save_file(tensors, str(tmp / TRAINABLE))
        torch.save(state, tmp / TRAINING_STATE)
        if full:
            save_model(tmp, model, processor, adapter, card)
        (tmp / CHECKPOINT_JSON).write_text(json.dumps({**info, "tensors": sorted(tensors), "full": full},
                                                      indent=2, default=str))
    return Path(folder)


def save_final(folder, model, processor, adapter, card=None):
    with atomic_folder(folder) as tmp:
        save_model(tmp, model, processor, adapter, card)
    return Path(folder)


def _accuracy(event, name):
    report = event.get(name)
    if not report:
        return "-"
    return f"{report['accuracy']:.3f} ({report['correct']}/{report['n']})"


def model_card(config, evals, step, command):
    """A Hugging Face model card (README.md) for the model a run holds at `step`: YAML front matter
    (base_model, library_name, tags), then the base model, the method and protocol, the trained
    tensors, the data, accuracy at every evaluation up to `step`, the command and the git commit.
    `config` is the run's config.json content, `evals` its metrics.jsonl eval events."""
    args = config["args"]
    base = models.resolve_model_name(args["model_name"])
    spatial = bool(args.get("universal_id_path"))
    evals = [e for e in evals if e["step"] <= step]
    last = evals[-1] if evals else {}
    tags = ["vision-language", "spatial-reasoning", "spatial-finetuning", f"protocol-{config['protocol']}",
            "spatial-id-loss" if spatial else "lm-loss-baseline"]
    lines = ["---", f"base_model: {json.dumps(base)}", "library_name: transformers",
             "pipeline_tag: image-text-to-text", "tags:", *[f"- {tag}" for tag in tags], "---", "",
             f"# {Path(args['output_dir']).name} (step {step})", "",
             f"`{base}` finetuned on synthetic two-object grid questions (a reproduction of Kang et al., ICLR 2026, "
             "*Linear Mechanisms for Spatiotemporal Reasoning in Vision Language Models*).", "",
             "## Final accuracy", "",
             f"At step {last.get('step', '-')}: COCO-Spatial {_accuracy(last, 'coco')}, held-out object pairs "
             f"{_accuracy(last, 'holdout')}.", "",
             "## Method", "",
             f"- base model: `{base}` (`--model_name {args['model_name']}`)",
             f"- protocol: `{config['protocol']}`; resolved choices: "
             + ", ".join(f"{k} = {v}" for k, v in config.get("protocol_choices", {}).items())]
    if spatial:
        lines.append(f"- loss: LM loss on the answer (weight {args['lm_loss_weight']}) + spatial-ID loss (weight "
                     f"{args['spatial_id_weight']}) at LM layer {args['spatial_id_layer']}, IDs from "
                     f"`{args['universal_id_path']}`")
    else:
        lines.append(f"- loss: LM loss on the answer only (the paper's control arm, weight {args['lm_loss_weight']})")
    lines += [f"- optimiser: AdamW, lr {args['lr']}, weight decay {args['weight_decay']}, batch {args['batch_size']} "
              f"x {args['grad_accum']} accumulation x {config.get('num_processes', 1)} process(es), "
              f"{config.get('total_steps')} steps planned, seed {args['seed']} (data seed {args['data_seed']})", "",
              "## Trained tensors", "",
              f"{len(config['selected_parameters'])} tensors, {config['selected_count']:,} of "
              f"{config['total_parameters']:,} parameters (`--selector {args.get('selector')}`); all others frozen:", "",
              *[f"- `{name}`" for name in config["selected_parameters"]], "",
              "## Data", "",
              f"- training images: {config.get('train_images', args.get('train_dir'))}",
              f"- {config['train_questions']} training questions; held out: {config['holdout_questions']} questions "
              f"of the pairs {', '.join(config['holdout_pairs']) or '-'}",
              f"- COCO-Spatial: `{args['val_json']}` with images in `{args['coco_val_dir']}`"
              + (" (a synthetic STAND-IN, not COCO-Spatial)" if "standin" in str(args["val_json"]) else ""), "",
              "## Evaluation", "",
              f"`--eval_mode {args['eval_mode']}`.", "",
              "| step | COCO-Spatial | held-out pairs |", "|---|---|---|",
              *[f"| {e['step']} | {_accuracy(e, 'coco')} | {_accuracy(e, 'holdout')} |" for e in evals], "",
              "## Reproduce", "",
              "```bash", command, "```", "",
              f"git commit `{config.get('git_commit') or 'unknown'}`" + (" (with uncommitted changes)" if config.get("git_dirty") else "")
              + "; versions: " + ", ".join(f"{k} {v}" for k, v in config.get("versions", {}).items()) + ".", ""]
    return "\n".join(lines)


def read_info(folder):
    path = Path(folder) / CHECKPOINT_JSON
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder}: not a usable checkpoint ({CHECKPOINT_JSON}: {err})") from None


def load_training_state(folder):
    path = Path(folder) / TRAINING_STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {TRAINING_STATE} (not a train.py checkpoint)") from None
    except Exception as err:  # truncated or corrupt: torch raises several types
        raise CheckpointError(f"{path}: unreadable ({str(err).splitlines()[0]})") from None


def read_trainable(folder):
    path = Path(folder) / TRAINABLE
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {TRAINABLE}") from None
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable ({str(err).splitlines()[0]})") from None


def check_checkpoint(folder):
    """Raise CheckpointError unless every file of the checkpoint reads back."""
    read_info(folder)
    load_training_state(folder)
    read_trainable(folder)


def find_resumable(out, spec):
    """(checkpoint folder, warnings): `spec` itself, or with "latest" the newest checkpoint in `out`
    that reads back, damaged ones skipped and named."""
    if spec != "latest":
        check_checkpoint(spec)
        return Path(spec), []
    warnings = []
    for _, folder in reversed(list_checkpoints(out)):
        try:
            check_checkpoint(folder)
            return folder, warnings
        except CheckpointError as err:
            warnings.append(f"skipping damaged checkpoint {err}")
    raise CheckpointError(f"--resume_from_checkpoint latest: no complete checkpoint-N in {out}"
                          + (f" ({len(warnings)} damaged)" if warnings else ""))


def apply_trainable(model, tensors, spatial_loss=None, source=""):
    """Copy saved tensors into the model (and the spatial head) by name; every name must exist."""
    params = dict(model.named_parameters())
    if spatial_loss is not None:
        params.update({SPATIAL_HEAD_PREFIX + n: p for n, p in spatial_loss.named_parameters()})
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise CheckpointError(f"{source}: tensors not in this model: {unknown[:5]} (a checkpoint of another model?)")
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise CheckpointError(f"{source}: {name} has shape {tuple(value.shape)}, the model's is "
                                      f"{tuple(params[name].shape)}")
            params[name].copy_(value.to(params[name].dtype))


def rotate(out, limit, keep_best=False):
    """Delete the oldest checkpoints beyond the newest `limit` (the best by COCO accuracy stays too
    with `keep_best`). Returns the deleted folders."""
    found = list_checkpoints(out)
    if limit is None or len(found) <= limit:
        return []
    keep = {path for _, path in found[-limit:]}
    if keep_best:
        scored = [(read_info(p).get("coco_accuracy"), -s, p) for s, p in found]
        scored = [x for x in scored if x[0] is not None]
        if scored:
            keep.add(max(scored)[2])
    deleted = [p for _, p in found if p not in keep]
    for path in deleted:
        shutil.rmtree(path)
    return deleted


def _is_slim(folder):
    return not (folder / "config.json").is_file() and (folder / CHECKPOINT_JSON).is_file()


def check_checkpoint_source(name):
    """Everything about a checkpoint folder, alias or hub id that can be checked without loading
    weights (see models.model_source); a slim checkpoint's base model and its trained tensors'
    file too. Raises ModelUnavailableError or CheckpointError naming the culprit. Returns the
    models.ModelSource of the model that loads (a slim checkpoint's base), for load_checkpoint_model."""
    folder = Path(name)
    if not (folder.is_dir() and _is_slim(folder)):
        return models.model_source(str(name))
    base = read_info(folder).get("base_model")
    if not base:
        raise CheckpointError(f"{folder}/{CHECKPOINT_JSON} names no base_model")
    source = models.model_source(base)
    if not (folder / TRAINABLE).is_file():
        raise CheckpointError(f"{folder}: no {TRAINABLE}")
    models.check_safetensors_complete(folder / TRAINABLE)
    return source


def load_checkpoint_model(folder, dtype=torch.float32, device="cpu", source=None):
    """(model, processor, adapter) of a checkpoint folder: a full one through from_pretrained, a
    slim one as its base model with the trained tensors applied. `source`: what
    check_checkpoint_source returned, when the caller checked the folder already."""
    folder = Path(folder)
    if not _is_slim(folder):
        return models.load_model_and_processor(str(folder), dtype=dtype, device=device, source=source)
    info = read_info(folder)
    model, processor, adapter = models.load_model_and_processor(info["base_model"], dtype=dtype, device=device,
                                                                source=source)
    tensors = {k: v for k, v in read_trainable(folder).items() if not k.startswith(SPATIAL_HEAD_PREFIX)}
    if any(".lora_" in k for k in tensors):  # a --lora_rank run: put the adapters back first
        run = load_training_state(folder).get("args", {})
        models.inject_lora_from_tensors(model, tensors, {k: v.shape for k, v in tensors.items()},
                                 run.get("lora_alpha"), run.get("lora_dropout", 0.0))
    apply_trainable(model, tensors, source=str(folder))
    return model, processor, adapter
