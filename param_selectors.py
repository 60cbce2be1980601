"""Which parameters to finetune: structural selectors over a VLM's blocks, under a parameter budget.

A selector names a kind of tensor (MLP, attention, norms) in one stack of blocks (the vision
encoder or the language model), or just the LM head. Candidates are that kind of tensor in the
last k blocks of the stack (by position in `adapter.vision_blocks(model)` /
`adapter.lm_layers(model)`); then, as in the original code, a greedy pass sorts the candidates by
size (largest first; ties keep model order) and takes each one that still fits under the budget,
`max(1, int(total_params * param_budget_frac))`, where total_params counts every (deduplicated)
parameter of the model.

Everything is found through the model's structure via the family adapter (`models.py`), never by
substrings of parameter names: MLP tensors are the parameters of `block_parts(block)["mlp"]`,
attention those of `["attn"]`, norms those of `["norms"]` (so `post_attention_layernorm` is a norm,
not attention), the projector is `adapter.projector(model)` (Qwen's `visual.merger`, which the
original name patterns never matched). Names come from `model.named_parameters()`, matched by
tensor identity. Only `numel()` and `requires_grad` are touched, so a meta-device model works.

Which tensors of a chosen module are candidates:
  * default: weights only (every parameter whose own name is not `bias`), as the original;
  * `train_biases=True`: weights and biases;
  * `bitfit_bias_only=True`: biases only (it wins over `train_biases`);
  * norm selectors: a norm's scale and shift are its whole parameterisation, so norm selectors take
    norm weights AND biases by default (LM RMSNorms have weights only); with `bitfit_bias_only`
    they take only the biases.
The same rule applies to the projector (`train_projector=True`, vision selectors only) and to the
LM head (`include_lm_head=True`, LM selectors): those tensors join the same greedy pool.

A tied LM head (its weight IS the input embedding weight, as on Qwen2-VL-2B) is never selected
silently-as-nothing: LM selectors add a note and skip it, `lm_head_only` raises.

Two protocol choices (protocols.py: `paper` = the original's rule, `clean` = ours) apply to the
vision selectors:
  * `projector`: "off" (nothing), "on" (`adapter.projector(model)`, by the weights/biases rule
    above), or "name_match", the original's rule: every parameter, weights AND biases, whose full
    name contains one of PROJECTOR_NAME_PATTERNS joins the pool (Qwen's `merger` never matched).
  * `last_k_of`: "used" counts the last k in forward order among the blocks whose output reaches
    the LM (`adapter.used_vision_blocks`); "listed" is the original's rule: blocks whose index
    within their list is among the k largest indices over all listed block lists. On LLaVA-1.5
    (features from layer -2) "listed" takes blocks 18-23 of 24 and block 23 never gets a gradient
    (the summary says so), "used" takes 17-22; on Llama-3.2-Vision "listed" takes local blocks
    26-31 (the global encoder has only 8), "used" the global blocks 2-7.
Called without them, selection is "off" / "used" (`train_projector=True` means "on").
"""
import argparse
from dataclasses import dataclass, field

import torch

import models
import protocols

VISION_SELECTORS = {
    "vision_mlp_lastk": "mlp",
    "vision_attn_lastk": "attn",
    "vision_norms_lastk": "norms",
}
LM_SELECTORS = {
    "lm_mlp_lastk": "mlp",
    "lm_attn_lastk": "attn",
    "lm_norms_lastk": "norms",
}
SELECTORS = tuple(VISION_SELECTORS) + tuple(LM_SELECTORS) + ("lm_head_only",)
DEFAULT_SELECTOR = "vision_mlp_lastk"
PROJECTOR_RULES = ("name_match", "off", "on")
LAST_K_OF = ("listed", "used")
# The original's looks_like_projector substrings (spatial_finetuning/train.py there).
PROJECTOR_NAME_PATTERNS = ("mm_projector", "multi_modal_projector", "vision_proj", "visual_projector",
                           "image_projector", "resampler")


