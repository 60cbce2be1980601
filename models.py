"""Model loading, the alias registry, and the per-family adapters (the one place that knows how a
VLM family is built, prompted and tokenized).

Everything that differs between VLM families lives behind `VLMAdapter` (documented below), so the
collator, the parameter selectors, the spatial loss, the ID derivation and both evaluation modes
never branch on a model's name. Adapters find modules by structure (an attribute name at any
depth, the ModuleLists under a tower), never by a fixed parameter-name prefix: transformers 4.x and
5.x nest the same towers differently (5.x CLIP/SigLIP towers have no `.vision_model` level).

Tiny random models of every family (`tiny`, `tiny-qwen2.5`, `tiny-llava`, `tiny-mllama`,
`tiny-internvl`, `tiny-gemma3`) are built offline by `tiny_models.py` and loaded through the same
`from_pretrained` path as real checkpoints.
"""
import argparse
import json
import os
from pathlib import Path
from typing import NamedTuple

import torch
import transformers
from huggingface_hub import hf_hub_download
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import processors
import tiny_models

REPO_ROOT = Path(__file__).resolve().parent

# Short names used by the run scripts; any hub id or local folder works as well. The original's
# aliases (its utils/extract_embeds.py) are kept exactly, so ID files named after them match.
MODEL_ALIASES = {
    # the original's
    "qwen2-2b": "Qwen/Qwen2-VL-2B-Instruct",
    "qwen-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
    "llava-7b": "llava-hf/llava-1.5-7b-hf",
    "llava-13b": "llava-hf/llava-1.5-13b-hf",
    "llama-11b": "meta-llama/Llama-3.2-11B-Vision-Instruct",
    "llava-cot": "Xkev/Llama-3.2V-11B-cot",
    "internvl-1b": "OpenGVLab/InternVL3-1B-hf",
    "internvl-2b": "OpenGVLab/InternVL3-2B-hf",
    "internvl-8b": "OpenGVLab/InternVL3-8B-hf",
    "internvl-14b": "OpenGVLab/InternVL3-14B-hf",
    "gemma-4b": "google/gemma-3-4b-it",
    "gemma-12b": "google/gemma-3-12b-it",
    # ours
    "qwen2-7b": "Qwen/Qwen2-VL-7B-Instruct",
    "qwen2.5-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
}
MODEL_ALIASES.update({alias: alias for alias in tiny_models.TINY_ALIASES})

# Kept for callers of the former single tiny model.
TINY_SEED = tiny_models.TINY_SEED
SPECIAL_TOKENS = tiny_models.QWEN_SPECIAL_TOKENS
QWEN2VL_CHAT_TEMPLATE = tiny_models.QWEN2VL_CHAT_TEMPLATE


def resolve_model_name(name):
    """Alias -> hub id; anything else (hub id, local folder) passes through unchanged."""
    return MODEL_ALIASES.get(name, name)


# ---------------------------------------------------------------------------------------------
# Structural look-ups
# ---------------------------------------------------------------------------------------------

def _find_child(root, names, what):
    """The first submodule (in registration order, at any depth) whose attribute name is one of
    `names`: `model.model.vision_tower` and `model.vision_tower` are both found."""
    for full_name, module in root.named_modules():
        if full_name.rsplit(".", 1)[-1] in names:
            return module
    raise AttributeError(f"{type(root).__name__} has no {what} (looked for a submodule named {' or '.join(names)})")


def _block_lists(tower):
    """The ModuleLists of transformer blocks under a tower, in registration (= forward) order.
    Lists nested inside a block (e.g. a block's own sub-layers) are not separate lists."""
    lists = []
    for name, module in tower.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and not any(
                name.startswith(outer + ".") for outer, _ in lists):
            lists.append((name, module))
    return [m for _, m in lists]


def _is_norm(module):
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith(("Norm", "RMSNorm"))


def generic_block_parts(block):
    """MLP, attention, norms and extra weights of one transformer block, by its direct children:
    the attention module (`attn`, `self_attn`, `attention` or `cross_attn`), the MLP (`mlp` or
    `feed_forward`: Qwen2.5-VL's vision gate/up/down included), every direct child that is a norm
    layer (q/k norms inside attention stay with attention), and the block's own parameters
    (InternViT's layer scale `lambda_1/2`, Mllama's `gate_attn`/`gate_ffn`, cross-attention gates)."""
    children = dict(block.named_children())
    attn = next((children[n] for n in ("attn", "self_attn", "attention", "cross_attn") if n in children), None)
    mlp = next((children[n] for n in ("mlp", "feed_forward") if n in children), None)
    if attn is None or mlp is None:
        raise ValueError(f"{type(block).__name__}: no attention or MLP child among {sorted(children)}")
    norms = [m for n, m in children.items() if m is not attn and m is not mlp and _is_norm(m)]
    extra = list(block.parameters(recurse=False))
    return {"mlp": mlp, "attn": attn, "norms": norms, "extra": extra}


# ---------------------------------------------------------------------------------------------
# The adapter interface
# ---------------------------------------------------------------------------------------------

