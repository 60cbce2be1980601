import json

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import GridLayout


def _png(path, size=112):
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


# --- file names ------------------------------------------------------------------------------

@pytest.mark.fast
def test_our_name_round_trips_multi_word_names():
    layout = GridLayout("teddy bear", (0, 3), "red circle", (2, 1), size=124, variant=2)
    name = data.format_grid_name(layout)
    assert name == "teddy_bear__c0r3__red_circle__c2r1__s124__v2.png"
    assert data.parse_grid_name(name) == layout
    plain = GridLayout("dog", (1, 1), "potted plant", (3, 0), size=74)
    assert data.parse_grid_name(data.format_grid_name(plain)) == plain


@pytest.mark.fast
def test_original_name_form_is_read_with_default_size():
    layout = data.parse_grid_name("frog_0-2_camel_3-1.png")
    assert layout == GridLayout("frog", (0, 2), "camel", (3, 1), size=224)
    multi = data.parse_grid_name("teddy bear_1-0_fire hydrant_1-3.png")
    assert (multi.obj1, multi.cell1, multi.obj2, multi.cell2) == ("teddy bear", (1, 0), "fire hydrant", (1, 3))


@pytest.mark.fast
@pytest.mark.parametrize("name", [
    "frog.png", "frog_0-2.png", "a__c0r0__b__c1r1.png", "a__c0r0__b__c1r1__sX.png",
    "a__c0r0__b__c1r1__s74.jpg", "readme.txt", "__c0r0__b__c1r1__s74.png",
])
def test_unparseable_names(name):
    assert data.parse_grid_name(name) is None


@pytest.mark.fast
def test_bad_object_names_are_refused():
    for bad in ["", " dog", "dog ", "hot  dog", "snake_case", "a/b"]:
        with pytest.raises(ValueError):
            data.format_grid_name(GridLayout(bad, (0, 0), "cat", (1, 1)))


# --- training set ----------------------------------------------------------------------------

@pytest.mark.fast
def test_questions_and_answers_follow_columns_and_rows():
    qs = dict(data.questions_for_layout(GridLayout("a", (0, 3), "b", (2, 1))))
    assert qs == {"lr": "left", "ab": "below"}  # smaller column = left; larger row = lower
    qs = dict(data.questions_for_layout(GridLayout("a", (3, 0), "b", (3, 2))))
    assert qs == {"ab": "above"}
    q, (start, end) = data.make_question("lr", "frog", "teddy bear")
    assert q == 'Is the frog to the left or right of the teddy bear? Answer with "left" or "right" only.'
    assert q[start:end] == "the teddy bear"


@pytest.mark.fast
def test_grid_dataset_counts_and_reports_unparseable(tmp_path):
    _png(tmp_path / data.format_grid_name(GridLayout("red circle", (0, 0), "dog", (1, 1), size=74)))
    _png(tmp_path / "frog_0-0_camel_0-2.png")
    _png(tmp_path / "holiday photo.png")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = data.GridDataset(tmp_path)
    assert ds.n_images == 2 and len(ds) == 3  # 2 questions + 1 (same column: above/below only)
    assert ds.unparseable == ["holiday photo.png"]
    assert "skipped 1 unparseable" in ds.report() and "holiday photo.png" in ds.report()
    answers = sorted((s["obj1"], s["qtype"], s["answer"]) for s in ds.samples)
    assert answers == [("frog", "ab", "above"), ("red circle", "ab", "above"), ("red circle", "lr", "left")]


@pytest.mark.fast
def test_grid_dataset_without_usable_images_names_the_folder(tmp_path):
    _png(tmp_path / "unrelated.png")
    with pytest.raises(ValueError, match=str(tmp_path)):
        data.GridDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope"):
        data.GridDataset(tmp_path / "nope")


def _fake_samples(objects, cells, size=124):
    samples = []
    for a in objects:
        for b in objects:
            if a == b:
                continue
            for c1 in cells:
                for c2 in cells:
                    if c1 == c2:
                        continue
                    layout = GridLayout(a, c1, b, c2, size)
                    for qtype, answer in data.questions_for_layout(layout):
                        samples.append(data.sample_record("x.png", qtype, answer, a, b, cell1=c1, cell2=c2, size=size))
    return samples


