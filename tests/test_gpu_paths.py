"""The branches a GPU run takes, tested on the CPU (issue 25):
- a bf16 model trains with a float32 loss from float32 logits, on every family;
- train.py's loader with pin_memory (as on CUDA) pins every tensor of the collated batch, the
  one-image-per-row `image_index` included, through torch's own pinning thread and 2 workers
  drawing images on the fly (torch pins only with an accelerator: the accelerator and
  Tensor.pin_memory are stood in for, and every tensor the loader yields must have come out of
  Tensor.pin_memory);
- data.split_batch moves every tensor with non_blocking=True (to the meta device, which shows the
  move a CPU-to-CPU copy would hide);
- workers drawing images on the fly give the pixels the main process draws;
- evaluation (score and generate) of a bf16 model, and eval_coco's --bf16 in a GPU rehearsal;
- a cheap part of `bench/gpu_check.sh --dry-run`.
Each check is shown to fail on a deliberately broken input beside it (or was, by breaking the code:
docs/performance.md, "GPU rehearsal on a CPU")."""
import argparse
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import eval_coco
import grid_sources
import lm_loss
import make_grid_data as mg
import models
import param_selectors
import speedups
import train
from render import builtin_objects

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ["tiny", "tiny-qwen2.5", "tiny-llava", "tiny-mllama", "tiny-internvl", "tiny-gemma3"]


@pytest.fixture(scope="module")
def drawn():
    """Paper-worded questions of grid images drawn on the fly with local variation (random size
    jitter and rotation, seeded), and the paper's spatial-arm sampler over them (batches of 6: each
    image asked about once or twice, so image_index repeats)."""
    renderer = grid_sources.GridRenderer(builtin_objects(28), cell=28, sizes=(124,), max_pairs=1,
                                         local_variation=True, seed=3)
    dataset = grid_sources.RenderedGridDataset(renderer, "paper")
    return dataset


def _sampler(dataset, batches=3):
    sampler = data.make_batch_sampler("obj1_groups", dataset.samples, range(len(dataset.samples)), 6, seed=0)
    sampler.epoch_batches = lambda full=sampler.epoch_batches: full()[:batches]  # a short epoch
    return sampler


@pytest.fixture(scope="module")
def tiny_processor():
    _, processor, adapter = models.load_model_and_processor("tiny")
    return processor, adapter


# ---------------------------------------------------------------------------------------------
# bf16
# ---------------------------------------------------------------------------------------------

@pytest.mark.fast
def test_weights_dtype_is_bf16_on_cuda_and_in_a_rehearsal(monkeypatch):
    monkeypatch.delenv(speedups.GPU_REHEARSAL_ENV, raising=False)
    assert speedups.weights_dtype(True, "cuda") == torch.bfloat16
    assert speedups.weights_dtype(True, "cpu") == torch.float32
    assert speedups.weights_dtype(False, "cuda") == torch.float32
    assert speedups.loader_settings("cpu")["pin_memory"] is False
    monkeypatch.setenv(speedups.GPU_REHEARSAL_ENV, "1")
    assert speedups.weights_dtype(True, torch.device("cpu")) == torch.bfloat16
    assert speedups.weights_dtype(False, "cpu") == torch.float32
    assert speedups.loader_settings("cpu")["pin_memory"] is True


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_model_trains_with_float32_loss_and_logits(family, drawn, monkeypatch):
    """bf16 weights, float32 pixels from the processor: the step runs (each image once), the loss
    is float32 and within bf16 rounding of the float32 model's, and the selected tensors get bf16
    gradients. The logits the loss is taken from are float32 (seen by the head's consumer)."""
    samples = [drawn.samples[i] for i in next(iter(_sampler(drawn)))]
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, processor, adapter = models.load_model_and_processor(family, dtype=dtype)
        selection = param_selectors.select_parameters(model, adapter)
        model.train()
        batch = data.VLMCollator(processor, adapter, encode_images_once=True)(samples)
        inputs, _, _ = data.split_batch(batch, "cpu")
        seen = []
        cross_entropy = torch.nn.functional.cross_entropy
        monkeypatch.setattr(lm_loss.F, "cross_entropy", lambda logits, *a, **k: seen.append(logits.dtype)
                            or cross_entropy(logits, *a, **k))
        out = lm_loss.supervised_lm_loss(model, adapter, inputs)
        monkeypatch.undo()
        out.loss.backward()
        assert seen == [torch.float32], f"{family} {dtype}: the loss was taken from {seen} logits"
        assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss), (family, dtype, out.loss)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert set(grads) == set(selection.names), family
        assert {g.dtype for g in grads.values()} == {dtype}, family
        losses[dtype] = out.loss.item()
    assert abs(losses[torch.bfloat16] - losses[torch.float32]) < 0.05 * abs(losses[torch.float32]), (family, losses)


