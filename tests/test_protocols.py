"""--protocol paper reproduces the original's method choices: ID derivation (against a loop-based
computation written here from the procedure's description), question wording, batches, and the
provenance checks of ID files. --protocol clean keeps our variant (the other test files run it)."""
import json
import math
import re
import shutil
from collections import defaultdict

import pytest
import torch
from PIL import Image

import data
import derive_spatial_ids as dsi
import make_grid_data as mg
import protocols
import spatial_loss as sl
import train

SIZES = (74, 124, 174, 224)
N_LAYERS = 12  # the tiny model's LM layers: hidden_states 0..12
KEEP_A_CELLS = ("0_0", "2_1")  # a's cells kept per pair: the procedure is the same, the test faster


@pytest.fixture(scope="module")
def extraction_dir(tmp_path_factory):
    """The original's nested layout: 2 object pairs, every size, a at two cells, b everywhere else."""
    out = tmp_path_factory.mktemp("extraction")
    objects = mg.builtin_objects()
    two = {name: objects[name] for name in ("red circle", "blue square")}
    mg.make_grid_images(out, two, cell=28, sizes=SIZES, seed=0, progress=False, file_layout="extraction")
    for cell_dir in out.glob("*/*"):
        if cell_dir.name not in KEEP_A_CELLS:
            shutil.rmtree(cell_dir)
    return out


@pytest.fixture(scope="module")
def paper_ids(extraction_dir, tiny_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ids") / "tiny.pt"
    per_layer, stats = dsi.main(["--model", "tiny", "--images", str(extraction_dir), "--out", str(out),
                                 "--batch_size", "7"])
    return per_layer, stats, out


def test_extraction_layout_is_the_originals(extraction_dir):
    pair_dirs = sorted(p.name for p in extraction_dir.iterdir())
    assert pair_dirs == ["blue square_red circle", "red circle_blue square"]
    files = sorted(p.name for p in (extraction_dir / "red circle_blue square" / "2_1").iterdir())
    assert len(files) == 15 * 4 and "0_0_74.png" in files and "2_1_224.png" not in files
    with Image.open(extraction_dir / "red circle_blue square" / "2_1" / "3_3_224.png") as img:
        assert img.mode == "RGBA"
        assert img.getpixel((0, 0)) == (0, 0, 0, 0)  # transparent, black once converted to RGB
        rgb = img.convert("RGB")
    assert rgb.getpixel((0, 0)) == (0, 0, 0)
    assert rgb.getpixel((2 * 28 + 14, 1 * 28 + 14)) != (0, 0, 0)  # a (red circle) at column 2, row 1
    assert rgb.getpixel((3 * 28 + 14, 3 * 28 + 14)) != (0, 0, 0)  # b at column 3, row 3

    items, kind, skipped = data.read_extraction_set(extraction_dir)
    assert kind == "nested" and not skipped and len(items) == 2 * 2 * 15 * 4
    path, layout = next((p, lay) for p, lay in items if p.name == "3_3_224.png" and p.parent.name == "2_1"
                        and p.parent.parent.name == "red circle_blue square")
    assert layout == data.GridLayout("red circle", (2, 1), "blue square", (3, 3), 224)


def _original_procedure(extraction_dir, model, processor):
    """The original procedure as described, one image at a time: query 'Is {b} to the left or right
    of {a}?', the first occurrence of the last sub-token of ' ' + b, every layer; centre over all
    of b's cells and sizes per (pair, a's cell); mean over a's cells, then over pairs."""
    tokenizer = processor.tokenizer
    per_pair = {}
    for pair_dir in sorted(extraction_dir.iterdir()):
        a, b = pair_dir.name.split("_")
        token = tokenizer.tokenize(" " + b)[-1]
        per_a_cell = []
        for cell_dir in sorted(pair_dir.iterdir()):
            states = {}
            for image_path in sorted(cell_dir.iterdir()):
                bx, by, size = map(int, re.match(r"(\d+)_(\d+)_(\d+)\.png", image_path.name).groups())
                messages = [{"role": "user", "content": [
                    {"type": "image"}, {"type": "text", "text": f"Is {b} to the left or right of {a}?"}]}]
                text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                image = Image.open(image_path).convert("RGB")
                inputs = processor(text=[text], images=[image], return_tensors="pt")
                with torch.no_grad():
                    hidden = model(**inputs, output_hidden_states=True).hidden_states
                position = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist()).index(token)
                states[(bx, by, size)] = torch.stack([h[0, position] for h in hidden]).float()
            mean = torch.stack(list(states.values())).mean(0)
            per_a_cell.append({loc: state - mean for loc, state in states.items()})
        locs = {loc for cell in per_a_cell for loc in cell}
        per_pair[pair_dir.name] = {loc: torch.stack([c[loc] for c in per_a_cell if loc in c]).mean(0) for loc in locs}
    locs = {loc for pair in per_pair.values() for loc in pair}
    return {loc: torch.stack([p[loc] for p in per_pair.values() if loc in p]).mean(0) for loc in locs}


