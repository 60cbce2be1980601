"""spatial_loss.py: the loss by hand, IDs file I/O and its errors, the one-hook layer capture
against HF's hidden_states, and gradients reaching the vision MLPs through the loss."""
import contextlib
import math

import pytest
import torch

import data
import models
import spatial_loss as sl

LAYER = 11
SIZE = 124


class NotATensor:
    """A custom class: a file holding one of these must be refused, never unpickled."""

    def __init__(self):
        self.payload = [1.0, 2.0]


# ---------------------------------------------------------------------------------------------
# Helpers and fixtures
# ---------------------------------------------------------------------------------------------

def make_image(path, seed):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (112, 112), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    x = 8 + 24 * (seed % 4)
    draw.ellipse([x, 10, x + 20, 30], fill=(220, 30, 30))
    draw.rectangle([10, 60 + 8 * seed, 40, 90 + 8 * seed], fill=(30, 30, 220))
    img.save(path)
    return path


def grid_batch(processor, adapter, tmp_path, cells2):
    """A collated batch: obj1 at (0, 0), obj2 in each cell of `cells2` (one image each)."""
    samples = []
    for i, cell in enumerate(cells2):
        image = make_image(tmp_path / f"img{i}.png", i)
        samples.append(data.sample_record(image, "lr", "left", "red circle", "blue square",
                                          cell1=(0, 0), cell2=cell, size=SIZE))
    batch = data.VLMCollator(processor, adapter)(samples)
    return samples, batch


def hook_counts(model):
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()}


@pytest.fixture(scope="module")
def ro_batch(tiny_ro, tmp_path_factory):
    _, processor, adapter = tiny_ro
    _, batch = grid_batch(processor, adapter, tmp_path_factory.mktemp("imgs"), [(1, 0), (2, 1), (3, 3)])
    return batch


def ids_file(tmp_path, layers=(LAYER,), hidden=4, cells=((0, 0, SIZE), (1, 0, SIZE)), key=int):
    torch.manual_seed(0)
    obj = {key(layer): {"universal": {c: torch.randn(hidden) for c in cells}} for layer in layers}
    path = tmp_path / "ids.pt"
    torch.save(obj, path)
    return path, obj


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------

@pytest.mark.fast
def test_loss_matches_hand_computation():
    cells = [(0, 0, SIZE), (1, 0, SIZE), (2, 3, SIZE)]
    ids = {cells[0]: torch.tensor([1.0, 0.0]), cells[1]: torch.tensor([0.0, 2.0]),
           cells[2]: torch.tensor([1.0, 1.0])}
    states = [[3.0, 1.0], [0.0, 4.0], [-1.0, 2.0]]
    # By hand: mean = (2/3, 7/3); centred rows; cosine with each ID; 1 - mean.
    mean = [sum(s[d] for s in states) / 3 for d in range(2)]
    assert mean == pytest.approx([2 / 3, 7 / 3])
    total = 0.0
    for s, c in zip(states, cells):
        x = [s[d] - mean[d] for d in range(2)]
        v = ids[c].tolist()
        dot = x[0] * v[0] + x[1] * v[1]
        total += dot / (math.hypot(*x) * math.hypot(*v))
    expected = 1 - total / 3
    # Centred rows (7/3, -4/3), (-2/3, 5/3), (-5/3, -1/3) against (1, 0), (0, 2), (1, 1):
    # cosines 7/sqrt(65), 5/sqrt(29), -6/sqrt(52).
    assert total == pytest.approx(7 / math.sqrt(65) + 5 / math.sqrt(29) - 6 / math.sqrt(52))
    loss = sl.SpatialIDLoss(ids)(torch.tensor(states), cells)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.fast
