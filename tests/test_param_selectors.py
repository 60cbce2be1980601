"""param_selectors: structural selection on the real Qwen2-VL-2B architecture (meta device) and on
the tiny model, the greedy budget, the tied-lm_head handling and the CLI flags."""
import argparse

import pytest

import models
from param_selectors import SELECTORS, add_selector_args, select_from_args, select_parameters

VIS = "model.visual.blocks.{}."
LM = "model.language_model.layers.{}."


@pytest.fixture(scope="module")
def big():
    """Qwen2-VL-2B on the meta device (tied lm_head), built once for the module."""
    model = models.full_size_model("qwen2-2b")
    return model, models.adapter_for(model)


def trainable(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def expect(prefix, blocks, suffixes):
    return {prefix.format(i) + s for i in blocks for s in suffixes}


def check_exact(model, sel, expected):
    """The selection is exactly `expected`, in model order, and nothing else requires grad."""
    assert set(sel.names) == expected
    assert len(sel.names) == len(expected)
    assert trainable(model) == sel.names  # named_parameters order == model order
    assert sel.selected_params == sum(p.numel() for n, p in model.named_parameters() if n in expected)
    assert sel.selected_params <= sel.budget


# ------------------------------------------------------------------ Qwen2-VL-2B, meta device

@pytest.mark.fast
def test_default_vision_mlp_selects_last6_fc_weights(big):
    model, adapter = big
    sel = select_parameters(model, adapter)
    assert sel.total_params == models.count_parameters(model) == 2_208_985_600
    assert sel.budget == int(2_208_985_600 * 0.3)
    check_exact(model, sel, expect(VIS, range(26, 32), ["mlp.fc1.weight", "mlp.fc2.weight"]))
    assert sel.share == pytest.approx(sel.selected_params / sel.total_params)
    assert sel.notes == []


@pytest.mark.fast
def test_train_biases_adds_the_mlp_biases(big):
    model, adapter = big
    sel = select_parameters(model, adapter, train_biases=True)
    check_exact(model, sel, expect(VIS, range(26, 32), ["mlp.fc1.weight", "mlp.fc2.weight",
                                                        "mlp.fc1.bias", "mlp.fc2.bias"]))


@pytest.mark.fast
def test_train_projector_adds_the_merger(big):
    model, adapter = big
    fc = expect(VIS, range(26, 32), ["mlp.fc1.weight", "mlp.fc2.weight"])
    merger_w = {"model.visual.merger." + s for s in ["ln_q.weight", "mlp.0.weight", "mlp.2.weight"]}
    merger_b = {"model.visual.merger." + s for s in ["ln_q.bias", "mlp.0.bias", "mlp.2.bias"]}
    sel = select_parameters(model, adapter, train_projector=True)
    check_exact(model, sel, fc | merger_w)
    assert "  projector: ln_q.weight (1.28K), mlp.0.weight (26.21M), mlp.2.weight (7.86M)" in sel.summary()
    sel = select_parameters(model, adapter, train_projector=True, train_biases=True)
    bias = expect(VIS, range(26, 32), ["mlp.fc1.bias", "mlp.fc2.bias"])
    check_exact(model, sel, fc | bias | merger_w | merger_b)


@pytest.mark.fast
def test_vision_attn_and_norms_and_bitfit(big):
    model, adapter = big
    sel = select_parameters(model, adapter, selector="vision_attn_lastk", last_k_blocks=2)
    check_exact(model, sel, expect(VIS, [30, 31], ["attn.qkv.weight", "attn.proj.weight"]))
    sel = select_parameters(model, adapter, selector="vision_attn_lastk", last_k_blocks=2, bitfit_bias_only=True)
    check_exact(model, sel, expect(VIS, [30, 31], ["attn.qkv.bias", "attn.proj.bias"]))
    # Norm selectors take the whole norm (scale and shift).
    sel = select_parameters(model, adapter, selector="vision_norms_lastk", last_k_blocks=1)
    check_exact(model, sel, expect(VIS, [31], ["norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"]))


@pytest.mark.fast
def test_lm_mlp_notes_tied_lm_head_and_selects_last6_mlps(big):
    model, adapter = big
    sel = select_parameters(model, adapter, selector="lm_mlp_lastk")
    check_exact(model, sel, expect(LM, range(22, 28), ["mlp.gate_proj.weight", "mlp.up_proj.weight",
                                                       "mlp.down_proj.weight"]))
    assert not model.get_input_embeddings().weight.requires_grad
    tied = [n for n in sel.notes if "lm_head is tied to the input embeddings" in n]
    assert len(tied) == 1 and "untie or use another selector" in tied[0]
    assert "note: lm_head is tied" in sel.summary()
    # --no_lm_head: no lm_head candidate, hence no tied note either.
    sel = select_parameters(model, adapter, selector="lm_mlp_lastk", include_lm_head=False)
    assert not any("tied" in n for n in sel.notes)


@pytest.mark.fast
def test_lm_head_only_raises_on_tied_model(big):
    model, adapter = big
    with pytest.raises(ValueError, match="tied"):
        select_parameters(model, adapter, selector="lm_head_only")


@pytest.mark.fast
def test_lm_attn_is_qkvo_and_lm_norms_are_both_layernorms(big):
    model, adapter = big
    sel = select_parameters(model, adapter, selector="lm_attn_lastk")
    check_exact(model, sel, expect(LM, range(22, 28), [f"self_attn.{x}_proj.weight" for x in "qkvo"]))
    assert not any("layernorm" in n for n in sel.names)
    sel = select_parameters(model, adapter, selector="lm_norms_lastk", last_k_blocks=2)
    check_exact(model, sel, expect(LM, [26, 27], ["input_layernorm.weight", "post_attention_layernorm.weight"]))
    # RMSNorms have no bias: BitFit on them selects nothing, which is an error.
    with pytest.raises(ValueError, match="no candidate tensors"):
        select_parameters(model, adapter, selector="lm_norms_lastk", bitfit_bias_only=True)


@pytest.mark.fast
def test_tiny_budget_is_a_zero_selection_error(big):
    model, adapter = big
    with pytest.raises(ValueError) as err:
        select_parameters(model, adapter, param_budget_frac=1e-9, last_k_blocks=3)
    msg = str(err.value)
    assert "vision_mlp_lastk" in msg and "budget 2 params" in msg and "last_k_blocks=3" in msg


@pytest.mark.fast
def test_invalid_arguments(big):
    model, adapter = big
    with pytest.raises(ValueError) as err:
        select_parameters(model, adapter, selector="vision_mlp")
    assert all(s in str(err.value) for s in SELECTORS)
    for k in (0, 33):
        with pytest.raises(ValueError, match="last_k_blocks"):
            select_parameters(model, adapter, last_k_blocks=k)
    select_parameters(model, adapter, selector="vision_norms_lastk", last_k_blocks=32)  # all blocks: fine
    with pytest.raises(ValueError, match="only 28"):
        select_parameters(model, adapter, selector="lm_mlp_lastk", last_k_blocks=29)
    for frac in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="param_budget_frac"):
            select_parameters(model, adapter, param_budget_frac=frac)


