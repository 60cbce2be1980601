"""Drawing in memory: the built-in objects and one grid image of a layout. Used by
make_grid_data.py (which writes the images), tiny_warm.py (which draws its pretraining images as
it goes) and anything else that needs a picture without a file.

Everything random comes from `random.Random` seeded by the seed and the image's own name, so an
image's content does not depend on which other images are drawn."""
import math
import random
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFilter

import data
from data import GRID, REFERENCE_CELL

# ---------------------------------------------------------------------------------------------
# Objects
# ---------------------------------------------------------------------------------------------

COLOURS = {
    "red": (220, 30, 30), "blue": (30, 70, 220), "green": (30, 160, 60),
    "yellow": (240, 210, 20), "purple": (130, 50, 170), "orange": (245, 140, 20),
    "pink": (245, 130, 190), "cyan": (20, 200, 210), "brown": (130, 80, 35),
    "gray": (128, 128, 128), "black": (20, 20, 20), "white": (255, 255, 255),
}


def _regular_polygon(n, rotation_deg=-90.0, inner_ratio=None):
    """Vertices of a regular n-gon (or an n-pointed star when inner_ratio is given), unit radius.
    The default rotation puts a vertex at the top."""
    points = []
    steps = 2 * n if inner_ratio else n
    for k in range(steps):
        angle = math.radians(rotation_deg + 360.0 * k / steps)
        r = inner_ratio if inner_ratio and k % 2 else 1.0
        points.append((r * math.cos(angle), r * math.sin(angle)))
    return points


def _heart_points(n=240):
    # The classic parametric heart; y is negated because image y grows downwards.
    points = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        points.append((x, y))
    return points


# Polygon shapes, in any coordinates: `_fit` scales them to fill the drawing box.
_POLYGONS = {
    "square": [(0, 0), (1, 0), (1, 1), (0, 1)],
    "triangle": _regular_polygon(3),
    "star": _regular_polygon(5, inner_ratio=0.45),
    "diamond": [(0.4, 0), (0.8, 0.5), (0.4, 1), (0, 0.5)],  # narrower than tall: not a tilted square
    "cross": [(0.32, 0), (0.68, 0), (0.68, 0.32), (1, 0.32), (1, 0.68), (0.68, 0.68),
              (0.68, 1), (0.32, 1), (0.32, 0.68), (0, 0.68), (0, 0.32), (0.32, 0.32)],
    "heart": _heart_points(),
    "hexagon": _regular_polygon(6, rotation_deg=0),
    "arrow": [(0, 0.32), (0.55, 0.32), (0.55, 0), (1, 0.5), (0.55, 1), (0.55, 0.68), (0, 0.68)],
    "pentagon": _regular_polygon(5),
}


def _fit(points, box):
    """Scale and translate points (keeping their aspect) so they fill `box` and are centred in it."""
    x0, y0, x1, y1 = box
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    w, h = max(xs) - min(xs), max(ys) - min(ys)
    scale = min((x1 - x0) / w, (y1 - y0) / h)
    ox = x0 + ((x1 - x0) - w * scale) / 2 - min(xs) * scale
    oy = y0 + ((y1 - y0) - h * scale) / 2 - min(ys) * scale
    return [(ox + x * scale, oy + y * scale) for x, y in points]