class VLMAdapter:
    """Everything family-specific about a VLM, in one object. Subclasses set the class attributes
    and override what their family does differently; the defaults below are the common case.

    Vision side
      vision_tower(model)          the image encoder module
      vision_block_lists(model)    [(label, [block, ...]), ...]: every stack of transformer blocks
                                   in the tower, in forward order ("vision block", or Mllama's
                                   "local block" / "global block")
      used_vision_blocks(model)    [(label, index, block), ...] in forward order: only blocks whose
                                   output reaches the LM (LLaVA reads layer -2: its last block is
                                   listed but unused)
      unused_reason(model)         why listed blocks are unused ("" when all are used)
      vision_blocks(model)         [block, ...] of used_vision_blocks
      block_parts(block)           {"mlp": module, "attn": module, "norms": [modules],
                                    "extra": [parameters]} for vision and LM blocks alike
      projector(model)             the module mapping vision features to LM embeddings
    Language side
      lm_layers(model)             the LM's decoder layers (all of them, cross-attention included)
      hidden_state_layers(model, with_image=True)
                                   the layers whose outputs are HF's hidden_states[1..N-1]
                                   (hidden_states[N] is after lm_final_norm); Mllama skips its
                                   cross-attention layers without an image, which shifts indices
      lm_final_norm / lm_embeddings / lm_head / lm_hidden_size
    Text
      end_of_turn, answer_prefix   an answer is rendered as answer_prefix + answer + end_of_turn
      padding_side                 for batched generation (training works with either side)
      render_prompt(processor, question)   chat prompt with one image, up to the answer
      render_answer(answer)                what follows the prompt in training
      encode(processor, texts, images)     model inputs (BOS handled once)
      token_span_from(tokenizer, text, char_start, row_ids, last_real, label)
                                   where the tokens of text[char_start:] sit in a processed row,
                                   found by matching token ids (labels, targets)
      target_position(tokenizer, text, name_end, name, row_ids, last_real, label)
                                   position of the token ending an object's name, checked by
                                   decoding it; errors name `label`
      option_token_ids(processor, options) first token of each option as it follows the prompt
      option_forms(processor, option)      [(text, ids)]: each surface form of an option word
                                   (lowercase, Capitalised; the leading space the template puts
                                   before an answer) and its full token sequence after the prompt
      extend_text(inputs, ids)     model inputs with tokens appended to every row (scoring an
                                   option's later tokens)
    Images
      image_budget(processor, max_pixels)  bound the pixels (so visual tokens) per image; the
                                   bound in force, or None for a family whose processor resizes
                                   every image to a fixed size
    Processor
      build_processor(path)        image-only processor from a checkpoint folder or hub id
    Each distinct image encoded once per batch
      pixel_keys                   inputs that hold images, not text rows (pixel_values, ...)
      pixel_chunks(batch)          [B]: leading entries of the pixel inputs per row's image
      keep_unique_images(batch, first_rows)   collator side: each distinct image's pixels once
      unique_image_features(model, pixels, inputs, first_rows)   HF image features of those
      encode_images_once(model, inputs)       model side: inputs with every row's features
                                   precomputed (`mm_encoder_outputs`; Mllama:
                                   `cross_attention_states`), `image_index` and pixels removed
      generate_takes_image_features  whether model.generate accepts those inputs (Mllama: no)
    """

    family = "?"
    model_types = ()  # config.model_type values served
    processor_class_names = ()  # processor classes this family's build_processor returns
    end_of_turn = ""
    answer_prefix = ""
    padding_side = "left"
    # The chat template writes BOS itself (Llama 3, Gemma): the processor must not add another.
    template_adds_bos = False
    tower_names = ("vision_tower", "vision_model", "visual")
    projector_names = ("multi_modal_projector",)
    block_label = "vision block"

    # -- vision
    def vision_tower(self, model):
        return _find_child(model, self.tower_names, "vision tower")

    def vision_block_lists(self, model):
        lists = _block_lists(self.vision_tower(model))
        if len(lists) != 1:
            raise ValueError(f"{type(model).__name__}: expected one list of vision blocks, found {len(lists)}")
        return [(self.block_label, list(lists[0]))]

    def used_vision_blocks(self, model):
        return [(label, i, b) for label, blocks in self.vision_block_lists(model) for i, b in enumerate(blocks)]

    def unused_reason(self, model):
        return ""

    def vision_blocks(self, model):
        """The ordered vision blocks whose output reaches the language model."""
        return [b for _, _, b in self.used_vision_blocks(model)]

    def block_parts(self, block):
        return generic_block_parts(block)

    def projector(self, model):
        return _find_child(model, self.projector_names, "projector")

    # -- language model
    def language_model(self, model):
        return _find_child(model, ("language_model",), "language model")

    def lm_layers(self, model):
        return list(_find_child(self.language_model(model), ("layers",), "decoder layer list"))

    def hidden_state_layers(self, model, with_image=True):
        return self.lm_layers(model)

    def lm_final_norm(self, model):
        """The norm after the last LM layer (its output is `hidden_states[num_layers]`)."""
        lm = self.language_model(model)
        return lm.norm if hasattr(lm, "norm") else _find_child(lm, ("norm",), "final norm")

    def lm_embeddings(self, model):
        return model.get_input_embeddings()

    def lm_head(self, model):
        return model.get_output_embeddings()

    def lm_hidden_size(self, model):
        cfg = getattr(model, "config", model)
        return cfg.get_text_config().hidden_size

    # -- text
    def render_prompt(self, processor, question):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def render_answer(self, answer):
        return self.answer_prefix + answer + self.end_of_turn

    def encode(self, processor, texts, images):
        return processor(text=texts, images=images, padding=True, return_tensors="pt",
                         add_special_tokens=not self.template_adds_bos)

    def _tail(self, tokenizer, text, char_index, label):
        """(index, ids, offsets) of `text` tokenized alone, where index is the first token that
        ends after character `char_index` (the one holding it; with trimmed offsets a leading space
        belongs to no token). The image placeholder precedes the question, so the tokens after it
        are the same in the processor's expanded sequence."""
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        for k, (s, e) in enumerate(offsets):
            if e > char_index and e > s:
                return k, ids, offsets
        raise ValueError(f"{label}: no token covers character {char_index} of {text!r}")

    def token_span_from(self, tokenizer, text, char_start, row_ids, last_real, label):
        """Start of the tokens of text[char_start:] in a processed row ending at `last_real`.
        The first of them must start exactly at char_start (a token boundary), and the row must
        end with exactly these ids."""
        k, ids, offsets = self._tail(tokenizer, text, char_start, label)
        begin = offsets[k][0]
        # Only whitespace may lie between the text's start and its first token's (a leading
        # space/"▁" belongs to the token that follows it, or to none with trimmed offsets).
        if text[min(begin, char_start):max(begin, char_start)].strip():
            raise ValueError(f"{label}: {text[char_start:char_start + 20]!r} does not start on a token boundary "
                             f"(the token {tokenizer.decode([ids[k]])!r} starts earlier)")
        return self._match(ids[k:], row_ids, last_real, label)

    def _match(self, tail, row_ids, last_real, label):
        start = int(last_real) - len(tail) + 1
        row = [int(x) for x in row_ids[max(start, 0):int(last_real) + 1]]
        if start < 0 or row != list(tail):
            raise ValueError(f"{label}: the processed tokens do not end with the text's own tokenization "
                             f"(expected {list(tail)[:8]}..., got {row[:8]}...)")
        return start

    def target_position(self, tokenizer, text, name_end, name, row_ids, last_real, label):
        """Position in the processed row of the token that ends `name` (which ends at character
        `name_end` of `text`), found by matching and checked by decoding."""
        k, ids, offsets = self._tail(tokenizer, text, name_end - 1, label)
        pos = self._match(ids[k:], row_ids, last_real, label)
        piece = tokenizer.decode([int(row_ids[pos])]).strip()
        if offsets[k][1] != name_end or not piece or not name.endswith(piece):
            raise ValueError(f"{label}: the token at the end of {name!r} decodes to {piece!r}, which does not "
                             f"end the name (it runs on past it: the name does not end on a token boundary)")
        return pos

    def option_token_ids(self, processor, options):
        """The id of each option's first token where it follows the generation prompt (so a
        SentencePiece "▁left" or a byte-level "left" as the model would emit it), checked by
        decoding, and distinct across the options."""
        tokenizer = processor.tokenizer
        prompt = self.render_prompt(processor, "?")
        ids = []
        for option in options:
            text = prompt + self.render_answer(option)
            k, toks, _ = self._tail(tokenizer, text, len(prompt) + len(self.answer_prefix), f"option {option!r}")
            piece = tokenizer.decode([toks[k]]).strip()
            if not piece or not option.startswith(piece):
                raise ValueError(f"option {option!r}: its first token after the prompt decodes to {piece!r}")
            ids.append(toks[k])
        if len(set(ids)) != len(ids):
            raise ValueError(f"options {options} share their first token; score mode cannot tell them apart")
        return ids

    def option_forms(self, processor, option):
        """[(text, ids)] of the option's surface forms as an answer after the generation prompt:
        the word lowercase and Capitalised, each after the family's answer_prefix (the leading
        space its template writes, or none), with its whole token sequence (a multi-token word
        such as "beh"+"ind" included). Forms whose ids coincide are listed once."""
        tokenizer = processor.tokenizer
        prompt = self.render_prompt(processor, "?")
        forms, seen = [], set()
        for word in dict.fromkeys((option.lower(), option[:1].upper() + option[1:].lower())):
            form = self.answer_prefix + word
            text = prompt + form + self.end_of_turn
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            start, end = len(prompt), len(prompt) + len(form)
            spans = [(i, a, b) for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if b > start and b > a]
            ids = [i for i, a, b in spans if a < end]
            # The form's first token must not reach back into the prompt (beyond the whitespace a
            # trimmed offset leaves out): then the answer would not be a continuation of it.
            if not spans or prompt[spans[0][1]:start].strip():
                raise ValueError(f"option {option!r}: its form {form!r} merges with the prompt's last token")
            if not ids or tokenizer.decode(ids).strip() != word:
                raise ValueError(f"option {option!r}: the tokens of {form!r} after the prompt decode to "
                                 f"{tokenizer.decode(ids)!r}")
            if tuple(ids) not in seen:
                seen.add(tuple(ids))
                forms.append((form, ids))
        return forms

    def extend_text(self, inputs, ids):
        """`inputs` with the [B, T] token ids `ids` appended to every row: the attention mask
        continues with ones, and every other per-token input ([B, L, ...]: token types, Mllama's
        cross-attention mask) repeats its last column (a text token's)."""
        input_ids = inputs["input_ids"]
        b, length = input_ids.shape
        out = dict(inputs)
        for key, value in inputs.items():
            if key == "input_ids":
                out[key] = torch.cat([value, ids.to(value.device, value.dtype)], dim=1)
            elif (key not in self.pixel_keys and isinstance(value, torch.Tensor) and value.dim() >= 2
                  and value.shape[0] == b and value.shape[1] == length):
                tail = value[:, -1:].expand(-1, ids.shape[1], *value.shape[2:])
                out[key] = torch.cat([value, torch.ones_like(tail) if key == "attention_mask" else tail], dim=1)
        return out

    def image_budget(self, processor, max_pixels):
        """Fixed-size families (LLaVA, Mllama, InternVL, Gemma-3) resize every image to their own
        size: no budget applies (None)."""
        return None

    def prepare_config(self, config, raw):
        """Fix a loaded config before the weights load (`raw`: the config.json dict)."""
        return config

    # -- each distinct image encoded once per batch
    # The collator (data.VLMCollator(encode_images_once=True)) keeps the pixel inputs of each
    # distinct image once and records `image_index` (row -> distinct image); before the forward,
    # lm_loss calls `encode_images_once`, which runs the vision tower on the distinct images and
    # hands every row its image's features through the model's own `mm_encoder_outputs` input.
    # Rows that show the same image then share one encoding; the loss is the plain path's, and the
    # gradient of the shared encoding is the sum of the rows' (what two encodings got apart).
    pixel_keys = ("pixel_values",)  # inputs whose leading dimension counts image entries, not rows
    # model.generate accepts encode_images_once's inputs (evaluation shares an image's encoding).
    generate_takes_image_features = True

    def pixel_chunks(self, batch):
        """[B]: how many leading entries of the pixel inputs belong to each row's image (1 for
        one tensor per image; InternVL's tiles give several). Rows must agree: a batch whose
        images are tiled differently cannot be told apart by shape alone."""
        rows, entries = batch["input_ids"].shape[0], batch[self.pixel_keys[0]].shape[0]
        if entries % rows:
            raise ValueError(f"{self.family}: {entries} image entries for {rows} rows; the images are tiled "
                             "differently, so they cannot be shared (run without --encode_images_once)")
        return torch.full((rows,), entries // rows, dtype=torch.long)

    def keep_unique_images(self, batch, first_rows):
        """Collator side: the pixel inputs of the rows in `first_rows` (each distinct image's first
        row, in order), the others' dropped. Text inputs stay per row."""
        chunks = self.pixel_chunks(batch)
        starts = chunks.cumsum(0) - chunks
        keep = torch.cat([torch.arange(int(starts[r]), int(starts[r] + chunks[r])) for r in first_rows])
        for key in self.pixel_keys:
            batch[key] = batch[key][keep]
        return batch

    def unique_image_features(self, model, pixels, inputs, first_rows):
        """HF's image-features output (pooler_output: what the forward merges into the text) of the
        distinct images only."""
        return model.get_image_features(**pixels, return_dict=True)

    def encode_images_once(self, model, inputs):
        """Model side: `inputs` without `image_index` and the pixel inputs, with every row's image
        features in `mm_encoder_outputs` (HF's input for precomputed image features), the vision
        tower run once per distinct image. `model`: the unwrapped model."""
        inputs, image_index, pixels, first_rows = self._split_image_inputs(inputs)
        features = self.unique_image_features(model, pixels, inputs, first_rows)
        features.pooler_output = _per_row(features.pooler_output, image_index, len(first_rows))
        inputs["mm_encoder_outputs"] = {"image": features}
        return inputs

    def _split_image_inputs(self, inputs):
        """(a copy of `inputs` without the image inputs, image_index as a list, the pixel inputs,
        the first row of each distinct image)."""
        inputs = dict(inputs)
        image_index = inputs.pop("image_index").tolist()  # once: each int() of a CUDA element is a sync
        pixels = {key: inputs.pop(key) for key in self.pixel_keys}
        return inputs, image_index, pixels, first_rows_of(image_index)

    # -- processor
    processor_class = None  # standard class name a saved processor names, where ours is a subclass

    def build_processor(self, path):
        return transformers.AutoProcessor.from_pretrained(str(path))

    def save_processor(self, processor, folder):
        """Save the processor; an image-only subclass of ours is saved under the standard class name
        so plain AutoProcessor finds it wherever it can build it."""
        processor.save_pretrained(folder)
        if self.processor_class:
            path = Path(folder) / "processor_config.json"
            config = json.loads(path.read_text())
            config["processor_class"] = self.processor_class
            path.write_text(json.dumps(config, indent=2))

    def __repr__(self):
        return f"{type(self).__name__}(family={self.family!r})"


def first_rows_of(image_index):
    """[the first row showing each distinct image] for `image_index` (row -> distinct image),
    which numbers the distinct images 0, 1, ... in order of first appearance."""
    first_rows = []
    for row, image in enumerate(int(i) for i in image_index):
        if image == len(first_rows):
            first_rows.append(row)
        elif image > len(first_rows):
            raise ValueError("image_index must number images in order of first appearance: "
                             f"{[int(i) for i in image_index]}")
    return first_rows


def _per_row(features, image_index, n_unique):
    """Image features of the distinct images -> one copy per row, in the layout the model returned:
    a tuple/list of per-image tensors (Qwen) or one tensor whose leading dimension holds the images
    in order, each the same number of entries (tiles). Indexing keeps the graph: the gradient of a
    shared image's features is the sum over its rows."""
    if isinstance(features, (tuple, list)):
        if len(features) != n_unique:
            raise ValueError(f"{len(features)} image feature tensors for {n_unique} distinct images")
        return type(features)(features[int(i)] for i in image_index)
    if features.shape[0] % n_unique:
        raise ValueError(f"image features of leading size {features.shape[0]} do not split into {n_unique} images")
    per_image = features.reshape(n_unique, -1, *features.shape[1:])
    return per_image[torch.as_tensor(image_index, device=features.device)].reshape(-1, *features.shape[1:])


class QwenVLAdapter(VLMAdapter):
    """Qwen2-VL and Qwen2.5-VL: `visual.blocks` (all feed `visual.merger`, the projector),
    `language_model.layers`. Qwen2.5-VL's vision MLP is gate/up/down like its LM's."""

    family = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    processor_class_names = ("Qwen2VLImageOnlyProcessor",)
    end_of_turn = "<|im_end|>"
    tower_names = ("visual",)
    projector_names = ("merger",)

    processor_class = "Qwen2VLProcessor"  # the standard class a saved processor names

    def __init__(self, family="qwen2_vl", processor_class="Qwen2VLProcessor"):
        self.family = family
        self.processor_class = processor_class

    def projector(self, model):
        return self.vision_tower(model).merger

    def pixel_chunks(self, batch):
        # pixel_values holds each image's patches, t * h * w of them (image_grid_thw).
        return batch["image_grid_thw"].prod(-1)

    def unique_image_features(self, model, pixels, inputs, first_rows):
        # image_grid_thw stays per row in the inputs (the 3-D rotary positions read it).
        return model.get_image_features(pixels["pixel_values"], inputs["image_grid_thw"][first_rows],
                                        return_dict=True)

    def build_processor(self, path):
        return _build_qwen_processor(path)

    def image_budget(self, processor, max_pixels):
        """Qwen's processor keeps an image's aspect and resizes it to at most `longest_edge`
        pixels (28 x 28 pixels per visual token after the 2 x 2 merge); the budget only lowers it."""
        image_processor = processor.image_processor
        longest = image_processor.size["longest_edge"]
        if max_pixels is not None and max_pixels < longest:
            longest = int(max_pixels)
            image_processor.size["longest_edge"] = longest
            if getattr(image_processor, "max_pixels", None) is not None:
                image_processor.max_pixels = longest
        return longest

    def save_processor(self, processor, folder):
        """Save under the standard class name with a video-processor config, so that plain
        `AutoProcessor.from_pretrained(folder)` builds the standard processor wherever it can be
        built (it needs torchvision); our image-only subclass is only how we build it without."""
        processor.save_pretrained(folder)
        path = Path(folder) / "processor_config.json"
        config = json.loads(path.read_text())
        config["processor_class"] = self.processor_class
        path.write_text(json.dumps(config, indent=2))
        video = {k: v for k, v in config["image_processor"].items() if k != "image_processor_type"}
        video["video_processor_type"] = "Qwen2VLVideoProcessor"
        (Path(folder) / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))