@pytest.mark.fast
def test_holdout_split_keeps_both_orders_of_a_pair_together():
    samples = _fake_samples(["a", "b", "c", "d", "e"], [(0, 0), (1, 1), (2, 0)])
    train, holdout = data.split_holdout(samples, 0.3, seed=1)
    assert sorted(train + holdout) == list(range(len(samples)))
    pairs = lambda idx: {frozenset((samples[i]["obj1"], samples[i]["obj2"])) for i in idx}
    assert pairs(train).isdisjoint(pairs(holdout))
    assert len(pairs(holdout)) == 3  # round(10 unordered pairs * 0.3)
    assert data.split_holdout(samples, 0.3, seed=1) == (train, holdout)
    assert data.split_holdout(samples, 0.0)[1] == []


@pytest.mark.fast
def test_grouped_sampler_batches_share_obj1_cell_size_and_question_type():
    samples = _fake_samples(["a", "b", "c"], [(c, r) for c in range(4) for r in range(4)])
    sampler = data.GroupedBatchSampler(samples, range(len(samples)), batch_size=5, seed=3)
    batches = list(sampler)
    assert len(sampler) == len(batches) > 0
    seen = [i for b in batches for i in b]
    assert len(seen) == len(set(seen))
    for batch in batches:
        assert 2 <= len(batch) <= 5
        keys = {(samples[i]["obj1"], samples[i]["obj2"], samples[i]["cell1"], samples[i]["size"], samples[i]["qtype"])
                for i in batch}
        assert len(keys) == 1
        assert len({samples[i]["cell2"] for i in batch}) == len(batch)  # obj2 moves
    sampler.set_epoch(1)
    assert list(sampler) != batches and len(sampler) == len(list(sampler))
    sampler.set_epoch(1, skip=3)
    fresh = data.GroupedBatchSampler(samples, range(len(samples)), 5, seed=3)
    fresh.set_epoch(1)
    assert list(sampler) == list(fresh)[3:] and len(sampler) == len(fresh) - 3
    random_sampler = data.RandomBatchSampler(range(11), 4)
    assert len(random_sampler) == len(list(random_sampler)) == 3
    first = list(random_sampler)
    random_sampler.set_epoch(0, skip=1)
    assert list(random_sampler) == first[1:] and len(random_sampler) == 2


# --- collator --------------------------------------------------------------------------------