def test_paper_ids_equal_the_original_procedure(paper_ids, extraction_dir, tiny):
    per_layer, stats, out = paper_ids
    model, processor, _ = tiny
    expected = _original_procedure(extraction_dir, model, processor)
    assert len(expected) == 16 * 4  # every cell at every size (b never sits on a's cell, a moves)
    saved = torch.load(out, map_location="cpu", weights_only=True)
    assert sorted(saved) == list(range(N_LAYERS + 1))
    for layer in range(N_LAYERS + 1):
        assert set(saved[layer]["universal"]) == set(expected)
        scale = max(v[layer].abs().max().item() for v in expected.values())
        for loc, states in expected.items():
            torch.testing.assert_close(saved[layer]["universal"][loc], states[layer], rtol=1e-4,
                                       atol=1e-4 * scale + 1e-6, msg=f"layer {layer}, cell {loc}")
    assert stats["pairs"] == 2 and stats["groups"] == 4 and stats["images"] == 240


def test_paper_ids_differ_from_the_clean_recipe(paper_ids, extraction_dir, tiny_path, tmp_path):
    """The check above can fail: the clean recipe (other query, other token, other centring) over
    the same images gives other IDs."""
    per_layer, _, _ = paper_ids
    clean, _ = dsi.main(["--model", "tiny", "--images", str(extraction_dir), "--out", str(tmp_path / "c.pt"),
                         "--id_recipe", "clean"])
    key = next(k for k in clean[11] if k in per_layer[11])
    assert not torch.allclose(clean[11][key], per_layer[11][key], rtol=1e-2, atol=1e-4)


def test_provenance_says_how_the_ids_were_made(paper_ids, extraction_dir):
    _, _, out = paper_ids
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["model"] == "tiny" and info["model_type"] == "qwen2_vl"
    assert info["protocol"] == "paper" and info["choices"] == {"id_recipe": "paper", "train_question_style": "paper"}
    assert info["images"] == str(extraction_dir.resolve()) and info["layout"] == "nested"
    assert sorted(map(tuple, info["object_pairs"])) == [("blue square", "red circle"), ("red circle", "blue square")]
    assert info["template"] == "Is {b} to the left or right of {a}?"
    assert "first occurrence" in info["token_rule"]
    assert info["layers"] == list(range(N_LAYERS + 1))
    assert info["counts"]["images"] == 240 and len(info["git_commit"]) == 40


def test_existing_out_is_refused_without_overwrite(paper_ids, extraction_dir, capsys):
    _, _, out = paper_ids
    before = out.read_bytes()
    with pytest.raises(SystemExit) as info:
        dsi.main(["--model", "tiny", "--images", str(extraction_dir), "--out", str(out)])
    assert info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before


# ---------------------------------------------------------------------------------------------
# Questions
# ---------------------------------------------------------------------------------------------

@pytest.mark.fast
def test_paper_training_question_uses_bare_names(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "camel_1-2_frog_3-0.png")
    paper = data.GridDataset(tmp_path, "paper").samples
    assert [s["question"] for s in paper if s["qtype"] == "lr"] == [
        'Is camel to the left or right of frog? Answer with "left" or "right" only.']
    assert [s["question"] for s in paper if s["qtype"] == "ab"] == [
        'Is camel above or below frog? Answer with "above" or "below" only.']
    clean = data.GridDataset(tmp_path, "clean").samples
    assert clean[0]["question"].startswith("Is the camel to the left or right of the frog?")
    # the protocol, not the library default, decides what train.py asks
    assert train.parse_args(["--train_dir", str(tmp_path)]).train_question_style == "paper"
    assert train.parse_args(["--protocol", "clean"]).train_question_style == "clean"
    assert train.parse_args(["--train_question_style", "clean"]).train_question_style == "clean"


# The original's COCO parsing, written out here from its description: x keeps its article;
# left/right keeps y's article; above/below drops a leading "the " or "a " from y.
_ORIGINAL_PATTERNS = [
    re.compile(r"^.*?\bphoto of\b\s*(.+?)\s+to the\s+(left|right)\s+of\s+(.+?)[\.\s]*$", re.IGNORECASE),
    re.compile(r"^.*?\bphoto of\b\s*(.+?)\s+(above|below)\s+(?:the\s+|a\s+)?(.+?)[\.\s]*$", re.IGNORECASE),
]


