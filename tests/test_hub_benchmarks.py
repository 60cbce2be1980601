"""The hub's multiple-choice sets (CV-Bench's three, BLINK's two, EmbSpatial-Bench, 3DSRBench):
each reader on a file written in its released schema (parquet rows, images as {bytes, path}
structs, 3DSRBench's images in its zip), letters mapped to the released choices, a malformed row
named in one line, the released row count checked, missing files named with the command that
fetches them, the fetch itself against a stand-in of the hub on 127.0.0.1 (the library's own
HF_ENDPOINT), and an evaluation whose images never touch the disk."""
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

import benchmarks
import data
import eval_coco
import scoring
import make_grid_data as mg

N = 12
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    return mg.make_benchmark_standins(tmp_path_factory.mktemp("hub"), mg.builtin_objects(48), n=N, image_size=48,
                                      names=benchmarks.HUB_NAMES)


@pytest.fixture(scope="module")
def loaded(roots):
    return {name: benchmarks.load(name, roots) for name in benchmarks.HUB_NAMES}


def released_rows(roots, name):
    path = benchmarks.hub_path(benchmarks.BENCHMARKS[name].hub[0], roots)
    rows = pq.read_table(path).to_pylist()
    return path, rows


def copy_hub(roots, tmp_path):
    shutil.copytree(roots.hub_dir, tmp_path / "hub")
    return benchmarks.DataRoots(hub_dir=str(tmp_path / "hub"))


@pytest.mark.fast
@pytest.mark.parametrize("name", benchmarks.HUB_NAMES)
def test_each_reader_maps_letters_to_the_released_choices(name, roots, loaded):
    samples = loaded[name]
    path, rows = released_rows(roots, name)
    bench = benchmarks.BENCHMARKS[name]
    assert len(samples) == N
    for s in samples:
        row = rows[s["row"]]
        if bench.subset:
            assert row["task"] == bench.subset  # CV-Bench: only its own task's rows of the shared file
        released = {"cvbench": ("choices", "answer"), "blink": ("choices", "answer"),
                    "embspatial": ("answer_options", "answer")}.get(name.split("_")[0])
        if released:
            choices, gold = row[released[0]], row[released[1]]
        else:  # 3DSRBench: columns A-D, the unused ones empty
            choices, gold = [row[c] for c in "ABCD" if row[c]], row["answer"]
        assert s["choices"] == tuple(choices) and s["options"] == benchmarks.LETTERS[:len(choices)]
        assert s["released_answer"] == gold  # kept as released: "(A)", an index, "A"
        index = gold if isinstance(gold, int) else "ABCD".index(gold.strip("()"))
        assert s["answer"] == "ABCD"[index] and s["choices"][index] == choices[index]
        for letter, choice in zip(s["options"], s["choices"]):
            assert f"({letter}) {choice}" in s["question"]
        assert isinstance(s["image"], bytes) and not Path(s["image_path"]).exists()
        assert s["image_path"].endswith(hashlib.sha1(s["image"]).hexdigest()[:16])
        assert data.load_image(s["image"]).size == (48, 48)
        assert s["question"][slice(*s["obj2_span"])] == s["obj2"]
    assert {s["answer"] for s in samples} == set(samples[0]["options"]) or name in ("embspatial", "3dsrbench")


@pytest.mark.fast
def test_mirror_and_relation_fields(loaded):
    """What mirror consistency needs: the gold under a left-right mirror where the row says it."""
    for s in loaded["cvbench_relation"]:
        flips = s["relation"] in ("left", "right")
        other = [o for o in s["options"] if o != s["answer"]][0]
        assert s["mirror_answer"] == (other if flips else s["answer"])
    for s in loaded["blink_relation"]:
        assert s["relation"] in ("left", "right", "above", "below")
        assert (s["mirror_answer"] != s["answer"]) == (s["relation"] in ("left", "right"))
    assert all(s["mirror_answer"] == s["answer"] for s in loaded["cvbench_depth"] + loaded["blink_depth"])
    assert {s["relation"] for s in loaded["cvbench_distance"]} == {"SUNRGBD"}  # per source data set
    assert [s["mirror_answer"] is None for s in loaded["embspatial"]] == [
        s["relation"] in ("left", "right") for s in loaded["embspatial"]]
    assert all(s["reading"] for name in benchmarks.HUB_NAMES for s in loaded[name])


