"""Data: the grid file-name format, questions and answers, the training set, the holdout split,
the grouped batch sampler, the collator, and COCO-Spatial rows.

File-name format of a grid image (written by make_grid_data.py)::

    {obj1}__c{col1}r{row1}__{obj2}__c{col2}r{row2}__s{size}[__v{variant}].png

Spaces in object names are written as "_" (so names may not contain "_" themselves), columns
and rows count from 0 at the top-left, `size` is the object size in pixels at the paper's 224 px
cell (74, 124, 174 or 224) whatever the cell size drawn, and `variant` tells apart several
renders of the same layout (local variation, backgrounds). The original code's form
`{obj1}_{x1}-{y1}_{obj2}_{x2}-{y2}.png` (x = column, y = row) is read too; it carries no size,
so its samples get size 224, as the original assumed.
"""
import io
import json
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

REFERENCE_CELL = 224
OBJECT_SIZES = (74, 124, 174, 224)  # object sizes in px at a 224 px cell, as in the paper
GRID = 4

# Built-in procedurally drawn objects (make_grid_data.py draws them): plain English names.
BUILTIN_OBJECT_NAMES = (
    "red circle", "blue square", "green triangle", "yellow star", "purple diamond",
    "orange cross", "pink heart", "cyan hexagon", "brown ring", "gray arrow",
    "black pentagon", "white moon",
)
# Object names of the COCO-Spatial two-object set (so the tiny tokenizer covers them).
COCO_OBJECT_NAMES = (
    "person", "bicycle", "car", "motorcycle", "bus", "truck", "dog", "cat", "horse", "cow",
    "chair", "couch", "bed", "dining table", "potted plant", "tv", "laptop", "bottle", "cup",
    "bowl", "umbrella", "handbag", "suitcase", "bench", "bird", "sheep", "elephant", "giraffe",
    "teddy bear", "clock", "vase", "sink", "oven", "refrigerator", "toilet", "book", "banana",
    "apple", "pizza", "cake", "traffic light", "fire hydrant", "stop sign", "skateboard",
    "surfboard", "kite", "sports ball", "frisbee", "backpack", "tie", "keyboard", "mouse",
)

ANSWER_WORDS = ("left", "right", "above", "below")
OPTIONS = {"lr": ("left", "right"), "ab": ("above", "below")}
RELATION_TYPE = {"left": "lr", "right": "lr", "above": "ab", "below": "ab"}

# The original code's templates. How objects are referred to is a protocol choice
# (`--train_question_style`, `--question_style`): "paper" uses the bare names as the original did
# ("Is camel to the left or right of frog?"), "clean" says "the {name}" everywhere, so training
# and evaluation questions read alike.
QUESTION_TEMPLATES = {
    "lr": 'Is {obj1} to the left or right of {obj2}? Answer with "left" or "right" only.',
    "ab": 'Is {obj1} above or below {obj2}? Answer with "above" or "below" only.',
}
QUESTION_STYLES = ("paper", "clean")


def refer(name, style="clean"):
    """How a question names an object under each question style."""
    if style not in QUESTION_STYLES:
        raise ValueError(f"question style must be one of {QUESTION_STYLES}, not {style!r}")
    return name if style == "paper" else f"the {name}"


def fill_template(qtype, ref1, ref2):
    """(question, (start, end) character span of `ref2` inside it)."""
    before, after = QUESTION_TEMPLATES[qtype].split("{obj2}")
    before = before.format(obj1=ref1)
    return before + ref2 + after, (len(before), len(before) + len(ref2))


def make_question(qtype, obj1, obj2, style="clean"):
    """(question, (start, end) character span of obj2's reference inside the question)."""
    return fill_template(qtype, refer(obj1, style), refer(obj2, style))


# ---------------------------------------------------------------------------------------------
# File names
# ---------------------------------------------------------------------------------------------