def _original_coco_question(caption):
    for pattern in _ORIGINAL_PATTERNS:
        m = pattern.match(caption.strip())
        if m:
            x, rel, y = m.group(1).strip(), m.group(2).lower(), m.group(3).strip()
            if rel in ("left", "right"):
                return f'Is {x} to the left or right of {y}? Answer with "left" or "right" only.'
            return f'Is {x} above or below {y}? Answer with "above" or "below" only.'
    raise ValueError(caption)


@pytest.mark.fast
def test_paper_coco_questions_equal_the_originals(tmp_path):
    captions = ["A photo of a dog to the left of a chair", "A photo of an elephant above a potted plant",
                "A photo of a cat below the dining table", "A photo of a bus to the right of an apple"]
    rows = [[i + 1, caption, caption] for i, caption in enumerate(captions)]
    (tmp_path / "coco.json").write_text(json.dumps(rows))
    for i in range(len(rows)):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i + 1:012d}.jpg")
    paper = data.load_coco_spatial(tmp_path / "coco.json", tmp_path, "paper")
    assert [s["question"] for s in paper] == [_original_coco_question(c) for c in captions]
    assert paper[0]["question"] == 'Is a dog to the left or right of a chair? Answer with "left" or "right" only.'
    assert paper[1]["question"] == 'Is an elephant above or below potted plant? Answer with "above" or "below" only.'
    clean = data.load_coco_spatial(tmp_path / "coco.json", tmp_path, "clean")
    assert clean[1]["question"] == 'Is the elephant above or below the potted plant? Answer with "above" or "below" only.'


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def original_named(tmp_path_factory):
    """A 4x4 folder in the original's file names: 6 ordered pairs, every cell pair."""
    out = tmp_path_factory.mktemp("original_named")
    mg.make_grid_images(out, mg.builtin_objects(64), cell=8, sizes=(224,), max_pairs=6, seed=0, progress=False,
                        file_layout="original")
    return out


def _sampler_for(folder, *extra):
    args = train.parse_args(["--train_dir", str(folder), "--spatial_holdout_frac", "0", *extra])
    samples = data.GridDataset(folder, args.train_question_style).samples
    sampler = data.make_batch_sampler(args.sampler, samples, range(len(samples)), args.batch_size, args.seed)
    return args, samples, sampler


def test_paper_baseline_batches_are_a_plain_shuffle_of_15(original_named):
    args, samples, sampler = _sampler_for(original_named)
    assert (args.sampler, args.batch_size) == ("shuffle", 15)
    batches = list(sampler)
    assert len(sampler) == len(batches) == math.ceil(len(samples) / 15)
    assert sorted(i for b in batches for i in b) == list(range(len(samples)))
    mixing = [b for b in batches if len({(samples[i]["obj1"], samples[i]["obj2"]) for i in b}) > 1]
    assert len(mixing) > len(batches) // 2


@pytest.mark.fast
def test_paper_spatial_batches_share_obj1_cell_obj2_and_mix_question_types(original_named):
    args, samples, sampler = _sampler_for(original_named, "--universal_id_path", "ids.pt")
    assert args.sampler == "obj1_groups"
    batches = list(sampler)
    assert len(sampler) == len(batches)
    for batch in batches:
        assert len({data.obj1_group_key(samples[i]) for i in batch}) == 1
    assert all({samples[i]["qtype"] for i in b} == {"lr", "ab"} for b in batches if len(b) == 15)
    # each (obj1, cell, obj2) group holds 24 questions (12 left/right + 12 above/below): 15 + 9
    assert sorted({len(b) for b in batches}) == [9, 15]
    assert len(batches) == 2 * len({data.obj1_group_key(s) for s in samples})
    # a group's batches come one after the other, as the original's sampler gave them
    keys = [data.obj1_group_key(samples[b[0]]) for b in batches]
    assert all(keys[i] == keys[i + 1] for i in range(0, len(keys), 2))


@pytest.mark.fast
def test_clean_batches_are_todays_grouped_batches(original_named):
    args, samples, sampler = _sampler_for(original_named, "--protocol", "clean", "--universal_id_path", "ids.pt")
    assert args.sampler == "grouped" and isinstance(sampler, data.GroupedBatchSampler)
    assert all(len({data.group_key(samples[i]) for i in b}) == 1 for b in sampler)