@pytest.mark.fast
def test_rotating_moves_the_choices_and_the_gold_letter(loaded):
    s = loaded["embspatial"][1]
    gold_text = s["choices"]["ABCD".index(s["answer"])]
    for k in range(1, 4):
        r = benchmarks.rotated(s, k)
        assert r["choices"] == s["choices"][k:] + s["choices"][:k] and r["options"] == s["options"]
        assert r["choices"]["ABCD".index(r["answer"])] == gold_text and r["rotation"] == k
        assert f"(A) {r['choices'][0]}" in r["question"]
    assert len(benchmarks.with_checks(loaded["embspatial"], option_orders=4, mirror=False)) == 4 * N
    assert benchmarks.with_checks(loaded["blink_relation"], mirror=False) == loaded["blink_relation"]  # no swapped twin


BREAK = {  # benchmark -> (how its row 3 is broken, the message's tail)
    "cvbench_relation": (lambda r: dict(r, answer="(E)"), r"gold answer '\(E\)' is not one of the letters A, B"),
    "blink_relation": (lambda r: dict(r, image_2=r["image_1"]), "has image_2: the question shows several images"),
    "blink_depth": (lambda r: dict(r, image_1={"bytes": None, "path": "x.png"}), "column 'image_1' holds no image"),
    "embspatial": (lambda r: dict(r, answer=7), "gold answer 7 is not an index into its 4 answer_options"),
    "3dsrbench": (lambda r: dict(r, C=None), r"gold answer 'D' is not one of the letters A, B$"),  # C empty: 2 used
}


@pytest.mark.fast
@pytest.mark.parametrize("name", sorted(BREAK))
def test_a_malformed_row_is_named_in_one_line(name, roots, tmp_path):
    roots = copy_hub(roots, tmp_path)
    path, rows = released_rows(roots, name)
    file_row = benchmarks.load(name, roots)[3]["row"]
    breaker, message = BREAK[name]
    rows[file_row] = breaker(rows[file_row])
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(benchmarks.BenchmarkFormatError, match=rf"{path.name}: row {file_row}: .*{message}") as err:
        benchmarks.load(name, roots)
    assert len(str(err.value)) < 300 and "\n" not in str(err.value)


@pytest.mark.fast
def test_a_missing_column_and_a_row_count_are_checked(roots, tmp_path, capsys):
    roots = copy_hub(roots, tmp_path)
    path, rows = released_rows(roots, "embspatial")
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "relation"} for r in rows]), path)
    with pytest.raises(benchmarks.BenchmarkFormatError, match=r"test-00000-of-00001.parquet: no column 'relation' "
                                                               r"\(it has question_id, question"):
        benchmarks.load("embspatial", roots)
    capsys.readouterr()
    benchmarks.load("blink_depth", roots)
    warning = capsys.readouterr().err.strip().splitlines()
    assert warning == [f"warning: {benchmarks.hub_path(benchmarks.BLINK_DEPTH, roots)}: {N} blink_depth rows, the "
                       "pinned release has 124"]


@pytest.mark.fast
def test_images_missing_from_3dsrbenchs_archive_are_counted(roots, tmp_path):
    roots = copy_hub(roots, tmp_path)
    path, rows = released_rows(roots, "3dsrbench")
    for k in (2, 3, 7):
        rows[k] = dict(rows[k], image_url=f"http://images.cocodataset.org/train2017/{k:012d}.jpg")
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(FileNotFoundError, match=rf"coco_images.zip: 3 of the {N} images of 3dsrbench are missing "
                                                r"\(first: 000000000002.jpg\)$"):
        benchmarks.load("3dsrbench", roots)


@pytest.mark.fast
def test_an_unreadable_image_is_left_out_and_named(roots, tmp_path):
    roots = copy_hub(roots, tmp_path)
    path, rows = released_rows(roots, "blink_relation")
    rows[5] = dict(rows[5], image_1={"bytes": rows[5]["image_1"]["bytes"][:-40], "path": None})  # truncated
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(ValueError, match=r"row 5: image val-00000-of-00001.parquet#sha1=\w+ cannot be read \(truncated\)"):
        benchmarks.load("blink_relation", roots)
    unreadable = []
    assert len(benchmarks.load("blink_relation", roots, unreadable=unreadable)) == N - 1
    assert [(row, why) for row, _, why in unreadable] == [(5, "truncated")]