class LlavaAdapter(VLMAdapter):
    """LLaVA-1.5: CLIP tower, two-layer MLP projector, Llama-2 LM with SentencePiece pieces.
    Image features come from `vision_feature_layer` (-2): later blocks and `post_layernorm` are
    listed in the tower but never reach the LM."""

    family = "llava"
    model_types = ("llava",)
    processor_class_names = ("LlavaProcessor",)
    end_of_turn = "</s>"
    answer_prefix = " "  # "ASSISTANT:" then " left</s>", as the template renders an assistant turn

    def _feature_layers(self, model):
        layer = model.config.vision_feature_layer
        return [layer] if isinstance(layer, int) else list(layer)

    def used_vision_blocks(self, model):
        (label, blocks), = self.vision_block_lists(model)
        # hidden_states[0] is the embedding output, hidden_states[i] the output of block i-1.
        n = len(blocks)
        used = max(f if f >= 0 else n + 1 + f for f in self._feature_layers(model))
        return [(label, i, blocks[i]) for i in range(used)]

    def unused_reason(self, model):
        return f"vision_feature_layer={model.config.vision_feature_layer}"


class MllamaAdapter(VLMAdapter):
    """Llama-3.2-Vision: a local encoder (`transformer.layers`, 32) whose output and intermediate
    layers feed a gated global encoder (`global_transformer.layers`, 8; gates are `extra`), then
    one Linear projector; the LM interleaves cross-attention layers. Without an image the LM skips
    its cross-attention layers, and HF's hidden_states then count self-attention layers only."""

    family = "mllama"
    model_types = ("mllama",)
    processor_class_names = ("MllamaProcessor",)
    end_of_turn = "<|eot_id|>"
    template_adds_bos = True

    def vision_block_lists(self, model):
        lists = _block_lists(self.vision_tower(model))
        if len(lists) != 2:
            raise ValueError(f"{type(model).__name__}: expected local and global vision block lists, found {len(lists)}")
        return [("local block", list(lists[0])), ("global block", list(lists[1]))]

    def hidden_state_layers(self, model, with_image=True):
        layers = self.lm_layers(model)
        if with_image:
            return layers
        cross = set(model.config.get_text_config().cross_attention_layers)
        return [layer for i, layer in enumerate(layers) if i not in cross]

    def encode(self, processor, texts, images):
        # One image per prompt: Mllama's processor wants the images nested per text.
        return processor(text=texts, images=[[im] for im in images], padding=True, return_tensors="pt",
                         add_special_tokens=False)

    # One entry per row in each (its tiles inside); cross_attention_mask stays per row.
    pixel_keys = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")
    # Its generate recomputes the cross-attention mask's length from pixel_values; given
    # cross_attention_states instead it fails, so generation encodes each row's image.
    generate_takes_image_features = False

    def encode_images_once(self, model, inputs):
        """Mllama's LM reads images through cross-attention, not merged embeddings: its forward
        takes the projected vision states as `cross_attention_states` (what it computes from
        pixel_values), here of the distinct images, repeated per row."""
        inputs, image_index, pixels, first_rows = self._split_image_inputs(inputs)
        backbone = model.model
        states = backbone.vision_model(**pixels).last_hidden_state
        states = backbone.multi_modal_projector(states).reshape(-1, states.shape[-2], backbone.hidden_size)
        inputs["cross_attention_states"] = _per_row(states, image_index, len(first_rows))
        return inputs


