"""The spatial-ID auxiliary loss: file I/O of the universal spatial IDs, the loss module, and a
one-hook capture of one LM layer's hidden states.

The loss (Kang et al., spatial finetuning): at LM layer L take the hidden state at obj2's last
name token for every sample of a batch in which obj1 stays put and obj2 moves, centre those states
over the batch, and ask each centred state to point along the universal spatial ID of obj2's cell:

    loss = 1 - mean_i cos(h_i - mean_j h_j, ID[cell_i])

IDs file format (compatible with the original code)::

    torch.save({layer_int: {"universal": {(col, row, size): tensor[hidden]}}}, path)

Layer numbering follows HF `output_hidden_states`: 0 = the LM's input embeddings (image features
merged in), 1..N-1 = output of decoder layer L-1, N = output after the LM's final norm.

Unlike the original, nothing here ever falls back to a zero loss: a missing layer, cell or a
wrong hidden size is an error that names it.
"""
import contextlib
import json
import os
import pickle
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models import resolve_model_name

DERIVE_HINT = "python derive_spatial_ids.py --model M --images DIR --out PATH"
DEFAULT_SPATIAL_ID_LAYER = 11  # the original's: train.py --spatial_id_layer, id_diagnostics.py
HEADS = ("none", "linear")


# ---------------------------------------------------------------------------------------------
# Keys and file I/O
# ---------------------------------------------------------------------------------------------

def cell_key(cell):
    """(col, row, size) as a tuple of plain ints (accepts lists, tuples, 0-d tensors)."""
    try:
        key = tuple(int(v) for v in cell)
    except (TypeError, ValueError):
        raise ValueError(f"cell {cell!r} is not a (col, row, size) triple of integers") from None
    if len(key) != 3:
        raise ValueError(f"cell {cell!r} is not a (col, row, size) triple")
    return key


def _layer_int(key):
    if isinstance(key, bool):
        return None
    if isinstance(key, int):
        return key
    if isinstance(key, str) and key.strip().isdigit():
        return int(key.strip())
    return None


def _format_keys(keys, limit=10):
    keys = sorted(keys)
    shown = ", ".join(str(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _layer_span(layers):
    """'0..28' for a contiguous run of layer numbers, else the sorted list; 'none' when empty."""
    layers = sorted(layers)
    if not layers:
        return "none"
    contiguous = len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1))
    return f"{layers[0]}..{layers[-1]}" if contiguous else str(layers)


