"""Every supported family on its tiny random model: loading, the adapter's structure, the default
selection under both protocols, three training steps with the spatial loss, the collator's obj2
targets on a grid folder (checked by decoding), and both evaluation modes."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import eval_coco
import models
import protocols
import spatial_loss as sl
from param_selectors import select_parameters

REPO = Path(__file__).resolve().parents[1]
FC = ("mlp.fc1.weight", "mlp.fc2.weight")
GATED = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


def names(prefix, blocks, suffixes):
    return {f"{prefix}.{i}.{s}" for i in blocks for s in suffixes}


def proj(*suffixes):
    return {"model.multi_modal_projector." + s for s in suffixes}


QWEN_VIS = "model.visual.blocks"
TOWER = "model.vision_tower.encoder.layers"
INTERNVIT = "model.vision_tower.encoder.layer"
LOCAL = "model.vision_model.transformer.layers"
GLOBAL = "model.vision_model.global_transformer.layers"

# alias: (model class, {protocol: expected default selection}, tensors that get no gradient)
FAMILIES = {
    "tiny": ("Qwen2VLForConditionalGeneration",
             {"paper": names(QWEN_VIS, range(2, 8), FC), "clean": names(QWEN_VIS, range(2, 8), FC)}, set()),
    "tiny-qwen2.5": ("Qwen2_5_VLForConditionalGeneration",
                     {"paper": names(QWEN_VIS, range(2, 8), GATED), "clean": names(QWEN_VIS, range(2, 8), GATED)},
                     set()),
    # Features from layer -2: block 7 is listed (paper picks it) but never reaches the LM.
    "tiny-llava": ("LlavaForConditionalGeneration",
                   {"paper": names(TOWER, range(2, 8), FC) | proj("linear_1.weight", "linear_1.bias",
                                                                  "linear_2.weight", "linear_2.bias"),
                    "clean": names(TOWER, range(1, 7), FC)},
                   names(TOWER, [7], FC)),
    # 8 local + 2 global blocks: paper = the largest listed indices (local 2-7), clean = the last
    # 6 in forward order (local 4-7, global 0-1).
    "tiny-mllama": ("MllamaForConditionalGeneration",
                    {"paper": names(LOCAL, range(2, 8), FC) | proj("weight", "bias"),
                     "clean": names(LOCAL, range(4, 8), FC) | names(GLOBAL, range(2), FC)}, set()),
    "tiny-internvl": ("InternVLForConditionalGeneration",
                      {"paper": names(INTERNVIT, range(2, 8), FC) | proj(
                          "layer_norm.weight", "layer_norm.bias", "linear_1.weight", "linear_1.bias",
                          "linear_2.weight", "linear_2.bias"),
                       "clean": names(INTERNVIT, range(2, 8), FC)}, set()),
    "tiny-gemma3": ("Gemma3ForConditionalGeneration",
                    {"paper": names(TOWER, range(2, 8), FC) | proj("mm_input_projection_weight",
                                                                   "mm_soft_emb_norm.weight"),
                     "clean": names(TOWER, range(2, 8), FC)}, set()),
}
ALIASES = list(FAMILIES)


@pytest.fixture(scope="module", params=ALIASES)
def family(request):
    """(alias, model, processor, adapter), loaded once per family for this module."""
    model, processor, adapter = models.load_model_and_processor(request.param)
    return request.param, model, processor, adapter


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    subprocess.run([sys.executable, str(REPO / "make_grid_data.py"), "--out_dir", str(out), "--cell", "28",
                    "--sizes", "124", "--max_pairs", "2"], check=True, capture_output=True, cwd=REPO)
    return data.GridDataset(out)


def select_default(model, adapter, protocol):
    return select_parameters(model, adapter, projector=protocols.default("projector", protocol),
                             last_k_of=protocols.default("last_k_of", protocol))


@pytest.mark.fast
def test_load_and_structure(family):
    alias, model, processor, adapter = family
    assert type(model).__name__ == FAMILIES[alias][0]
    assert models.adapter_for(model) is adapter
    assert type(models.adapter_for_processor(processor)) is type(adapter)  # the collator's legacy path
    assert not model.training
    listed = [b for _, blocks in adapter.vision_block_lists(model) for b in blocks]
    used = adapter.vision_blocks(model)
    assert len(listed) == (10 if alias == "tiny-mllama" else 8)
    assert len(used) == (7 if alias == "tiny-llava" else len(listed))
    # Block parts partition every block's parameters: nothing is counted twice or left out.
    for block in listed + adapter.lm_layers(model):
        parts = adapter.block_parts(block)
        ids = [id(p) for kind in ("mlp", "attn", "norms") for m in
               (parts[kind] if isinstance(parts[kind], list) else [parts[kind]]) for p in m.parameters()]
        ids += [id(p) for p in parts["extra"]]
        assert sorted(ids) == sorted(id(p) for p in block.parameters())
    assert set(adapter.projector(model).parameters()) <= set(model.parameters())
    assert adapter.lm_final_norm(model).weight.shape == (adapter.lm_hidden_size(model),)
    tied = adapter.lm_head(model).weight is adapter.lm_embeddings(model).weight
    assert tied == (alias == "tiny-gemma3")  # InternVL -hf and the rest keep a separate head


@pytest.mark.fast
def test_extra_weights_are_layer_scale_and_gates(family):
    alias, model, _, adapter = family
    lists = adapter.vision_block_lists(model)
    extra = {n for label, blocks in lists for n, p in blocks[0].named_parameters(recurse=False)}
    if alias == "tiny-internvl":
        assert extra == {"lambda_1", "lambda_2"}
    elif alias == "tiny-mllama":
        assert [label for label, _ in lists] == ["local block", "global block"]
        global0 = lists[1][1][0]
        assert {id(p) for p in adapter.block_parts(global0)["extra"]} == {id(global0.gate_attn), id(global0.gate_ffn)}
    else:
        assert extra == set()


@pytest.mark.fast
@pytest.mark.parametrize("protocol", ["paper", "clean"])
def test_default_selection_under_each_protocol(family, protocol):
    alias, model, _, adapter = family
    sel = select_default(model, adapter, protocol)
    expected = FAMILIES[alias][1][protocol]
    assert set(sel.names) == expected and len(sel.names) == len(expected)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == sel.names
    warned = [n for n in sel.notes if "never reaches the language model" in n]
    if alias == "tiny-llava" and protocol == "paper":
        assert len(warned) == 1 and warned[0].endswith("vision block 7") and "vision_feature_layer=-2" in warned[0]
    else:
        assert warned == []


def test_three_training_steps_change_exactly_the_selected_tensors(family, grid):
    """LM loss + spatial loss, AdamW, paper protocol (projector included): every selected tensor
    that reaches the LM changes, nothing else does; LLaVA's block 7 gets no gradient at all."""
    alias, model, processor, adapter = family
    sel = select_default(model, adapter, "paper")
    dead = FAMILIES[alias][2]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    samples = [s for s in grid.samples if s["qtype"] == "lr"][:2]
    batch, positions, cells = data.split_batch(data.VLMCollator(processor, adapter)(samples), "cpu")
    torch.manual_seed(0)
    loss_fn = sl.SpatialIDLoss({c: torch.randn(adapter.lm_hidden_size(model)) for c in set(cells)})
    # No weight decay: a tensor changes only if a gradient moved it.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    try:
        for _ in range(3):
            opt.zero_grad()
            with sl.capture_layer(model, adapter, 2) as cap:
                out = model(**batch)
            loss = out.loss + loss_fn(sl.gather_target_states(cap.states, positions), cells)
            assert torch.isfinite(loss)
            loss.backward()
            opt.step()
    finally:
        model.eval()
    params = dict(model.named_parameters())
    changed = {n for n, p in params.items() if not torch.equal(p.detach(), before[n])}
    assert changed == set(sel.names) - dead
    assert all(params[n].grad is None for n in dead)
    assert all(params[n].grad.abs().sum() > 0 for n in set(sel.names) - dead)
    with torch.no_grad():  # restore, so the other tests of this module see the built weights
        for n, p in params.items():
            p.copy_(before[n])
            p.grad = None


