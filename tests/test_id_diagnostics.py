"""id_diagnostics.py: Figure 5 on constructed IDs, the universality statistics on constructed
states (a shared code against per-pair codes), and the whole script on the random `tiny` and on
`tiny-warm`, each failure mode showing as itself."""
import json
import random

import pytest
import torch

import data
import derive_spatial_ids
import id_diagnostics as diag
import make_grid_data

H = 64


def planted_ids(seed, noise=0.5, sizes=(124,)):
    """A linear grid code: ID(col, row, size) = col * u + row * v + noise."""
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(H, generator=g), torch.randn(H, generator=g)
    return {(c, r, s): c * u + r * v + noise * torch.randn(H, generator=g)
            for c in range(4) for r in range(4) for s in sizes}


def shuffled(ids, seed):
    keys = sorted(ids)
    vectors = [ids[k] for k in keys]
    random.Random(seed).shuffle(vectors)
    return dict(zip(keys, vectors))


# --- Figure 5 ----------------------------------------------------------------------------------

@pytest.mark.fast
@pytest.mark.parametrize("seed", range(5))
def test_a_planted_grid_code_projects_monotone_and_the_same_ids_shuffled_do_not(seed):
    ids = planted_ids(seed)
    grid = diag.plane_projection(ids, *derive_spatial_ids.axis_directions(ids))
    assert grid["rho_col"] >= 0.9 and grid["rho_row"] >= 0.9, grid
    assert grid["plane_share"] > 0.8
    mixed = shuffled(ids, seed)
    # The axes are recomputed from the shuffled IDs, as derive_spatial_ids.py would write them.
    broken = diag.plane_projection(mixed, *derive_spatial_ids.axis_directions(mixed))
    assert broken["rho_col"] < 0.5 and broken["rho_row"] < 0.5, broken


@pytest.mark.fast
def test_spearman_by_hand():
    assert diag.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert diag.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks with ties: a = (0.5, 0.5, 2.5, 2.5), b = (0, 1, 2, 3) -> r = 4 / sqrt(4 * 5)
    assert diag.spearman([0, 0, 1, 1], [0, 1, 2, 3]) == pytest.approx(4 / 20 ** 0.5)
    assert diag.spearman([1, 1, 1], [1, 2, 3]) is None


@pytest.mark.fast
def test_figure5_draws_one_panel_per_layer(tmp_path):
    projections = {layer: diag.plane_projection(planted_ids(layer, sizes=(74, 124)),
                                                *derive_spatial_ids.axis_directions(planted_ids(layer, sizes=(74, 124))))
                   for layer in (3, 7, 11)}
    path = tmp_path / "figure5.png"
    diag.plot_figure5(projections, path, "planted")
    from PIL import Image

    with Image.open(path) as image:
        assert image.width >= 2.5 * image.height  # three panels side by side


# --- universality statistics on constructed states ---------------------------------------------

OBJECTS = ("a", "b", "c", "d")


def constructed_states(shared, offset=0.0, seed=0):
    """States at obj2's token for every ordered pair of OBJECTS, obj1 in 2 cells, obj2 in the other
    15, 2 question types: group offset (a constant per centring group, large with `offset`) +
    the cell's code, shared by every pair or drawn per unordered pair, + noise."""
    g = torch.Generator().manual_seed(seed)
    shared_code = {(c, r): torch.randn(H, generator=g) for c in range(4) for r in range(4)}
    pair_codes = {}
    samples, rows = [], []
    for obj1 in OBJECTS:
        for obj2 in OBJECTS:
            if obj1 == obj2:
                continue
            pair = frozenset((obj1, obj2))
            code = shared_code if shared else pair_codes.setdefault(
                pair, {cell: torch.randn(H, generator=g) for cell in shared_code})
            for cell1 in ((0, 0), (3, 3)):
                for qtype in ("lr", "ab"):
                    base = offset * torch.randn(H, generator=g)
                    for cell2 in shared_code:
                        if cell2 == cell1:
                            continue
                        samples.append({"obj1": obj1, "obj2": obj2, "cell1": cell1, "cell2": cell2, "size": 124,
                                        "qtype": qtype})
                        rows.append(base + code[cell2] + 0.3 * torch.randn(H, generator=g))
    return torch.stack(rows)[:, None, :], samples


@pytest.mark.fast
def test_a_shared_code_agrees_across_pairs_and_per_pair_codes_do_not():
    shared = diag.diagnose_states(*constructed_states(shared=True), layers=[5])[5]
    own = diag.diagnose_states(*constructed_states(shared=False), layers=[5])[5]
    assert shared["id_agreement"] > 0.9 and own["id_agreement"] < 0.2, (shared, own)
    assert shared["probe_accuracy"] > 0.9 and own["probe_accuracy"] < 0.3, (shared, own)
    # A shared code explains as much pooled as within pairs; per-pair codes only within.
    assert shared["r2_pooled"] > 0.8 and shared["r2_pooled"] > shared["r2_within_pair"] - 0.05
    assert own["r2_within_pair"] > 0.8 and own["r2_pooled"] < 0.4