def _cut(text, limit=100):
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _read_ids_file(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"universal spatial IDs file not found: {path}. Derive it with: {DERIVE_HINT}"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        m = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if m:
            raise ValueError(
                f"{path}: holds a non-tensor object ({m.group(1)[:60]}), which is never unpickled (only "
                "tensors, dicts, lists, strings, numbers); re-save it as tensors or re-derive it") from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        raise ValueError(f"{path}: not a readable torch.save file "
                         f"({_cut(detail.group(1).strip() if detail else text.splitlines()[0])})") from None
    except Exception as err:  # truncated, text, or otherwise not a torch.save archive: torch raises many types
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{path}: not a readable torch.save file ({type(err).__name__}: {_cut(first)})") from None


def load_universal_ids(path, layer, hidden_size, needed_keys=None):
    """{(col, row, size): float32 tensor[hidden_size]} of one layer from an IDs file.

    Always loads with `weights_only=True`. Raises with a message naming the file and layer when
    the layer is absent, a vector has the wrong size or is not finite/non-zero, or one of
    `needed_keys` (the cells the training data uses) has no ID."""
    path = Path(path)
    return _checked_layer(path, _layers_of(path), layer, hidden_size, needed_keys)


def load_all_universal_ids(path):
    """{layer: {(col, row, size): float32 tensor}} of every layer of an IDs file, read once and
    checked as `load_universal_ids` checks one layer (the hidden size is the first ID's)."""
    path = Path(path)
    layers = _layers_of(path)
    if not layers:
        raise ValueError(f"{path}: no layers")
    first = next(iter(_checked_layer(path, layers, min(layers), None).values()))
    return {layer: _checked_layer(path, layers, layer, first.shape[0]) for layer in sorted(layers)}


def _layers_of(path):
    """{layer int: entry} of an IDs file, read once (other, non-layer entries are allowed)."""
    data = _read_ids_file(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected {{layer: {{'universal': {{(col, row, size): tensor}}}}}}, "
                         f"found a {type(data).__name__}")
    layers = {}
    for key, value in data.items():
        n = _layer_int(key)
        if n is None:
            continue  # other entries (metadata) are allowed
        if n in layers:
            raise ValueError(f"{path}: layer {n} appears twice (as int and str keys)")
        layers[n] = value
    return layers


def _checked_layer(path, layers, layer, hidden_size, needed_keys=None):
    """One layer's IDs from `_layers_of`'s entries, checked (hidden_size None: any, one for all)."""
    layer = int(layer)
    if layer not in layers:
        raise ValueError(f"{path}: no universal spatial IDs for layer {layer}; it holds layers "
                         f"{_layer_span(layers)}; derive_spatial_ids.py --layers {layer} makes them")
    entry = layers[layer]
    if not isinstance(entry, dict) or not isinstance(entry.get("universal"), dict):
        raise ValueError(f"{path}: layer {layer} has no 'universal' dict of IDs")
    ids = {}
    for raw_key, vec in entry["universal"].items():
        try:
            key = cell_key(raw_key)
        except ValueError as err:
            raise ValueError(f"{path}: layer {layer}: {err}") from None
        if not isinstance(vec, torch.Tensor):
            raise ValueError(f"{path}: layer {layer}, cell {key}: expected a tensor, found {type(vec).__name__}")
        vec = vec.detach().reshape(-1) if vec.dim() == 2 and 1 in vec.shape else vec.detach()
        if hidden_size is None and vec.dim() == 1:
            hidden_size = vec.shape[0]
        if vec.dim() != 1 or vec.shape[0] != hidden_size:
            raise ValueError(
                f"{path}: layer {layer}, cell {key}: ID has {vec.shape[-1] if vec.dim() else 0} dims "
                f"(shape {tuple(vec.shape)}) but the model's hidden size is {hidden_size}; the IDs "
                "were derived from another model"
            )
        vec = vec.float()
        if not torch.isfinite(vec).all() or not vec.abs().sum() > 0:
            raise ValueError(f"{path}: layer {layer}, cell {key}: ID is zero or not finite")
        ids[key] = vec
    if not ids:
        raise ValueError(f"{path}: layer {layer} holds no IDs")
    if needed_keys is not None:
        missing = {cell_key(k) for k in needed_keys} - set(ids)
        if missing:  # the lists first, the line naming the file last
            raise ValueError(
                f"cells (col, row, size) the training data uses without an ID: {_format_keys(missing)}\n"
                f"cells with an ID: {_format_keys(ids, limit=5)}\n"
                f"{path}: layer {layer} has no ID for {len(missing)} cell(s) the training data uses (listed "
                "above); derive IDs from images with these cells and sizes")
    return ids


def _atomic_save(obj, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def axis_paths(path):
    """(x_axis_path, y_axis_path) written next to an IDs file."""
    path = Path(path)
    return path.with_name(f"{path.stem}_x_axis.pt"), path.with_name(f"{path.stem}_y_axis.pt")


def save_universal_ids(path, ids_per_layer, x_axis=None, y_axis=None):
    """Write {layer: {"universal": {(col, row, size): tensor}}} to `path` (parents created) and,
    if given, `<stem>_x_axis.pt` / `<stem>_y_axis.pt` each {layer: tensor[hidden]} next to it.

    `ids_per_layer` is {layer: {(col, row, size): tensor}}; layer keys may be int or str digits.
    Returns the list of paths written."""
    def layer_of(key):
        n = _layer_int(key)
        if n is None:
            raise ValueError(f"layer key {key!r} is not an integer")
        return n

    def cpu(t, what):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{what}: expected a tensor, found {type(t).__name__}")
        return t.detach().to("cpu").reshape(-1).clone()

    out = {}
    for layer, ids in ids_per_layer.items():
        n = layer_of(layer)
        if n in out:
            raise ValueError(f"layer {n} given twice")
        out[n] = {"universal": {cell_key(k): cpu(v, f"layer {n}, cell {k}") for k, v in ids.items()}}
        sizes = {v.shape[0] for v in out[n]["universal"].values()}
        if len(sizes) > 1:
            raise ValueError(f"layer {n}: IDs of different sizes {sorted(sizes)}")
    written = [_atomic_save(out, path)]
    for axis, axis_path in zip((x_axis, y_axis), axis_paths(path)):
        if axis is not None:
            written.append(_atomic_save({layer_of(k): cpu(v, f"axis of layer {k}") for k, v in axis.items()},
                                        axis_path))
    return written


# ---------------------------------------------------------------------------------------------
# Provenance: what an IDs file was derived from
# ---------------------------------------------------------------------------------------------

def provenance_path(path):
    """The JSON next to an IDs file that says how it was derived: `qwen2-2b.pt` -> `qwen2-2b.json`."""
    return Path(path).with_suffix(".json")


def model_identity(name):
    """What two model names must share to be the same model: the hub id behind an alias, or the
    absolute path of a local folder."""
    resolved = resolve_model_name(name)
    return str(Path(resolved).resolve()) if Path(resolved).is_dir() else resolved


def write_provenance(path, info):
    target = provenance_path(path)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(info, indent=2, default=str) + "\n")
    os.replace(tmp, target)
    return target


def read_provenance(path):
    """The provenance of an IDs file, or None when it has none (IDs from the original code)."""
    target = provenance_path(path)
    if not target.is_file():
        return None
    try:
        info = json.loads(target.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{target}: unreadable provenance of {path} ({err})") from None
    if not isinstance(info, dict) or "model" not in info:
        raise ValueError(f"{target}: not a provenance file of {path} (no 'model' entry)")
    return info


def check_provenance(path, model_name, holdout_pairs=(), allow_holdout=False):
    """Raise ValueError when the IDs at `path` were derived from a model other than `model_name`;
    return warnings (strings): no provenance to check, or holdout pairs among the derivation pairs
    (unless `allow_holdout`). `holdout_pairs` are unordered pairs (frozensets of two names)."""
    info = read_provenance(path)
    if info is None:
        return [f"{path} has no provenance file ({provenance_path(path).name}): cannot check which model "
                "or images it was derived from"]
    derived_from, training = model_identity(info["model"]), model_identity(model_name)
    if derived_from != training:
        raise ValueError(f"{path}: these IDs were derived from model {info['model']!r} ({derived_from}), "
                         f"but this run trains {model_name!r} ({training}). Derive IDs for this model: "
                         f"{DERIVE_HINT.replace('--model M', '--model ' + model_name)}")
    warnings = []
    derivation_pairs = {frozenset(p) for p in info.get("object_pairs", [])}
    overlap = sorted(" | ".join(sorted(p)) for p in set(holdout_pairs) & derivation_pairs)
    if overlap and not allow_holdout:
        warnings.append(f"{len(overlap)} of this run's holdout pairs were among the pairs {path} was derived "
                        f"from: {', '.join(overlap[:10])}{' ...' if len(overlap) > 10 else ''} "
                        "(their images shaped the IDs; --allow_holdout_in_ids silences this)")
    return warnings


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------

class SpatialIDLoss(nn.Module):
    """1 - mean cosine between batch-centred states and the universal IDs of obj2's cells.

    `head="none"`: the paper's loss. `head="linear"`: a learned H->H projection (no bias,
    initialised to identity) applied to the centred states before the cosine (regression-head
    variant). Always computed in float32."""

    def __init__(self, ids, head="none"):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, not {head!r}")
        if not ids:
            raise ValueError("no universal spatial IDs given")
        keys = [cell_key(k) for k in ids]
        if len(set(keys)) != len(keys):
            raise ValueError("duplicate cells among the IDs")
        vecs = [torch.as_tensor(ids[k]).detach().float().reshape(-1) for k in ids]
        sizes = {v.shape[0] for v in vecs}
        if len(sizes) != 1:
            raise ValueError(f"IDs of different sizes: {sorted(sizes)}")
        self.hidden_size = sizes.pop()
        self.index = {k: i for i, k in enumerate(keys)}
        self.register_buffer("ids", torch.stack(vecs))
        self.head_type = head
        if head == "linear":
            self.head = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
            with torch.no_grad():
                self.head.weight.copy_(torch.eye(self.hidden_size))
        else:
            self.head = None

    def rows(self, cells):
        out = []
        for cell in cells:
            key = cell_key(cell)
            if key not in self.index:
                raise KeyError(f"no universal spatial ID for cell {key} (col, row, size); "
                               f"the IDs cover {len(self.index)} cells")
            out.append(self.index[key])
        return torch.tensor(out, dtype=torch.long, device=self.ids.device)

    def forward(self, states, cells):
        """states [B, H] (any float dtype), cells: B (col, row, size) -> float32 scalar."""
        if states.dim() != 2 or states.shape[1] != self.hidden_size:
            raise ValueError(f"states must be [B, {self.hidden_size}], got {tuple(states.shape)}")
        if states.shape[0] != len(cells):
            raise ValueError(f"{states.shape[0]} states but {len(cells)} cells")
        if states.shape[0] < 2:
            raise ValueError("the spatial loss needs a batch of at least 2 (centring one state leaves nothing)")
        targets = self.ids.index_select(0, self.rows(cells).to(self.ids.device)).float()
        x = states.float()
        x = x - x.mean(dim=0, keepdim=True)
        if self.head is not None:
            x = F.linear(x, self.head.weight.float())
        cos = F.cosine_similarity(x, targets.to(x.device), dim=-1, eps=1e-8)
        return 1.0 - cos.mean()

    def extra_repr(self):
        return f"cells={len(self.index)}, hidden={self.hidden_size}, head={self.head_type}"


# ---------------------------------------------------------------------------------------------
# Capturing one layer's hidden states
# ---------------------------------------------------------------------------------------------

def _in_backward():
    """True while autograd runs a backward pass (e.g. gradient-checkpoint recomputation)."""
    fn = getattr(torch._C, "_current_graph_task_id", None)
    return fn is not None and fn() != -1


class LayerCapture:
    """What `capture_layer` yields: `.states` is the last captured [B, T, H] tensor (or None)."""

    def __init__(self, layer):
        self.layer = layer
        self.states = None

    def _record(self, tensor):
        # Gradient checkpointing re-runs layers during backward; keep the forward's tensor.
        if not _in_backward():
            self.states = tensor


@contextlib.contextmanager
def capture_layer(model, adapter, layer):
    """Record HF's `hidden_states[layer]` during forward passes with a single hook.

    0: input of the first decoder layer; 1..N-1: output of decoder layer `layer - 1`;
    N: output of the LM's final norm. The hook is removed on exit, even on error."""
    layers = adapter.lm_layers(model)
    n = len(layers)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n:
        raise ValueError(f"layer {layer!r} out of range: the LM has {n} layers, so 0..{n} "
                         "(0 = input embeddings, N = after the final norm)")
    capture = LayerCapture(layer)

    def first(output):
        return output[0] if isinstance(output, (tuple, list)) else output

    if layer == 0:
        def pre_hook(module, args, kwargs):
            if args:
                capture._record(args[0])
            elif "hidden_states" in kwargs:
                capture._record(kwargs["hidden_states"])
            else:
                raise RuntimeError("first decoder layer called without hidden_states")
        handle = layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        module = layers[layer - 1] if layer < n else adapter.lm_final_norm(model)

        def hook(module, args, output):
            capture._record(first(output))
        handle = module.register_forward_hook(hook)
    try:
        yield capture
    finally:
        handle.remove()


def gather_target_states(hidden, target_positions):
    """hidden [B, T, H], target_positions [B] -> [B, H] (the state at each row's position)."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got {tuple(hidden.shape)}")
    pos = torch.as_tensor(target_positions, device=hidden.device).long().reshape(-1)
    if pos.shape[0] != hidden.shape[0]:
        raise ValueError(f"{pos.shape[0]} target positions for a batch of {hidden.shape[0]}")
    if (pos < 0).any() or (pos >= hidden.shape[1]).any():
        raise ValueError(f"target positions {pos.tolist()} outside 0..{hidden.shape[1] - 1}")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]
