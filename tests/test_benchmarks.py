"""benchmarks.py and eval_coco's benchmark evaluation: every loader on a stand-in written in its
released format (row counts, gold balance per relation, questions), parse errors naming the row,
the swapped question's flipped gold, option rotation, strict answer reading (a generated option
list is wrong), consistency / pair / set accuracy by hand, VSR's ROC-AUC against a hand
computation, each image encoded once, and the CLI (`--benchmark all`, missing files named
before a model loads)."""
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

import benchmarks
import eval_coco
import scoring
import make_grid_data as mg
import models

N = 12  # rows per stand-in


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Stand-ins of all fourteen benchmarks, 12 rows each, 48 px images."""
    return mg.make_benchmark_standins(tmp_path_factory.mktemp("bench"), mg.builtin_objects(48), n=N, image_size=48)


@pytest.fixture(scope="module")
def loaded(roots):
    return {name: benchmarks.load(name, roots) for name in benchmarks.NAMES}


@pytest.fixture(scope="module")
def tiny_ro(tiny_path):
    return models.load_model_and_processor("tiny")


def copy_roots(roots, tmp_path):
    """A writable copy of the stand-ins and the DataRoots that finds it."""
    src = Path(roots.whatsup_dir).parent
    shutil.copytree(src, tmp_path / "b")
    moved = {k: str(v).replace(str(src), str(tmp_path / "b")) if v else v for k, v in vars(roots).items()}
    return benchmarks.DataRoots(**moved)


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------

@pytest.mark.fast
@pytest.mark.parametrize("name", [n for n in benchmarks.NAMES if n not in benchmarks.HUB_NAMES])  # the hub's: test_hub_benchmarks
def test_every_loader_reads_its_released_format(name, loaded):
    samples = loaded[name]
    bench = benchmarks.BENCHMARKS[name]
    assert len(samples) == N and [s["row"] for s in samples] == list(range(N))
    gold = Counter(s["answer"] for s in samples)
    assert set(gold) == set(bench.options)  # every option is some row's gold answer
    assert len(set(gold.values())) == 1 if N % len(bench.options) == 0 else max(gold.values()) - min(gold.values()) <= 1
    for s in samples:
        assert Path(s["image_path"]).is_file()
        assert s["question"][slice(*s["obj2_span"])].endswith(s["obj2"])
        assert s["answer"] in s["options"]
    q = samples[0]
    if bench.kind in ("two_obj", "controlled") and name != "coco_two_obj":
        assert q["question"] == (f"Where is the {q['obj1']} in relation to the {q['obj2']}? Answer with "
                                 + ", ".join(bench.options[:-1]) + f" or {bench.options[-1]}.")
    if bench.kind == "one_obj":
        assert q["question"] == (f"Where is the {q['obj1']} in the photo? Answer with "
                                 + ", ".join(bench.options[:-1]) + f" or {bench.options[-1]}.")
    if name == "vsr":
        assert len({s["image_path"] for s in samples}) == N // 2  # a true and a false caption per image
        assert q["caption"] in q["question"] and q["answer"] == "true"
    if bench.kind == "controlled":  # the relation comes from the file name and agrees with the caption
        for s in samples:
            assert benchmarks.controlled_relation(s["image_id"], bench.options) == s["relation"]
        assert Counter(s["pair_key"] for s in samples) == {k: 4 for k in {s["pair_key"] for s in samples}}


@pytest.mark.fast
def test_the_caption_forms_of_the_released_files():
    vg2, vg1 = benchmarks.BENCHMARKS["vg_two_obj"].options, benchmarks.BENCHMARKS["vg_one_obj"].options
    assert benchmarks.parse_one_object_caption("A photo of a dining table on the bottom",
                                               benchmarks.BENCHMARKS["coco_one_obj"].options) == ("dining table", "bottom")
    assert benchmarks.parse_one_object_caption("A photo of an umbrella in the front", vg1) == ("umbrella", "front")
    assert benchmarks.parse_two_object_caption("A photo of a dining table to the left of a refrigerator", vg2)[:3] == (
        "dining table", "left", "refrigerator")
    assert benchmarks.parse_two_object_caption("A photo of a cup on top of a table", vg2)[:3] == ("cup", "above", "table")
    assert benchmarks.parse_two_object_caption("A beer bottle on a armchair",
                                               benchmarks.BENCHMARKS["controlled_a"].options)[:3] == (
        "beer bottle", "on", "armchair")
    with pytest.raises(benchmarks.BenchmarkFormatError, match="relation among to the left of"):
        benchmarks.parse_two_object_caption("A beer bottle on a armchair", vg2)  # 'on' is not a VG relation
    assert benchmarks.controlled_relation("data/controlled_images/beer-bottle_on_armchair.jpeg",
                                          benchmarks.BENCHMARKS["controlled_a"].options) == "on"
    assert benchmarks.controlled_relation("data/controlled_clevr/cube_in-front_of_sphere.jpeg",
                                          benchmarks.BENCHMARKS["controlled_b"].options) == "front"
    assert benchmarks.controlled_relation("data/controlled_clevr/cube_behind_sphere.jpeg",
                                          benchmarks.BENCHMARKS["controlled_b"].options) == "behind"


@pytest.mark.fast
def test_coco_two_obj_keeps_todays_questions(roots, loaded):
    """coco_two_obj is data.load_coco_spatial's questions, word for word, in both styles."""
    import data

    for style in ("paper", "clean"):
        today = data.load_coco_spatial(roots.val_json, roots.coco_val_dir, style)
        ours = benchmarks.load("coco_two_obj", roots, style)
        assert [s["question"] for s in ours] == [s["question"] for s in today]
        assert [s["options"] for s in ours] == [s["options"] for s in today]
    assert loaded["coco_two_obj"][0]["question"].startswith("Is the ")


