"""LoRA (peft) on the Linear modules the selector chose, on the tiny Qwen2-VL: the budget counts
adapter parameters, only adapter weights train, the adapter is saved alone and loads back onto its
base as the trained model, and merging gives a plain checkpoint with the same outputs."""
import argparse

import pytest
import torch

import data
import models
from param_selectors import add_selector_args, select_from_args, select_parameters

VIS = "model.visual.blocks.{}.mlp.{}"


def lora_names(blocks, linears=("fc1", "fc2")):
    return {VIS.format(i, f) + f".lora_{ab}.default.weight" for i in blocks for f in linears for ab in "AB"}


@pytest.fixture
def batch(tmp_path):
    from PIL import Image

    samples = []
    for i, cell in enumerate([(1, 0), (2, 1), (3, 3)]):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (112, 112), (40 * i, 90, 200)).save(path)
        samples.append(data.sample_record(path, "lr", "left", "red circle", "blue square",
                                          cell1=(0, 0), cell2=cell, size=124))
    return samples


def test_lora_trains_only_adapters_and_round_trips(tiny, batch, tmp_path):
    model, processor, adapter = tiny
    fc1 = adapter.vision_blocks(model)[-1].mlp.fc1
    pair = 2 * (fc1.in_features + fc1.out_features)
    sel = select_parameters(model, adapter, lora_rank=2)
    assert set(sel.names) == lora_names(range(2, 8)) and len(sel.names) == 24
    assert sel.lora_targets == [VIS.format(i, f) for i in range(2, 8) for f in ("fc1", "fc2")]
    assert sel.selected_params == 12 * pair == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert "LoRA rank 2 on 12 Linear modules" in sel.summary()
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"  # injected in place, not wrapped

    inputs, _, _ = data.split_batch(data.VLMCollator(processor, adapter)(batch), "cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(**inputs).loss.backward()
        opt.step()
    model.eval()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == set(sel.names)  # base weights (".base_layer.weight") untouched

    with torch.no_grad():
        trained = model(**inputs).logits
    out = models.save_lora_adapter(model, tmp_path / "run" / "checkpoint-3", base_model="tiny")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (out / "adapter_model.safetensors").stat().st_size < 100_000  # the adapter only
    loaded, _, loaded_adapter = models.load_model_and_processor(str(out))
    assert loaded_adapter is adapter and not loaded.training
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).logits, trained, atol=1e-5)

    merged = models.merge_lora(loaded)
    names = [n for n, _ in merged.named_parameters()]
    assert not any(".lora_" in n or "base_layer" in n for n in names)
    assert names == [n for n, _ in models.load_model_and_processor("tiny")[0].named_parameters()]
    with torch.no_grad():
        assert torch.allclose(merged(**inputs).logits, trained, atol=1e-4)


@pytest.mark.fast
def test_lora_budget_counts_adapter_parameters(tiny):
    model, _, adapter = tiny
    fc1 = adapter.vision_blocks(model)[-1].mlp.fc1
    pair = 4 * (fc1.in_features + fc1.out_features)
    total = models.count_parameters(model)
    sel = select_parameters(model, adapter, lora_rank=4, param_budget_frac=(3 * pair + 0.5) / total)
    assert len(sel.lora_targets) == 3 and sel.selected_params == 3 * pair
    assert any("did not fit the budget" in n for n in sel.notes)


@pytest.mark.fast
def test_lora_cli_and_errors(tiny):
    model, _, adapter = tiny
    parser = add_selector_args(argparse.ArgumentParser())
    args = parser.parse_args(["--lora_rank", "1", "--lora_alpha", "8", "--selector", "lm_mlp_lastk",
                              "--last_k_blocks", "1", "--no_lm_head"])
    sel = select_from_args(model, adapter, args)
    mlp = "model.language_model.layers.11.mlp."
    assert set(sel.names) == {f"{mlp}{m}.lora_{ab}.default.weight" for m in ("gate_proj", "up_proj", "down_proj")
                              for ab in "AB"}
    assert model.peft_config["default"].lora_alpha == 8
    with pytest.raises(ValueError, match="already carries LoRA adapters"):
        select_from_args(model, adapter, args)
    with pytest.raises(ValueError, match="no Linear weight to put LoRA on"):
        select_parameters(models.load_model_and_processor("tiny")[0], adapter, selector="vision_norms_lastk",
                          lora_rank=2)


