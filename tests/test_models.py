import pytest
import torch

import data
import models


def test_tiny_model_is_a_real_qwen2vl_with_the_run_scripts_depths(tiny):
    model, processor, adapter = tiny
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert len(adapter.vision_blocks(model)) >= 8  # the last 6 vision blocks exist
    assert len(adapter.lm_layers(model)) >= 12  # spatial-ID layer 11 exists
    assert adapter.projector(model) is model.model.visual.merger
    assert not model.training
    assert model.lm_head.weight is not model.get_input_embeddings().weight


def test_tiny_build_is_deterministic(tmp_path):
    a = models.build_tiny_model(tmp_path / "a")
    b = models.build_tiny_model(tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_tiny_tokenizer_covers_templates_and_names(tiny):
    _, processor, _ = tiny
    tok = processor.tokenizer
    for name in data.BUILTIN_OBJECT_NAMES + data.COCO_OBJECT_NAMES:
        question, _ = data.make_question("lr", name, "dog")
        ids = tok(question, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == question
        assert len(ids) < len(question) / 2  # learned merges, not raw bytes
    for special in models.SPECIAL_TOKENS:
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    for word in data.ANSWER_WORDS:  # score mode compares first tokens of the option words
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1


def test_unknown_model_offline_suggests_tiny(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelUnavailableError, match="--model_name tiny"):
        models.load_model_and_processor("no-such-org/no-such-model")
    with pytest.raises(models.ModelUnavailableError, match="cannot load model"):
        models.load_model_and_processor(str(tmp_path / "empty-folder"))


def test_aliases_resolve():
    assert models.resolve_model_name("qwen2-2b") == "Qwen/Qwen2-VL-2B-Instruct"
    assert models.resolve_model_name("some/other") == "some/other"


def test_tiny_generates_through_the_kv_cache(tiny, tmp_path):
    from PIL import Image

    model, processor, adapter = tiny
    path = tmp_path / "x.png"
    Image.new("RGB", (112, 112), "white").save(path)
    batch = data.VLMCollator(processor, adapter.end_of_turn, with_answer=False)(
        [data.sample_record(path, "lr", "left", "dog", "cat")])
    batch.pop("target_positions")
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3 or out[0, -1] == processor.tokenizer.eos_token_id


def test_full_size_architecture_matches_qwen2vl_2b():
    model = models.full_size_model("qwen2-2b")
    adapter = models.adapter_for(model)
    assert len(adapter.vision_blocks(model)) == 32 and len(adapter.lm_layers(model)) == 28
    fc1 = adapter.vision_blocks(model)[0].mlp.fc1
    assert tuple(fc1.weight.shape) == (5120, 1280)
    assert adapter.lm_hidden_size(model) == 1536
    assert model.get_input_embeddings().weight.shape[0] == 151936
    assert 2.2e9 < models.count_parameters(model) < 2.22e9
