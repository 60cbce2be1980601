"""Where grid images come from: a folder of files (make_grid_data.py wrote them) or objects drawn
on the fly. The layout plan (which pairs, cells and sizes, in which order), loading object renders
and the layout flags live here, shared by make_grid_data.py (which writes the files) and by
train.py / derive_spatial_ids.py (which can render the same images in memory instead).

A `GridRenderer` holds the objects and the drawing options; `RenderedGridDataset` is
`data.GridDataset` without the files: the same layouts, in the same order, the same questions,
holdout split and batches, and images with the same pixels as make_grid_data.py's PNGs from the
same arguments. Each question carries a `LazyGridImage` that the collator calls, so an image is
drawn in the DataLoader worker that needs it and never written to disk.
"""
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

import data
from data import GRID, OBJECT_SIZES, REFERENCE_CELL, GridLayout
from render import builtin_objects, drawn_size, render_grid_image

class ObjectSubsetError(ValueError):
    """The --objects subset names an unknown object or leaves fewer than two."""


BUILTIN = "builtin"  # the value of --train_objects / --id_objects that means the built-in objects
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# ---------------------------------------------------------------------------------------------
# Objects
# ---------------------------------------------------------------------------------------------

def load_objects_dir(path):
    """{name: RGBA render} from a folder of `{object}.png` renders; "teddy_bear.png" -> "teddy bear"."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"objects folder not found: {folder}")
    objects = {}
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png")
    for file in files:
        name = file.stem.replace("_", " ")
        try:
            data.check_object_name(name)
        except ValueError as err:
            raise ValueError(f"{file}: bad object name from the file name: {err}") from None
        if name in objects:
            raise ValueError(f"{file}: object name {name!r} appears twice in {folder}")
        try:
            with Image.open(file) as img:
                objects[name] = img.convert("RGBA")  # convert() loads the pixels, so a broken file fails here
        except (OSError, SyntaxError, ValueError) as err:
            raise ValueError(f"{file}: not a readable image ({err})") from None
    if len(objects) < 2:
        raise ValueError(f"{folder}: need at least 2 object renders ({{object}}.png), found {len(objects)}")
    return objects


def load_objects(source, sizes=OBJECT_SIZES, cell=REFERENCE_CELL, names=None):
    """{name: RGBA render} from a renders folder or BUILTIN, restricted to `names` (in that order,
    which the seeded pair order depends on) when given. Raises ValueError naming what is wrong."""
    if source == BUILTIN:
        # Render at least as large as the largest drawn object, so nothing is scaled up.
        objects = builtin_objects(max(REFERENCE_CELL, drawn_size(max(sizes), cell)))
    else:
        objects = load_objects_dir(source)
    if names:
        unknown = [name for name in names if name not in objects]
        if unknown:
            raise ObjectSubsetError(f"unknown object(s) {unknown}; available: {sorted(objects)}")
        objects = {name: objects[name] for name in names}
        if len(objects) < 2:
            raise ObjectSubsetError(f"need at least 2 objects, got {len(objects)}")
    return objects


def list_images(folder, what):
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{what} folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


# ---------------------------------------------------------------------------------------------
# The layout plan
# ---------------------------------------------------------------------------------------------

def grid_cells():
    """All cells as (col, row), row by row from the top-left."""
    return [(col, row) for row in range(GRID) for col in range(GRID)]


def cell_pairs(no_same_row_or_col=False):
    """Ordered pairs of distinct cells; with no_same_row_or_col, only those differing in both
    column and row (so every image has both a left/right and an above/below question)."""
    return [(a, b) for a in grid_cells() for b in grid_cells()
            if a != b and (not no_same_row_or_col or (a[0] != b[0] and a[1] != b[1]))]


def select_pairs(names, max_pairs=None, seed=0):
    """Ordered pairs of distinct objects in a seeded shuffled order, the first max_pairs of them.
    Shuffled even without max_pairs, so that --max_images alone still covers varied pairs."""
    pairs = [(a, b) for a in names for b in names if a != b]
    random.Random(f"pairs:{seed}").shuffle(pairs)
    return pairs[:max_pairs] if max_pairs else pairs


def grid_layouts(names, sizes=OBJECT_SIZES, no_same_row_or_col=False, max_pairs=None, seed=0):
    """Every layout to draw, in the order drawn: pair -> size -> cell1 -> cell2, so each group
    "obj1 fixed at a cell and size, obj2 moving over the cells" is contiguous."""
    pairs = select_pairs(list(names), max_pairs, seed)
    cells = cell_pairs(no_same_row_or_col)
    return [GridLayout(obj1, cell1, obj2, cell2, size)
            for obj1, obj2 in pairs for size in sizes for cell1, cell2 in cells]


def planned_layouts(names, sizes, no_same_row_or_col=False, max_pairs=None, max_images=None, seed=0):
    """The layouts make_grid_images draws, in order."""
    sizes = list(dict.fromkeys(sizes))  # a repeated size would only overwrite the same files
    layouts = grid_layouts(names, sizes, no_same_row_or_col, max_pairs, seed)
    return layouts[:max_images] if max_images is not None else layouts  # whole groups but the last


def check_grid_args(cell, sizes):
    """Argument errors, raised before anything is drawn."""
    if not isinstance(cell, int) or cell < 8:
        raise ValueError(f"cell must be an integer >= 8 px, not {cell!r}")
    if not sizes:
        raise ValueError("sizes: need at least one object size")
    for s in sizes:
        if not isinstance(s, int) or not 0 < s <= REFERENCE_CELL:
            raise ValueError(
                f"sizes: {s!r} is not a size in 1..{REFERENCE_CELL} (px at a {REFERENCE_CELL} px cell; "
                "an object larger than its cell would spill into its neighbours)"
            )


def extraction_order(layout):
    """Sort key giving the order in which data.read_extraction_set lists a nested extraction set
    (pair folder, a's cell folder, file name), so a rendered set is derived over in the same order."""
    path = data.extraction_path("", layout)
    return tuple(path.parts)


# ---------------------------------------------------------------------------------------------
# Rendering on the fly
# ---------------------------------------------------------------------------------------------

@dataclass
class GridRenderer:
    """Objects plus drawing options: draws any layout exactly as make_grid_data.py does with the
    same arguments. `transparent` is the extraction layout's canvas (RGBA on transparent black,
    which the collator reads as black RGB, as it reads the written PNGs)."""
    objects: dict
    cell: int = REFERENCE_CELL
    sizes: tuple = OBJECT_SIZES
    no_same_row_or_col: bool = False
    local_variation: bool = False
    backgrounds: list = None
    max_pairs: int = None
    max_images: int = None
    seed: int = 0
    transparent: bool = False
    source: str = BUILTIN
    _fitted: dict = field(default_factory=dict, repr=False)  # objects scaled to each size, per process

    def layouts(self):
        return planned_layouts(self.objects, self.sizes, self.no_same_row_or_col, self.max_pairs,
                               self.max_images, self.seed)

    def render(self, layout):
        """The RGB image of one layout, pixel for pixel what load_image gives for the file."""
        img = render_grid_image(layout, self.objects, self.cell, self.local_variation, self.backgrounds,
                                self.seed, self._fitted, transparent=self.transparent)
        return img.convert("RGB")

    def describe(self):
        """What the images are, for logs and provenance: equal descriptions, equal images."""
        parts = [f"objects={self.source} ({', '.join(self.objects)})", f"cell={self.cell}",
                 f"sizes={list(dict.fromkeys(self.sizes))}", f"seed={self.seed}"]
        for name in ("no_same_row_or_col", "local_variation", "transparent"):
            if getattr(self, name):
                parts.append(name)
        for name in ("max_pairs", "max_images"):
            if getattr(self, name) is not None:
                parts.append(f"{name}={getattr(self, name)}")
        if self.backgrounds:
            parts.append(f"backgrounds={Path(self.backgrounds[0]).parent}")
        return "rendered on the fly: " + ", ".join(parts)


class LazyGridImage:
    """A question's image, drawn when the collator calls it (in the DataLoader worker)."""

    __slots__ = ("renderer", "layout")

    def __init__(self, renderer, layout):
        self.renderer, self.layout = renderer, layout

    def __call__(self):
        return self.renderer.render(self.layout)


def rendered_items(renderer, nested=False):
    """[(image path, GridLayout)] in the order a folder of make_grid_data.py's files with the same
    arguments lists them: flat file names sorted (data.GridDataset), or the nested extraction
    layout (data.read_extraction_set). The paths are labels under `<rendered>/`, never files."""
    root = Path("<rendered>")
    if nested:
        return [(data.extraction_path(root, lay), lay) for lay in sorted(renderer.layouts(), key=extraction_order)]
    return sorted(((root / data.format_grid_name(lay), lay) for lay in renderer.layouts()), key=lambda item: item[0].name)


class RenderedGridDataset(data.GridDataset):
    """data.GridDataset whose images are drawn on the fly (see the module docstring)."""

    def __init__(self, renderer, question_style="clean"):
        self.renderer = renderer
        self.folder = renderer.describe()
        self.unparseable, self.unreadable = [], []
        items = rendered_items(renderer)
        self.n_images = len(items)
        self.samples = data.questions_for_images(items, question_style)
        by_path = {str(path): layout for path, layout in items}
        for sample in self.samples:
            sample["image"] = LazyGridImage(renderer, by_path[sample["image_path"]])
        if not self.samples:
            raise ValueError(f"{self.folder}: no questions (no layouts?)")


# ---------------------------------------------------------------------------------------------
# Flags (train.py, derive_spatial_ids.py)
# ---------------------------------------------------------------------------------------------

LAYOUT_FLAGS = ("cell", "sizes", "no_same_row_or_col", "local_variation", "bg_dir", "max_pairs", "max_images",
                "objects", "grid_seed")


def add_render_args(parser, source_flag, what):
    """`source_flag` DIR|builtin plus make_grid_data.py's layout flags (its --seed is --grid_seed
    here, beside the script's own --seed)."""
    g = parser.add_argument_group(f"{what} rendered on the fly ({source_flag})")
    g.add_argument(source_flag, default=None, metavar="DIR|builtin",
                   help=f"draw the {what} on the fly from a folder of {{object}}.png RGBA renders, or the built-in "
                        "objects, instead of reading image files; the layout flags below are make_grid_data.py's "
                        "and give the same images")
    g.add_argument("--cell", type=int, default=None, help=f"cell size in px (default {REFERENCE_CELL})")
    g.add_argument("--sizes", type=int, nargs="+", default=None,
                   help=f"object sizes in px at a {REFERENCE_CELL} px cell (default {list(OBJECT_SIZES)})")
    g.add_argument("--no_same_row_or_col", action="store_true", default=None,
                   help="only cell pairs that differ in both column and row")
    g.add_argument("--local_variation", action="store_true", default=None, help="size jitter and rotation")
    g.add_argument("--bg_dir", default=None, help="folder of background images (default: white)")
    g.add_argument("--max_pairs", type=int, default=None, help="keep this many ordered object pairs (seeded)")
    g.add_argument("--max_images", type=int, default=None, help="keep the first N layouts")
    g.add_argument("--objects", nargs="+", default=None, metavar="NAME", help="use only these objects")
    g.add_argument("--grid_seed", type=int, default=None, help="make_grid_data.py's --seed (default 0)")


def check_render_flags(parser, args, source_flag):
    """At parse time: a layout flag given without `source_flag` is refused (one line)."""
    if getattr(args, source_flag.lstrip("-")) is None:
        given = [f"--{name}" for name in LAYOUT_FLAGS if getattr(args, name) is not None]
        if given:
            parser.error(f"argument {given[0]}: a layout flag for images drawn on the fly; it needs {source_flag} "
                         "DIR|builtin (a folder of pre-rendered images already has its layout)")


def renderer_from_args(args, source_flag, transparent=False):
    """A GridRenderer from the flags of add_render_args, or None without `source_flag`. A bad
    value raises ValueError, one line naming its flag, before anything is drawn."""
    source = getattr(args, source_flag.lstrip("-"))
    if source is None:
        return None
    cell = REFERENCE_CELL if args.cell is None else args.cell
    sizes = list(OBJECT_SIZES) if args.sizes is None else args.sizes
    if cell < 8:
        raise ValueError(f"argument --cell: must be >= 8 px, not {cell}")
    bad = [s for s in sizes if not 0 < s <= REFERENCE_CELL]
    if bad:
        raise ValueError(f"argument --sizes: {bad} not in 1..{REFERENCE_CELL} (px at a {REFERENCE_CELL} px cell)")
    for flag in ("max_pairs", "max_images"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"argument --{flag}: must be >= 1, not {value}")
    if transparent and (args.bg_dir or args.local_variation):
        raise ValueError("argument --bg_dir/--local_variation: the extraction layout is drawn on a transparent "
                         "canvas without variation; drop them or use --layout flat")
    backgrounds = None
    if args.bg_dir is not None:
        try:
            backgrounds = [str(p) for p in list_images(args.bg_dir, "background")]
        except (OSError, ValueError) as err:
            raise ValueError(f"argument --bg_dir: {err}") from None
    if source != BUILTIN and not Path(source).is_dir():
        raise ValueError(f"argument {source_flag}: objects folder not found: {source} (a folder of {{object}}.png "
                         f"RGBA renders, or '{BUILTIN}' for the built-in objects)")
    try:
        objects = load_objects(source, sizes, cell, args.objects)
    except (OSError, ValueError) as err:
        flag = "--objects" if isinstance(err, ObjectSubsetError) else source_flag
        raise ValueError(f"argument {flag}: {err}") from None
    return GridRenderer(objects, cell, tuple(sizes), bool(args.no_same_row_or_col), bool(args.local_variation),
                        backgrounds, args.max_pairs, args.max_images, args.grid_seed or 0, transparent,
                        source if source == BUILTIN else str(Path(source).resolve()))
