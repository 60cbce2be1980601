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

Adapter hooks (optional; the defaults work on Qwen2-VL and Qwen2.5-VL):
    adapter.lm_last_hidden_state(model, inputs) -> [B, T, H] the decoder's output after its final
        norm (HF's hidden_states[-1]), without the LM head and without a KV cache.
    adapter.lm_head(model) -> the module mapping [.., H] to [.., vocab] (exists in models.py).
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
    """`loss` as HF's `outputs.loss`; `last_hidden_state` [B, T, H] (kept in the graph);
    `n_tokens` the number of supervised tokens the mean is over."""
    loss: torch.Tensor
    last_hidden_state: torch.Tensor
    n_tokens: int


def supervised_lm_loss(model, adapter, inputs, labels=None):
    """HF's causal-LM loss with the LM head applied only at supervised positions.

    `inputs`: the model inputs of a collated batch (data.split_batch's first item); `labels` taken
    from `inputs["labels"]` when not given (and never passed to the model). Returns an
    LMLossOutput; with no supervised token the loss is NaN, as HF's is."""
    inputs = dict(inputs)
    in_batch = inputs.pop("labels", None)
    labels = in_batch if labels is None else labels
    if labels is None:
        raise ValueError("supervised_lm_loss needs labels (in inputs['labels'] or as an argument)")
    hidden = last_hidden_state(model, adapter, inputs)
    targets = shifted_labels(labels.to(hidden.device))
    keep = targets != IGNORE_INDEX
    logits = adapter.lm_head(model)(hidden[keep]).float()  # [n_supervised, vocab]
    loss = F.cross_entropy(logits, targets[keep], reduction="mean")
    return LMLossOutput(loss=loss, last_hidden_state=hidden, n_tokens=int(keep.sum()))


def last_position_logits(model, adapter, inputs):
    """[B, vocab] float32 logits at each row's last column (the next token of a left-padded prompt)."""
    hidden = last_hidden_state(model, adapter, inputs)
    return adapter.lm_head(model)(hidden[:, -1]).float()
