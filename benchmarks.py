"""Released spatial benchmarks -> evaluation samples, selected by name.

Every format below becomes the same sample dict (what data.VLMCollator and eval_coco read):
`question`, `options`, `answer` (the gold option), `relation`, `image_path`, `obj1`/`obj2` (obj2's
character span in the question as `obj2_span`), the row number `row`, and what rebuilding the
question needs (`template`, `ref1`, `ref2`): `swapped(sample)` asks a two-object question of a
symmetric relation with the objects named in the other order and the gold flipped;
`mirrored(sample)` asks it of the image flipped left to right; `rotated(sample, k)` lists the
options in another order. `with_checks` derives all of them for any sample with a `kind`.

| name | annotation file | images | released rows | options |
|---|---|---|---|---|
| coco_two_obj | coco_qa_two_obj.json (`--val_json`) | COCO val2017 | 440 | left/right, above/below |
| coco_one_obj | coco_qa_one_obj.json | COCO val2017 | 2,247 | left, right, top, bottom |
| vg_two_obj | vg_qa_two_obj.json | vg_images/{id}.jpg | 291 | left, right, front, behind, above, below |
| vg_one_obj | vg_qa_one_obj.json | vg_images/{id}.jpg | 1,160 | left, right, front, behind, top, bottom |
| controlled_a | controlled_images_dataset.json | controlled_images/ | 412 | left, right, on, under |
| controlled_b | controlled_clevr_dataset.json | controlled_clevr/ | 408 | left, right, front, behind |
| vsr | splits/zeroshot/test.jsonl (pinned) | VSR images (COCO 2017) | 1,222 on 715 images | true, false |
| cvbench_relation / _depth / _distance | hub nyu-visionx/CV-Bench test.parquet (its task's rows) | bytes in the rows | 650 / 600 / 600 | letters |
| blink_relation / blink_depth | hub BLINK-Benchmark/BLINK Spatial_Relation / Relative_Depth val | bytes in the rows | 143 / 124 | letters |
| embspatial | hub FlagEval/EmbSpatial-Bench test | bytes in the rows | 3,640 | letters |
| 3dsrbench | hub ccvl/3DSRBench 3dsrbench_v1 parquet | its coco_images.zip | 2,772 | letters |

What'sUp rows are [image_id, true caption, false caption(s)] (the true one first; the controlled
sets: {"image_path", "caption_options"}). A one-object relation is its caption's last word; the
controlled sets take theirs from the image's file name (`left_of`, `right_of`, `_on_`, else under;
`in-front_of`, else behind) and their caption must agree. Object names come from the caption; a
row that does not parse is an error naming its row; a caption that does not (articles are
optional: plurals parse) can instead be left out and counted (`load(..., unparsed=[])`). VSR rows are JSON lines
{"image", "caption", "label" (1 true, 0 false), "relation", ...}; its question asks to judge the
caption true or false. coco_two_obj is data.load_coco_spatial's questions, worded as before
(`question_style`); the others say "the {name}".

The hub's sets ("choice" kind) are multiple-choice questions read from parquet (pyarrow) at a
pinned revision, from the hub's cache or DataRoots.hub_dir (REPO_ID/FILE); a file missing there is
fetched (missing_files(fetch_missing=True)) or named with the `hf download` command. Their options
are the letters, `choices` the released texts, `answer` the gold letter (`released_answer` as
released), `image` the image's bytes and `image_path` a name made of its content; `mirror_answer`
is the gold under a left-right mirror where the row says it. docs/evaluation.md records where each
format was checked.
"""
import functools
import hashlib
import io
import json
import re
import string
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
from PIL import Image, ImageOps

import data

# Every relation word the benchmarks answer with, and its opposite (the swapped question's gold).
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above", "on": "under", "under": "on",
            "front": "behind", "behind": "front", "top": "bottom", "bottom": "top", "true": "true",
            "false": "false"}
# Two-object caption phrases -> relation word (a benchmark reads only the phrases of its own
# relations). "on top of" reads as above: What'sUp's own loader files VG's two-object captions
# that say neither left, right, front nor behind under "top".
RELATION_PHRASE = {"to the left of": "left", "to the right of": "right", "above": "above", "below": "below",
                   "in front of": "front", "behind": "behind", "on": "on", "under": "under", "on top of": "above"}
PHRASE_OF = {rel: phrase for phrase, rel in reversed(RELATION_PHRASE.items())}  # the first phrase of each
# Relations whose opposite holds with the objects named the other way round: a swapped twin is
# asked only for these. "on"/"under" are left out: a scarf under a table does not make the table
# "on" the scarf (it stands over it), so the swapped gold would be doubtful.
SYMMETRIC = frozenset({"left", "right", "above", "below", "front", "behind"})
# Gold after flipping the image left to right: left and right trade places, every other relation
# of the What'sUp sets holds as it was. VSR captions are not mirrored (their wording would change).
MIRRORED = {"left": "right", "right": "left"}
MIRROR_KINDS = ("two_obj", "one_obj", "controlled")

WHATSUP = "What'sUp: github.com/amitakamath/whatsup_vlms (its README's Google Drive folder)"
COCO_VAL = "COCO val2017: images.cocodataset.org/zips/val2017.zip, as {id:012d}.jpg"
VSR = ("VSR: github.com/cambridgeltl/visual-spatial-reasoning, data/splits/zeroshot/test.jsonl; images as its "
       "data/README.md says (vsr_images.zip, or COCO 2017 train+val) under images/")


LETTERS = tuple(string.ascii_uppercase[:4])  # a multiple-choice question's options: its letters (A-D at most)


def _hub_source(hub):
    return f"the Hugging Face hub: {hub.repo_id} (dataset), {hub.filename} at revision {hub.revision[:10]}"


