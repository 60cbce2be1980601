"""Model loading, the alias registry, the per-family adapter and the built-in tiny model.

Everything that differs between VLM families lives in one small adapter object here, so the
training loop, the parameter selectors and the spatial loss never branch on a model's name.

The built-in `tiny` model is a real `Qwen2VLForConditionalGeneration` with random weights from a
fixed seed and an offline byte-level BPE tokenizer. It is built once into a cache folder and then
loaded through the very same `from_pretrained` path as a real checkpoint.
"""
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent

# Short names used by the run scripts; any hub id or local folder works as well.
MODEL_ALIASES = {
    "tiny": "tiny",
    "qwen2-2b": "Qwen/Qwen2-VL-2B-Instruct",
    "qwen2-7b": "Qwen/Qwen2-VL-7B-Instruct",
    "qwen2.5-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
}

# Bump when anything about the tiny model changes, so stale caches are never reused.
TINY_VERSION = "v1"
TINY_SEED = 0


def resolve_model_name(name):
    """Alias -> hub id; anything else (hub id, local folder) passes through unchanged."""
    return MODEL_ALIASES.get(name, name)


# ---------------------------------------------------------------------------------------------
# Per-family adapter
# ---------------------------------------------------------------------------------------------

def _first_attr(root, paths):
    """The first dotted attribute path that exists under `root` (handles 4.x vs 5.x layouts)."""
    for path in paths:
        obj = root
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise AttributeError(f"{type(root).__name__} has none of {paths}")


@dataclass(frozen=True)
class QwenVLAdapter:
    """Qwen2-VL and Qwen2.5-VL: `visual.blocks[i]` with `.mlp`, `.attn`, `.norm1/.norm2`,
    `visual.merger` as projector, `language_model.layers` as LM blocks."""

    family: str = "qwen2_vl"
    processor_class: str = "Qwen2VLProcessor"  # the standard class a saved processor names
    end_of_turn: str = "<|im_end|>"
    # Generation with a batch needs left padding; training works with either side.
    padding_side: str = "left"

    def vision_tower(self, model):
        return _first_attr(model, ["model.visual", "visual"])

    def vision_blocks(self, model):
        """The ordered vision blocks whose output reaches the language model (all of them here)."""
        return list(self.vision_tower(model).blocks)

    def block_parts(self, block):
        """MLP, attention and norm modules of one transformer block (vision or LM)."""
        attn = block.attn if hasattr(block, "attn") else block.self_attn
        if hasattr(block, "norm1"):
            norms = [block.norm1, block.norm2]
        else:
            norms = [block.input_layernorm, block.post_attention_layernorm]
        return {"mlp": block.mlp, "attn": attn, "norms": norms}

    def projector(self, model):
        return self.vision_tower(model).merger

    def lm_layers(self, model):
        return list(_first_attr(model, ["model.language_model.layers", "model.layers"]))

    def lm_final_norm(self, model):
        """The norm after the last LM layer (its output is `hidden_states[num_layers]`)."""
        return _first_attr(model, ["model.language_model.norm", "model.norm"])

    def lm_embeddings(self, model):
        return model.get_input_embeddings()

    def lm_head(self, model):
        return model.lm_head

    def lm_hidden_size(self, model):
        cfg = model.config
        return getattr(cfg, "text_config", cfg).hidden_size

    def build_processor(self, path):
        return _build_qwen_processor(path)

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


ADAPTERS = {
    "qwen2_vl": QwenVLAdapter(family="qwen2_vl"),
    "qwen2_5_vl": QwenVLAdapter(family="qwen2_5_vl", processor_class="Qwen2_5_VLProcessor"),
}


def adapter_for(model_or_config):
    """The adapter for a model (or its config), by `model_type`."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"model type {model_type!r} has no adapter yet; supported: {sorted(ADAPTERS)}. "
            "Add one to models.ADAPTERS (where the vision blocks, projector and LM layers live)."
        )
    return ADAPTERS[model_type]


# ---------------------------------------------------------------------------------------------
# Processors
# ---------------------------------------------------------------------------------------------

def _image_only_qwen_processor_class():
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
        """Qwen2VLProcessor without the video processor: the stock class insists on one, and the
        video processor needs torchvision, which many CPU environments lack."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return Qwen2VLImageOnlyProcessor


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
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    chat_template = _read_chat_template(path, tokenizer)
    if chat_template is None and os.path.isdir(path):
        raise ValueError(f"{path}: no chat template found (tokenizer_config.json or chat_template.json)")
    if chat_template is None:  # hub id: the template lives in a separate file on the hub
        from huggingface_hub import hf_hub_download

        file = hf_hub_download(str(path), "chat_template.json")
        chat_template = json.loads(Path(file).read_text())["chat_template"]
    processor = _image_only_qwen_processor_class()(image_processor, tokenizer, chat_template=chat_template)
    return processor


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

