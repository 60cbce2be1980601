"""Derive universal spatial IDs from a model: directions in its hidden space that say where an
object is.

    python make_grid_data.py --layout extraction --out_dir data/extraction --objects_dir renders/
    python derive_spatial_ids.py --model qwen2-2b --images data/extraction --out embeds/universal_id_90/qwen2-2b.pt

Two recipes (`--id_recipe`, set by `--protocol`):

paper (the original's procedure, the default): for each object pair (a, b), ask
`Is {b} to the left or right of {a}?` about every image with a fixed in one cell and b anywhere
else, at every size; take each LM layer's hidden state at the first occurrence of the last
sub-token of " " + b (b is the subject); centre over all of b's cells and sizes per (pair, a's
cell); average per (b's column, row, size) over a's cells, then over pairs.

clean (ours): for each group that training's grouped sampler forms (pair, obj1's cell, size,
question type; obj2 moving), ask the training question and take the state at obj2's last name
token, the token the loss reads; centre within the group, then average per (col, row, size).

Speed and memory: the LM head never runs (the decoder stops at its last hidden state), forward hooks
keep only the `--layers` asked for and only at the target token (a forward pass stops after the
deepest one), and the clean recipe batches questions across groups (`--batch_size` questions per
forward pass), centring each group once all its questions are in. A progress bar over questions
shows the rate and the time left.

`--max_groups N` keeps a seeded subset of N groups: each ID then averages about N / (all groups)
as many centred states, so its sampling noise (standard error) grows by about sqrt(all groups / N);
the clean recipe measures it and prints the median relative standard error of the IDs
(||standard error|| / ||ID|| per cell, at the deepest kept layer; also in the provenance JSON as
counts.relative_stderr). It scales as 1 / sqrt(states per cell): a quarter of the groups doubles it.

Images: the original's nested extraction layout `{a}_{b}/{a_col}_{a_row}/{b_col}_{b_row}_{size}.png`
or a flat folder of grid file names (a = the first-named object). Layer L is `hidden_states[L]`
(0 = embeddings). Writes `{layer: {"universal": {(col, row, size): tensor}}}` (the original's
format), `<stem>_x_axis.pt` / `<stem>_y_axis.pt` (mean differences between neighbouring columns /
rows) and `<stem>.json`, the provenance that train.py checks.
"""
import argparse
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

import data
import grid_sources
import protocols
from lm_loss import last_hidden_state
from models import ListModelsAction, ModelUnavailableError, load_model_and_processor, model_source, resolve_model_name
from output_paths import output_problem
from provenance import run_metadata
from spatial_loss import save_universal_ids, write_provenance

PAPER_QUERY = "Is {b} to the left or right of {a}?"


def axis_directions(ids):
    """Mean difference ID(col + 1) - ID(col) (x) and ID(row + 1) - ID(row) (y) over all cells
    and sizes where both neighbours have an ID."""
    axes = {}
    for name, step in (("x", (1, 0)), ("y", (0, 1))):
        diffs = [ids[(c + step[0], r + step[1], s)] - vec for (c, r, s), vec in ids.items()
                 if (c + step[0], r + step[1], s) in ids]
        axes[name] = torch.stack(diffs).mean(0) if diffs else None
    return axes["x"], axes["y"]


def _batches(items, size):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _per_layer(ids, layers):
    """{key: tensor[len(layers), H]} -> {layer: {key: tensor[H]}}."""
    return {layer: {key: ids[key][j].contiguous() for key in sorted(ids)} for j, layer in enumerate(layers)}


def resolve_layers(layers, n_layers):
    """Sorted hidden_states indices to keep: None / "all" = 0..n_layers; else ints, or a string of
    comma-separated indices and ranges ("11", "6,11", "8-12")."""
    if layers is None or layers == "all":
        return list(range(n_layers + 1))
    if isinstance(layers, str):
        picked = set()
        for part in layers.split(","):
            part = part.strip()
            lo, dash, hi = part.partition("-")
            if not lo.strip().isdigit() or (dash and not hi.strip().isdigit()):
                raise ValueError(f"--layers {layers!r}: {part!r} is not an index or a range like 8-12")
            picked.update(range(int(lo), int(hi or lo) + 1))
        layers = picked
    layers = sorted({int(layer) for layer in layers})
    if not layers or layers[0] < 0 or layers[-1] > n_layers:
        raise ValueError(f"layers {layers} outside 0..{n_layers} (0 = embeddings, {n_layers} = after the final norm)")
    return layers


