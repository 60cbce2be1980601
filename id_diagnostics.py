"""Does a model hold universal spatial IDs, and at which layer? Diagnostics for an ID file and the
model it came from, before any GPU hour is spent on the spatial loss.

    python id_diagnostics.py --ids embeds/universal_id_90/qwen2-2b.pt          # model, images: provenance
    python id_diagnostics.py --ids IDS.pt --model M --images DIR --layers 5-15 --out runs/id_diagnostics/m

The spatial loss pulls the batch-centred state at obj2's last name token towards one ID per
(column, row, size), shared by every object. That only makes sense if the model already holds
such a code. Three views, per LM layer (`hidden_states[L]`, 0 = embeddings):

Figure 5 (the ID file alone): each cell's ID projected on the plane of the x and y axes
(`<stem>_x_axis.pt`, `<stem>_y_axis.pt`: mean steps between neighbouring columns and rows),
coloured by (column, row), with the share of the IDs' variance the plane holds and the Spearman
correlation of each projected coordinate with the column and the row (a grid code is monotone).
The axes come from the IDs themselves (the x axis telescopes to the mean of column 3's IDs minus
column 0's), so even IDs shuffled across cells score a positive rho, 0.2 to 0.4 in the tests;
a grid code scores above 0.9.

Universality (the model, run over the extraction images with the training question, read at
the token the loss reads; states centred per group: pair, obj1's cell, size, question type):
- R² of obj2's cell on the centred state, within each object pair and pooled over pairs. A
  universal code explains as much pooled as within pairs; a per-object code only within;
- the size of the cell-explained part (RMS of the pooled per-cell means) relative to the raw
  state. Near 0 means the position signal is a rounding-level leak (rotary mixing of the image
  tokens in a random model), not a code the model uses;
- ID agreement: cosine between the per-cell IDs of one unordered object pair and those of the
  pairs that share no object with it (each centred over the cells), averaged;
- a linear probe: ridge classifier of obj2's (column, row) from the centred state, trained on
  the pairs that share no object with the test pair, accuracy over all test pairs (chance 1/16);
- the spatial loss the ID file gives at step 0: 1 - mean cos(batch-centred state, ID of obj2's
  cell), over the batches the spatial arm's sampler forms (`--sampler`, `--loss_batch_size`).
  Under the paper protocol those batches mix both question types and all sizes, so the centred
  state also carries the question's wording: this loss can be near 1 where the group-centred
  statistics above show a clean code.

Writes `diagnostics.md`, `diagnostics.json` and `figure5.png` to `--out` and prints the table,
naming the most universal layer beside the layer the run scripts train (11).
"""
import argparse
import json
import math
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

import checkpoints
import data
import protocols
import spatial_loss as sl
from derive_spatial_ids import axis_directions, collect_states, resolve_layers
from models import ListModelsAction, ModelUnavailableError
from output_paths import output_problem

# Below this ratio of the cell-explained part to the raw state, the position signal is treated as
# leakage, not a learnt code: set between the random `tiny` (0.0042 at layer 11: rotary leakage) and
# tiny-warm (0.019), docs/spatial-ids.md; on a real model read the column, not only the flag.
LEARNT_CODE_MIN_RATIO = 0.01
DEFAULT_MAX_GROUPS = 400
UNIVERSAL_MIN_AGREEMENT = 0.5  # IDs of pairs sharing no object agree at least this much: a shared code
ROUNDING_LEVEL = 1e-5  # centred / raw state below this is float32 rounding, not variation
PROBE_RIDGE = 1e-2  # ridge strength relative to the mean eigenvalue of the features' Gram matrix


# ---------------------------------------------------------------------------------------------
# Figure 5: the IDs on the plane of the x / y axes
# ---------------------------------------------------------------------------------------------

def ranks(values):
    """Ranks from 0, ties sharing their mean rank."""
    values = [float(v) for v in values]
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2
        i = j + 1
    return out