CORRUPT = {  # benchmark -> (how row 3 is broken, the message's tail)
    "coco_one_obj": (lambda row: [row[0], "A photo of a red circle somewhere", row[2]], "last word among"),
    "vg_two_obj": (lambda row: [row[0], "A photo of a dog near a cat", row[2]], "relation among"),
    "vg_one_obj": (lambda row: [row[0]], "malformed row"),
    "controlled_a": (lambda row: dict(row, caption_options=[row["caption_options"][1]]), "its file name"),
    "controlled_b": (lambda row: dict(row, image_path=7), "malformed row"),
    "vsr": (lambda row: dict(row, label="yes"), "malformed row"),
}


@pytest.mark.fast
@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_a_row_that_does_not_parse_names_its_row(name, roots, tmp_path):
    roots = copy_roots(roots, tmp_path)
    path = benchmarks.annotation_path(name, roots)
    jsonl = path.suffix == ".jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if jsonl else json.loads(path.read_text())
    assert len(benchmarks.load(name, roots)) == N  # whole, it loads
    breaker, message = CORRUPT[name]
    rows[3] = breaker(rows[3])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) if jsonl else json.dumps(rows))
    with pytest.raises(benchmarks.BenchmarkFormatError, match=rf"{path.name}: row 3: .*{message}") as err:
        benchmarks.load(name, roots)
    assert len(str(err.value)) < 300 and "\n" not in str(err.value)