class _StopForward(Exception):
    """Raised by the deepest tap: nothing after it is needed."""


@torch.no_grad()
def collect_states(model, adapter, inputs, positions, layers):
    """[B, len(layers), H] float32 on the CPU: HF's hidden_states[layer] at each row's position,
    for each of `layers` (sorted), from one forward pass that runs no LM head, keeps nothing else
    and stops after the deepest layer asked for."""
    blocks = adapter.lm_layers(model)
    n = len(blocks)
    rows = torch.arange(len(positions))
    got = {}
    handles = []

    def tap(layer, stop):
        def record(hidden):
            got[layer] = hidden[rows.to(hidden.device), positions.to(hidden.device)].float().cpu()
            if stop:
                raise _StopForward
        return record

    def first(output):
        return output[0] if isinstance(output, (tuple, list)) else output

    try:
        for layer in layers:
            record = tap(layer, stop=layer == layers[-1] and layer < n)
            if layer == 0:
                handles.append(blocks[0].register_forward_pre_hook(
                    lambda m, args, kwargs, r=record: r(args[0] if args else kwargs["hidden_states"]),
                    with_kwargs=True))
            else:
                module = blocks[layer - 1] if layer < n else adapter.lm_final_norm(model)
                handles.append(module.register_forward_hook(lambda m, args, out, r=record: r(first(out))))
        try:
            last_hidden_state(model, adapter, inputs)
        except _StopForward:
            pass
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([got[layer] for layer in layers], 1)


# ---------------------------------------------------------------------------------------------
# paper recipe
# ---------------------------------------------------------------------------------------------

def subject_token(tokenizer, name):
    """The original's target token: the last sub-token of " " + name, as a token string."""
    tokens = tokenizer.tokenize(" " + name)
    if not tokens:
        raise ValueError(f"object name {name!r} tokenizes to nothing")
    return tokens[-1]


def image_token_id(model):
    """The id of the placeholder token(s) a family puts where the image goes in the prompt."""
    config = model.config
    token = getattr(config, "image_token_id", None)
    return token if token is not None else getattr(config, "image_token_index", None)


def first_position(tokens, token, image_path, start=0):
    """Index of the first occurrence of `token` at or after `start` in a row of token strings."""
    try:
        return tokens.index(token, start)
    except ValueError:
        raise ValueError(f"{image_path}: token {token!r} not found in the prompt after the image") from None


def subject_position(tokens, ids, token, image_token, image_path):
    """The original's "first occurrence" of the subject's token, searched after the image
    placeholder: the system prompt comes first, and a name such as "assistant" or "a" would
    otherwise be read from it."""
    image_at = [i for i, t in enumerate(ids) if t == image_token]
    if not image_at:
        raise ValueError(f"{image_path}: no image placeholder (token id {image_token}) in the prompt")
    return first_position(tokens, token, image_path, start=image_at[-1] + 1)


@torch.no_grad()
def hidden_at_subject(model, processor, adapter, pair_items, batch_size, layers=None, bar=None, images=None):
    """[n, len(layers), H] float32: each kept layer's state at the subject b's token, per image.
    `images`: {path: image or grid_sources.LazyGridImage} for images drawn on the fly."""
    layers = resolve_layers(layers, len(adapter.lm_layers(model)))
    tokenizer = processor.tokenizer
    collate = data.VLMCollator(processor, adapter, with_answer=False)
    device = next(model.parameters()).device
    a, b = pair_items[0][1].obj1, pair_items[0][1].obj2
    question = PAPER_QUERY.format(a=a, b=b)
    token = subject_token(tokenizer, b)
    image_token = image_token_id(model)
    samples = [{"image_path": str(path), "question": question, "obj1": a, "obj2": b,
                "obj2_span": (3, 3 + len(b)), "options": data.OPTIONS["lr"], "answer": "",
                **({"image": images[str(path)]} if images else {})}
               for path, _ in pair_items]
    states = []
    for chunk in _batches(samples, batch_size):
        batch = collate(chunk)
        rows = batch["input_ids"].tolist()
        positions = torch.tensor([subject_position(tokenizer.convert_ids_to_tokens(row), row, token, image_token,
                                                   s["image_path"]) for row, s in zip(rows, chunk)])
        inputs, _, _ = data.split_batch(batch, device)
        states.append(collect_states(model, adapter, inputs, positions, layers))
        if bar is not None:
            bar.update(len(chunk))
    return torch.cat(states)


