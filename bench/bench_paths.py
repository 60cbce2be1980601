"""Time our paths against the plain ones and print the figures.

    python bench/bench_paths.py                 # tiny model, CPU
    python bench/bench_paths.py --model qwen2-2b --bf16 --batch_size 15   # on a GPU

1. Spatial-loss step: one-layer capture hook vs `output_hidden_states=True` (every layer kept),
   forward + backward through the selected vision MLPs.
2. COCO-style evaluation: batched left-padded generation vs one question at a time.
"""
import argparse
import statistics
import time

import torch

from common import grid_group_samples  # also puts the repo on sys.path

import data  # noqa: E402
import param_selectors  # noqa: E402
import spatial_loss as sl  # noqa: E402
from eval_coco import generate_answers  # noqa: E402
from models import load_model_and_processor  # noqa: E402


def timed(fn, repeats, sync):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--batch_size", type=int, default=12)
    p.add_argument("--cell", type=int, default=28, help="grid cell px (224 for the paper's images)")
    p.add_argument("--layer", type=int, default=11)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.bf16 and device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model, processor, adapter = load_model_and_processor(args.model, dtype=dtype, device=device)
    param_selectors.select_parameters(model, adapter)
    model.train()

    chunk = grid_group_samples(args.cell, args.batch_size)
    batch, positions, cells = data.split_batch(data.VLMCollator(processor, adapter)(chunk), device)
    hidden = adapter.lm_hidden_size(model)
    loss_fn = sl.SpatialIDLoss({c: torch.randn(hidden) for c in set(cells)}).to(device)

    def step_hook():
        with sl.capture_layer(model, adapter, args.layer) as cap:
            out = model(**batch)
        (out.loss + loss_fn(sl.gather_target_states(cap.states, positions), cells)).backward()
        model.zero_grad(set_to_none=True)

    def step_all_layers():
        out = model(**batch, output_hidden_states=True)
        (out.loss + loss_fn(sl.gather_target_states(out.hidden_states[args.layer], positions), cells)).backward()
        model.zero_grad(set_to_none=True)

    print(f"model {args.model} on {device} ({dtype}), batch {len(chunk)}, seq {batch['input_ids'].shape[1]}")
    t_hook = timed(step_hook, args.repeats, sync)
    t_all = timed(step_all_layers, args.repeats, sync)
    print(f"spatial step, one-layer hook      : {t_hook * 1000:8.1f} ms")
    print(f"spatial step, output_hidden_states: {t_all * 1000:8.1f} ms  ({t_all / t_hook:.2f}x)")
    if device == "cuda":
        for name, fn in (("hook", step_hook), ("all layers", step_all_layers)):
            torch.cuda.reset_peak_memory_stats()
            fn()
            print(f"peak memory, {name}: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")

    model.eval()
    t_batched = timed(lambda: generate_answers(model, processor, adapter, chunk, len(chunk), progress=False),
                      args.repeats, sync)
    t_single = timed(lambda: generate_answers(model, processor, adapter, chunk, 1, progress=False),
                     max(1, args.repeats // 2), sync)
    print(f"generate {len(chunk)} answers, batched   : {t_batched * 1000:8.1f} ms")
    print(f"generate {len(chunk)} answers, one by one: {t_single * 1000:8.1f} ms  ({t_single / t_batched:.2f}x)")


if __name__ == "__main__":
    main()