@pytest.mark.fast
def test_missing_files_are_one_line_each_with_where_to_get_them(roots, tmp_path):
    roots = copy_roots(roots, tmp_path)
    assert benchmarks.missing_files(benchmarks.NAMES, roots) == []
    assert benchmarks.present(roots) == list(benchmarks.NAMES)
    benchmarks.annotation_path("vg_one_obj", roots).unlink()
    shutil.rmtree(benchmarks.image_dir("controlled_b", roots))
    lines = benchmarks.missing_files(benchmarks.NAMES, roots)
    assert len(lines) == 2
    assert lines[0].startswith("vg_one_obj: ") and "vg_qa_one_obj.json not found" in lines[0]
    assert "whatsup_vlms" in lines[0]
    assert lines[1].startswith("controlled_b: image folder") and "controlled_clevr.tar.gz" in lines[1]
    assert all(len(line) < 300 for line in lines)
    assert benchmarks.present(roots) == [n for n in benchmarks.NAMES if n not in ("vg_one_obj", "controlled_b")]
    image = Path(benchmarks.load("vsr", roots)[4]["image_path"])
    image.unlink()
    with pytest.raises(FileNotFoundError, match=rf"2 of the {N} images of vsr are missing \(first: {image.name}\)") as err:
        benchmarks.load("vsr", roots)  # its two captions' image
    assert len(str(err.value)) < 300 and str(err.value).count(".jpg") == 1


# ---------------------------------------------------------------------------------------------
# Swapped objects, option order
# ---------------------------------------------------------------------------------------------

@pytest.mark.fast
@pytest.mark.parametrize("name", ["coco_two_obj", "vg_two_obj", "controlled_a", "controlled_b"])
def test_the_swapped_question_flips_the_gold(name, loaded):
    pairs = {"left": "right", "above": "below", "front": "behind"}
    flip = pairs | {b: a for a, b in pairs.items()}
    for s in loaded[name]:
        if s["relation"] in ("on", "under"):  # no swapped twin: see test_on_under_questions_have_no_swapped_twin
            continue
        twin = benchmarks.swapped(s)
        assert twin["answer"] == flip[s["answer"]] and twin["relation"] == flip[s["relation"]]
        assert (twin["obj1"], twin["obj2"]) == (s["obj2"], s["obj1"])
        assert twin["question"][slice(*twin["obj2_span"])].endswith(s["obj1"])
        assert twin["question"].index(s["obj2"]) < twin["question"].index(s["obj1"])
        assert twin["image_path"] == s["image_path"] and twin["order"] == "swapped"
        assert benchmarks.swapped(twin)["question"] == s["question"]


@pytest.mark.fast
def test_swapped_paper_wording_is_the_originals_for_the_swapped_caption(roots):
    import data

    for s in benchmarks.load("coco_two_obj", roots, "paper"):
        x, rel, y, a1, a2 = data.parse_caption(s["caption"])
        caption = f"A photo of {a2} {y} {data.RELATION_PHRASE[benchmarks.OPPOSITE[rel]]} {a1} {x}"
        assert benchmarks.swapped(s)["question"] == data.original_question(caption)[0]


@pytest.mark.fast
def test_one_object_and_vsr_questions_have_no_twin(loaded):
    assert benchmarks.with_checks(loaded["coco_one_obj"], mirror=False) == loaded["coco_one_obj"]
    assert benchmarks.with_checks(loaded["vsr"]) == loaded["vsr"]  # VSR: no swapped, no mirrored twin
    with pytest.raises(ValueError, match="row 0: only two-object"):
        benchmarks.swapped(loaded["vsr"][0])
    assert len(benchmarks.with_checks(loaded["vg_two_obj"], mirror=False)) == 2 * N


@pytest.mark.fast
def test_rotating_the_options(loaded):
    s = loaded["controlled_a"][0]
    r = benchmarks.rotated(s, 1)
    assert r["question"].endswith("Answer with right, on, under or left.") and r["options"] == ("right", "on", "under", "left")
    assert r["answer"] == s["answer"] and r["question"].startswith(f"Where is the {s['obj1']} in relation to")
    assert benchmarks.rotated(s, 4)["question"] == s["question"]
    coco = loaded["coco_two_obj"][0]  # the original's template: both option mentions swap
    assert benchmarks.rotated(coco, 1)["question"] == coco["question"].replace("left", "L").replace(
        "right", "left").replace("L", "right")
    assert len(benchmarks.with_checks(loaded["vsr"], option_orders=3)) == 2 * N  # two options: one rotation


# ---------------------------------------------------------------------------------------------
# Reading and scoring answers
# ---------------------------------------------------------------------------------------------

