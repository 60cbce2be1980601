"""Grid images drawn on the fly against pre-rendered files, per DataLoader worker, at the paper's
896 px (--cell 224), and what pre-rendering costs in disk and time.

    OMP_NUM_THREADS=1 python bench/bench_render.py                  # the default set's layouts
    OMP_NUM_THREADS=1 python bench/bench_render.py --local_variation

One process stands for one DataLoader worker. For batches of --batch_size questions drawn by the
paper's control sampler (a plain shuffle over the default set: 12 built-in objects, 4 sizes), it
times what a worker does per batch:
- on the fly: draw each image (grid_sources) and collate (the Qwen2-VL processor with its real
  pixel limits: resize, normalise, patchify; chat template, tokens, labels);
- files: read each PNG that make_grid_data.py wrote and collate the same way;
and, per image, drawing alone and make_grid_data.py's writing loop over 480 layouts sampled from the
whole set (time and bytes),
from which the disk and the time that pre-rendering a whole set costs follow. The GPU's need: --gpu_step_s per
step of --batch_size questions (0.81 s measured on an H200, README: Performance); images per
second needed = distinct images per batch / step time; workers = that / images/s per worker.
"""
import argparse
import math
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common

import data  # noqa: E402
import grid_sources  # noqa: E402
import make_grid_data  # noqa: E402
from render import builtin_objects, render_grid_image  # noqa: E402


def draw_seconds(renderer, layouts):
    """Median seconds to draw one image (objects already scaled, as in a worker after its first images)."""
    times = []
    for layout in layouts:
        start = time.perf_counter()
        render_grid_image(layout, renderer.objects, renderer.cell, renderer.local_variation, None, renderer.seed,
                          renderer._fitted)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prerender_costs(renderer, layouts):
    """(seconds, bytes) per image of make_grid_data.py's writing loop (draw, PNG at its options,
    file) over `layouts`, into a temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="bench_prerender_"))
    fitted = {}
    start = time.perf_counter()
    for layout in layouts:
        img = render_grid_image(layout, renderer.objects, renderer.cell, renderer.local_variation, None,
                                renderer.seed, fitted)
        img.save(folder / data.format_grid_name(layout), **make_grid_data.PNG_OPTIONS)
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in folder.iterdir())
    shutil.rmtree(folder)
    return seconds / len(layouts), size / len(layouts)


def images_per_set(n_objects, sizes=4, cell_pairs=240):
    return n_objects * (n_objects - 1) * cell_pairs * sizes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cell", type=int, default=224, help="cell px (224: the paper's 896 px images)")
    p.add_argument("--batch_size", type=int, default=15)
    p.add_argument("--batches", type=int, default=12, help="batches timed per path (after one warm-up batch)")
    p.add_argument("--local_variation", action="store_true")
    p.add_argument("--gpu_step_s", type=float, default=0.81, help="one training step on the GPU (H200, 896 px, batch 15)")
    p.add_argument("--paper_objects", type=int, default=100, help="objects of a paper-scale set")
    args = p.parse_args(argv)

    _, processor, adapter = common.bench_model()
    objects = builtin_objects(args.cell)
    renderer = grid_sources.GridRenderer(objects, cell=args.cell, local_variation=args.local_variation)
    start = time.perf_counter()
    dataset = grid_sources.RenderedGridDataset(renderer, "paper")
    build_s = time.perf_counter() - start
    sampler = data.make_batch_sampler("shuffle", dataset.samples, range(len(dataset.samples)), args.batch_size, seed=0)
    batches = sampler.epoch_batches()[:args.batches + 1]
    collate = data.VLMCollator(processor, adapter, skip_unreadable=False)

    # The same batches from files written by make_grid_data.py's writer.
    folder = Path(tempfile.mkdtemp(prefix="bench_render_"))
    by_name = {}
    for batch in batches:
        for i in batch:
            sample = dataset.samples[i]
            path = folder / Path(sample["image_path"]).name
            if not path.exists():
                sample["image"]().save(path, **make_grid_data.PNG_OPTIONS)
            by_name[sample["image_path"]] = str(path)
    from_files = [[{k: v for k, v in dataset.samples[i].items() if k != "image"} | {"image_path": by_name[dataset.samples[i]["image_path"]]}
                   for i in batch] for batch in batches]
    on_the_fly = [[dataset.samples[i] for i in batch] for batch in batches]

    times = {"on the fly": [], "files": []}
    collate(on_the_fly[0]), collate(from_files[0])  # warm-up
    for b in range(1, len(batches)):  # the two paths alternate, so a changing load favours neither
        for name, chunk in (("on the fly", on_the_fly[b]), ("files", from_files[b])):
            start = time.perf_counter()
            out = collate(chunk)
            times[name].append(time.perf_counter() - start)
    images = statistics.mean(len({dataset.samples[i]["image_path"] for i in batch}) for batch in batches[1:])
    tokens = out["input_ids"].shape[1]

    # A seeded sample of the whole set: every pair and size alike (some shapes compress worse).
    layouts = random.Random(0).sample([item[1] for item in grid_sources.rendered_items(renderer)], 480)
    draw_s = draw_seconds(renderer, layouts[:48])
    write_s, png_bytes = prerender_costs(renderer, layouts)
    need = images / args.gpu_step_s
    side = 4 * args.cell
    print(f"{side} px grid images ({'local variation' if args.local_variation else 'no variation'}), batches of "
          f"{args.batch_size} questions = {images:.1f} distinct images on average, {tokens} tokens per row; "
          f"one worker = one process, one thread")
    print()
    print("| path (one worker) | s per batch (median) | images/s per worker | GPU needs (images/s) | workers to keep up |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        per_batch = statistics.median(values)
        rate = images / per_batch
        print(f"| {name}: {'draw + collate' if name == 'on the fly' else 'read PNG + collate'} | {per_batch:.3f} "
              f"| {rate:.1f} | {need:.1f} | {math.ceil(need / rate)} |")
    print()
    print(f"per image: drawing {draw_s * 1000:.1f} ms; make_grid_data.py writing it (draw + PNG + file) "
          f"{write_s * 1000:.1f} ms, {png_bytes / 1e3:.1f} kB")
    print()
    print(f"building the default set's question list on the fly (no image drawn): {build_s:.1f} s for "
          f"{len(dataset.samples):,} questions")
    print()
    print("| set | images | pre-rendered: disk | pre-rendered: make_grid_data.py time (one process) | on the fly: disk |")
    print("|---|---|---|---|---|")
    for label, n in (("default: 12 built-in objects", 12), (f"{args.paper_objects} objects", args.paper_objects)):
        count = images_per_set(n)
        seconds = count * write_s
        print(f"| {label}, 4 sizes, 240 cell pairs | {count:,} | {count * png_bytes / 1e9:,.1f} GB "
              f"| {seconds / 3600:,.1f} h | 0 GB |")
    return times


if __name__ == "__main__":
    sys.exit(main() and 0)
