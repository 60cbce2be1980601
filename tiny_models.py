"""Tiny random models, one per supported family, built offline and cached.

Each tiny model is a real `*ForConditionalGeneration` of its family with random weights from a
fixed seed, an offline tokenizer trained on the question templates and object names (in the
family's style: byte-level BPE like Qwen / Llama 3, or SentencePiece-like "▁" pieces like
Llama 2 / Gemma, BOS handling included), the family's chat format and image processor. It is
built once into a cache folder and then loaded through the same `from_pretrained` path as a real
checkpoint (`models.load_model_and_processor("tiny-llava")`).

Aliases: `tiny` (Qwen2-VL, the original built-in model), `tiny-qwen2.5`, `tiny-llava`,
`tiny-mllama`, `tiny-internvl`, `tiny-gemma3`; `tiny-realbpe`, the tiny Qwen2-VL with a
vocabulary that splits "behind" into "beh" + "ind" as Qwen2's does (for the scoring tests); and
`tiny-warm`, the tiny Qwen2-VL pretrained briefly on grid questions about its own objects, the
one model here that can show training teaching something. Its weights ship in `weights/tiny-warm-v1/` (checked against `SHA256SUMS`
there) and are never rebuilt on the fly: its recipe (`python tiny_warm.py`) is a training run,
and another CPU's float arithmetic trains another model from the same seed.
"""
import argparse
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import tokenizers
import torch
import transformers

import processors
from data import ANSWER_WORDS, BUILTIN_OBJECT_NAMES, COCO_OBJECT_NAMES, QUESTION_TEMPLATES

REPO_ROOT = Path(__file__).resolve().parent
TINY_SEED = 0
# Bump a family's version when anything about its tiny model changes, so stale caches are never
# reused. `tiny` keeps its old folder name (tiny-qwen2vl-v1) so existing caches stay valid.
TINY_VERSIONS = {
    "tiny": "qwen2vl-v1", "tiny-qwen2.5": "qwen2.5vl-v1", "tiny-llava": "llava-v1",
    "tiny-mllama": "mllama-v2", "tiny-internvl": "internvl-v1", "tiny-gemma3": "gemma3-v2",
    "tiny-warm": "qwen2vl-warm-v1", "tiny-spatial": "qwen2vl-spatial-v1", "tiny-realbpe": "qwen2vl-realbpe-v1",
}
TINY_ALIASES = tuple(TINY_VERSIONS)

# Images of the grid tests are 112 px (4 cells of 28 px); the towers see 56 px inputs (4x4
# patches of 14 px), which keeps each forward pass at a few dozen image tokens.
TINY_IMAGE = 56
TINY_PATCH = 14
TINY_VISION_DEPTH = 8  # the last 6 blocks exist, and under LLaVA's feature layer -2 they differ
TINY_HIDDEN = 64

# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------

# Qwen2's pre-tokenizer split: letters, digits and punctuation never merge across a boundary,
# so an object's name ends on a token boundary when punctuation follows it.
_QWEN_PRETOKENIZE = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _tokenizer_corpus(extra=()):
    names = list(BUILTIN_OBJECT_NAMES) + list(COCO_OBJECT_NAMES)
    lines = ["You are a helpful assistant.", "system", "user", "assistant"] + list(extra)
    for template in QUESTION_TEMPLATES.values():
        for i, a in enumerate(names):
            b = names[(i * 7 + 3) % len(names)]
            lines.append(template.format(obj1=a, obj2=b))
    for word in ANSWER_WORDS:
        lines += [word, word.capitalize(), f"{word}.", f"It is {word}."]
    lines += [" ".join(names), "a an the photo of to is or only with Answer"]
    lines += [f"{i}" for i in range(10)]
    return lines