# ------------------------------------------------------------------ tiny model (untied lm_head)

@pytest.mark.fast
def test_tiny_greedy_takes_largest_first_under_budget(tiny):
    model, _, adapter = tiny
    blocks = adapter.vision_blocks(model)
    qkv_w = blocks[-1].attn.qkv.weight.numel()
    qkv_b = blocks[-1].attn.qkv.bias.numel()
    proj_w = blocks[-1].attn.proj.weight.numel()
    assert qkv_w > proj_w > qkv_b  # the scenario below relies on this ordering
    total = models.count_parameters(model)
    budget = 2 * qkv_w + qkv_b  # both qkv weights, then no proj weight fits, then exactly one qkv bias
    sel = select_parameters(model, adapter, selector="vision_attn_lastk", last_k_blocks=2, train_biases=True,
                            param_budget_frac=(budget + 0.5) / total)
    assert sel.budget == budget
    check_exact(model, sel, {VIS.format(6) + "attn.qkv.weight", VIS.format(7) + "attn.qkv.weight",
                             VIS.format(6) + "attn.qkv.bias"})
    assert sel.selected_params == budget
    # Greedy property: every candidate left out would have broken the budget.
    candidates = expect(VIS, [6, 7], ["attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias"])
    sizes = dict((n, p.numel()) for n, p in model.named_parameters())
    for name in candidates - set(sel.names):
        assert sel.selected_params + sizes[name] > sel.budget
    assert any("did not fit the budget" in n for n in sel.notes)