def test_collator_targets_decode_to_the_end_of_obj2_for_every_grid_sample(family, grid):
    _, _, processor, adapter = family
    tok = processor.tokenizer
    bos = tok.bos_token_id
    # Every training sample as training collates it; generation prompts (same locating code,
    # no answer) for the first batch.
    for with_answer, samples in ((True, grid.samples), (False, grid.samples[:64])):
        collate = data.VLMCollator(processor, adapter, with_answer=with_answer)
        for start in range(0, len(samples), 64):
            chunk = samples[start:start + 64]
            batch = collate(chunk)
            for i, s in enumerate(chunk):
                piece = tok.decode([int(batch["input_ids"][i, batch["target_positions"][i]])]).strip()
                assert piece and s["obj2"].endswith(piece), (s["image_path"], piece)
                if bos is not None:  # BOS appears once, whether the template or the tokenizer writes it
                    assert int((batch["input_ids"][i] == bos).sum()) == 1
                if with_answer:
                    supervised = batch["labels"][i][batch["labels"][i] != -100]
                    assert tok.decode(supervised).strip() == s["answer"] + adapter.end_of_turn
    assert len(grid.samples) > 600


@pytest.mark.fast
def test_a_name_off_the_token_boundary_is_an_error_naming_the_sample(family, grid):
    _, _, processor, adapter = family
    sample = dict(grid.samples[0])
    start, end = sample["obj2_span"]
    sample["obj2_span"] = (start, end - 1)  # claims the name ends one character early
    with pytest.raises(ValueError, match=Path(sample["image_path"]).name):
        data.VLMCollator(processor, adapter)([sample])