def train_tokenizer(style, special_tokens, *, eos, pad, bos=None, unk=None, add_bos=False,
                    chat_template=None, named_specials=None, corpus_extra=(), vocab_size=1024):
    """A BPE tokenizer trained offline on the repo's questions, in one of two styles:

    * "bytelevel": GPT-2/Qwen/Llama-3 style bytes with Qwen's split regex (" frog" -> "Ġfrog");
    * "metaspace_first" (Llama 2): spaces become "▁" and a "▁" is prepended to the text, so a
      fragment tokenized alone gets a prefix piece it does not have inside a sentence;
    * "metaspace_never" (Gemma): "▁" for spaces, nothing prepended.
    `add_bos` makes the tokenizer add BOS itself (Llama 2/3, Gemma), as the real ones do."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=unk))
    if style == "bytelevel":
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
            tokenizers.pre_tokenizers.Split(tokenizers.Regex(_QWEN_PRETOKENIZE), behavior="isolated"),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = tokenizers.decoders.ByteLevel()
        alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    elif style in ("metaspace_first", "metaspace_never"):
        scheme = style.split("_")[1]
        # Punctuation stays its own piece, as SentencePiece's script split keeps it.
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
            tokenizers.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=True),
            tokenizers.pre_tokenizers.Punctuation(behavior="isolated"),
        ])
        tok.decoder = tokenizers.decoders.Metaspace(replacement="▁", prepend_scheme=scheme, split=True)
        alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789▁.,?!:;'\"\n()-")
    else:
        raise ValueError(f"unknown tokenizer style {style!r}")
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1,
                                             special_tokens=list(special_tokens), initial_alphabet=alphabet,
                                             show_progress=False)
    tok.train_from_iterator(_tokenizer_corpus(corpus_extra), trainer=trainer)
    if add_bos:
        tok.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    kwargs = dict(tokenizer_object=tok, eos_token=eos, pad_token=pad, padding_side="left")
    if bos is not None:
        kwargs["bos_token"] = bos
    if unk is not None:
        kwargs["unk_token"] = unk
    if named_specials:
        kwargs["extra_special_tokens"] = dict(named_specials)
    tokenizer = transformers.PreTrainedTokenizerFast(**kwargs)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def _ids(tokenizer, tokens):
    return {t: tokenizer.convert_tokens_to_ids(t) for t in tokens}


def _generation_config(eos_id, pad_id, bos_id=None):
    return transformers.GenerationConfig(do_sample=False, eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=bos_id)


def _save(model, processor, out_dir, eos_id, pad_id, bos_id=None):
    model.generation_config = _generation_config(eos_id, pad_id, bos_id)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def _text(**overrides):
    """A small decoder config (Llama/Qwen-like)."""
    base = dict(hidden_size=TINY_HIDDEN, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6)
    base.update(overrides)
    return base


# ---------------------------------------------------------------------------------------------
# Qwen2-VL (`tiny`) and Qwen2.5-VL (`tiny-qwen2.5`)
# ---------------------------------------------------------------------------------------------

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]

def chatml_template(image_markup):
    """The ChatML conversation format of Qwen2-VL-Instruct and InternVL3 (system prompt, turns),
    with the family's markup where the image goes."""
    return (
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}"
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "{% endif %}"
        "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}" + image_markup +
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


QWEN2VL_CHAT_TEMPLATE = chatml_template("<|vision_start|><|image_pad|><|vision_end|>")

