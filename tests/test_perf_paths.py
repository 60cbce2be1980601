"""The fast paths equal the plain ones: the LM loss with the head at supervised positions only
(value and gradients against HF's `labels=` loss), last-position scoring, score mode without
generate, and the ID derivation batched across groups with only the requested layers kept
(against the one-group-per-forward recipe with all hidden states)."""
from collections import defaultdict

import pytest
import torch

import data
import derive_spatial_ids as dsi
import eval_coco
import scoring
import lm_loss
import make_grid_data as mg
import param_selectors
import spatial_loss as sl

N_LAYERS = 12  # the tiny model's LM layers: hidden_states 0..12


@pytest.fixture(scope="module")
def grid_samples(tmp_path_factory):
    """One ordered object pair at one size, 28 px cells: 240 images, 384 questions, 32 groups."""
    out = tmp_path_factory.mktemp("grid")
    mg.make_grid_images(out, mg.builtin_objects(), cell=28, sizes=(124,), max_pairs=1, seed=0, progress=False)
    return data.GridDataset(out).samples


def _mixed_batch(samples, processor, adapter, n=6, side="right"):
    """A training batch mixing both question types (so rows have different lengths, padded)."""
    lr = [s for s in samples if s["options"] == data.OPTIONS["lr"]][: n // 2]
    ab = [s for s in samples if s["options"] != data.OPTIONS["lr"]][: n - n // 2]
    tokenizer = processor.tokenizer
    old, tokenizer.padding_side = tokenizer.padding_side, side
    try:
        batch = data.VLMCollator(processor, adapter)(lr + ab)
    finally:
        tokenizer.padding_side = old
    assert (batch["attention_mask"] == 0).any(), "the batch should need padding"
    return data.split_batch(batch, "cpu")


# ---------------------------------------------------------------------------------------------
# LM loss
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("path", ["forward", "backbone"])
def test_loss_equals_hf_labels_loss(tiny, grid_samples, side, path):
    model, processor, adapter = tiny
    batch, _, _ = _mixed_batch(grid_samples, processor, adapter, side=side)
    head_rows = []
    handle = adapter.lm_head(model).register_forward_hook(lambda m, a, o: head_rows.append(o.shape[:-1].numel()))
    with torch.no_grad():
        reference = model(**batch).loss
        ours = lm_loss.supervised_lm_loss(model, adapter, batch, path=path)
    handle.remove()
    assert torch.isfinite(reference)
    assert abs(ours.loss.item() - reference.item()) <= 1e-5
    # the answer and the end-of-turn token of every row, no more (the first label is never predicted)
    assert ours.n_tokens == int((batch["labels"][:, 1:] != -100).sum()) == int((batch["labels"] != -100).sum())
    # the head ran on every position for the reference, on the supervised ones only for ours
    assert head_rows == [batch["input_ids"].numel(), ours.n_tokens]
    if path == "backbone":
        assert ours.last_hidden_state.shape[:2] == batch["input_ids"].shape


@pytest.mark.fast
def test_loss_without_the_shift_differs(tiny, grid_samples, monkeypatch):
    """The equality above can fail: supervising each position with its own token (no shift) is
    another loss."""
    model, processor, adapter = tiny
    batch, _, _ = _mixed_batch(grid_samples, processor, adapter)
    monkeypatch.setattr(lm_loss, "shifted_labels", lambda labels: labels)
    with torch.no_grad():
        reference = model(**batch).loss
        unshifted = lm_loss.supervised_lm_loss(model, adapter, batch).loss
    assert abs(unshifted.item() - reference.item()) > 1e-2


@pytest.mark.fast
def test_labels_argument_and_no_labels(tiny, grid_samples):
    model, processor, adapter = tiny
    batch, _, _ = _mixed_batch(grid_samples, processor, adapter)
    labels = batch.pop("labels")
    with torch.no_grad():
        a = lm_loss.supervised_lm_loss(model, adapter, batch, labels).loss
        b = lm_loss.supervised_lm_loss(model, adapter, dict(batch, labels=labels)).loss
        # HF's loss for no supervised token is NaN; so is ours (train.py counts and skips it)
        none = lm_loss.supervised_lm_loss(model, adapter, batch, torch.full_like(labels, -100)).loss
    assert a.item() == b.item()
    assert torch.isnan(none)
    with pytest.raises(ValueError, match="needs labels"):
        lm_loss.supervised_lm_loss(model, adapter, batch)


@pytest.mark.parametrize("path", ["forward", "backbone"])
def test_gradients_equal_hf_on_the_trainable_tensors(tiny, grid_samples, path):
    model, processor, adapter = tiny
    selection = param_selectors.select_parameters(model, adapter)
    # the head and the last LM layer too, so the head's gradient (its rows at supervised tokens) is checked
    for p in [*adapter.lm_head(model).parameters(), *adapter.lm_layers(model)[-1].parameters()]:
        p.requires_grad_(True)
    model.train()
    batch, _, _ = _mixed_batch(grid_samples, processor, adapter)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(selection.names) < set(trainable)

    def grads(loss_fn):
        model.zero_grad(set_to_none=True)
        loss_fn().backward()
        return {n: p.grad.clone() for n, p in trainable.items()}

    reference = grads(lambda: model(**batch).loss)
    ours = grads(lambda: lm_loss.supervised_lm_loss(model, adapter, batch, path=path).loss)
    assert all(g.abs().sum() > 0 for g in reference.values())
    for name in trainable:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.fast
def test_spatial_hook_sees_the_same_layer(tiny, grid_samples):
    model, processor, adapter = tiny
    batch, positions, _ = _mixed_batch(grid_samples, processor, adapter)
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
        for layer in (0, 6, 11, N_LAYERS):
            for path in ("forward", "backbone"):
                with sl.capture_layer(model, adapter, layer) as captured:
                    out = lm_loss.supervised_lm_loss(model, adapter, batch, path=path)
                torch.testing.assert_close(captured.states, hidden[layer], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.last_hidden_state, hidden[N_LAYERS], rtol=1e-5, atol=1e-6)


@pytest.mark.fast
def test_last_position_logits_equal_the_full_logits(tiny_ro, grid_samples):
    model, processor, adapter = tiny_ro
    batch, _, _ = _mixed_batch(grid_samples, processor, adapter, side="left")
    batch.pop("labels")
    with torch.no_grad():
        full = model(**batch).logits[:, -1].float()
        for path in ("forward", "backbone"):
            ours = lm_loss.last_position_logits(model, adapter, batch, path=path)
            assert ours.shape == full.shape
            torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)


@pytest.mark.fast
def test_adapter_method_is_used_when_present(tiny_ro, grid_samples):
    model, processor, adapter = tiny_ro
    batch, _, _ = _mixed_batch(grid_samples, processor, adapter)
    calls = []

    class WithHook:
        def __getattr__(self, name):
            return getattr(adapter, name)

        def lm_last_hidden_state(self, model, inputs):
            calls.append(sorted(inputs))
            return model.model(**inputs, use_cache=False).last_hidden_state

    with torch.no_grad():
        lm_loss.supervised_lm_loss(model, WithHook(), batch, path="backbone")
    assert calls and "labels" not in calls[0]


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

@pytest.mark.fast
def test_score_mode_runs_no_generate_unless_asked(tiny_ro, grid_samples, monkeypatch):
    model, processor, adapter = tiny_ro
    samples = grid_samples[:5]
    expected = eval_coco.score_answers(model, processor, adapter, samples, batch_size=1, progress=False)
    real_generate = eval_coco.generate_answers
    calls = []

    def counting_generate(*args, **kwargs):
        calls.append(1)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(eval_coco, "generate_answers", counting_generate)
    report, rows = eval_coco.evaluate(model, processor, adapter, samples, batch_size=3, mode="score", progress=False)
    assert not calls
    assert [r["prediction"] for r in rows] == expected
    assert all(r["generated"] is None for r in rows)
    assert "agreement_with_generate" not in report and "agreement" not in scoring.format_report(report)

    report, rows = eval_coco.evaluate(model, processor, adapter, samples, batch_size=3, mode="score",
                                      progress=False, agreement=True)
    assert calls == [1]
    assert [r["prediction"] for r in rows] == expected
    assert 0 <= report["agreement_with_generate"] <= 1
    # train.py's positional call still works
    report, _ = eval_coco.evaluate(model, processor, adapter, samples, 3, "score", desc="x", progress=False)
    assert calls == [1] and report["n"] == 5


@pytest.mark.fast
def test_score_is_one_forward_per_batch_with_the_head_at_one_position(tiny_ro, grid_samples):
    model, processor, adapter = tiny_ro
    seen = []
    handles = [model.model.register_forward_hook(lambda m, a, o: seen.append("backbone")),
               adapter.lm_head(model).register_forward_hook(lambda m, a, o: seen.append(tuple(o.shape)))]
    try:
        eval_coco.score_answers(model, processor, adapter, grid_samples[:7], batch_size=4, progress=False)
    finally:
        for h in handles:
            h.remove()
    vocab = adapter.lm_head(model).out_features
    assert seen == ["backbone", (4, 1, vocab), "backbone", (3, 1, vocab)]  # [batch, last position, vocab]


# ---------------------------------------------------------------------------------------------
# Derivation
# ---------------------------------------------------------------------------------------------

def _one_group_per_forward(model, processor, adapter, samples):
    """The recipe as it was: one group per forward pass, all hidden states, full logits;
    centre within the group, mean per cell."""
    groups = [g for g in data.group_indices(samples, range(len(samples))).values() if len(g) >= 2]
    collate = data.VLMCollator(processor, adapter, with_answer=False)
    sums, counts = defaultdict(lambda: 0.0), defaultdict(int)
    with torch.no_grad():
        for group in groups:
            batch, positions, cells = data.split_batch(collate([samples[i] for i in group]), "cpu")
            hidden = model(**batch, output_hidden_states=True).hidden_states
            states = torch.stack([sl.gather_target_states(h, positions) for h in hidden], 1).float()
            states = states - states.mean(0, keepdim=True)
            for key, state in zip(cells, states):
                sums[key] = sums[key] + state
                counts[key] += 1
    return {layer: {k: sums[k][layer] / counts[k] for k in sums} for layer in range(N_LAYERS + 1)}, dict(counts)


@pytest.fixture(scope="module")
def reference_ids(tiny_ro, grid_samples):
    return _one_group_per_forward(*tiny_ro, grid_samples)


def _assert_same_ids(got, expected, layers):
    for layer in layers:
        assert set(got[layer]) == set(expected[layer])
        scale = max(v.abs().max().item() for v in expected[layer].values())
        for key, vec in expected[layer].items():
            torch.testing.assert_close(got[layer][key], vec, rtol=1e-4, atol=1e-4 * scale + 1e-7,
                                       msg=f"layer {layer}, cell {key}")


def test_batched_derivation_equals_one_group_per_forward(tiny_ro, grid_samples, reference_ids):
    model, processor, adapter = tiny_ro
    expected, counts = reference_ids
    # 7 questions per pass: batches straddle groups of 12 and of fewer
    per_layer, stats = dsi.derive(model, processor, adapter, grid_samples, batch_size=7, progress=False)
    assert sorted(per_layer) == list(range(N_LAYERS + 1)) and stats["layer_ids"] == list(range(N_LAYERS + 1))
    assert stats["counts"] == counts and stats["questions"] == len(grid_samples) and stats["images"] == 240
    _assert_same_ids(per_layer, expected, range(2, N_LAYERS + 1))  # 0-1: float residue, see test_derive_spatial_ids

    # with the same batches as the plain recipe (a group of 12 per forward) the IDs are bit-identical:
    # no head, hooks and the early stop change nothing; the differences above come from other batch shapes
    assert {len(g) for g in data.group_indices(grid_samples, range(len(grid_samples))).values()} == {12}
    same, _ = dsi.derive(model, processor, adapter, grid_samples, batch_size=12, progress=False, layers=[6, 12])
    for layer in (6, 12):
        assert all(torch.equal(same[layer][key], expected[layer][key]) for key in expected[layer])


def test_centring_over_other_sets_than_the_groups_is_caught(tiny_ro, grid_samples, reference_ids,
                                                             monkeypatch):
    """The equality above can fail: centring each half-group on its own (as a batch boundary
    would, if batches were centred) gives other IDs."""
    model, processor, adapter = tiny_ro
    expected, _ = reference_ids
    real = data.group_indices

    def halves(samples, indices):
        out = {}
        for key, group in real(samples, indices).items():
            out[(key, 0)], out[(key, 1)] = group[: len(group) // 2], group[len(group) // 2:]
        return out

    monkeypatch.setattr(dsi.data, "group_indices", halves)
    wrong, _ = dsi.derive(model, processor, adapter, grid_samples, batch_size=7, progress=False, layers=[11])
    with pytest.raises(AssertionError):
        _assert_same_ids(wrong, expected, [11])


def test_only_the_requested_layers_are_kept(tiny_ro, grid_samples, reference_ids):
    model, processor, adapter = tiny_ro
    expected, _ = reference_ids
    stopped_after = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: stopped_after.append(i))
               for i, layer in enumerate(adapter.lm_layers(model))]
    try:
        per_layer, stats = dsi.derive(model, processor, adapter, grid_samples[:24], batch_size=24, progress=False,
                                      layers="6,11")
    finally:
        for h in handles:
            h.remove()
    assert sorted(per_layer) == [6, 11] and stats["layers"] == 2
    assert max(stopped_after) == 10  # the forward stopped after the layer that outputs hidden_states[11]
    full, _ = dsi.derive(model, processor, adapter, grid_samples[:24], batch_size=24, progress=False)
    for layer in (6, 11):
        for key in per_layer[layer]:
            torch.testing.assert_close(per_layer[layer][key], full[layer][key], rtol=1e-5, atol=1e-6)