FOUR = ("left", "right", "above", "below")


@pytest.mark.fast
@pytest.mark.parametrize("text, expected", [
    ("Left.", ("left", "ok")),
    ("  below, it is", ("below", "ok")),
    ("left, right, above or below", ("", "several")),  # the option list: wrong
    ("right or left", ("", "several")),
    ("The answer is left", ("left", "ok")),  # an accepted leading phrase (scoring.LEADING_PHRASES)
    ("I think left", ("", "unparseable")),  # words before the option that are not a leading phrase
    ("leftmost", ("", "unparseable")),
    ("", ("", "unparseable")),
])
def test_parse_strict(text, expected):
    assert scoring.read_strict(text, FOUR) == expected


@pytest.mark.fast
def test_parse_strict_front():
    assert scoring.read_strict("In front.", ("left", "right", "front", "behind")) == ("front", "ok")


def test_a_generated_option_list_is_scored_wrong(loaded, tiny_ro, monkeypatch):
    """The answers come from a stub of generate_answers (the tiny model says no options); parsing
    and the report are the real ones. The original's reading would count the list as an answer."""
    model, processor, adapter = tiny_ro
    samples = loaded["controlled_a"]

    def listing(model, processor, adapter, questions, *args, **kwargs):
        return ["left, right, on or under" for _ in questions]

    monkeypatch.setattr(eval_coco, "generate_answers", listing)
    report, rows = eval_coco.evaluate_benchmark(model, processor, adapter, samples, consistency=False, progress=False)
    assert report["accuracy"] == 0.0 and report["several_options"] == 1.0 and report["unparseable"] == 0.0
    assert all(r["prediction"] == "" and r["parse"] == "several" for r in rows)
    lenient, _ = eval_coco.evaluate_benchmark(model, processor, adapter, samples, consistency=False,
                                              parsing="original", progress=False)
    assert lenient["accuracy"] == pytest.approx(3 / N)  # 'left' found first: every left row counted right

    def gold(model, processor, adapter, questions, *args, **kwargs):
        return [q["answer"].capitalize() + "." for q in questions]

    monkeypatch.setattr(eval_coco, "generate_answers", gold)
    report, _ = eval_coco.evaluate_benchmark(model, processor, adapter, samples, progress=False)
    assert report["accuracy"] == 1.0 and report["consistency"]["consistent"] == 1.0
    assert report["pair_accuracy"] == 1.0 and report["set_accuracy"] == 1.0 and report["unparseable"] == 0.0


@pytest.mark.fast
def test_consistency_pair_and_set_accuracy_by_hand(loaded):
    """Predictions chosen by hand on controlled_a (3 object pairs x left, right, on, under): the
    report's numbers against counts done here."""
    samples = loaded["controlled_a"]
    questions = benchmarks.with_checks(samples)
    rows = []
    for q in questions:
        wrong = q["order"] == "asked" and q["row"] in (0, 6)  # row 0: left of pair 0; row 6: on of pair 1
        swapped_wrong = q["order"] == "swapped" and q["row"] == 5  # pair 1's right, asked the other way
        prediction = benchmarks.OPPOSITE[q["answer"]] if wrong or swapped_wrong else q["answer"]
        rows.append({"row": q["row"], "order": q["order"], "rotation": 0, "prediction": prediction,
                     "correct": prediction == q["answer"]})
    report = scoring.benchmark_report(questions, rows)
    assert [s["relation"] for s in samples[:4]] == ["left", "right", "on", "under"]
    assert report["accuracy"] == pytest.approx(10 / 12)
    c = report["consistency"]
    # only left/right have a swapped twin here (on/under are not symmetric): rows 0, 1, 4, 5, 8, 9
    assert c["n_pairs"] == 6
    assert c["accuracy_asked"] == pytest.approx(5 / 6) and c["accuracy_twin"] == pytest.approx(5 / 6)
    # row 0 (wrong as asked, right swapped) and row 5 (the reverse) contradict themselves
    assert c["consistent"] == pytest.approx(4 / 6) and c["both_correct"] == pytest.approx(4 / 6)
    # every question has a mirrored twin, all answered right here: rows 0 and 6 disagree with theirs
    m = report["mirror_consistency"]
    assert m["n_pairs"] == 12 and m["accuracy_twin"] == 1 and m["consistent"] == pytest.approx(10 / 12)
    # pairs: (pair 0: l/r wrong, o/u right), (pair 1: l/r right, o/u wrong), (pair 2: both right)
    assert report["pair_accuracy"] == pytest.approx(4 / 6) and report["pairs"] == 6
    assert report["set_accuracy"] == pytest.approx(1 / 3) and report["sets"] == 3


