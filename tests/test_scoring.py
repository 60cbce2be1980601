"""The rules of a measurement (scoring.py) and the checks benchmarks.py derives, on files in the
released formats: readings of generated answers (strict, substring, the original's), swapped
twins only where the relation is symmetric, the mirrored twin, circular accuracy over option
orders, stratified seeded sampling, and captions that are plural, article-less or unparseable."""
import json

import pytest
from PIL import Image, ImageOps

import benchmarks
import data
import eval_coco
import scoring

SIX = ("left", "right", "front", "behind", "above", "below")
ONE_COCO = ("left", "right", "top", "bottom")
ONE_VG = ("left", "right", "front", "behind", "top", "bottom")
CONTROLLED_A = ("left", "right", "on", "under")


# ---------------------------------------------------------------------------------------------
# Readings
# ---------------------------------------------------------------------------------------------

@pytest.mark.fast
@pytest.mark.parametrize("text, options, expected", [
    # the table: ordinary answers the former strict reading called unparseable or several
    ("The answer is left", SIX, "left"),
    ("To the left", ONE_COCO, "left"),
    ("At the bottom", ONE_COCO, "bottom"),
    ("In the front", ONE_VG, "front"),
    ("On the left", CONTROLLED_A, "left"),
    # and what it must keep doing
    ("On the table.", CONTROLLED_A, "on"),
    ("Under the chair", CONTROLLED_A, "under"),
    ("In front of the dog", SIX, "front"),
    ("Behind it, as the photo shows", SIX, "behind"),
    ("The answer is: to the right", SIX, "right"),
])
def test_strict_reads_ordinary_answers(text, options, expected):
    assert scoring.read_strict(text, options) == (expected, "ok")


@pytest.mark.fast
@pytest.mark.parametrize("text, status", [
    ("left or right", "several"),
    ("Left, right, front, behind, above or below", "several"),
    ("To the left, not the right", "several"),
    ("I would say left", "unparseable"),  # not a leading phrase of the table
    ("leftmost", "unparseable"),
    ("", "unparseable"),
])
def test_strict_refuses_what_is_not_one_option(text, status):
    assert scoring.read_strict(text, SIX) == ("", status)


@pytest.mark.fast
@pytest.mark.parametrize("text, gold, expected", [
    ("The answer is left", "left", "left"),
    ("leftmost", "left", "left"),  # AdaptVis: a substring, not a whole word
    ("left or right", "right", "right"),  # the gold appears: right, whatever else is said
    ("In front of the table", "on", "front"),  # "on" is not read where the answer says front
    ("Below", "above", "below"),
    ("no idea", "left", ""),
])
def test_substring_is_adaptvis_rule(text, gold, expected):
    assert scoring.read_substring(text, SIX, gold)[0] == expected


@pytest.mark.fast
def test_original_reading_does_not_depend_on_the_listed_order():
    """With parsing="original", "left or right" read as right at rotation 1 (the options listed
    as right, left): the original's reading takes the first option *in the list*. The benchmark's
    own order is what evaluate_benchmark hands it now."""
    question = {"benchmark": "coco_one_obj", "options": ("right", "top", "bottom", "left")}  # rotated by 1
    assert eval_coco._listed_options(question) == ["left", "right", "top", "bottom"]
    assert scoring.read_original("left or right", eval_coco._listed_options(question))[0] == "left"


def _loaded(tmp_path, name, rows, images=(), **kw):
    """benchmarks.load of `name` from a file in its released format holding `rows` (images drawn
    for every id/path the rows name)."""
    bench = benchmarks.BENCHMARKS[name]
    roots = benchmarks.DataRoots(val_json=str(tmp_path / "coco_qa_two_obj.json"), coco_val_dir=str(tmp_path / "coco"),
                                 whatsup_dir=str(tmp_path / "whatsup"), vsr_dir=str(tmp_path / "vsr"))
    path = benchmarks.annotation_path(name, roots)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    folder = benchmarks.image_dir(name, roots)
    folder.mkdir(parents=True, exist_ok=True)
    for row in rows:
        if bench.kind == "vsr":
            file = folder / row["image"]
        elif bench.kind == "controlled":
            file = folder / row["image_path"].split("/")[-1]
        else:
            file = data.coco_image_path(folder, row[0]) if bench.images == "coco" else folder / f"{row[0]}.jpg"
        if not file.is_file():
            Image.new("RGB", images[0] if images else (32, 24), (200, 30, 30)).save(file)
    return benchmarks.load(name, roots, **kw), roots