@pytest.mark.fast
def test_resolve_layers():
    assert dsi.resolve_layers(None, 12) == list(range(13)) == dsi.resolve_layers("all", 12)
    assert dsi.resolve_layers("11", 12) == [11]
    assert dsi.resolve_layers("12, 6,8-9", 12) == [6, 8, 9, 12]
    assert dsi.resolve_layers([3, 1, 3], 12) == [1, 3]
    for bad in ("13", "x", "3-", "-1"):
        with pytest.raises(ValueError):
            dsi.resolve_layers(bad, 12)


def test_fewer_groups_give_noisier_ids(tiny_ro, grid_samples):
    model, processor, adapter = tiny_ro
    _, full = dsi.derive(model, processor, adapter, grid_samples, batch_size=24, progress=False, layers=[11])
    _, few = dsi.derive(model, processor, adapter, grid_samples, batch_size=24, progress=False, layers=[11],
                        max_groups=8)
    assert few["groups"] == 8 and full["groups"] == 32
    assert few["relative_stderr"][11] > 1.3 * full["relative_stderr"][11]


@pytest.mark.fast
def test_cli_layers_flag(tiny_path, tmp_path, grid_samples):
    images = grid_samples[0]["image_path"].rsplit("/", 1)[0]
    out = tmp_path / "ids.pt"
    per_layer, stats = dsi.main(["--model", "tiny", "--images", images, "--out", str(out), "--protocol", "clean",
                                 "--layers", "11", "--max_groups", "4"])
    assert sorted(per_layer) == [11]
    saved = torch.load(out, weights_only=True)
    assert sorted(saved) == [11]
    assert len(sl.load_universal_ids(out, 11, 64)) == stats["cells"]
    with pytest.raises(SystemExit, match="--layers"):
        dsi.main(["--model", "tiny", "--images", images, "--out", str(tmp_path / "b.pt"), "--layers", "13"])


