"""Processor classes without the video processor, shared by the tiny models (tiny_models.py) and
the loader of real checkpoints (models.py).

The stock Qwen2-VL and InternVL processors insist on a video processor, which needs torchvision,
which many CPU environments lack. Each class is made on first use: building it imports the
family's processing module from transformers, which takes seconds, and most scripts never need
both families."""
import functools
import re

import transformers


@functools.cache
def image_only_qwen_processor_class():
    class Qwen2VLImageOnlyProcessor(transformers.Qwen2VLProcessor):
        """Qwen2VLProcessor without the video processor."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            transformers.ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return Qwen2VLImageOnlyProcessor


@functools.cache
def image_only_internvl_processor_class():
    class InternVLImageOnlyProcessor(transformers.InternVLProcessor):
        """InternVLProcessor without the video processor."""

        def __init__(self, image_processor=None, tokenizer=None, image_seq_length=256, chat_template=None, **kwargs):
            transformers.ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
            self.image_seq_length = image_seq_length
            self.start_image_token = tokenizer.start_image_token
            self.end_image_token = tokenizer.end_image_token
            self.start_image_token_id = tokenizer.start_image_token_id
            self.end_image_token_id = tokenizer.end_image_token_id
            self.image_token = tokenizer.context_image_token
            self.video_token = tokenizer.video_token
            self.image_token_id = tokenizer.context_image_token_id
            self.multimodal_pattern = re.compile(
                f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})")

    return InternVLImageOnlyProcessor
