"""Shared by the bench scripts: the repo on sys.path, grid data, the bench model, timing, peak
memory, one subprocess per measured path, and the table.

Each bench_*.py measures "our path" against "the plain path it replaces" in the same run:
- time: one process runs every path once (warm-up), then `--repeats` rounds in which the paths
  alternate; the table shows each path's median. Alternating keeps a shared machine's changing
  load from favouring one path.
- memory: each path runs once more in a fresh process of its own, so its peak is its own (RSS
  high-water mark on a CPU, which includes the process's model and libraries;
  torch.cuda.max_memory_allocated on a GPU).
"""
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import data  # noqa: E402
import make_grid_data  # noqa: E402
import models  # noqa: E402
import speedups  # noqa: E402
import tiny_models  # noqa: E402

REAL_VOCAB = 151936  # Qwen2-VL's vocabulary: the bench model's head has this many rows
# BENCH_VOCAB=tiny keeps the tiny tokenizer's vocabulary (603 rows) in the bench model instead:
# gpu_check.sh --dry-run sets it. The code paths are the same at any vocabulary size, and on a CPU
# without bf16 instructions the 151,936-row head took most of the dry run's bf16 time (the plain
# `labels=` step in bf16: minutes a step, past the step timeout).
BENCH_VOCAB_ENV = "BENCH_VOCAB"


def obj1_cell_samples(folder, batch_size):
    """`batch_size` questions of a grid folder with obj1 in one cell (obj2 moving, both question
    types, so rows are padded). Exits with a message when fewer exist, never a smaller batch."""
    samples = data.GridDataset(folder).samples
    first = samples[0]
    chosen = [s for s in samples if s["cell1"] == first["cell1"] and s["obj1"] == first["obj1"]][:batch_size]
    if len(chosen) < batch_size:
        sys.exit(f"{folder}: only {len(chosen)} questions share obj1's cell; use --batch_size {len(chosen)} or less")
    return chosen


def arm_batches(folder, batch_size, seed=0):
    """{arm: samples}: the first batch of the paper's spatial arm (`obj1_groups`: obj1, its cell and
    obj2 fixed, both question types; an image shown to 1 or 2 of its questions) and of its
    control arm (`shuffle` over all questions: images rarely repeat)."""
    grid = data.GridDataset(folder, "paper")
    batches = {}
    for arm, sampler in (("spatial", "obj1_groups"), ("control", "shuffle")):
        batch = next(iter(data.make_batch_sampler(sampler, grid.samples, range(len(grid.samples)), batch_size, seed)))
        if len(batch) < batch_size:
            sys.exit(f"{folder}: the first {sampler} batch has {len(batch)} questions, fewer than {batch_size}")
        batches[arm] = [grid.samples[i] for i in batch]
    return batches


def grid_group_samples(cell, batch_size):
    """obj1_cell_samples of 15 images drawn with `cell` px cells into a temporary folder (24
    questions at most)."""
    folder = Path(tempfile.mkdtemp())
    objects = make_grid_data.builtin_objects()
    make_grid_data.make_grid_images(folder, {k: objects[k] for k in list(objects)[:2]}, cell=cell,
                                    sizes=(124,), max_pairs=1, max_images=15, progress=False)
    return obj1_cell_samples(folder, batch_size)


def grid_folder(cell, max_pairs=1, max_images=None, folder=None):
    """A folder of grid images (one size, `cell` px cells: 4 * cell px images); reused if given
    and already drawn."""
    folder = Path(folder or tempfile.mkdtemp(prefix="bench_grid_"))
    if not any(folder.glob("*.png")):
        objects = make_grid_data.builtin_objects()
        make_grid_data.make_grid_images(folder, {k: objects[k] for k in list(objects)[:2]}, cell=cell,
                                        sizes=(124,), max_pairs=max_pairs, max_images=max_images, progress=False)
    return folder