class InternVLAdapter(VLMAdapter):
    """InternVL3 -hf: InternViT (`encoder.layer`, layer scale `lambda_1/2` as extra weights),
    pixel-shuffle + MLP projector, Qwen2.5 LM; separate lm_head and input embeddings."""

    family = "internvl"
    model_types = ("internvl",)
    processor_class_names = ("InternVLImageOnlyProcessor",)
    processor_class = "InternVLProcessor"
    end_of_turn = "<|im_end|>"

    def prepare_config(self, config, raw):
        # The -hf checkpoints store lm_head.weight apart from the embeddings; a config.json that
        # does not say so would get tied weights in 5.x, silently dropping the stored head.
        if "tie_word_embeddings" not in raw and "tie_word_embeddings" not in raw.get("text_config", {}):
            config.tie_word_embeddings = False
            config.get_text_config().tie_word_embeddings = False
        return config

    def build_processor(self, path):
        image_processor = transformers.GotOcr2ImageProcessorPil.from_pretrained(str(path))
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
        kwargs = _processor_config(path)
        return image_only_internvl_processor_class()(
            image_processor, tokenizer, image_seq_length=kwargs.get("image_seq_length", 256),
            chat_template=_read_chat_template(path, tokenizer))


class Gemma3Adapter(VLMAdapter):
    """Gemma-3: SigLIP tower (all blocks used, then post_layernorm), average-pool + projection,
    Gemma LM with tied lm_head; SentencePiece pieces without a prefix space."""

    family = "gemma3"
    model_types = ("gemma3",)
    processor_class_names = ("Gemma3Processor",)
    end_of_turn = "<end_of_turn>"
    template_adds_bos = True

    def encode(self, processor, texts, images):
        # token_type_ids mark image tokens (Gemma-3 attends bidirectionally within an image).
        return processor(text=texts, images=[[im] for im in images], padding=True, return_tensors="pt",
                         add_special_tokens=False, return_mm_token_type_ids=True)


