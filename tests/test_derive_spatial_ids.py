"""derive_spatial_ids.py: the CLI's IDs and axis files, centring within groups, one group against a
hand computation from HF's hidden_states, the axes' directions, and a folder without images.

Two ordered object pairs at one size on 28 px cells (2 x 240 images, 768 questions, 64 groups)
keep the whole file fast; the CLI runs once per module."""
import pytest
import torch

import data
import derive_spatial_ids as dsi
import make_grid_data as mg
import models
import spatial_loss as sl

SIZE = 124
HIDDEN = 64  # the tiny model's LM hidden size
N_LAYERS = 12  # the tiny model's LM layers: hidden_states 0..12
ALL_CELLS = [(col, row, SIZE) for col in range(data.GRID) for row in range(data.GRID)]


@pytest.fixture(scope="module")
def grid_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    mg.make_grid_images(out, mg.builtin_objects(), cell=28, sizes=(SIZE,), max_pairs=2, seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def grid_samples(grid_dir):
    return data.GridDataset(grid_dir).samples


@pytest.fixture(scope="module")
def derived(grid_dir, tiny_path, tmp_path_factory):
    """(per_layer, stats, ids path) of one CLI run over the whole grid folder."""
    out = tmp_path_factory.mktemp("derived") / "ids" / "tiny.pt"
    per_layer, stats = dsi.main(["--model", "tiny", "--images", str(grid_dir), "--out", str(out), "--protocol", "clean",
                                 "--batch_size", "16"])
    return per_layer, stats, out


def test_grid_data_shape(grid_samples):
    # 2 ordered pairs x 16 obj1 cells x 15 obj2 cells; a question per differing axis
    assert len({s["image_path"] for s in grid_samples}) == 2 * 240
    assert len({(s["obj1"], s["obj2"]) for s in grid_samples}) == 2
    assert len(grid_samples) == 2 * 16 * 12 * 2
    assert {s["size"] for s in grid_samples} == {SIZE}


def test_cli_writes_ids_for_every_layer_and_cell(derived, grid_samples):
    per_layer, stats, out = derived
    assert out.is_file()
    groups = data.group_indices(grid_samples, range(len(grid_samples)))
    assert stats["layers"] == N_LAYERS + 1
    assert stats["hidden_size"] == HIDDEN
    assert stats["groups"] == len(groups) == 2 * 16 * 2
    assert stats["questions"] == len(grid_samples)
    assert stats["pairs"] == 2
    assert stats["cells"] == len(ALL_CELLS)
    assert sorted(per_layer) == list(range(N_LAYERS + 1))

    # The file loads through the loss's loader for every layer, covering every cell, and holds
    # exactly what main returned.
    # (Layer 0's IDs are float-rounding residue, see test_layer_zero_is_the_embeddings, and may be
    # exactly zero, which the loader refuses; nobody trains on layer 0.)
    for layer in range(1, N_LAYERS + 1):
        ids = sl.load_universal_ids(out, layer, HIDDEN, needed_keys=ALL_CELLS)
        assert set(ids) == set(ALL_CELLS)
        for key in ALL_CELLS:
            assert torch.equal(ids[key], per_layer[layer][key].float())
    with pytest.raises(ValueError, match="no universal spatial IDs for layer 13"):
        sl.load_universal_ids(out, N_LAYERS + 1, HIDDEN)
    raw = torch.load(out, map_location="cpu", weights_only=True)
    assert set(raw) == set(range(N_LAYERS + 1))
    assert set(raw[0]["universal"]) == set(ALL_CELLS)
    for key in ALL_CELLS:
        assert torch.equal(raw[0]["universal"][key], per_layer[0][key])


def test_axis_files(derived):
    per_layer, _, out = derived
    x_path, y_path = out.with_name("tiny_x_axis.pt"), out.with_name("tiny_y_axis.pt")
    assert (x_path, y_path) == sl.axis_paths(out)
    x_axis = torch.load(x_path, map_location="cpu", weights_only=True)
    y_axis = torch.load(y_path, map_location="cpu", weights_only=True)
    assert set(x_axis) == set(y_axis) == set(range(N_LAYERS + 1))
    for layer in range(N_LAYERS + 1):
        ids = per_layer[layer]
        # The mean neighbour difference over 3 steps x 4 lines telescopes to the end-to-end sum / 12.
        x_hand = sum(ids[(3, r, SIZE)] - ids[(0, r, SIZE)] for r in range(4)) / 12
        y_hand = sum(ids[(c, 3, SIZE)] - ids[(c, 0, SIZE)] for c in range(4)) / 12
        assert x_axis[layer].shape == y_axis[layer].shape == (HIDDEN,)
        torch.testing.assert_close(x_axis[layer], x_hand, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y_axis[layer], y_hand, rtol=1e-5, atol=1e-6)


def test_axes_point_from_left_to_right_and_top_to_bottom(derived):
    per_layer, _, out = derived
    x_axis = torch.load(out.with_name("tiny_x_axis.pt"), weights_only=True)[11]
    y_axis = torch.load(out.with_name("tiny_y_axis.pt"), weights_only=True)[11]
    ids = sl.load_universal_ids(out, 11, HIDDEN, needed_keys=ALL_CELLS)

    def mean_proj(keys, axis):
        return torch.stack([ids[k] @ axis for k in keys]).mean()

    right = mean_proj([(3, r, SIZE) for r in range(4)], x_axis)
    left = mean_proj([(0, r, SIZE) for r in range(4)], x_axis)
    bottom = mean_proj([(c, 3, SIZE) for c in range(4)], y_axis)
    top = mean_proj([(c, 0, SIZE) for c in range(4)], y_axis)
    assert right > left
    assert bottom > top


def test_centring_makes_count_weighted_ids_sum_to_zero(derived, grid_samples):
    per_layer, stats, _ = derived
    # The counts are how many questions put obj2 in each cell (all groups have >= 2 questions).
    expected = {}
    for s in grid_samples:
        key = (*s["cell2"], s["size"])
        expected[key] = expected.get(key, 0) + 1
    assert stats["counts"] == expected
    assert stats["min_count"] == min(expected.values())
    # Layers 0 and 1 carry almost no image signal in the random tiny model (see below): their
    # IDs are at float-rounding level, so a relative tolerance means nothing there.
    for layer in range(2, N_LAYERS + 1):
        ids = per_layer[layer]
        total = sum(stats["counts"][k] * ids[k] for k in ids)
        scale = sum(stats["counts"][k] * ids[k].norm() for k in ids)
        assert scale > 0
        assert total.norm() <= 1e-4 * scale, f"layer {layer}: IDs are not centred within groups"


def test_layer_zero_is_the_embeddings(derived):
    # hidden_states[0] is the token embedding of obj2's name, the same whatever the image, so
    # centring leaves (float rounding of) nothing; deeper layers have read the image.
    per_layer, _, _ = derived

    def norm(layer):
        return torch.stack(list(per_layer[layer].values())).norm()

    for layer in range(2, N_LAYERS + 1):
        assert norm(0) < 1e-3 * norm(layer), f"layer 0 is not the embeddings (vs layer {layer})"


@pytest.mark.fast
def test_one_group_matches_hand_computation(tiny_ro, grid_samples):
    model, processor, adapter = tiny_ro
    groups = data.group_indices(grid_samples, range(len(grid_samples)))
    key = next(k for k in groups if k[-1] == "lr")
    group = [grid_samples[i] for i in groups[key]]
    assert len(group) == 12 and len({s["cell2"] for s in group}) == 12

    # By hand: HF's hidden_states at obj2's last name token, centred over the group.
    batch = data.VLMCollator(processor, adapter, with_answer=False)(group)
    positions = batch.pop("target_positions")
    cells = [tuple(c) for c in batch.pop("target_cells").tolist()]
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    assert len(hidden) == N_LAYERS + 1
    rows = torch.arange(len(group))
    # the position really is obj2's last name token
    name_ids = processor.tokenizer(" " + group[0]["obj2"], add_special_tokens=False)["input_ids"]
    assert (batch["input_ids"][rows, positions] == name_ids[-1]).all()

    # Uneven batches (5, 5, 2) in derive must not change anything.
    per_layer, stats = dsi.derive(model, processor, adapter, group, batch_size=5, progress=False)
    assert stats["groups"] == 1 and stats["questions"] == 12
    assert stats["counts"] == {cell: 1 for cell in cells}
    assert sorted(per_layer) == list(range(N_LAYERS + 1))
    for layer in (1, 6, 11, 12):
        states = hidden[layer][rows, positions].float()
        centred = states - states.mean(0, keepdim=True)
        got = torch.stack([per_layer[layer][cell] for cell in cells])
        torch.testing.assert_close(got, centred, rtol=1e-4, atol=1e-4 * centred.abs().max().item())
        assert centred.norm() > 0


@pytest.mark.fast
def test_folder_without_usable_images_exits_naming_it(tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load when there are no images")

    monkeypatch.setattr(dsi, "load_model_and_processor", no_model)
    monkeypatch.setattr(models, "load_model_and_processor", no_model)
    folder = tmp_path / "empty_grid"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    (folder / "holiday_photo.png").write_bytes(b"")  # a .png whose name is no grid layout
    out = tmp_path / "ids.pt"
    with pytest.raises(SystemExit) as info:
        dsi.main(["--model", "tiny", "--images", str(folder), "--out", str(out)])
    assert str(folder) in str(info.value.code)
    assert not out.exists()

    missing = tmp_path / "no_such_folder"
    with pytest.raises(SystemExit) as info:
        dsi.main(["--model", "tiny", "--images", str(missing), "--out", str(out)])
    assert str(missing) in str(info.value.code)