def paper_group(layout):
    """The paper recipe's centring group: the pair and a's (obj1's) cell."""
    return layout.obj1, layout.obj2, layout.cell1


def paper_groups_of_two(items):
    """(the items of groups of >= 2 images, how many groups of one image were left out): one
    image centred over itself is zero. A set with no group of two is an error."""
    sizes = Counter(paper_group(layout) for _, layout in items)
    kept = [(path, layout) for path, layout in items if sizes[paper_group(layout)] >= 2]
    if not kept:
        raise ValueError(f"no group of >= 2 images sharing a pair and a's cell among {len(items)} image(s): "
                         "centring one image leaves zero; use an extraction set (make_grid_data.py --layout extraction)")
    return kept, sum(n < 2 for n in sizes.values())


def derive_paper(model, processor, adapter, items, batch_size=16, progress=True, layers=None, images=None):
    """(ids {(col, row, size): tensor[len(layers), H]}, stats) by the original's procedure over
    [(image path, GridLayout)] with a = obj1 (fixed) and b = obj2 (moving); stats["layer_ids"]
    names the rows (default: every hidden_states index)."""
    layers = resolve_layers(layers, len(adapter.lm_layers(model)))
    items, single = paper_groups_of_two(items)
    by_pair = defaultdict(list)
    for path, layout in items:
        by_pair[(layout.obj1, layout.obj2)].append((path, layout))
    pair_ids = []
    n_groups = 0
    bar = tqdm(total=len(items), desc="spatial IDs (paper)", unit="img", disable=not progress,
               mininterval=1 if sys.stderr.isatty() else 30)
    for pair in sorted(by_pair):
        pair_items = by_pair[pair]
        states = hidden_at_subject(model, processor, adapter, pair_items, batch_size, layers, bar, images)
        by_a_cell = defaultdict(list)
        for i, (_, layout) in enumerate(pair_items):
            by_a_cell[layout.cell1].append(i)
        per_loc = defaultdict(list)  # b's (col, row, size) -> one centred state per a's cell
        for idx in by_a_cell.values():
            centred = states[idx] - states[idx].mean(0, keepdim=True)
            within = defaultdict(list)  # several renders of one layout are averaged first
            for i, state in zip(idx, centred):
                layout = pair_items[i][1]
                within[(*layout.cell2, layout.size)].append(state)
            for loc, rows in within.items():
                per_loc[loc].append(torch.stack(rows).mean(0))
        pair_ids.append({loc: torch.stack(rows).mean(0) for loc, rows in per_loc.items()})
        n_groups += len(by_a_cell)
    bar.close()
    locs = sorted({loc for ids in pair_ids for loc in ids})
    counts = {loc: sum(loc in ids for ids in pair_ids) for loc in locs}
    ids = {loc: torch.stack([p[loc] for p in pair_ids if loc in p]).mean(0) for loc in locs}
    stats = {"images": len(items), "groups": n_groups, "single_image_groups_skipped": single,
             "pairs": len(by_pair), "cells": len(ids),
             "layer_ids": layers, "min_count": min(counts.values()), "counts": counts}
    return ids, stats


# ---------------------------------------------------------------------------------------------
# clean recipe
# ---------------------------------------------------------------------------------------------

def clean_groups(samples):
    """The clean recipe's centring groups of >= 2 questions (one question centred over itself is
    zero); none is an error."""
    groups = [g for g in data.group_indices(samples, range(len(samples))).values() if len(g) >= 2]
    if not groups:
        raise ValueError(f"no group of >= 2 questions with obj1 fixed and obj2 moving among {len(samples)} "
                         "question(s); make grid data with every cell pair (make_grid_data.py)")
    return groups


