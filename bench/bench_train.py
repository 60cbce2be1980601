"""Training step: our LM loss (head at supervised positions, lm_loss.supervised_lm_loss) with the
one-layer spatial hook, against the plain step (`labels=` through the model's forward with
`output_hidden_states=True`, the spatial state read from hidden_states[layer]); and our step with
each distinct image of the batch encoded once (data.VLMCollator(encode_images_once=True)) against
the same step encoding every row's image, on a batch of the paper's spatial arm (obj1_groups) and
of its control arm (shuffle). Same model, same spatial loss; forward + backward through the
default trainable slice (the collated batches are built once, outside the timing). Then the
FLOPs of each of our steps, counted (common.StepFlops: vision, LM, rest), the achieved TFLOP/s
and the MFU against the card's dense bf16 peak (a measured matmul on a CPU or an unknown card).

    python bench/bench_train.py                           # CPU: bench model, batch 15, 448 px images
    python bench/bench_train.py --full_size --bf16        # a GPU: the real Qwen2-VL-2B architecture

Bench model: the tiny Qwen2-VL with the real vocabulary (151,936), random weights, Qwen2-VL's
pixel limits; --full_size builds Qwen2-VL-2B's architecture (random weights). Time: all paths
alternate in one process; peak memory: each path in a fresh process (see bench/common.py).
"""
import argparse
import sys
from pathlib import Path

import torch

import common

import data  # noqa: E402
import lm_loss  # noqa: E402
import param_selectors  # noqa: E402
import spatial_loss as sl  # noqa: E402

# name: (what runs, the batch, the path its ratio is taken against)
PATHS = {
    "plain": ("labels= forward, output_hidden_states=True", "spatial", None),
    "ours": ("supervised_lm_loss + layer hook", "spatial", "plain"),
    "ours_once": ("ours, each distinct image encoded once", "spatial", "ours"),
    "control": ("ours, control-arm batch", "control", None),
    "control_once": ("ours, control-arm batch, each distinct image encoded once", "control", "control"),
}
FLOP_PATHS = ("ours", "ours_once", "control", "control_once")