TINY_VISION = dict(depth=TINY_VISION_DEPTH, embed_dim=32, num_heads=2, mlp_ratio=4, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
TINY_TEXT = dict(hidden_size=TINY_HIDDEN, intermediate_size=128, num_hidden_layers=12, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6)
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 112 * 112


def build_qwen_tokenizer():
    """Byte-level BPE in Qwen2's style (no BOS), with Qwen2-VL's chat template."""
    return train_tokenizer("bytelevel", QWEN_SPECIAL_TOKENS, eos="<|im_end|>", pad="<|endoftext|>",
                           chat_template=QWEN2VL_CHAT_TEMPLATE)


# Merges a real Qwen2 vocabulary has where ours has none: "behind" is "beh" + "ind" there (ids
# 29898, 484), while "left" and "Left" are distinct single tokens in both. tiny-realbpe adds them so
# tests meet a multi-token option word as real models do.
REAL_STYLE_MERGES = (("be", "h"), ("Be", "h"), ("Ġbe", "h"), ("in", "d"))


def build_real_style_qwen_tokenizer():
    """build_qwen_tokenizer's vocabulary with REAL_STYLE_MERGES appended (new ids at the end)."""
    base = build_qwen_tokenizer()
    spec = json.loads(base.backend_tokenizer.to_str())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    next_id = 1 + max([*vocab.values(), *(t["id"] for t in spec["added_tokens"])])
    for a, b in REAL_STYLE_MERGES:
        if a + b not in vocab:
            vocab[a + b], next_id = next_id, next_id + 1
        merges.append([a, b])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_str(json.dumps(spec)), eos_token="<|im_end|>",
        pad_token="<|endoftext|>", padding_side="left")
    tokenizer.chat_template = QWEN2VL_CHAT_TEMPLATE
    return tokenizer


def _qwen_text_config(tokenizer, **overrides):
    ids = _ids(tokenizer, QWEN_SPECIAL_TOKENS)
    text = dict(TINY_TEXT, **overrides)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    # M-RoPE splits each head's rotary half into (time, height, width) sections.
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    return dict(text, vocab_size=len(tokenizer), bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope})


def _qwen_token_ids(tokenizer):
    ids = _ids(tokenizer, QWEN_SPECIAL_TOKENS)
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def tiny_qwen2vl_config(tokenizer):
    vision = dict(TINY_VISION, hidden_size=TINY_TEXT["hidden_size"])
    return transformers.Qwen2VLConfig(text_config=_qwen_text_config(tokenizer), vision_config=vision,
                                      tie_word_embeddings=False, **_qwen_token_ids(tokenizer))


def _qwen_processor(tokenizer):
    image_processor = transformers.Qwen2VLImageProcessorPil(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
    return processors.image_only_qwen_processor_class()(image_processor, tokenizer, chat_template=QWEN2VL_CHAT_TEMPLATE)


def build_tiny_qwen2vl(out_dir, tokenizer=None):
    tokenizer = tokenizer or build_qwen_tokenizer()
    config = tiny_qwen2vl_config(tokenizer)
    torch.manual_seed(TINY_SEED)
    model = transformers.Qwen2VLForConditionalGeneration(config).eval()
    _save(model, _qwen_processor(tokenizer), out_dir, config.text_config.eos_token_id,
          config.text_config.pad_token_id)


def build_tiny_qwen25vl(out_dir):
    """Qwen2.5-VL: gated (gate/up/down) vision MLPs and RMSNorms, window attention."""
    tokenizer = build_qwen_tokenizer()
    # Window attention needs window_size to be a multiple of patch * merge (112 px = 2x2 merged patches).
    vision = dict(depth=TINY_VISION_DEPTH, hidden_size=32, intermediate_size=96, num_heads=2,
                  out_hidden_size=TINY_HIDDEN, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=56, fullatt_block_indexes=[3, 7])
    config = transformers.Qwen2_5_VLConfig(text_config=_qwen_text_config(tokenizer, num_hidden_layers=4),
                                           vision_config=vision, tie_word_embeddings=False,
                                           **_qwen_token_ids(tokenizer))
    torch.manual_seed(TINY_SEED)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    _save(model, _qwen_processor(tokenizer), out_dir, config.text_config.eos_token_id,
          config.text_config.pad_token_id)


# ---------------------------------------------------------------------------------------------
# LLaVA-1.5 (CLIP tower, Llama-2 tokenizer, "USER: <image>\n... ASSISTANT:")
# ---------------------------------------------------------------------------------------------

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_tiny_llava(out_dir):
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tokenizer = train_tokenizer("metaspace_first", specials, eos="</s>", pad="<pad>", bos="<s>", unk="<unk>",
                                add_bos=True, chat_template=LLAVA_CHAT_TEMPLATE, corpus_extra=["USER:", "ASSISTANT:"])
    ids = _ids(tokenizer, specials)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=TINY_VISION_DEPTH, num_attention_heads=2, image_size=TINY_IMAGE,
                  patch_size=TINY_PATCH, projection_dim=32)
    text = dict(_text(), model_type="llama", vocab_size=len(tokenizer), bos_token_id=ids["<s>"],
                eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"], tie_word_embeddings=False)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=ids["<image>"],
                                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                                      tie_word_embeddings=False)
    torch.manual_seed(TINY_SEED)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    image_processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": TINY_IMAGE},
                                                         crop_size={"height": TINY_IMAGE, "width": TINY_IMAGE})
    processor = transformers.LlavaProcessor(image_processor, tokenizer, patch_size=TINY_PATCH,
                                            vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                            chat_template=LLAVA_CHAT_TEMPLATE)
    _save(model, processor, out_dir, ids["</s>"], ids["<pad>"], ids["<s>"])