@torch.no_grad()
def derive(model, processor, adapter, samples, batch_size=16, max_groups=None, seed=0, progress=True, layers=None):
    """({layer: {(col, row, size): mean centred state}}, stats) by the clean recipe over training
    question samples; stats["counts"] is {(col, row, size): number of centred states averaged}.

    Questions are batched across groups (`batch_size` per forward pass, groups kept contiguous);
    a group is centred once all its questions are in, so memory holds at most a batch and the
    groups it touches. `layers`: hidden_states indices to keep (default all)."""
    groups = clean_groups(samples)
    if max_groups and len(groups) > max_groups:
        groups = random.Random(seed).sample(groups, max_groups)
    layers = resolve_layers(layers, len(adapter.lm_layers(model)))
    collate = data.VLMCollator(processor, adapter, with_answer=False)
    device = next(model.parameters()).device
    order = [(g, i) for g, group in enumerate(groups) for i in group]
    sums, squares, counts = {}, {}, defaultdict(int)
    pending = defaultdict(list)  # group -> [(key, state [len(layers), H])] until the group is complete

    def finish(g):
        keys, states = zip(*pending.pop(g))
        states = torch.stack(states)
        states = states - states.mean(0, keepdim=True)
        for key, state in zip(keys, states):
            sums[key] = sums[key] + state if key in sums else state.clone()
            squares[key] = squares[key] + state * state if key in squares else state * state
            counts[key] += 1

    bar = tqdm(total=len(order), desc="spatial IDs (clean)", unit="q", disable=not progress,
               mininterval=1 if sys.stderr.isatty() else 30)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch, positions, cells = data.split_batch(collate([samples[i] for _, i in chunk]), device)
        states = collect_states(model, adapter, batch, positions, layers)
        for (g, _), key, state in zip(chunk, cells, states):
            pending[g].append((key, state))
            if len(pending[g]) == len(groups[g]):
                finish(g)
        bar.update(len(chunk))
    bar.close()
    means = {key: sums[key] / counts[key] for key in sums}
    per_layer = _per_layer(means, layers)
    pairs = {(samples[g[0]]["obj1"], samples[g[0]]["obj2"]) for g in groups}
    hidden_size = int(next(iter(means.values())).shape[-1])
    stats = {"groups": len(groups), "questions": len(order), "pairs": len(pairs),
             "images": len({samples[i]["image_path"] for _, i in order}),
             "cells": len(sums), "layers": len(per_layer), "layer_ids": layers, "hidden_size": hidden_size,
             "min_count": min(counts.values()),
             "relative_stderr": relative_stderr(means, squares, counts, layers),
             "counts": {key: counts[key] for key in sorted(counts)}}
    return per_layer, stats


def relative_stderr(means, squares, counts, layers):
    """{layer: median over cells of ||standard error of the mean|| / ||mean||}: how noisy the
    IDs are (it grows as sqrt(1 / count) when --max_groups keeps fewer groups); None for a
    layer whose IDs are all zero, or when no cell has two states."""
    out = {}
    for j, layer in enumerate(layers):
        ratios = []
        for key, mean in means.items():
            n = counts[key]
            norm = mean[j].norm()
            if n < 2 or not norm > 0:
                continue
            var = (squares[key][j] / n - mean[j] ** 2).clamp_min(0) * n / (n - 1)
            ratios.append(float((var.sum() / n).sqrt() / norm))
        out[layer] = float(torch.tensor(ratios).median()) if ratios else None
    return out


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

