"""Spatial finetuning: train a budgeted slice of a VLM on synthetic two-object grid questions,
optionally with the spatial-ID auxiliary loss, and watch COCO-Spatial accuracy move.

    python train.py --model_name tiny --train_dir data/grid --val_json data/coco_standin/coco_qa_two_obj_standin.json \
        --coco_val_dir data/coco_standin --max_steps 20 --eval_save_steps 10

Read top to bottom: arguments -> data (checked before the model loads) -> model -> selection ->
spatial loss -> optimiser -> evaluate / train / evaluate -> save. The run folder gets
config.json, metrics.jsonl, predictions/step-N.jsonl, checkpoint-N/ and final/.
"""
import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

import data
import param_selectors
import protocols
import spatial_loss as sl
from eval_coco import add_data_args, evaluate, format_report, write_jsonl
from models import ModelUnavailableError, load_model_and_processor
from provenance import run_metadata

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", default="qwen2-2b", help="alias (tiny, qwen2-2b, ...), hub id or local folder")
    protocols.add_protocol_arg(p)
    p.add_argument("--train_dir", default="data/grid", help="folder of grid images (make_grid_data.py)")
    p.add_argument("--train_question_style", choices=data.QUESTION_STYLES, default=None,
                   help="grid question wording: paper = bare names, clean = 'the {name}' (default: --protocol)")
    add_data_args(p)
    p.add_argument("--output_dir", default=None, help="run folder (default runs/<model>_<baseline|spatial>_seed<seed>)")
    p.add_argument("--overwrite_output_dir", action="store_true", help="allow writing into a run folder that has metrics")
    p.add_argument("--resume_from_checkpoint", default=None,
                   help="continue a run from one of its checkpoint-N folders, or 'latest' in --output_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=15)
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
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
    p.add_argument("--eval_save_steps", type=int, default=200, help="evaluate and checkpoint every N optimizer steps")
    p.add_argument("--log_every", type=int, default=5, help="log the mean losses every N optimizer steps")
    p.add_argument("--bf16", action="store_true", help="bfloat16 weights on CUDA (float32 with a notice on CPU)")
    p.add_argument("--grad_checkpointing", action="store_true")
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader workers (image loading + processing)")
    param_selectors.add_selector_args(p)
    # Spatial-ID auxiliary loss (off unless --universal_id_path is given).
    p.add_argument("--universal_id_path", default=None, help="universal spatial IDs (derive_spatial_ids.py)")
    p.add_argument("--spatial_id_layer", type=int, default=11, help="hidden_states index: 0 = embeddings")
    p.add_argument("--spatial_id_weight", type=float, default=1.0)
    p.add_argument("--spatial_head", choices=["none", "linear"], default="none")
    p.add_argument("--allow_holdout_in_ids", action="store_true",
                   help="do not warn when holdout pairs were among the pairs the IDs were derived from")
    args = p.parse_args(argv)
    args.protocol_choices = protocols.resolve(args, arm="spatial" if args.universal_id_path else "baseline")

    for name in ("batch_size", "grad_accum", "epochs", "eval_save_steps", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.max_steps is not None and args.max_steps < 1:
        p.error("--max_steps must be >= 1")
    if not 0 <= args.spatial_holdout_frac < 1:
        p.error("--spatial_holdout_frac must be in [0, 1)")
    if args.universal_id_path and not data.SAMPLERS[args.sampler]:
        p.error(f"argument --sampler: the spatial loss centres over a batch with obj1 fixed, which "
                f"{args.sampler} batches do not keep; use obj1_groups or grouped")
    if args.universal_id_path and args.batch_size < 2:
        p.error("the spatial loss centres over the batch: --batch_size must be >= 2")
    if args.output_dir is None:
        kind = "spatial" if args.universal_id_path else "baseline"
        args.output_dir = f"runs/{Path(args.model_name).name}_{kind}_seed{args.seed}"
    args.eval_batch_size = args.eval_batch_size or args.batch_size
    return args


def load_data(args):
    grid = data.GridDataset(args.train_dir, args.train_question_style)
    print(grid.report())
    train_idx, holdout_idx = data.split_holdout(grid.samples, args.spatial_holdout_frac, args.seed)
    if not train_idx:
        raise ValueError(f"{args.train_dir}: the holdout split left no training samples")
    coco = data.load_coco_spatial(args.val_json, args.coco_val_dir, args.question_style, args.eval_max_samples)
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
            print(f"warning: {warning}")
    return grid, coco, train_idx, holdout_idx


# Arguments that may change when a run is resumed without changing what it trains.
RESUME_FREE_ARGS = {"output_dir", "overwrite_output_dir", "resume_from_checkpoint", "num_workers",
                    "eval_batch_size", "eval_max_samples", "holdout_max_samples", "log_every"}


def find_checkpoint(out, spec):
    """The checkpoint folder to resume from: `spec` itself, or the newest checkpoint-N in `out`."""
    if spec == "latest":
        found = sorted((int(p.name.split("-")[1]), p) for p in out.glob("checkpoint-*")
                       if p.name.split("-")[1].isdigit() and (p / "training_state.pt").is_file())
        if not found:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no checkpoint-N with training_state.pt in {out}")
        return found[-1][1]
    path = Path(spec)
    if not (path / "training_state.pt").is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {spec}: not a train.py checkpoint (no training_state.pt)")
    return path


def main(argv=None):
    args = parse_args(argv)
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_linear_schedule_with_warmup

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if accelerator.num_processes > 1:  # the loop neither shards batches nor syncs gradients yet
        sys.exit("train.py runs as a single process for now; launch it with plain `python`, not multi-process")
    set_seed(args.seed)
    out = Path(args.output_dir)
    resume_dir, state = None, None
    if args.resume_from_checkpoint:
        try:
            resume_dir = find_checkpoint(out, args.resume_from_checkpoint)
        except FileNotFoundError as err:
            sys.exit(f"error: {err}")
        state = torch.load(resume_dir / "training_state.pt", map_location="cpu", weights_only=True)
        changed = {k: (state["args"].get(k), v) for k, v in vars(args).items()
                   if k not in RESUME_FREE_ARGS and state["args"].get(k) != v}
        if changed:
            print(f"warning: resuming {resume_dir} with different arguments (then, now): {changed}")
    elif (out / "metrics.jsonl").exists() and not args.overwrite_output_dir:
        sys.exit(f"{out} already holds a run (metrics.jsonl); choose another --output_dir, pass "
                 "--resume_from_checkpoint latest to continue it, or --overwrite_output_dir")

    # --- data: every file problem surfaces here, before the (slow) model load -----------------
    try:
        grid, coco, train_idx, holdout_idx = load_data(args)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    holdout = [grid.samples[i] for i in holdout_idx]
    if len(holdout) > args.holdout_max_samples:
        rng = torch.Generator().manual_seed(args.seed)
        keep = sorted(torch.randperm(len(holdout), generator=rng)[:args.holdout_max_samples].tolist())
        holdout = [holdout[i] for i in keep]
    batch_sampler = data.make_batch_sampler(args.sampler, grid.samples, train_idx, args.batch_size, args.seed)
    if len(batch_sampler) == 0:
        sys.exit(f"{args.train_dir}: no training batch of >= 2 samples (groups too small for --batch_size {args.batch_size}?)")
    steps_per_epoch = math.ceil(len(batch_sampler) / args.grad_accum)
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    print(f"train: {len(train_idx)} questions in {len(batch_sampler)} batches/epoch; "
          f"holdout: {len(holdout_idx)} questions ({len(holdout)} evaluated); COCO-Spatial: {len(coco)}; "
          f"{total_steps} optimizer steps")

    # --- model and the trainable slice ---------------------------------------------------------
    cuda = accelerator.device.type == "cuda"
    if args.bf16 and not cuda:
        print("--bf16: no CUDA device here, training in float32 (bf16 on a CPU is slow)")
    dtype = torch.bfloat16 if args.bf16 and cuda else torch.float32
    model, processor, adapter = load_model_and_processor(str(resume_dir) if resume_dir else args.model_name,
                                                         dtype=dtype, device=accelerator.device)
    selection = param_selectors.select_from_args(model, adapter, args)
    print(selection.summary())
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()

    spatial_loss = None
    if args.universal_id_path:
        n_layers = len(adapter.lm_layers(model))
        if not 0 <= args.spatial_id_layer <= n_layers:
            sys.exit(f"--spatial_id_layer {args.spatial_id_layer} is outside 0..{n_layers} for {args.model_name}")
        needed = {(*s["cell2"], s["size"]) for s in grid.samples}
        try:
            ids = sl.load_universal_ids(args.universal_id_path, args.spatial_id_layer,
                                        adapter.lm_hidden_size(model), needed_keys=needed)
        except (FileNotFoundError, ValueError) as err:
            sys.exit(f"error: {err}")
        spatial_loss = sl.SpatialIDLoss(ids, head=args.spatial_head).to(accelerator.device)
        print(f"spatial loss: layer {args.spatial_id_layer}, weight {args.spatial_id_weight}, "
              f"{len(ids)} IDs from {args.universal_id_path}")

    params = [p for p in model.parameters() if p.requires_grad]
    if spatial_loss is not None:
        params += [p for p in spatial_loss.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(args.warmup_frac * total_steps), total_steps)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if spatial_loss is not None and state["spatial_loss"] is not None:
            spatial_loss.load_state_dict(state["spatial_loss"])
        torch.set_rng_state(state["torch_rng"])
    loader = torch.utils.data.DataLoader(
        grid, batch_sampler=batch_sampler, num_workers=args.num_workers,
        collate_fn=data.VLMCollator(processor, adapter.end_of_turn),
    )

    # --- run folder ------------------------------------------------------------------------------
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictions").mkdir(exist_ok=True)
    config = {"args": vars(args), "protocol": args.protocol, "protocol_choices": args.protocol_choices,
              **run_metadata(), "total_steps": total_steps,
              "steps_per_epoch": steps_per_epoch, "selected_parameters": selection.names,
              "selected_count": selection.selected_params, "total_parameters": selection.total_params,
              "train_questions": len(train_idx), "holdout_questions": len(holdout_idx),
              "holdout_pairs": sorted({" | ".join(sorted((grid.samples[i]["obj1"], grid.samples[i]["obj2"])))
                                       for i in holdout_idx})}
    if state is None:
        (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
        metrics = (out / "metrics.jsonl").open("w")
    else:
        # Keep the history up to the checkpoint; what came after it is about to be redone.
        source = out if (out / "metrics.jsonl").exists() else resume_dir.parent
        history = [line for line in (source / "metrics.jsonl").read_text().splitlines() if line.strip()]
        kept = [line for line in history
                if json.loads(line)["event"] != "end" and json.loads(line)["step"] <= state["step"]]
        if (out / "config.json").exists():
            config = json.loads((out / "config.json").read_text())
        config.setdefault("resumed", []).append({"from": str(resume_dir), "step": state["step"], **run_metadata()})
        (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
        metrics = (out / "metrics.jsonl").open("w")
        metrics.write("".join(line + "\n" for line in kept))

    def log(event):
        metrics.write(json.dumps(event) + "\n")
        metrics.flush()

    def evaluate_and_save(step, epoch, batches_done):
        coco_report, coco_rows = evaluate(model, processor, adapter, coco, args.eval_batch_size, args.eval_mode,
                                          desc=f"COCO-Spatial @{step}")
        event = {"event": "eval", "step": step, "coco": coco_report}
        rows = [dict(r, set="coco") for r in coco_rows]
        print(format_report(coco_report, f"step {step} COCO-Spatial"))
        if holdout:
            hold_report, hold_rows = evaluate(model, processor, adapter, holdout, args.eval_batch_size,
                                              args.eval_mode, desc=f"holdout @{step}")
            event["holdout"] = hold_report
            rows += [dict(r, set="holdout") for r in hold_rows]
            print(format_report(hold_report, f"step {step} holdout pairs"))
        write_jsonl(out / "predictions" / f"step-{step}.jsonl", rows)
        checkpoint = out / f"checkpoint-{step}"
        model.save_pretrained(checkpoint)
        processor.save_pretrained(checkpoint)
        event["checkpoint"] = str(checkpoint)
        # Everything needed to continue exactly from here (--resume_from_checkpoint).
        torch.save({"step": step, "epoch": epoch, "batches_done": batches_done, "args": vars(args),
                    "counters": [optimizer_steps, skipped_steps, nonfinite_losses],
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "spatial_loss": spatial_loss.state_dict() if spatial_loss is not None else None,
                    "torch_rng": torch.get_rng_state(), "eval_event": json.dumps(event)},
                   checkpoint / "training_state.pt")
        log(event)
        model.train()
        return event

    # --- train -----------------------------------------------------------------------------------
    if state is None:
        step = optimizer_steps = skipped_steps = nonfinite_losses = 0
        position = (0, 0)
        last_eval = evaluate_and_save(0, *position)
    else:
        step = state["step"]
        optimizer_steps, skipped_steps, nonfinite_losses = state["counters"]
        position = (state["epoch"], state["batches_done"])
        last_eval = json.loads(state["eval_event"])
        print(f"resuming from {resume_dir}: step {step}, epoch {position[0]}, {position[1]} batches into it")
    model.train()
    window = {"loss": [], "lm_loss": [], "spatial_loss": []}
    bar = tqdm(total=total_steps, initial=step, desc="train")
    micro, finite_micro, accum_n = 0, 0, args.grad_accum
    for epoch in range(position[0], args.epochs):
        if step >= total_steps:
            break
        # A resumed run skips the batches its epoch had already trained on.
        first = position[1] if epoch == position[0] else 0
        batch_sampler.set_epoch(epoch, skip=first)
        n_batches = first + len(batch_sampler)
        for b, batch in enumerate(loader, start=first):
            if micro == 0:  # the epoch's last step may gather fewer micro-batches
                accum_n = min(args.grad_accum, n_batches - b)
            batch, target_positions, cells = data.split_batch(batch, accelerator.device)
            aux = None
            if spatial_loss is not None:
                with sl.capture_layer(model, adapter, args.spatial_id_layer) as captured:
                    outputs = model(**batch)
                aux = spatial_loss(sl.gather_target_states(captured.states, target_positions), cells)
                loss = outputs.loss + args.spatial_id_weight * aux
            else:
                outputs = model(**batch)
                loss = outputs.loss
            if torch.isfinite(loss):
                accelerator.backward(loss / accum_n)
                finite_micro += 1
                window["loss"].append(loss.item())
                window["lm_loss"].append(outputs.loss.item())
                if aux is not None:
                    window["spatial_loss"].append(aux.item())
            else:
                nonfinite_losses += 1
            micro += 1
            if micro < accum_n:
                continue

            # One optimizer step; skipped (and counted) when nothing finite reached the gradients.
            grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm)
            if finite_micro and torch.isfinite(grad_norm):
                optimizer.step()
                scheduler.step()
                optimizer_steps += 1
            else:
                skipped_steps += 1
            optimizer.zero_grad(set_to_none=True)
            micro = finite_micro = 0
            step += 1
            position = (epoch, b + 1)
            bar.update(1)
            if window["loss"]:
                bar.set_postfix(loss=f"{window['loss'][-1]:.4f}")
            if step % args.log_every == 0 or step == total_steps:
                event = {"event": "train", "step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                         "grad_norm": float(grad_norm), "optimizer_steps": optimizer_steps,
                         "skipped_steps": skipped_steps, "nonfinite_losses": nonfinite_losses}
                event.update({k: sum(v) / len(v) for k, v in window.items() if v})
                log(event)
                window = {k: [] for k in window}
            if step % args.eval_save_steps == 0 and step < total_steps:
                last_eval = evaluate_and_save(step, *position)
            if step >= total_steps:
                break
    bar.close()

    # --- final evaluation and model --------------------------------------------------------------
    if last_eval["step"] != step:
        last_eval = evaluate_and_save(step, *position)
    model.save_pretrained(out / "final")
    processor.save_pretrained(out / "final")
    summary = {"event": "end", "step": step, "optimizer_steps": optimizer_steps, "skipped_steps": skipped_steps,
               "nonfinite_losses": nonfinite_losses, "scheduler_steps": scheduler.last_epoch,
               "coco_accuracy": last_eval["coco"]["accuracy"],
               "holdout_accuracy": last_eval.get("holdout", {}).get("accuracy")}
    log(summary)
    metrics.close()
    print(f"done: {step} steps, {optimizer_steps} optimizer updates ({skipped_steps} skipped: no finite loss "
          f"or gradient; {nonfinite_losses} micro-batches with a non-finite loss); run folder {out}")
    return summary


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ModelUnavailableError) as err:  # user-facing: no traceback
        sys.exit(f"error: {err}")
