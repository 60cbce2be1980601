"""The LM loss without full-vocabulary logits, and last-position logits for scoring.

`model(**batch)` with `labels` makes HF compute the LM head at every position of every sequence:
a float32 [tokens, vocab] tensor (151,936 columns for Qwen2-VL) plus its log-softmax and their
gradients, to supervise the handful of answer tokens a grid question has. Here the decoder runs to
its last hidden state and the head is applied only where it is read:

    supervised_lm_loss(model, adapter, batch)   # training: rows whose next-token label is set
    last_position_logits(model, adapter, inputs)   # scoring: the last column (left-padded prompts)

The loss is HF's `ForCausalLMLoss` (shift by one, ignore -100, float32 logits, mean over the
supervised tokens) on fewer rows, so it equals `model(**batch).loss` to float rounding and has the
same gradients (tests/test_perf_paths.py). Forward hooks, such as spatial_loss.capture_layer, see
the same decoder layers run as in `model(**batch)`.

A batch collated with `encode_images_once` (data.VLMCollator) carries each distinct image once
and `image_index`; both functions then let the adapter encode the images once and pass every
row its features (`adapter.encode_images_once`) before the forward. The vision tower then runs
outside the DDP wrapper's forward; its parameters are still found through the autograd graph
(train.py's DDP has find_unused_parameters=True).

Two ways to the hidden states, the same numbers:
- "forward" (default): the model's own forward with HF's `logits_to_keep` set to the boolean
  [B, T] mask of supervised positions (or 1 for scoring): the head runs on those rows only. The
  call goes through `model(...)`, so a DistributedDataParallel / accelerate wrapper still sees
  its forward (gradient sync) and any model whose forward takes `logits_to_keep` works.
- "backbone": the adapter's `lm_last_hidden_state(model, inputs)` (default: `model.model(...)`'s
  `last_hidden_state`, Qwen2-VL / Qwen2.5-VL), then `adapter.lm_head(model)` on the rows needed.
  For families whose forward lacks `logits_to_keep`; it bypasses a DDP wrapper's forward, so pass
  the unwrapped model and do not use it under DDP.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def last_hidden_state(model, adapter, inputs):
    """[B, T, H]: the decoder's output after the final norm, no LM head, no KV cache.

    Uses `adapter.lm_last_hidden_state(model, inputs)` when the adapter has it; otherwise the
    HF multimodal layout of Qwen2-VL / Qwen2.5-VL: `model.model(...)` (vision tower + merge +
    language model) returns `last_hidden_state`."""
    own = getattr(adapter, "lm_last_hidden_state", None)
    if own is not None:
        return own(model, inputs)
    backbone = getattr(model, "model", None)
    if backbone is None:
        raise AttributeError(f"{type(model).__name__} has no `.model` backbone; give its adapter an "
                             "`lm_last_hidden_state(model, inputs)` method")
    return backbone(**inputs, use_cache=False).last_hidden_state


def shifted_labels(labels):
    """labels[:, 1:] padded with -100 at the end: the label each position predicts (HF's shift)."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]


@dataclass
class LMLossOutput:
    """`loss` as HF's `outputs.loss`; `last_hidden_state` [B, T, H] (kept in the graph; None on
    the "forward" path); `n_tokens` the number of supervised tokens the mean is over."""
    loss: torch.Tensor
    last_hidden_state: torch.Tensor
    n_tokens: int


def _unwrapped(model):
    return getattr(model, "module", model)  # DDP / accelerate wrappers keep the model in .module


def supervised_lm_loss(model, adapter, inputs, labels=None, path="forward"):
    """HF's causal-LM loss with the LM head applied only at supervised positions.

    `inputs`: the model inputs of a collated batch (data.split_batch's first item); `labels` taken
    from `inputs["labels"]` when not given (and never passed to the model). Returns an
    LMLossOutput (`.loss` as HF's `outputs.loss`); with no supervised token the loss is NaN, as
    HF's is. `path`: "forward" (default) or "backbone", see the module docstring."""
    inputs = dict(inputs)
    in_batch = inputs.pop("labels", None)
    labels = in_batch if labels is None else labels
    if labels is None:
        raise ValueError("supervised_lm_loss needs labels (in inputs['labels'] or as an argument)")
    if "image_index" in inputs:  # a batch collated with encode_images_once
        inputs = adapter.encode_images_once(_unwrapped(model), inputs)
    targets = shifted_labels(labels.to(inputs["input_ids"].device))
    keep = targets != IGNORE_INDEX
    if path == "forward":
        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits.float()  # [n_supervised, vocab]
        hidden = None
    elif path == "backbone":
        hidden = last_hidden_state(model, adapter, inputs)
        logits = adapter.lm_head(_unwrapped(model))(hidden[keep]).float()
    else:
        raise ValueError(f"path must be 'forward' or 'backbone', not {path!r}")
    loss = F.cross_entropy(logits, targets[keep].to(logits.device), reduction="mean")
    return LMLossOutput(loss=loss, last_hidden_state=hidden, n_tokens=int(keep.sum()))


def last_position_logits(model, adapter, inputs, path="forward"):
    """[B, vocab] float32 logits at each row's last column (the next token of a left-padded prompt)."""
    if "image_index" in inputs:
        inputs = adapter.encode_images_once(_unwrapped(model), inputs)
    if path == "forward":
        return model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1].float()
    hidden = last_hidden_state(model, adapter, inputs)
    return adapter.lm_head(_unwrapped(model))(hidden[:, -1]).float()