@dataclass(frozen=True)
class HubFile:
    """A released file on the Hugging Face hub, pinned to the commit whose format was checked."""
    repo_id: str
    filename: str
    revision: str

    def fetch_command(self, local_dir=None):
        to = f" --local-dir {Path(local_dir) / self.repo_id}" if local_dir else ""
        return f"hf download {self.repo_id} {self.filename} --repo-type dataset --revision {self.revision}{to}"


# The hub's sets, at the commits docs/evaluation.md records (their formats were checked there).
CVBENCH = HubFile("nyu-visionx/CV-Bench", "test.parquet", "22409a927ab5cf68e3655023d51694587455fc99")
_BLINK_REVISION = "98cc5d1bb4978857cf868598fefd35a510579e2f"
BLINK_RELATION = HubFile("BLINK-Benchmark/BLINK", "Spatial_Relation/val-00000-of-00001.parquet", _BLINK_REVISION)
BLINK_DEPTH = HubFile("BLINK-Benchmark/BLINK", "Relative_Depth/val-00000-of-00001.parquet", _BLINK_REVISION)
EMBSPATIAL = HubFile("FlagEval/EmbSpatial-Bench", "data/test-00000-of-00001.parquet",
                     "3c0e6b34b632de666a51091727c0128d07a54a6a")
_3DSR_REVISION = "24bc4854ead64eb7d1442da7e4789d2c807816b2"
THREEDSR = HubFile("ccvl/3DSRBench", "3dsrbench_v1-00000-of-00001.parquet", _3DSR_REVISION)
THREEDSR_IMAGES = HubFile("ccvl/3DSRBench", "coco_images.zip", _3DSR_REVISION)


@dataclass(frozen=True)
class Benchmark:
    name: str
    kind: str  # "two_obj", "one_obj", "controlled" (two objects, relation from the file name), "vsr",
    #            "choice" (a released multiple-choice question, its options lettered)
    annotation: str  # file name under its folder
    images: str  # image folder: "coco" (--coco_val_dir), or a folder under its root; "embedded" (bytes in
    #              the parquet rows), "zip" (the set's image archive, read in place)
    options: tuple
    released_rows: int
    source: str  # where to get the annotation file
    image_source: str
    hub: tuple = ()  # the HubFiles it reads (annotations first, then an image archive)
    subset: str = None  # the rows it reads of a shared file: CV-Bench's `task` value
    reading: str = None  # how lmms-eval reads its answers (the harness reading, for the reports)


BENCHMARKS = {b.name: b for b in (
    Benchmark("coco_two_obj", "two_obj", "coco_qa_two_obj.json", "coco", ("left", "right", "above", "below"), 440,
              WHATSUP, COCO_VAL),
    Benchmark("coco_one_obj", "one_obj", "coco_qa_one_obj.json", "coco", ("left", "right", "top", "bottom"), 2247,
              WHATSUP, COCO_VAL),
    Benchmark("vg_two_obj", "two_obj", "vg_qa_two_obj.json", "vg_images",
              ("left", "right", "front", "behind", "above", "below"), 291, WHATSUP, WHATSUP + ", vg_images.tar.gz"),
    Benchmark("vg_one_obj", "one_obj", "vg_qa_one_obj.json", "vg_images",
              ("left", "right", "front", "behind", "top", "bottom"), 1160, WHATSUP, WHATSUP + ", vg_images.tar.gz"),
    Benchmark("controlled_a", "controlled", "controlled_images_dataset.json", "controlled_images",
              ("left", "right", "on", "under"), 412, WHATSUP, WHATSUP + ", controlled_images.tar.gz"),
    Benchmark("controlled_b", "controlled", "controlled_clevr_dataset.json", "controlled_clevr",
              ("left", "right", "front", "behind"), 408, WHATSUP, WHATSUP + ", controlled_clevr.tar.gz"),
    Benchmark("vsr", "vsr", "splits/zeroshot/test.jsonl", "images", ("true", "false"), 1222, VSR, VSR),
    *(Benchmark(name, "choice", hub[0].filename, images, LETTERS, rows, _hub_source(hub[0]), _hub_source(hub[-1]),
                hub, subset, reading)
      for name, hub, images, rows, subset, reading in (
          ("cvbench_relation", (CVBENCH,), "embedded", 650, "Relation", "letter"),
          ("cvbench_depth", (CVBENCH,), "embedded", 600, "Depth", "letter"),
          ("cvbench_distance", (CVBENCH,), "embedded", 600, "Distance", "letter"),
          ("blink_relation", (BLINK_RELATION,), "embedded", 143, None, "letter"),
          ("blink_depth", (BLINK_DEPTH,), "embedded", 124, None, "letter"),
          ("embspatial", (EMBSPATIAL,), "embedded", 3640, None, "letter"),
          ("3dsrbench", (THREEDSR, THREEDSR_IMAGES), "zip", 2772, None, "letter_anywhere"))),
)}
NAMES = tuple(BENCHMARKS)
TWO_OBJECT_KINDS = ("two_obj", "controlled")
HUB_NAMES = tuple(n for n, b in BENCHMARKS.items() if b.hub)


@dataclass(frozen=True)
class DataRoots:
    """Where each source lives (eval_coco's data-root flags)."""
    val_json: str = "data/coco_qa_two_obj.json"  # coco_two_obj's file
    coco_val_dir: str = "data/coco"  # COCO val2017 images
    whatsup_dir: str = "data/whatsup"  # What'sUp's other JSON files
    vg_image_dir: str = None  # default: whatsup_dir/vg_images
    controlled_dir: str = None  # holds controlled_images/ and controlled_clevr/; default: whatsup_dir
    vsr_dir: str = "data/vsr"  # VSR's data/ folder: splits/zeroshot/test.jsonl and images/
    hub_dir: str = None  # the hub's sets as REPO_ID/FILE under this folder; default: the hub's own cache