@pytest.mark.fast
def test_a_flag_overrides_the_protocol():
    args = train.parse_args(["--sampler", "grouped", "--question_style", "clean"])
    assert (args.protocol, args.sampler, args.question_style) == ("paper", "grouped", "clean")
    assert args.protocol_choices["sampler"] == "grouped"
    assert args.protocol_choices["train_question_style"] == "paper"


@pytest.mark.fast
def test_shuffled_batches_cannot_carry_the_spatial_loss(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--universal_id_path", "ids.pt", "--sampler", "shuffle"])
    assert "--sampler" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Runs: config.json and ID provenance
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_run_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_data")
    mg.make_grid_images(root / "grid", mg.builtin_objects(64), cell=16, sizes=(124,), max_pairs=4, seed=0,
                        progress=False)
    json_path = mg.make_coco_standin(root / "coco", mg.builtin_objects(64), n=4, image_size=64, seed=0)
    return root / "grid", json_path, root / "coco"


def _run_args(run_data, out, *extra):
    grid, json_path, coco = run_data
    return ["--model_name", "tiny", "--train_dir", str(grid), "--val_json", str(json_path), "--coco_val_dir",
            str(coco), "--output_dir", str(out), "--batch_size", "6", "--eval_max_samples", "2",
            "--holdout_max_samples", "2", "--eval_save_steps", "1000", *extra]


def test_config_lists_the_protocol_and_every_resolved_choice(small_run_data, tmp_path, tiny_path):
    out = tmp_path / "run"
    train.main(_run_args(small_run_data, out, "--max_steps", "1"))
    config = json.loads((out / "config.json").read_text())
    assert config["protocol"] == "paper"
    expected = {name: protocols.default(name, "paper", "baseline") for name in protocols.CHOICES
                if name in config["args"] and name != "id_recipe"}
    assert {"train_question_style", "question_style", "sampler"} <= set(expected)
    assert config["protocol_choices"] == expected
    for name, value in expected.items():
        assert config["args"][name] == value


def _ids_with_provenance(path, model, pairs=()):
    ids = {layer: {(c, r, 124): torch.randn(64) for c in range(4) for r in range(4)} for layer in (11,)}
    sl.save_universal_ids(path, ids)
    sl.write_provenance(path, {"model": model, "object_pairs": [list(p) for p in pairs]})
    return path


@pytest.mark.fast
def test_ids_of_another_model_stop_the_run_before_the_model_loads(small_run_data, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(train, "load_model_and_processor", no_model)
    ids = _ids_with_provenance(tmp_path / "qwen.pt", "qwen2-2b")
    with pytest.raises(SystemExit) as info:
        train.main(_run_args(small_run_data, tmp_path / "run", "--universal_id_path", str(ids)))
    message = str(info.value.code)
    assert "'qwen2-2b'" in message and "'tiny'" in message and str(ids) in message
    assert not (tmp_path / "run").exists()


class _ModelWouldLoad(Exception):
    pass


def _model_reached(*args, **kwargs):
    raise _ModelWouldLoad


def test_ids_of_this_model_pass_and_holdout_overlap_is_named(small_run_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "load_model_and_processor", _model_reached)
    args = train.parse_args(_run_args(small_run_data, tmp_path / "run", "--universal_id_path", "x"))
    grid = data.GridDataset(args.train_dir, args.train_question_style)
    _, holdout_idx = data.split_holdout(grid.samples, args.spatial_holdout_frac, args.seed)
    held = grid.samples[holdout_idx[0]]
    ids = _ids_with_provenance(tmp_path / "tiny.pt", "tiny", [(held["obj1"], held["obj2"])])
    with pytest.raises(_ModelWouldLoad):
        train.main(_run_args(small_run_data, tmp_path / "run", "--universal_id_path", str(ids)))
    out = capsys.readouterr().out
    assert "holdout pairs were among the pairs" in out and held["obj1"] in out and held["obj2"] in out
    with pytest.raises(_ModelWouldLoad):
        train.main(_run_args(small_run_data, tmp_path / "run", "--universal_id_path", str(ids),
                             "--allow_holdout_in_ids"))
    assert "holdout pairs" not in capsys.readouterr().out


@pytest.mark.fast
def test_ids_without_provenance_warn(small_run_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "load_model_and_processor", _model_reached)
    ids = _ids_with_provenance(tmp_path / "old.pt", "tiny")
    ids.with_suffix(".json").unlink()
    with pytest.raises(_ModelWouldLoad):
        train.main(_run_args(small_run_data, tmp_path / "run", "--universal_id_path", str(ids)))
    assert "no provenance file" in capsys.readouterr().out