# ---------------------------------------------------------------------------------------------
# Mllama / Llama-3.2-Vision (local + gated global encoder, cross-attention LM layers)
# ---------------------------------------------------------------------------------------------

MLLAMA_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|eot_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>", "<|image|>"]
MLLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|image|>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Two of five LM layers are cross-attention layers; 8 local + 2 global vision blocks, so that
# "last 6 listed" (local 2-7) and "last 6 used" (local 4-7, global 0-1) differ as on the 11B.
TINY_MLLAMA_CROSS_LAYERS = [1, 3]


def build_tiny_mllama(out_dir):
    tokenizer = train_tokenizer("bytelevel", MLLAMA_SPECIAL_TOKENS, eos="<|eot_id|>", pad="<|finetune_right_pad_id|>",
                                bos="<|begin_of_text|>", add_bos=True, chat_template=MLLAMA_CHAT_TEMPLATE)
    ids = _ids(tokenizer, MLLAMA_SPECIAL_TOKENS)
    indices = [1, 3, 5, 6]
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=TINY_VISION_DEPTH, num_global_layers=2,
                  attention_heads=2, intermediate_layers_indices=indices, image_size=TINY_IMAGE,
                  patch_size=TINY_PATCH, vision_output_dim=32 * (len(indices) + 1), max_num_tiles=1,
                  supported_aspect_ratios=[[1, 1]])
    text = dict(_text(num_hidden_layers=5), vocab_size=len(tokenizer), cross_attention_layers=TINY_MLLAMA_CROSS_LAYERS,
                bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|eot_id|>"],
                pad_token_id=ids["<|finetune_right_pad_id|>"], rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config = transformers.MllamaConfig(vision_config=vision, text_config=text, image_token_id=ids["<|image|>"],
                                       tie_word_embeddings=False)
    torch.manual_seed(TINY_SEED)
    model = transformers.MllamaForConditionalGeneration(config).eval()
    # Cross-attention gates start at 0 (tanh(0) = 0: no image signal reaches the LM, hence no
    # gradient into the vision tower); a trained checkpoint has them open, so open them here.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                p.fill_(1.0)
    image_processor = transformers.MllamaImageProcessorPil(size={"height": TINY_IMAGE, "width": TINY_IMAGE},
                                                           max_image_tiles=1)
    processor = transformers.MllamaProcessor(image_processor, tokenizer, chat_template=MLLAMA_CHAT_TEMPLATE)
    _save(model, processor, out_dir, ids["<|eot_id|>"], ids["<|finetune_right_pad_id|>"], ids["<|begin_of_text|>"])


# ---------------------------------------------------------------------------------------------
# InternVL3 -hf (InternViT with layer scale, pixel-shuffle projector, Qwen2.5 LM)
# ---------------------------------------------------------------------------------------------

INTERNVL_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
INTERNVL_CHAT_TEMPLATE = chatml_template("<IMG_CONTEXT>\n")


def build_tiny_internvl(out_dir):
    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tokenizer = train_tokenizer("bytelevel", INTERNVL_SPECIAL_TOKENS, eos="<|im_end|>", pad="<|endoftext|>",
                                named_specials=named, chat_template=INTERNVL_CHAT_TEMPLATE)
    ids = _ids(tokenizer, INTERNVL_SPECIAL_TOKENS)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=TINY_VISION_DEPTH, num_attention_heads=2,
                  image_size=[TINY_IMAGE, TINY_IMAGE], patch_size=[TINY_PATCH, TINY_PATCH])
    text = dict(_text(), model_type="qwen2", vocab_size=len(tokenizer), bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False)
    # The -hf checkpoints keep lm_head separate from the input embeddings; left unset, a 5.x
    # InternVLConfig ties them.
    config = transformers.InternVLConfig(vision_config=vision, text_config=text, image_token_id=ids["<IMG_CONTEXT>"],
                                         downsample_ratio=0.5, vision_feature_layer=-1, tie_word_embeddings=False)
    torch.manual_seed(TINY_SEED)
    model = transformers.InternVLForConditionalGeneration(config).eval()
    image_processor = transformers.GotOcr2ImageProcessorPil(size={"height": TINY_IMAGE, "width": TINY_IMAGE},
                                                            crop_to_patches=False)
    seq = (TINY_IMAGE // TINY_PATCH) ** 2 // 4  # pixel shuffle with ratio 0.5 merges 2x2 patches
    processor = processors.image_only_internvl_processor_class()(image_processor, tokenizer, image_seq_length=seq,
                                                                 chat_template=INTERNVL_CHAT_TEMPLATE)
    _save(model, processor, out_dir, ids["<|im_end|>"], ids["<|endoftext|>"])


# ---------------------------------------------------------------------------------------------
# Gemma-3 (SigLIP tower, Gemma tokenizer without a prefix space, tied head)
# ---------------------------------------------------------------------------------------------

GEMMA3_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                         "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<start_of_image>{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_tiny_gemma3(out_dir):
    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tokenizer = train_tokenizer("metaspace_never", GEMMA3_SPECIAL_TOKENS, eos="<eos>", pad="<pad>", bos="<bos>",
                                unk="<unk>", add_bos=True, named_specials=named, chat_template=GEMMA3_CHAT_TEMPLATE,
                                corpus_extra=["model"])
    ids = _ids(tokenizer, GEMMA3_SPECIAL_TOKENS)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=TINY_VISION_DEPTH, num_attention_heads=2,
                  image_size=TINY_IMAGE, patch_size=TINY_PATCH, vision_use_head=False)
    text = dict(_text(num_key_value_heads=1, head_dim=16, sliding_window=64), vocab_size=len(tokenizer),
                bos_token_id=ids["<bos>"], eos_token_id=ids["<end_of_turn>"], pad_token_id=ids["<pad>"])
    mm_tokens = 4  # 4x4 patches average-pooled to 2x2
    config = transformers.Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=mm_tokens,
                                       image_token_id=ids["<image_soft_token>"], boi_token_id=ids["<start_of_image>"],
                                       eoi_token_id=ids["<end_of_image>"], tie_word_embeddings=True)
    torch.manual_seed(TINY_SEED)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    # HF initialises Gemma-3's projection matrix to zeros (a real checkpoint overwrites it), which
    # would leave the tiny model blind: no image would reach its LM.
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, config.text_config.initializer_range)
    image_processor = transformers.Gemma3ImageProcessorPil(size={"height": TINY_IMAGE, "width": TINY_IMAGE})
    processor = transformers.Gemma3Processor(image_processor, tokenizer, chat_template=GEMMA3_CHAT_TEMPLATE,
                                             image_seq_length=mm_tokens)
    _save(model, processor, out_dir, ids["<end_of_turn>"], ids["<pad>"], ids["<bos>"])