def test_vsr_auc_agrees_with_a_hand_computation():  # ~1 s: the first import of scikit-learn
    labels = [True, False, True, True, False, False, True]
    margins = [0.9, 0.1, 0.4, 0.4, 0.4, -0.3, -0.5]
    pos = [m for m, y in zip(margins, labels) if y]
    neg = [m for m, y in zip(margins, labels) if not y]
    # AUC = P(a true caption's margin > a false one's), ties counted half
    hand = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert hand == pytest.approx(8 / 12)
    assert scoring.roc_auc(labels, margins) == pytest.approx(hand)
    assert scoring.roc_auc([True, True], [0.1, 0.2]) != scoring.roc_auc([True, True], [0.1, 0.2])  # nan


def test_vsr_report_auc_from_the_models_probabilities(loaded, sensitive):
    model, processor, adapter = sensitive
    samples = loaded["vsr"]
    report, rows = eval_coco.evaluate_benchmark(model, processor, adapter, samples, batch_size=4, mode="score",
                                                progress=False)
    margins = [r["margin_true_false"] for r in rows]
    assert len(set(margins)) > 2  # the model tells the captions apart
    labels = [s["answer"] == "true" for s in samples]
    pos = [m for m, y in zip(margins, labels) if y]
    neg = [m for m, y in zip(margins, labels) if not y]
    hand = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert report["auc"] == pytest.approx(hand)
    scores = eval_coco.option_logprobs(model, processor, adapter, samples, batch_size=1, progress=False)
    # log P(true) - log P(false); batching moves log-probabilities of about -10 by ~1e-5
    assert margins == pytest.approx([t - f for t, f in scores], abs=1e-4)
    assert [r["prediction"] for r in rows] == ["true" if t >= f else "false" for t, f in scores]


# ---------------------------------------------------------------------------------------------
# Each image encoded once; today's COCO numbers
# ---------------------------------------------------------------------------------------------

def count_encoded_images(model, adapter):
    """A counter of the images the vision tower encodes (a forward hook on its patch embedding)."""
    seen = []
    tower = adapter.vision_tower(model)
    handle = tower.register_forward_hook(lambda mod, args, kwargs_or_out: seen.append(1))
    return seen, handle


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_a_swapped_twin_shares_its_images_encoding(mode, loaded, sensitive, monkeypatch):
    """vg_two_obj with its swapped twins: 24 questions on 12 images, batch 8 -> 3 tower calls
    holding 12 images in all; the answers equal those of the plain path (each row its image)."""
    model, processor, adapter = sensitive
    samples = loaded["vg_two_obj"]
    calls, handle = count_encoded_images(model, adapter)
    encoded = []
    original = type(adapter).unique_image_features

    def counting(self, model, pixels, inputs, first_rows):
        encoded.append(len(first_rows))
        return original(self, model, pixels, inputs, first_rows)

    monkeypatch.setattr(type(adapter), "unique_image_features", counting)
    try:
        report, rows = eval_coco.evaluate_benchmark(model, processor, adapter, samples, batch_size=8, mode=mode,
                                                    progress=False, mirror=False)
    finally:
        handle.remove()
    assert len(rows) == 2 * N and sum(encoded) == N and len(calls) == 3
    questions = benchmarks.with_checks(samples, mirror=False)
    if mode == "score":
        plain = eval_coco.score_answers(model, processor, adapter, questions, batch_size=8, progress=False)
        assert [r["prediction"] for r in rows] == plain
    else:
        plain = eval_coco.generate_answers(model, processor, adapter, questions, batch_size=8, progress=False)
        assert [r["generated"] for r in rows] == plain