@pytest.mark.fast
def test_forward_path_goes_through_a_wrapper(tiny_ro, grid_samples):
    """Under DistributedDataParallel / accelerate the model is a wrapper whose own forward must run
    (it syncs gradients); the default path calls the model it is given, never `.model` behind it."""
    model, processor, adapter = tiny_ro
    batch, _, _ = _mixed_batch(grid_samples, processor, adapter)
    calls = []

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **kwargs):
            calls.append(sorted(kwargs))
            return self.module(**kwargs)

    with torch.no_grad():
        reference = model(**batch).loss
        ours = lm_loss.supervised_lm_loss(Wrapper(model), adapter, batch)
        logits = lm_loss.last_position_logits(Wrapper(model), adapter, {k: v for k, v in batch.items() if k != "labels"})
    assert len(calls) == 2 and "labels" not in calls[0] and "logits_to_keep" in calls[0]
    assert abs(ours.loss.item() - reference.item()) <= 1e-5
    assert logits.shape == (batch["input_ids"].shape[0], adapter.lm_head(model).out_features)


@pytest.mark.fast
@pytest.mark.parametrize("family", ["tiny-qwen2.5", "tiny-llava", "tiny-mllama", "tiny-internvl", "tiny-gemma3"])
def test_supervised_loss_equals_hf_loss_for_every_family(family, tmp_path):
    """The loss path train.py uses (the head at supervised positions through the model's own
    forward) gives HF's `labels=` loss for every family's forward, not only Qwen2-VL's."""
    import models

    objects = mg.builtin_objects(64)
    mg.make_grid_images(tmp_path, {n: objects[n] for n in ("red circle", "blue square")}, cell=28, sizes=(124,),
                        max_pairs=1, max_images=4, seed=0, progress=False)
    model, processor, adapter = models.load_model_and_processor(family)
    samples = data.GridDataset(tmp_path, "paper").samples[:4]
    inputs, _, _ = data.split_batch(data.VLMCollator(processor, adapter)(samples), "cpu")
    with torch.no_grad():
        reference = model(**inputs).loss
        ours = lm_loss.supervised_lm_loss(model, adapter, inputs).loss
        unshifted = torch.nn.functional.cross_entropy(  # the check can fail: labels not shifted
            model(**{k: v for k, v in inputs.items() if k != "labels"}).logits.float()[inputs["labels"] != -100],
            inputs["labels"][inputs["labels"] != -100])
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert not torch.isclose(unshifted, reference, rtol=1e-3)
