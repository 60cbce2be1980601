"""Score mode counts every option as a whole word over its surface forms, with a real-style BPE
vocabulary (tiny-realbpe: "behind" is "beh" + "ind" as in Qwen2's; "Left" and "left" are distinct
single tokens), and the image budget bounds the visual tokens of a large image."""
import copy
import json
import math

import pytest
import torch
from PIL import Image

import benchmarks
import data
import eval_coco
import models
import scoring

VG_OPTIONS = ("left", "right", "front", "behind", "above", "below")


@pytest.fixture(scope="module")
def realbpe():
    return models.load_model_and_processor("tiny-realbpe")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "1.jpg"
    Image.new("RGB", (56, 56), (20, 120, 200)).save(path)
    return path


def question(image_file, options=VG_OPTIONS, answer="behind", benchmark="vg_two_obj"):
    template = "Where is {obj1} in relation to {obj2}? Answer with " + benchmarks.options_phrase(options) + "."
    sample = {"benchmark": benchmark, "kind": "two_obj", "row": 0, "image_id": 1, "image_path": str(image_file),
              "options": options, "answer": answer, "relation": answer, "order": "asked", "rotation": 0,
              "obj1": "dog", "obj2": "cat"}
    return benchmarks.with_question(sample, template=template, ref1="the dog", ref2="the cat")


@pytest.mark.fast
def test_the_vocabulary_splits_behind_as_qwen2_does(realbpe):
    _, processor, adapter = realbpe
    tok = processor.tokenizer
    pieces = [tok.decode([i]) for i in tok("behind", add_special_tokens=False)["input_ids"]]
    assert pieces == ["beh", "ind"]
    assert len({tok.convert_tokens_to_ids("left"), tok.convert_tokens_to_ids("Left")}) == 2
    forms = dict(adapter.option_forms(processor, "behind"))
    assert [tok.decode(ids) for ids in forms.values()] == ["behind", "Behind"]


def hand_logprob(model, processor, adapter, sample, word):
    """log P(word's tokens | prompt), teacher-forced in one plain forward of prompt + answer."""
    prompt_len = data.VLMCollator(processor, adapter, with_answer=False)([sample])["input_ids"].shape[1]
    batch = data.VLMCollator(processor, adapter, with_answer=True)([dict(sample, answer=word)])
    inputs = data.split_batch(batch, "cpu")[0]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(**inputs).logits[0].float(), dim=-1)
    ids = inputs["input_ids"][0]
    eot = len(processor.tokenizer(adapter.end_of_turn, add_special_tokens=False)["input_ids"])
    answer = range(prompt_len, ids.shape[0] - eot)
    assert processor.tokenizer.decode(ids[answer.start:answer.stop]).strip() == word
    return sum(float(logprobs[t - 1, ids[t]]) for t in answer)


def test_an_option_scores_as_a_whole_word_over_its_forms(realbpe, image_file):
    """Each option's score is log(P(lowercase) + P(Capitalised)), every token of the word counted:
    "behind" is P("beh") P("ind" | "beh"), not P("beh")."""
    model, processor, adapter = realbpe
    sample = question(image_file)
    scores = eval_coco.option_logprobs(model, processor, adapter, [sample, question(image_file, answer="left")],
                                       batch_size=2, progress=False)
    for option, got in zip(VG_OPTIONS, scores[0]):
        want = math.log(sum(math.exp(hand_logprob(model, processor, adapter, sample, w))
                            for w in (option, option.capitalize())))
        assert got == pytest.approx(want, abs=1e-3), option
    assert scores[1] == pytest.approx(scores[0], abs=1e-3)  # the same prompt, batched beside another


class Bias:
    """A forward hook adding `bias` ({token: logit}) to the LM head's output at every position."""

    def __init__(self, model, bias):
        self.vector = torch.zeros(model.config.text_config.vocab_size)
        for token, value in bias.items():
            self.vector[token] = value
        self.handle = model.lm_head.register_forward_hook(lambda mod, inp, out: out + self.vector)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def ids_of(processor, *tokens):
    return [processor.tokenizer.convert_tokens_to_ids(t) for t in tokens]


def test_a_capitalised_answer_counts(realbpe, image_file):
    """The model puts its mass on "Left", some on "right", none on "left": score mode says left."""
    model, processor, adapter = realbpe
    left, cap_left, right = ids_of(processor, "left", "Left", "right")
    with Bias(model, {cap_left: 30.0, right: 25.0, left: -30.0}):
        got = eval_coco.score_answers(model, processor, adapter, [question(image_file)], progress=False)
    assert got == ["left"]


@pytest.mark.parametrize("second, want", [(30.0, "behind"), (-30.0, "above")])
def test_a_multi_token_option_counts(realbpe, image_file, second, want):
    """The model's first token is "Beh" (and some "above"), "beh" never. With "ind" likely next it
    said "Behind": score mode says behind (not above for want of P("beh")). With "ind" unlikely
    next it never said behind: P("Beh") alone must not win it."""
    model, processor, adapter = realbpe
    beh, cap_beh, ind, above = ids_of(processor, "beh", "Beh", "ind", "above")
    with Bias(model, {cap_beh: 30.0, ind: second, above: 25.0, beh: -30.0}):
        got = eval_coco.score_answers(model, processor, adapter, [question(image_file)], progress=False)
    assert got == [want]