def format_count(n):
    """2208985600 -> '2.21B', 6553600 -> '6.55M', 8192 -> '8.19K', 96 -> '96'."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(int(n))


@dataclass
class _Candidate:
    param: object
    name: str  # full name in model.named_parameters()
    group: str  # e.g. "vision block 26", "lm layer 3", "projector", "lm_head"
    local_name: str  # name inside its group, e.g. "mlp.fc1.weight"
    order: int  # position in model.named_parameters()
    cost: int = None  # what it adds to the budget when not its numel (a LoRA pair's size)

    @property
    def numel(self):
        return self.param.numel() if self.cost is None else self.cost


@dataclass
class Selection:
    """What `select_parameters` chose. `names` are in model order."""

    selector: str
    last_k_blocks: int
    param_budget_frac: float
    total_params: int
    budget: int
    selected_params: int
    names: list
    notes: list = field(default_factory=list)
    projector: str = "off"
    last_k_of: str = "used"
    lora_rank: int = 0
    lora_targets: list = field(default_factory=list)  # Linear modules that got LoRA adapters
    # (group, [(local_name, numel), ...]) in model order, for the summary.
    groups: list = field(default_factory=list)

    @property
    def share(self):
        """Selected parameters as a fraction of all model parameters."""
        return self.selected_params / self.total_params if self.total_params else 0.0

    @property
    def num_tensors(self):
        return len(self.names)

    def ranges(self):
        """The chosen groups, consecutive blocks collapsed: 'local block 26-31, projector (name match)'."""
        parts = []
        for group, _ in self.groups:
            label, _, idx = group.rpartition(" ")
            if idx.isdigit() and parts and parts[-1][0] == label and parts[-1][2] == int(idx) - 1:
                parts[-1][2] = int(idx)
            elif idx.isdigit():
                parts.append([label, int(idx), int(idx)])
            else:
                parts.append([group, None, None])
        return ", ".join(label if a is None else f"{label} {a}" if a == b else f"{label} {a}-{b}"
                         for label, a, b in parts)

    def summary(self):
        lines = [
            f"parameter selection: selector={self.selector} last_k_blocks={self.last_k_blocks} "
            f"param_budget_frac={self.param_budget_frac:g} projector={self.projector} last_k_of={self.last_k_of}",
            f"total params: {self.total_params:,} ({format_count(self.total_params)})",
            f"budget: {self.budget:,} ({format_count(self.budget)})",
            f"selected: {self.selected_params:,} ({format_count(self.selected_params)}) params in "
            f"{self.num_tensors} tensors = {100 * self.share:.2f}% of the model",
        ]
        if self.lora_rank:
            lines.append(f"LoRA rank {self.lora_rank} on {len(self.lora_targets)} Linear modules (their weights stay "
                         "frozen; selected = adapter parameters + any other chosen tensor)")
        for group, items in self.groups:
            parts = ", ".join(f"{local} ({format_count(n)})" for local, n in items)
            lines.append(f"  {group}: {parts}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _is_bias(local_name):
    return local_name.rsplit(".", 1)[-1] == "bias"


def _keep(local_name, kind, bitfit_bias_only, train_biases):
    if bitfit_bias_only:
        return _is_bias(local_name)
    if kind == "norms" or train_biases:
        return True
    return not _is_bias(local_name)


def _module_params(modules):
    """ids of the parameters of a module, a parameter, or a list of them."""
    if not isinstance(modules, (list, tuple)):
        modules = [modules]
    ids = set()
    for m in modules:
        ids |= {id(m)} if isinstance(m, torch.nn.Parameter) else {id(p) for p in m.parameters()}
    return ids


def _resolve_projector(projector, train_projector):
    if projector is None:
        return "on" if train_projector else "off"
    if train_projector and projector == "on":
        return projector
    if projector not in PROJECTOR_RULES:
        raise ValueError(f"projector must be one of {', '.join(PROJECTOR_RULES)}, got {projector!r}")
    if train_projector and projector == "off":
        raise ValueError("train_projector=True contradicts projector='off'")
    return projector


def _validate(selector, last_k_blocks, param_budget_frac):
    if selector not in SELECTORS:
        raise ValueError(f"unknown selector {selector!r}; valid selectors: {', '.join(SELECTORS)}")
    if isinstance(last_k_blocks, bool) or not isinstance(last_k_blocks, int) or last_k_blocks < 1:
        raise ValueError(f"last_k_blocks must be an integer >= 1, got {last_k_blocks!r}")
    if not (0 < param_budget_frac <= 1):
        raise ValueError(f"param_budget_frac must be in (0, 1], got {param_budget_frac!r}")


def select_parameters(model, adapter, selector=DEFAULT_SELECTOR, last_k_blocks=6, param_budget_frac=0.3,
                      bitfit_bias_only=False, train_biases=False, train_projector=False,
                      include_lm_head=True, projector=None, last_k_of=None, lora_rank=0, lora_alpha=None,
                      lora_dropout=0.0):
    """Freeze the whole model, then set requires_grad=True exactly on the chosen tensors.

    Returns a `Selection`. Raises ValueError on an unknown selector, an out-of-range k or budget
    fraction, a tied LM head for `lm_head_only`, or when nothing at all would be selected."""
    _validate(selector, last_k_blocks, param_budget_frac)
    projector = _resolve_projector(projector, train_projector)
    last_k_of = "used" if last_k_of is None else last_k_of
    if last_k_of not in LAST_K_OF:
        raise ValueError(f"last_k_of must be one of {', '.join(LAST_K_OF)}, got {last_k_of!r}")

    named = list(model.named_parameters())  # deduplicated: a tied tensor appears once
    name_of = {id(p): n for n, p in named}
    order_of = {id(p): i for i, (_, p) in enumerate(named)}
    total = sum(p.numel() for _, p in named)
    budget = max(1, int(total * param_budget_frac))
    notes = []
    candidates = []
    seen = set()

    def add(module, group, kind, only=None):
        """Candidates among `module`'s parameters (restricted to ids in `only` if given)."""
        for local, p in module.named_parameters():
            if only is not None and id(p) not in only:
                continue
            if id(p) in seen or not _keep(local, kind, bitfit_bias_only, train_biases):
                continue
            seen.add(id(p))
            candidates.append(_Candidate(p, name_of[id(p)], group, local, order_of[id(p)]))

    def add_blocks(blocks, label, kind):
        if last_k_blocks > len(blocks):
            raise ValueError(f"last_k_blocks={last_k_blocks} but the model has only {len(blocks)} "
                             f"{label}s (selector {selector})")
        start = len(blocks) - last_k_blocks
        for i in range(start, len(blocks)):
            block = blocks[i]
            add(block, f"{label} {i}", kind, only=_module_params(adapter.block_parts(block)[kind]))

    unused_blocks = {}  # group label -> block, for blocks "listed" picks that never reach the LM

    def add_vision_blocks(kind):
        used = adapter.used_vision_blocks(model)
        if last_k_of == "used":
            if last_k_blocks > len(used):
                raise ValueError(f"last_k_blocks={last_k_blocks} but only {len(used)} vision blocks feed the "
                                 f"language model (selector {selector})")
            picked = used[len(used) - last_k_blocks:]
        else:  # the original: the k largest block indices, over all listed block lists at once
            listed = [(label, i, b) for label, blocks in adapter.vision_block_lists(model) for i, b in enumerate(blocks)]
            top = max(i for _, i, _ in listed)
            if last_k_blocks > top + 1:
                raise ValueError(f"last_k_blocks={last_k_blocks} but the vision block lists have only {top + 1} "
                                 f"indices (selector {selector})")
            picked = [x for x in listed if x[1] > top - last_k_blocks]
            used_ids = {id(b) for _, _, b in used}
            unused_blocks.update({f"{label} {i}": b for label, i, b in picked if id(b) not in used_ids})
        for label, i, block in picked:
            add(block, f"{label} {i}", kind, only=_module_params(adapter.block_parts(block)[kind]))

    def add_projector_by_name():
        matched = False
        for name, p in named:
            if any(pat in name for pat in PROJECTOR_NAME_PATTERNS) and id(p) not in seen:
                seen.add(id(p))
                candidates.append(_Candidate(p, name, "projector (name match)", name, order_of[id(p)]))
                matched = True
        if not matched:
            notes.append("projector=name_match: no parameter name contains " + "/".join(PROJECTOR_NAME_PATTERNS)
                         + " (as in the original); no projector tensor is a candidate")

    def lm_head_tied():
        head = adapter.lm_head(model)
        emb = adapter.lm_embeddings(model)
        weight = getattr(head, "weight", None)
        return weight is not None and emb is not None and weight is getattr(emb, "weight", None)

    def embedding_name():
        return name_of.get(id(getattr(adapter.lm_embeddings(model), "weight", None)), "the embedding weight")

    if selector in VISION_SELECTORS:
        kind = VISION_SELECTORS[selector]
        add_vision_blocks(kind)
        if projector == "on":
            add(adapter.projector(model), "projector", "projector")
        elif projector == "name_match":
            add_projector_by_name()
    elif selector in LM_SELECTORS:
        kind = LM_SELECTORS[selector]
        add_blocks(adapter.lm_layers(model), "lm layer", kind)
        if projector == "on":
            notes.append(f"projector=on ignored: it applies to vision selectors, not {selector}")
        if include_lm_head:
            if lm_head_tied():
                notes.append(f"lm_head is tied to the input embeddings (lm_head.weight is {embedding_name()}): "
                             "not selected; untie or use another selector")
            else:
                add(adapter.lm_head(model), "lm_head", "lm_head")
    else:  # lm_head_only
        if lm_head_tied():
            raise ValueError(f"selector lm_head_only: lm_head is tied to the input embeddings "
                             f"(lm_head.weight is {embedding_name()}), so training it would also train the "
                             "embeddings; untie the weights or use another selector")
        add(adapter.lm_head(model), "lm_head", "lm_head")

    linear_of = {}  # weight id -> (module name, module) of every Linear, for LoRA
    if lora_rank and hasattr(model, "peft_config"):
        raise ValueError("the model already carries LoRA adapters (loaded from a LoRA checkpoint): selecting "
                         "again would stack a second set; resuming a LoRA run is not supported yet")
    if lora_rank:
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 0:
            raise ValueError(f"lora_rank must be an integer >= 0, got {lora_rank!r}")
        linear_of = {id(m.weight): (n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        for cand in candidates:
            if id(cand.param) in linear_of:
                _, m = linear_of[id(cand.param)]
                # A LoRA pair A [r, in] + B [out, r] instead of the [out, in] weight.
                cand.cost = lora_rank * (m.in_features + m.out_features)
                cand.local_name += f" (lora r={lora_rank})"

    # Greedy, as the original: largest first (stable: ties keep model order), take if it fits.
    chosen = []
    used = 0
    for cand in sorted(candidates, key=lambda c: (-c.numel, c.order)):
        if used + cand.numel <= budget:
            chosen.append(cand)
            used += cand.numel

    if not chosen:
        if candidates:
            detail = f"smallest candidate has {min(c.numel for c in candidates):,} params"
        else:
            detail = "no candidate tensors of that kind"
            if bitfit_bias_only:
                detail += " (bitfit_bias_only: the chosen modules have no biases)"
        raise ValueError(f"selector {selector} selected no parameters: budget {budget:,} params "
                         f"(param_budget_frac={param_budget_frac:g} of {total:,}), "
                         f"last_k_blocks={last_k_blocks}; {detail}")
    skipped = len(candidates) - len(chosen)
    if skipped:
        skipped_params = sum(c.numel for c in candidates) - used
        notes.append(f"{skipped} of {len(candidates)} candidate tensors ({format_count(skipped_params)} params) "
                     "did not fit the budget and stay frozen")

    for p in model.parameters():
        p.requires_grad_(False)
    for cand in chosen:
        cand.param.requires_grad_(True)
    lora_targets = []
    if lora_rank:
        lora_targets = [linear_of[id(c.param)][0] for c in chosen if id(c.param) in linear_of]
        if not lora_targets:
            raise ValueError(f"lora_rank={lora_rank}: the selection has no Linear weight to put LoRA on "
                             f"(selector {selector})")
        _inject_lora(model, lora_targets, lora_rank, lora_alpha, lora_dropout)

    dead = sorted({c.group for c in chosen if c.group in unused_blocks}, key=lambda g: (g.rsplit(" ", 1)[0], int(g.rsplit(" ", 1)[1])))
    if dead:
        notes.append(f"WARNING: selected (last_k_of=listed) but the output never reaches the language model "
                     f"({adapter.unused_reason(model)}), so no gradient, no change: {', '.join(dead)}")
    chosen.sort(key=lambda c: c.order)
    groups = []
    for cand in chosen:
        if not groups or groups[-1][0] != cand.group:
            groups.append((cand.group, []))
        groups[-1][1].append((cand.local_name, cand.numel))
    if lora_rank:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == used, "LoRA cost mismatch"
    else:
        names = [c.name for c in chosen]
    return Selection(selector=selector, last_k_blocks=last_k_blocks, param_budget_frac=param_budget_frac,
                     total_params=total, budget=budget, selected_params=used,
                     names=names, notes=notes, groups=groups, projector=projector,
                     last_k_of=last_k_of, lora_rank=lora_rank, lora_targets=lora_targets)


def _inject_lora(model, targets, rank, alpha, dropout):
    """LoRA adapters (peft) on exactly the Linear modules `targets` (full names), in place: the
    model keeps its class. Their base weights stay frozen and the adapter pairs train; every other
    tensor keeps the requires_grad it had (the selection's biases, norms, raw projector weights)."""
    from peft import LoraConfig, inject_adapter_in_model

    keep = {id(p) for p in model.parameters() if p.requires_grad}
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=dropout,
                        target_modules=list(targets), bias="none")
    inject_adapter_in_model(config, model)
    model.peft_config = {"default": config}  # what models.save_lora_adapter writes out
    # save_pretrained of an injected model would write "...base_layer.weight" keys that a later
    # from_pretrained silently ignores (re-initialising those Linears). Saving writes the adapter
    # instead, with the base it was loaded from, so train.py's checkpoints hold the adapter and
    # load_model_and_processor(checkpoint) rebuilds base + adapter. models.merge_lora undoes this.
    base_model = getattr(model, "name_or_path", None) or model.config._name_or_path

    def save_pretrained(save_directory, **kwargs):
        return models.save_lora_adapter(model, save_directory, base_model=base_model)

    model.save_pretrained = save_pretrained
    base = {id(model.get_submodule(t).base_layer.weight) for t in targets}
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n or (id(p) in keep and id(p) not in base))