@pytest.mark.fast
def test_a_code_tiny_beside_the_state_reads_as_leakage():
    """The same shared code under a group offset 10,000 times its size: every statistic of the
    centred state is unchanged, only the cell part / state ratio tells it is a rounding-size leak."""
    plain = diag.diagnose_states(*constructed_states(shared=True), layers=[5])[5]
    buried = diag.diagnose_states(*constructed_states(shared=True, offset=1e4), layers=[5])[5]
    assert buried["id_agreement"] == pytest.approx(plain["id_agreement"], abs=0.05)
    assert plain["cell_part_ratio"] > 0.5 and buried["cell_part_ratio"] < diag.LEARNT_CODE_MIN_RATIO
    assert diag.most_universal_layer({5: plain}) == 5 and diag.most_universal_layer({5: buried}) is None


@pytest.mark.fast
def test_spatial_loss_over_batches_by_hand():
    raw = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 5.0], [0.0, 1.0]])
    keys = [(0, 0, 124), (1, 0, 124), (0, 0, 124), (1, 0, 124)]
    ids = {(0, 0, 124): torch.tensor([-1.0, 0.0]), (1, 0, 124): torch.tensor([0.0, 1.0])}
    # batch 1 centred: (-1, 0), (1, 0) -> cos 1 and 0 -> loss 0.5; batch 2: (0, 2), (0, -2) -> cos 0, -1 -> loss 1.5
    assert diag.spatial_loss_over_batches(raw, keys, ids, [[0, 1], [2, 3]]) == pytest.approx(1.0)
    assert diag.spatial_loss_over_batches(raw, keys, {(0, 0, 124): ids[(0, 0, 124)]}, [[0, 1]]) is None


# --- the script on real tiny models ------------------------------------------------------------

@pytest.fixture(scope="module")
def extraction(tmp_path_factory):
    """Four objects in the extraction layout: each unordered pair has one that shares no object."""
    root = tmp_path_factory.mktemp("extraction")
    renders = make_grid_data.builtin_objects(64)
    objects = {n: renders[n] for n in ("pink heart", "cyan hexagon", "yellow star", "purple diamond")}
    make_grid_data.make_grid_images(root, objects, cell=28, sizes=(124,), progress=False, file_layout="extraction")
    return root


@pytest.fixture(scope="module")
def diagnosed(extraction, tmp_path_factory):
    """{model: diagnostics.json} of the random tiny and of tiny-warm at layers 9 and 11, over 24 of the
    48 groups (the margins of the tests below hold at either: tiny-warm's within-pair R² 0.27 at 24
    and 0.23 at 48 against the 0.2 they ask, the rest further off)."""
    out = {}
    for model in ("tiny", "tiny-warm"):
        folder = tmp_path_factory.mktemp(model)
        ids = folder / "ids.pt"
        derive_spatial_ids.main(["--model", model, "--images", str(extraction), "--out", str(ids),
                                 "--layers", "9,11", "--max_groups", "24"])
        result = diag.main(["--ids", str(ids), "--max_groups", "24", "--out", str(folder / "diag")])
        out[model] = {"json": json.loads((folder / "diag" / "diagnostics.json").read_text()),
                      "md": (folder / "diag" / "diagnostics.md").read_text(), "result": result}
    return out


def test_ids_agree_across_pairs_on_tiny_not_on_tiny_warm(diagnosed):
    tiny, warm = (diagnosed[m]["json"]["layers"]["11"] for m in ("tiny", "tiny-warm"))
    print("layer 11, tiny:", tiny, "\ntiny-warm:", warm)
    assert tiny["id_agreement"] > 0.5 and warm["id_agreement"] < 0.3
    assert tiny["id_agreement"] > warm["id_agreement"] + 0.3
    assert tiny["r2_pooled"] > 0.5 and warm["r2_pooled"] < 0.2 < warm["r2_within_pair"]


def test_the_cell_part_is_tiny_beside_the_state_on_tiny_and_not_on_tiny_warm(diagnosed):
    tiny, warm = (diagnosed[m]["json"]["layers"]["11"] for m in ("tiny", "tiny-warm"))
    assert tiny["cell_part_ratio"] < diag.LEARNT_CODE_MIN_RATIO <= warm["cell_part_ratio"]
    assert "No layer holds a learnt cell code" in diagnosed["tiny"]["md"]
    assert "No layer holds universal IDs" in diagnosed["tiny-warm"]["md"]


