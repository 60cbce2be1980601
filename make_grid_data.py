"""Make the synthetic training data: objects tiled on a 4x4 grid, one PNG per layout, named in
the format data.py reads (`data.format_grid_name`). Optionally also write a small offline
stand-in for the COCO-Spatial evaluation set (for smoke runs without the real data).

    python make_grid_data.py --out_dir data/grid                      # built-in objects
    python make_grid_data.py --objects_dir renders/ --local_variation   # your RGBA renders
    python make_grid_data.py --coco_standin data/coco_standin --standin_only

Everything random comes from `random.Random` seeded by the seed and the image's own name (or
id), so the same arguments give byte-identical files, and an image's content does not depend on
which other images were written (--max_pairs / --max_images only choose which are written).
"""
import argparse
import io
import json
import random
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

import benchmarks
import data
from data import GRID, OBJECT_SIZES, REFERENCE_CELL
from grid_sources import (BUILTIN, IMAGE_SUFFIXES, ObjectSubsetError, cell_pairs, check_grid_args, grid_cells, grid_layouts,  # noqa: F401
                          list_images, load_objects, load_objects_dir, planned_layouts, select_pairs)
from output_paths import output_problem
from render import builtin_objects, drawn_size, fit_object, render_grid_image  # noqa: F401

# Fixed options and no pnginfo, so nothing in the file varies between runs. Level 1: about 3x
# faster than the default for ~1.5x the bytes (the full default set is ~127k images).
PNG_OPTIONS = dict(format="PNG", compress_level=1, optimize=False)
JPEG_OPTIONS = dict(format="JPEG", quality=92, subsampling=0, optimize=False)
STANDIN_JSON = "coco_qa_two_obj_standin.json"


# File layouts: ours (flat, every name parsed by data.parse_grid_name), the original's flat
# training names (no size in the name), and the original's nested ID-extraction layout.
LAYOUTS = ("flat", "original", "extraction")


def original_grid_name(layout):
    """The original code's training file name: `{obj1}_{x1}-{y1}_{obj2}_{x2}-{y2}.png`."""
    (c1, r1), (c2, r2) = layout.cell1, layout.cell2
    return f"{layout.obj1}_{c1}-{r1}_{layout.obj2}_{c2}-{r2}.png"


def layout_path(out_dir, layout, file_layout="flat"):
    if file_layout == "extraction":
        return data.extraction_path(out_dir, layout)
    if file_layout == "original":
        return Path(out_dir) / original_grid_name(layout)
    return Path(out_dir) / data.format_grid_name(layout)


def make_grid_images(out_dir, objects, cell=224, sizes=OBJECT_SIZES, no_same_row_or_col=False,
                     local_variation=False, bg_dir=None, max_pairs=None, max_images=None, seed=0,
                     progress=True, file_layout="flat"):
    """Draw every layout (see grid_layouts) into out_dir as PNGs; returns the written paths.
    `file_layout` (LAYOUTS): "extraction" writes the original's nested ID-extraction set,
    transparent RGBA images; "original" the original's flat names (one size only)."""
    check_grid_args(cell, sizes)
    if file_layout not in LAYOUTS:
        raise ValueError(f"file layout must be one of {LAYOUTS}, not {file_layout!r}")
    if file_layout == "original" and len(set(sizes)) > 1:
        raise ValueError(f"the original's file names carry no object size: give one size, not {sorted(set(sizes))}")
    if file_layout == "extraction" and (bg_dir is not None or local_variation):
        raise ValueError("the extraction layout draws on a transparent canvas without variation: "
                         "drop --bg_dir / --local_variation")
    if len(objects) < 2:
        raise ValueError(f"need at least 2 objects, got {len(objects)}")
    for value, what in ((max_pairs, "max_pairs"), (max_images, "max_images")):
        if value is not None and value < 1:
            raise ValueError(f"{what} must be >= 1, not {value}")
    for name in objects:
        data.check_object_name(name)
    backgrounds = [str(p) for p in list_images(bg_dir, "background")] if bg_dir is not None else None

    layouts = planned_layouts(objects, sizes, no_same_row_or_col, max_pairs, max_images, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fitted = {}  # objects scaled to each size, reused when there is no per-image variation
    written = []
    for layout in tqdm(layouts, desc=f"grid images -> {out_dir}", disable=not progress, unit="img",
                       mininterval=1 if sys.stderr.isatty() else 30):
        img = render_grid_image(layout, objects, cell, local_variation, backgrounds, seed, fitted,
                                transparent=file_layout == "extraction")
        path = layout_path(out_dir, layout, file_layout)
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, **PNG_OPTIONS)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------
# COCO-Spatial stand-in
# ---------------------------------------------------------------------------------------------

OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


def standin_positions(relation, s1, s2, image_size, rng):
    """Centres (x1, y1), (x2, y2) of obj1 and obj2 (sizes s1, s2) so that `relation` (obj1
    relative to obj2) is unambiguous: a clear gap on its axis and a small offset on the other."""
    margin = image_size * 0.02
    gap = image_size * 0.06
    lower_first = relation in ("left", "above")  # obj1 has the lower coordinate on the axis
    h_low, h_high = (s1 / 2, s2 / 2) if lower_first else (s2 / 2, s1 / 2)
    # Main axis: the distance between centres leaves at least `gap` between the objects.
    d = rng.uniform(h_low + h_high + gap, image_size - 2 * margin - h_low - h_high)
    c_low = rng.uniform(margin + h_low, image_size - margin - h_high - d)
    c_high = c_low + d
    a1, a2 = (c_low, c_high) if lower_first else (c_high, c_low)
    # Other axis: both near a shared line, offsets within 10% of the smaller object.
    half = max(s1, s2) / 2
    offset = 0.1 * min(s1, s2)
    line = rng.uniform(margin + half + offset, image_size - margin - half - offset)
    b1, b2 = line + rng.uniform(-offset, offset), line + rng.uniform(-offset, offset)
    if relation in ("left", "right"):
        return (a1, b1), (a2, b2)
    return (b1, a1), (b2, a2)