def bench_model(full_size=False, device="cpu", dtype=torch.float32):
    """(model, processor, adapter) with random weights:
    - default: the tiny Qwen2-VL architecture with the real vocabulary (151,936 rows in the
      embedding and the head; the tiny tokenizer's ids, all < 1,024, index the same rows), or
      the tiny tokenizer's own under BENCH_VOCAB=tiny (the dry run);
    - full_size: the real Qwen2-VL-2B architecture (models.FULL_SIZE_CONFIGS["qwen2-2b"]).
    The processor has Qwen2-VL's real pixel limits (a 448 px image = 256 visual tokens), unlike
    the tiny model's own (at most 112 x 112 px)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    tiny = models.ensure_tiny_model()
    tokenizer = models.QwenVLAdapter().build_processor(tiny).tokenizer
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in models.SPECIAL_TOKENS}
    if full_size:
        config = Qwen2VLConfig(**models.FULL_SIZE_CONFIGS["qwen2-2b"], image_token_id=ids["<|image_pad|>"],
                               video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                               vision_end_token_id=ids["<|vision_end|>"])
    else:
        config = tiny_models.tiny_qwen2vl_config(tokenizer)
        if os.environ.get(BENCH_VOCAB_ENV, "real") != "tiny":
            config.text_config.vocab_size = REAL_VOCAB
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    processor = models._image_only_qwen_processor_class()(
        Qwen2VLImageProcessorPil(), tokenizer, chat_template=models.QWEN2VL_CHAT_TEMPLATE)
    adapter = models.adapter_for(model)
    processor.tokenizer.padding_side = adapter.padding_side
    return model, processor, adapter


def device_and_dtype(bf16=False):
    """(device, weights dtype): --bf16 applies on CUDA, or on a CPU in a GPU rehearsal
    (bench/gpu_check.sh --dry-run, speedups.weights_dtype)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return device, speedups.weights_dtype(bf16, device)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_gib(device):
    """Peak so far: CUDA allocated on a GPU, the process's RSS high-water mark on a CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def rss_gib():
    """Resident memory now (Linux /proc), for the after-setup baseline."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        return float("nan")


def time_paths(fns, repeats, device):
    """{name: (median seconds, all timed seconds)}: each fn once to warm up, then `repeats` rounds
    of all fns in turn."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {name: (statistics.median(t), t, cpu[name]) for name, t in times.items()}


def peak_of(fn, device):
    """(peak memory GiB of this process after running fn once, memory GiB before it)."""
    base = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else rss_gib()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fn()
    sync(device)
    return peak_memory_gib(device), base


def run_worker(script, mode, argv):
    """Run `script --_worker mode argv` in a fresh process; its last stdout line is JSON."""
    cmd = [sys.executable, str(script), "--_worker", mode, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    if proc.returncode != 0:
        sys.exit(f"{mode}: the worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker(mode, fns, repeats, device, info=None, after=None):
    """The worker side: mode "time" times every fn alternating, then calls `after()` (e.g. counting
    FLOPs on one more run, which may add to `info`); mode "mem:NAME" runs fn NAME once and reports
    its peak memory. Prints the result as the last stdout line (JSON)."""
    if mode == "time":
        timed = time_paths(fns, repeats, device)
        if after is not None:
            after()
        result = {"times": {name: t for name, (_, t, _) in timed.items()},
                  "cpu_times": {name: c for name, (_, _, c) in timed.items()}}
    else:
        peak, base = peak_of(fns[mode.split(":", 1)[1]], device)
        result = {"peak_gib": peak, "base_gib": base}
    print(json.dumps({**(info or {}), **result}, default=str), flush=True)


def measure(script, argv, names):
    """{name: {"seconds", "times", "peak_gib", "base_gib", **info}} from one timing process and one
    memory process per path."""
    timing = run_worker(script, "time", argv)
    out = {}
    for name in names:
        mem = run_worker(script, f"mem:{name}", argv)
        times = timing["times"][name]
        out[name] = {**timing, "peak_gib": mem["peak_gib"], "base_gib": mem["base_gib"], "times": times,
                     "seconds": statistics.median(times), "cpu_seconds": statistics.median(timing["cpu_times"][name])}
    return out


def machine():
    import platform

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"{torch.get_num_threads()} torch threads (torch {torch.__version__})")


def print_table(title, config, rows, unit):
    """rows: [{"path", "per_s", "seconds", "cpu_seconds", "peak_gib", "vs"}]; the ratio columns
    compare each row with the plain row named in "vs". CPU s (the process's CPU time, all threads)
    moves less than wall time when other processes share the cores."""
    by_name = {r["path"]: r for r in rows}
    print(f"\n{title}")
    print(f"config: {config}")
    print(f"machine: {machine()}")
    header = (f"| path | {unit}/s | median s | median CPU s | peak GiB | time vs plain | {unit}/s vs plain "
              f"| CPU time vs plain | peak vs plain |")
    print(header)
    print("|" + "---|" * 9)
    for r in rows:
        plain = by_name.get(r.get("vs"))
        if plain is None or plain is r:
            ratios = ["(reference)", "", "", ""]
        else:
            ratios = [f"{r['seconds'] / plain['seconds']:.2f}x", f"{r['per_s'] / plain['per_s']:.2f}x",
                      f"{r['cpu_seconds'] / plain['cpu_seconds']:.2f}x", f"{r['peak_gib'] / plain['peak_gib']:.2f}x"]
        cells = [r["path"], f"{r['per_s']:.2f}", f"{r['seconds']:.3f}", f"{r['cpu_seconds']:.2f}",
                 f"{r['peak_gib']:.2f}", *ratios]
        print("| " + " | ".join(cells) + " |")


def add_bench_args(parser):
    """The flags every bench script shares."""
    import argparse

    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions after one warm-up")
    parser.add_argument("--full_size", action="store_true", help="the real Qwen2-VL-2B architecture (for a GPU)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 weights (CUDA, or a GPU rehearsal on a CPU)")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    return parser


def model_description(args, result):
    """The first words of a table's configuration line: model, weights, device and dtype."""
    model = "Qwen2-VL-2B architecture" if args.full_size else "tiny Qwen2-VL, vocab 151,936"
    return f"{model}, random weights, {result['device']} {result['dtype']}"


# ---------------------------------------------------------------------------------------------
# Counted FLOPs, achieved TFLOP/s and MFU
# ---------------------------------------------------------------------------------------------

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched
# against torch.cuda.get_device_name() in order (the first substring that matches wins).
DENSE_BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM
    ("H200", 989.4),
    ("H800", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
)


def _nested_tensors(value):
    """The tensors inside a module's output (a tensor, tuple, list, dict or HF ModelOutput)."""
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):  # ModelOutput is a dict too
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _nested_tensors(v)]
    return []


