"""Tiny random SigLIP and SigLIP 2 models (no downloads), with a tokenizer and an image transform, as the
SigLIP tests, the SigLIP pipeline runs and the distributed SigLIP scenarios use them."""

from __future__ import annotations

import math

import torch
from transformers import (
    Siglip2Config,
    Siglip2TextConfig,
    Siglip2VisionConfig,
    SiglipConfig,
    SiglipTextConfig,
    SiglipVisionConfig,
)

from clipmoe.data.processing import SIGLIP_MEAN, SIGLIP_STD, ImageTransform, TextTokenizer, build_word_tokenizer
from clipmoe.model.modeling_siglip import Siglip2MoeModel, SiglipMoeModel

WORDS = "a photo of red green blue cube sphere cone small large left right on the".split()


def make_tiny_siglip(
    version: int = 1,
    seed: int = 0,
    words: list[str] = WORDS,
    width: int = 32,
    layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    context: int = 16,
    text_mask: bool | None = None,
):
    """A random tiny SigLIP (``version=1``, ``SiglipModel``) or SigLIP 2 (``version=2``, NaFlex ``Siglip2Model``).

    Its tokenizer pads to the full context. ``text_mask`` (default: False for SigLIP, True for SigLIP 2, as
    the real checkpoints' tokenizers) says whether the tokenizer returns an attention mask. The temperature
    and bias are the paper's initial values (t = 10, b = -10).
    """
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(words, context_length=context)
    if text_mask is None:
        text_mask = version == 2
    if not text_mask:  # as the original SigLIP checkpoints' tokenizer_config.json says
        tokenizer.model_input_names = ["input_ids"]
        tokenizer.init_kwargs["model_input_names"] = ["input_ids"]
    heads = max(1, width // 16)
    text_kw = dict(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=context,
        projection_size=width,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision_kw = dict(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        patch_size=patch_size,
    )
    if version == 1:
        text = SiglipTextConfig(**text_kw)
        vision = SiglipVisionConfig(image_size=image_size, **vision_kw)
        model = SiglipMoeModel(SiglipConfig(text_config=text.to_dict(), vision_config=vision.to_dict()))
        processor = ImageTransform(image_size, image_size, SIGLIP_MEAN, SIGLIP_STD, 3, "siglip")
    else:
        grid = image_size // patch_size
        text = Siglip2TextConfig(**text_kw)
        vision = Siglip2VisionConfig(num_patches=grid * grid, **vision_kw)
        model = Siglip2MoeModel(Siglip2Config(text_config=text.to_dict(), vision_config=vision.to_dict()))
        processor = ImageTransform(image_size, image_size, SIGLIP_MEAN, SIGLIP_STD, 2, "siglip2", patch_size)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    model.tokenizer = TextTokenizer(tokenizer, context, "max_length")
    model.image_processor = processor
    return model.eval()