ADAPTER_CLASSES = (QwenVLAdapter, LlavaAdapter, MllamaAdapter, InternVLAdapter, Gemma3Adapter)
ADAPTERS = {
    "qwen2_vl": QwenVLAdapter("qwen2_vl"),
    "qwen2_5_vl": QwenVLAdapter("qwen2_5_vl", processor_class="Qwen2_5_VLProcessor"),
    "llava": LlavaAdapter(),
    "mllama": MllamaAdapter(),
    "internvl": InternVLAdapter(),
    "gemma3": Gemma3Adapter(),
}


def adapter_for(model_or_config):
    """The adapter for a model (or its config), by `model_type`."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"model type {model_type!r} has no adapter yet; supported: {sorted(ADAPTERS)}. "
            "Add a VLMAdapter subclass to models.py (where the vision blocks, projector and LM layers live)."
        )
    return ADAPTERS[model_type]


def adapter_for_processor(processor):
    """The adapter whose `build_processor` makes this processor's class (for callers that hold only
    a processor, e.g. the collator given the legacy end-of-turn string)."""
    names = {c.__name__ for c in type(processor).__mro__}
    for adapter in ADAPTERS.values():
        if names & set(adapter.processor_class_names):
            return adapter
    raise ValueError(f"no adapter for processor {type(processor).__name__}; pass the adapter explicitly")


# ---------------------------------------------------------------------------------------------
# Processors
# ---------------------------------------------------------------------------------------------

# The image-only processor classes live in processors.py (tiny_models builds with them too).
image_only_qwen_processor_class = processors.image_only_qwen_processor_class
image_only_internvl_processor_class = processors.image_only_internvl_processor_class
_image_only_qwen_processor_class = image_only_qwen_processor_class  # former name (bench scripts)


def _processor_config(path):
    file = Path(path) / "processor_config.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def _read_chat_template(path, tokenizer):
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    for name in ("chat_template.jinja", "chat_template.json"):
        file = Path(path) / name
        if file.is_file():
            text = file.read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None


def _build_qwen_processor(path):
    image_processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(str(path))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    chat_template = _read_chat_template(path, tokenizer)
    if chat_template is None and os.path.isdir(path):
        raise ValueError(f"{path}: no chat template found (tokenizer_config.json or chat_template.json)")
    if chat_template is None:  # hub id: the template lives in a separate file on the hub
        file = hf_hub_download(str(path), "chat_template.json")
        chat_template = json.loads(Path(file).read_text())["chat_template"]
    return image_only_qwen_processor_class()(image_processor, tokenizer, chat_template=chat_template)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

class ModelUnavailableError(RuntimeError):
    pass


def ensure_tiny_model(cache_dir=None, alias="tiny"):
    """The folder of a tiny model (built once; see tiny_models.py)."""
    return tiny_models.ensure_tiny(alias, cache_dir)


def build_tiny_model(out_dir, alias="tiny"):
    return tiny_models.build_tiny(alias, out_dir)


LORA_CONFIG = "adapter_config.json"
LORA_WEIGHTS = "adapter_model.safetensors"


def is_lora_folder(path):
    return os.path.isdir(path) and (Path(path) / LORA_CONFIG).is_file()


def save_lora_adapter(model, out_dir, base_model):
    """Write only the LoRA adapter (peft's adapter_config.json + adapter_model.safetensors, with
    `base_model`, an alias, hub id or folder, as base_model_name_or_path) plus every other trainable
    tensor of the selection (biases, norms), so `load_model_and_processor(out_dir)` rebuilds the
    trained model from base + adapter."""
    from peft import get_peft_model_state_dict  # optional: LoRA runs only

    config = model.peft_config["default"]
    config.base_model_name_or_path = str(base_model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    # No embedding layers are adapted; saying so keeps peft from looking the base up on the hub.
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    # Non-LoRA tensors the selection trained directly, stored under their model names.
    extra = {n: p for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n}
    tensors = {k: v.detach().cpu().contiguous() for k, v in {**state, **extra}.items()}
    save_file(tensors, str(out_dir / LORA_WEIGHTS), metadata={"format": "pt", "extra": json.dumps(sorted(extra))})
    return out_dir


def _apply_lora(path, model, device):
    """The LoRA adapter of folder `path` (and the other tensors it trained) on its base `model`."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict  # optional: LoRA runs only

    config = LoraConfig.from_pretrained(str(path))
    base = config.base_model_name_or_path
    inject_adapter_in_model(config, model)
    model.peft_config = {"default": config}
    model.save_pretrained = lambda save_directory, **kwargs: save_lora_adapter(model, save_directory, base)
    tensors = load_file(str(Path(path) / LORA_WEIGHTS), device=str(device))
    with safe_open(str(Path(path) / LORA_WEIGHTS), "pt") as f:
        extra = set(json.loads((f.metadata() or {}).get("extra", "[]")))
    result = set_peft_model_state_dict(model, {k: v for k, v in tensors.items() if k not in extra})
    missing = [k for k in getattr(result, "unexpected_keys", []) if ".lora_" in k]
    if missing:
        raise ValueError(f"{path}: adapter tensors that match no module of {base}: {missing[:3]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in extra:
            if name not in params:
                raise ValueError(f"{path}: tensor {name} is not a parameter of {base}")
            params[name].copy_(tensors[name])
    return model.eval()


def inject_lora_from_tensors(model, names, shapes, alpha=None, dropout=0.0):
    """Re-create on a base model the LoRA modules that saved tensor names point to (a slim
    checkpoint stores "...fc1.lora_A.default.weight" etc.): targets from the names, the rank from
    lora_A's shape, alpha/dropout as the run had them (alpha None = 2 * rank)."""
    from peft import LoraConfig, inject_adapter_in_model

    suffix = ".lora_A.default.weight"
    targets = sorted(n[: -len(suffix)] for n in names if n.endswith(suffix))
    if not targets:
        raise ValueError("no LoRA tensors (*.lora_A.default.weight) among the saved names")
    rank = int(shapes[targets[0] + suffix][0])
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=dropout,
                        target_modules=targets, bias="none")
    inject_adapter_in_model(config, model)
    model.peft_config = {"default": config}
    return model