def test_coco_two_obj_as_asked_equals_todays_evaluation(loaded, sensitive):
    model, processor, adapter = sensitive
    samples = loaded["coco_two_obj"]
    today, today_rows = eval_coco.evaluate(model, processor, adapter, samples, batch_size=5, progress=False)
    report, rows = eval_coco.evaluate_benchmark(model, processor, adapter, samples, batch_size=5, consistency=True,
                                                parsing="original", progress=False)
    asked = [r for r in rows if r["order"] == "asked"]
    assert [r["generated"] for r in asked] == [r["generated"] for r in today_rows]
    assert {k: report[k] for k in today} == today


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def cli(roots, *extra):
    return ["--ckpt", "tiny", "--val_json", roots.val_json, "--coco_val_dir", roots.coco_val_dir,
            "--whatsup_dir", roots.whatsup_dir, "--vsr_dir", roots.vsr_dir, "--hub_dir", roots.hub_dir, *extra]


def test_cli_benchmark_all(roots, tiny_path, tmp_path, capsys):
    out = tmp_path / "preds"
    reports = eval_coco.main(cli(roots, "--benchmark", "all", "--mode", "score", "--eval_max_samples", "4",
                                 "--option_orders", "2", "--output", str(out)))
    printed = capsys.readouterr().out
    assert list(reports) == list(benchmarks.NAMES)
    for name in benchmarks.NAMES:
        assert printed.count(f"{name}: accuracy") == 1
        rows = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        kind = benchmarks.BENCHMARKS[name].kind
        asked = [r for r in rows if r["order"] == "asked" and r["rotation"] == 0]
        twins = sum(r["relation"] in benchmarks.SYMMETRIC for r in asked) if kind in benchmarks.TWO_OBJECT_KINDS else 0
        # What'sUp's questions, and the hub's whose row says their gold under a mirror
        mirrored = sum(map(benchmarks.has_mirrored_twin, benchmarks.load(name, roots, "clean", 4)))
        assert mirrored == 4 or kind not in benchmarks.MIRROR_KINDS
        assert len(rows) == 4 * 2 + twins + mirrored and reports[name]["n"] == 4
        assert "option_order" in reports[name] and ("consistency" in reports[name]) == (twins > 0)
        assert ("mirror_consistency" in reports[name]) == (mirrored > 0)
        assert reports[name]["selection"] == {"n": 4, "of": 12, "sampled": True, "seed": 0}
        assert "4 of 12 rows, sampled (seed 0)" in printed.split(f"{name}: accuracy")[1].splitlines()[0]
    assert json.loads((out / "report.json").read_text())["vsr"]["n"] == 4
    assert "auc" in reports["vsr"] and "pair_accuracy" in reports["controlled_b"]


@pytest.mark.fast
def test_cli_bad_option_orders_is_one_line(roots, capsys):
    with pytest.raises(SystemExit) as err:
        eval_coco.main(cli(roots, "--benchmark", "vsr", "--option_orders", "0"))
    assert err.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("argument --option_orders: must be >= 1, not 0")


@pytest.mark.fast
def test_cli_missing_files_listed_before_the_model_loads(roots, tmp_path, model_must_not_load):
    with pytest.raises(SystemExit) as err:
        eval_coco.main(cli(roots, "--benchmark", "vg_two_obj", "vsr", "--whatsup_dir", str(tmp_path / "none"),
                           "--output", str(tmp_path / "out")))
    lines = str(err.value.code).splitlines()
    assert lines[0] == "error: missing benchmark files:" and len(lines) == 3
    assert lines[1].startswith("vg_two_obj: ") and "vg_qa_two_obj.json not found" in lines[1]
    assert lines[2].startswith("vg_two_obj: image folder")
    broken = copy_roots(roots, tmp_path)
    path = benchmarks.annotation_path("vsr", broken)
    path.write_text(path.read_text().replace('"label": 1', '"label": 2', 1))
    with pytest.raises(SystemExit, match=r"test\.jsonl: row 0: malformed row"):
        eval_coco.main(cli(broken, "--benchmark", "vsr", "--output", str(tmp_path / "out")))