@pytest.mark.fast
def test_missing_hub_files_are_one_line_each_with_the_command_that_fetches_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))  # read per call by try_to_load_from_cache
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    lines = benchmarks.missing_files(benchmarks.HUB_NAMES, benchmarks.DataRoots(), fetch_missing=True)
    assert len(lines) == 8  # 3DSRBench: its annotations and its image archive
    assert lines[0] == ("cvbench_relation: test.parquet of nyu-visionx/CV-Bench (revision 22409a927a) is not in the hub "
                        "cache and HF_HUB_OFFLINE=1; fetch it with: hf download nyu-visionx/CV-Bench test.parquet "
                        "--repo-type dataset --revision 22409a927ab5cf68e3655023d51694587455fc99")
    assert lines[-1].startswith("3dsrbench: coco_images.zip of ccvl/3DSRBench")
    local = benchmarks.missing_files(["blink_depth"], benchmarks.DataRoots(hub_dir=str(tmp_path / "h")))
    assert local == [f"blink_depth: {tmp_path / 'h/BLINK-Benchmark/BLINK/Relative_Depth/val-00000-of-00001.parquet'} "
                     f"not found; get it with: hf download BLINK-Benchmark/BLINK Relative_Depth/val-00000-of-00001.parquet"
                     f" --repo-type dataset --revision {benchmarks.BLINK_DEPTH.revision} --local-dir "
                     f"{tmp_path / 'h/BLINK-Benchmark/BLINK'}"]


class FakeHub(BaseHTTPRequestHandler):
    """The hub's resolve URLs for the files in `self.server.files` ({url path: bytes})."""

    def do_HEAD(self):
        self.answer(body=False)

    def do_GET(self):
        self.answer(body=True)

    def answer(self, body):
        self.server.requests.append((self.command, self.path))
        content = self.server.files.get(self.path.split("?")[0])
        if content is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", self.server.commit)
        self.send_header("ETag", '"' + hashlib.sha256(content).hexdigest() + '"')
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if body:
            self.wfile.write(content)

    def log_message(self, *args):
        pass


def test_a_missing_file_is_fetched_into_the_hub_cache(roots, tmp_path):
    """eval_coco's check (benchmarks.missing_files(fetch_missing=True)) in a process of its own
    whose huggingface_hub talks to a stand-in hub on 127.0.0.1 (HF_ENDPOINT); the file lands in
    the hub cache at its pinned revision and loads from there."""
    hub = benchmarks.BLINK_DEPTH
    content = (Path(roots.hub_dir) / hub.repo_id / hub.filename).read_bytes()
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.files = {f"/datasets/{hub.repo_id}/resolve/{hub.revision}/{hub.filename}": content}
    server.commit, server.requests = hub.revision, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}", HF_HUB_OFFLINE="0",
               HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1")
    env.pop("HF_HUB_CACHE", None)
    script = ("import benchmarks, json; roots = benchmarks.DataRoots();"
              "print(json.dumps([benchmarks.missing_files(['blink_depth', 'embspatial'], roots, fetch_missing=True),"
              " str(benchmarks.hub_path(benchmarks.BLINK_DEPTH, roots)), len(benchmarks.load('blink_depth', roots))]))")
    try:
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr[-2000:]
    lines, path, count = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(path).read_bytes() == content and count == N
    assert Path(path).is_relative_to(tmp_path / "hf" / "hub") and f"snapshots/{hub.revision}/" in path
    assert len(lines) == 1 and lines[0].startswith("embspatial: data/test-00000-of-00001.parquet of "
                                                   "FlagEval/EmbSpatial-Bench (revision 3c0e6b34b6) could not be fetched")
    assert lines[0].endswith(benchmarks.EMBSPATIAL.fetch_command()) and "\n" not in lines[0]
    assert ("GET", f"/datasets/{hub.repo_id}/resolve/{hub.revision}/{hub.filename}") in server.requests


@pytest.mark.fast
@pytest.mark.parametrize("text, expected", [("B", ("B", "ok")), ("(A) left", ("A", "ok")), ("C.", ("C", "ok")),
                                            ("B is a chair", ("B", "ok")), ("B or A", ("", "several")),
                                            ("The answer is B", ("B", "ok")), ("b", ("", "unparseable")),
                                            ("A chair", ("A", "ok")), ("a chair", ("", "unparseable"))])
def test_lettered_answers_read_strictly(text, expected):
    """Letters as written, after the strict reading's leading phrases (scoring.LEADING_PHRASES)."""
    assert scoring.read_strict(text, ("A", "B", "C", "D")) == expected


@pytest.mark.fast
@pytest.mark.parametrize("text, expected", [("B", "B"), ("(C) the chair", "C"), (" B.", "B"), ("The answer is B", ""),
                                            ("b", ""), ("E", "")])
def test_lettered_answers_read_the_harness_way(text, expected):
    """The second reading of a lettered set is lmms-eval's: the letter at the answer's start."""
    assert scoring.read_substring(text, ("A", "B", "C", "D"), gold="B")[0] == expected


