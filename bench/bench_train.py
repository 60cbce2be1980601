"""Training step: our LM loss (head at supervised positions, lm_loss.supervised_lm_loss) with the
one-layer spatial hook, against the plain step (`labels=` through the model's forward with
`output_hidden_states=True`, the spatial state read from hidden_states[layer]). Same model, same
batch, same spatial loss; forward + backward through the default trainable slice (the collated
batch is built once, outside the timing).

    python bench/bench_train.py                           # CPU: bench model, batch 15, 448 px images
    python bench/bench_train.py --full_size --bf16        # a GPU: the real Qwen2-VL-2B architecture

Bench model: the tiny Qwen2-VL with the real vocabulary (151,936), random weights, Qwen2-VL's
pixel limits; --full_size builds Qwen2-VL-2B's architecture (random weights). Time: both paths
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

PATHS = {"plain": "labels= forward, output_hidden_states=True", "ours": "supervised_lm_loss + layer hook"}


def worker(args):
    device, dtype = common.device_and_dtype(args.bf16)
    model, processor, adapter = common.bench_model(args.full_size, device, dtype)
    param_selectors.select_parameters(model, adapter)
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    samples = common.obj1_cell_samples(common.grid_folder(args.cell, folder=args.grid_dir), args.batch_size)
    batch, positions, cells = data.split_batch(data.VLMCollator(processor, adapter)(samples), device)
    loss_fn = sl.SpatialIDLoss({c: torch.randn(adapter.lm_hidden_size(model)) for c in set(cells)}).to(device)
    losses = {}

    def plain():
        out = model(**batch, output_hidden_states=True)
        aux = loss_fn(sl.gather_target_states(out.hidden_states[args.layer], positions), cells)
        (out.loss + aux).backward()
        model.zero_grad(set_to_none=True)
        losses["plain"] = out.loss.item()

    def ours():
        with sl.capture_layer(model, adapter, args.layer) as captured:
            out = lm_loss.supervised_lm_loss(model, adapter, batch)
        aux = loss_fn(sl.gather_target_states(captured.states, positions), cells)
        (out.loss + aux).backward()
        model.zero_grad(set_to_none=True)
        losses["ours"] = out.loss.item()

    common.worker(args._worker, {"plain": plain, "ours": ours}, args.repeats, device,
                  {"losses": losses, "seq_len": int(batch["input_ids"].shape[1]), "device": device,
                   "dtype": str(dtype)})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_size", type=int, default=15)
    p.add_argument("--cell", type=int, default=112, help="grid cell px (images are 4 x cell); 112 = 448 px")
    p.add_argument("--layer", type=int, default=11, help="spatial-loss layer (hidden_states index)")
    p.add_argument("--grad_checkpointing", action="store_true")
    p.add_argument("--grid_dir", default=None, help="reuse a folder of grid images (drawn if empty)")
    common.add_bench_args(p)
    args = p.parse_args(argv)
    if args._worker:
        return worker(args)
    args.grid_dir = str(common.grid_folder(args.cell, max_images=40, folder=args.grid_dir))
    argv = list(argv if argv is not None else sys.argv[1:]) + ["--grid_dir", args.grid_dir]
    results = common.measure(Path(__file__), argv, list(PATHS))
    plain_name = f"plain: {PATHS['plain']}"
    rows = [{"path": f"{name}: {PATHS[name]}", "per_s": args.batch_size / r["seconds"], "seconds": r["seconds"], "cpu_seconds": r["cpu_seconds"],
             "peak_gib": r["peak_gib"], "vs": plain_name} for name, r in results.items()]
    r = results["plain"]
    config = (f"{common.model_description(args, r)}, batch {args.batch_size}, {4 * args.cell} px images, "
              f"{r['seq_len']} tokens per row, spatial layer {args.layer}, forward + backward, "
              f"median of {args.repeats} alternating rounds after 1 warm-up; peak memory per path in its own process")
    common.print_table("training step (samples/s = batch / step time)", config, rows, "samples")
    print(f"LM loss plain {r['losses']['plain']:.6f}, ours {r['losses']['ours']:.6f}; memory before the measured "
          f"step: plain {results['plain']['base_gib']:.2f} GiB, ours {results['ours']['base_gib']:.2f} GiB")
    return results


if __name__ == "__main__":
    main()