# ---------------------------------------------------------------------------------------------
# Pinned memory and non-blocking transfers
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def pinning(monkeypatch):
    """A stand-in accelerator for torch's DataLoader, whose pinning thread then calls
    Tensor.pin_memory, here a copy recorded as pinned (the real one needs an accelerator in a CPU
    build of torch). Returns `unpinned(batch)`: the names of the batch's tensors that did not come
    out of Tensor.pin_memory."""
    pinned = []  # the copies themselves: their ids stay unique while they live

    def pin_memory(self, *args, **kwargs):
        copy = self.clone()
        pinned.append(copy)
        return copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    monkeypatch.setattr(torch.accelerator, "set_device_index", lambda index: None)

    def unpinned(batch):
        ids = {id(t) for t in pinned}
        return sorted(k for k, v in batch.items() if torch.is_tensor(v) and id(v) not in ids)
    return unpinned


def test_train_loader_pins_every_tensor_of_the_batch(drawn, tiny_processor, pinning):
    processor, adapter = tiny_processor
    args = argparse.Namespace(num_workers=2, encode_images_once=True)
    loader, settings = train.make_loader(drawn, _sampler(drawn), processor, adapter, args, "cuda")
    assert settings["pin_memory"] and settings["num_workers"] == 2 and settings["persistent_workers"]
    batches = list(loader)
    assert len(batches) == 3
    for batch in batches:
        assert "image_index" in batch and "pixel_values" in batch and "target_cells" in batch
        assert pinning(batch) == [], f"tensors left unpinned: {pinning(batch)}"
    assert any(len(set(b["image_index"].tolist())) < len(b["image_index"]) for b in batches), \
        "no batch shows an image to two rows"

    # The check fails on a batch type whose own pin_memory() forgets a tensor (DataLoader calls a
    # batch's pin_memory() instead of walking it), and on a loader that does not pin.
    class ForgetfulBatch(dict):
        def pin_memory(self):
            return ForgetfulBatch({k: v if k == "image_index" else v.pin_memory() for k, v in self.items()})

    batch = data.VLMCollator(processor, adapter, encode_images_once=True)(drawn.samples[:6])
    tensors = {k: v for k, v in batch.items() if torch.is_tensor(v)}
    forgetful = torch.utils.data._utils.pin_memory.pin_memory(ForgetfulBatch(tensors), "cuda")
    assert pinning(forgetful) == ["image_index"]
    unpinned_loader = torch.utils.data.DataLoader(drawn, batch_sampler=_sampler(drawn, 1), collate_fn=loader.collate_fn)
    assert "input_ids" in pinning(next(iter(unpinned_loader)))


@pytest.mark.fast
def test_split_batch_moves_every_tensor_without_blocking(drawn, tiny_processor, monkeypatch):
    processor, adapter = tiny_processor
    batch = data.VLMCollator(processor, adapter, encode_images_once=True)(drawn.samples[:6])
    calls = []
    to = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        calls.append(kwargs.get("non_blocking", False))
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    inputs, positions, cells = data.split_batch(batch, "meta")  # a device a CPU can "move" to
    monkeypatch.undo()
    assert set(inputs) == set(batch) - {"target_positions", "target_cells"}
    assert "image_index" in inputs and "labels" in inputs
    assert {k: v.device.type for k, v in inputs.items()} == {k: "meta" for k in inputs}
    assert positions.device.type == "meta"
    assert cells == [tuple(c) for c in batch["target_cells"].tolist()]  # read on the host, no device sync
    assert len(calls) == len(inputs) + 1 and all(calls), f"non_blocking per transfer: {calls}"


# ---------------------------------------------------------------------------------------------
# Workers drawing images on the fly
# ---------------------------------------------------------------------------------------------

@pytest.mark.fast
def test_workers_draw_the_pixels_the_main_process_draws(drawn, tiny_processor):
    """Two workers (each with its own Python and torch random state, seeded by the DataLoader) and
    the main process collate the same batches to the same pixels: an image's randomness (local
    variation) comes from the renderer's seed and the image's name only."""
    processor, adapter = tiny_processor
    collate = data.VLMCollator(processor, adapter, encode_images_once=True)
    by_workers = {}
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(drawn, batch_sampler=_sampler(drawn), collate_fn=collate,
                                             num_workers=workers)
        by_workers[workers] = list(loader)
    for b, (main, worker) in enumerate(zip(*by_workers.values(), strict=True)):
        assert torch.equal(main["pixel_values"], worker["pixel_values"]), f"batch {b}: 2 workers drew other pixels"
        assert torch.equal(main["input_ids"], worker["input_ids"]), f"batch {b}: other tokens"
    # The pixels tell images apart: another seed draws others (so equal pixels are not trivial).
    other = grid_sources.RenderedGridDataset(grid_sources.GridRenderer(
        builtin_objects(28), cell=28, sizes=(124,), max_pairs=1, local_variation=True, seed=4), "paper")
    first = next(iter(_sampler(drawn)))
    assert not torch.equal(collate([other.samples[i] for i in first])["pixel_values"],
                           by_workers[0][0]["pixel_values"])