def spearman(a, b):
    """Spearman's rank correlation (ties averaged); None when either side is constant."""
    ra, rb = torch.tensor(ranks(a), dtype=torch.float64), torch.tensor(ranks(b), dtype=torch.float64)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = ra.norm() * rb.norm()
    return float(ra @ rb / denominator) if denominator > 0 else None


def plane_projection(ids, x_axis, y_axis):
    """Each ID's coordinates on the plane spanned by the x and y axes (orthonormalised, x first),
    after centring the IDs over the cells. Returns {"keys", "coords" [K, 2], "plane_share" (of
    the centred IDs' variance), "rho_col", "rho_row"}."""
    keys = sorted(ids)
    stacked = torch.stack([ids[k].double() for k in keys])
    centred = stacked - stacked.mean(0, keepdim=True)
    e1 = x_axis.double() / x_axis.double().norm()
    y = y_axis.double() - (y_axis.double() @ e1) * e1
    e2 = y / y.norm()
    coords = centred @ torch.stack([e1, e2], 1)
    total = float((centred ** 2).sum())
    return {"keys": keys, "coords": coords,
            "plane_share": float((coords ** 2).sum()) / total if total > 0 else None,
            "rho_col": spearman(coords[:, 0].tolist(), [k[0] for k in keys]),
            "rho_row": spearman(coords[:, 1].tolist(), [k[1] for k in keys])}


def read_axes(ids_path, ids_per_layer):
    """{layer: (x_axis, y_axis)}: from `<stem>_x_axis.pt` / `_y_axis.pt`, or computed from the IDs
    (mean neighbour differences, as derive_spatial_ids.py writes them) where a file lacks a layer."""
    files = {}
    for name, path in zip(("x", "y"), sl.axis_paths(ids_path)):
        files[name] = torch.load(path, map_location="cpu", weights_only=True) if Path(path).is_file() else {}
    axes = {}
    for layer, ids in ids_per_layer.items():
        x, y = files["x"].get(layer), files["y"].get(layer)
        if x is None or y is None:
            computed = axis_directions(ids)
            x, y = x if x is not None else computed[0], y if y is not None else computed[1]
        if x is not None and y is not None and x.norm() > 0 and y.norm() > 0:
            axes[layer] = (x.float(), y.float())
    return axes


def cell_colour(col, row):
    """A bivariate colour: red grows with the column, blue with the row (white-ish top-left)."""
    last = data.GRID - 1
    return (0.15 + 0.8 * col / last, 0.35 + 0.3 * (1 - abs(col - row) / last), 0.15 + 0.8 * row / last)