# ---------------------------------------------------------------------------------------------
# train.py --eval_benchmarks, compare_runs per benchmark
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(roots, tmp_path_factory, tiny_path):
    """A 1-step tiny run evaluating vg_two_obj, vsr and blink_relation at steps 0 and 1, and a copy of it."""
    import train

    root = tmp_path_factory.mktemp("train")
    objects = mg.builtin_objects()
    for names in (("red circle", "blue square"), ("green triangle", "yellow star")):
        mg.make_grid_images(root / "grid", {n: objects[n] for n in names}, cell=28, sizes=(124,), max_pairs=1,
                            max_images=15, seed=0, progress=False)
    out = root / "run"
    train.main(["--model_name", "tiny", "--train_dir", str(root / "grid"), "--val_json", roots.val_json,
                "--coco_val_dir", roots.coco_val_dir, "--output_dir", str(out), "--batch_size", "6",
                "--protocol", "clean", "--holdout_max_samples", "4", "--eval_max_samples", "6", "--max_steps", "1",
                "--eval_benchmarks", "vg_two_obj", "vsr", "blink_relation", "--whatsup_dir", roots.whatsup_dir,
                "--vsr_dir", roots.vsr_dir, "--hub_dir", roots.hub_dir])
    shutil.copytree(out, root / "copy")
    return out, root / "copy"


def test_train_evaluates_the_named_benchmarks_at_every_step(trained):
    out, _ = trained
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 1]
    for e in evals:
        assert {"coco", "holdout", "vg_two_obj", "vsr", "blink_relation"} <= set(e)
        assert e["blink_relation"]["n"] == 6  # a hub set: its images are bytes in the parquet rows
        assert e["vg_two_obj"]["n"] == 6 and e["vg_two_obj"]["consistency"]["n_pairs"] == 6
        assert "auc" in e["vsr"]
    rows = [json.loads(line) for line in (out / "predictions" / "step-1.jsonl").read_text().splitlines()]
    sets = Counter((r["set"], r.get("order", "asked")) for r in rows)
    assert sets[("vg_two_obj", "asked")] == sets[("vg_two_obj", "swapped")] == 6 and sets[("vsr", "asked")] == 6
    assert sets[("coco", "asked")] == 6  # COCO-Spatial as before


def test_compare_runs_has_tables_and_paired_tests_per_benchmark(trained, tmp_path, capsys):
    import compare_runs

    out, copy = trained
    result = compare_runs.main([str(out), str(copy), "--labels", "a", "b", "--out", str(tmp_path / "cmp")])
    report = (result["out"] / "report.md").read_text()
    for name in ("vg_two_obj", "vsr", "blink_relation"):
        assert f"## {name}: accuracy per evaluation step" in report
        assert f"## {name}: paired statistics" in report
    # the paired test counts the questions as asked (6), not their swapped twins
    vg = report.split("## vg_two_obj: paired statistics")[1].split("##")[0]
    assert "| final | b @1 vs a @1 | 6 |" in vg and "vs a @1 | 12 |" not in vg


def test_train_names_a_missing_benchmark_file_before_the_model_loads(roots, tmp_path, monkeypatch):
    import train

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(models, "load_model_and_processor", no_model)
    grid = tmp_path / "grid"
    objects = mg.builtin_objects()
    mg.make_grid_images(grid, {n: objects[n] for n in ("red circle", "blue square")}, cell=28, sizes=(124,),
                        max_pairs=1, max_images=15, seed=0, progress=False)
    with pytest.raises(SystemExit, match="controlled_a: .*controlled_images_dataset.json not found"):
        train.main(["--model_name", "tiny", "--train_dir", str(grid), "--val_json", roots.val_json,
                    "--coco_val_dir", roots.coco_val_dir, "--output_dir", str(tmp_path / "run"),
                    "--spatial_holdout_frac", "0", "--eval_benchmarks", "controlled_a",
                    "--whatsup_dir", str(tmp_path / "none")])