@pytest.mark.fast
def test_a_caller_holding_only_the_processor_finds_its_adapter(family, grid):
    _, _, processor, adapter = family
    found = models.adapter_for_processor(processor)
    assert type(found) is type(adapter)  # Qwen2-VL and Qwen2.5-VL share one processor class
    a = data.VLMCollator(processor, found)(grid.samples[:2])
    b = data.VLMCollator(processor, adapter)(grid.samples[:2])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["target_positions"], b["target_positions"])
    # data stands below models, so the collator no longer looks an adapter up from a string
    with pytest.raises(TypeError, match="adapter_for_processor"):
        data.VLMCollator(processor, adapter.end_of_turn)


@pytest.mark.fast
@pytest.mark.parametrize("mode", ["generate", "score"])
def test_eval_runs_in_both_modes(family, grid, mode):
    _, model, processor, adapter = family
    samples = [grid.samples[0], grid.samples[1], grid.samples[-1]]
    report, rows = eval_coco.evaluate(model, processor, adapter, samples, batch_size=2, mode=mode, progress=False)
    assert report["n"] == 3 and len(rows) == 3
    assert all(r["prediction"] in s["options"] + ("",) for r, s in zip(rows, samples))
    if mode == "score":  # score mode always picks one of the two options
        assert all(r["prediction"] in s["options"] for r, s in zip(rows, samples))
        ids = adapter.option_token_ids(processor, ("left", "right"))
        assert [processor.tokenizer.decode([i]).strip() for i in ids] == ["left", "right"]


@pytest.mark.fast
def test_legacy_tail_length_would_misplace_llava_targets(grid):
    """The trap the matching avoids: a Llama-2 tokenizer prepends "▁" to a fragment tokenized
    alone, so counting the tokens of the text after obj2 on its own lands off the name."""
    model, processor, adapter = models.load_model_and_processor("tiny-llava")
    s = grid.samples[0]
    batch = data.VLMCollator(processor, adapter)([s])
    prompt = adapter.render_prompt(processor, s["question"])
    text = prompt + adapter.render_answer(s["answer"])
    tail = text[prompt.rindex(s["question"]) + s["obj2_span"][1]:]
    legacy = int(batch["attention_mask"][0].sum()) - 1 - len(processor.tokenizer(tail, add_special_tokens=False)["input_ids"])
    assert legacy != int(batch["target_positions"][0])


@pytest.mark.fast
def test_mllama_hidden_states_count_cross_attention_layers_only_with_an_image(grid):
    """With an image every LM layer runs and hidden_states[L] is the output of lm_layers[L-1]
    (what derivation and the spatial loss both use: capture_layer hooks lm_layers). Without one the
    cross-attention layers are skipped and the indices shift, as hidden_state_layers says."""
    model, processor, adapter = models.load_model_and_processor("tiny-mllama")
    batch = data.split_batch(data.VLMCollator(processor, adapter, with_answer=False)(grid.samples[:2]), "cpu")[0]
    n = len(adapter.lm_layers(model))
    with torch.no_grad(), sl.capture_layer(model, adapter, 2) as cap:
        out = model(**batch, output_hidden_states=True)
    assert len(out.hidden_states) == n + 1 == len(adapter.hidden_state_layers(model, with_image=True)) + 1
    assert torch.equal(out.hidden_states[2], cap.states)
    text_only = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        out = model(**text_only, output_hidden_states=True)
    n_self = len(adapter.hidden_state_layers(model, with_image=False))
    assert n_self == n - len(model.config.text_config.cross_attention_layers)
    assert len(out.hidden_states) == n_self + 1