def plot_figure5(projections, path, title):
    """Small multiples, one panel per layer: the projected IDs, a mesh joining neighbouring cells
    of each size (a grid code draws a grid), coloured by (column, row)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(projections)
    cols = min(5, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows + 0.4), squeeze=False)
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    for ax, layer in zip(axes.flat, layers):
        p = projections[layer]
        where = {key: p["coords"][i].tolist() for i, key in enumerate(p["keys"])}
        for (col, row, size), (u, v) in where.items():
            for step in ((1, 0), (0, 1)):
                neighbour = where.get((col + step[0], row + step[1], size))
                if neighbour is not None:
                    ax.plot([u, neighbour[0]], [v, neighbour[1]], color="0.75", lw=0.8, zorder=1)
        sizes = sorted({k[2] for k in where})
        for (col, row, size), (u, v) in where.items():
            ax.scatter([u], [v], color=cell_colour(col, row), marker="os^D"[sizes.index(size) % 4], s=36,
                       edgecolors="k", linewidths=0.4, zorder=2)
        share = "-" if p["plane_share"] is None else f"{p['plane_share']:.0%}"
        rho = lambda r: "-" if r is None else f"{r:+.2f}"  # noqa: E731
        ax.set_title(f"layer {layer}: plane {share}\nρ col {rho(p['rho_col'])}, ρ row {rho(p['rho_row'])}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("x axis", fontsize=8)
        ax.set_ylabel("y axis (orthogonalised)", fontsize=8)
        ax.invert_yaxis()  # row 0 is the top of the image
    fig.suptitle(title + "\ncolour: red grows with the column, blue with the row; marker: object size", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Universality: statistics of centred states (pure tensor code, tested on constructed data)
# ---------------------------------------------------------------------------------------------

def centre_by_group(states, groups):
    """states [N, ..., H] minus the mean of its group (any hashable per row)."""
    rows = defaultdict(list)
    for i, g in enumerate(groups):
        rows[g].append(i)
    centred = states.clone()
    for idx in rows.values():
        idx = torch.tensor(idx)
        centred[idx] -= states[idx].mean(0, keepdim=True)
    return centred


def means_by(states, labels):
    """{label: mean of the rows with that label}."""
    rows = defaultdict(list)
    for i, label in enumerate(labels):
        rows[label].append(i)
    return {label: states[torch.tensor(idx)].mean(0) for label, idx in rows.items()}


def r_squared(centred, labels, means=None):
    """Share of the centred states' sum of squares explained by per-label means (`means_by`,
    computed here unless given); None if zero."""
    means = means if means is not None else means_by(centred, labels)
    fitted = torch.stack([means[label] for label in labels])
    total = float((centred ** 2).sum())
    return 1 - float(((centred - fitted) ** 2).sum()) / total if total > 0 else None


def disjoint_pairs(pairs):
    """{pair: [the other pairs that share no object with it]} for unordered pairs (frozensets)."""
    unique = sorted(set(pairs), key=sorted)
    return {p: [q for q in unique if not p & q] for p in unique}


def id_agreement(centred, keys, pairs):
    """Mean over unordered pairs of the cosine between the pair's per-cell IDs and the IDs of the
    pairs sharing no object with it, both centred over their common cells; None without two
    such pairs."""
    partners = disjoint_pairs(pairs)
    scores = []
    for pair, others in partners.items():
        if not others:
            continue
        mine = [i for i, p in enumerate(pairs) if p == pair]
        rest = [i for i, p in enumerate(pairs) if p in set(others)]
        a = means_by(centred[mine], [keys[i] for i in mine])
        b = means_by(centred[rest], [keys[i] for i in rest])
        common = sorted(set(a) & set(b))
        if len(common) < 2:
            continue
        a = torch.stack([a[k] for k in common]).double()
        b = torch.stack([b[k] for k in common]).double()
        a, b = a - a.mean(0), b - b.mean(0)
        scores.append(float(torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-30).mean()))
    return sum(scores) / len(scores) if scores else None


def probe_accuracy(centred, cells, pairs, ridge=PROBE_RIDGE):
    """Accuracy of a ridge classifier of `cells` (any hashable, e.g. (col, row)) from the centred
    states, each unordered pair tested by a probe fitted on the pairs sharing no object with it;
    None without two such pairs."""
    classes = sorted(set(cells))
    index = {c: i for i, c in enumerate(classes)}
    x_all = centred.double()
    x_all = x_all / x_all.norm(dim=-1).mean().clamp_min(1e-300)  # scale-free: leakage-sized states too
    correct = total = 0
    for pair, others in disjoint_pairs(pairs).items():
        if not others:
            continue
        train = torch.tensor([i for i, p in enumerate(pairs) if p in set(others)])
        test = torch.tensor([i for i, p in enumerate(pairs) if p == pair])
        x, target = x_all[train], torch.zeros(len(train), len(classes), dtype=torch.float64)
        target[torch.arange(len(train)), torch.tensor([index[cells[i]] for i in train.tolist()])] = 1
        mean_x, mean_t = x.mean(0), target.mean(0)
        x, target = x - mean_x, target - mean_t
        gram = x.T @ x
        strength = ridge * float(gram.diagonal().mean()) + 1e-12
        weights = torch.linalg.solve(gram + strength * torch.eye(gram.shape[0], dtype=gram.dtype), x.T @ target)
        predicted = ((x_all[test] - mean_x) @ weights + mean_t).argmax(1)
        truth = torch.tensor([index[cells[i]] for i in test.tolist()])
        correct += int((predicted == truth).sum())
        total += len(test)
    return correct / total if total else None


def spatial_loss_over_batches(raw, keys, ids, batches):
    """The spatial loss these IDs give before training: per batch (lists of row indices, as the
    training sampler forms them), 1 - mean cos(batch-centred state, ID of its cell), averaged
    over batches; None when a batch has a cell without an ID or no batch is given."""
    losses = []
    for idx in batches:
        if any(keys[i] not in ids for i in idx):
            return None
        x = raw[idx].float()
        x = x - x.mean(0, keepdim=True)
        targets = torch.stack([ids[keys[i]].float() for i in idx])
        losses.append(1 - float(torch.nn.functional.cosine_similarity(x, targets, dim=-1, eps=1e-8).mean()))
    return sum(losses) / len(losses) if losses else None


def universality(raw, centred, keys, pairs):
    """Per-layer statistics of one layer's states: raw [N, H], centred [N, H]; keys[i] = obj2's
    (col, row, size), pairs[i] = the unordered object pair (frozenset). Where centring leaves
    only float rounding (the input embeddings: a token's embedding ignores the image), every
    statistic but the cell part is None rather than a number computed on noise."""
    cell_means = means_by(centred, keys)
    explained = torch.stack([cell_means[k] for k in keys])
    raw_rms = float(raw.double().pow(2).sum(-1).mean().sqrt())
    centred_rms = float(centred.double().pow(2).sum(-1).mean().sqrt())
    if not raw_rms > 0 or centred_rms / raw_rms < ROUNDING_LEVEL:
        return {"r2_within_pair": None, "r2_pooled": None, "cell_part_ratio": 0.0 if raw_rms > 0 else None,
                "id_agreement": None, "probe_accuracy": None}
    return {
        "r2_within_pair": r_squared(centred, [(p, k) for p, k in zip(pairs, keys)]),
        "r2_pooled": r_squared(centred, keys, cell_means),
        "cell_part_ratio": float(explained.double().pow(2).sum(-1).mean().sqrt()) / raw_rms if raw_rms > 0 else None,
        "id_agreement": id_agreement(centred, keys, pairs),
        "probe_accuracy": probe_accuracy(centred, [k[:2] for k in keys], pairs),
    }


# ---------------------------------------------------------------------------------------------
# States from the model
# ---------------------------------------------------------------------------------------------

def limit_groups(samples, max_groups, seed=0):
    """A seeded subset of whole (obj1, obj1's cell, obj2) groups, spread evenly over the ordered
    object pairs (so that every pair keeps IDs of its own); such a group holds whole centring
    groups and whole batches of either spatial sampler. All samples when max_groups is None or
    not exceeded."""
    groups = defaultdict(list)
    for i, sample in enumerate(samples):
        groups[data.obj1_group_key(sample)].append(i)
    if not max_groups or len(groups) <= max_groups:
        return samples
    by_pair = defaultdict(list)
    for key in sorted(groups, key=str):
        by_pair[(key[0], key[2])].append(key)
    per_pair = max(1, max_groups // len(by_pair))
    rng = random.Random(seed)
    kept = [key for pair in sorted(by_pair) for key in rng.sample(by_pair[pair], min(per_pair, len(by_pair[pair])))]
    return [samples[i] for key in kept for i in groups[key]]


def collect_loss_token_states(model, processor, adapter, samples, layers, batch_size=32, progress=True):
    """[N, len(layers), H] float32: hidden_states[layer] at obj2's last name token (the token the
    spatial loss reads) of each sample's training question, without the answer."""
    collate = data.VLMCollator(processor, adapter, with_answer=False)
    device = next(model.parameters()).device
    states = []
    bar = tqdm(total=len(samples), desc="states at obj2's token", unit="q", disable=not progress,
               mininterval=1 if sys.stderr.isatty() else 30)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        inputs, positions, _ = data.split_batch(collate(chunk), device)
        states.append(collect_states(model, adapter, inputs, positions, layers))
        bar.update(len(chunk))
    bar.close()
    return torch.cat(states)


def diagnose_states(raw, samples, layers, ids_per_layer=None, loss_batches=None):
    """{layer: statistics} from [N, len(layers), H] states of `samples`, centred per group (pair,
    obj1's cell, size, question type: only obj2's cell varies within one); with the ID file's
    {layer: {key: ID}} and the training sampler's batches (lists of sample indices), also the
    spatial loss those IDs give at step 0 over those batches."""
    keys = [(*s["cell2"], s["size"]) for s in samples]
    pairs = [frozenset((s["obj1"], s["obj2"])) for s in samples]
    centred = centre_by_group(raw, [data.group_key(s) for s in samples])
    out = {}
    for j, layer in enumerate(layers):
        stats = universality(raw[:, j], centred[:, j], keys, pairs)
        ids = (ids_per_layer or {}).get(layer)
        rounding = stats["r2_pooled"] is None  # nothing but float rounding varies at this layer
        stats["spatial_loss_step0"] = (spatial_loss_over_batches(raw[:, j], keys, ids, loss_batches)
                                       if ids and loss_batches and not rounding else None)
        out[layer] = stats
    return out


def most_universal_layer(stats):
    """The layer with the highest ID agreement (pooled R² where agreement is unavailable) among
    layers whose cell-explained part is at least LEARNT_CODE_MIN_RATIO of the raw state; None when
    no layer qualifies."""
    def score(s):
        return s["id_agreement"] if s["id_agreement"] is not None else s["r2_pooled"]

    usable = [layer for layer, s in stats.items() if layer > 0 and (s["cell_part_ratio"] or 0) >= LEARNT_CODE_MIN_RATIO
              and score(s) is not None]
    return max(usable, key=lambda layer: score(stats[layer])) if usable else None


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def _f(value, digits=2, percent=False):
    if value is None:
        return "-"
    return f"{value:.0%}" if percent else f"{value:.{digits}f}"


HEADER = ["layer", "plane share", "ρ col", "ρ row", "R² within pair", "R² pooled", "cell part / state",
          "ID agreement", "probe acc.", "spatial loss @0", ""]


def table_rows(layers, projections, stats, train_layer, best):
    rows = []
    for layer in layers:
        p, s = projections.get(layer, {}), stats.get(layer, {})
        mark = []
        if layer == train_layer:
            mark.append("← run scripts' layer")
        if layer == best:
            mark.append("← highest agreement")
        rows.append([str(layer), _f(p.get("plane_share"), percent=True), _f(p.get("rho_col")), _f(p.get("rho_row")),
                     _f(s.get("r2_within_pair")), _f(s.get("r2_pooled")), _f(s.get("cell_part_ratio"), 4),
                     _f(s.get("id_agreement")), _f(s.get("probe_accuracy")), _f(s.get("spatial_loss_step0"), 3),
                     ", ".join(mark)])
    return rows


def text_table(rows):
    widths = [max(len(HEADER[i]), *(len(r[i]) for r in rows)) for i in range(len(HEADER))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(HEADER)] + [line(r) for r in rows])


