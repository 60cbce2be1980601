"""make_grid_data.py: objects, grid images, the COCO-Spatial stand-in and the CLI.

Small cells (28 px) and few objects keep the whole file fast."""
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
import make_grid_data as mg
import render

CELL = 28
PAIR = ("red circle", "blue square")


@pytest.fixture(scope="module")
def objects():
    return mg.builtin_objects(render_size=48)


def pick(objects, *names):
    return {n: objects[n] for n in names}


def digest(paths):
    return {Path(p).name: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def colour_centroid(img, colour, tol=45):
    """(x, y) centroid of the pixels within `tol` of `colour`, or None."""
    px = np.asarray(img.convert("RGB"), dtype=np.int32)
    near = np.abs(px - np.array(colour)).max(axis=2) <= tol
    ys, xs = np.nonzero(near)
    return (xs.mean(), ys.mean()) if len(xs) else None


def colour_of(name):
    return render.COLOURS[name.split(" ")[0]]


@pytest.fixture(scope="module")
def plain_grid(objects, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    return mg.make_grid_images(out, pick(objects, *PAIR), cell=CELL, sizes=(124,), progress=False)


# ---------------------------------------------------------------------------------------------
# Objects
# ---------------------------------------------------------------------------------------------

@pytest.mark.fast
def test_builtin_objects_match_names_and_are_deterministic(objects):
    assert list(objects) == list(data.BUILTIN_OBJECT_NAMES)
    again = mg.builtin_objects(render_size=48)
    for name, img in objects.items():
        assert img.mode == "RGBA" and img.size == (48, 48)
        assert img.tobytes() == again[name].tobytes(), name
        alpha = np.asarray(img)[..., 3]
        assert alpha[0, 0] == 0 and alpha[-1, -1] == 0, f"{name}: background not transparent"
        x0, y0, x1, y1 = img.getbbox()
        assert max(x1 - x0, y1 - y0) >= 0.85 * 48, f"{name}: object does not fill the render"
        # The most common opaque colour is the named one (the fill, not the thin outline).
        rgba = np.asarray(img).reshape(-1, 4)
        opaque = [tuple(p[:3]) for p in rgba if p[3] == 255]
        assert Counter(opaque).most_common(1)[0][0] == colour_of(name), name
    shapes = {img.tobytes() for img in objects.values()}
    assert len(shapes) == len(objects)


@pytest.mark.fast
def test_load_objects_dir(tmp_path):
    folder = tmp_path / "renders"
    folder.mkdir()
    Image.new("RGBA", (20, 30), (200, 100, 0, 255)).save(folder / "teddy_bear.png")
    Image.new("RGBA", (30, 30), (0, 100, 200, 128)).save(folder / "cup.png")
    (folder / "notes.txt").write_text("ignored")
    objs = mg.load_objects_dir(folder)
    assert sorted(objs) == ["cup", "teddy bear"]
    assert all(img.mode == "RGBA" for img in objs.values()) and objs["teddy bear"].size == (20, 30)

    (folder / "cup.png").unlink()
    with pytest.raises(ValueError, match="renders"):
        mg.load_objects_dir(folder)  # one object left

    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        mg.load_objects_dir(folder)
    (folder / "broken.png").unlink()

    Image.new("RGBA", (8, 8)).save(folder / "bad__name.png")  # "bad  name": a double space
    with pytest.raises(ValueError, match="bad__name.png"):
        mg.load_objects_dir(folder)


# ---------------------------------------------------------------------------------------------
# Grid images
# ---------------------------------------------------------------------------------------------

@pytest.mark.fast
def test_same_seed_gives_identical_bytes(objects, tmp_path):
    objs = pick(objects, *PAIR)
    kw = dict(cell=CELL, sizes=(124,), local_variation=True, max_images=60, progress=False)
    a = mg.make_grid_images(tmp_path / "a", objs, seed=3, **kw)
    b = mg.make_grid_images(tmp_path / "b", objs, seed=3, **kw)
    assert [p.name for p in a] == [p.name for p in b]
    assert digest(a) == digest(b)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(p.name for p in a)
    # The seed matters: another seed jitters the same layout differently, and the jitter is real.
    layout = data.parse_grid_name(a[0].name)
    def render(seed, variation=True):
        return mg.render_grid_image(layout, objs, CELL, local_variation=variation, seed=seed).tobytes()
    assert render(3) == Image.open(a[0]).tobytes()
    assert render(4) != render(3) and render(3, variation=False) != render(3)


def test_names_parse_back_and_counts(objects, plain_grid, tmp_path):
    assert len(plain_grid) == 2 * 16 * 15
    layouts = [data.parse_grid_name(p.name) for p in plain_grid]
    expected = {data.GridLayout(o1, c1, o2, c2, 124)
                for o1, o2 in (PAIR, PAIR[::-1]) for c1, c2 in mg.cell_pairs()}
    assert set(layouts) == expected and len(set(layouts)) == len(layouts)
    img = Image.open(plain_grid[0])
    assert img.size == (4 * CELL, 4 * CELL) and img.mode == "RGB"

    strict = mg.make_grid_images(tmp_path, pick(objects, *PAIR), cell=CELL, sizes=(124,),
                                 no_same_row_or_col=True, progress=False)
    assert len(strict) == 2 * 16 * 9
    for p in strict:
        lay = data.parse_grid_name(p.name)
        assert lay.cell1[0] != lay.cell2[0] and lay.cell1[1] != lay.cell2[1]


def assert_in_cells(path, tol=45):
    lay = data.parse_grid_name(path.name)
    img = Image.open(path)
    for name, (col, row) in ((lay.obj1, lay.cell1), (lay.obj2, lay.cell2)):
        centroid = colour_centroid(img, colour_of(name), tol)
        assert centroid is not None, f"{path.name}: no {name} pixels"
        x, y = centroid
        assert col * CELL <= x < (col + 1) * CELL and row * CELL <= y < (row + 1) * CELL, (path.name, name, x, y)
        # Centred in the cell, within a couple of pixels.
        assert abs(x - (col + 0.5) * CELL) < 3 and abs(y - (row + 0.5) * CELL) < 3, (path.name, name, x, y)


@pytest.mark.fast
def test_objects_are_in_the_named_cells(plain_grid):
    for path in plain_grid[::23]:
        assert_in_cells(path)


@pytest.mark.fast
def test_local_variation_and_backgrounds(objects, tmp_path):
    bgs = tmp_path / "bgs"
    bgs.mkdir()
    bg_colours = [(250, 240, 200), (200, 240, 250)]
    for i, c in enumerate(bg_colours):
        Image.new("RGB", (50, 70), c).save(bgs / f"bg{i}.jpg", quality=100)
    paths = mg.make_grid_images(tmp_path / "out", pick(objects, *PAIR), cell=CELL, sizes=(124,),
                                local_variation=True, bg_dir=bgs, max_images=40, progress=False)
    corners = set()
    for p in paths[::7]:
        assert_in_cells(p, tol=60)
        corner = Image.open(p).getpixel((0, 0))
        assert min(max(abs(a - b) for a, b in zip(corner, c)) for c in bg_colours) <= 3
        corners.add(min(range(2), key=lambda i: sum(abs(a - b) for a, b in zip(corner, bg_colours[i]))))
    assert corners == {0, 1}, "both backgrounds should be used"

    with pytest.raises(FileNotFoundError):
        mg.make_grid_images(tmp_path / "x", pick(objects, *PAIR), cell=CELL, sizes=(124,),
                            bg_dir=tmp_path / "missing", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        mg.make_grid_images(tmp_path / "x", pick(objects, *PAIR), cell=CELL, sizes=(124,),
                            bg_dir=tmp_path / "empty", progress=False)


@pytest.mark.fast
def test_local_variation_jitters_and_rotates_within_limits(objects):
    """A square's bounding box grows by (cos t + sin t)^2 = 1 + sin 2t when rotated by t: so up to
    1.5x at 15 degrees. Jitter changes its area, about +-10% in side."""
    cell, objs = 112, pick(objects, *PAIR)
    base = mg.drawn_size(124, cell)
    ratios, sides = [], []
    for col in range(4):
        layout = data.GridLayout("red circle", (col, 0), "blue square", (col, 2), 124)
        img = np.asarray(mg.render_grid_image(layout, objs, cell, local_variation=True, seed=0))
        ink = (img[2 * cell:3 * cell, col * cell:(col + 1) * cell] < 235).any(axis=2)
        ys, xs = np.nonzero(ink)
        bbox_area = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
        ratios.append(bbox_area / ink.sum())
        sides.append(ink.sum() ** 0.5)
        assert abs(xs.mean() - (cell - 1) / 2) < 2 and abs(ys.mean() - (cell - 1) / 2) < 2  # still centred
    assert max(ratios) > 1.1 and max(ratios) < 1.6, ratios
    assert all(0.85 * base < s < 1.15 * base for s in sides), sides
    assert max(sides) - min(sides) > 0.06 * base, sides  # the size really varies


@pytest.mark.fast
def test_max_images_keeps_groups_in_order(objects, tmp_path):
    objs = pick(objects, *PAIR)
    full = mg.grid_layouts(objs, sizes=(124, 224), seed=5)
    paths = mg.make_grid_images(tmp_path, objs, cell=CELL, sizes=(124, 224), max_images=50, seed=5,
                                progress=False)
    assert [p.name for p in paths] == [data.format_grid_name(l) for l in full[:50]]
    assert len(list(tmp_path.iterdir())) == 50
    # Groups (obj1, obj2, size, cell1) come whole and contiguous: 15 images each, obj2 moving.
    keys = [(l.obj1, l.obj2, l.size, l.cell1) for l in map(data.parse_grid_name, (p.name for p in paths))]
    runs = [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]
    assert len(runs) == len(set(runs)) == 4
    assert [keys.count(k) for k in runs] == [15, 15, 15, 5]
    first = [data.parse_grid_name(p.name) for p in paths[:15]]
    assert {l.cell2 for l in first} == set(mg.grid_cells()) - {first[0].cell1}
    # Full enumeration order: pair -> size -> cell1 -> cell2.
    assert len(full) == 2 * 2 * 16 * 15
    assert [l.size for l in full[:480]] == [124] * 240 + [224] * 240


@pytest.mark.fast
def test_max_pairs(objects, tmp_path):
    objs = pick(objects, "red circle", "blue square", "green triangle")
    paths = mg.make_grid_images(tmp_path, objs, cell=CELL, sizes=(124,), no_same_row_or_col=True,
                                max_pairs=2, progress=False)
    pairs = {(l.obj1, l.obj2) for l in (data.parse_grid_name(p.name) for p in paths)}
    assert len(pairs) == 2 and len(paths) == 2 * 16 * 9
    # Seeded: the same seed picks the same pairs, and the seed changes the choice.
    choices = {tuple(mg.select_pairs(list(objs), 2, seed)) for seed in range(10)}
    assert len(choices) > 1
    assert mg.select_pairs(list(objs), 2, 7) == mg.select_pairs(list(objs), 2, 7)
    assert len(mg.select_pairs(list(objs), None, 0)) == 6


# ---------------------------------------------------------------------------------------------
# COCO-Spatial stand-in
# ---------------------------------------------------------------------------------------------

@pytest.mark.fast
def test_coco_standin(objects, tmp_path, capsys):
    objs = pick(objects, "red circle", "blue square", "orange cross")
    json_path = mg.make_coco_standin(tmp_path / "a", objs, n=12, image_size=128, seed=1)
    assert json_path.name == "coco_qa_two_obj_standin.json"
    samples = data.load_coco_spatial(json_path, tmp_path / "a")
    assert len(samples) == 12
    assert data.relation_counts(samples) == {"left": 3, "right": 3, "above": 3, "below": 3}

    import json
    rows = json.loads(json_path.read_text())
    assert [r[0] for r in rows] == list(range(1, 13))
    saw_an = False
    for (image_id, true_cap, false_cap), sample in zip(rows, samples):
        x, rel, y, a1, a2 = data.parse_caption(true_cap)
        fx, frel, fy, _, _ = data.parse_caption(false_cap)
        assert (fx, fy) == (x, y) and x != y and frel == mg.OPPOSITE[rel]
        for name, art in ((x, a1), (y, a2)):
            assert art == ("an" if name == "orange cross" else "a"), true_cap
            saw_an |= art == "an"
        # The true relation agrees with where the objects are in the image.
        img = Image.open(tmp_path / "a" / f"{image_id:012d}.jpg")
        assert img.format == "JPEG" and img.size == (128, 128)
        (x1, y1), (x2, y2) = colour_centroid(img, colour_of(x)), colour_centroid(img, colour_of(y))
        dx, dy = x2 - x1, y2 - y1  # obj2 relative to obj1
        expected = {"left": dx > 0, "right": dx < 0, "above": dy > 0, "below": dy < 0}[rel]
        main_axis, other = (abs(dx), abs(dy)) if rel in ("left", "right") else (abs(dy), abs(dx))
        assert expected and main_axis > 2 * other, (true_cap, dx, dy)
    assert saw_an

    # Deterministic.
    again = mg.make_coco_standin(tmp_path / "b", objs, n=12, image_size=128, seed=1)
    assert again.read_bytes() == json_path.read_bytes()
    assert digest(sorted((tmp_path / "a").iterdir())) == digest(sorted((tmp_path / "b").iterdir()))


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

@pytest.mark.fast
@pytest.mark.parametrize("argv, flag", [
    (["--sizes", "124", "0"], "--sizes"),
    (["--sizes", "-5"], "--sizes"),
    (["--cell", "4"], "--cell"),
    (["--max_images", "0"], "--max_images"),
    (["--standin_only"], "--standin_only"),
    (["--bg_dir", "does/not/exist"], "--bg_dir"),
])
def test_cli_bad_args(tmp_path, capsys, argv, flag):
    out = tmp_path / "grid"
    with pytest.raises(SystemExit) as exc:
        mg.main(["--out_dir", str(out)] + argv)
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err
    assert not out.exists(), "nothing may be drawn before the arguments are checked"


@pytest.mark.fast
def test_cli_objects_dir_error_names_folder(tmp_path, capsys):
    folder = tmp_path / "only_one"
    folder.mkdir()
    Image.new("RGBA", (8, 8), (1, 2, 3, 255)).save(folder / "cup.png")
    with pytest.raises(SystemExit):
        mg.main(["--out_dir", str(tmp_path / "g"), "--objects_dir", str(folder)])
    assert "only_one" in capsys.readouterr().err


def test_cli_runs_twice_identically(tmp_path, capsys):
    def run(tag):
        mg.main(["--out_dir", str(tmp_path / tag / "grid"), "--cell", "8", "--sizes", "224",
                 "--max_pairs", "1", "--max_images", "20", "--local_variation", "--seed", "2",
                 "--coco_standin", str(tmp_path / tag / "coco"), "--standin_size", "4"])
        return {str(p.relative_to(tmp_path / tag)): p.read_bytes()
                for p in sorted((tmp_path / tag).rglob("*")) if p.is_file()}

    first = run("a")
    out = capsys.readouterr().out
    assert "wrote 20 grid images" in out and "STAND-IN" in out
    assert len([k for k in first if k.startswith("grid/")]) == 20
    assert len([k for k in first if k.endswith(".jpg")]) == 4
    assert run("b") == first