def add_selector_args(parser):
    """The parameter-selection flags of the training CLI."""
    group = parser.add_argument_group("parameter selection")
    group.add_argument("--selector", choices=SELECTORS, default=DEFAULT_SELECTOR,
                       help="which tensors to train (default: %(default)s)")
    group.add_argument("--last_k_blocks", type=int, default=6,
                       help="candidates come from the last k blocks of the chosen stack (default: %(default)s)")
    group.add_argument("--param_budget_frac", type=float, default=0.3,
                       help="budget as a fraction of ALL model parameters, in (0, 1] (default: %(default)s)")
    group.add_argument("--bitfit_bias_only", action="store_true",
                       help="train only the biases of the chosen modules (BitFit)")
    group.add_argument("--train_biases", action="store_true",
                       help="train the chosen modules' biases as well as their weights")
    proj = group.add_mutually_exclusive_group()
    proj.add_argument("--projector", choices=PROJECTOR_RULES, default=None,
                      help="vision selectors: name_match = the original's name patterns (paper), off (clean), "
                           "on = adapter.projector (Qwen: visual.merger). Default: the protocol's")
    proj.add_argument("--train_projector", dest="projector", action="store_const", const="on",
                      help="same as --projector on")
    proj.add_argument("--no_projector", dest="projector", action="store_const", const="off",
                      help="same as --projector off (kept for the original CLI)")
    group.add_argument("--last_k_of", choices=LAST_K_OF, default=None,
                       help="vision selectors: 'last k' among the listed block indices (paper, the original) or "
                            "among blocks whose output reaches the LM, in forward order (clean). Default: the protocol's")
    group.add_argument("--lora_rank", type=int, default=0,
                       help="> 0: LoRA adapters of this rank on the chosen Linear modules instead of unfreezing "
                            "them; the budget counts adapter parameters (default: 0, off)")
    group.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: 2 * rank)")
    group.add_argument("--lora_dropout", type=float, default=0.0, help="LoRA dropout (default: %(default)s)")
    group.add_argument("--no_lm_head", action="store_true",
                       help="LM selectors: leave lm_head out of the candidates")
    return parser