# ---------------------------------------------------------------------------------------------
# reproduce.py: the benchmarks present are evaluated, a summary row each
# ---------------------------------------------------------------------------------------------

@pytest.mark.fast
def test_reproduce_passes_the_present_benchmarks_to_the_runs_and_summarises_them(tmp_path, monkeypatch):
    import argparse

    import reproduce

    from launchers import Run

    args = argparse.Namespace(model="tiny", train_objects="builtin", cell=None, sizes=None, train_object_names=None,
                              val_json="v.json", coco_val_dir="coco", output_dir=None, ids="ids.pt", train_extra=[],
                              protocol="paper", runs_dir=tmp_path, benchmarks=["vg_two_obj", "vsr"],
                              whatsup_dir="w", vsr_dir="v", launcher="serial", gpus_per_run=0)
    command = reproduce.train_command(args, 0, tmp_path / "baseline_seed0")
    at = command.index("--eval_benchmarks")
    assert command[at:at + 7] == ["--eval_benchmarks", "vg_two_obj", "vsr", "--whatsup_dir", "w", "--vsr_dir", "v"]
    args.benchmarks = []
    assert "--eval_benchmarks" not in reproduce.train_command(args, 1, tmp_path / "baseline_seed1")

    def run_folder(name, arm, weight, seed, accuracies):
        folder = tmp_path / name
        folder.mkdir()
        events = [{"event": "eval", "step": s, "coco": {"accuracy": 0.5}, "vsr": {"accuracy": a}}
                  for s, a in zip((0, 10), accuracies)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
        return Run(name, arm, weight, seed, folder)

    runs = [run_folder("b0", "baseline", None, 0, (0.5, 0.6)), run_folder("b1", "baseline", None, 1, (0.5, 0.7)),
            run_folder("s0", "spatial", 1.0, 0, (0.5, 0.8)), run_folder("s1", "spatial", 1.0, 1, (0.5, 0.9)),
            run_folder("c0", "spatial", 0.0, 0, (0.5, 0.1))]  # the weight-0 control: not the spatial column
    evals = {r.folder: reproduce._evaluations(r.folder) for r in runs}
    args.benchmarks = ["vg_two_obj", "vsr"]  # vg_two_obj: present now, not evaluated by these runs
    table = reproduce.benchmark_table(args, runs, evals)
    assert table.splitlines()[2:] == ["| vsr | 0.500 ± 0.000 | 0.650 ± 0.071 | 0.850 ± 0.071 |"]
    args.benchmarks = ["vg_two_obj"]
    assert reproduce.benchmark_table(args, runs, evals) is None


def test_generation_shares_images_only_where_the_family_can(loaded, monkeypatch):
    """Mllama's generate cannot take precomputed image features: its adapter says so and the
    evaluation encodes per row there (same answers as the plain path); told otherwise, it fails."""
    model, processor, adapter = models.load_model_and_processor("tiny-mllama")
    assert adapter.generate_takes_image_features is False
    samples = loaded["vg_two_obj"][:3]
    _, rows = eval_coco.evaluate_benchmark(model, processor, adapter, samples, batch_size=6, progress=False)
    plain = eval_coco.generate_answers(model, processor, adapter, benchmarks.with_checks(samples), batch_size=6,
                                       progress=False)
    assert [r["generated"] for r in rows] == plain
    monkeypatch.setattr(type(adapter), "generate_takes_image_features", True)
    with pytest.raises(RuntimeError):
        eval_coco.evaluate_benchmark(model, processor, adapter, samples, batch_size=6, progress=False)