def merge_lora(model):
    """Fold every LoRA pair into its base Linear and put the plain Linear back, so the model's
    parameter names and save_pretrained output are those of a full checkpoint (`--merge_lora`)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    model.__dict__.pop("save_pretrained", None)  # a full checkpoint again (see param_selectors._inject_lora)
    return model


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _short(err, limit=160):
    """The first line of an exception's message, cut to `limit` characters."""
    line = (str(err).splitlines() or [type(err).__name__])[0]
    return line if len(line) <= limit else line[:limit - 3] + "..."


def check_safetensors_complete(path):
    """Raise ModelUnavailableError unless a .safetensors file is as long as its own header says:
    a copy interrupted mid-way is caught here from 8 bytes and the header, without reading the
    tensors."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little") if size >= 8 else None
            if header_len is None or header_len > size - 8:
                raise ValueError("no complete header")
            header = json.loads(f.read(header_len))
        end = max((int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"),
                  default=0)
    except (ValueError, KeyError, TypeError, IndexError):
        raise ModelUnavailableError(f"{path}: not a complete safetensors file ({size} bytes; a copy that "
                                    "was interrupted?)") from None
    expected = 8 + header_len + end
    if size != expected:
        raise ModelUnavailableError(f"{path}: {size} of {expected} bytes (truncated: a copy that was interrupted?)")


def check_weight_files(folder):
    """Raise ModelUnavailableError naming the folder or file unless a model folder holds complete
    weights: a single file, or an index whose every shard is there."""
    folder = Path(folder)
    present = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not present:
        raise ModelUnavailableError(f"{folder}: no weights (expected {' or '.join(WEIGHT_FILES[:2])}); "
                                    "a copy that has not finished?")
    name = present[0]
    if name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads((folder / name).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as err:
            raise ModelUnavailableError(f"{folder / name}: unreadable weight index ({_short(err, 80)})") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ModelUnavailableError(f"{folder}: {len(missing)} of {len(shards)} weight shards missing "
                                        f"(first: {missing[0]})")
        files = [folder / s for s in shards]
    else:
        files = [folder / name]
    for file in files:
        if file.suffix == ".safetensors":
            check_safetensors_complete(file)


def _looks_like_a_path(name):
    """A name that can only mean a local folder: absolute, relative with ./ or ../, ~, or more
    than one '/' (a hub id is `org/name`)."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.path.exists(name)