# ---------------------------------------------------------------------------------------------
# Evaluation in bf16
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    folder = tmp_path_factory.mktemp("standin")
    mg.make_coco_standin(folder, mg.builtin_objects(), n=4, seed=0, image_size=48)
    return folder, data.load_coco_spatial(folder / mg.STANDIN_JSON, folder, "clean", 4)


def test_evaluation_in_bf16(standin):
    """Score mode's last-position logits are float32 and within bf16 rounding of the float32
    model's; score (with agreement) and generate both run on the bf16 model."""
    _, samples = standin
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, processor, adapter = models.load_model_and_processor("tiny", dtype=dtype)
        model.eval()
        batch = next(eval_coco._left_padded_batches(model, processor, adapter, samples, 4, False, "test"))[1]
        with torch.no_grad():
            logits[dtype] = lm_loss.last_position_logits(model, adapter, batch)
        assert logits[dtype].dtype == torch.float32, f"{dtype} model: {logits[dtype].dtype} logits"
        report, rows = eval_coco.evaluate(model, processor, adapter, samples, 2, "score", agreement=True,
                                          progress=False)
        assert report["n"] == 4 and 0 <= report["agreement_with_generate"] <= 1
        assert all(isinstance(r["generated"], str) for r in rows)
    logprobs = {d: torch.log_softmax(v, -1) for d, v in logits.items()}
    assert (logprobs[torch.bfloat16] - logprobs[torch.float32]).abs().max() < 0.1


def test_eval_coco_bf16_flag_in_a_gpu_rehearsal(standin, tmp_path, monkeypatch, capsys):
    folder, _ = standin
    argv = ["--ckpt", "tiny", "--val_json", str(folder / mg.STANDIN_JSON), "--coco_val_dir", str(folder),
            "--mode", "score", "--bf16", "--output", str(tmp_path / "p.jsonl")]
    loaded = []
    load = eval_coco.load_checkpoint_model
    monkeypatch.setattr(eval_coco, "load_checkpoint_model", lambda *a, **k: loaded.append(k["dtype"]) or load(*a, **k))
    monkeypatch.delenv(speedups.GPU_REHEARSAL_ENV, raising=False)
    eval_coco.main(argv)
    assert "--bf16 ignored: no CUDA device" in capsys.readouterr().err
    monkeypatch.setenv(speedups.GPU_REHEARSAL_ENV, "1")
    report = eval_coco.main(argv)
    assert "--bf16 ignored" not in capsys.readouterr().err
    assert loaded == [torch.float32, torch.bfloat16] and report["n"] == 4


# ---------------------------------------------------------------------------------------------
# bench/gpu_check.sh --dry-run
# ---------------------------------------------------------------------------------------------

def _gpu_check(tmp_path, *steps):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"), OMP_NUM_THREADS="1")
    env.pop(speedups.GPU_REHEARSAL_ENV, None)
    return subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", *steps], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.fast
def test_gpu_check_names_a_python_without_the_requirements_before_running_any(tmp_path):
    """A fresh clone's python3 has no torch: one line saying what to do, exit 2, no step run (the
    same script with a Python that has them runs: the dry-run test below)."""
    bare = tmp_path / "python"
    bare.write_text("#!/bin/sh\nexit 1\n")  # a Python in which `import torch` fails
    bare.chmod(0o755)
    env = dict(os.environ, PYTHON=str(bare), OUT=str(tmp_path / "out"))
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", "env"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith(f"error: {bare} cannot import torch") and "make install" in last and len(last) < 300
    assert not (tmp_path / "out" / "env.txt").exists()


def test_gpu_check_dry_run_of_the_step_bench(tmp_path):
    """The full-size step's bench at tiny size, bf16 on the CPU, each image once and per row."""
    proc = _gpu_check(tmp_path, "full_size_step")
    assert proc.returncode == 0, proc.stdout[-3000:]
    text = (tmp_path / "out" / "full_size_step.txt").read_text()
    assert "on cpu (torch.bfloat16)" in text
    # the tiny tokenizer's head, not the real 151,936 rows (minutes a bf16 step without bf16 instructions)
    assert "vocabulary 151,936" not in text and re.search(r"vocabulary \d{3}\n", text), text[:300]
    assert "gradients reached exactly the 12 selected tensors, on both paths" in text
    assert "median of 1, once:" in text and "| once |" in text
    assert "== 1 steps in" in proc.stdout and "FAILED" not in proc.stdout


