"""Optional speed-ups of a training step, each a train.py flag recorded in config.json, each with a
clean fallback: when it cannot run here, one warning line and the plain path.

    compile_blocks(model, adapter, "vision" | "lm" | "all", backend)  # --compile_blocks
    apply_liger(model, device)                                        # --liger_kernel
    loader_settings(device_type, num_workers, processes)              # DataLoader defaults
    weights_dtype(bf16, device)                                       # --bf16: CUDA, or a GPU rehearsal

`torch.compile` is applied per transformer block (the vision tower's blocks, the LM's decoder
layers), not to the whole model: a block is the unit that repeats, so one compiled graph serves
all blocks of a stack, and the model's Python around them (the image merge, the loss, our hooks)
stays eager. The backend is first tried on a small function on the model's device (no C++
compiler, no Triton: the plain path, recorded in config.json); a block whose first compiled call
still fails (an unsupported op) makes every block run eagerly from then on, its call retried
eagerly so the step is not lost (one warning line; train.py's `end` event records it).
"""
import os
import sys

import torch

COMPILE_CHOICES = ("none", "vision", "lm", "all")
# Graphs dynamo may keep per code object (its default: 8). Every block of both stacks runs the same
# code (transformers' checkpointing-layer call), so one cache holds a graph per variant: vision and
# LM blocks, a frozen block's input without grad and a trained block's with it, training and
# evaluation (prefill and decode), new sequence lengths. Past the limit dynamo runs the rest
# eagerly with only a log line: bench/gpu_check.sh --dry-run hit 8 within two tiny steps.
COMPILE_RECOMPILE_LIMIT = 64

# Set to 1 by `bench/gpu_check.sh --dry-run`: a CPU run takes the GPU's settings (bf16 weights
# where --bf16 asks for them, pinned loader memory), so it walks the GPU run's code paths at tiny
# size. Without it a CPU keeps float32 (bf16 matrix products are slow on most CPUs) and no pinning.
GPU_REHEARSAL_ENV = "GPU_REHEARSAL"


def gpu_rehearsal():
    """True while bench/gpu_check.sh --dry-run rehearses the GPU run on a CPU."""
    return os.environ.get(GPU_REHEARSAL_ENV) == "1"


def weights_dtype(bf16, device):
    """The weights' dtype for a --bf16 flag on `device`: bfloat16 on CUDA (or in a GPU rehearsal),
    else float32."""
    cuda = torch.device(device).type == "cuda"
    return torch.bfloat16 if bf16 and (cuda or gpu_rehearsal()) else torch.float32


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def _blocks(model, adapter, which):
    blocks = []
    if which in ("vision", "all"):
        blocks += [b for _, stack in adapter.vision_block_lists(model) for b in stack]
    if which in ("lm", "all"):
        blocks += adapter.lm_layers(model)
    return blocks


def _compile_failure(backend, device):
    """None when `backend` compiles and runs a small function on `device`, else why not."""
    try:
        torch.compile(lambda x: torch.nn.functional.gelu(x @ x.T) + 1, backend=backend)(torch.ones(4, 4, device=device))
    except Exception as err:  # noqa: BLE001 - whatever stops compiling means: the plain path
        return _reason(err)
    return None


def _reason(err):
    cause = getattr(err, "inner_exception", None) or err.__cause__ or err  # dynamo wraps the backend's error
    return f"{type(cause).__name__}: {(str(cause).splitlines() or [''])[0][:200]}"