@pytest.mark.fast
def test_tiny_lm_head_only_and_summary(tiny):
    model, _, adapter = tiny
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    sel = select_parameters(model, adapter, selector="lm_head_only")
    check_exact(model, sel, {"lm_head.weight"})
    assert sel.notes == []

    sel = select_parameters(model, adapter, selector="lm_mlp_lastk", last_k_blocks=2, param_budget_frac=1.0)
    head = model.lm_head.weight.numel()
    check_exact(model, sel, {"lm_head.weight"} | expect(LM, [10, 11], ["mlp.gate_proj.weight", "mlp.up_proj.weight",
                                                                       "mlp.down_proj.weight"]))
    text = sel.summary()
    total = models.count_parameters(model)
    assert f"total params: {total:,}" in text
    assert f"budget: {total:,}" in text
    assert f"selected: {sel.selected_params:,}" in text and "in 7 tensors" in text
    assert f"= {100 * sel.selected_params / total:.2f}% of the model" in text
    lines = text.splitlines()
    layer = "mlp.gate_proj.weight (8.19K), mlp.up_proj.weight (8.19K), mlp.down_proj.weight (8.19K)"
    i = lines.index(f"  lm layer 10: {layer}")
    assert lines[i + 1] == f"  lm layer 11: {layer}"
    assert lines[i + 2] == f"  lm_head: weight ({head / 1e3:.2f}K)"