class ModelUnavailableError(RuntimeError):
    pass


def load_model_and_processor(name, dtype=torch.float32, device="cpu"):
    """Load any supported VLM (alias, hub id, local folder, or `tiny`) and its processor.

    Returns (model, processor, adapter). The model is in eval mode on `device`."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    path = resolve_model_name(name)
    if path == "tiny":
        path = str(ensure_tiny_model())
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelUnavailableError(
            f"cannot load model {name!r} (looked for {path!r}"
            + (", HF_HUB_OFFLINE=1" if offline else "")
            + f"): {str(err).splitlines()[0]}\n"
            "Known aliases: " + ", ".join(sorted(MODEL_ALIASES)) + ". Without a GPU or hub access, "
            "use the built-in offline model: --model_name tiny (train.py) or --ckpt tiny (eval_coco.py)"
        ) from err
    adapter = adapter_for(config)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    model.to(device).eval()
    processor = adapter.build_processor(path)
    processor.tokenizer.padding_side = adapter.padding_side
    return model, processor, adapter


# ---------------------------------------------------------------------------------------------
# The built-in tiny model
# ---------------------------------------------------------------------------------------------

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]

# Same conversation format as Qwen2-VL-Instruct (system prompt, image placeholder, turns).
QWEN2VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenizer split: letters, digits and punctuation never merge across a boundary,
# so an object's name ends on a token boundary when punctuation follows it.
_QWEN_PRETOKENIZE = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

TINY_VISION = dict(depth=8, embed_dim=32, num_heads=2, mlp_ratio=4, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=12, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6)
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 112 * 112


def tiny_cache_dir():
    """Where the tiny model lives: $SPATIAL_FT_CACHE or `.cache/` in the repo."""
    root = Path(os.environ.get("SPATIAL_FT_CACHE", REPO_ROOT / ".cache"))
    return root / f"tiny-qwen2vl-{TINY_VERSION}"


def _tokenizer_corpus():
    from data import ANSWER_WORDS, BUILTIN_OBJECT_NAMES, COCO_OBJECT_NAMES, QUESTION_TEMPLATES

    names = list(BUILTIN_OBJECT_NAMES) + list(COCO_OBJECT_NAMES)
    lines = ["You are a helpful assistant.", "system", "user", "assistant"]
    for template in QUESTION_TEMPLATES.values():
        for i, a in enumerate(names):
            b = names[(i * 7 + 3) % len(names)]
            lines.append(template.format(obj1=a, obj2=b))
    for word in ANSWER_WORDS:
        lines += [word, word.capitalize(), f"{word}.", f"It is {word}."]
    lines += [" ".join(names), "a an the photo of to is or only with Answer"]
    lines += [f"{i}" for i in range(10)]
    return lines


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer trained offline on the question templates and object names."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_PRETOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, min_frequency=1, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, padding_side="left",
    )
    tokenizer.chat_template = QWEN2VL_CHAT_TEMPLATE
    return tokenizer


def tiny_config(tokenizer):
    from transformers import Qwen2VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = TINY_TEXT["hidden_size"] // TINY_TEXT["num_attention_heads"]
    # M-RoPE splits each head's rotary half into (time, height, width) sections.
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    text = dict(TINY_TEXT, vocab_size=len(tokenizer), bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope})
    vision = dict(TINY_VISION, hidden_size=TINY_TEXT["hidden_size"])
    return Qwen2VLConfig(
        text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_tiny_model(out_dir):
    """Build the tiny model, tokenizer and processor config into `out_dir` (deterministic)."""
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    out_dir = Path(out_dir)
    tokenizer = build_tiny_tokenizer()
    config = tiny_config(tokenizer)
    torch.manual_seed(TINY_SEED)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        do_sample=False, eos_token_id=config.text_config.eos_token_id,
        pad_token_id=config.text_config.pad_token_id,
    )
    model.save_pretrained(out_dir)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
    processor = _image_only_qwen_processor_class()(image_processor, tokenizer, chat_template=QWEN2VL_CHAT_TEMPLATE)
    processor.save_pretrained(out_dir)
    return out_dir


def ensure_tiny_model(cache_dir=None):
    """Build the tiny model once (atomically, so an interrupted build is never half-used)."""
    target = Path(cache_dir) if cache_dir else tiny_cache_dir()
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build_tiny_model(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# Architectures of real checkpoints, for meta-device checks and benchmarks without weights.
FULL_SIZE_CONFIGS = {
    "qwen2-2b": dict(
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        text_config=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         max_position_embeddings=32768, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [16, 24, 24]}),
        tie_word_embeddings=True,
    ),
}


def full_size_model(alias="qwen2-2b", device="meta"):
    """The real architecture with no weights (meta device): for selection checks and shapes."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(**FULL_SIZE_CONFIGS[alias])
    with torch.device(device):
        return Qwen2VLForConditionalGeneration(config)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