@pytest.mark.fast
def test_gpu_check_names_an_unknown_step_before_running_any(tmp_path):
    proc = _gpu_check(tmp_path, "env", "full_size_stpe")
    assert proc.returncode == 2
    assert proc.stdout.strip().splitlines() == [
        "unknown step full_size_stpe (known: env full_size_step bench_train_448 bench_train_896 train_e2e "
        "train_e2e_per_row train_e2e_on_the_fly train_e2e_compile train_e2e_liger bench_eval demo, or issue18 alone)"]
    assert not (tmp_path / "out" / "env.txt").exists()


# ---------------------------------------------------------------------------------------------
# --compile_blocks through training and evaluation
# ---------------------------------------------------------------------------------------------

def test_compiled_blocks_stay_compiled_through_training_and_evaluation(drawn, standin, caplog):
    """All blocks share one code object, so dynamo's per-code cache holds a graph for each variant
    (vision / LM block, frozen / trained input, training / evaluation, new lengths); at torch's
    default limit of 8 the rest ran eagerly with one log line, which the dry run's compile step
    showed. compile_blocks makes room: a step, an evaluation and a step of another batch size with
    the vision blocks compiled (a capturing backend: dynamo's graphs run as captured) hit no limit;
    at the default limit they do (shown by breaking compile_blocks)."""
    caplog.set_level(logging.WARNING)  # dynamo's warning when it stops compiling, not its debug trace
    # torch's default, restored after by dynamo's own patch (monkeypatch's undo would delete the
    # setting from dynamo's config module); earlier tests' graphs would fill the same cache.
    before = torch._dynamo.config.recompile_limit
    with torch._dynamo.config.patch(recompile_limit=8):
        torch._dynamo.reset()
        model, processor, adapter = models.load_model_and_processor("tiny")
        param_selectors.select_parameters(model, adapter)  # the early vision blocks stay frozen
        graphs = []
        report = speedups.compile_blocks(model, adapter, "vision",
                                         backend=lambda graph, inputs: graphs.append(graph) or graph.forward)
        collate = data.VLMCollator(processor, adapter, encode_images_once=True)
        left_right = [s for s in drawn.samples if s["qtype"] == "lr"][:3]
        above_below = [s for s in drawn.samples if s["qtype"] == "ab"][:3]
        for chunk in (left_right, left_right + above_below):  # a step, an evaluation, a step of another size
            model.train()
            inputs, _, _ = data.split_batch(collate(chunk), "cpu")
            lm_loss.supervised_lm_loss(model, adapter, inputs).loss.backward()
            eval_coco.evaluate(model, processor, adapter, standin[1][:2], 2, "score", progress=False)
        torch._dynamo.reset()
    assert torch._dynamo.config.recompile_limit == before  # other tests see what they saw
    hits = [r.getMessage() for r in caplog.records if "recompile_limit" in r.getMessage()]
    assert not hits, f"dynamo ran blocks eagerly: {hits[0][:300]}"
    assert len(graphs) > 8, f"{len(graphs)} graphs: the run should need more than torch's default 8"
    assert report["recompile_limit"] == speedups.COMPILE_RECOMPILE_LIMIT and "fallback" not in report


@pytest.mark.fast
def test_train_throughput_compares_per_question_with_the_bench_own_batch(tmp_path):
    """train.py's time per question against the logged bench step's: divided by the bench's own
    batch (the dry run once divided full_size_step's 15-question step by train.py's 8)."""
    sys.path.insert(0, str(REPO / "bench"))
    import train_throughput

    step = tmp_path / "full_size_step.txt"
    step.write_text("batch 15 (the paper's spatial arm), 12 distinct images\n"
                    "median of 1, once: forward 0.1 s, backward 0.1 s, step 0.300 s\n")
    bench = tmp_path / "bench_train.txt"
    bench.write_text("config: tiny Qwen2-VL, vocab 151,936, random weights, cpu torch.float32, batch 8, 112 px\n"
                     "| ours_once: ours, each distinct image encoded once | 1.0 | 0.200 | 0.1 |\n")
    assert train_throughput.bench_step_seconds(step) == 0.3 and train_throughput.bench_step_questions(step, 4) == 15
    assert train_throughput.bench_step_seconds(bench) == 0.2 and train_throughput.bench_step_questions(bench, 4) == 8
    step.write_text("median of 1, once: forward 0.1 s, backward 0.1 s, step 0.300 s\n")
    assert train_throughput.bench_step_questions(step, 4) == 4  # no batch logged: train.py's