class StepFlops:
    """FLOPs of one training step (forward + backward) counted by torch's FlopCounterMode (the
    matrix products, convolutions and attention kernels, as executed), split by when they run:

    - vision: the vision tower and the projector, forward, and the backward from the moment a
      gradient reaches their output (the vision backward is the last thing autograd runs: the
      image features enter the LM at its input);
    - LM: the decoder and the LM head, forward, and every backward before the vision's (the
      losses' backward included: a few thousand FLOPs);
    - rest: everything else (the losses' forward, the merge of image features).

    Works for either image path: the tower called inside the model's forward or before it
    (encode_images_once). Use as a context manager around forward and backward, calling
    `forward_done()` between them; then read `.total`, `.vision`, `.lm`, `.rest` (FLOPs) and
    `.images` (what the tower encoded: images for Qwen2-VL / Qwen2.5-VL, whose tower gets
    `grid_thw`; else the leading size of its pixel input, which counts InternVL's tiles)."""

    def __init__(self, model, adapter):
        from torch.utils.flop_counter import FlopCounterMode

        self.counter = FlopCounterMode(display=False)
        vision = [adapter.vision_tower(model)]
        projector = adapter.projector(model)
        if not any(projector is m for m in vision[0].modules()):
            vision.append(projector)
        lm = [adapter.language_model(model), adapter.lm_head(model)]
        self.spans = {"vision": 0, "lm": 0}
        self.vision_backward_start = None
        self.forward_total = None
        self.images = 0
        self._handles = []
        for name, modules in (("vision", vision), ("lm", lm)):
            depth = {"n": 0, "start": 0}
            for module in modules:
                self._handles.append(module.register_forward_pre_hook(self._enter(name, depth)))
                self._handles.append(module.register_forward_hook(self._leave(name, depth, module is vision[-1])))
        self._handles.append(vision[0].register_forward_pre_hook(self._count_images, with_kwargs=True))

    def _count_images(self, module, args, kwargs):
        grid = kwargs.get("grid_thw")  # Qwen2-VL / Qwen2.5-VL: one row per image
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        self.images += len(grid) if grid is not None else (len(pixels) if pixels is not None else 0)

    def _enter(self, name, depth):
        def hook(module, args):
            if depth["n"] == 0:
                depth["start"] = self.counter.get_total_flops()
            depth["n"] += 1
        return hook

    def _leave(self, name, depth, last_vision_module):
        def hook(module, args, output):
            depth["n"] -= 1
            if depth["n"] == 0:
                self.spans[name] += self.counter.get_total_flops() - depth["start"]
            if name == "vision" and torch.is_grad_enabled():
                for tensor in _nested_tensors(output):
                    if tensor.requires_grad:
                        tensor.register_hook(self._vision_backward_starts)
        return hook

    def _vision_backward_starts(self, grad):
        now = self.counter.get_total_flops()
        self.vision_backward_start = now if self.vision_backward_start is None else min(self.vision_backward_start, now)

    def __enter__(self):
        self.counter.__enter__()
        return self

    def __exit__(self, *exc):
        self.counter.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self.total = self.counter.get_total_flops()
        vision_backward = self.total - self.vision_backward_start if self.vision_backward_start is not None else 0
        self.vision = self.spans["vision"] + vision_backward
        if self.forward_total is None:
            raise RuntimeError("StepFlops: call forward_done() between the forward and the backward")
        self.lm = self.spans["lm"] + (self.total - vision_backward - self.forward_total)
        self.rest = self.total - self.vision - self.lm
        return False

    def forward_done(self):
        """Call between the forward and the backward: everything counted after it is backward."""
        self.forward_total = self.counter.get_total_flops()

    def as_dict(self):
        return {"total": self.total, "vision": self.vision, "lm": self.lm, "rest": self.rest, "images": self.images}