def test_vsr_margin_is_a_log_ratio_over_the_forms(realbpe, image_file):
    """VSR's margin: log P(true) - log P(false), each over "true" and "True" (multi-token here)."""
    model, processor, adapter = realbpe
    template = benchmarks.vsr_template(("true", "false"))
    sample = benchmarks.with_question(
        {"benchmark": "vsr", "kind": "vsr", "row": 0, "image_id": "1.jpg", "image_path": str(image_file),
         "options": ("true", "false"), "answer": "true", "relation": "left of", "order": "asked", "rotation": 0,
         "obj1": "dog", "obj2": "cat"}, template=template, ref1=None, ref2="The dog is left of the cat.",
        ref2_name_start=len("The dog is left of the "))
    report, rows = eval_coco.evaluate_benchmark(model, processor, adapter, [sample], mode="score", progress=False)

    def word(w):
        return math.log(sum(math.exp(hand_logprob(model, processor, adapter, sample, f)) for f in (w, w.capitalize())))

    assert rows[0]["margin_true_false"] == pytest.approx(word("true") - word("false"), abs=1e-3)
    forms = report["option_forms"]
    assert [f["text"] for f in forms["true"]] == ["true", "True"]
    assert forms["true"][1]["ids"] == processor.tokenizer("True", add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------
# Image budget
# ---------------------------------------------------------------------------------------------

def visual_tokens(processor, size):
    out = processor.image_processor(images=[Image.new("RGB", size)], return_tensors="pt")
    return int(out["image_grid_thw"].prod()) // 4  # 2 x 2 patches merge into one visual token


def test_the_budget_bounds_large_images_and_leaves_coco_alone(tiny_ro, tmp_path, capsys):
    _, processor, adapter = tiny_ro
    processor = copy.deepcopy(processor)  # the shared one keeps its own budget
    processor.image_processor.size["longest_edge"] = 12_845_056  # Qwen2-VL's released default
    coco, large = (640, 480), (1600, 1200)
    before = visual_tokens(processor, coco), visual_tokens(processor, large)
    paths = []
    for name, size in (("coco", coco), ("large", large)):
        paths.append(tmp_path / f"{name}.jpg")
        Image.new("RGB", size).save(paths[-1])
    samples = [{"image_path": str(p)} for p in paths]
    bound = eval_coco.apply_image_budget(processor, adapter, eval_coco.DEFAULT_MAX_PIXELS, {"vg_two_obj": samples})
    assert bound == eval_coco.DEFAULT_MAX_PIXELS == 1024 * 28 * 28
    assert visual_tokens(processor, coco) == before[0] == (644 // 28) * (476 // 28)  # unchanged
    assert before[1] > 2_000 and visual_tokens(processor, large) <= 1024
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vg_two_obj: 1 images have more than the budget of 802,816 pixels" in err[0]
    assert str(paths[1]) in err[0] and "1600x1200" in err[0]


def test_predictions_record_visual_tokens_per_image(tiny_ro, image_file):
    model, processor, adapter = tiny_ro
    _, rows = eval_coco.evaluate_benchmark(model, processor, adapter, [question(image_file, answer="left")],
                                           mode="score", progress=False)
    assert {r["visual_tokens"] for r in rows} == {visual_tokens(processor, (56, 56))}


@pytest.mark.parametrize("alias", ["tiny-qwen2.5", "tiny-llava", "tiny-mllama", "tiny-internvl", "tiny-gemma3"])
def test_whole_word_scores_in_every_family(alias, image_file):
    """The appended-token forward (adapter.extend_text: attention mask, token types, Mllama's
    cross-attention mask) gives each family the same whole-word scores as one plain forward of
    prompt + answer; "behind" and "front" are several tokens in every tiny vocabulary."""
    model, processor, adapter = models.load_model_and_processor(alias)
    sample = question(image_file, options=("left", "behind", "front"), answer="left")
    assert any(len(ids) > 1 for _, ids in adapter.option_forms(processor, "behind"))
    got = eval_coco.option_logprobs(model, processor, adapter, [sample, question(image_file, answer="front")],
                                    batch_size=2, progress=False)[0]
    for option, score in zip(sample["options"], got):
        want = math.log(sum(math.exp(hand_logprob(model, processor, adapter, sample, w))
                            for w in (option, option.capitalize())))
        assert score == pytest.approx(want, abs=2e-3), option


def test_cli_budget_names_the_large_image_and_rows_record_visual_tokens(tmp_path, tiny_path, capsys):
    """A What'sUp two-object file with plural captions and one large photo, scored from the command
    line under a budget of 4 visual tokens: one warning line names the photo, every row records its
    image's visual tokens."""
    whatsup = tmp_path / "whatsup"
    (whatsup / "vg_images").mkdir(parents=True)
    rows = [[1, "A photo of children to the left of a dog", "x"], [2, "A photo of cups behind the laptop", "x"]]
    (whatsup / "vg_qa_two_obj.json").write_text(json.dumps(rows))
    Image.new("RGB", (56, 56), (9, 9, 9)).save(whatsup / "vg_images" / "1.jpg")
    Image.new("RGB", (800, 600), (9, 99, 9)).save(whatsup / "vg_images" / "2.jpg")
    out = tmp_path / "out"
    reports = eval_coco.main(["--ckpt", "tiny", "--benchmark", "vg_two_obj", "--whatsup_dir", str(whatsup),
                              "--mode", "score", "--max_pixels", str(56 * 56), "--output", str(out)])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "1 images have more than the budget of 3,136 pixels" in warnings[0]
    assert str(whatsup / "vg_images" / "2.jpg") in warnings[0] and "800x600" in warnings[0]
    predictions = [json.loads(line) for line in (out / "vg_two_obj.jsonl").read_text().splitlines()]
    tokens = {r["image_id"]: r["visual_tokens"] for r in predictions}
    assert tokens[1] == 4 and 0 < tokens[2] <= 4  # the photo resized to the budget, its aspect kept
    assert [r["question"] for r in predictions if r["order"] == "asked"][0].startswith("Where is the children")
    assert reports["vg_two_obj"]["n"] == 2