def test_the_report_names_the_run_scripts_layer_and_draws_figure5(diagnosed):
    for model, found in diagnosed.items():
        md = found["md"]
        assert "| 11 |" in md and "run scripts' layer" in md
        assert (found["result"]["out"] / "figure5.png").stat().st_size > 10_000
        assert found["json"]["train_layer"] == 11 and found["json"]["info"]["sampler"] == "obj1_groups"
    # Figure 5 of tiny-warm's IDs (the paper recipe's subject token) is a grid; the random tiny's is not.
    assert diagnosed["tiny-warm"]["json"]["layers"]["11"]["rho_col"] > 0.8
    assert diagnosed["tiny"]["json"]["layers"]["11"]["rho_col"] < 0.5


@pytest.mark.fast
def test_without_provenance_it_draws_figure5_only_and_says_so(tmp_path, capsys):
    from spatial_loss import save_universal_ids

    ids = planted_ids(0)
    path = tmp_path / "orig.pt"
    save_universal_ids(path, {11: ids})
    result = diag.main(["--ids", str(path), "--out", str(tmp_path / "d")])
    assert "Figure 5 only" in capsys.readouterr().out
    assert result["stats"] == {} and result["projections"][11]["rho_col"] >= 0.9
    assert (tmp_path / "d" / "figure5.png").is_file()


@pytest.mark.fast
def test_a_missing_ids_file_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as exc:
        diag.main(["--ids", str(tmp_path / "none.pt")])
    assert "none.pt" in str(exc.value.code) and "\n" not in str(exc.value.code)


def test_bad_inputs_are_one_line_before_any_model_load(tmp_path, monkeypatch, extraction):
    """--out under a regular file, an unknown --model, an --images folder that is not there: one
    line naming the flag, and the model never loads; the same command with the input fixed runs."""
    from spatial_loss import save_universal_ids

    ids = tmp_path / "ids.pt"
    save_universal_ids(ids, {11: planted_ids(0)})
    blocker = tmp_path / "a_file"
    blocker.write_text("")

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(diag.checkpoints, "load_checkpoint_model", no_load)
    cases = [(["--out", str(blocker / "d")], "argument --out", 2),
             (["--model", "no-such-model", "--images", str(extraction)], "--model no-such-model", None),
             (["--model", "tiny", "--images", str(tmp_path / "nowhere")], "--images", None),
             (["--checkpoints", str(tmp_path / "no-checkpoint"), "--images", str(extraction)], "--checkpoints", None),
             (["--checkpoints", "tiny", "--model", "tiny", "--images", str(extraction)], "--checkpoints", 2),
             (["--out_in_runs", "--model", "tiny", "--images", str(extraction)], "--out_in_runs", 2),  # no --checkpoints
             (["--checkpoints", "tiny", "--out_in_runs", "--images", str(extraction)], "--out_in_runs", 2)]  # and --out
    for extra, culprit, code in cases:
        with pytest.raises(SystemExit) as exc:
            diag.main(["--ids", str(ids), "--out", str(tmp_path / "d")] + extra if "--out" not in extra
                      else ["--ids", str(ids)] + extra)
        message = exc.value.code
        if code is not None:
            assert message == code
        else:
            assert culprit in message and "\n" not in message and len(message) < 300, message
    assert not (tmp_path / "d").exists()
    monkeypatch.undo()
    result = diag.main(["--ids", str(ids), "--out", str(tmp_path / "d"), "--model", "tiny", "--images", str(extraction),
                        "--max_groups", "12"])
    assert result["stats"][11]["r2_pooled"] is not None


@pytest.mark.parametrize("model", ["tiny-qwen2.5", "tiny-llava", "tiny-mllama", "tiny-internvl", "tiny-gemma3"])
def test_every_family_is_diagnosed(model, extraction, tmp_path):
    """Each family's tiny model, through its adapter: states at obj2's token for every layer, the
    report written, and a run-scripts layer the model does not have named as such."""
    ids = tmp_path / "ids.pt"
    derive_spatial_ids.main(["--model", model, "--images", str(extraction), "--out", str(ids), "--max_groups", "12"])
    result = diag.main(["--ids", str(ids), "--max_groups", "12", "--out", str(tmp_path / "d")])
    last = max(result["stats"])
    assert set(result["stats"]) == set(range(last + 1)) and last < 11
    assert all(s["cell_part_ratio"] is not None for s in result["stats"].values())
    assert any(s["r2_pooled"] is not None for s in result["stats"].values())  # the image reaches the LM
    assert "Layer 11 (the run scripts') was not measured" in (tmp_path / "d" / "diagnostics.md").read_text()