def test_loss_zero_when_aligned_two_when_opposite_any_offset():
    torch.manual_seed(1)
    a, b = torch.randn(8), torch.randn(8)
    cells = [(0, 1, 74), (2, 1, 74), (3, 0, 74)]
    ids = dict(zip(cells, [a, b, -(a + b)]))  # sums to zero: centring leaves them unchanged
    stacked = torch.stack(list(ids.values()))
    offset = torch.randn(8) * 5  # obj1, the scene: common to the batch, removed by centring
    loss_fn = sl.SpatialIDLoss(ids)
    assert loss_fn(2.5 * stacked + offset, cells).item() == pytest.approx(0.0, abs=1e-5)
    assert loss_fn(-3.0 * stacked + offset, cells).item() == pytest.approx(2.0, abs=1e-5)
    # Without centring it would not be 0: the offset dominates the raw states.
    raw_cos = torch.nn.functional.cosine_similarity(2.5 * stacked + offset, stacked, dim=-1).mean()
    assert 1 - raw_cos.item() > 0.05


@pytest.mark.fast
def test_loss_is_float32_for_bfloat16_input():
    torch.manual_seed(2)
    cells = [(0, 0, SIZE), (1, 1, SIZE), (2, 2, SIZE), (3, 3, SIZE)]
    ids = {c: torch.randn(16) for c in cells}
    states = torch.randn(4, 16).to(torch.bfloat16).requires_grad_()
    loss_fn = sl.SpatialIDLoss(ids)
    loss = loss_fn(states, cells)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(loss_fn(states.detach().float(), cells).item(), abs=1e-6)
    loss.backward()
    assert states.grad.dtype == torch.bfloat16 and states.grad.abs().sum() > 0
    # Still float32 when the module itself was cast to bfloat16.
    assert loss_fn.to(torch.bfloat16)(states.detach(), cells).dtype == torch.float32


@pytest.mark.fast
def test_linear_head_starts_as_identity_and_trains():
    torch.manual_seed(3)
    cells = [(0, 0, SIZE), (1, 0, SIZE), (2, 0, SIZE)]
    ids = {c: torch.randn(6) for c in cells}
    states = torch.randn(3, 6)
    plain, head = sl.SpatialIDLoss(ids), sl.SpatialIDLoss(ids, head="linear")
    assert list(plain.parameters()) == []  # the IDs are a buffer, never trained
    params = list(head.parameters())
    assert len(params) == 1 and params[0].shape == (6, 6) and params[0].requires_grad
    assert torch.equal(params[0], torch.eye(6))
    before = head(states, cells)
    assert before.item() == pytest.approx(plain(states, cells).item(), abs=1e-6)
    before.backward()
    assert params[0].grad is not None and params[0].grad.abs().sum() > 0
    torch.optim.SGD(head.parameters(), lr=0.5).step()
    assert head(states, cells).item() < before.item()
    with pytest.raises(ValueError, match="head"):
        sl.SpatialIDLoss(ids, head="mlp")


@pytest.mark.fast
def test_loss_errors_unknown_cell_and_batch_of_one():
    ids = {(0, 0, SIZE): torch.ones(4), (1, 0, SIZE): -torch.ones(4)}
    loss_fn = sl.SpatialIDLoss(ids)
    with pytest.raises(KeyError, match=r"\(3, 2, 124\)"):
        loss_fn(torch.randn(2, 4), [(0, 0, SIZE), (3, 2, SIZE)])
    with pytest.raises(ValueError, match="at least 2"):
        loss_fn(torch.randn(1, 4), [(0, 0, SIZE)])
    with pytest.raises(ValueError, match="2 states but 3 cells"):
        loss_fn(torch.randn(2, 4), [(0, 0, SIZE)] * 3)


@pytest.mark.fast
def test_gather_target_states():
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    out = sl.gather_target_states(hidden, torch.tensor([4, 1]))
    assert torch.equal(out, torch.stack([hidden[0, 4], hidden[1, 1]]))
    with pytest.raises(ValueError, match="outside"):
        sl.gather_target_states(hidden, torch.tensor([5, 0]))


# ---------------------------------------------------------------------------------------------
# File I/O
# ---------------------------------------------------------------------------------------------

