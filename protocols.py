"""The two protocols, in one table.

`paper` (the default) reproduces the method choices of the original code, which produced the
published numbers; `clean` is our corrected variant. A protocol only sets defaults: every choice
below is a flag of its own, and a flag given on the command line always wins. Bug fixes (pads
never trained, the holdout split by unordered pair, errors instead of a silent zero loss, ...)
are not choices and apply under both.

Each entry: flag -> {protocol: value}. A value may be a {arm: value} dict where the baseline and
the spatial-loss arm differ (`arm` is "baseline" or "spatial").
"""

PROTOCOLS = ("paper", "clean")
DEFAULT_PROTOCOL = "paper"

CHOICES = {
    # Wording of the grid (training and holdout) questions: bare names ("Is camel to the left or
    # right of frog?") or "the {name}".
    "train_question_style": {"paper": "paper", "clean": "clean"},
    # Wording of the COCO-Spatial questions: the original's caption parsing, or ours.
    "question_style": {"paper": "paper", "clean": "clean"},
    # How training batches are formed (data.make_batch_sampler).
    "sampler": {"paper": {"baseline": "shuffle", "spatial": "obj1_groups"},
                "clean": {"baseline": "grouped", "spatial": "grouped"}},
    # Projector: the original's parameter-name patterns, never, or always (vision selectors).
    "projector": {"paper": "name_match", "clean": "off"},
    # Which vision blocks "last k" counts: the largest block indices among all listed blocks
    # (the original), or the last k in forward order of the blocks whose output reaches the LM.
    "last_k_of": {"paper": "listed", "clean": "used"},
    # How universal IDs are derived (derive_spatial_ids.py).
    "id_recipe": {"paper": "paper", "clean": "clean"},
}

# What each choice means, for config.json readers and the README table.
DESCRIPTIONS = {
    "train_question_style": "grid question wording",
    "question_style": "COCO-Spatial question wording",
    "sampler": "training batches",
    "projector": "projector training rule",
    "last_k_of": "which vision blocks 'last k' counts",
    "id_recipe": "universal-ID derivation",
}


def add_protocol_arg(parser):
    parser.add_argument("--protocol", choices=PROTOCOLS, default=DEFAULT_PROTOCOL,
                        help="paper: the original's method choices (default); clean: our corrected "
                             "variant. Only sets defaults: each choice keeps its own flag.")
    return parser


def default(name, protocol, arm="baseline"):
    value = CHOICES[name][protocol]
    return value[arm] if isinstance(value, dict) else value


def resolve(args, arm="baseline"):
    """Fill every protocol choice that `args` has and left as None with the protocol's value.
    Returns {choice: resolved value} for the choices `args` carries (for config.json)."""
    resolved = {}
    for name in CHOICES:
        if not hasattr(args, name):
            continue
        if getattr(args, name) is None:
            setattr(args, name, default(name, args.protocol, arm))
        resolved[name] = getattr(args, name)
    return resolved
