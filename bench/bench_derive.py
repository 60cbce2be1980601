"""ID derivation (clean recipe): ours (derive_spatial_ids.derive: questions batched across groups,
no LM head, hooks keeping only the requested layers at the target token) against the plain
recipe it replaces (one group per forward pass with output_hidden_states=True and the model's
full logits), on --groups groups of a grid folder with --cell px cells.

    python bench/bench_derive.py                     # CPU: bench model, 6 groups, 448 px images
    python bench/bench_derive.py --full_size --bf16 --groups 40   # a GPU

Images/s counts distinct images (a grid image yields one or two questions). Time: the paths
alternate in one process; peak memory: each path in a fresh process (see bench/common.py).
"""
import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

import common

import data  # noqa: E402
import derive_spatial_ids as dsi  # noqa: E402
import spatial_loss as sl  # noqa: E402

PATHS = {"plain": "one group per forward, all hidden states", "ours": "batched across groups, all layers",
         "ours_layer": "batched across groups, --layers {layer}"}


@torch.no_grad()
def plain_derive(model, processor, adapter, samples):
    """The recipe before: one group per forward pass, output_hidden_states=True (and the full
    logits the forward computes), centre within the group, mean per cell."""
    groups = [g for g in data.group_indices(samples, range(len(samples))).values() if len(g) >= 2]
    collate = data.VLMCollator(processor, adapter, with_answer=False)
    device = next(model.parameters()).device
    sums, counts = defaultdict(lambda: 0.0), defaultdict(int)
    for group in groups:
        batch, positions, cells = data.split_batch(collate([samples[i] for i in group]), device)
        hidden = model(**batch, output_hidden_states=True).hidden_states
        states = torch.stack([sl.gather_target_states(h, positions) for h in hidden], 1).float().cpu()
        states = states - states.mean(0, keepdim=True)
        for key, state in zip(cells, states):
            sums[key] = sums[key] + state
            counts[key] += 1
    return {key: sums[key] / counts[key] for key in sums}


def group_samples(folder, n_groups):
    samples = data.GridDataset(folder).samples
    groups = list(data.group_indices(samples, range(len(samples))).values())[:n_groups]
    return [samples[i] for g in groups for i in g]


def worker(args):
    device, dtype = common.device_and_dtype(args.bf16)
    model, processor, adapter = common.bench_model(args.full_size, device, dtype)
    samples = group_samples(args.grid_dir, args.groups)
    out = {}

    def ours(layers=None):
        out["ours"], _ = dsi.derive(model, processor, adapter, samples, args.batch_size, progress=False, layers=layers)

    def plain():
        out["plain"] = plain_derive(model, processor, adapter, samples)

    fns = {"plain": plain, "ours": ours, "ours_layer": lambda: ours([args.layer])}
    if args._worker == "time":  # the paths agree (float error), checked on the timing run
        plain(), ours()
        diffs = [((out["ours"][layer][key] - vec[layer]).abs().max().item(), vec[layer].abs().max().item())
                 for key, vec in out["plain"].items() for layer in range(2, vec.shape[0])]
        err = [max(d for d, _ in diffs), max(d / v for d, v in diffs)]
    common.worker(args._worker, fns, args.repeats, device,
                  {"images": len({s["image_path"] for s in samples}), "questions": len(samples),
                   "max_rel_diff": err if args._worker == "time" else None, "device": device, "dtype": str(dtype)})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, default=6, help="groups derived per pass (<= 12 questions each)")
    p.add_argument("--batch_size", type=int, default=32, help="questions per forward pass (ours)")
    p.add_argument("--cell", type=int, default=112, help="grid cell px (images are 4 x cell); 112 = 448 px")
    p.add_argument("--layer", type=int, default=11, help="the single layer of the third path")
    p.add_argument("--grid_dir", default=None, help="reuse a folder of grid images (drawn if empty)")
    common.add_bench_args(p)
    args = p.parse_args(argv)
    if args._worker:
        return worker(args)
    args.grid_dir = str(common.grid_folder(args.cell, max_images=None, folder=args.grid_dir))
    argv = list(argv if argv is not None else sys.argv[1:]) + ["--grid_dir", args.grid_dir]
    results = common.measure(Path(__file__), argv, list(PATHS))
    r = results["plain"]
    names = {k: v.format(layer=args.layer) for k, v in PATHS.items()}
    plain_name = f"plain: {names['plain']}"
    rows = [{"path": plain_name if k == "plain" else f"ours: {names[k]}", "per_s": r["images"] / res["seconds"],
             "seconds": res["seconds"], "cpu_seconds": res["cpu_seconds"], "peak_gib": res["peak_gib"], "vs": plain_name} for k, res in results.items()]
    config = (f"{common.model_description(args, r)}, {args.groups} groups = {r['questions']} questions on {r['images']} images "
              f"of {4 * args.cell} px, ours {args.batch_size} questions per forward, median of {args.repeats} "
              f"alternating rounds after 1 warm-up; peak memory per path in its own process")
    common.print_table("ID derivation, clean recipe (images/s)", config, rows, "images")
    print(f"ours vs plain IDs (layers 2..N): largest absolute difference {r['max_rel_diff'][0]:.1e}, "
          f"{r['max_rel_diff'][1]:.1e} of the ID's largest entry (float error of other batch shapes on O(1) "
          f"hidden states; with the same batches the states are bit-identical, tests/test_perf_paths.py)")
    return results


if __name__ == "__main__":
    main()