def test_cli_flags(tiny):
    model, _, adapter = tiny
    parser = add_selector_args(argparse.ArgumentParser())
    args = parser.parse_args([])
    assert (args.selector, args.last_k_blocks, args.param_budget_frac) == ("vision_mlp_lastk", 6, 0.3)
    args = parser.parse_args(["--selector", "lm_mlp_lastk", "--last_k_blocks", "1", "--no_lm_head"])
    sel = select_from_args(model, adapter, args)
    check_exact(model, sel, expect(LM, [11], ["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]))
    args = parser.parse_args(["--last_k_blocks", "1", "--train_projector", "--bitfit_bias_only",
                              "--param_budget_frac", "1"])
    sel = select_from_args(model, adapter, args)
    check_exact(model, sel, expect(VIS, [7], ["mlp.fc1.bias", "mlp.fc2.bias"])
                | {"model.visual.merger." + s for s in ["ln_q.bias", "mlp.0.bias", "mlp.2.bias"]})
    with pytest.raises(SystemExit):
        parser.parse_args(["--train_projector", "--no_projector"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--selector", "nope"])


# ------------------------------------------------------------------ protocols: projector and last_k_of

@pytest.mark.fast
def test_cli_projector_and_last_k_of_flags():
    import protocols

    parser = protocols.add_protocol_arg(add_selector_args(argparse.ArgumentParser()))
    args = parser.parse_args([])
    assert (args.projector, args.last_k_of) == (None, None)
    assert parser.parse_args(["--train_projector"]).projector == "on"
    assert parser.parse_args(["--no_projector"]).projector == "off"
    assert parser.parse_args(["--projector", "name_match", "--last_k_of", "listed"]).last_k_of == "listed"
    for bad in (["--projector", "on", "--no_projector"], ["--train_projector", "--projector", "off"],
                ["--projector", "all"], ["--last_k_of", "first"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    # protocols.resolve fills what the command line left None, and a flag given wins.
    args = parser.parse_args(["--protocol", "paper"])
    protocols.resolve(args)
    assert (args.projector, args.last_k_of) == ("name_match", "listed")
    args = parser.parse_args(["--protocol", "clean", "--train_projector"])
    protocols.resolve(args)
    assert (args.projector, args.last_k_of) == ("on", "used")


@pytest.mark.fast
def test_name_match_never_matches_qwen_merger_and_on_takes_it(big):
    model, adapter = big
    fc = expect(VIS, range(26, 32), ["mlp.fc1.weight", "mlp.fc2.weight"])
    sel = select_parameters(model, adapter, projector="name_match", last_k_of="listed")
    check_exact(model, sel, fc)
    assert any("projector=name_match: no parameter name contains" in n for n in sel.notes)
    assert "projector=name_match last_k_of=listed" in sel.summary().splitlines()[0]
    sel = select_parameters(model, adapter, projector="on")
    assert {n for n in sel.names if ".merger." in n} == {"model.visual.merger." + s for s in
                                                         ["ln_q.weight", "mlp.0.weight", "mlp.2.weight"]}
    with pytest.raises(ValueError, match="projector must be one of"):
        select_parameters(model, adapter, projector="yes")
    with pytest.raises(ValueError, match="contradicts"):
        select_parameters(model, adapter, projector="off", train_projector=True)
    with pytest.raises(ValueError, match="last_k_of must be one of"):
        select_parameters(model, adapter, last_k_of="all")


@pytest.fixture(scope="module")
def llava7b():
    model = models.full_size_model("llava-7b")
    return model, models.adapter_for(model)


@pytest.mark.fast
def test_llava_listed_picks_the_unused_last_block_and_warns(llava7b):
    model, adapter = llava7b
    tower = "model.vision_tower.encoder.layers.{}."
    fc = ["mlp.fc1.weight", "mlp.fc2.weight"]
    projector = {f"model.multi_modal_projector.linear_{i}.{w}" for i in (1, 2) for w in ("weight", "bias")}
    sel = select_parameters(model, adapter, projector="name_match", last_k_of="listed")
    check_exact(model, sel, expect(tower, range(18, 24), fc) | projector)
    assert [n for n in sel.notes if "WARNING" in n] == [
        "WARNING: selected (last_k_of=listed) but the output never reaches the language model "
        "(vision_feature_layer=-2), so no gradient, no change: vision block 23"]
    sel = select_parameters(model, adapter, projector="off", last_k_of="used")
    check_exact(model, sel, expect(tower, range(17, 23), fc))
    assert (sel.num_tensors, sel.selected_params) == (12, 50_331_648)
    assert not any("WARNING" in n for n in sel.notes)
    with pytest.raises(ValueError, match="only 23 vision blocks feed"):
        select_parameters(model, adapter, last_k_blocks=24, last_k_of="used")
    select_parameters(model, adapter, selector="vision_norms_lastk", last_k_blocks=24, last_k_of="listed")


@pytest.mark.fast
def test_mllama_listed_is_local_26_31_and_used_is_global_2_7():
    model = models.full_size_model("llama-11b")
    adapter = models.adapter_for(model)
    assert [(label, len(b)) for label, b in adapter.vision_block_lists(model)] == [("local block", 32),
                                                                                    ("global block", 8)]
    fc = ["mlp.fc1.weight", "mlp.fc2.weight"]
    sel = select_parameters(model, adapter, projector="name_match", last_k_of="listed")
    check_exact(model, sel, expect("model.vision_model.transformer.layers.{}.", range(26, 32), fc)
                | {"model.multi_modal_projector.weight", "model.multi_modal_projector.bias"})
    sel = select_parameters(model, adapter, projector="off", last_k_of="used")
    check_exact(model, sel, expect("model.vision_model.global_transformer.layers.{}.", range(2, 8), fc))
    # Norms and gates of the gated global blocks: the gates are "extra", never a norm or the MLP.
    sel = select_parameters(model, adapter, selector="vision_norms_lastk", last_k_blocks=1)
    assert all("gate" not in n for n in sel.names) and len(sel.names) == 4


def read_families_table():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "model-families.md").read_text()
    table = re.search(r"<!-- table:start -->\n(.*?)<!-- table:end -->", text, re.S).group(1)
    return [line for line in table.strip().splitlines()]


def test_families_table_matches_the_full_size_selection():
    """docs/model-families.md's model-family table == the default selection on every full-size alias under both protocols
    (e.g. qwen2-2b: 12 tensors, 78,643,200 params, 3.56%; llava-7b clean: blocks 17-22)."""
    from param_selectors import selection_table

    rows = read_families_table()
    assert "| qwen2_vl | qwen2-2b | paper | vision block 26-31 | 12 | 78,643,200 | 3.56% |" in rows
    assert "| qwen2_5_vl | qwen-3b | clean | vision block 26-31 | 18 | 78,796,800 | 2.10% |" in rows
    assert "| llava | llava-7b | clean | vision block 17-22 | 12 | 50,331,648 | 0.71% |" in rows
    assert rows == selection_table(list(models.FULL_SIZE_CONFIGS))


@pytest.mark.fast
def test_a_namespace_with_the_former_boolean_flags_still_selects_the_projector(big):
    model, adapter = big
    ns = argparse.Namespace(selector="vision_mlp_lastk", last_k_blocks=6, param_budget_frac=0.3,
                            bitfit_bias_only=False, train_biases=False, no_lm_head=False,
                            train_projector=True, no_projector=False)
    sel = select_from_args(model, adapter, ns)
    assert sel.projector == "on" and any(".merger." in n for n in sel.names)
