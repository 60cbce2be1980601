"""Derive universal spatial IDs from a model: directions in its hidden space that say where the
moving object is.

    python derive_spatial_ids.py --model tiny --images data/grid --out embeds/universal_id_90/tiny.pt

For each group of grid questions that training's grouped sampler would form (one object pair,
obj1 fixed in one cell, one object size, one question type, obj2 moving over the cells), run
the training question and take every LM layer's hidden state at obj2's token (the last
sub-token of its name, the token the spatial loss reads), centre within the group, then average
over all groups per (column, row, size) of obj2. Layer L is `hidden_states[L]` (0 = embeddings),
as in the original code, so its ID files and ours mean the same thing.

Writes `{layer: {"universal": {(col, row, size): tensor}}}` plus `<stem>_x_axis.pt` and
`<stem>_y_axis.pt` (`{layer: tensor}`: the mean difference between neighbouring columns / rows).
"""
import argparse
import random
import sys
from collections import defaultdict

import torch
from tqdm.auto import tqdm

import data
from models import ModelUnavailableError, load_model_and_processor
from spatial_loss import gather_target_states, save_universal_ids


def axis_directions(ids):
    """Mean difference ID(col + 1) - ID(col) (x) and ID(row + 1) - ID(row) (y) over all cells
    and sizes where both neighbours have an ID."""
    axes = {}
    for name, step in (("x", (1, 0)), ("y", (0, 1))):
        diffs = [ids[(c + step[0], r + step[1], s)] - vec for (c, r, s), vec in ids.items()
                 if (c + step[0], r + step[1], s) in ids]
        axes[name] = torch.stack(diffs).mean(0) if diffs else None
    return axes["x"], axes["y"]


@torch.no_grad()
def derive(model, processor, adapter, samples, batch_size=16, max_groups=None, seed=0, progress=True):
    """({layer: {(col, row, size): mean centred state}}, stats); stats["counts"] is
    {(col, row, size): number of centred states averaged into that ID}."""
    groups = [g for g in data.group_indices(samples, range(len(samples))).values() if len(g) >= 2]
    if not groups:
        raise ValueError("no group of >= 2 questions with obj1 fixed and obj2 moving; "
                         "make grid data with every cell pair (make_grid_data.py)")
    if max_groups and len(groups) > max_groups:
        groups = random.Random(seed).sample(groups, max_groups)
    collate = data.VLMCollator(processor, adapter.end_of_turn, with_answer=False)
    device = next(model.parameters()).device
    sums, counts = defaultdict(lambda: 0.0), defaultdict(int)
    for group in tqdm(groups, desc="spatial IDs", disable=not progress):
        states, keys = [], []
        for start in range(0, len(group), batch_size):
            chunk = [samples[i] for i in group[start:start + batch_size]]
            batch, positions, cells = data.split_batch(collate(chunk), device)
            hidden = model(**batch, output_hidden_states=True).hidden_states
            # [n, layers + 1, H] at obj2's token, in float32 whatever the model dtype
            states.append(torch.stack([gather_target_states(h, positions) for h in hidden], 1).float().cpu())
            keys += cells
        states = torch.cat(states)
        states = states - states.mean(0, keepdim=True)
        for key, state in zip(keys, states):
            sums[key] = sums[key] + state
            counts[key] += 1
    n_layers = next(iter(sums.values())).shape[0]
    per_layer = {layer: {key: (sums[key][layer] / counts[key]).contiguous() for key in sorted(sums)}
                 for layer in range(n_layers)}
    pairs = {(samples[g[0]]["obj1"], samples[g[0]]["obj2"]) for g in groups}
    stats = {"groups": len(groups), "questions": sum(len(g) for g in groups), "pairs": len(pairs),
             "cells": len(sums), "layers": n_layers, "hidden_size": int(states.shape[-1]),
             "min_count": min(counts.values()), "counts": {key: counts[key] for key in sorted(counts)}}
    return per_layer, stats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="alias (tiny, qwen2-2b, ...), hub id, local folder or checkpoint")
    parser.add_argument("--images", required=True, help="folder of grid images (make_grid_data.py)")
    parser.add_argument("--out", required=True, help="output .pt, e.g. embeds/universal_id_90/MODEL.pt")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_groups", type=int, default=None, help="use at most N groups (seeded subset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 weights on CUDA")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be >= 1")

    try:
        grid = data.GridDataset(args.images)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(grid.report())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.bf16 and device == "cuda" else torch.float32
    model, processor, adapter = load_model_and_processor(args.model, dtype=dtype, device=device)
    per_layer, stats = derive(model, processor, adapter, grid.samples, args.batch_size, args.max_groups, args.seed)
    x_axis, y_axis = {}, {}
    for layer, ids in per_layer.items():
        x_axis[layer], y_axis[layer] = axis_directions(ids)
    x_axis = {k: v for k, v in x_axis.items() if v is not None}
    y_axis = {k: v for k, v in y_axis.items() if v is not None}
    save_universal_ids(args.out, per_layer, x_axis=x_axis or None, y_axis=y_axis or None)
    sizes = sorted({key[2] for key in per_layer[0]})
    print(f"wrote {args.out}: layers 0..{stats['layers'] - 1}, {stats['cells']} (col, row, size) IDs "
          f"(sizes {sizes}), hidden size {stats['hidden_size']}, from {stats['pairs']} object pairs, "
          f"{stats['groups']} groups, {stats['questions']} questions (fewest per ID: {stats['min_count']})")
    return per_layer, stats


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ModelUnavailableError) as err:  # user-facing: no traceback
        sys.exit(f"error: {err}")