def select_from_args(model, adapter, args):
    """`select_parameters` with the flags added by `add_selector_args` (after protocols.resolve
    has filled `projector` and `last_k_of`; left None they mean off / used)."""
    return select_parameters(
        model, adapter,
        selector=args.selector,
        last_k_blocks=args.last_k_blocks,
        param_budget_frac=args.param_budget_frac,
        bitfit_bias_only=args.bitfit_bias_only,
        train_biases=args.train_biases,
        include_lm_head=not args.no_lm_head,
        projector=getattr(args, "projector", None),
        # A hand-built namespace of the former flags (train_projector / no_projector booleans).
        train_projector=bool(getattr(args, "train_projector", False)),
        last_k_of=getattr(args, "last_k_of", None),
        lora_rank=getattr(args, "lora_rank", 0),
        lora_alpha=getattr(args, "lora_alpha", None),
        lora_dropout=getattr(args, "lora_dropout", 0.0),
    )


def selection_table(aliases, protocols_=("paper", "clean")):
    """Markdown rows of the default selection (vision_mlp_lastk, k=6, budget 0.3) on each alias's
    full-size architecture (meta device) under each protocol: the model-family table of docs/model-families.md."""
    rows = ["| family | alias | protocol | selection | tensors | parameters | share |",
            "|---|---|---|---|---:|---:|---:|"]
    for alias in aliases:
        model = models.full_size_model(alias)
        adapter = models.adapter_for(model)
        for protocol in protocols_:
            sel = select_parameters(model, adapter, projector=protocols.default("projector", protocol),
                                    last_k_of=protocols.default("last_k_of", protocol))
            rows.append(f"| {adapter.family} | {alias} | {protocol} | {sel.ranges()} | {sel.num_tensors} | "
                        f"{sel.selected_params:,} | {100 * sel.share:.2f}% |")
    return rows


if __name__ == "__main__":  # print a selection for a meta-device full-size model, e.g. to check a flag set
    ap = add_selector_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    protocols.add_protocol_arg(ap)
    ap.add_argument("--arch", default="qwen2-2b", choices=sorted(models.FULL_SIZE_CONFIGS))
    ap.add_argument("--table", action="store_true", help="print docs/model-families.md's model-family table for every full-size alias")
    cli = ap.parse_args()
    if cli.table:
        print("\n".join(selection_table(list(models.FULL_SIZE_CONFIGS))))
        raise SystemExit
    protocols.resolve(cli)
    meta_model = models.full_size_model(cli.arch)
    print(select_from_args(meta_model, models.adapter_for(meta_model), cli).summary())
