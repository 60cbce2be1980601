"""One training step of the real Qwen2-VL-2B architecture (random weights, no download): default
selection, LM loss (train.py's path: the head at supervised positions only) + spatial-ID loss
through the layer-11 hook, backward, AdamW step, on the first batch of the paper's spatial arm
(obj1_groups). Two ways, alternating: every row encodes its image, and each distinct image
encoded once (train.py's default, --encode_images_once). Prints the selection, timings, (on
CUDA) peak memory, the images encoded, the FLOPs counted by FlopCounterMode (vision, LM, rest),
the achieved TFLOP/s and the MFU against the card's dense bf16 peak, and checks that exactly the
selected tensors got gradients.

    python bench/full_size_step.py                       # CPU: small images, float32 (~2-3 min)
    python bench/full_size_step.py --cell 224 --batch_size 15 --bf16   # a GPU, the paper's images
    GPU_REHEARSAL=1 python bench/full_size_step.py --tiny --cell 28 --bf16 --repeats 1  # the GPU step at tiny size

The tokenizer is the tiny model's (the real one needs the hub); its special-token ids are written
into the full-size config, so the prompt layout and the vision path are exactly the real ones.
"""
import argparse
import statistics
import time

import torch

import common  # also puts the repo on sys.path

import data  # noqa: E402
import lm_loss  # noqa: E402
import models  # noqa: E402
import param_selectors  # noqa: E402
import spatial_loss as sl  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cell", type=int, default=56, help="grid cell px; 224 is the paper's (896 px images)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--layer", type=int, default=11)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds of both paths after one warm-up")
    p.add_argument("--tiny", action="store_true",
                   help="the bench model (tiny Qwen2-VL, real vocabulary) instead of Qwen2-VL-2B: the same "
                        "step at tiny size (bench/gpu_check.sh --dry-run)")
    args = p.parse_args()
    device, dtype = common.device_and_dtype(args.bf16)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    t0 = time.perf_counter()
    # The tokenizer is the tiny model's with the special-token ids written into the config; the
    # processor has Qwen2-VL's real pixel limits: a 4x4 grid of `cell` px gives (4*cell/28)^2
    # visual tokens.
    model, processor, adapter = common.bench_model(not args.tiny, device, dtype)
    ids = {t: processor.tokenizer.convert_tokens_to_ids(t) for t in models.SPECIAL_TOKENS}
    print(f"built {'the bench model' if args.tiny else 'Qwen2-VL-2B architecture'} on {device} ({dtype}) in "
          f"{time.perf_counter() - t0:.1f} s, {models.count_parameters(model) / 1e9:.3f}B params, "
          f"vocabulary {adapter.lm_head(model).out_features:,}")
    selection = param_selectors.select_parameters(model, adapter)
    print(selection.summary())

    group = common.arm_batches(common.grid_folder(args.cell), args.batch_size)["spatial"]
    batches = {name: data.split_batch(data.VLMCollator(processor, adapter, encode_images_once=once)(group), device)
               for name, once in (("per row", False), ("once", True))}
    batch, positions, cells = batches["per row"]
    print(f"batch {len(group)} (the paper's spatial arm), {len({s['image_path'] for s in group})} distinct images, "
          f"sequence {batch['input_ids'].shape[1]} tokens, "
          f"{int((batch['input_ids'][0] == ids['<|image_pad|>']).sum())} visual tokens per image")
    loss_fn = sl.SpatialIDLoss({c: torch.randn(adapter.lm_hidden_size(model)) for c in set(cells)}).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.01)
    model.train()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step(name, flops=None):
        """(forward s, backward s, step s, LM loss, spatial loss, tensors that got a gradient)."""
        batch, positions, cells = batches[name]
        sync()
        t0 = time.perf_counter()
        with sl.capture_layer(model, adapter, args.layer) as cap:
            out = lm_loss.supervised_lm_loss(model, adapter, batch)  # train.py's path
        aux = loss_fn(sl.gather_target_states(cap.states, positions), cells)
        sync()
        t_forward = time.perf_counter() - t0
        if flops is not None:
            flops.forward_done()
        (out.loss + aux).backward()
        sync()
        t_backward = time.perf_counter() - t0 - t_forward
        got_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return t_forward, t_backward, time.perf_counter() - t0, out.loss.item(), aux.item(), got_grad

    timed = {name: [] for name in batches}
    for attempt in ["warm-up"] + [f"round {i + 1}" for i in range(args.repeats)]:
        for name in batches:  # alternating, so a changing load favours neither
            t_forward, t_backward, t_step, lm, aux, got_grad = step(name)
            if attempt != "warm-up":
                timed[name].append((t_forward, t_backward, t_step))
            print(f"{attempt}, {name}: LM loss {lm:.6f}, spatial loss {aux:.3f}, forward {t_forward:.3f} s, "
                  f"backward {t_backward:.3f} s, step total {t_step:.3f} s")
            assert got_grad == set(selection.names), sorted(got_grad ^ set(selection.names))[:5]
    print(f"gradients reached exactly the {len(selection.names)} selected tensors, on both paths")
    if device == "cuda":
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    median = {name: [statistics.median(t[i] for t in times) for i in range(3)] for name, times in timed.items()}
    for name, (t_forward, t_backward, t_step) in median.items():
        print(f"median of {args.repeats}, {name}: forward {t_forward:.3f} s, backward {t_backward:.3f} s, "
              f"step {t_step:.3f} s")
    print(f"step time, each distinct image once / every row's image: {median['once'][2] / median['per row'][2]:.2f}x")

    counted = {}
    for name in batches:
        with common.StepFlops(model, adapter) as flops:
            step(name, flops)
        counted[name] = flops.as_dict()
    peak, source = common.peak_tflops(device, dtype)
    # TFLOP/s over forward + backward (the counted work), without the optimizer step
    common.flops_table("counted FLOPs of the step (forward + backward; the seconds are the median forward + "
                       "backward time)", [{"path": name, "flops": counted[name], "seconds": t[0] + t[1]}
                                         for name, t in median.items()], peak, source)


if __name__ == "__main__":
    main()