def _shape_mask(shape, size):
    """Binary mask (mode L, 0/255) of a shape filling a size x size square, with a small margin."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    m = size * 0.03
    box = (m, m, size - m, size - m)
    if shape in _POLYGONS:
        draw.polygon(_fit(_POLYGONS[shape], box), fill=255)
    elif shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape in ("ring", "moon"):
        draw.ellipse(box, fill=255)
        r = (size - 2 * m) / 2
        c = size / 2
        if shape == "ring":  # a hole in the middle
            hole = 0.55 * r
            draw.ellipse((c - hole, c - hole, c + hole, c + hole), fill=0)
        else:  # a crescent: cut by a circle shifted right
            cut, dx = 0.85 * r, 0.45 * r
            draw.ellipse((c + dx - cut, c - cut, c + dx + cut, c + cut), fill=0)
    else:
        raise KeyError(shape)
    # Centre the drawn pixels (the crescent's bounding box is off-centre): an object's render is
    # centred in its cell, so its visible part should be centred in the render.
    x0, y0, x1, y1 = mask.getbbox()
    dx, dy = (size - x0 - x1) // 2, (size - y0 - y1) // 2
    if dx or dy:
        centred = Image.new("L", (size, size), 0)
        centred.paste(mask, (dx, dy))
        mask = centred
    return mask


def draw_object(colour, shape, render_size=224, supersample=4):
    """RGBA render of one shape in one colour on a transparent background.

    Drawn at `supersample` times the size and scaled down, for smooth edges. A thin outline in a
    darker shade keeps light objects (the white moon) visible on a white background."""
    big = render_size * supersample
    mask = _shape_mask(shape, big)
    # Erode the mask with a box blur + threshold (fast, integer arithmetic, deterministic):
    # the eroded mask is the fill, the rest of the mask is the outline.
    border = max(1, round(big / 45))
    inner = mask.filter(ImageFilter.BoxBlur(border)).point(lambda v: 255 if v >= 250 else 0)
    fill = COLOURS[colour]
    outline = tuple(int(c * 0.6) for c in fill)
    img = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    img.paste(outline + (255,), (0, 0, big, big), mask)
    img.paste(fill + (255,), (0, 0, big, big), inner)
    return img.resize((render_size, render_size), Image.Resampling.LANCZOS)


def builtin_objects(render_size=224):
    """{name: RGBA render} for every name in data.BUILTIN_OBJECT_NAMES ("red circle", ...)."""
    objects = {}
    for name in data.BUILTIN_OBJECT_NAMES:
        colour, shape = name.split(" ", 1)
        if colour not in COLOURS or (shape not in _POLYGONS and shape not in ("circle", "ring", "moon")):
            raise ValueError(f"built-in object {name!r}: no drawing for colour {colour!r} / shape {shape!r}")
        objects[name] = draw_object(colour, shape, render_size)
    return objects


def fit_object(render, size):
    """The render scaled so its longer side is `size` px (the whole render, as in the paper's
    pasting of Objaverse renders; the built-in objects fill most of theirs)."""
    w, h = render.size
    scale = size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return render if new == render.size else render.resize(new, Image.Resampling.LANCZOS)


def drawn_size(size, cell):
    """Pixel size of an object of reference size `size` (at a 224 px cell) in a `cell` px cell."""
    return max(1, round(size * cell / REFERENCE_CELL))


@lru_cache(maxsize=32)
def _background(path, size):
    with Image.open(path) as img:
        return img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)


def render_grid_image(layout, objects, cell=224, local_variation=False, backgrounds=None, seed=0,
                      _fitted=None, transparent=False):
    """One grid image for a layout: RGB on white or a background, or with `transparent` RGBA on a
    fully transparent black canvas (the original's extraction images, which read as black in
    RGB). Its random choices come from the seed and its file name only, so it is the same
    whatever else is drawn in the run."""
    rng = random.Random(f"grid:{seed}:{data.format_grid_name(layout)}")
    side = GRID * cell
    if transparent:
        canvas = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    elif backgrounds:
        canvas = _background(str(rng.choice(backgrounds)), side).copy()
    else:
        canvas = Image.new("RGB", (side, side), (255, 255, 255))
    base = drawn_size(layout.size, cell)
    for name, (col, row) in ((layout.obj1, layout.cell1), (layout.obj2, layout.cell2)):
        if local_variation:
            # Jitter the size by about +-10% (never past the cell) and rotate within +-15 degrees;
            # expand=True keeps the corners, and the paste below still centres it in its cell.
            size = min(cell, max(1, round(base * rng.uniform(0.9, 1.1))))
            obj = fit_object(objects[name], size)
            obj = obj.rotate(rng.uniform(-15.0, 15.0), resample=Image.Resampling.BICUBIC, expand=True)
        elif _fitted is not None:
            key = (name, base)
            if key not in _fitted:
                _fitted[key] = fit_object(objects[name], base)
            obj = _fitted[key]
        else:
            obj = fit_object(objects[name], base)
        x = col * cell + (cell - obj.width) // 2
        y = row * cell + (cell - obj.height) // 2
        canvas.paste(obj, (x, y), obj)
    return canvas