_NAME_RE = r"[^_/\\]+(?:_[^_/\\]+)*"
_OURS_RE = re.compile(
    rf"^(?P<obj1>{_NAME_RE})__c(?P<col1>\d+)r(?P<row1>\d+)__(?P<obj2>{_NAME_RE})"
    rf"__c(?P<col2>\d+)r(?P<row2>\d+)__s(?P<size>\d+)(?:__v(?P<variant>\d+))?$"
)
_ORIGINAL_RE = re.compile(r"^(?P<obj1>.+?)_(?P<col1>\d+)-(?P<row1>\d+)_(?P<obj2>.+)_(?P<col2>\d+)-(?P<row2>\d+)$")


@dataclass(frozen=True)
class GridLayout:
    obj1: str
    cell1: tuple  # (col, row)
    obj2: str
    cell2: tuple
    size: int = REFERENCE_CELL
    variant: int = 0


def check_object_name(name):
    if not name or name != name.strip() or "  " in name or "_" in name or "/" in name or "\\" in name:
        raise ValueError(
            f"object name {name!r}: names must be non-empty, without '_', '/', leading/trailing or double spaces"
        )
    return name


def format_grid_name(layout):
    """File name for a layout; `parse_grid_name` reads it back exactly."""
    parts = []
    for name, (col, row) in ((layout.obj1, layout.cell1), (layout.obj2, layout.cell2)):
        parts.append(check_object_name(name).replace(" ", "_"))
        parts.append(f"c{col}r{row}")
    parts.append(f"s{layout.size}")
    if layout.variant:
        parts.append(f"v{layout.variant}")
    return "__".join(parts) + ".png"


def parse_grid_name(filename):
    """GridLayout from either file-name form, or None if the name is neither."""
    path = Path(filename)
    if path.suffix.lower() != ".png":
        return None
    stem = path.stem
    m = _OURS_RE.match(stem)
    if m:
        return GridLayout(
            obj1=m["obj1"].replace("_", " "), cell1=(int(m["col1"]), int(m["row1"])),
            obj2=m["obj2"].replace("_", " "), cell2=(int(m["col2"]), int(m["row2"])),
            size=int(m["size"]), variant=int(m["variant"] or 0),
        )
    if "__" in stem:
        return None
    m = _ORIGINAL_RE.match(stem)
    if m:
        return GridLayout(
            obj1=m["obj1"].strip(), cell1=(int(m["col1"]), int(m["row1"])),
            obj2=m["obj2"].strip(), cell2=(int(m["col2"]), int(m["row2"])),
        )
    return None


# ---------------------------------------------------------------------------------------------
# Training set
# ---------------------------------------------------------------------------------------------

def questions_for_layout(layout):
    """[(qtype, answer)]: left/right when the columns differ, above/below when the rows differ.
    The answer says where obj1 is relative to obj2; a smaller row is higher in the image."""
    (c1, r1), (c2, r2) = layout.cell1, layout.cell2
    out = []
    if c1 != c2:
        out.append(("lr", "left" if c1 < c2 else "right"))
    if r1 != r2:
        out.append(("ab", "above" if r1 < r2 else "below"))
    return out


def sample_record(image_path, qtype, answer, obj1, obj2, style="clean", **extra):
    question, obj2_span = make_question(qtype, obj1, obj2, style)
    return dict(image_path=str(image_path), qtype=qtype, question=question, answer=answer,
                options=OPTIONS[qtype], obj1=obj1, obj2=obj2, obj2_span=obj2_span, **extra)


def questions_for_images(layouts, question_style="clean"):
    """Question samples for [(image path, GridLayout)], in order (see questions_for_layout)."""
    return [sample_record(path, qtype, answer, layout.obj1, layout.obj2, question_style,
                          cell1=layout.cell1, cell2=layout.cell2, size=layout.size)
            for path, layout in layouts for qtype, answer in questions_for_layout(layout)]