class ModelSource(NamedTuple):
    """A model name checked from its files (`model_source`): what from_pretrained reads, its config
    and family adapter, and for a LoRA folder the folder itself (`path` is then its base's)."""
    path: str
    config: object
    adapter: "VLMAdapter"
    lora_dir: str | None = None


def model_source(name):
    """The ModelSource of a model name, from the config alone: nothing here reads weights, so every
    problem a user can cause (an unknown name, a path that does not exist, a folder without
    weights or with a half-written model.safetensors, a model that is not a VLM) is found before
    a model load, as a ModelUnavailableError whose message starts with `name`. A LoRA folder
    reports its base, with `lora_dir` set."""
    if is_lora_folder(name):
        try:
            base = json.loads((Path(name) / LORA_CONFIG).read_text()).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError) as err:
            raise ModelUnavailableError(f"{name}/{LORA_CONFIG}: unreadable ({_short(err, 80)})") from None
        if not base:
            raise ModelUnavailableError(f"{name}/{LORA_CONFIG} names no base_model_name_or_path")
        if not (Path(name) / LORA_WEIGHTS).is_file():
            raise ModelUnavailableError(f"{name}: no {LORA_WEIGHTS} beside {LORA_CONFIG}")
        check_safetensors_complete(Path(name) / LORA_WEIGHTS)
        return model_source(base)._replace(lora_dir=str(name))
    path = resolve_model_name(name)
    if path in tiny_models.TINY_ALIASES:
        try:
            path = str(ensure_tiny_model(alias=path))
        except ValueError as err:  # a damaged shipped folder
            raise ModelUnavailableError(str(err)) from None
    elif os.path.isdir(path):
        if not (Path(path) / "config.json").is_file():
            raise ModelUnavailableError(f"{name}: a folder without config.json, so not a model folder")
        check_weight_files(path)
    elif _looks_like_a_path(path):
        what = "a file, not a model folder" if os.path.exists(path) else "no such folder"
        raise ModelUnavailableError(f"{name}: {what} (nor an alias: --list_models shows them)")
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        offline = " in the local cache (HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        if os.path.isdir(path):
            raise ModelUnavailableError(f"{name}: unreadable config.json ({_short(err, 120)})") from None
        if name in MODEL_ALIASES:
            where = " is not in the local cache (HF_HUB_OFFLINE=1)" if offline else f" cannot be had ({_short(err, 100)})"
            raise ModelUnavailableError(f"{name}: {path}{where}; tiny is a model that needs no download") from None
        raise ModelUnavailableError(
            f"{name}: not an alias, a local folder or a hub id{offline or ' that can be had'}; --list_models shows "
            "the aliases, and tiny is a model that needs no download") from None
    try:
        adapter = adapter_for(config)
    except ValueError:
        raise ModelUnavailableError(
            f"{name}: model type {getattr(config, 'model_type', None)!r} is not a vision-language model of a "
            f"supported family ({', '.join(sorted(ADAPTERS))})") from None
    return ModelSource(path, config, adapter)


def list_models():
    """The aliases, one line each with what they stand for (`--list_models`)."""
    width = max(map(len, MODEL_ALIASES))
    return "\n".join(f"{alias:<{width}}  {target if target != alias else 'built in (offline)'}"
                     for alias, target in sorted(MODEL_ALIASES.items()))


