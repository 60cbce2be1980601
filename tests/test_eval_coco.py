"""eval_coco.py: answer parsing, accuracy bookkeeping, batched generation against one question at a
time, score mode against generate, the CLI (predictions file, data checked before the model
loads) and evaluating a saved checkpoint folder.

Runs on a 12-question stand-in (make_coco_standin). The random tiny model answers gibberish, so
"rigged" copies of it, whose answers are known by construction, give non-trivial accuracies."""
import json
import shutil

import pytest
import torch

import data
import eval_coco
import make_grid_data as mg
import models
import scoring

N = 12


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """(json path, image folder, samples) of a 12-question stand-in: 3 of each relation."""
    folder = tmp_path_factory.mktemp("coco")
    json_path = mg.make_coco_standin(folder, mg.builtin_objects(), n=N, seed=0)
    samples = data.load_coco_spatial(json_path, folder)
    assert len(samples) == N
    return json_path, folder, samples


@pytest.fixture(scope="module")
def generated(tiny_ro, standin):
    """evaluate() of the unmodified tiny model, batch size 5 (batches of 5, 5, 2)."""
    model, processor, adapter = tiny_ro
    return eval_coco.evaluate(model, processor, adapter, standin[2], batch_size=5, progress=False)


def token_id(processor, word):
    return processor.tokenizer(word, add_special_tokens=False)["input_ids"][0]


def rig(model, processor, adapter, first="right", second="below"):
    """Make the tiny model's next token `first` whatever the input (logit ~80), with `second`
    the runner-up (~40) and everything else near 0, by editing weights only (so it survives
    save_pretrained): a huge constant on embedding dim 0 dominates the residual stream, the final
    norm keeps dim 0 only (so its output is ~[8, 0, ...] at every text position), and the LM head
    reads dim 0 for the two words."""
    with torch.no_grad():
        adapter.lm_embeddings(model).weight[:, 0] += 1000.0
        norm = adapter.lm_final_norm(model).weight
        norm.zero_()
        norm[0] = 1.0
        head = adapter.lm_head(model).weight
        head[:, 0] = 0.0
        head[token_id(processor, first), 0] = 10.0
        head[token_id(processor, second), 0] = 5.0
    return model, processor, adapter


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Parsing and accuracy bookkeeping
# ---------------------------------------------------------------------------------------------

LR, AB = ("left", "right"), ("above", "below")


@pytest.mark.fast
@pytest.mark.parametrize("text, options, expected", [
    ("Left.", LR, "left"),
    ("right", LR, "right"),
    ("It is above", AB, "above"),
    ("", LR, ""),
    ("RIGHT!", LR, "right"),
    ("leftmost", LR, "left"),  # no whole word: the answer starts with an option
    ("upper", AB, ""),
    ("right or left", LR, "left"),  # whole words: options in order, the first found wins
    ("below.", AB, "below"),
    ("  \n Below", AB, "below"),
    ("bright", LR, ""),  # 'right' is neither a whole word nor a prefix here
    ("rightleft", LR, "right"),  # prefix rule
    ("it is left", AB, ""),  # words of the other question type are not answers
])
def test_parse_answer(text, options, expected):
    assert scoring.read_original(text, options)[0] == expected


@pytest.mark.fast
def test_accuracy_report_counts():
    answers = ["left", "left", "right", "above", "below", "below", "below"]
    predictions = ["left", "right", "right", "", "below", "above", "below"]
    samples = [{"answer": a} for a in answers]
    report = scoring.accuracy_report(samples, predictions)
    assert report["correct"] == 4 and report["n"] == 7
    assert report["accuracy"] == pytest.approx(4 / 7)
    assert report["per_relation"] == {
        "above": {"accuracy": 0.0, "correct": 0, "n": 1},
        "below": {"accuracy": pytest.approx(2 / 3), "correct": 2, "n": 3},
        "left": {"accuracy": 0.5, "correct": 1, "n": 2},
        "right": {"accuracy": 1.0, "correct": 1, "n": 1},
    }
    assert list(report["per_relation"]) == sorted(report["per_relation"])
    assert "accuracy 0.5714 (4/7)" in scoring.format_report(report)

    empty = scoring.accuracy_report([], [])
    assert empty["n"] == 0 and empty["correct"] == 0 and empty["per_relation"] == {}
    assert empty["accuracy"] != empty["accuracy"]  # nan


# ---------------------------------------------------------------------------------------------
# evaluate()
# ---------------------------------------------------------------------------------------------