def resolve_names(names):
    """The benchmark names asked for ("all" = every one), in the table's order, each once."""
    names = list(names or ["coco_two_obj"])
    unknown = [n for n in names if n != "all" and n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(NAMES)} or all")
    return list(NAMES) if "all" in names else [n for n in NAMES if n in names]


def hub_path(hub, roots):
    """Where a released hub file is: REPO_ID/FILE under roots.hub_dir, else the hub's own cache at
    its pinned revision (where `hf download` and lmms-eval's downloads put it); None when absent."""
    if roots.hub_dir:
        path = Path(roots.hub_dir) / hub.repo_id / hub.filename
        return path if path.is_file() else None
    cached = huggingface_hub.try_to_load_from_cache(hub.repo_id, hub.filename, revision=hub.revision,
                                                    repo_type="dataset")
    return Path(cached) if isinstance(cached, str) else None


def fetch(hub):
    """Download a hub file (at its pinned revision) into the hub's own cache; its local path."""
    return Path(huggingface_hub.hf_hub_download(hub.repo_id, hub.filename, repo_type="dataset",
                                                revision=hub.revision))


def _missing_hub_files(name, roots, fetch_missing):
    lines = []
    for hub in BENCHMARKS[name].hub:
        if hub_path(hub, roots):
            continue
        where = f"{hub.filename} of {hub.repo_id} (revision {hub.revision[:10]})"
        if roots.hub_dir:
            lines.append(f"{name}: {Path(roots.hub_dir) / hub.repo_id / hub.filename} not found; get it with: "
                         f"{hub.fetch_command(roots.hub_dir)}")
        elif not fetch_missing or huggingface_hub.is_offline_mode():
            why = " and HF_HUB_OFFLINE=1" if fetch_missing else ""
            lines.append(f"{name}: {where} is not in the hub cache{why}; fetch it with: {hub.fetch_command()}")
        else:
            try:
                fetch(hub)
            except Exception as err:  # no network, a proxy, a moved file: all end in the same line
                reason = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
                lines.append(f"{name}: {where} could not be fetched ({reason}); fetch it with: {hub.fetch_command()}")
    return lines


def annotation_path(name, roots):
    bench = BENCHMARKS[name]
    if bench.hub:
        found = hub_path(bench.hub[0], roots)
        return found or Path(roots.hub_dir or "<hub cache>") / bench.hub[0].repo_id / bench.hub[0].filename
    if name == "coco_two_obj":
        return Path(roots.val_json)
    return Path(roots.vsr_dir if bench.kind == "vsr" else roots.whatsup_dir) / bench.annotation


def image_dir(name, roots):
    bench = BENCHMARKS[name]
    if bench.images == "coco":
        return Path(roots.coco_val_dir)
    if bench.kind == "vsr":
        return Path(roots.vsr_dir) / bench.images
    if bench.images == "vg_images":
        return Path(roots.vg_image_dir or Path(roots.whatsup_dir) / "vg_images")
    return Path(roots.controlled_dir or roots.whatsup_dir) / bench.images


def missing_files(names, roots, fetch_missing=False):
    """One line per missing annotation file or image folder, saying where to get it. A hub set's
    files are looked up under roots.hub_dir or in the hub's cache; with `fetch_missing` (and the hub
    not offline), a file not there is downloaded first and named only if that fails."""
    lines = []
    for name in names:
        if BENCHMARKS[name].hub:
            lines += _missing_hub_files(name, roots, fetch_missing)
            continue
        bench, path, folder = BENCHMARKS[name], annotation_path(name, roots), image_dir(name, roots)
        if not path.is_file():
            lines.append(f"{name}: {path} not found; get {Path(bench.annotation).name} from {bench.source}")
        if not folder.is_dir():
            lines.append(f"{name}: image folder {folder} not found; get the images from {bench.image_source}")
    return lines


def present(roots, names=NAMES):
    """The benchmarks whose annotation file and image folder are both there."""
    return [n for n in names if not missing_files([n], roots)]


# ---------------------------------------------------------------------------------------------
# Questions
# ---------------------------------------------------------------------------------------------

def options_phrase(options):
    return ", ".join(options[:-1]) + " or " + options[-1]


def two_object_template(options):
    return "Where is {obj1} in relation to {obj2}? Answer with " + options_phrase(options) + "."


def one_object_template(options):
    return "Where is {obj2} in the photo? Answer with " + options_phrase(options) + "."


def vsr_template(options):
    return 'Is this statement about the image true or false? "{obj2}" Answer with ' + options_phrase(options) + "."


def choice_template(choices):
    """The released question ({obj2}) with its choices lettered, asking for the letter (the
    wording of lmms-eval's prompts for these sets, shared by all of them here)."""
    listed = " ".join(f"({letter}) {choice}" for letter, choice in zip(LETTERS, choices))
    return "{obj2}\nOptions: " + listed + "\nAnswer with the option's letter from the given choices directly."


def fill(template, ref1, ref2):
    """(question, (start, end) span of ref2 inside it): the template's {obj1} and {obj2} filled
    as plain text (nothing else in a template or a reference is read as a format field)."""
    before, after = template.split("{obj2}")
    before = before.replace("{obj1}", ref1 or "")
    return before + ref2 + after, (len(before), len(before) + len(ref2))


def with_question(sample, **changes):
    """A copy of `sample` with `changes`, its question rebuilt from template, ref1 and ref2."""
    out = dict(sample, **changes)
    out["question"], span = fill(out["template"], out["ref1"], out["ref2"])
    if "ref2_name_start" in out:  # VSR: the object named inside the caption
        start = span[0] + out["ref2_name_start"]
        span = (start, start + len(out["obj2"]))
    out["obj2_span"] = span
    return out