@pytest.mark.fast
@pytest.mark.parametrize("side", ["left", "right"])
def test_collator_supervises_exactly_answer_and_end_of_turn(tiny, tmp_path, side):
    model, processor, adapter = tiny
    processor.tokenizer.padding_side = side
    img = _png(tmp_path / "img.png")
    samples = [
        data.sample_record(img, "lr", "left", "dog", "teddy bear", cell1=(0, 0), cell2=(1, 0), size=74),
        data.sample_record(img, "ab", "below", "dining table", "red circle", cell1=(0, 3), cell2=(0, 0), size=74),
        data.sample_record(img, "lr", "right", "potted plant", "cat", cell1=(3, 0), cell2=(0, 0), size=74),
    ]
    batch = data.VLMCollator(processor, adapter)(samples)
    tok = processor.tokenizer
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1  # padding really happens
    for i, s in enumerate(samples):
        supervised = batch["labels"][i] != -100
        expected = tok(s["answer"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        assert batch["labels"][i][supervised].tolist() == expected
        assert (batch["attention_mask"][i][supervised] == 1).all()
        # obj2's last sub-token: the decoded text up to it ends with obj2's name
        pos = int(batch["target_positions"][i])
        assert tok.decode(batch["input_ids"][i, pos - 3:pos + 1]).endswith(s["obj2"].split()[-1])
        assert tok.decode(batch["input_ids"][i, pos + 1]) == "?"
    assert batch["target_cells"].tolist() == [[1, 0, 74], [0, 0, 74], [0, 0, 74]]
    batch.pop("target_positions"), batch.pop("target_cells")
    loss = model(**batch).loss
    assert torch.isfinite(loss)


@pytest.mark.fast
def test_collator_left_and_right_padding_give_the_same_loss(tiny, tmp_path):
    model, processor, adapter = tiny
    img = _png(tmp_path / "img.png")
    samples = [data.sample_record(img, "lr", "left", "dog", "cat"),
               data.sample_record(img, "ab", "above", "teddy bear", "sports ball")]
    losses = []
    for side in ("left", "right"):
        processor.tokenizer.padding_side = side
        batch = data.VLMCollator(processor, adapter)(samples)
        batch.pop("target_positions")
        with torch.no_grad():
            losses.append(model(**batch).loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


# --- COCO-Spatial ----------------------------------------------------------------------------

COCO_ROWS = [
    [139, "A photo of a dog to the left of a chair", "A photo of a dog to the right of a chair"],
    ["000000000285", "A photo of an elephant to the right of a potted plant", "A photo of an elephant to the left of a potted plant"],
    [632, "A photo of a dining table above an apple", "A photo of a dining table below an apple"],
    ["724", "A photo of a teddy bear below a fire hydrant.", "A photo of a teddy bear above a fire hydrant."],
]


def _coco(tmp_path, rows=COCO_ROWS, images=True, sub=""):
    root = tmp_path / "coco"
    (root / sub).mkdir(parents=True, exist_ok=True)
    if images:
        for row in rows:
            _png(root / sub / f"{int(row[0]):012d}.jpg", 32)
    path = tmp_path / "coco_qa_two_obj.json"
    path.write_text(json.dumps(rows))
    return path, root


@pytest.mark.fast
def test_coco_rows_articles_multi_word_nouns_and_all_relations(tmp_path):
    path, root = _coco(tmp_path)
    samples = data.load_coco_spatial(path, root)
    assert [s["answer"] for s in samples] == ["left", "right", "above", "below"]
    assert [s["image_id"] for s in samples] == [139, 285, 632, 724]
    assert samples[1]["question"] == (
        'Is the elephant to the left or right of the potted plant? Answer with "left" or "right" only.')
    assert samples[2]["question"] == 'Is the dining table above or below the apple? Answer with "above" or "below" only.'
    assert (samples[3]["obj1"], samples[3]["obj2"]) == ("teddy bear", "fire hydrant")
    assert samples[0]["image_path"].endswith("000000000139.jpg")
    original = data.load_coco_spatial(path, root, question_style="paper")
    assert original[0]["question"].startswith("Is a dog to the left or right of a chair?")
    assert original[2]["question"].startswith("Is a dining table above or below an apple?")
    assert original[3]["question"].startswith("Is a teddy bear above or below fire hydrant?")
    two = data.load_coco_spatial(path, root, max_samples=2)  # a stratified sample, not the first two rows
    assert len(two) == 2 and len({s["answer"] for s in two}) == 2 and two[0]["selection"]["sampled"]


@pytest.mark.fast
def test_coco_images_in_val2017_subfolder(tmp_path):
    path, root = _coco(tmp_path, sub="val2017")
    assert "val2017" in data.load_coco_spatial(path, root)[0]["image_path"]


@pytest.mark.fast
@pytest.mark.parametrize("bad, message", [
    (["only one field"], "row 1 is malformed"),
    ([7, "A photo of a dog near a cat", "x"], "row 1: caption not in the COCO-Spatial template"),
    (["abc", "A photo of a dog above a cat", "x"], "row 1 has a bad image id"),
])
def test_malformed_coco_row_is_named(tmp_path, bad, message):
    path, root = _coco(tmp_path, rows=[COCO_ROWS[0], bad], images=False)
    with pytest.raises(ValueError, match=message):
        data.load_coco_spatial(path, root)


@pytest.mark.fast
def test_missing_coco_images_are_counted_and_the_first_named(tmp_path):
    rows = COCO_ROWS + [[1000 + i, "A photo of a cat above a dog", "A photo of a cat below a dog"] for i in range(6)]
    path, root = _coco(tmp_path, rows=rows, images=False)
    _png(root / "000000000139.jpg", 32)
    with pytest.raises(FileNotFoundError) as err:
        data.load_coco_spatial(path, root)
    text = str(err.value)
    assert text.startswith(f"{root}: 9 of the 10 COCO-Spatial images of {path.name} are missing")
    assert text.count("00000000") == 1 and "(first: 000000000285.jpg)" in text and "\n" not in text


@pytest.mark.fast
def test_an_image_asked_about_twice_in_a_batch_is_decoded_once(tiny, tmp_path, monkeypatch):
    _, processor, adapter = tiny
    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "camel_0-0_frog_1-1.png")
    samples = data.GridDataset(tmp_path, "paper").samples  # a left/right and an above/below question
    assert len(samples) == 2 and samples[0]["image_path"] == samples[1]["image_path"]
    opened = []
    real = data.load_image
    monkeypatch.setattr(data, "load_image", lambda path: opened.append(path) or real(path))
    batch = data.VLMCollator(processor, adapter)(samples)
    assert len(opened) == 1
    assert batch["input_ids"].shape[0] == 2 and torch.equal(*batch["pixel_values"].chunk(2))
