"""The optional speed-ups (speedups.py) on CPU: compiled blocks equal the eager model where they
compile and fall back to it, with one warning line, where they cannot; Liger falls back cleanly
without liger-kernel or a GPU; the loader settings; and train.py's defaults and config.json."""
import json
import sys
import types

import pytest
import torch

import data
import lm_loss
import make_grid_data as mg
import models
import speedups
import train


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    objects = mg.builtin_objects(64)
    mg.make_grid_images(out, {n: objects[n] for n in ("red circle", "blue square")}, cell=28, sizes=(124,),
                        max_pairs=1, max_images=4, seed=0, progress=False)
    return data.GridDataset(out, "paper").samples[:4]


def _loss_and_grads(model, adapter, processor, samples):
    inputs, _, _ = data.split_batch(data.VLMCollator(processor, adapter)(samples), "cpu")
    loss = lm_loss.supervised_lm_loss(model, adapter, inputs).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _trainable_tiny():
    model, processor, adapter = models.load_model_and_processor("tiny")
    for p in model.parameters():
        p.requires_grad_(True)
    return model.train(), processor, adapter


def test_compiled_blocks_equal_the_eager_model(batch, capsys):
    model, processor, adapter = _trainable_tiny()
    eager_loss, eager_grads = _loss_and_grads(model, adapter, processor, batch)
    graphs = []

    def capturing_backend(graph_module, example_inputs):  # dynamo's graph, run as captured
        graphs.append(graph_module)
        return graph_module.forward

    report = speedups.compile_blocks(model, adapter, "all", backend=capturing_backend)
    n_blocks = len(adapter.vision_blocks(model)) + len(adapter.lm_layers(model))
    assert report["blocks"] == n_blocks and "fallback" not in report
    loss, grads = _loss_and_grads(model, adapter, processor, batch)
    assert graphs, "the blocks should have gone through torch.compile"
    assert abs(loss.item() - eager_loss.item()) <= 1e-5
    assert grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)
    assert "warning" not in capsys.readouterr().err
    # parameters and their names are untouched: checkpoints and selections see the same model
    assert set(dict(model.named_parameters())) == set(eager_grads)


def test_a_backend_that_cannot_compile_leaves_the_plain_path(batch, capsys):
    model, processor, adapter = _trainable_tiny()
    eager_loss, _ = _loss_and_grads(model, adapter, processor, batch)
    forwards = [b.forward for b in adapter.vision_blocks(model)]

    def broken_backend(graph_module, example_inputs):  # e.g. no C++ compiler, no Triton
        raise RuntimeError("no compiler here")

    report = speedups.compile_blocks(model, adapter, "vision", backend=broken_backend)
    assert report["fallback"] is True and "no compiler here" in report["reason"] and report["blocks"] == 0
    assert [b.forward for b in adapter.vision_blocks(model)] == forwards  # nothing wrapped
    loss, _ = _loss_and_grads(model, adapter, processor, batch)
    assert loss.item() == eager_loss.item()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "cannot run here" in warnings[0] and "plain path" in warnings[0]


def test_a_block_that_fails_to_compile_runs_eagerly_with_one_warning(batch, capsys):
    model, processor, adapter = _trainable_tiny()
    eager_loss, _ = _loss_and_grads(model, adapter, processor, batch)

    def picky_backend(graph_module, example_inputs):  # compiles the small probe, not a whole block
        if len(graph_module.graph.nodes) > 12:
            raise RuntimeError("unsupported op")
        return graph_module.forward

    report = speedups.compile_blocks(model, adapter, "vision", backend=picky_backend)
    assert "fallback" not in report and report["blocks"] == len(adapter.vision_blocks(model))
    loss, _ = _loss_and_grads(model, adapter, processor, batch)
    loss_again, _ = _loss_and_grads(model, adapter, processor, batch)
    assert loss.item() == eager_loss.item() == loss_again.item()
    assert report["fallback"] is True and "unsupported op" in report["reason"]
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "torch.compile" in warnings[0] and "eagerly" in warnings[0]