def has_swapped_twin(sample):
    return sample["kind"] in TWO_OBJECT_KINDS and sample["relation"] in SYMMETRIC


def swapped(sample):
    """The two-object question with the objects named in the other order and the gold flipped
    (left<->right, above<->below, front<->behind; only SYMMETRIC relations have a twin)."""
    if not has_swapped_twin(sample):
        raise ValueError(f"{sample['benchmark']} row {sample['row']}: only two-object questions of a symmetric "
                         f"relation ({', '.join(sorted(SYMMETRIC))}) have a swapped twin, not {sample['relation']!r}")
    ref1, ref2 = sample["ref2"], sample["ref1"]
    if sample.get("paper_refs"):  # the original's wording of the swapped caption, its article quirk included
        x, rel, y, a1, a2 = sample["paper_refs"]
        ref1, ref2 = data.original_refs(y, OPPOSITE[rel], x, a2, a1)
    return with_question(sample, obj1=sample["obj2"], obj2=sample["obj1"], ref1=ref1, ref2=ref2,
                         answer=OPPOSITE[sample["answer"]], relation=OPPOSITE[sample["relation"]],
                         order="swapped", paper_refs=None)


def mirrored_image(source):
    """The image flipped left to right; `source` is a path, encoded bytes, a PIL image, or a
    callable returning one (a sample's in-memory `image`)."""
    if callable(source):
        source = source()
    if isinstance(source, (bytes, bytearray)):
        with Image.open(io.BytesIO(source)) as img:
            return ImageOps.mirror(img.convert("RGB"))
    if isinstance(source, Image.Image):
        return ImageOps.mirror(source.convert("RGB"))
    return ImageOps.mirror(data.load_image(source))


def has_mirrored_twin(sample):
    """What'sUp's questions (MIRROR_KINDS), and a multiple-choice question whose reader says what its
    gold becomes under a left-right mirror (`mirror_answer`)."""
    return sample["kind"] in MIRROR_KINDS or (sample["kind"] == "choice" and sample.get("mirror_answer") is not None)


def mirrored(sample):
    """The question asked of the image flipped left to right, the gold flipped with it (left<->
    right, other relations unchanged). Its image_path names the flip ("PATH#mirrored"), so a
    batch never takes it for the unflipped image; `image` draws it when the batch is built."""
    if not has_mirrored_twin(sample):
        raise ValueError(f"{sample['benchmark']} row {sample['row']}: {sample['kind']} questions have no mirrored twin"
                         + (" (the row does not say how a mirror changes its answer)" if sample["kind"] == "choice"
                            else ""))
    path = str(sample["image_path"])
    source = sample.get("image", path)  # a reader's in-memory image (bytes, PIL, callable), else the file
    if sample["kind"] == "choice":  # the gold under a mirror is the reader's `mirror_answer` (a letter)
        gold, flipped = sample["answer"], sample["mirror_answer"]
        return dict(sample, image_path=path + "#mirrored", image=functools.partial(mirrored_image, source),
                    answer=flipped, mirror_answer=gold, order="mirrored",
                    mirror_map={gold: flipped, flipped: gold} if flipped != gold else {})
    return dict(sample, image_path=path + "#mirrored", image=functools.partial(mirrored_image, source),
                answer=MIRRORED.get(sample["answer"], sample["answer"]),
                relation=MIRRORED.get(sample["relation"], sample["relation"]), order="mirrored")


def rotated(sample, k):
    """The question with its option list rotated by k (options[k:] + options[:k]) in the prompt:
    each option word of the template is replaced by the word at its place in the new order. A
    multiple-choice question keeps its letters and moves its choices: choices[k:] + choices[:k]
    under A, B, ..., the gold letter following its choice (MMBench's circular evaluation)."""
    options = tuple(sample["options"])
    k %= len(options)
    if sample["kind"] == "choice":
        choices = tuple(sample["choices"])[k:] + tuple(sample["choices"])[:k]
        moved = {old: options[(i - k) % len(options)] for i, old in enumerate(options)}  # old letter -> new
        mirror = sample.get("mirror_answer")
        return with_question(sample, template=choice_template(choices), choices=choices,
                             answer=moved[sample["answer"]], mirror_answer=moved[mirror] if mirror else None,
                             rotation=k)
    new = options[k:] + options[:k]
    mapping = dict(zip(options, new))
    pattern = re.compile(r"\b(" + "|".join(re.escape(o) for o in options) + r")\b")
    template = pattern.sub(lambda m: mapping[m.group(1)], sample["template"])
    return with_question(sample, template=template, options=new, rotation=k)


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------

class BenchmarkFormatError(ValueError):
    """A row or caption of a released file that does not parse; the message names the row."""


def _phrase_re(relations):
    phrases = sorted((p for p, r in RELATION_PHRASE.items() if r in relations), key=len, reverse=True)
    # Articles are optional (plurals: "A photo of children to the left of a dog"); "a photo of"
    # is tried first, so it is never read as part of the first object's name.
    return re.compile(r"^\s*(?:an?\s+photo\s+of\s+)?(?:(?P<a1>an?|the|some)\s+)?(?P<x>.+?)\s+(?P<phrase>"
                      + "|".join(re.escape(p) for p in phrases)
                      + r")\s+(?:(?P<a2>an?|the|some)\s+)?(?P<y>.+?)\s*\.?\s*$", re.IGNORECASE)


_ONE_OBJECT_RE = re.compile(r"^\s*(?:an?\s+photo\s+of\s+)?(?:(?:an?|the|some)\s+)?(?P<x>.+?)"
                            r"(?:\s+(?:is|are))?(?:\s+(?:on|to|at|in)(?:\s+the)?)?\s+(?P<rel>[a-z]+)\s*\.?\s*$",
                            re.IGNORECASE)