class ListModelsAction(argparse.Action):
    """`--list_models`: print the aliases and exit, whatever else the command line holds."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="list the model aliases and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(list_models())
        parser.exit()


def load_model_and_processor(name, dtype=torch.float32, device="cpu", source=None):
    """Load any supported VLM (alias, hub id, local folder, or a tiny alias) and its processor; a
    folder with adapter_config.json loads its base model plus the LoRA adapter.

    Returns (model, processor, adapter). The model is in eval mode on `device`. Everything that can
    be checked without the weights is checked first (`model_source`), once: a caller that already
    checked `name` passes what model_source returned as `source`."""
    path, config, adapter, lora_dir = source or model_source(name)
    raw, _ = type(config).get_config_dict(path)
    config = adapter.prepare_config(config, raw)
    try:
        model = transformers.AutoModelForImageTextToText.from_pretrained(path, config=config, dtype=dtype)
    except (OSError, SafetensorError) as err:  # damaged in a way the size check cannot see
        raise ModelUnavailableError(f"{name}: weights unreadable ({_short(err)})") from None
    model.to(device).eval()
    if lora_dir:
        model = _apply_lora(lora_dir, model, device)
    processor = adapter.build_processor(path)
    processor.tokenizer.padding_side = adapter.padding_side
    return model, processor, adapter


# ---------------------------------------------------------------------------------------------
# Full-size architectures (meta device, no weights)
# ---------------------------------------------------------------------------------------------

_QWEN2_VISION = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, patch_size=14,
                     spatial_merge_size=2, temporal_patch_size=2)
_QWEN25_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[7, 15, 23, 31])
_CLIP_L_336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                   num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
_MLLAMA_VISION = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_global_layers=8,
                      attention_heads=16, image_size=560, patch_size=14, max_num_tiles=4, vision_output_dim=7680,
                      intermediate_layers_indices=[3, 7, 15, 23, 30],
                      supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]])
_MLLAMA_TEXT = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=40,
                    num_attention_heads=32, num_key_value_heads=8, cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
                    pad_token_id=128004, bos_token_id=128000, eos_token_id=128009)
_INTERNVIT_300M = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=[448, 448], patch_size=[14, 14])
_SIGLIP_400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=896, patch_size=14, vision_use_head=False)


def _qwen2_text(hidden, inter, layers, heads, kv, vocab):
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})


def _llama2_text(hidden, inter, layers, heads):
    return dict(model_type="llama", vocab_size=32064, hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                pad_token_id=32001, tie_word_embeddings=False)


def _internvl_text(hidden, inter, layers, heads, kv):
    return dict(model_type="qwen2", vocab_size=151674, hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=False)


def _gemma3_text(hidden, inter, layers, heads, kv):
    return dict(vocab_size=262208, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, head_dim=256, sliding_window=1024)


# alias -> config kwargs of the published architecture (class in FULL_SIZE_CONFIG_CLASSES).
def _internvl_config(hidden, intermediate, layers, heads, kv_heads):
    """InternVL3-hf: the same InternViT-300M and projector settings at every LM size."""
    return dict(vision_config=_INTERNVIT_300M, text_config=_internvl_text(hidden, intermediate, layers, heads, kv_heads),
                image_token_id=151667, downsample_ratio=0.5, vision_feature_layer=-1, tie_word_embeddings=False)


FULL_SIZE_CONFIGS = {
    "qwen2-2b": dict(
        vision_config=dict(_QWEN2_VISION, hidden_size=1536),
        text_config=_qwen2_text(1536, 8960, 28, 12, 2, 151936), tie_word_embeddings=True),
    "qwen2-7b": dict(
        vision_config=dict(_QWEN2_VISION, hidden_size=3584),
        text_config=_qwen2_text(3584, 18944, 28, 28, 4, 152064), tie_word_embeddings=False),
    "qwen-3b": dict(
        vision_config=dict(_QWEN25_VISION, out_hidden_size=2048),
        text_config=_qwen2_text(2048, 11008, 36, 16, 2, 151936), tie_word_embeddings=True),
    "qwen-7b": dict(
        vision_config=dict(_QWEN25_VISION, out_hidden_size=3584),
        text_config=_qwen2_text(3584, 18944, 28, 28, 4, 152064), tie_word_embeddings=False),
    "llava-7b": dict(
        vision_config=_CLIP_L_336, text_config=_llama2_text(4096, 11008, 32, 32), image_token_id=32000,
        vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False),
    "llava-13b": dict(
        vision_config=_CLIP_L_336, text_config=_llama2_text(5120, 13824, 40, 40), image_token_id=32000,
        vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False),
    "llama-11b": dict(
        vision_config=_MLLAMA_VISION, text_config=_MLLAMA_TEXT, image_token_id=128256, tie_word_embeddings=False),
    "internvl-1b": _internvl_config(896, 4864, 24, 14, 2),
    "internvl-2b": _internvl_config(1536, 8960, 28, 12, 2),
    "internvl-8b": _internvl_config(3584, 18944, 28, 28, 4),
    "internvl-14b": _internvl_config(5120, 13824, 48, 40, 8),
    "gemma-4b": dict(
        vision_config=_SIGLIP_400M, text_config=_gemma3_text(2560, 10240, 34, 8, 4), mm_tokens_per_image=256,
        tie_word_embeddings=True),
    "gemma-12b": dict(
        vision_config=_SIGLIP_400M, text_config=_gemma3_text(3840, 15360, 48, 16, 8), mm_tokens_per_image=256,
        tie_word_embeddings=True),
}
FULL_SIZE_CONFIGS["llava-cot"] = FULL_SIZE_CONFIGS["llama-11b"]  # same architecture, other weights
FULL_SIZE_CONFIG_CLASSES = {
    "qwen2-2b": "Qwen2VLConfig",
    "qwen2-7b": "Qwen2VLConfig",
    "qwen-3b": "Qwen2_5_VLConfig",
    "qwen-7b": "Qwen2_5_VLConfig",
    "llava-7b": "LlavaConfig",
    "llava-13b": "LlavaConfig",
    "llama-11b": "MllamaConfig",
    "internvl-1b": "InternVLConfig",
    "internvl-2b": "InternVLConfig",
    "internvl-8b": "InternVLConfig",
    "internvl-14b": "InternVLConfig",
    "gemma-4b": "Gemma3Config",
    "gemma-12b": "Gemma3Config",
}
FULL_SIZE_CONFIG_CLASSES["llava-cot"] = "MllamaConfig"


def full_size_config(alias):
    if alias not in FULL_SIZE_CONFIGS:
        raise ValueError(f"no full-size config for {alias!r}; known: {', '.join(sorted(FULL_SIZE_CONFIGS))}")
    return getattr(transformers, FULL_SIZE_CONFIG_CLASSES[alias])(**FULL_SIZE_CONFIGS[alias])


def full_size_model(alias="qwen2-2b", device="meta"):
    """The real architecture with no weights (meta device): for selection checks and shapes."""
    config = full_size_config(alias)
    with torch.device(device):
        return transformers.AutoModelForImageTextToText.from_config(config)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
