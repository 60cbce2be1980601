"""One training step of the real Qwen2-VL-2B architecture (random weights, no download): default
selection, LM loss (train.py's path: the head at supervised positions only) + spatial-ID loss
through the layer-11 hook, backward, AdamW step. Prints the
selection, timings and (on CUDA) peak memory, and checks that exactly the selected tensors got
gradients.

    python bench/full_size_step.py                       # CPU: small images, float32 (~1-2 min)
    python bench/full_size_step.py --cell 224 --batch_size 15 --bf16   # a GPU, the paper's images

The tokenizer is the tiny model's (the real one needs the hub); its special-token ids are written
into the full-size config, so the prompt layout and the vision path are exactly the real ones.
"""
import argparse
import time

import torch

from common import grid_group_samples  # also puts the repo on sys.path

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
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.bf16 and device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    tiny = models.ensure_tiny_model()
    tok_processor = models.QwenVLAdapter().build_processor(tiny)
    tokenizer = tok_processor.tokenizer
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in models.SPECIAL_TOKENS}
    config = Qwen2VLConfig(**models.FULL_SIZE_CONFIGS["qwen2-2b"], image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"])
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration(config).to(dtype)
    print(f"built Qwen2-VL-2B architecture on {device} ({dtype}) in {time.perf_counter() - t0:.1f} s, "
          f"{models.count_parameters(model) / 1e9:.3f}B params")
    adapter = models.adapter_for(model)
    selection = param_selectors.select_parameters(model, adapter)
    print(selection.summary())

    # Real Qwen2-VL pixel limits: a 4x4 grid of `cell` px gives (4*cell/28)^2 visual tokens.
    processor = models._image_only_qwen_processor_class()(
        Qwen2VLImageProcessorPil(), tokenizer, chat_template=models.QWEN2VL_CHAT_TEMPLATE)
    group = grid_group_samples(args.cell, args.batch_size)
    batch, positions, cells = data.split_batch(data.VLMCollator(processor, adapter)(group), device)
    print(f"batch {len(group)}, sequence {batch['input_ids'].shape[1]} tokens, "
          f"{int((batch['input_ids'][0] == ids['<|image_pad|>']).sum())} visual tokens per image")
    loss_fn = sl.SpatialIDLoss({c: torch.randn(adapter.lm_hidden_size(model)) for c in set(cells)}).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.01)
    model.train()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for attempt in ("warm-up", "timed"):
        sync()
        t0 = time.perf_counter()
        with sl.capture_layer(model, adapter, args.layer) as cap:
            out = lm_loss.supervised_lm_loss(model, adapter, batch)  # train.py's path
        aux = loss_fn(sl.gather_target_states(cap.states, positions), cells)
        sync()
        t_forward = time.perf_counter() - t0
        (out.loss + aux).backward()
        sync()
        t_backward = time.perf_counter() - t0 - t_forward
        got_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        print(f"{attempt}: LM loss {out.loss.item():.3f}, spatial loss {aux.item():.3f}, forward {t_forward:.2f} s, "
              f"backward {t_backward:.2f} s, step total {time.perf_counter() - t0:.2f} s")
    assert got_grad == set(selection.names), sorted(got_grad ^ set(selection.names))[:5]
    print(f"gradients reached exactly the {len(got_grad)} selected tensors")
    if device == "cuda":
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