@pytest.mark.fast
def test_load_validates_cells_hidden_size_and_layer(tmp_path):
    path, obj = ids_file(tmp_path)
    ids = sl.load_universal_ids(path, LAYER, 4, needed_keys=[(0, 0, SIZE), [1, 0, SIZE]])
    assert set(ids) == {(0, 0, SIZE), (1, 0, SIZE)}
    assert torch.equal(ids[(1, 0, SIZE)], obj[LAYER]["universal"][(1, 0, SIZE)])

    with pytest.raises(ValueError) as err:
        sl.load_universal_ids(path, LAYER, 4, needed_keys=[(0, 0, SIZE), (2, 3, 174), (3, 3, 74)])
    msg = str(err.value)
    assert "(2, 3, 174)" in msg and "(3, 3, 74)" in msg and str(path) in msg and f"layer {LAYER}" in msg
    assert "(0, 0, 124)," not in msg.split("cells with an ID")[0]  # present cells are not listed as missing

    with pytest.raises(ValueError) as err:
        sl.load_universal_ids(path, LAYER, 64)
    msg = str(err.value)
    assert str(path) in msg and f"layer {LAYER}" in msg and "4 dims" in msg and "64" in msg

    with pytest.raises(ValueError) as err:
        sl.load_universal_ids(path, 7, 4)
    msg = str(err.value)
    assert "layer 7" in msg and f"[{LAYER}]" in msg and str(path) in msg


@pytest.mark.fast
def test_pickled_custom_class_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({LAYER: {"universal": {(0, 0, SIZE): NotATensor()}}}, path)
    with pytest.raises(ValueError) as err:
        sl.load_universal_ids(path, LAYER, 4)
    msg = str(err.value)
    assert str(path) in msg and "non-tensor object" in msg and "never unpickled" in msg
    assert "NotATensor" in msg