def verdict(stats, train_layer, best):
    """Plain sentences on what the table says about the layer the run scripts train."""
    if not stats:
        return ["Universality was not measured (no model or images)."]
    lines = []
    if best is None:
        lines.append(f"No layer holds a learnt cell code: the cell-explained part is under "
                     f"{LEARNT_CODE_MIN_RATIO:.0%} of the state everywhere (leakage, not a code the model uses).")
    else:
        agreement = stats[best]["id_agreement"]
        if agreement is not None and agreement < UNIVERSAL_MIN_AGREEMENT:
            lines.append(f"No layer holds universal IDs: the highest ID agreement across object pairs is "
                         f"{agreement:.2f}, at layer {best} (a shared code would reach {UNIVERSAL_MIN_AGREEMENT}).")
        else:
            lines.append(f"Most universal layer: {best} (ID agreement {_f(agreement)}, the highest among layers "
                         f"whose cell part is >= {LEARNT_CODE_MIN_RATIO:.0%} of the state).")
    s = stats.get(train_layer)
    if s is None:
        lines.append(f"Layer {train_layer} (the run scripts') was not measured: this model's hidden states are "
                     f"0..{max(stats)} here; give train.py a --spatial_id_layer that exists.")
    else:
        leak = (s["cell_part_ratio"] or 0) < LEARNT_CODE_MIN_RATIO
        lines.append(f"Layer {train_layer} (the run scripts'): pooled R² {_f(s['r2_pooled'])} against "
                     f"{_f(s['r2_within_pair'])} within pairs, ID agreement {_f(s['id_agreement'])}, cell part "
                     f"{_f(s['cell_part_ratio'], 4)} of the state" + (" (leakage)" if leak else "") + ".")
    return lines