class GridDataset(torch.utils.data.Dataset):
    """Question/answer samples from a folder of grid images (both file-name forms), worded in
    `question_style` ("paper": bare names, "clean": "the {name}"). Images that cannot be read
    (empty, not an image, truncated) are left out and listed in `unreadable` as (path, why); a
    folder in which none can be read is an error."""

    def __init__(self, folder, question_style="clean"):
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"training image folder not found: {folder}. Make grid images with "
                f"`python make_grid_data.py --out_dir {folder}` (built-in objects, or --objects_dir DIR "
                "of {object}.png renders)"
            )
        self.folder = folder
        self.unparseable = []
        self.unreadable = []
        layouts = []
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() != ".png":
                continue
            layout = parse_grid_name(path.name)
            if layout is None:
                self.unparseable.append(path.name)
            elif problem := image_problem(path):
                self.unreadable.append((str(path), problem))
            else:
                layouts.append((path, layout))
        if self.unreadable and not layouts:
            path, why = self.unreadable[0]
            raise ValueError(f"{folder}: none of its {len(self.unreadable)} grid images can be read "
                             f"(first: {Path(path).name}, {why}); remake them with make_grid_data.py")
        self.n_images = len(layouts)
        self.samples = questions_for_images(layouts, question_style)
        if not self.samples:
            raise ValueError(
                f"{folder}: no usable grid images ({len(self.unparseable)} unparseable .png names). "
                "Make some with: python make_grid_data.py --out_dir " + str(folder)
            )

    def report(self):
        msg = f"{self.folder}: {self.n_images} images -> {len(self.samples)} questions"
        if self.unparseable:
            shown = ", ".join(self.unparseable[:5])
            msg += f"; skipped {len(self.unparseable)} unparseable file names (first: {shown})"
        if self.unreadable:
            msg += f"; skipped {len(self.unreadable)} unreadable images (named below)"
        return msg

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


# ---------------------------------------------------------------------------------------------
# Extraction sets (universal-ID derivation, paper recipe)
# ---------------------------------------------------------------------------------------------

_CELL_DIR_RE = re.compile(r"^(\d+)_(\d+)$")
_EXTRACTION_FILE_RE = re.compile(r"^(\d+)_(\d+)_(\d+)\.png$")


def extraction_path(root, layout):
    """Where the original's nested extraction layout puts an image: the fixed object `a` = obj1,
    the moving object `b` = obj2: `{a}_{b}/{a_col}_{a_row}/{b_col}_{b_row}_{size}.png`."""
    (ac, ar), (bc, br) = layout.cell1, layout.cell2
    return Path(root) / f"{layout.obj1}_{layout.obj2}" / f"{ac}_{ar}" / f"{bc}_{br}_{layout.size}.png"


def read_extraction_set(folder):
    """(layouts with their paths, layout name) of a folder of ID-derivation images: either the
    original's nested extraction layout (see `extraction_path`; obj1 = the fixed object `a`) or a
    flat folder of grid file names (obj1 = the first-named object). Returns ([(path, GridLayout)],
    "nested" | "flat", [unparseable paths])."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}. Make one with `python make_grid_data.py "
                                f"--layout extraction --out_dir {folder}`")
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
    if not subdirs or any(p.suffix.lower() == ".png" for p in folder.iterdir() if p.is_file()):
        items, skipped = [], []
        for path in sorted(folder.glob("*.png")):
            layout = parse_grid_name(path.name)
            if layout is None:
                skipped.append(path)
            else:
                items.append((path, layout))
        return items, "flat", skipped
    items, skipped = [], []
    for pair_dir in subdirs:
        names = pair_dir.name.split("_")
        if len(names) != 2 or not all(names):
            raise ValueError(f"{pair_dir}: an extraction-set folder must be named {{a}}_{{b}} (two object "
                             "names joined by one '_')")
        a, b = names
        for cell_dir in sorted(p for p in pair_dir.iterdir() if p.is_dir()):
            m = _CELL_DIR_RE.match(cell_dir.name)
            if not m:
                skipped.append(cell_dir)
                continue
            a_cell = (int(m[1]), int(m[2]))
            for path in sorted(cell_dir.glob("*.png")):
                f = _EXTRACTION_FILE_RE.match(path.name)
                if not f:
                    skipped.append(path)
                    continue
                items.append((path, GridLayout(a, a_cell, b, (int(f[1]), int(f[2])), int(f[3]))))
    return items, "nested", skipped


def split_holdout(samples, holdout_frac=0.15, seed=0):
    """(train_indices, holdout_indices), split by unordered object pair so that (a, b) and (b, a)
    always fall on the same side."""
    pairs = sorted({frozenset((s["obj1"], s["obj2"])) for s in samples}, key=lambda p: sorted(p))
    rng = random.Random(seed)
    rng.shuffle(pairs)
    n_holdout = int(round(len(pairs) * holdout_frac)) if holdout_frac > 0 else 0
    if holdout_frac > 0 and len(pairs) > 1:
        n_holdout = min(max(1, n_holdout), len(pairs) - 1)
    holdout_pairs = set(pairs[:n_holdout])
    train, holdout = [], []
    for i, s in enumerate(samples):
        (holdout if frozenset((s["obj1"], s["obj2"])) in holdout_pairs else train).append(i)
    return train, holdout


def group_key(sample):
    """What a batch shares in the grouped setting: the pair, obj1's cell, the size, the question."""
    return (sample["obj1"], sample["obj2"], sample["cell1"], sample["size"], sample["qtype"])