def parse_two_object_caption(caption, relations):
    """(obj1, relation, obj2, article1, article2) of '[A photo of] [a] X <phrase> [a] Y' (an
    absent article is None)."""
    m = _phrase_re(relations).match(caption) if isinstance(caption, str) else None
    if not m or not m["x"].strip() or not m["y"].strip():
        raise BenchmarkFormatError(f"caption {caption!r} is not 'A photo of [a] X <relation> [a] Y' with a relation "
                                   f"among {', '.join(PHRASE_OF[r] for r in relations)}")
    return m["x"].strip(), RELATION_PHRASE[m["phrase"].lower()], m["y"].strip(), m["a1"], m["a2"]


def parse_one_object_caption(caption, relations):
    """(obj, relation) of 'A photo of a X on the <relation>' (the relation is the last word)."""
    m = _ONE_OBJECT_RE.match(caption) if isinstance(caption, str) else None
    if not m or m["rel"].lower() not in relations:
        raise BenchmarkFormatError(f"caption {caption!r} is not 'A photo of [a] X on the <relation>' with its last "
                                   f"word among {', '.join(relations)}")
    return m["x"].strip(), m["rel"].lower()


def controlled_relation(image_path, options):
    """What'sUp's rule: the relation from the image's file name (`options`: the set's four, the
    third the one its name spells out: `_on_` or `in-front_of`, else the fourth)."""
    name = Path(str(image_path)).name
    if "left_of" in name:
        return "left"
    if "right_of" in name:
        return "right"
    return options[2] if {"on": "_on_", "front": "in-front_of"}[options[2]] in name else options[3]


def controlled_pair_key(image_path):
    """What'sUp's key of the four images of one object pair: (first, last) '_' parts of the name."""
    stem = Path(str(image_path)).stem
    parts = stem.split("_")
    return parts[0], parts[-1]


def _read_json_rows(path):
    try:
        if path.suffix == ".jsonl":
            rows = []
            for number, line in enumerate(path.read_text().splitlines()):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as err:
                        raise BenchmarkFormatError(f"{path}: row {len(rows)} (line {number + 1}) is not JSON ({err})")
        else:
            rows = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        if isinstance(err, BenchmarkFormatError):
            raise
        raise BenchmarkFormatError(f"{path}: not a readable JSON file ({err})") from None
    if not isinstance(rows, list) or not rows:
        raise BenchmarkFormatError(f"{path}: expected a non-empty list of rows")
    return rows


def _image_for(name, row, folder):
    """(image id, image path) of a row of `name`'s file."""
    bench = BENCHMARKS[name]
    if bench.kind == "vsr":
        image = row["image"]
        direct = folder / image
        for sub in ("", "train2017", "val2017"):
            if (folder / sub / image).is_file():
                return image, folder / sub / image
        return image, direct
    if bench.kind == "controlled":
        return row["image_path"], folder / Path(row["image_path"]).name
    image_id = row[0]
    if isinstance(image_id, str) and image_id.strip().isdigit():
        image_id = int(image_id)
    if not isinstance(image_id, int) or isinstance(image_id, bool):
        raise BenchmarkFormatError(f"bad image id {row[0]!r}")
    return image_id, data.coco_image_path(folder, image_id) if bench.images == "coco" else folder / f"{image_id}.jpg"


def _check_row_shape(kind, row):
    if kind == "vsr":
        ok = (isinstance(row, dict) and isinstance(row.get("image"), str) and isinstance(row.get("caption"), str)
              and row.get("label") in (0, 1))
        want = '{"image", "caption", "label": 0 or 1, ...}'
    elif kind == "controlled":
        ok = (isinstance(row, dict) and isinstance(row.get("image_path"), str)
              and isinstance(row.get("caption_options"), list) and row["caption_options"]
              and isinstance(row["caption_options"][0], str))
        want = '{"image_path", "caption_options": [true caption, ...]}'
    else:
        ok = isinstance(row, (list, tuple)) and len(row) >= 2 and isinstance(row[1], str)
        want = "[image_id, true caption, false caption(s)]"
    if not ok:
        shown = json.dumps(row)
        raise BenchmarkFormatError(f"malformed row {shown[:60] + ('...' if len(shown) > 60 else '')} (want {want})")


def _sample(name, index, row, path, image_id):
    """The evaluation sample of one parsed row (its image path already resolved)."""
    bench = BENCHMARKS[name]
    base = dict(benchmark=name, kind=bench.kind, row=index, image_id=image_id, image_path=str(path), order="asked",
                rotation=0, options=bench.options)
    if bench.kind == "vsr":
        caption = row["caption"].strip()
        obj = row.get("obj") if isinstance(row.get("obj"), str) else None
        start = caption.lower().rfind(obj.lower()) if obj else -1
        if start < 0:  # no object field (the README's form): the last word
            obj = re.findall(r"[A-Za-z]+", caption)[-1]
            start = caption.rfind(obj)
        # The caption is the question's {obj2}: its object is located inside it.
        return with_question(base, template=vsr_template(bench.options), ref1=None, ref2=caption,
                             ref2_name_start=start, obj1=row.get("subj") or "", obj2=caption[start:start + len(obj)],
                             answer="true" if row["label"] == 1 else "false",
                             relation=str(row.get("relation", "")), caption=caption)
    if bench.kind == "one_obj":
        obj, rel = parse_one_object_caption(row[1], bench.options)
        return with_question(base, template=one_object_template(bench.options), ref1=None, ref2=f"the {obj}",
                             obj1=obj, obj2=obj, answer=rel, relation=rel, caption=row[1])
    if bench.kind == "controlled":
        caption = row["caption_options"][0]
        x, rel, y, _, _ = parse_two_object_caption(caption, bench.options)
        named = controlled_relation(row["image_path"], bench.options)
        if rel != named:
            raise BenchmarkFormatError(f"caption {caption!r} says {rel!r}, its file name {row['image_path']} says {named!r}")
        base["pair_key"] = controlled_pair_key(row["image_path"])
    else:
        x, rel, y, _, _ = parse_two_object_caption(row[1], bench.options)
        caption = row[1]
    return with_question(base, template=two_object_template(bench.options), ref1=f"the {x}", ref2=f"the {y}",
                         obj1=x, obj2=y, answer=rel, relation=rel, caption=caption)