def worker(args):
    device, dtype = common.device_and_dtype(args.bf16)
    model, processor, adapter = common.bench_model(args.full_size, device, dtype)
    param_selectors.select_parameters(model, adapter)
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    samples = common.arm_batches(args.grid_dir, args.batch_size)
    collated = {}
    for name, (_, arm, _) in PATHS.items():
        collate = data.VLMCollator(processor, adapter, encode_images_once=name.endswith("_once"))
        collated[name] = data.split_batch(collate(samples[arm]), device)
    cells = {c for _, _, arm_cells in collated.values() for c in arm_cells}
    loss_fn = sl.SpatialIDLoss({c: torch.randn(adapter.lm_hidden_size(model)) for c in cells}).to(device)
    losses = {}

    def plain():
        batch, positions, cells = collated["plain"]
        out = model(**batch, output_hidden_states=True)
        aux = loss_fn(sl.gather_target_states(out.hidden_states[args.layer], positions), cells)
        (out.loss + aux).backward()
        model.zero_grad(set_to_none=True)
        losses["plain"] = out.loss.item()

    def ours_on(name, flops=None):
        def step():
            batch, positions, cells = collated[name]
            with sl.capture_layer(model, adapter, args.layer) as captured:
                out = lm_loss.supervised_lm_loss(model, adapter, batch)
            aux = loss_fn(sl.gather_target_states(captured.states, positions), cells)
            if flops is not None:
                flops.forward_done()
            (out.loss + aux).backward()
            model.zero_grad(set_to_none=True)
            losses[name] = out.loss.item()
        return step

    fns = {"plain": plain, **{name: ours_on(name) for name in PATHS if name != "plain"}}
    fns = {name: fn for name, fn in fns.items() if name in args.paths}
    info = {"losses": losses, "seq_len": int(collated["plain"][0]["input_ids"].shape[1]), "device": device,
            "dtype": str(dtype), "questions": {arm: len(s) for arm, s in samples.items()},
            "distinct_images": {arm: len({s["image_path"] for s in arm_samples}) for arm, arm_samples in samples.items()}}
    if args._worker == "time":  # FLOPs counted on one more run of each path, after the timed ones
        info["flops"] = {}
        info["peak"] = common.peak_tflops(device, dtype)

        def count_flops():
            for name in (n for n in FLOP_PATHS if n in fns):
                with common.StepFlops(model, adapter) as counted:
                    ours_on(name, counted)()
                info["flops"][name] = counted.as_dict()
        common.worker(args._worker, fns, args.repeats, device, info, after=count_flops)
        return
    common.worker(args._worker, fns, args.repeats, device, info)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_size", type=int, default=15)
    p.add_argument("--cell", type=int, default=112, help="grid cell px (images are 4 x cell); 112 = 448 px")
    p.add_argument("--layer", type=int, default=11, help="spatial-loss layer (hidden_states index)")
    p.add_argument("--grad_checkpointing", action="store_true")
    p.add_argument("--grid_dir", default=None, help="reuse a folder of grid images (drawn if empty)")
    p.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS),
                   help="measure only these (e.g. leave out plain, the slow one, to time the image paths)")
    common.add_bench_args(p)
    args = p.parse_args(argv)
    if args._worker:
        return worker(args)
    # One object pair at one size, every cell pair: 240 images, 16 obj1_groups groups of 15 images.
    args.grid_dir = str(common.grid_folder(args.cell, folder=args.grid_dir))
    argv = list(argv if argv is not None else sys.argv[1:]) + ["--grid_dir", args.grid_dir]
    results = common.measure(Path(__file__), argv, args.paths)
    label = {name: f"{name}: {what}" for name, (what, _, _) in PATHS.items()}
    rows = [{"path": label[name], "per_s": args.batch_size / r["seconds"], "seconds": r["seconds"],
             "cpu_seconds": r["cpu_seconds"], "peak_gib": r["peak_gib"], "vs": label.get(PATHS[name][2])}
            for name, r in results.items()]
    r = next(iter(results.values()))  # the timing process's information is in every path's result
    config = (f"{common.model_description(args, r)}, batch {args.batch_size}, {4 * args.cell} px images, "
              f"{r['seq_len']} tokens per row, spatial layer {args.layer}, forward + backward, "
              f"median of {args.repeats} alternating rounds after 1 warm-up; peak memory per path in its own process; "
              f"ratios against the path named in the last column of PATHS (plain, ours or control)")
    common.print_table("training step (samples/s = batch / step time)", config, rows, "samples")
    print(f"LM loss: " + ", ".join(f"{name} {loss:.6f}" for name, loss in r["losses"].items())
          + "; memory before the measured step: "
          + ", ".join(f"{name} {result['base_gib']:.2f} GiB" for name, result in results.items()))

    flops = r["flops"]
    print("\neach distinct image encoded once (spatial = the paper's obj1_groups batch, control = its shuffle batch)")
    print("| arm | questions | distinct images | images encoded: per row / once | step s: per row / once | time once / per row "
          "| vision TFLOP: per row / once |")
    print("|" + "---|" * 7)
    for arm, rows_path, once_path in (("spatial", "ours", "ours_once"), ("control", "control", "control_once")):
        if rows_path not in results or once_path not in results:
            continue
        per_row, once = results[rows_path], results[once_path]
        print(f"| {arm} | {r['questions'][arm]} | {r['distinct_images'][arm]} | {flops[rows_path]['images']} / "
              f"{flops[once_path]['images']} | {per_row['seconds']:.3f} / {once['seconds']:.3f} | "
              f"{once['seconds'] / per_row['seconds']:.2f}x | {flops[rows_path]['vision'] / 1e12:.4f} / "
              f"{flops[once_path]['vision'] / 1e12:.4f} |")
    peak, source = r["peak"]
    common.flops_table("counted FLOPs of the training step (torch.utils.flop_counter.FlopCounterMode; forward + "
                       "backward; TFLOP/s = counted FLOPs / median step time)",
                       [{"path": label[name], "flops": flops[name], "seconds": results[name]["seconds"]}
                        for name in FLOP_PATHS if name in results], peak, source)
    return results


if __name__ == "__main__":
    main()