def group_indices(samples, indices):
    """{group key: [sample index, ...]} in a deterministic order."""
    groups = defaultdict(list)
    for i in indices:
        groups[group_key(samples[i])].append(i)
    return {k: groups[k] for k in sorted(groups, key=str)}


class _EpochBatchSampler(torch.utils.data.Sampler):
    """Batches drawn afresh each epoch from `seed + epoch`; `set_epoch(epoch, skip=n)` starts the
    epoch after its first n batches (resuming a run mid-epoch). `shard(n, rank)`: with n processes
    each takes every n-th whole batch (after `skip`, which counts all processes' batches), and the
    epoch's last n - 1 batches at most are dropped so that every process takes as many.
    `__len__` is what it yields."""

    seed = 0
    epoch = 0
    skip = 0
    num_replicas = 1
    rank = 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def shard(self, num_replicas, rank):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        self.num_replicas, self.rank = num_replicas, rank

    def epoch_batches(self):
        raise NotImplementedError

    def _mine(self):
        batches = self.epoch_batches()
        usable = len(batches) - len(batches) % self.num_replicas
        return batches[self.skip:usable][self.rank::self.num_replicas]

    def __iter__(self):
        return iter(self._mine())

    def __len__(self):
        return len(self._mine())


class GroupedBatchSampler(_EpochBatchSampler):
    """Batches whose samples share the object pair, obj1's cell, the object size and the question
    type while obj2 moves: centring over such a batch leaves only obj2's position (as the
    original's fixed-obj1 groups of one pair).

    Groups are split into batches of at most `batch_size`; a leftover of one sample is dropped
    (centring one state leaves nothing). Both the baseline and the spatial-loss runs use it, so
    they differ only by the loss."""

    def __init__(self, samples, indices, batch_size, seed=0, min_batch_size=2):
        self.batch_size = batch_size
        self.seed = seed
        self.min_batch_size = min_batch_size
        self.groups = list(group_indices(samples, indices).values())

    def epoch_batches(self):
        rng = random.Random(self.seed + self.epoch)
        batches = []
        for group in self.groups:
            group = list(group)
            rng.shuffle(group)
            for start in range(0, len(group), self.batch_size):
                chunk = group[start:start + self.batch_size]
                if len(chunk) >= self.min_batch_size:
                    batches.append(chunk)
        rng.shuffle(batches)
        return batches


class RandomBatchSampler(_EpochBatchSampler):
    """The plain shuffle (`--sampler shuffle`): the original's control arm. Batches mix object
    pairs; the last one may be short."""

    def __init__(self, indices, batch_size, seed=0):
        self.indices, self.batch_size, self.seed = list(indices), batch_size, seed

    def epoch_batches(self):
        order = list(self.indices)
        random.Random(self.seed + self.epoch).shuffle(order)
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]


def obj1_group_key(sample):
    """The original's spatial-arm group: obj1, obj1's cell and obj2. Both question types and
    every object size fall in one group."""
    return (sample["obj1"], sample["cell1"], sample["obj2"])