def _coco_two_obj(roots, question_style, max_samples, unreadable, sample_seed, unparsed):
    """data.load_coco_spatial's questions (wording unchanged), with what swapping and rotating need."""
    samples = data.load_coco_spatial(roots.val_json, roots.coco_val_dir, question_style, max_samples,
                                     unreadable=unreadable, sample_seed=sample_seed, unparsed=unparsed)
    out = []
    for s in samples:
        x, rel, y, a1, a2 = data.parse_caption(s["caption"])
        if question_style == "paper":
            ref1, ref2, paper_refs = *data.original_refs(x, rel, y, a1, a2), (x, rel, y, a1, a2)
        else:
            ref1, ref2, paper_refs = data.refer(x), data.refer(y), None
        extra = dict(benchmark="coco_two_obj", kind="two_obj", order="asked", rotation=0, relation=rel,
                     template=data.QUESTION_TEMPLATES[s["qtype"]], ref1=ref1, ref2=ref2, paper_refs=paper_refs)
        rebuilt = with_question(dict(s, **extra))
        if rebuilt["question"] != s["question"]:  # the same words as load_coco_spatial's, by construction
            raise AssertionError(f"coco_two_obj row {s['row']}: rebuilt {rebuilt['question']!r} != {s['question']!r}")
        out.append(rebuilt)
    return out


# ---------------------------------------------------------------------------------------------
# The hub's multiple-choice sets (parquet rows, images as bytes)
# ---------------------------------------------------------------------------------------------

# Relation words of BLINK's yes/no questions and whether a left-right mirror of the image flips
# the answer: the question's relation turns into its opposite (left <-> right) or stays.
_MIRROR_FLIPS = {"left": True, "right": True, "above": False, "below": False, "beneath": False, "under": False,
                 "on": False, "over": False, "in front of": False, "behind": False, "touching": False,
                 "inside": False, "contains": False, "far": False, "close": False, "near": False,
                 "closer": False, "farther": False}
_RELATION_WORD_RE = re.compile(r"\b(" + "|".join(sorted(map(re.escape, _MIRROR_FLIPS), key=len, reverse=True))
                               + r")\b", re.IGNORECASE)
# 3DSRBench's categories whose answer a left-right mirror leaves as it is (the others turn on
# left/right or on orientation, which a mirror changes in ways the released row does not say).
_3DSR_MIRROR_SAME = {"height_higher", "location_above", "location_closer_to_camera"}
# The columns each reader needs (a file without one is an error naming it), and those it reads
# when the file has them.
_OPTIONAL_COLUMNS = {"cvbench": ("source", "source_dataset")}
_COLUMNS = {
    "cvbench": ("idx", "task", "image", "question", "choices", "answer"),
    "blink": ("idx", "question", "image_1", "image_2", "image_3", "image_4", "choices", "answer"),
    "embspatial": ("question_id", "question", "answer_options", "answer", "relation", "image"),
    "3dsrbench": ("index", "question", "A", "B", "C", "D", "answer", "category", "image_url"),
}


def _reader(name):
    return name.split("_")[0]


def _letter_index(answer, count):
    """The option index of a released gold answer "(A)" / "A" (CV-Bench, BLINK, 3DSRBench)."""
    letter = answer.strip().strip("()").strip() if isinstance(answer, str) else None
    if not letter or letter not in LETTERS[:count]:
        raise BenchmarkFormatError(f"gold answer {answer!r} is not one of the letters {', '.join(LETTERS[:count])}")
    return LETTERS.index(letter)


def _image_bytes(value, column):
    """The bytes of a parquet image column ({bytes, path}, as the hub's `datasets` writes images)."""
    raw = value.get("bytes") if isinstance(value, dict) else None
    if not raw:
        raise BenchmarkFormatError(f"column {column!r} holds no image bytes ({type(value).__name__})")
    return bytes(raw)


def _choice_row(name, row, archive):
    """(released id, question, choices, gold index, relation, image bytes, mirror) of one row; mirror:
    True when a left-right mirror of the image flips the gold to the other choice, False when it
    leaves it, None when the row does not say."""
    reader = _reader(name)
    if reader == "cvbench":
        choices = list(row["choices"] or [])
        gold = _letter_index(row["answer"], len(choices))
        text = choices[gold].strip().lower()
        relation = text if name == "cvbench_relation" else str(row.get("source_dataset") or row.get("source") or
                                                                  row["task"]).strip()
        mirror = (text in ("left", "right")) if name == "cvbench_relation" else False
        return row["idx"], row["question"], choices, gold, relation, _image_bytes(row["image"], "image"), mirror
    if reader == "blink":
        extra = [c for c in ("image_2", "image_3", "image_4") if row.get(c)]
        if extra:
            raise BenchmarkFormatError(f"has {', '.join(extra)}: the question shows several images, this set one")
        choices = list(row["choices"] or [])
        gold = _letter_index(row["answer"], len(choices))
        if name == "blink_depth":
            relation, mirror = "closer point", False  # the points' labels are drawn in the image and move with it
        else:
            found = _RELATION_WORD_RE.search(row["question"])
            relation = found[1].lower() if found else "other"
            mirror = _MIRROR_FLIPS[relation] if found and {c.lower() for c in choices} == {"yes", "no"} else None
        return row["idx"], row["question"], choices, gold, relation, _image_bytes(row["image_1"], "image_1"), mirror
    if reader == "embspatial":
        choices, gold = list(row["answer_options"] or []), row["answer"]
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise BenchmarkFormatError(f"gold answer {gold!r} is not an index into its {len(choices)} answer_options")
        relation = str(row["relation"]).strip().lower()
        # which object is left of another turns into another object under a mirror: not derivable
        mirror = None if relation in ("left", "right") else False
        return row["question_id"], row["question"], choices, gold, relation, _image_bytes(row["image"], "image"), mirror
    choices = []  # 3DSRBench: options in columns A-D, the unused ones empty
    for letter in LETTERS:
        value = row.get(letter)
        if value is None or (isinstance(value, float) and value != value) or str(value).strip().lower() in ("", "nan"):
            break
        choices.append(str(value).strip())
    gold = _letter_index(row["answer"], len(choices))
    member = archive.member(row["image_url"])
    mirror = False if row["category"] in _3DSR_MIRROR_SAME else None
    return row["index"], row["question"], choices, gold, str(row["category"]), archive.read(member), mirror


