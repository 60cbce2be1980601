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
import tiny_models  # noqa: E402

REAL_VOCAB = 151936  # Qwen2-VL's vocabulary: the bench model's head has this many rows


def obj1_cell_samples(folder, batch_size):
    """`batch_size` questions of a grid folder with obj1 in one cell (obj2 moving, both question
    types, so rows are padded). Exits with a message when fewer exist, never a smaller batch."""
    samples = data.GridDataset(folder).samples
    first = samples[0]
    chosen = [s for s in samples if s["cell1"] == first["cell1"] and s["obj1"] == first["obj1"]][:batch_size]
    if len(chosen) < batch_size:
        sys.exit(f"{folder}: only {len(chosen)} questions share obj1's cell; use --batch_size {len(chosen)} or less")
    return chosen


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
      embedding and the head; the tiny tokenizer's ids, all < 1,024, index the same rows);
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
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if bf16 and device == "cuda" else torch.float32
    return device, dtype


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


def worker(mode, fns, repeats, device, info=None):
    """The worker side: mode "time" times every fn alternating; mode "mem:NAME" runs fn NAME once
    and reports its peak memory. Prints the result as the last stdout line (JSON)."""
    info = dict(info or {})
    if mode == "time":
        timed = time_paths(fns, repeats, device)
        result = {"times": {name: t for name, (_, t, _) in timed.items()},
                  "cpu_times": {name: c for name, (_, _, c) in timed.items()}}
    else:
        peak, base = peak_of(fns[mode.split(":", 1)[1]], device)
        result = {"peak_gib": peak, "base_gib": base}
    print(json.dumps({**info, **result}, default=str), flush=True)


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
            ratios = ["(plain)", "", "", ""]
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
    parser.add_argument("--bf16", action="store_true", help="bfloat16 weights (CUDA only)")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    return parser


def model_description(args, result):
    """The first words of a table's configuration line: model, weights, device and dtype."""
    model = "Qwen2-VL-2B architecture" if args.full_size else "tiny Qwen2-VL, vocab 151,936"
    return f"{model}, random weights, {result['device']} {result['dtype']}"