@pytest.mark.fast
def test_compile_none_leaves_the_model_alone():
    model, _, adapter = models.load_model_and_processor("tiny")
    forwards = [b.forward for b in adapter.lm_layers(model)]
    assert speedups.compile_blocks(model, adapter, "none") == {"compile_blocks": "none", "backend": "inductor",
                                                                "blocks": 0}
    assert [b.forward for b in adapter.lm_layers(model)] == forwards
    with pytest.raises(ValueError, match="compile_blocks"):
        speedups.compile_blocks(model, adapter, "everything")


@pytest.mark.fast
def test_liger_falls_back_cleanly_without_it_or_a_gpu(capsys, monkeypatch):
    model, _, _ = models.load_model_and_processor("tiny")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    capsys.readouterr()
    report = speedups.apply_liger(model, "cpu")  # liger-kernel is not installed here
    assert report == {"liger_kernel": False, "reason": report["reason"]} and "not installed" in report["reason"]
    # installed but no GPU: a stand-in package whose patch must not be called
    calls = []
    fake = types.ModuleType("liger_kernel.transformers")
    fake.monkey_patch = types.SimpleNamespace(MODEL_TYPE_TO_APPLY_LIGER_FN={"qwen2_vl": None},
                                              _apply_liger_kernel_to_instance=lambda **kw: calls.append(kw))
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    report = speedups.apply_liger(model, "cpu")
    assert report["liger_kernel"] is False and "CUDA" in report["reason"] and not calls
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 2 and all(w.startswith("warning: --liger_kernel") for w in warnings)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


@pytest.mark.fast
def test_loader_settings():
    assert speedups.loader_settings("cpu") == {"num_workers": 0, "pin_memory": False}
    cuda = speedups.loader_settings("cuda", num_workers=4)
    assert cuda == {"num_workers": 4, "pin_memory": True, "prefetch_factor": 4, "persistent_workers": True}
    assert speedups.loader_settings("cuda", num_workers=0) == {"num_workers": 0, "pin_memory": True}
    assert 0 <= speedups.loader_settings("cuda", processes=64)["num_workers"] <= 8


def test_train_defaults_and_config_record_the_speedups(tmp_path, capsys):
    args = train.parse_args(["--model_name", "tiny"])
    assert (args.encode_images_once, args.compile_blocks, args.liger_kernel, args.num_workers) == (True, "none",
                                                                                                   False, None)
    assert train.parse_args(["--no-encode_images_once"]).encode_images_once is False

    grid = tmp_path / "grid"
    objects = mg.builtin_objects()
    mg.make_grid_images(grid, {n: objects[n] for n in ("red circle", "blue square", "green triangle")}, cell=28,
                        sizes=(124,), max_pairs=2, max_images=30, seed=0, progress=False)
    standin = tmp_path / "standin"
    mg.make_coco_standin(standin, objects, n=4, seed=0)
    out = tmp_path / "run"
    train.main(["--model_name", "tiny", "--train_dir", str(grid), "--val_json",
                str(standin / "coco_qa_two_obj_standin.json"), "--coco_val_dir", str(standin), "--output_dir",
                str(out), "--batch_size", "4", "--max_steps", "1", "--holdout_max_samples", "4",
                "--eval_mode", "score", "--liger_kernel"])
    config = json.loads((out / "config.json").read_text())
    assert config["args"]["encode_images_once"] is True
    assert config["speedups"]["encode_images_once"] is True and config["speedups"]["compile_blocks"] == "none"
    assert config["speedups"]["liger_kernel"] is False and config["speedups"]["reason"]
    assert config["loader"] == {"num_workers": 0, "pin_memory": False}
    assert sum(line.startswith("warning: --liger_kernel") for line in capsys.readouterr().err.splitlines()) == 1
    end = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert end["event"] == "end" and end["speedups"] == config["speedups"]
    # train.py's own throughput: wall seconds per optimizer step, evaluation excluded
    trains = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trains = [e for e in trains if e["event"] == "train"]
    assert trains and all(0 < e["seconds_per_step"] < 60 for e in trains)