def compile_blocks(model, adapter, which="all", backend="inductor"):
    """Compile the forward of each block in `which` (see COMPILE_CHOICES) with `backend`, in place.
    Returns what was done, for config.json: {"compile_blocks", "backend", "blocks"}; "fallback" and
    "reason" are added (and one warning printed) when a compiled call fails and the blocks run
    eagerly. Parameters, their names and the state dict are unchanged (the forward is wrapped,
    the module is not replaced), so checkpoints and the selection do not notice."""
    if which not in COMPILE_CHOICES:
        raise ValueError(f"compile_blocks must be one of {COMPILE_CHOICES}, not {which!r}")
    backend_name = backend if isinstance(backend, str) else getattr(backend, "__name__", repr(backend))
    report = {"compile_blocks": which, "backend": backend_name, "blocks": 0}
    if which == "none":
        return report
    failure = _compile_failure(backend, next(model.parameters()).device)
    if failure is not None:
        warn(f"--compile_blocks: torch.compile ({backend_name}) cannot run here ({failure}); plain path")
        report.update(fallback=True, reason=failure)
        return report
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILE_RECOMPILE_LIMIT)
    report["recompile_limit"] = torch._dynamo.config.recompile_limit

    def guarded(block):
        eager = block.forward
        compiled = torch.compile(eager, backend=backend)
        checked = False

        def forward(*args, **kwargs):
            nonlocal checked
            if report.get("fallback"):  # one block failed: every block runs eagerly
                return eager(*args, **kwargs)
            if checked:
                return compiled(*args, **kwargs)
            try:
                out = compiled(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - any compile failure means: run eagerly
                report.update(fallback=True, reason=_reason(err))
                warn(f"torch.compile ({backend_name}) failed on {type(block).__name__} ({report['reason']}); "
                     "all blocks run eagerly")
                return eager(*args, **kwargs)
            checked = True
            return out

        block.forward = forward

    blocks = _blocks(model, adapter, which)
    for block in blocks:
        guarded(block)
    report["blocks"] = len(blocks)
    return report


def apply_liger(model, device):
    """Liger's fused kernels (RMSNorm, SwiGLU, RoPE, ...) patched into `model` where liger-kernel
    supports its family, on CUDA. Its fused linear + cross-entropy is left off: our LM loss
    (lm_loss.py) already applies the head at the supervised positions only. Returns
    {"liger_kernel": True} when applied, else {"liger_kernel": False, "reason": ...} after one
    warning line."""
    def fallback(reason):
        warn(f"--liger_kernel: {reason}; plain kernels")
        return {"liger_kernel": False, "reason": reason}

    try:
        from liger_kernel.transformers import monkey_patch
    except ImportError:
        return fallback("liger-kernel is not installed (pip install liger-kernel, on a CUDA machine)")
    if torch.device(device).type != "cuda":
        return fallback(f"liger-kernel's Triton kernels need a CUDA device, not {device}")
    model_type = model.config.model_type
    if model_type not in monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN:
        return fallback(f"liger-kernel has no kernels for model type {model_type!r}")
    try:
        monkey_patch._apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=False,
                                                     cross_entropy=False)
    except Exception as err:  # noqa: BLE001 - a version mismatch must not stop the run
        return fallback(f"{type(err).__name__}: {err}")
    return {"liger_kernel": True, "model_type": model_type}


def loader_settings(device_type, num_workers=None, processes=1):
    """DataLoader keyword arguments that keep a GPU fed, for config.json and the DataLoader:
    - num_workers: as asked; by default 0 on a CPU (the step itself needs the cores) and on CUDA
      up to 8 per process from the cores there are (decoding and processing 15 images per batch
      in the main process would stall the GPU);
    - pin_memory on CUDA (page-locked batches copy to the GPU faster, and without blocking:
      data.split_batch moves them with non_blocking=True), and in a GPU rehearsal on a CPU (where
      torch's DataLoader warns that no accelerator is found and leaves the batches as they are);
    - with workers: 4 batches prefetched per worker and persistent workers (no re-spawn, and no
      re-import of the processor, at every epoch)."""
    if num_workers is None:
        cores = os.cpu_count() or 1
        num_workers = min(8, max(cores // max(processes, 1) - 1, 0)) if device_type == "cuda" else 0
    settings = {"num_workers": num_workers, "pin_memory": device_type == "cuda" or gpu_rehearsal()}
    if num_workers > 0:
        settings.update(prefetch_factor=4, persistent_workers=True)
    return settings