BUILDERS = {
    "tiny": build_tiny_qwen2vl,
    "tiny-qwen2.5": build_tiny_qwen25vl,
    "tiny-llava": build_tiny_llava,
    "tiny-mllama": build_tiny_mllama,
    "tiny-internvl": build_tiny_internvl,
    "tiny-gemma3": build_tiny_gemma3,
    # tiny Qwen2-VL whose vocabulary splits "behind" as Qwen2's does (scoring tests)
    "tiny-realbpe": lambda out_dir: build_tiny_qwen2vl(out_dir, build_real_style_qwen_tokenizer()),
}
# Models whose weights ship with the repository instead of being built here (see the docstring).
SHIPPED = {"tiny-warm": REPO_ROOT / "weights" / "tiny-warm-v1",
           "tiny-spatial": REPO_ROOT / "weights" / "tiny-spatial-v1"}
MANIFEST = "SHA256SUMS"


def cache_root():
    """Where tiny models live: $SPATIAL_FT_CACHE or `.cache/` in the repo."""
    return Path(os.environ.get("SPATIAL_FT_CACHE", REPO_ROOT / ".cache"))


def tiny_cache_dir(alias="tiny"):
    return cache_root() / f"tiny-{TINY_VERSIONS[alias]}"


def tiny_model_dir(alias="tiny"):
    """Where a tiny model's files are: the shipped folder, or the build cache."""
    return SHIPPED.get(alias) or tiny_cache_dir(alias)


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_manifest(folder):
    """`SHA256SUMS` of every file in `folder` (sha256sum's format), so a damaged copy is caught."""
    folder = Path(folder)
    lines = [f"{_sha256(p)}  {p.name}\n" for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST]
    (folder / MANIFEST).write_text("".join(lines))