def test_a_lora_training_run_saves_adapters_and_eval_reproduces_its_accuracy(tmp_path, tiny_path, monkeypatch):
    """train.py --lora_rank: checkpoints hold the adapter only (plus the processor), and
    eval_coco.py --ckpt on one reproduces the accuracy and predictions training recorded there.
    Each command checks the model's files once (train.py and the LoRA folder's base did twice)."""
    import json

    import eval_coco
    import make_grid_data
    import train

    checks, depth = [], []  # models.model_source calls from outside it (a LoRA folder's recurses for its base)
    model_source = models.model_source

    def counted(name):
        if not depth:
            checks.append(name)
        depth.append(name)
        try:
            return model_source(name)
        finally:
            depth.pop()

    for module in (models, train):
        monkeypatch.setattr(module, "model_source", counted)

    objects = make_grid_data.builtin_objects()
    grid = tmp_path / "grid"
    make_grid_data.make_grid_images(grid, {n: objects[n] for n in ("red circle", "blue square")}, cell=28,
                                    sizes=(124,), max_pairs=1, max_images=30, seed=0, progress=False)
    make_grid_data.make_grid_images(grid, {n: objects[n] for n in ("green triangle", "yellow star")}, cell=28,
                                    sizes=(124,), max_pairs=1, max_images=15, seed=0, progress=False)
    standin = tmp_path / "standin"
    make_grid_data.make_coco_standin(standin, objects, n=6, seed=0)
    coco = ["--val_json", str(standin / "coco_qa_two_obj_standin.json"), "--coco_val_dir", str(standin)]
    out = tmp_path / "run"
    train.main(["--model_name", "tiny", "--train_dir", str(grid), *coco, "--output_dir", str(out),
                "--batch_size", "6", "--lr", "1e-2", "--holdout_max_samples", "4", "--max_steps", "3",
                "--eval_save_steps", "3", "--eval_mode", "score", "--lora_rank", "2"])
    assert len(checks) == 1, checks
    import checkpoints

    ckpt = out / "checkpoint-3"
    # A slim checkpoint holds the adapter pairs only; final/ the adapter folder (base + adapter).
    saved = checkpoints.read_trainable(ckpt)
    assert len(saved) == 24 and all(".lora_" in k for k in saved)
    assert (out / "final" / "adapter_config.json").is_file() and not (out / "final" / "model.safetensors").exists()
    assert json.loads((out / "final" / "adapter_config.json").read_text())["r"] == 2
    trained, _, _ = checkpoints.load_checkpoint_model(ckpt)
    checks.clear()
    final, _, _ = checkpoints.load_checkpoint_model(out / "final")  # base + adapter folder
    assert len(checks) == 1, checks
    assert {n: p for n, p in final.named_parameters()}.keys() == {n: p for n, p in trained.named_parameters()}.keys()
    assert all(torch.equal(a, b) for a, b in zip(final.parameters(), trained.parameters()))
    base, _, _ = models.load_model_and_processor("tiny")
    lora_b = {n: p for n, p in trained.named_parameters() if ".lora_B." in n}
    assert len(lora_b) == 12 and all(p.abs().sum() > 0 for p in lora_b.values())  # trained, not fresh zeros
    base_params = dict(base.named_parameters())
    for n, p in trained.named_parameters():  # base weights are the untouched tiny model's
        if ".lora_" not in n:
            assert torch.equal(p, base_params[n.replace(".base_layer", "")]), n
    evals = [e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if e["event"] == "eval"]
    checks.clear()
    report = eval_coco.main(["--ckpt", str(ckpt), *coco, "--mode", "score", "--output", str(tmp_path / "e.jsonl")])
    assert len(checks) == 1, checks
    assert report["accuracy"] == evals[-1]["coco"]["accuracy"] and evals[-1]["step"] == 3
    recorded = [r["prediction"] for r in map(json.loads, (out / "predictions" / "step-3.jsonl").read_text().splitlines())
                if r["set"] == "coco"]
    assert [json.loads(l)["prediction"] for l in (tmp_path / "e.jsonl").read_text().splitlines()] == recorded

    # --merge_lora: final/ becomes a plain full model whose weights are base + the trained adapter
    merged_run = tmp_path / "merged"
    train.main(["--model_name", "tiny", "--train_dir", str(grid), *coco, "--output_dir", str(merged_run),
                "--batch_size", "6", "--lr", "1e-2", "--holdout_max_samples", "4", "--max_steps", "3",
                "--eval_save_steps", "3", "--eval_mode", "score", "--lora_rank", "2", "--merge_lora"])
    assert (merged_run / "final" / "model.safetensors").is_file()
    assert not (merged_run / "final" / "adapter_config.json").exists()
    from transformers import AutoModelForImageTextToText

    plain = AutoModelForImageTextToText.from_pretrained(merged_run / "final")
    assert not any(".lora_" in n or ".base_layer" in n for n, _ in plain.named_parameters())
    models.merge_lora(trained)  # the same run's checkpoint, merged by hand
    expected = dict(trained.named_parameters())
    for n, p in plain.named_parameters():
        torch.testing.assert_close(p, expected[n], rtol=0, atol=1e-6)
