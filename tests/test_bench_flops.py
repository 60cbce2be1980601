"""The bench's FLOP count (bench/common.StepFlops): the vision, LM and rest parts of a training
step add up to FlopCounterMode's total, the vision part equals the vision tower counted on its own
(forward + backward), and encoding each distinct image once removes vision FLOPs in proportion to
the images saved while the LM's stay the same."""
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import data
import lm_loss
import make_grid_data as mg
import models
import param_selectors

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import common  # noqa: E402


def test_step_flops_split_and_the_images_saved(tmp_path):
    objects = mg.builtin_objects(64)
    mg.make_grid_images(tmp_path, {n: objects[n] for n in ("red circle", "blue square")}, cell=28, sizes=(124,),
                        max_pairs=1, max_images=8, seed=0, progress=False)
    samples = data.GridDataset(tmp_path, "paper").samples[:6]
    distinct = len({s["image_path"] for s in samples})
    assert distinct < len(samples)
    model, processor, adapter = models.load_model_and_processor("tiny")
    param_selectors.select_parameters(model, adapter)  # the default slice: last vision blocks' MLPs
    model.train()
    counted = {}
    for once in (False, True):
        inputs, _, _ = data.split_batch(data.VLMCollator(processor, adapter, encode_images_once=once)(samples), "cpu")
        with common.StepFlops(model, adapter) as flops:
            loss = lm_loss.supervised_lm_loss(model, adapter, inputs).loss
            flops.forward_done()
            loss.backward()
        counted[once] = flops.as_dict()
        model.zero_grad(set_to_none=True)
        # the vision tower alone, forward and backward, on the same pixels
        grid = inputs["image_grid_thw"]
        if once:
            grid = grid[models.first_rows_of(inputs["image_index"])]
        with FlopCounterMode(display=False) as alone:
            features = model.get_image_features(inputs["pixel_values"], grid, return_dict=True).pooler_output
            torch.cat(features).sum().backward()
        model.zero_grad(set_to_none=True)
        assert counted[once]["vision"] == alone.get_total_flops() > 0
    for c in counted.values():
        assert c["vision"] + c["lm"] + c["rest"] == c["total"] and c["lm"] > 0 and c["rest"] >= 0
    assert (counted[False]["images"], counted[True]["images"]) == (len(samples), distinct)
    assert counted[True]["lm"] == counted[False]["lm"]
    # equal-sized images: vision FLOPs in proportion to the images encoded
    assert counted[True]["vision"] * len(samples) == counted[False]["vision"] * distinct


def test_peak_tflops_from_the_table_or_measured():
    peak, source = common.peak_tflops("cpu", torch.float32)
    assert peak > 0 and source.startswith("measured")
    assert dict(common.DENSE_BF16_PEAK_TFLOPS)["H200"] == 989.4
    # the first matching name wins: an H100 PCIe is not taken for the SXM part
    name = "NVIDIA H100 PCIe"
    assert next(p for k, p in common.DENSE_BF16_PEAK_TFLOPS if k in name) == 756.0


# A CPU without bf16 instructions, emulated on one that has them (docs/testing.md): oneDNN and
# ATen's kernels limited to AVX2 make a 1024 x 1024 bf16 product take seconds instead of a
# millisecond, as on AMD Zen 2/3 or older Intel.
NO_BF16_CPU = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def test_measured_peak_stays_quick_where_bf16_products_are_slow():
    """The measured peak grows its product only while one takes under 0.1 s: bf16 on a CPU
    without bf16 instructions measures a small product in seconds (a fixed 2048 x 2048 product,
    timed six times, took minutes there and put the dry run's step bench past its timeout)."""
    code = ("import sys, time, torch; sys.path.insert(0, 'bench'); import common; t = time.perf_counter(); "
            "peak, source = common.peak_tflops('cpu', torch.bfloat16); "
            "print(f'{time.perf_counter() - t:.1f} s: {source}')")
    env = dict(os.environ, OMP_NUM_THREADS="1", **NO_BF16_CPU)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seconds = float(proc.stdout.split(" s:")[0])
    assert seconds < 20, proc.stdout