RECIPES = {
    "paper": {"template": PAPER_QUERY,
              "token_rule": "first occurrence of the last sub-token of ' ' + b (the moving object, the subject)",
              "centring": "per (pair, a's cell) over all of b's cells and sizes; mean over a's cells, then pairs"},
    "clean": {"template": data.QUESTION_TEMPLATES,
              "token_rule": "obj2's last name token (the reference, the token the loss reads)",
              "centring": "per (pair, obj1's cell, size, question type) over obj2's cells; mean per cell"},
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="alias (tiny, qwen2-2b, ...), hub id, local folder or checkpoint")
    parser.add_argument("--list_models", action=ListModelsAction)
    parser.add_argument("--images", default=None,
                        help="extraction set (make_grid_data.py --layout extraction) or a flat grid folder")
    grid_sources.add_render_args(parser, "--id_objects", "ID-extraction images")
    parser.add_argument("--layout", choices=("extraction", "flat"), default=None,
                        help="with --id_objects: the images of make_grid_data.py --layout extraction (default: "
                             "transparent canvas, nested order) or of its flat training layout")
    parser.add_argument("--out", required=True, help="output .pt, e.g. embeds/universal_id_90/MODEL.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    protocols.add_protocol_arg(parser)
    parser.add_argument("--id_recipe", choices=protocols.PROTOCOLS, default=None,
                        help="paper: the original's procedure; clean: training questions and token "
                             "(default: --protocol)")
    parser.add_argument("--train_question_style", choices=data.QUESTION_STYLES, default=None,
                        help="question wording for the clean recipe (default: --protocol)")
    parser.add_argument("--batch_size", type=int, default=32,
                        help="questions per forward pass (across groups in the clean recipe, within a pair in the paper's)")
    parser.add_argument("--layers", default="all",
                        help="hidden_states indices to derive and store: all (default), or e.g. 11, 6,11, 8-12")
    parser.add_argument("--max_groups", type=int, default=None,
                        help="use at most N groups (seeded subset): each ID averages ~N/(all groups) as many "
                             "states, so its standard error grows by ~sqrt(all groups / N); the clean recipe "
                             "prints the IDs' median relative standard error")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 weights on CUDA")
    args = parser.parse_args(argv)
    grid_sources.check_render_flags(parser, args, "--id_objects")
    if (args.images is None) == (args.id_objects is None):
        parser.error("argument --images: give a folder of images (--images DIR) or objects to draw them from "
                     "(--id_objects DIR|builtin), one of the two")
    if args.layout is not None and args.id_objects is None:
        parser.error("argument --layout: only with --id_objects (a folder of images already has its layout)")
    if args.batch_size < 1:
        parser.error(f"argument --batch_size: must be >= 1, not {args.batch_size}")
    if args.max_groups is not None and args.max_groups < 1:
        parser.error(f"argument --max_groups: must be >= 1, not {args.max_groups}")
    if Path(args.out).exists() and not args.overwrite:
        parser.error(f"argument --out: {args.out} exists; pass --overwrite to replace it")
    problem = output_problem(args.out)
    if problem:
        parser.error(f"argument --out: {problem}")
    args.choices = protocols.resolve(args)
    return args


def _layer_text(layers):
    return f"{layers[0]}..{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else str(layers)


def limit_groups(items, max_groups, seed):
    """A seeded subset of the (pair, a's cell) groups of an extraction set."""
    keys = sorted({(lay.obj1, lay.obj2, lay.cell1) for _, lay in items})
    if not max_groups or len(keys) <= max_groups:
        return items
    kept = set(random.Random(seed).sample(keys, max_groups))
    return [(p, lay) for p, lay in items if (lay.obj1, lay.obj2, lay.cell1) in kept]


def main(argv=None):
    args = parse_args(argv)
    images = None  # {path label: LazyGridImage} when the images are drawn on the fly
    try:
        nested = (args.layout or "extraction") == "extraction"
        renderer = grid_sources.renderer_from_args(args, "--id_objects", transparent=nested)
        if renderer is None:
            items, layout_kind, skipped = data.read_extraction_set(args.images)
            source = str(Path(args.images).resolve())
        else:  # the same images, in the same order, as make_grid_data.py's folder from the same flags
            items, layout_kind, skipped = grid_sources.rendered_items(renderer, nested), "nested" if nested else "flat", []
            images = {str(path): grid_sources.LazyGridImage(renderer, layout) for path, layout in items}
            source = renderer.describe()
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    where = f"--images {args.images}" if args.images else f"--id_objects {args.id_objects}"
    if not items:
        sys.exit(f"error: {where}: no images in the extraction layout or with grid file names "
                 f"({len(skipped)} unparseable)")
    print(f"{where}: {len(items)} images ({layout_kind} layout)"
          + (f"; skipped {len(skipped)} unparseable (first: {skipped[0]})" if skipped else ""))
    # Before the model loads: every image whole (a group missing one would centre on the rest),
    # and at least one centring group of two (one state centred over itself is zero).
    unreadable = [] if images else [(str(path), why) for path, _ in items if (why := data.image_problem(path))]
    if unreadable:
        sys.exit(f"error: --images {args.images}: {len(unreadable)} of {len(items)} images cannot be read "
                 f"(first: {unreadable[0][0]}, {unreadable[0][1]})")
    try:
        if args.id_recipe == "paper":
            _, single = paper_groups_of_two(items)
            if single:
                print(f"warning: {single} (pair, a's cell) group(s) of one image left out: one image centred "
                      "over itself is zero", file=sys.stderr)
        else:
            samples = data.questions_for_images(items, args.train_question_style)
            clean_groups(samples)
    except ValueError as err:
        sys.exit(f"error: {where}: {err}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.bf16 and device == "cuda" else torch.float32
    try:
        checked_model = model_source(args.model)  # a name or folder that cannot be had, found before the load
        model, processor, adapter = load_model_and_processor(args.model, dtype=dtype, device=device, source=checked_model)
    except ModelUnavailableError as err:
        sys.exit(f"error: --model {err}")

    started = time.time()
    try:
        layers = resolve_layers(args.layers, len(adapter.lm_layers(model)))
    except ValueError as err:
        sys.exit(f"error: --layers: {err}")
    try:
        if args.id_recipe == "paper":
            items = limit_groups(items, args.max_groups, args.seed)
            ids, stats = derive_paper(model, processor, adapter, items, args.batch_size, layers=layers, images=images)
            per_layer = _per_layer(ids, layers)
        else:
            for sample in samples if images else ():
                sample["image"] = images[sample["image_path"]]
            per_layer, stats = derive(model, processor, adapter, samples, args.batch_size, args.max_groups,
                                      args.seed, layers=layers)
    except ValueError as err:  # a token not found, no usable group: the data's fault, named
        sys.exit(f"error: {err}")
    seconds = time.time() - started
    x_axis, y_axis = {}, {}
    for layer, layer_ids in per_layer.items():
        x_axis[layer], y_axis[layer] = axis_directions(layer_ids)
    save_universal_ids(args.out, per_layer, x_axis={k: v for k, v in x_axis.items() if v is not None} or None,
                       y_axis={k: v for k, v in y_axis.items() if v is not None} or None)

    recipe = RECIPES[args.id_recipe]
    first_layer = per_layer[layers[0]]
    hidden_size = int(next(iter(first_layer.values())).shape[0])
    pairs = sorted({(lay.obj1, lay.obj2) for _, lay in items})
    write_provenance(args.out, {
        "model": args.model, "model_id": resolve_model_name(args.model), "model_type": model.config.model_type,
        "hidden_size": hidden_size, "protocol": args.protocol, "choices": args.choices,
        "images": source, "layout": layout_kind, "object_pairs": pairs,
        "template": recipe["template"], "token_rule": recipe["token_rule"], "centring": recipe["centring"],
        "question_style": args.train_question_style if args.id_recipe == "clean" else None,
        "layers": sorted(per_layer), "counts": {k: v for k, v in stats.items() if k != "counts"},
        "seconds": round(seconds, 1), **run_metadata(),
    })
    sizes = sorted({key[2] for key in first_layer})
    noise = stats.get("relative_stderr", {}).get(layers[-1])
    n_images = stats["images"]
    print(f"{n_images} images in {seconds:.1f} s ({n_images / max(seconds, 1e-9):.1f} images/s)"
          + (f"; median relative standard error of the layer-{layers[-1]} IDs: {noise:.3f}" if noise else ""))
    print(f"wrote {args.out} ({args.id_recipe} recipe): layers {_layer_text(layers)}, {stats['cells']} "
          f"(col, row, size) IDs (sizes {sizes}), hidden size {hidden_size}, from {stats['pairs']} object pairs, "
          f"{stats['groups']} groups (fewest averaged per ID: {stats['min_count']}); provenance "
          f"{Path(args.out).with_suffix('.json')}")
    return per_layer, stats


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ModelUnavailableError) as err:  # user-facing: no traceback
        sys.exit(f"error: {err}")