class Obj1GroupBatchSampler(_EpochBatchSampler):
    """The original's spatial-arm batches (`--sampler obj1_groups`): groups keyed (obj1, obj1's
    cell, obj2), taken in a shuffled order; each group is shuffled and cut into consecutive
    batches of at most `batch_size` (a 24-question group at batch 15 gives 15 + 9); a leftover of
    one question is dropped (centring one state leaves nothing). Seeded, unlike the original."""

    def __init__(self, samples, indices, batch_size, seed=0, min_batch_size=2):
        self.batch_size, self.seed, self.min_batch_size = batch_size, seed, min_batch_size
        groups = defaultdict(list)
        for i in indices:
            groups[obj1_group_key(samples[i])].append(i)
        self.groups = [groups[k] for k in sorted(groups, key=str)]

    def epoch_batches(self):
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.groups)))
        rng.shuffle(order)
        batches = []
        for g in order:
            group = list(self.groups[g])
            rng.shuffle(group)
            for start in range(0, len(group), self.batch_size):
                chunk = group[start:start + self.batch_size]
                if len(chunk) >= self.min_batch_size:
                    batches.append(chunk)
        return batches


# Sampler name -> whether its batches keep obj1 fixed while obj2 moves (the spatial loss centres
# over a batch, which only isolates obj2's position when they do).
SAMPLERS = {"shuffle": False, "obj1_groups": True, "grouped": True}


def make_batch_sampler(name, samples, indices, batch_size, seed=0):
    if name == "shuffle":
        return RandomBatchSampler(indices, batch_size, seed=seed)
    if name == "obj1_groups":
        return Obj1GroupBatchSampler(samples, indices, batch_size, seed=seed)
    if name == "grouped":
        return GroupedBatchSampler(samples, indices, batch_size, seed=seed)
    raise ValueError(f"sampler must be one of {tuple(SAMPLERS)}, not {name!r}")


# ---------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------

def load_image(path):
    """An RGB image from a file, or from the bytes of one (a benchmark's parquet rows hold them)."""
    with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as img:
        return img.convert("RGB")


# How a whole file of each format ends: PNG with its IEND chunk, JPEG with the end-of-image marker.
_FILE_ENDINGS = {"PNG": b"IEND\xaeB`\x82", "JPEG": b"\xff\xd9"}


def image_problem(path):
    """None when an image file looks whole, else why not ("empty (0 bytes)", "not an image",
    "truncated"). Reads the header and the last bytes only, never the pixels, so a whole data set
    is checked in seconds before a model loads; damage in the middle of a file that keeps its
    ending is left to the collator, which skips and names such an image when it is decoded."""
    in_memory = isinstance(path, bytes)  # an image's bytes (a parquet row's) are checked the same way
    try:
        size = len(path) if in_memory else Path(path).stat().st_size
        if size == 0:
            return "empty (0 bytes)"
        with io.BytesIO(path) if in_memory else Path(path).open("rb") as f:  # one open for header and ending
            with Image.open(f) as img:
                ending = _FILE_ENDINGS.get(img.format)
            if ending is None:
                return None
            f.seek(max(0, size - 64))
            tail = f.read().rstrip(b"\x00\r\n ")  # some writers pad after the end marker
        return None if tail.endswith(ending) else "truncated"
    except (OSError, UnidentifiedImageError, ValueError):
        return "not an image"


def named_problems(problems, limit=5):
    """'a (truncated), b (empty (0 bytes)), ... (N in all)' for [(path, why)]."""
    shown = ", ".join(f"{path} ({why})" for path, why in problems[:limit])
    return shown + (f", ... ({len(problems)} in all)" if len(problems) > limit else "")


def user_messages(question):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