def test_readings_side_by_side_in_the_report(tmp_path, tiny_ro, monkeypatch):
    """generate mode: the report has strict and substring accuracy and unparseable share side by
    side, whatever reading gives the headline."""
    rows = [[i + 1, f"A photo of a dog {rel}", "x"] for i, rel in enumerate(["on the left", "on the right",
                                                                                 "at the top", "at the bottom"])]
    samples, _ = _loaded(tmp_path, "coco_one_obj", rows)
    answers = {"left": "To the left", "right": "rightmost", "top": "It is at the top", "bottom": "no idea"}
    monkeypatch.setattr(eval_coco, "generate_answers",
                        lambda model, processor, adapter, asked, *a, **k: [answers[q["answer"]] for q in asked])
    model, processor, adapter = tiny_ro
    report, _ = eval_coco.evaluate_benchmark(model, processor, adapter, samples, consistency=False, mirror=False,
                                             progress=False)
    assert report["readings"]["strict"] == {"accuracy": 0.5, "unparseable": 0.5, "several": 0.0}
    assert report["readings"]["substring"] == {"accuracy": 0.75, "unparseable": 0.25, "several": 0.0}
    assert report["accuracy"] == 0.5  # the headline: strict
    line = scoring.format_benchmark_report(report)
    assert "strict reading 0.5000 (unparseable 0.500)" in line and "substring reading 0.7500" in line


# ---------------------------------------------------------------------------------------------
# Swapped, mirrored and rotated questions
# ---------------------------------------------------------------------------------------------

CONTROLLED_ROWS = [{"image_path": f"data/controlled_images/scarf_{spelt}_table.jpeg",
                    "caption_options": [f"A scarf {phrase} a table", "A scarf to the left of a table"]}
                   for spelt, phrase in (("left_of", "to the left of"), ("right_of", "to the right of"),
                                         ("on", "on"), ("under", "under"))]


@pytest.mark.fast
def test_on_under_questions_have_no_swapped_twin(tmp_path):
    """"a scarf under a table" asked the other way round expected "on": the table is not on the
    scarf. Only symmetric relations get a swapped twin."""
    samples, _ = _loaded(tmp_path, "controlled_a", CONTROLLED_ROWS)
    twins = [q for q in benchmarks.with_checks(samples, mirror=False) if q["order"] == "swapped"]
    assert sorted(q["answer"] for q in twins) == ["left", "right"]
    assert not any(q["answer"] in ("on", "under") for q in twins)


@pytest.mark.fast
def test_mirrored_twin_flips_image_and_left_right(tmp_path):
    rows = [[1, "A photo of a dog to the left of a cat", "x"], [2, "A photo of a dog above a cat", "x"],
            [3, "A photo of a dog behind a cat", "x"]]
    samples, _ = _loaded(tmp_path, "vg_two_obj", rows)
    image = Image.new("RGB", (16, 8))
    image.paste((255, 0, 0), (0, 0, 8, 8))  # red on the left half
    image.save(samples[0]["image_path"])
    mirrored = [q for q in benchmarks.with_checks(samples, consistency=False) if q["order"] == "mirrored"]
    assert [q["answer"] for q in mirrored] == ["right", "above", "behind"]
    assert all(q["question"] == s["question"] for q, s in zip(mirrored, samples))
    flipped = mirrored[0]["image"]()
    assert flipped.getpixel((14, 4))[0] > 200 and flipped.getpixel((1, 4))[0] < 50  # red on the right now
    assert flipped.tobytes() == ImageOps.mirror(data.load_image(samples[0]["image_path"])).tobytes()
    assert mirrored[0]["image_path"] != samples[0]["image_path"]  # never batched as the unflipped image