def write_report(out, info, layers, projections, stats, train_layer, best, figure):
    rows = table_rows(layers, projections, stats, train_layer, best)
    md = ["# Spatial-ID diagnostics", "",
          f"IDs: `{info['ids']}`; model: `{info.get('model') or '-'}`; images: `{info.get('images') or '-'}` "
          f"({info.get('questions', 0)} questions, {info.get('groups', 0)} groups, {info.get('pairs', 0)} ordered pairs); "
          f"question style: {info.get('question_style') or '-'}.", "",
          "| " + " | ".join(HEADER[:-1] + ["note"]) + " |", "|" + "---|" * len(HEADER)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += ["", *verdict(stats, train_layer, best), "",
           "Columns: *plane share*, the share of the IDs' variance on the plane of the x/y axes; *ρ col / ρ row*, "
           "Spearman correlation of the projected coordinates with the column and row (Figure 5); *R²*, share of "
           "the group-centred state at obj2's token explained by obj2's cell, within each object pair and pooled "
           "over pairs; *cell part / state*, RMS of the pooled per-cell means over RMS of the raw state; *ID "
           "agreement*, cosine between one pair's per-cell IDs and those of the pairs sharing no object with it; "
           "*probe acc.*, ridge probe of obj2's (column, row) trained on the other pairs (chance 0.06); *spatial "
           "loss @0*, the loss these IDs give before training, averaged over the spatial arm's batches "
           f"({info.get('sampler') or '-'}, {info.get('loss_batch_size') or '-'} questions).", "",
           f"![Figure 5: IDs on the plane of the x/y axes]({figure.name})", ""]
    (out / "diagnostics.md").write_text("\n".join(md))
    record = {"info": info, "train_layer": train_layer, "most_universal_layer": best,
              "layers": {str(layer): {**{k: v for k, v in projections.get(layer, {}).items() if k not in ("keys", "coords")},
                                      **stats.get(layer, {})} for layer in layers}}
    (out / "diagnostics.json").write_text(json.dumps(record, indent=2) + "\n")
    return rows


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ids", required=True, help="universal IDs (derive_spatial_ids.py); its .json names the model and images")
    p.add_argument("--model", default=None,
                   help="alias, hub id, folder or train.py checkpoint-N (default: the IDs' provenance)")
    p.add_argument("--list_models", action=ListModelsAction)
    p.add_argument("--images", default=None, help="extraction set or flat grid folder (default: the IDs' provenance)")
    p.add_argument("--layers", default=None,
                   help="hidden_states indices, e.g. 11, 5-15 (default: the IDs file's layers)")
    p.add_argument("--out", default=None, help="folder for the report (default runs/id_diagnostics/<ids stem>)")
    p.add_argument("--checkpoints", nargs="+", default=None, metavar="CHECKPOINT",
                   help="instead of --model: several train.py checkpoint-N folders, diagnosed in this one process "
                        "(the images and questions prepared once), each report in --out/<checkpoint folder name>")
    p.add_argument("--out_in_runs", action="store_true",
                   help="with --checkpoints, for checkpoints of several runs: each report in the run's own "
                        "RUN/id_diagnostics/<checkpoint folder name> instead of --out (reproduce.py "
                        "--diagnose_checkpoints: one process for the sweep)")
    protocols.add_protocol_arg(p)
    p.add_argument("--train_question_style", choices=data.QUESTION_STYLES, default=None,
                   help="question wording, as in training (default: --protocol)")
    p.add_argument("--sampler", choices=[name for name, keeps_obj1 in data.SAMPLERS.items() if keeps_obj1],
                   default=None, help="the spatial arm's batches, over which the step-0 loss is averaged "
                                      "(default: --protocol's, obj1_groups under paper)")
    p.add_argument("--loss_batch_size", type=int, default=15,
                   help="their size (default 15, the run scripts' --batch_size)")
    p.add_argument("--spatial_id_layer", type=int, default=sl.DEFAULT_SPATIAL_ID_LAYER,
                   help="the layer the run scripts train, marked in the table")
    p.add_argument("--max_groups", type=int, default=DEFAULT_MAX_GROUPS,
                   help="(obj1, obj1's cell, obj2) groups kept (seeded, spread over the pairs); 0 = all")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="bfloat16 weights on CUDA")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"argument --batch_size: must be >= 1, not {args.batch_size}")
    if args.loss_batch_size < 2:
        p.error(f"argument --loss_batch_size: the loss centres over a batch, so it must be >= 2, not {args.loss_batch_size}")
    if args.max_groups < 0:
        p.error(f"argument --max_groups: must be >= 0 (0 = all), not {args.max_groups}")
    if args.checkpoints and args.model:
        p.error("argument --checkpoints: not with --model (each checkpoint names its model)")
    if args.out_in_runs and not args.checkpoints:
        p.error("argument --out_in_runs: only with --checkpoints")
    if args.out_in_runs and args.out:
        p.error("argument --out_in_runs: not with --out (each report goes into its checkpoint's run folder)")
    args.out = Path(args.out or Path("runs") / "id_diagnostics" / Path(args.ids).stem)
    outs = [_report_folder(args, c).parent for c in args.checkpoints] if args.out_in_runs else [args.out]
    for out in dict.fromkeys(outs):
        problem = output_problem(out, kind="folder")
        if problem:
            p.error(f"argument {'--checkpoints' if args.out_in_runs else '--out'}: {problem}")
    protocols.resolve(args, arm="spatial")
    return args