class _ImageNotInArchive(LookupError):
    """A row's image is not in the set's archive (counted, as a missing image file is)."""


class _ImageArchive:
    """3DSRBench's coco_images.zip, read in place: an image by its URL's file name."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.zip = zipfile.ZipFile(self.path)
        except (OSError, zipfile.BadZipFile) as err:
            raise BenchmarkFormatError(f"{self.path}: not a readable zip archive ({err})") from None
        self.by_name = {}
        for info in self.zip.infolist():
            if not info.is_dir():
                self.by_name.setdefault(Path(info.filename).name, info.filename)

    def member(self, url):
        name = Path(str(url).split("?")[0]).name
        if name not in self.by_name:
            raise _ImageNotInArchive(name)
        return self.by_name[name]

    def read(self, member):
        return self.zip.read(member)


def _read_parquet(path, columns, optional=()):
    """The rows (dicts) of a parquet file, only `columns` (and those of `optional` it has); an
    error naming a missing column."""
    try:
        import pyarrow.parquet as pq  # only the hub's sets need it (requirements.txt)
    except ImportError:
        raise BenchmarkFormatError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        schema = pq.read_schema(path)
        absent = [c for c in columns if c not in schema.names]
        if absent:
            raise BenchmarkFormatError(f"{path}: no column {', '.join(map(repr, absent))} (it has "
                                       f"{', '.join(schema.names)})")
        return pq.read_table(path, columns=list(columns) + [c for c in optional if c in schema.names]).to_pylist()
    except BenchmarkFormatError:
        raise
    except Exception as err:  # pyarrow's errors (ArrowInvalid, OSError) have no common base
        raise BenchmarkFormatError(f"{path}: not a readable parquet file ({str(err).splitlines()[0][:120]})") from None


def _choice_sample(name, index, released_id, question, choices, gold, relation, image, mirror, file_name):
    """The evaluation sample of one multiple-choice row: options are the letters, `choices` the
    released texts, `answer` the gold letter; the image is kept as bytes and named by its content."""
    if not isinstance(question, str) or not re.search(r"[A-Za-z]", question):
        raise BenchmarkFormatError(f"question {question!r} is not text")
    if not 2 <= len(choices) <= len(LETTERS) or not all(isinstance(c, str) and c.strip() for c in choices):
        raise BenchmarkFormatError(f"choices {choices!r}: want 2 to {len(LETTERS)} non-empty texts")
    question = question.replace("<image>", "").strip()
    # The question's last plain word stands where obj2 is elsewhere (the collator locates a token
    # there): letters only, not part of "TV's" or "X-ray", whose last token runs past the letters.
    words = list(re.finditer(r"(?<![\w'-])[A-Za-z]+(?![\w'-])", question))
    if not words:
        raise BenchmarkFormatError(f"question {question!r} has no plain word")
    word, start = words[-1][0], words[-1].start()
    options = LETTERS[:len(choices)]
    choices = tuple(c.strip() for c in choices)
    mirror_answer = None if mirror is None else options[gold] if not mirror else \
        options[1 - gold] if len(choices) == 2 else None
    digest = hashlib.sha1(image).hexdigest()[:16]
    sample = dict(benchmark=name, kind="choice", row=index, image_id=released_id,
                  image_path=f"{Path(file_name).name}#sha1={digest}", image=image, order="asked", rotation=0,
                  options=options, choices=choices, answer=options[gold],
                  relation=relation, mirror_answer=mirror_answer, reading=BENCHMARKS[name].reading,
                  template=choice_template(choices), ref1=None, ref2=question, ref2_name_start=start, obj1="",
                  obj2=word, caption=question)
    return with_question(sample)


def _readable(path, index, image, label, unreadable):
    """Whether a row's image (a file or its bytes) can be read; if not, an error naming the row, or
    with a list as `unreadable` (row, label, why) appended there."""
    problem = data.image_problem(image)
    if problem and unreadable is None:
        raise ValueError(f"{path}: row {index}: image {label} cannot be read ({problem})")
    if problem:
        unreadable.append((index, str(label), problem))
    return not problem


def _all_found(where, absent, total, name, hint=""):
    """One line for the rows whose image is missing: counted, the first named."""
    if absent:
        raise FileNotFoundError(f"{where}: {len(absent)} of the {total} images of {name} are missing "
                                f"(first: {absent[0]}){hint}")


def _load_choice(name, roots, max_samples, unreadable, sample_seed=0):
    bench = BENCHMARKS[name]
    missing = _missing_hub_files(name, roots, fetch_missing=False)
    if missing:
        raise FileNotFoundError(missing[0])
    path = hub_path(bench.hub[0], roots)
    archive = _ImageArchive(hub_path(bench.hub[1], roots)) if len(bench.hub) > 1 else None
    rows = _read_parquet(path, _COLUMNS[_reader(name)], _OPTIONAL_COLUMNS.get(_reader(name), ()))
    numbered = [(i, r) for i, r in enumerate(rows) if bench.subset is None or r.get("task") == bench.subset]
    if len(numbered) != bench.released_rows:
        # A local copy of another revision (--hub_dir) still evaluates; the report says n of the released rows
        print(f"warning: {path}: {len(numbered)} {name} rows, the pinned release has {bench.released_rows:,}",
              file=sys.stderr)
    parsed, absent = [], []
    for index, row in numbered:
        try:
            released_id, question, choices, gold, relation, image, mirror = _choice_row(name, row, archive)
            sample = _choice_sample(name, index, released_id, question, choices, gold, relation, image, mirror,
                                    bench.hub[0].filename)
            sample["released_answer"] = row["answer"]  # the gold as released: "(A)", "A" or an index
        except _ImageNotInArchive as err:
            absent.append(str(err))
            continue
        except (BenchmarkFormatError, KeyError, TypeError, AttributeError) as err:
            if not isinstance(err, BenchmarkFormatError):
                err = f"malformed row ({type(err).__name__}: {err})"
            raise BenchmarkFormatError(f"{path}: row {index}: {err}") from None
        parsed.append(sample)
    _all_found(archive.path if archive else path, absent, len(numbered), name)
    # --eval_max_samples: a seeded sample stratified by relation, as for What'sUp, never a prefix
    keep = data.stratified_sample([s["relation"] for s in parsed], max_samples, sample_seed)
    selection = data.selection_record(len(keep), len(numbered), len(keep) < len(parsed), sample_seed)
    samples = [dict(sample, selection=selection) for sample in (parsed[i] for i in keep)
               if _readable(path, sample["row"], sample["image"], sample["image_path"], unreadable)]
    if not samples:
        raise ValueError(f"{path}: none of its {len(numbered)} {name} rows has a readable image")
    return samples


def load(name, roots, question_style="clean", max_samples=None, unreadable=None, sample_seed=0, unparsed=None):
    """Evaluation samples of benchmark `name` from its released files under `roots` (DataRoots).

    Every row by default; `max_samples` keeps a seeded random sample stratified by relation
    (data.stratified_sample with `sample_seed`), never a prefix, and every sample records which
    rows were kept under "selection". A missing file or a malformed row is an error naming the file
    and row. A caption that does not parse is an error naming its row, or with a list as
    `unparsed` the row is left out and (row, caption, why) appended there. Missing images are
    counted and the first named, in one line; an unreadable image is an error naming its row, or
    with a list as `unreadable` its question is left out and (row, path, why) appended there.
    All before any model loads."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(NAMES)}")
    if name == "coco_two_obj":
        return _coco_two_obj(roots, question_style, max_samples, unreadable, sample_seed, unparsed)
    if BENCHMARKS[name].hub:
        return _load_choice(name, roots, max_samples, unreadable, sample_seed)
    missing = missing_files([name], roots)
    if missing:
        raise FileNotFoundError(missing[0])
    path, folder, bench = annotation_path(name, roots), image_dir(name, roots), BENCHMARKS[name]
    rows = _read_json_rows(path)
    parsed = []
    for index, row in enumerate(rows):
        try:
            _check_row_shape(bench.kind, row)
            image_id, image = _image_for(name, row, folder)
        except BenchmarkFormatError as err:
            raise BenchmarkFormatError(f"{path}: row {index}: {err}") from None
        try:
            parsed.append(_sample(name, index, row, image, image_id))
        except BenchmarkFormatError as err:
            if unparsed is None:
                raise BenchmarkFormatError(f"{path}: row {index}: {err}") from None
            caption = row.get("caption", row.get("caption_options")) if isinstance(row, dict) else row[1]
            unparsed.append((index, caption, str(err)))
    if not parsed:
        raise BenchmarkFormatError(f"{path}: none of its {len(rows)} captions parse (first: row {unparsed[0][0]}, "
                                   f"{unparsed[0][1]!r})")
    keep = data.stratified_sample([s["relation"] for s in parsed], max_samples, sample_seed)
    selection = data.selection_record(len(keep), len(rows), len(keep) < len(parsed), sample_seed)
    samples, absent = [], []
    for sample in (parsed[i] for i in keep):
        image = Path(sample["image_path"])
        if not image.is_file():
            absent.append(str(image))
            continue
        if _readable(path, sample["row"], image, image, unreadable):
            samples.append(dict(sample, selection=selection))
    _all_found(folder, [Path(a).name for a in absent], len(keep), name, "; docs/evaluation.md says where to get them")
    if not samples:
        raise ValueError(f"{path}: none of the images of its {len(keep)} rows can be read (first: {unreadable[0][1]})")
    return samples


def with_checks(samples, consistency=True, option_orders=1, mirror=True):
    """The questions to ask: every sample as given, its swapped twin (two-object questions of a
    symmetric relation, with `consistency`), its mirrored twin (every What'sUp question, and a
    multiple-choice one whose row says its gold under a mirror; with `mirror`), and its options
    rotated by 1 .. option_orders-1. New benchmarks get the checks by giving their samples a `kind`
    (TWO_OBJECT_KINDS swap, MIRROR_KINDS mirror, "choice" with `mirror_answer`) and a `template`."""
    out = list(samples)
    if consistency:
        out += [swapped(s) for s in samples if has_swapped_twin(s)]
    if mirror:
        out += [mirrored(s) for s in samples if has_mirrored_twin(s)]
    for k in range(1, option_orders):
        out += [rotated(s, k) for s in samples if k < len(s["options"])]
    return out