class VLMCollator:
    """Chat template with the image; labels on the answer and end-of-turn token only; for each
    sample, the position of the last sub-token of obj2's name and, for grid samples, obj2's
    (col, row, size) as `target_cells` (both for the spatial loss; pop them before the forward).

    Prompt and answer rendering, encoding, and locating tokens are the family adapter's
    (models.VLMAdapter): positions are found by matching token ids and the obj2 token is checked
    by decoding, so a tokenizer that splits differently is an error naming the sample, never a
    silently wrong position. `with_answer=False` builds generation prompts
    (evaluation). An image that cannot be decoded is an error naming it, or with
    `skip_unreadable` (training: never a crash hours in) its sample is left out of the batch and
    named in `batch["unreadable_images"]` (pop it before the forward). With `encode_images_once`
    the pixel inputs hold each distinct image of the batch once (by path: a grid image asked
    about twice, or shown to several questions of a group) and `batch["image_index"]` maps each
    row to its image; lm_loss hands it to the adapter, which encodes each image once."""

    def __init__(self, processor, adapter, with_answer=True, skip_unreadable=False, encode_images_once=False):
        if isinstance(adapter, str):  # the former end-of-turn string: data stands below models
            raise TypeError("VLMCollator takes the family adapter (models.adapter_for_processor(processor)), "
                            f"not the end-of-turn string {adapter!r}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.adapter = adapter
        self.end_of_turn = adapter.end_of_turn
        self.with_answer = with_answer
        self.skip_unreadable = skip_unreadable
        self.encode_images_once = encode_images_once

    def _load_images(self, samples):
        """(samples whose image decodes, their images, paths of the others). An image asked about
        twice in a batch (its left/right and above/below questions) is decoded once."""
        kept, images, unreadable, decoded = [], [], [], {}
        for s in samples:
            path = str(s["image_path"])
            try:
                if path not in decoded:
                    # An in-memory image (tiny-warm's pretraining draws its images as it goes), or
                    # one drawn now (grid_sources.LazyGridImage: rendered in the worker that needs it).
                    # An image's bytes (a benchmark's parquet rows), named in image_path by their content.
                    image = s["image"] if "image" in s else load_image(path)
                    image = image() if callable(image) else image
                    decoded[path] = load_image(image) if isinstance(image, bytes) else image
                images.append(decoded[path])
                kept.append(s)
            except (OSError, ValueError) as err:  # PIL: truncated, corrupt or not an image
                if not self.skip_unreadable:
                    raise ValueError(f"{path}: unreadable image ({err})") from None
                unreadable.append(path)
        if not kept:
            raise ValueError(f"no image of a batch could be read: {', '.join(unreadable)}")
        return kept, images, unreadable

    def __call__(self, samples):
        samples, images, unreadable = self._load_images(samples)
        adapter = self.adapter
        prompts = [adapter.render_prompt(self.processor, s["question"]) for s in samples]
        texts = [p + adapter.render_answer(s["answer"]) if self.with_answer else p for p, s in zip(prompts, samples)]
        batch = adapter.encode(self.processor, texts, images)
        if self.encode_images_once:
            image_of_path, image_index, first_rows = {}, [], []
            for row, s in enumerate(samples):
                if str(s["image_path"]) not in image_of_path:
                    image_of_path[str(s["image_path"])] = len(first_rows)
                    first_rows.append(row)
                image_index.append(image_of_path[str(s["image_path"])])
            batch = adapter.keep_unique_images(batch, first_rows)
            batch["image_index"] = torch.tensor(image_index)
        if unreadable:
            batch["unreadable_images"] = unreadable
        input_ids, attention = batch["input_ids"], batch["attention_mask"]
        # Index of each row's last real token, whichever side the padding is on.
        seq_len = input_ids.shape[1]
        positions = torch.arange(seq_len).expand_as(input_ids)
        last_real = torch.where(attention.bool(), positions, -1).max(dim=1).values

        targets = []
        for i, (s, prompt, text) in enumerate(zip(samples, prompts, texts)):
            name_end = prompt.rindex(s["question"]) + s["obj2_span"][1]
            label = f"sample {s['image_path']} ({s['question']!r})"
            targets.append(adapter.target_position(self.tokenizer, text, name_end, s["obj2"], input_ids[i],
                                                   last_real[i], label))
        batch["target_positions"] = torch.tensor(targets)
        if all("cell2" in s for s in samples):  # grid samples: where obj2 is, for the spatial loss
            batch["target_cells"] = torch.tensor([(*s["cell2"], s["size"]) for s in samples])

        if self.with_answer:
            labels = torch.full_like(input_ids, -100)
            for i, (s, prompt, text) in enumerate(zip(samples, prompts, texts)):
                label = f"sample {s['image_path']} ({s['question']!r})"
                start = adapter.token_span_from(self.tokenizer, text, len(prompt), input_ids[i], last_real[i], label)
                end = int(last_real[i]) + 1
                labels[i, start:end] = input_ids[i, start:end]
            batch["labels"] = labels
        return batch


def split_batch(batch, device):
    """(model inputs, target_positions, target_cells) of a collated batch, moved to `device`.
    target_cells is a list of (col, row, size) tuples, or None for samples without grid cells.
    Every tensor moves with non_blocking=True: from the DataLoader's pinned memory (on CUDA) the
    copies overlap with the host's work, and the kernels that read them wait on the same stream."""
    batch = dict(batch)
    positions = batch.pop("target_positions").to(device, non_blocking=True)
    cells = batch.pop("target_cells", None)
    cells = [tuple(c) for c in cells.tolist()] if cells is not None else None
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}, positions, cells