def _report_folder(args, checkpoint):
    """Where one of --checkpoints gets its report: --out/<its name>, or with --out_in_runs its own
    run's RUN/id_diagnostics/<its name>."""
    checkpoint = Path(checkpoint)
    return (checkpoint.parent / "id_diagnostics" if args.out_in_runs else args.out) / checkpoint.name


def main(argv=None):
    """The diagnostics of --model (a dict: stats, projections, best, out), or of each of
    --checkpoints (a list of such dicts, in their order)."""
    args = parse_args(argv)
    try:
        ids_per_layer = sl.load_all_universal_ids(args.ids)
        provenance = sl.read_provenance(args.ids) or {}
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: --ids {err}")
    if args.checkpoints:
        targets = [(str(c), _report_folder(args, c)) for c in args.checkpoints]
    else:
        targets = [(args.model or provenance.get("model"), args.out)]
    images = args.images or provenance.get("images")
    measure = targets[0][0] is not None and images is not None
    samples, checked = [], {}
    if measure:
        for model_name, _ in targets:  # one that cannot be had: before any work
            try:
                checked[model_name] = checkpoints.check_checkpoint_source(model_name)
            except (ModelUnavailableError, checkpoints.CheckpointError) as err:
                sys.exit(f"error: {'--checkpoints' if args.checkpoints else '--model'} {err}")
        try:
            items, layout_kind, _ = data.read_extraction_set(images)
        except (FileNotFoundError, ValueError) as err:
            sys.exit(f"error: {'--images' if args.images else '--images (from the IDs provenance)'} {err}")
        if not items:
            sys.exit(f"error: --images {images}: no images in the extraction layout or with grid file names")
        samples = limit_groups(data.questions_for_images(items, args.train_question_style), args.max_groups or None,
                               args.seed)
    else:
        print(f"note: {args.ids} has no provenance naming its model and images, and --model/--images were not "
              "given: Figure 5 only, no universality")

    # Figure 5 needs only the file.
    axes = read_axes(args.ids, ids_per_layer)
    projections = {layer: plane_projection(ids_per_layer[layer], *axes[layer]) for layer in axes}
    results = [_diagnose(args, model_name, checked.get(model_name), out, images, samples, ids_per_layer, projections)
               for model_name, out in targets]
    return results if args.checkpoints else results[0]