@pytest.mark.fast
def test_garbage_and_missing_file(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable"):
        sl.load_universal_ids(bad, LAYER, 4)
    missing = tmp_path / "nope" / "ids.pt"
    with pytest.raises(FileNotFoundError) as err:
        sl.load_universal_ids(missing, LAYER, 4)
    assert str(missing) in str(err.value)
    assert "python derive_spatial_ids.py --model" in str(err.value) and "--out" in str(err.value)


@pytest.mark.fast
@pytest.mark.parametrize("key", [int, str])
def test_save_load_round_trip(tmp_path, key):
    torch.manual_seed(4)
    cells = [(c, r, s) for c in range(2) for r in range(2) for s in (74, 224)]
    per_layer = {key(3): {c: torch.randn(5) for c in cells}, key(LAYER): {c: torch.randn(5) for c in cells}}
    x_axis = {key(3): torch.randn(5), key(LAYER): torch.randn(5)}
    y_axis = {key(3): torch.randn(5), key(LAYER): torch.randn(5)}
    out = tmp_path / "sub" / "dir" / "qwen_ids.pt"
    written = sl.save_universal_ids(out, per_layer, x_axis=x_axis, y_axis=y_axis)
    assert written == [out, out.with_name("qwen_ids_x_axis.pt"), out.with_name("qwen_ids_y_axis.pt")]
    raw = torch.load(out, weights_only=True)
    assert sorted(raw) == [3, LAYER] and set(raw[LAYER]) == {"universal"}  # the original's layout
    for layer in (3, LAYER):
        ids = sl.load_universal_ids(out, layer, 5, needed_keys=cells)
        for c in cells:
            assert torch.equal(ids[c], per_layer[key(layer)][c])
    x = torch.load(written[1], weights_only=True)
    y = torch.load(written[2], weights_only=True)
    assert torch.equal(x[LAYER], x_axis[key(LAYER)]) and torch.equal(y[3], y_axis[key(3)])
    # A file written elsewhere with str layer keys loads too.
    path, obj = ids_file(tmp_path, key=str)
    assert torch.equal(sl.load_universal_ids(path, LAYER, 4)[(0, 0, SIZE)], obj[str(LAYER)]["universal"][(0, 0, SIZE)])


@pytest.mark.fast
def test_save_without_axes_writes_one_file(tmp_path):
    out = tmp_path / "ids.pt"
    assert sl.save_universal_ids(out, {LAYER: {(0, 0, SIZE): torch.ones(3)}}) == [out]
    assert not out.with_name("ids_x_axis.pt").exists()


# ---------------------------------------------------------------------------------------------
# Layer capture on the tiny model
# ---------------------------------------------------------------------------------------------

@pytest.mark.fast
def test_capture_layer_matches_hf_hidden_states(tiny_ro, ro_batch):
    model, _, adapter = tiny_ro
    batch = {k: v for k, v in ro_batch.items() if k != "target_positions"}
    n = len(adapter.lm_layers(model))
    assert n == 12
    layers = (0, 1, LAYER, n)
    before = hook_counts(model)
    with torch.no_grad(), contextlib.ExitStack() as stack:
        caps = {L: stack.enter_context(sl.capture_layer(model, adapter, L)) for L in layers}
        out = model(**batch, output_hidden_states=True)
    assert len(out.hidden_states) == n + 1
    for L in layers:
        assert caps[L].states is not None, L
        assert caps[L].states.shape == out.hidden_states[L].shape
        assert torch.equal(caps[L].states, out.hidden_states[L]), L
    # Neighbouring layers differ, so a one-off capture would fail the check above.
    assert not torch.equal(out.hidden_states[LAYER], out.hidden_states[LAYER - 1])
    assert not torch.equal(out.hidden_states[n], out.hidden_states[n - 1])

    # Without output_hidden_states, still the same values (the capture needs no flag).
    ref = out.hidden_states
    before = hook_counts(model)  # HF installs its own recording hooks on first use
    with torch.no_grad(), sl.capture_layer(model, adapter, LAYER) as cap:
        added = sum(a + b for a, b in hook_counts(model).values()) - sum(a + b for a, b in before.values())
        assert added == 1  # one hook
        model(**batch)
    assert torch.equal(cap.states, ref[LAYER])
    assert hook_counts(model) == before

    # Removed after exit: a later forward does not record.
    cap.states = None
    with torch.no_grad():
        model(**batch)
    assert cap.states is None


@pytest.mark.fast
def test_capture_layer_removes_hook_on_error_and_rejects_bad_layers(tiny_ro):
    model, _, adapter = tiny_ro
    before = hook_counts(model)
    for L in (0, 5, 12):
        with pytest.raises(RuntimeError, match="boom"):
            with sl.capture_layer(model, adapter, L):
                assert hook_counts(model) != before
                raise RuntimeError("boom")
        assert hook_counts(model) == before
    for bad in (-1, 13, 2.0, True):
        with pytest.raises(ValueError, match="out of range"):
            with sl.capture_layer(model, adapter, bad):
                pass
    assert hook_counts(model) == before
    assert adapter.lm_final_norm(model) is model.model.language_model.norm


@pytest.mark.fast
def test_gradients_reach_vision_mlp_through_the_loss(tiny, tmp_path):
    model, processor, adapter = tiny
    name = "model.visual.blocks.7.mlp.fc1.weight"
    params = dict(model.named_parameters())
    assert name in params
    for n_, p in params.items():
        p.requires_grad_(n_ == name)
    cells2 = [(1, 0), (2, 2), (3, 1)]
    samples, batch = grid_batch(processor, adapter, tmp_path, cells2)
    positions = batch.pop("target_positions")
    torch.manual_seed(5)
    cells = [tuple(c) for c in batch.pop("target_cells").tolist()]
    assert cells == [(c, r, SIZE) for c, r in cells2]
    loss_fn = sl.SpatialIDLoss({c: torch.randn(adapter.lm_hidden_size(model)) for c in cells})
    with sl.capture_layer(model, adapter, LAYER) as cap:
        model(**batch)
    states = sl.gather_target_states(cap.states, positions)
    assert states.shape == (3, 64) and states.requires_grad
    loss = loss_fn(states, cells)
    assert 0 < loss.item() < 2
    loss.backward()
    grad = params[name].grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(p.grad is None for n_, p in params.items() if n_ != name)