# The measured peak's product grows from PEAK_MIN_N until one product takes PEAK_PRODUCT_S or the
# size reaches the device's cap. A fixed 2048 x 2048 bf16 product takes 50-100 s on a CPU without
# bf16 instructions (AVX2 only: AMD Zen 2/3, older Intel), and the bench measured it six times: the
# dry run's full_size_step went from ~20 s to past its 300 s timeout on such a CPU (issue 28).
PEAK_MIN_N = 256
PEAK_PRODUCT_S = 0.1


def _product_seconds(n, device, dtype, repeats):
    """The fastest of `repeats` n x n products in `dtype` (after one warm-up): the closest to
    what the hardware can do under a changing load."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def peak_tflops(device, dtype, max_n=None):
    """(dense peak TFLOP/s, where it comes from): on a known card its data-sheet bf16 peak; else
    (unknown card, float32, or a CPU) the fastest of 5 n x n products measured here in `dtype`,
    n doubling from PEAK_MIN_N while one product takes under PEAK_PRODUCT_S, up to `max_n`
    (8192 on CUDA, 2048 on a CPU): bounded in time on hardware without fast `dtype` kernels."""
    if device == "cuda" and dtype == torch.bfloat16:
        name = torch.cuda.get_device_name()
        for key, peak in DENSE_BF16_PEAK_TFLOPS:
            if key in name:
                return peak, f"{name}: dense bf16 data-sheet peak"
    max_n = max_n or (8192 if device == "cuda" else 2048)
    n = min(PEAK_MIN_N, max_n)
    while n < max_n and _product_seconds(n, device, dtype, repeats=1) < PEAK_PRODUCT_S:
        n *= 2
    best = _product_seconds(n, device, dtype, repeats=5)
    return 2 * n**3 / best / 1e12, f"measured: the fastest of 5 {n}x{n} {str(dtype).removeprefix('torch.')} matmuls"


def flops_table(title, rows, peak, peak_source):
    """rows: [{"path", "flops": StepFlops.as_dict(), "seconds"}]. Prints counted TFLOP per part,
    the achieved TFLOP/s (all counted FLOPs / the path's median step time) and MFU."""
    print(f"\n{title}")
    print(f"peak: {peak:.2f} TFLOP/s ({peak_source})")
    print("| path | images encoded | TFLOP total | vision | LM | rest | vision share | median s | TFLOP/s | MFU |")
    print("|" + "---|" * 10)
    for r in rows:
        f = r["flops"]
        achieved = f["total"] / r["seconds"] / 1e12
        print(f"| {r['path']} | {f['images']} | {f['total'] / 1e12:.4g} | {f['vision'] / 1e12:.4g} | "
              f"{f['lm'] / 1e12:.4g} | {f['rest'] / 1e12:.4g} | {f['vision'] / f['total']:.0%} | {r['seconds']:.3f} | "
              f"{achieved:.4g} | {achieved / peak:.1%} |")