def _diagnose(args, model_name, checked_model, out, images, samples, ids_per_layer, projections):
    """One model's diagnostics (`samples` empty: Figure 5 only) and its report in `out`."""
    measure = bool(samples)
    stats, info = {}, {"ids": str(args.ids), "model": model_name, "images": str(images) if images else None,
                       "question_style": args.train_question_style if measure else None,
                       "sampler": args.sampler if measure else None, "loss_batch_size": args.loss_batch_size}
    layers = sorted(ids_per_layer)
    if measure:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if args.bf16 and device == "cuda" else torch.float32
        try:
            model, processor, adapter = checkpoints.load_checkpoint_model(model_name, dtype=dtype, device=device,
                                                                          source=checked_model)
            n_layers = len(adapter.lm_layers(model))
            layers = resolve_layers(args.layers, n_layers) if args.layers else [l for l in layers if l <= n_layers]
        except ModelUnavailableError as err:
            sys.exit(f"error: --model {err}")
        except ValueError as err:
            sys.exit(f"error: --layers {err}")
        started = time.time()
        raw = collect_loss_token_states(model, processor, adapter, samples, layers, args.batch_size)
        del model
        sampler = data.make_batch_sampler(args.sampler, samples, range(len(samples)), args.loss_batch_size, args.seed)
        stats = diagnose_states(raw, samples, layers, ids_per_layer, list(sampler))
        info.update(questions=len(samples), groups=len({data.group_key(s) for s in samples}),
                    pairs=len({(s["obj1"], s["obj2"]) for s in samples}), seconds=round(time.time() - started, 1))
    elif args.layers:
        layers = [l for l in resolve_layers(args.layers, max(layers)) if l in ids_per_layer]
    best = most_universal_layer(stats) if stats else None

    out.mkdir(parents=True, exist_ok=True)
    figure = out / "figure5.png"
    plot_figure5({l: projections[l] for l in layers if l in projections}, figure,
                 f"{Path(args.ids).name}: universal IDs on the plane of the x/y axes")
    rows = write_report(out, info, layers, projections, stats, args.spatial_id_layer, best, figure)
    print(text_table(rows))
    print("\n".join(verdict(stats, args.spatial_id_layer, best)))
    print(f"report: {out / 'diagnostics.md'}\nfigure: {figure}")
    return {"stats": stats, "projections": projections, "best": best, "out": out}


if __name__ == "__main__":
    main()