@pytest.mark.fast
def test_id_derivation_counts_layers_as_the_spatial_loss_does(family, grid):
    """derive_spatial_ids reads hidden_states[L] with the image in, so it has one state per LM
    layer plus the embeddings, the same L that capture_layer hooks (lm_layers[L-1])."""
    import derive_spatial_ids as dsi

    _, model, processor, adapter = family
    groups = [g for g in data.group_indices(grid.samples, range(len(grid.samples))).values() if len(g) >= 3][:2]
    samples = [grid.samples[i] for g in groups for i in g[:3]]  # two groups of three: quick
    per_layer, stats = dsi.derive(model, processor, adapter, samples, batch_size=8, progress=False)
    assert stats["layers"] == len(adapter.lm_layers(model)) + 1 == len(adapter.hidden_state_layers(model)) + 1
    assert stats["hidden_size"] == adapter.lm_hidden_size(model)
    assert stats["groups"] == 2 and all(torch.isfinite(v).all() for v in per_layer[2].values())
    # Layer L of derivation is what capture_layer(L) hooks.
    chunk = samples[:3]
    batch, positions, _ = data.split_batch(data.VLMCollator(processor, adapter, with_answer=False)(chunk), "cpu")
    with torch.no_grad(), sl.capture_layer(model, adapter, 2) as cap:
        hidden = model(**batch, output_hidden_states=True).hidden_states
    assert torch.allclose(sl.gather_target_states(hidden[2], positions), sl.gather_target_states(cap.states, positions))


@pytest.mark.fast
def test_internvl_unset_tying_means_a_separate_head():
    """InternVL3 -hf stores lm_head apart from the embeddings, but a 5.x InternVLConfig that leaves
    tying unset ties them (from_pretrained only refuses when both stored tensors differ; a model
    built from the config, as on the meta device, is tied). The adapter unties such configs."""
    from transformers import AutoModelForImageTextToText, InternVLConfig

    config = InternVLConfig(text_config=dict(model_type="qwen2", hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                             vocab_size=64),
                            vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2))
    with torch.device("meta"):
        tied = AutoModelForImageTextToText.from_config(config)
    assert tied.lm_head.weight is tied.get_input_embeddings().weight  # the 5.x default
    adapter = models.adapter_for(config)
    config = adapter.prepare_config(config, raw={"text_config": {}})
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    # An explicit choice in config.json is kept.
    kept = adapter.prepare_config(InternVLConfig(tie_word_embeddings=True), raw={"tie_word_embeddings": True})
    assert kept.tie_word_embeddings
    full = models.full_size_model("internvl-1b")
    assert full.lm_head.weight is not full.get_input_embeddings().weight


@pytest.mark.fast
def test_a_span_starting_inside_a_token_is_an_error(family, grid):
    _, _, processor, adapter = family
    s = grid.samples[0]
    prompt = adapter.render_prompt(processor, s["question"])
    text = prompt + adapter.render_answer(s["answer"])
    row = data.VLMCollator(processor, adapter)([s])["input_ids"][0]
    tok = processor.tokenizer
    start = adapter.token_span_from(tok, text, len(prompt), row, len(row) - 1, "ok")
    assert tok.decode(row[start:]).strip() == s["answer"] + adapter.end_of_turn
    inside = len(prompt) + len(adapter.answer_prefix) + 2  # within the answer word's token
    with pytest.raises(ValueError, match="sample-x.*does not start on a token boundary"):
        adapter.token_span_from(tok, text, inside, row, len(row) - 1, "sample-x")


@pytest.mark.fast
def test_the_config_alone_gives_the_hidden_size_and_layer_count(family):
    """train.py checks an ID file against these before loading the weights."""
    alias, model, _, adapter = family
    source = models.model_source(alias)
    config, config_adapter = source.config, source.adapter
    assert type(config_adapter) is type(adapter)
    assert config_adapter.lm_hidden_size(config) == adapter.lm_hidden_size(model)
    assert config.get_text_config().num_hidden_layers == len(adapter.lm_layers(model))


@pytest.mark.fast
def test_the_lm_sees_the_image(family, grid):
    """Two images of one question give different states at obj2's token in the last LM layer,
    beyond float rounding: the image reaches the LM. It failed on the tiny Gemma-3 while its
    projection matrix kept HF's all-zero initialisation (states equal to 1e-7 of their size)."""
    import derive_spatial_ids as dsi

    _, model, processor, adapter = family
    first = grid.samples[0]
    other = next(s for s in grid.samples if s["question"] == first["question"] and s["cell2"] != first["cell2"])
    batch, positions, _ = data.split_batch(data.VLMCollator(processor, adapter, with_answer=False)([first, other]), "cpu")
    last = len(adapter.lm_layers(model))
    states = dsi.collect_states(model, adapter, batch, positions, [last])[:, 0]
    assert (states[0] - states[1]).norm() > 1e-4 * states[0].norm(), (states[0] - states[1]).norm() / states[0].norm()