@pytest.mark.fast
def test_circular_accuracy_needs_every_rotation_right():
    """Three questions, two rotations each: q0 right both times, q1 right once, q2 never."""
    rows = [{"row": r, "order": "asked", "rotation": k, "correct": ok}
            for r, k, ok in [(0, 0, True), (0, 1, True), (1, 0, True), (1, 1, False), (2, 0, False), (2, 1, False)]]
    report = scoring.circular_report(rows)
    assert report["accuracy_by_rotation"] == {0: pytest.approx(2 / 3), 1: pytest.approx(1 / 3)}
    assert report["circular_accuracy"] == pytest.approx(1 / 3) and report["n_questions"] == 3
    assert report["spread"] == pytest.approx(1 / 3)


def test_rotations_read_alike_under_the_original_reading(tmp_path, tiny_ro, monkeypatch):
    """The same answer text at every rotation reads the same: per-rotation accuracy has no spread
    the parser made (the model is stubbed to say "left or right" to everything)."""
    rows = [[i + 1, f"A photo of a dog on the {rel}", "x"] for i, rel in enumerate(["left", "right", "top", "bottom"])]
    samples, _ = _loaded(tmp_path, "coco_one_obj", rows)
    monkeypatch.setattr(eval_coco, "generate_answers", lambda model, processor, adapter, asked, *a, **k:
                        ["left or right"] * len(asked))
    model, processor, adapter = tiny_ro
    report, rows = eval_coco.evaluate_benchmark(model, processor, adapter, samples, consistency=False, mirror=False,
                                                option_orders=4, parsing="original", progress=False)
    assert {r["prediction"] for r in rows} == {"left"}
    assert report["option_order"]["spread"] == 0
    assert report["option_order"]["circular_accuracy"] == 0.25  # the left question, right at every rotation


# ---------------------------------------------------------------------------------------------
# Which rows: every row, or a stratified seeded sample
# ---------------------------------------------------------------------------------------------

@pytest.mark.fast
def test_a_budget_is_a_stratified_seeded_sample_not_a_prefix(tmp_path):
    """40 rows, 30 left then 10 right: a prefix of 8 would be all left."""
    rels = ["left"] * 30 + ["right"] * 10
    rows = [[i + 1, f"A photo of a dog on the {rel}", "x"] for i, rel in enumerate(rels)]
    samples, roots = _loaded(tmp_path, "coco_one_obj", rows, max_samples=8, sample_seed=3)
    assert sorted(s["answer"] for s in samples).count("right") == 2  # 10/40 of 8
    assert [s["row"] for s in samples] != list(range(8))
    again = benchmarks.load("coco_one_obj", roots, max_samples=8, sample_seed=3)
    other = benchmarks.load("coco_one_obj", roots, max_samples=8, sample_seed=4)
    assert [s["row"] for s in again] == [s["row"] for s in samples] != [s["row"] for s in other]
    assert samples[0]["selection"] == {"n": 8, "of": 40, "sampled": True, "seed": 3}
    assert scoring.selection_note(samples[0]["selection"]) == "8 of 40 rows, sampled (seed 3)"
    assert len(benchmarks.load("coco_one_obj", roots)) == 40  # every row by default


@pytest.mark.fast
def test_coco_spatial_budget_is_a_stratified_sample(tmp_path):
    rows = [[i + 1, f"A photo of a dog {'to the left of' if i < 12 else 'above'} a cat", "x"] for i in range(16)]
    (tmp_path / "coco").mkdir()
    for i in range(16):
        Image.new("RGB", (8, 8)).save(data.coco_image_path(tmp_path / "coco", i + 1))
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    samples = data.load_coco_spatial(tmp_path / "rows.json", tmp_path / "coco", max_samples=4, sample_seed=0)
    assert sorted(s["answer"] for s in samples) == ["above", "left", "left", "left"]
    assert samples[0]["selection"] == {"n": 4, "of": 16, "sampled": True, "seed": 0}


@pytest.mark.fast
def test_run_scripts_evaluate_every_row():
    script = (data.Path(__file__).resolve().parents[1] / "run_vision_baseline.sh").read_text()
    assert "--eval_max_samples" not in script


# ---------------------------------------------------------------------------------------------
# Captions of the released files
# ---------------------------------------------------------------------------------------------