def rebuild_shipped(alias, build, description, argv=None):
    """The command line of a shipped model's recipe: `--out` (default: its shipped folder) and
    `--overwrite`. `build(folder)` writes the model into a temporary folder beside `--out`, which
    is then renamed into place, so a killed build leaves `--out` as it was. Returns (folder, what
    `build` returned)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(SHIPPED[alias]), help=f"folder to write (default: {SHIPPED[alias]})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        parser.error(f"argument --out: {out} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        record = build(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, record


def verify_shipped(alias):
    """The shipped folder of `alias`, after checking every file against its SHA256SUMS; raises
    ValueError naming the first file that is missing or differs."""
    folder = SHIPPED[alias]
    manifest = folder / MANIFEST
    shown = os.path.relpath(folder, REPO_ROOT)
    if not manifest.is_file():
        raise ValueError(f"{manifest}: missing; {alias}'s weights ship with the repository "
                         f"(git checkout -- {shown}, or rebuild: python {alias.replace('-', '_')}.py --overwrite)")
    for line in manifest.read_text().splitlines():
        digest, name = line.split(None, 1)
        path = folder / name.strip()
        if not path.is_file() or _sha256(path) != digest:
            raise ValueError(f"{path}: {'missing' if not path.is_file() else 'does not match ' + MANIFEST}; "
                             f"git checkout -- {shown} restores {alias}'s shipped weights")
    return folder


def build_tiny(alias, out_dir):
    """Build a tiny model, tokenizer and processor config into `out_dir` (deterministic)."""
    if alias in SHIPPED:
        recipe = alias.replace("-", "_") + ".py"
        raise ValueError(f"{alias} ships in {SHIPPED[alias]}; its recipe rebuilds it: python {recipe} --out DIR")
    if alias not in BUILDERS:
        raise ValueError(f"unknown tiny model {alias!r}; known: {', '.join(TINY_ALIASES)}")
    out_dir = Path(out_dir)
    BUILDERS[alias](out_dir)
    return out_dir


def ensure_tiny(alias="tiny", cache_dir=None):
    """The folder of a tiny model: the shipped one (checked), or built once into the cache
    (atomically, so an interrupted build is never half-used)."""
    if alias in SHIPPED and cache_dir is None:
        return verify_shipped(alias)
    target = Path(cache_dir) if cache_dir else tiny_cache_dir(alias)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build_tiny(alias, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