def standin_background(image_size, rng):
    """A light plain background, or the same with mild pixel noise."""
    base = [rng.randint(200, 245) for _ in range(3)]
    if rng.random() < 0.5:
        return Image.new("RGB", (image_size, image_size), tuple(base))
    noise = np.random.default_rng(rng.getrandbits(32)).integers(-12, 13, (image_size, image_size, 3))
    pixels = np.clip(np.array(base, dtype=np.int32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def make_coco_standin(out_dir, objects, n=40, image_size=224, seed=0):
    """Write out_dir/coco_qa_two_obj_standin.json (rows [image_id, true_caption, false_caption])
    and out_dir/{id:012d}.jpg for ids 1..n. Relations cycle left, right, above, below.

    A synthetic stand-in for offline smoke runs only: it is not COCO-Spatial."""
    if n < 1:
        raise ValueError(f"standin size must be >= 1, not {n}")
    if image_size < 32:
        raise ValueError(f"standin image size must be >= 32 px, not {image_size}")
    names = list(objects)
    if len(names) < 2:
        raise ValueError(f"need at least 2 objects, got {len(names)}")
    for name in names:
        data.check_object_name(name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for image_id in range(1, n + 1):
        relation = data.ANSWER_WORDS[(image_id - 1) % len(data.ANSWER_WORDS)]
        rng = random.Random(f"standin:{seed}:{image_id}")
        obj1, obj2 = rng.sample(names, 2)
        img = standin_background(image_size, rng)
        s1, s2 = (round(image_size * rng.uniform(0.22, 0.32)) for _ in range(2))
        for name, s, (cx, cy) in zip((obj1, obj2), (s1, s2), standin_positions(relation, s1, s2, image_size, rng)):
            obj = fit_object(objects[name], s)
            img.paste(obj, (round(cx - obj.width / 2), round(cy - obj.height / 2)), obj)
        img.save(data.coco_image_path(out_dir, image_id), **JPEG_OPTIONS)
        rows.append([image_id, data.make_caption(obj1, relation, obj2), data.make_caption(obj1, OPPOSITE[relation], obj2)])
    json_path = out_dir / STANDIN_JSON
    json_path.write_text("[\n" + ",\n".join(json.dumps(row) for row in rows) + "\n]\n")  # a row per line
    data.load_coco_spatial(json_path, out_dir)  # the evaluation loader must accept it
    return json_path


# ---------------------------------------------------------------------------------------------
# Stand-ins of every benchmark format (benchmarks.py), for tests and bench/bench_eval.py
# ---------------------------------------------------------------------------------------------

# Where a drawn stand-in puts obj1 relative to obj2 for relations off the image plane.
_DRAWN_AS = {"front": "below", "behind": "above", "on": "above", "under": "below", "top": "above", "bottom": "below"}


def _standin_image(path, relation, names, objects, image_size, rng):
    """A stand-in image file: obj1 placed `relation` of obj2 (two names), or one object in the
    `relation` part of the image (one name)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _standin_picture(relation, names, objects, image_size, rng).save(path, **JPEG_OPTIONS)


def _standin_jpeg(relation, names, objects, image_size, rng):
    """The JPEG bytes of a stand-in image (the hub's sets hold their images in their rows)."""
    out = io.BytesIO()
    _standin_picture(relation, names, objects, image_size, rng).save(out, **JPEG_OPTIONS)
    return out.getvalue()


def _standin_picture(relation, names, objects, image_size, rng):
    img = standin_background(image_size, rng)
    size = round(image_size * rng.uniform(0.22, 0.3))
    if len(names) == 1:
        far, near = image_size * 0.78, image_size * 0.22
        centre = {"left": (near, image_size / 2), "right": (far, image_size / 2), "top": (image_size / 2, near),
                  "bottom": (image_size / 2, far), "front": (image_size / 2, far), "behind": (image_size / 2, near)}
        places = [centre[relation]]
    else:
        places = standin_positions(_DRAWN_AS.get(relation, relation), size, size, image_size, rng)
    for name, (cx, cy) in zip(names, places):
        obj = fit_object(objects[name], size)
        img.paste(obj, (round(cx - obj.width / 2), round(cy - obj.height / 2)), obj)
    return img


def make_benchmark_standins(root, objects, n=12, image_size=64, seed=0, names=None):
    """Write stand-ins of the benchmarks `names` (default: all) under `root`, each in its released
    format and folder layout, n rows each (the controlled sets: n rounded up to whole sets of four;
    VSR: a true and a false caption per image), relations cycling through the set's options so the
    gold answers are balanced. Returns the benchmarks.DataRoots that finds them.

    Synthetic STAND-INS for tests and timing only: none of them is the benchmark."""
    root = Path(root)
    names = list(names or benchmarks.NAMES)
    roots = benchmarks.DataRoots(val_json=str(root / "coco" / STANDIN_JSON), coco_val_dir=str(root / "coco"),
                                 whatsup_dir=str(root / "whatsup"), vsr_dir=str(root / "vsr"), hub_dir=str(root / "hub"))
    objs = list(objects)
    if "coco_two_obj" in names:
        make_coco_standin(root / "coco", objects, n=n, image_size=image_size, seed=seed)
    make_hub_standins(Path(roots.hub_dir), objects, [b for b in names if b in benchmarks.HUB_NAMES], n, image_size,
                      seed)
    for offset, name in enumerate(b for b in benchmarks.NAMES
                                  if b in names and b != "coco_two_obj" and b not in benchmarks.HUB_NAMES):
        bench = benchmarks.BENCHMARKS[name]
        folder = benchmarks.image_dir(name, roots)
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        count = -(-n // 4) * 4 if bench.kind == "controlled" else n
        for i in range(count):
            rng = random.Random(f"benchmark-standin:{seed}:{name}:{i}")
            options = bench.options
            if bench.kind == "controlled":
                obj1, obj2 = objs[(i // 4) % len(objs)], objs[(i // 4 + 1) % len(objs)]
                rel = options[i % 4]
                spelt = {"left": "left_of", "right": "right_of", "on": "on", "under": "under", "front": "in-front_of",
                         "behind": "behind"}[rel]
                file = f"{obj1.replace(' ', '-')}_{spelt}_{obj2.replace(' ', '-')}.jpeg"
                _standin_image(folder / file, rel, (obj1, obj2), objects, image_size, rng)
                others = [r for r in options if r != rel]
                captions = [f"A {obj1} {benchmarks.PHRASE_OF[r]} a {obj2}" for r in [rel] + others]
                rows.append({"image_path": f"data/{folder.name}/{file}", "caption_options": captions})
                continue
            image_id = 1000 * (offset + 2) + (i // 2 if bench.kind == "vsr" else i)
            obj1, obj2 = rng.sample(objs, 2)
            if bench.kind == "vsr":  # rows 2j and 2j+1: a true and a false caption of image j
                rng = random.Random(f"benchmark-standin:{seed}:{name}:image{image_id}")
                obj1, obj2 = rng.sample(objs, 2)
                rel = ("left", "right", "above", "below")[(i // 2) % 4]
                said = rel if i % 2 == 0 else OPPOSITE[rel]
                file = f"{image_id:012d}.jpg"
                if i % 2 == 0:
                    _standin_image(folder / file, rel, (obj1, obj2), objects, image_size, rng)
                phrase = benchmarks.PHRASE_OF[said]
                rows.append({"image": file, "caption": f"The {obj1} is {phrase} the {obj2}.", "label": int(i % 2 == 0),
                             "relation": phrase.replace("to the ", ""), "subj": obj1, "obj": obj2})
                continue
            rel = options[i % len(options)]
            path = (data.coco_image_path(folder, image_id) if bench.images == "coco" else folder / f"{image_id}.jpg")
            if bench.kind == "one_obj":
                _standin_image(path, rel, (obj1,), objects, image_size, rng)
                preposition = "on the" if rel in ("left", "right", "top", "bottom") else "in the"
                captions = [f"A photo of {data.indefinite_article(obj1)} {obj1} {preposition} {r}"
                            for r in [rel] + [r for r in options if r != rel]]
            else:
                _standin_image(path, rel, (obj1, obj2), objects, image_size, rng)
                captions = [f"A photo of {data.indefinite_article(a)} {a} {benchmarks.PHRASE_OF[r]} "
                            f"{data.indefinite_article(b)} {b}" for a, r, b in ((obj1, rel, obj2),
                                                                                (obj1, benchmarks.OPPOSITE[rel], obj2))]
            rows.append([image_id, *captions])
        path = benchmarks.annotation_path(name, roots)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".jsonl":
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        else:
            path.write_text("[\n" + ",\n".join(json.dumps(row) for row in rows) + "\n]\n")
    return roots


def _hub_rows(name, objects, n, image_size, seed):
    """n rows of a hub set's stand-in in its released columns (benchmarks._COLUMNS and more), gold
    letters cycling so every option is some row's gold."""
    objs, rows = list(objects), []
    for i in range(n):
        rng = random.Random(f"hub-standin:{seed}:{name}:{i}")
        a, b, c = rng.sample(objs, 3)
        if name == "cvbench_relation":
            rel = ("left", "right", "above", "below")[i % 4]
            pair = ["left", "right"] if rel in ("left", "right") else ["above", "below"]
            choices = pair if i % 8 < 4 else pair[::-1]
            question = (f"Considering the relative positions of the {a} (annotated by the red box) and the {b} "
                        f"(annotated by the blue box) in the image provided, where is the {a} located with respect "
                        f"to the {b}?")
            image, task, kind = _standin_jpeg(rel, (a, b), objects, image_size, rng), "Relation", "2D"
        else:
            choices, rel = [a, b], ("left", "right")[i % 2]
            image, kind = _standin_jpeg(rel, (a, b), objects, image_size, rng), "3D"
            task = "Depth" if name == "cvbench_depth" else "Distance"
            question = (f"Which object is closer to the camera taking this photo, the {a} (highlighted by a red box) "
                        f"or the {b} (highlighted by a blue box)?" if task == "Depth" else
                        f"Estimate the real-world distances between objects in this image. Which object is closer "
                        f"to the {c} (highlighted by a red box), the {a} (highlighted by a blue box) or the {b} "
                        f"(highlighted by a green box)?")
        gold = i % 2 if name != "cvbench_relation" else choices.index(rel)
        rows.append({"idx": len(rows), "type": kind, "task": task, "image": {"bytes": image, "path": None},
                     "question": question, "choices": choices, "answer": f"({'AB'[gold]})",
                     "prompt": question + " Select from the following choices.\n"
                     + "\n".join(f"({'AB'[k]}) {x}" for k, x in enumerate(choices)),
                     "source": "COCO" if kind == "2D" else "Omni3D", "source_dataset": "COCO 2017 Validation Set"
                     if kind == "2D" else "SUNRGBD"})
    return rows


def make_hub_standins(folder, objects, names, n=12, image_size=64, seed=0):
    """Stand-ins of the hub's sets (`names`), written as the released files under
    folder/REPO_ID/FILE (benchmarks.DataRoots.hub_dir): parquet rows with their images as
    {bytes, path} structs; 3DSRBench's annotations without images and its coco_images.zip.
    CV-Bench's file holds the rows of each named CV-Bench subset and two Count rows (read by none)."""
    import pyarrow as pa  # the stand-ins of the parquet sets only
    import pyarrow.parquet as pq

    if not names:
        return
    objs, tables = list(objects), {}
    cvbench = [name for name in names if name.startswith("cvbench")]
    if cvbench:
        rows = [r for name in cvbench for r in _hub_rows(name, objects, n, image_size, seed)]
        count = _standin_jpeg("left", tuple(objs[:2]), objects, image_size, random.Random(seed))
        rows += [{"idx": 0, "type": "2D", "task": "Count", "image": {"bytes": count, "path": None},
                  "question": "How many circles are in the image?", "choices": ["0", "1", "2", "3"], "answer": "(C)",
                  "prompt": "", "source": "ADE20K", "source_dataset": "ADE20K Validation Set"}] * 2
        for k, row in enumerate(rows):
            rows[k] = dict(row, idx=k)
        tables[benchmarks.CVBENCH] = rows
    for name in [name for name in names if name.startswith("blink")]:
        rows = []
        for i in range(n):
            rng = random.Random(f"hub-standin:{seed}:{name}:{i}")
            a, b = rng.sample(objs, 2)
            if name == "blink_depth":
                question, choices, gold = "Which point is closer to the camera?", ["A", "B"], i % 2
                image = _standin_jpeg("left", (a, b), objects, image_size, rng)
            else:
                said = ("left", "right", "above", "below")[(i // 2) % 4]
                holds = i % 2 == 0
                drawn = said if holds else benchmarks.OPPOSITE[said]
                image = _standin_jpeg(drawn, (a, b), objects, image_size, rng)
                question, choices, gold = (f"Is the {a} {benchmarks.PHRASE_OF[said]} the {b}?", ["yes", "no"],
                                           0 if holds else 1)
            task = "Relative_Depth" if name == "blink_depth" else "Spatial_Relation"
            rows.append({"idx": f"val_{task}_{i + 1}", "question": question, "sub_task": task.replace("_", " "),
                         "image_1": {"bytes": image, "path": None}, "image_2": None, "image_3": None, "image_4": None,
                         "choices": choices, "answer": f"({'AB'[gold]})", "prompt": question + "\nSelect from the "
                         "following choices.\n" + "\n".join(f"({'AB'[k]}) {x}" for k, x in enumerate(choices)),
                         "explanation": ""})
        tables[benchmarks.BENCHMARKS[name].hub[0]] = rows
    if "embspatial" in names:
        rows = []
        for i in range(n):
            rng = random.Random(f"hub-standin:{seed}:embspatial:{i}")
            rel = ("left", "right", "above", "below", "close", "far")[i % 6]
            options = rng.sample(objs, 4)
            image = _standin_jpeg(rel if rel in ("left", "right", "above", "below") else "left", tuple(options[:2]),
                                  objects, image_size, rng)
            rows.append({"question_id": 1000 + i, "question": f"Which object is {rel} in the image?",
                         "answer_options": options, "answer": i % 4, "relation": rel,
                         "data_source": ("ai2thor", "mp3d", "scannet")[i % 3], "image": {"bytes": image, "path": None},
                         "objects": options[:2]})
        tables[benchmarks.EMBSPATIAL] = rows
    if "3dsrbench" in names:
        rows, archive = [], io.BytesIO()
        categories = ("height_higher", "location_above", "location_closer_to_camera", "orientation_on_the_left")
        with zipfile.ZipFile(archive, "w") as z:
            for i in range(n):
                rng = random.Random(f"hub-standin:{seed}:3dsrbench:{i}")
                a, b = rng.sample(objs, 2)
                file = f"{100000 + i // 2:012d}.jpg"  # two questions per image, as the COCO images are shared
                if i % 2 == 0:
                    z.writestr(f"coco_images/{file}", _standin_jpeg("above", (a, b), objects, image_size, rng))
                four = i % 3 == 0
                rows.append({"index": f"Q{i:07d}", "question": f"Is the {a} higher than the {b}?",
                             "A": "yes" if not four else a, "B": "no" if not four else b, "C": None if not four else "both",
                             "D": None if not four else "neither", "answer": "ABCD"[i % (4 if four else 2)],
                             "category": categories[i % 4], "image_source": "coco",
                             "image_url": f"http://images.cocodataset.org/train2017/{file}"})
        zip_path = folder / benchmarks.THREEDSR_IMAGES.repo_id / benchmarks.THREEDSR_IMAGES.filename
        zip_path.parent.mkdir(parents=True, exist_ok=True)
        zip_path.write_bytes(archive.getvalue())
        tables[benchmarks.THREEDSR] = rows
    for hub, rows in tables.items():
        path = folder / hub.repo_id / hub.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), path)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="data/grid", help="folder for the grid images")
    p.add_argument("--objects_dir", default=None,
                   help="folder of {object}.png RGBA renders ('_' in a file name = space); default: built-in shapes")
    p.add_argument("--cell", type=int, default=REFERENCE_CELL, help="cell size in px (image = 4 cells square)")
    p.add_argument("--sizes", type=int, nargs="+", default=list(OBJECT_SIZES),
                   help=f"object sizes in px at a {REFERENCE_CELL} px cell (scaled with --cell)")
    p.add_argument("--no_same_row_or_col", action="store_true",
                   help="only cell pairs that differ in both column and row")
    p.add_argument("--local_variation", action="store_true",
                   help="per-object size jitter (~10%%) and rotation (within 15 degrees)")
    p.add_argument("--bg_dir", default=None, help="folder of background images (default: white)")
    p.add_argument("--max_pairs", type=int, default=None, help="keep this many ordered object pairs (seeded)")
    p.add_argument("--max_images", type=int, default=None, help="stop after this many images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=LAYOUTS, default="flat",
                   help="flat: our file names (training); original: the original's flat names (one size); "
                        "extraction: the original's nested ID-extraction set {a}_{b}/{ax}_{ay}/{bx}_{by}_{size}.png, "
                        "transparent renders that read as black")
    p.add_argument("--objects", nargs="+", default=None, metavar="NAME",
                   help="use only these objects (names as in --objects_dir or the built-in set)")
    p.add_argument("--coco_standin", default=None, metavar="DIR",
                   help="also write the synthetic COCO-Spatial stand-in (offline smoke runs) into DIR")
    p.add_argument("--standin_size", type=int, default=40, help="number of stand-in images")
    p.add_argument("--standin_only", action="store_true", help="write only the stand-in, no grid images")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)

    # Argument errors first, before anything is drawn.
    if args.cell < 8:
        parser.error(f"argument --cell: must be >= 8 px, not {args.cell}")
    bad = [s for s in args.sizes if not 0 < s <= REFERENCE_CELL]
    if bad:
        parser.error(f"argument --sizes: {bad} not in 1..{REFERENCE_CELL} (px at a {REFERENCE_CELL} px cell)")
    for flag in ("max_pairs", "max_images", "standin_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"argument --{flag}: must be >= 1, not {value}")
    if args.layout == "original" and len(set(args.sizes)) > 1:
        parser.error(f"argument --layout original: the original's file names carry no size; give one --sizes value")
    if args.layout == "extraction" and (args.bg_dir or args.local_variation):
        parser.error("argument --layout extraction: drawn on a transparent canvas; drop --bg_dir / --local_variation")
    if args.standin_only and not args.coco_standin:
        parser.error("argument --standin_only: needs --coco_standin DIR")
    for flag, folder in (("out_dir", None if args.standin_only else args.out_dir), ("coco_standin", args.coco_standin)):
        problem = folder and output_problem(folder, kind="folder")
        if problem:
            parser.error(f"argument --{flag}: {problem}")
    if args.bg_dir is not None and not args.standin_only:
        try:
            list_images(args.bg_dir, "background")
        except (OSError, ValueError) as err:
            parser.error(f"argument --bg_dir: {err}")

    try:
        objects = load_objects(args.objects_dir or BUILTIN, args.sizes, args.cell, args.objects)
    except (OSError, ValueError) as err:
        parser.error(f"argument --{'objects' if isinstance(err, ObjectSubsetError) else 'objects_dir'}: {err}")
    source = str(args.objects_dir) if args.objects_dir else "built-in shapes"

    if not args.standin_only:
        paths = make_grid_images(
            args.out_dir, objects, cell=args.cell, sizes=args.sizes,
            no_same_row_or_col=args.no_same_row_or_col, local_variation=args.local_variation,
            bg_dir=args.bg_dir, max_pairs=args.max_pairs, max_images=args.max_images, seed=args.seed,
            file_layout=args.layout,
        )
        layouts = planned_layouts(objects, args.sizes, args.no_same_row_or_col, args.max_pairs, args.max_images,
                                  args.seed)
        pairs = {(lay.obj1, lay.obj2) for lay in layouts}
        sizes = sorted({lay.size for lay in layouts})
        written = set(paths)
        stale = [p for p in Path(args.out_dir).rglob("*.png") if p not in written]
        print(f"wrote {len(paths)} grid images ({GRID * args.cell} px, cell {args.cell}) to {args.out_dir}: "
              f"{len(pairs)} ordered pairs of {len(objects)} objects ({source}), sizes {sizes}, "
              f"{len(cell_pairs(args.no_same_row_or_col))} cell pairs per pair and size, {args.layout} layout")
        if args.layout == "original" and sizes != [REFERENCE_CELL]:
            print(f"note: the original's names carry no size, so readers take size {REFERENCE_CELL}, not {sizes[0]}")
        if stale:
            print(f"note: {args.out_dir} also holds {len(stale)} other .png files from earlier runs "
                  "(not removed; the training set reads every .png there)")

    if args.coco_standin:
        json_path = make_coco_standin(args.coco_standin, objects, n=args.standin_size, seed=args.seed)
        print(f"wrote {args.standin_size} stand-in images and {json_path}. This is a synthetic STAND-IN for "
              "offline smoke runs, NOT COCO-Spatial: its scores say nothing about the paper's results.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