@pytest.mark.fast
@pytest.mark.parametrize("caption, expected", [
    ("A photo of children to the left of a dog", ("children", "left", "dog")),
    ("A photo of two cups behind the laptop", ("two cups", "behind", "laptop")),
    ("people in front of buses", ("people", "front", "buses")),
    ("A photo of a man above a horse", ("man", "above", "horse")),
])
def test_plural_and_article_less_captions_parse(caption, expected):
    assert benchmarks.parse_two_object_caption(caption, SIX)[:3] == expected


@pytest.mark.fast
def test_plural_one_object_caption_parses():
    assert benchmarks.parse_one_object_caption("A photo of children on the left", ONE_COCO) == ("children", "left")


def test_an_unparsed_caption_is_left_out_counted_and_named(tmp_path, capsys):
    """One caption of 101 that no rule reads: its row is left out and named in one warning line,
    and the evaluation goes on (1 of 101 is under the 1% threshold)."""
    rows = [[i + 1, "A photo of children to the left of a dog", "x"] for i in range(100)]
    rows.insert(57, [999, "Two dogs, one of them sleeping", "x"])
    _, roots = _loaded(tmp_path, "vg_two_obj", rows, unparsed=[])
    args = eval_coco_args(roots)
    loaded = eval_coco.load_benchmarks(["vg_two_obj"], args)
    assert len(loaded["vg_two_obj"]) == 100 and 57 not in {s["row"] for s in loaded["vg_two_obj"]}
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "vg_two_obj: 1 of 101 rows" in err[0] and "row 57 'Two dogs, one of them sleeping'" in err[0]


def test_too_many_unparsed_captions_stop_before_a_model_loads(tmp_path, capsys, monkeypatch):
    rows = [[i + 1, "A photo of children to the left of a dog", "x"] for i in range(20)]
    rows[3][1] = rows[9][1] = "a blurry photo"
    _, roots = _loaded(tmp_path, "vg_two_obj", rows, unparsed=[])
    monkeypatch.setattr(eval_coco, "load_model", lambda args: pytest.fail("a model loaded"))
    with pytest.raises(SystemExit) as err:
        eval_coco.main(["--ckpt", "tiny", "--benchmark", "vg_two_obj", "--whatsup_dir", roots.whatsup_dir,
                        "--output", str(tmp_path / "out")])
    assert "vg_two_obj: 2 of 20 rows" in str(err.value) and "--max_unparsed_share 0.01" in str(err.value)


def eval_coco_args(roots, **overrides):
    import argparse

    parser = argparse.ArgumentParser()
    eval_coco.add_data_args(parser)
    eval_coco.add_benchmark_args(parser)
    args = parser.parse_args(["--whatsup_dir", roots.whatsup_dir, "--val_json", roots.val_json,
                              "--coco_val_dir", roots.coco_val_dir, "--vsr_dir", roots.vsr_dir])
    args.question_style = "clean"
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


@pytest.mark.fast
def test_mirrored_twin_of_an_in_memory_image():
    """Readers that hold images as bytes (parquet releases) get the mirrored twin too."""
    import io

    image = Image.new("RGB", (6, 2))
    image.paste((0, 0, 255), (0, 0, 3, 2))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    sample = {"benchmark": "x", "kind": "two_obj", "row": 0, "image_path": "x.parquet#0", "image": buffer.getvalue(),
              "answer": "left", "relation": "left", "order": "asked"}
    flipped = benchmarks.mirrored(sample)["image"]()
    assert flipped.getpixel((5, 0)) == (0, 0, 255) and flipped.getpixel((0, 0)) == (0, 0, 0)


@pytest.mark.fast
def test_compare_runs_says_which_rows_were_evaluated():
    import compare_runs

    sampled = {"n": 500, "of": 2247, "sampled": True, "seed": 0}
    groups = [{"runs": [{"evals": [{"step": 0, "coco_one_obj": {"accuracy": 0.5, "selection": sampled}}]}]}]
    assert compare_runs.rows_note(groups, "coco_one_obj") == " Rows: 500 of 2,247 rows, sampled (seed 0)."
    assert compare_runs.rows_note(groups, "vsr") == ""