# ---------------------------------------------------------------------------------------------
# COCO-Spatial (What'sUp, COCO two-object subset)
# ---------------------------------------------------------------------------------------------

_CAPTION_RE = re.compile(
    r"^\s*a photo of (?P<art1>an?|the) (?P<x>.+?) (?P<rel>to the left of|to the right of|above|below) "
    r"(?P<art2>an?|the) (?P<y>.+?)\s*\.?\s*$",
    re.IGNORECASE,
)
RELATION_PHRASE = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
_REL_WORD = {phrase: rel for rel, phrase in RELATION_PHRASE.items()}


def indefinite_article(name):
    return "an" if name[:1].lower() in "aeiou" else "a"


def make_caption(obj1, relation, obj2):
    """The What'sUp COCO-Spatial caption: 'A photo of a red circle to the left of an apple'."""
    return (f"A photo of {indefinite_article(obj1)} {obj1} {RELATION_PHRASE[relation]} "
            f"{indefinite_article(obj2)} {obj2}")


def parse_caption(caption):
    """(obj1, relation, obj2, article1, article2) of 'A photo of a/an X <relation> a/an Y'."""
    m = _CAPTION_RE.match(caption)
    if not m:
        raise ValueError(f"caption not in the COCO-Spatial template: {caption!r}")
    return m["x"].strip(), _REL_WORD[m["rel"].lower()], m["y"].strip(), m["art1"], m["art2"]


def original_refs(x, rel, y, a1, a2):
    """(ref1, ref2): how the original code named the objects of a parsed caption: the caption's
    article kept on obj1, and on obj2 for left/right; for above/below its pattern dropped a
    leading 'a ' or 'the ' from obj2 (not 'an ')."""
    ref2 = f"{a2} {y}" if rel in ("left", "right") or a2.lower() not in ("a", "the") else y
    return f"{a1} {x}", ref2


def original_question(caption):
    """The original code's exact wording of a caption's question (see original_refs)."""
    x, rel, y, a1, a2 = parse_caption(caption)
    return fill_template(RELATION_TYPE[rel], *original_refs(x, rel, y, a1, a2))


def coco_image_path(root, image_id):
    root = Path(root)
    name = f"{int(image_id):012d}.jpg"
    direct = root / name
    if direct.is_file() or not (root / "val2017" / name).is_file():
        return direct
    return root / "val2017" / name


def stratified_sample(keys, n, seed=0):
    """Indices (ascending) of a seeded random sample of n of the items whose strata are `keys`
    (one per item), every stratum given its share (largest remainders), never a prefix; all
    indices when n is None or covers them all."""
    if n is None or n >= len(keys):
        return list(range(len(keys)))
    strata = defaultdict(list)
    for i, key in enumerate(keys):
        strata[key].append(i)
    exact = {k: n * len(v) / len(keys) for k, v in strata.items()}
    quota = {k: int(e) for k, e in exact.items()}
    for k in sorted(strata, key=lambda k: (quota[k] - exact[k], str(k)))[:n - sum(quota.values())]:
        quota[k] += 1
    rng = random.Random(seed)
    chosen = []
    for k in sorted(strata, key=str):
        chosen += rng.sample(strata[k], quota[k])
    return sorted(chosen)


def selection_record(n, of, sampled, seed):
    """What a report says about which rows it covers ("N of M rows, sampled (seed S)")."""
    return {"n": n, "of": of, "sampled": bool(sampled), "seed": seed if sampled else None}