def test_rows_follow_the_samples(generated, standin):
    samples = standin[2]
    report, rows = generated
    assert len(rows) == N
    for s, row in zip(samples, rows):
        assert (row["row"], row["image_id"], row["question"], row["answer"]) == (
            s["row"], s["image_id"], s["question"], s["answer"])
        assert row["prediction"] == scoring.read_original(row["generated"], s["options"])[0]
        assert row["correct"] == (row["prediction"] == s["answer"])
    assert report == scoring.accuracy_report(samples, [r["prediction"] for r in rows]) | {"selection": {
        "n": N, "of": N, "sampled": False, "seed": None}, "readings": scoring.readings_report(
        samples, [r["generated"] for r in rows])}
    assert report["n"] == N
    assert {rel: r["n"] for rel, r in report["per_relation"].items()} == {rel: 3 for rel in data.ANSWER_WORDS}


def test_batched_generation_equals_one_at_a_time(generated, tiny_ro, standin):
    model, processor, adapter = tiny_ro
    report5, rows5 = generated
    report1, rows1 = eval_coco.evaluate(model, processor, adapter, standin[2], batch_size=1, progress=False)
    assert [r["generated"] for r in rows5] == [r["generated"] for r in rows1]
    assert report5 == report1


def test_batched_left_padding_equals_one_at_a_time_when_answers_vary(sensitive, standin):
    model, processor, adapter = sensitive
    samples = standin[2]
    tokenizer = processor.tokenizer
    lengths = data.VLMCollator(processor, adapter, with_answer=False)(samples)["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1  # the batches really need padding
    one_by_one = eval_coco.generate_answers(model, processor, adapter, samples, batch_size=1, progress=False)
    assert len(set(one_by_one)) >= N // 2  # answers that tell the questions apart

    tokenizer.padding_side = "right"  # whatever the caller left, generation pads on the left
    try:
        report, rows = eval_coco.evaluate(model, processor, adapter, samples, batch_size=5, progress=False)
        assert tokenizer.padding_side == "right"  # and the caller's side is restored
        scores5 = eval_coco.score_answers(model, processor, adapter, samples, batch_size=5, progress=False)
        assert tokenizer.padding_side == "right"
    finally:
        tokenizer.padding_side = "left"
    assert [r["generated"] for r in rows] == one_by_one
    scores1 = eval_coco.score_answers(model, processor, adapter, samples, batch_size=1, progress=False)
    assert scores5 == scores1
    assert len(set(scores1)) >= 3  # not one option everywhere


@pytest.mark.fast
def test_known_answers_generate_mode(tiny, standin):
    samples = standin[2]
    model, processor, adapter = rig(*tiny, first="right", second="below")
    report, rows = eval_coco.evaluate(model, processor, adapter, samples, batch_size=5, progress=False)
    # "rightright..." : 'right' by the prefix rule for left/right questions, no answer otherwise.
    assert all(r["generated"].startswith("right") for r in rows)
    expected = ["right" if s["options"] == LR else "" for s in samples]
    assert [r["prediction"] for r in rows] == expected
    assert report["accuracy"] == pytest.approx(3 / N)
    assert report["per_relation"]["right"] == {"accuracy": 1.0, "correct": 3, "n": 3}
    for rel in ("left", "above", "below"):
        assert report["per_relation"][rel]["correct"] == 0


@pytest.mark.fast
def test_known_answers_score_mode(tiny, standin):
    samples = standin[2]
    model, processor, adapter = rig(*tiny, first="right", second="below")
    report, rows = eval_coco.evaluate(model, processor, adapter, samples, batch_size=5, mode="score",
                                      progress=False, agreement=True)
    predictions = [r["prediction"] for r in rows]
    assert all(p in s["options"] for p, s in zip(predictions, samples))  # an option, always
    # Score mode compares the two options' logits: 'right' (10) beats 'left' (0), 'below' (5)
    # beats 'above' (0); generate only ever says 'right...'.
    assert predictions == ["right" if s["options"] == LR else "below" for s in samples]
    assert report["accuracy"] == pytest.approx(6 / N)
    assert report["per_relation"]["below"]["correct"] == 3 and report["per_relation"]["above"]["correct"] == 0
    parsed = [scoring.read_original(r["generated"], s["options"])[0] for r, s in zip(rows, samples)]
    agreement = sum(p == q for p, q in zip(predictions, parsed)) / N
    assert agreement == pytest.approx(0.5)
    assert report["agreement_with_generate"] == pytest.approx(agreement)
    assert report["generate_accuracy"] == pytest.approx(scoring.accuracy_report(samples, parsed)["accuracy"])
    assert report["generate_accuracy"] == pytest.approx(3 / N)
    assert "agreement 0.5000" in scoring.format_report(report)


@pytest.mark.fast
def test_score_mode_on_the_plain_model(tiny_ro, standin):
    model, processor, adapter = tiny_ro
    samples = standin[2][:6]
    report, rows = eval_coco.evaluate(model, processor, adapter, samples, batch_size=4, mode="score",
                                      progress=False, agreement=True)
    assert all(r["prediction"] in s["options"] for r, s in zip(rows, samples))
    parsed = [scoring.read_original(r["generated"], s["options"])[0] for r, s in zip(rows, samples)]
    agreement = sum(r["prediction"] == p for r, p in zip(rows, parsed)) / len(samples)
    assert 0.0 <= report["agreement_with_generate"] <= 1.0
    assert report["agreement_with_generate"] == pytest.approx(agreement)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def cli_args(standin, ckpt, output=None, batch_size=4):
    json_path, folder, _ = standin
    args = ["--ckpt", str(ckpt), "--protocol", "clean", "--val_json", str(json_path), "--coco_val_dir", str(folder),
            "--batch_size", str(batch_size)]
    return args + (["--output", str(output)] if output is not None else [])


@pytest.mark.fast
def test_cli_writes_predictions(standin, generated, tiny_path, tmp_path, capsys):
    samples = standin[2]
    out = tmp_path / "preds" / "tiny.jsonl"
    report = eval_coco.main(cli_args(standin, "tiny", out))
    assert "COCO-Spatial: accuracy" in capsys.readouterr().out
    rows = read_jsonl(out)
    assert len(rows) == N
    for s, row in zip(samples, rows):
        assert {"question", "answer", "generated", "prediction", "correct"} <= set(row)
        assert (row["question"], row["answer"]) == (s["question"], s["answer"])
        assert row["prediction"] == scoring.read_original(row["generated"], s["options"])[0]
        assert row["correct"] == (row["prediction"] == s["answer"])
    # the same answers as evaluate() in-process with another batch size
    assert report == generated[0]
    assert [r["generated"] for r in rows] == [r["generated"] for r in generated[1]]


@pytest.mark.fast
def test_cli_missing_image_fails_before_the_model_loads(standin, tmp_path, monkeypatch):
    json_path, folder, _ = standin
    broken = tmp_path / "coco"
    shutil.copytree(folder, broken)
    (broken / f"{7:012d}.jpg").unlink()

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(eval_coco, "load_checkpoint_model", no_model)
    monkeypatch.setattr(models, "load_model_and_processor", no_model)
    out = tmp_path / "preds.jsonl"
    args = ["--ckpt", "tiny", "--val_json", str(broken / json_path.name), "--coco_val_dir", str(broken),
            "--output", str(out)]
    with pytest.raises(SystemExit, match=rf"^error: .*coco: 1 of the {N} COCO-Spatial images .* missing.*{7:012d}\.jpg"):
        eval_coco.main(args)
    assert not out.exists()


def test_cli_evaluates_a_saved_checkpoint(standin, generated, tiny_path, tmp_path):
    """A save_pretrained folder loads through from_pretrained: the plain tiny model's answers are
    reproduced, and a rigged model's weights really come from the folder."""
    samples = standin[2]
    model, processor, adapter = models.load_model_and_processor("tiny")
    plain = tmp_path / "plain"
    model.save_pretrained(plain)
    processor.save_pretrained(plain)
    report = eval_coco.main(cli_args(standin, plain, batch_size=3))
    assert report == generated[0]
    default_out = plain / "coco_predictions_generate.jsonl"  # next to the checkpoint by default
    assert [r["generated"] for r in read_jsonl(default_out)] == [r["generated"] for r in generated[1]]

    rigged = tmp_path / "rigged"
    rig(model, processor, adapter, first="left", second="above")
    model.save_pretrained(rigged)
    processor.save_pretrained(rigged)
    out = tmp_path / "rigged.jsonl"
    report = eval_coco.main(cli_args(standin, rigged, out) + ["--mode", "score", "--agreement"])
    assert [r["prediction"] for r in read_jsonl(out)] == [
        "left" if s["options"] == LR else "above" for s in samples]
    assert report["accuracy"] == pytest.approx(6 / N)
    assert report["generate_accuracy"] == pytest.approx(3 / N)
    assert report["per_relation"]["left"]["correct"] == 3 and report["per_relation"]["above"]["correct"] == 3