def test_evaluation_keeps_images_in_memory_and_rows_json(loaded, sensitive, tmp_path, monkeypatch):
    """A hub set through evaluate_benchmark with its option rotations: no image is read from a
    path (data.load_image sees bytes only), every distinct image is encoded once per batch, the
    prediction rows are JSON and name each image by its content."""
    model, processor, adapter = sensitive
    paths = []
    original = data.load_image
    monkeypatch.setattr(data, "load_image", lambda source: paths.append(source) or original(source))
    samples = loaded["embspatial"][:6]
    report, rows = eval_coco.evaluate_benchmark(model, processor, adapter, samples, batch_size=8, mode="score",
                                                option_orders=2, progress=False, mirror=False)
    assert paths and all(isinstance(p, bytes) for p in paths)
    assert len(rows) == 12 and report["n"] == 6 and "option_order" in report
    json.dumps(rows)
    assert {r["image_path"] for r in rows} == {s["image_path"] for s in samples}
    assert set(report["per_relation"]) == {s["relation"] for s in samples}
    by_question = {(r["row"], r["rotation"]): r for r in rows}
    for s in samples:
        assert by_question[(s["row"], 1)]["answer"] == benchmarks.rotated(s, 1)["answer"]


def test_the_mirrored_twin_of_a_choice_question_expects_its_letter_under_the_mirror(loaded, sensitive):
    """A hub question whose row says its gold under a left-right mirror is also asked of the
    mirrored image (its bytes flipped in memory): CV-Bench's left/right questions expect the other
    choice's letter, the others the same one, and the report's mirror consistency reads the
    letters that way (computed here by hand); EmbSpatial's left/right rows, which do not say, get
    no twin."""
    model, processor, adapter = sensitive
    samples = loaded["cvbench_relation"][:6]
    twins = [q for q in benchmarks.with_checks(samples, consistency=False) if q["order"] == "mirrored"]
    assert [t["row"] for t in twins] == [s["row"] for s in samples]
    for s, t in zip(samples, twins):
        assert t["answer"] == s["mirror_answer"] and (t["answer"] != s["answer"]) == (s["relation"] in ("left", "right"))
        with Image.open(io.BytesIO(s["image"])) as original:
            assert t["image"]().tobytes() == ImageOps.mirror(original.convert("RGB")).tobytes()
    assert not any(s["relation"] in ("left", "right") and q["order"] == "mirrored"
                   for s in loaded["embspatial"] for q in benchmarks.with_checks([s], consistency=False))

    report, rows = eval_coco.evaluate_benchmark(model, processor, adapter, samples, batch_size=8, mode="score",
                                                progress=False)
    asked = {r["row"]: r for r in rows if r["order"] == "asked"}
    mirrored = {r["row"]: r for r in rows if r["order"] == "mirrored"}
    letters = {s["row"]: {s["answer"]: s["mirror_answer"], s["mirror_answer"]: s["answer"]} for s in samples}
    by_hand = sum(mirrored[row]["prediction"] == letters[row].get(a["prediction"], a["prediction"])
                  for row, a in asked.items()) / len(samples)
    assert report["mirror_consistency"]["n_pairs"] == len(samples)
    assert report["mirror_consistency"]["consistent"] == pytest.approx(by_hand)


@pytest.mark.fast
def test_cli_names_missing_hub_files_before_the_model_loads(tmp_path, model_must_not_load):
    with pytest.raises(SystemExit) as err:
        eval_coco.main(["--ckpt", "tiny", "--benchmark", "blink_depth", "3dsrbench", "--hub_dir", str(tmp_path / "h"),
                        "--output", str(tmp_path / "out")])
    lines = str(err.value.code).splitlines()
    assert lines[0] == "error: missing benchmark files:" and len(lines) == 4  # 3DSRBench: parquet and zip
    assert [line.split(":")[0] for line in lines[1:]] == ["blink_depth", "3dsrbench", "3dsrbench"]
    assert all("; get it with: hf download " in line for line in lines[1:])


@pytest.mark.fast
def test_reproduce_hands_the_hub_folder_to_its_runs(tmp_path):
    import argparse

    import reproduce

    args = argparse.Namespace(model="tiny", train_objects="builtin", cell=None, sizes=None, train_object_names=None,
                              val_json="v.json", coco_val_dir="coco", output_dir=None, ids="ids.pt", train_extra=[],
                              protocol="paper", runs_dir=tmp_path, benchmarks=["embspatial"], whatsup_dir="w",
                              vsr_dir="v", hub_dir="hub", launcher="serial", gpus_per_run=0)
    command = reproduce.train_command(args, 0, tmp_path / "baseline_seed0")
    at = command.index("--eval_benchmarks")
    assert command[at:at + 8] == ["--eval_benchmarks", "embspatial", "--whatsup_dir", "w", "--vsr_dir", "v",
                                  "--hub_dir", "hub"]
