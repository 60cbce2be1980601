import pytest
import torch

import data
import models


@pytest.mark.fast
def test_tiny_model_is_a_real_qwen2vl_with_the_run_scripts_depths(tiny):
    model, processor, adapter = tiny
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert len(adapter.vision_blocks(model)) >= 8  # the last 6 vision blocks exist
    assert len(adapter.lm_layers(model)) >= 12  # spatial-ID layer 11 exists
    assert adapter.projector(model) is model.model.visual.merger
    assert not model.training
    assert model.lm_head.weight is not model.get_input_embeddings().weight


@pytest.mark.fast
def test_tiny_build_is_deterministic(tmp_path):
    a = models.build_tiny_model(tmp_path / "a")
    b = models.build_tiny_model(tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.fast
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


@pytest.mark.fast
def test_unknown_model_offline_suggests_tiny_and_the_alias_list(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelUnavailableError) as info:
        models.load_model_and_processor("no-such-org/no-such-model")
    message = str(info.value)
    assert message.startswith("no-such-org/no-such-model: ") and "--list_models" in message and "tiny" in message
    assert len(message) < 300 and "\n" not in message
    with pytest.raises(models.ModelUnavailableError, match="no such folder"):
        models.load_model_and_processor(str(tmp_path / "empty-folder"))
    assert "qwen2-2b" in models.list_models() and "tiny-warm" in models.list_models()


@pytest.mark.fast
def test_aliases_resolve():
    assert models.resolve_model_name("qwen2-2b") == "Qwen/Qwen2-VL-2B-Instruct"
    assert models.resolve_model_name("some/other") == "some/other"


@pytest.mark.fast
def test_tiny_generates_through_the_kv_cache(tiny, tmp_path):
    from PIL import Image

    model, processor, adapter = tiny
    path = tmp_path / "x.png"
    Image.new("RGB", (112, 112), "white").save(path)
    batch = data.VLMCollator(processor, adapter, with_answer=False)(
        [data.sample_record(path, "lr", "left", "dog", "cat")])
    batch.pop("target_positions")
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3 or out[0, -1] == processor.tokenizer.eos_token_id


@pytest.mark.fast
def test_full_size_architecture_matches_qwen2vl_2b():
    model = models.full_size_model("qwen2-2b")
    adapter = models.adapter_for(model)
    assert len(adapter.vision_blocks(model)) == 32 and len(adapter.lm_layers(model)) == 28
    fc1 = adapter.vision_blocks(model)[0].mlp.fc1
    assert tuple(fc1.weight.shape) == (5120, 1280)
    assert adapter.lm_hidden_size(model) == 1536
    assert model.get_input_embeddings().weight.shape[0] == 151936
    assert 2.2e9 < models.count_parameters(model) < 2.22e9


@pytest.mark.fast
def test_the_originals_aliases_exactly():
    original = {
        "llava-7b": "llava-hf/llava-1.5-7b-hf", "llava-13b": "llava-hf/llava-1.5-13b-hf",
        "qwen2-2b": "Qwen/Qwen2-VL-2B-Instruct", "qwen-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
        "qwen-3b": "Qwen/Qwen2.5-VL-3B-Instruct", "llama-11b": "meta-llama/Llama-3.2-11B-Vision-Instruct",
        "llava-cot": "Xkev/Llama-3.2V-11B-cot", "internvl-1b": "OpenGVLab/InternVL3-1B-hf",
        "internvl-2b": "OpenGVLab/InternVL3-2B-hf", "internvl-8b": "OpenGVLab/InternVL3-8B-hf",
        "internvl-14b": "OpenGVLab/InternVL3-14B-hf", "gemma-4b": "google/gemma-3-4b-it",
        "gemma-12b": "google/gemma-3-12b-it",
    }
    assert {a: models.resolve_model_name(a) for a in original} == original
    assert set(original) <= set(models.FULL_SIZE_CONFIGS)  # each has a meta-device architecture


@pytest.mark.fast
@pytest.mark.parametrize("alias,family,n_vision,n_lm,billions", [
    ("qwen-3b", "qwen2_5_vl", 32, 36, (3.7, 3.8)),
    ("llava-7b", "llava", 24, 32, (7.0, 7.1)),
    ("llama-11b", "mllama", 40, 40, (10.6, 10.7)),
    ("internvl-8b", "internvl", 24, 28, (7.9, 8.0)),
    ("gemma-4b", "gemma3", 27, 34, (4.2, 4.4)),
])
def test_full_size_architectures_on_the_meta_device(alias, family, n_vision, n_lm, billions):
    model = models.full_size_model(alias)
    adapter = models.adapter_for(model)
    assert adapter.family == family
    assert all(p.is_meta for p in model.parameters())  # no memory allocated for weights
    assert sum(len(b) for _, b in adapter.vision_block_lists(model)) == n_vision
    assert len(adapter.lm_layers(model)) == n_lm
    assert billions[0] < models.count_parameters(model) / 1e9 < billions[1]


@pytest.mark.fast
def test_unknown_model_type_and_processor_are_one_line_errors():
    from transformers import BertConfig

    with pytest.raises(ValueError, match="model type 'bert' has no adapter"):
        models.adapter_for(BertConfig())
    with pytest.raises(ValueError, match="no adapter for processor object"):
        models.adapter_for_processor(object())
    with pytest.raises(ValueError, match="no full-size config for 'nope'"):
        models.full_size_model("nope")