def load_coco_spatial(json_path, image_root, question_style="clean", max_samples=None, unreadable=None,
                      sample_seed=0, unparsed=None):
    """COCO-Spatial rows [image_id, true_caption, false_caption] -> evaluation samples, worded
    as the original did (`question_style="paper"`) or with "the {name}" (`"clean"`).

    The gold answer is the relation of the first caption. `max_samples` keeps a seeded random
    sample stratified by relation (`sample_seed`; stratified_sample), never a prefix; each sample
    records it under "selection". A row whose caption does not parse is an error naming it, or,
    given a list as `unparsed`, left out and (row, caption, why) appended there. Missing images
    are an error that counts them and names the first, in one line, before any model is loaded.
    An image that cannot be read (empty, not an image, truncated) is an error naming its row, or,
    given a list as `unreadable`, its question is left out and (row, path, why) appended there;
    rows whose images all fail are an error either way."""
    json_path = Path(json_path)
    if not json_path.is_file():
        raise FileNotFoundError(
            f"COCO-Spatial file not found: {json_path}. Get coco_qa_two_obj.json from the What'sUp "
            "benchmark, or make the offline stand-in: python make_grid_data.py --coco_standin DIR"
        )
    if question_style not in QUESTION_STYLES:
        raise ValueError(f"question_style must be one of {QUESTION_STYLES}, not {question_style!r}")
    try:
        rows = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{json_path}: not a readable JSON file ({err})") from None
    if not isinstance(rows, list):
        raise ValueError(f"{json_path}: expected a JSON list of [image_id, true_caption, false_caption] rows")
    if not rows:
        raise ValueError(f"{json_path}: no rows (an empty list); expected [image_id, true_caption, false_caption] rows")
    parsed = []
    for index, row in enumerate(rows):
        if not (isinstance(row, (list, tuple)) and len(row) >= 2 and isinstance(row[1], str)):
            raise ValueError(f"{json_path}: row {index} is malformed: {row!r} (want [image_id, true_caption, false_caption])")
        image_id = row[0]
        if isinstance(image_id, str) and image_id.strip().isdigit():
            image_id = int(image_id)
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise ValueError(f"{json_path}: row {index} has a bad image id {row[0]!r}")
        try:
            obj1, rel, obj2, _, _ = parse_caption(row[1])
        except ValueError as err:
            if unparsed is None:
                raise ValueError(f"{json_path}: row {index}: {err}") from None
            unparsed.append((index, row[1], str(err)))
            continue
        parsed.append((index, row, image_id, obj1, rel, obj2))
    if not parsed:
        raise ValueError(f"{json_path}: none of its {len(rows)} captions parse (first: row {unparsed[0][0]}, "
                         f"{unparsed[0][1]!r})")
    keep = stratified_sample([rel for _, _, _, _, rel, _ in parsed], max_samples, sample_seed)
    selection = selection_record(len(keep), len(rows), len(keep) < len(parsed), sample_seed)
    samples, missing = [], []
    for index, row, image_id, obj1, rel, obj2 in (parsed[i] for i in keep):
        qtype = RELATION_TYPE[rel]
        path = coco_image_path(image_root, image_id)
        if not path.is_file():
            missing.append(str(path))
        elif problem := image_problem(path):
            if unreadable is None:
                raise ValueError(f"{json_path}: row {index}: image {path} cannot be read ({problem})")
            unreadable.append((index, str(path), problem))
            continue
        sample = sample_record(path, qtype, rel, obj1, obj2, image_id=image_id, row=index, caption=row[1],
                               selection=selection)
        if question_style == "paper":
            sample["question"], sample["obj2_span"] = original_question(row[1])
        samples.append(sample)
    if missing:  # one line whatever the count: the folder once, the first file by name
        raise FileNotFoundError(
            f"{image_root}: {len(missing)} of the {len(keep)} COCO-Spatial images of {json_path.name} are missing "
            f"(first: {Path(missing[0]).name}); put the COCO val2017 images there, named {{id:012d}}.jpg"
        )
    if not samples:
        _, path, why = unreadable[0]
        raise ValueError(f"{json_path}: none of the images of its {len(keep)} rows can be read "
                         f"(first: {path}, {why})")
    return samples


def relation_counts(samples):
    return Counter(s["answer"] for s in samples)
