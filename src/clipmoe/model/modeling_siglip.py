"""SigLIP and SigLIP 2 bases: HF ``SiglipModel`` / ``Siglip2Model`` whose chosen FFNs are ``MoEFeedForward``.

The classes add to the HF models what ``ClipMoeModel`` adds to ``CLIPModel`` (``config.moe``, the MoE hooks,
``encode_image`` / ``encode_text``), so the whole of clipmoe (surgery, training, evaluation, export) runs on
them unchanged. What differs from CLIP, and where it is handled:

- **Scores and loss.** SigLIP was trained with a per-pair sigmoid loss on ``exp(logit_scale) * cos +
  logit_bias``; ``loss_family = "sigmoid"`` tells the training loop (``loss: auto``) to keep that loss.
  Zero-shot ranking needs no change: a positive scale and one shared bias preserve every argmax and top-k
  of the cosine similarities that evaluation ranks by.
- **Text.** SigLIP pools the hidden state at the *last position* (not at EOS) and was trained on texts
  padded to a fixed length (64), so its tokenizer pads to ``max_length`` (``text_padding``). The last
  position is usually a pad token, so pads are real computation: every position goes through the FFN /
  MoE layers (routing pads cannot be skipped without changing the model's output). Whether pads are
  *attended to* follows the checkpoint's tokenizer: when it returns an ``attention_mask`` (SigLIP 2's Gemma
  tokenizer, tokenizers that list it in ``model_input_names``) the model gets it and the router's balance
  and z losses count real tokens only; when it does not (``model_input_names: ["input_ids"]``; SigLIP was
  trained without a text mask, and open_clip passes none), ``TextTokenizer`` returns an all-ones mask, the
  model attends to pads as in training, and the router losses count every position, pads included.
- **Vision.** No CLS token; the pooled feature is the attention-pooling (MAP) head's output. SigLIP 2
  (NaFlex) takes patchified pixels with a patch mask and the patch grid; ``Siglip2MoeModel.encode_image``
  also accepts ordinary ``[B, 3, H, W]`` images and patchifies them exactly as ``Siglip2ImageProcessor``
  does (every patch real), which is how clipmoe's fixed-size image pipeline feeds it.

Saved MoE folders declare their own model types (``siglip_moe``, ``siglip2_moe``, ``siglip_moe_vision_model``,
``siglip2_moe_vision_model``; the config classes below) and guard their MoE towers against dense classes, as
``modeling.py`` describes. Like ``modeling.py`` this file imports only torch, transformers and its siblings: it
is shipped as remote code in saved folders (``auto_map`` -> ``modeling_siglip.<Class>``; needs transformers
>= 4.49 for SigLIP 2).
"""

from __future__ import annotations

import torch
from transformers import (
    Siglip2Config,
    Siglip2Model,
    Siglip2VisionConfig,
    Siglip2VisionModel,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from .modeling import MoEConfigMixin, _MoEHooks, register_auto_classes


class SiglipMoeConfig(MoEConfigMixin, SiglipConfig):
    """``SiglipConfig`` of a SigLIP-MoE (model_type ``siglip_moe``); ``moe`` is its ``MoESpec`` as a dict."""

    model_type = "siglip_moe"
    dense_config_class = SiglipConfig
    moe: dict | None = None


class Siglip2MoeConfig(MoEConfigMixin, Siglip2Config):
    """``Siglip2Config`` of a SigLIP 2-MoE (model_type ``siglip2_moe``)."""

    model_type = "siglip2_moe"
    dense_config_class = Siglip2Config
    moe: dict | None = None


class SiglipMoeVisionConfig(MoEConfigMixin, SiglipVisionConfig):
    """``SiglipVisionConfig`` of a SigLIP-MoE vision tower (model_type ``siglip_moe_vision_model``)."""

    model_type = "siglip_moe_vision_model"
    dense_config_class = SiglipVisionConfig
    moe: dict | None = None


class Siglip2MoeVisionConfig(MoEConfigMixin, Siglip2VisionConfig):
    """``Siglip2VisionConfig`` of a SigLIP 2-MoE vision tower (model_type ``siglip2_moe_vision_model``)."""

    model_type = "siglip2_moe_vision_model"
    dense_config_class = Siglip2VisionConfig
    moe: dict | None = None


class _SiglipHooks(_MoEHooks):
    loss_family = "sigmoid"  # the loss the base was trained with (the training loop's ``loss: auto``)
    text_padding = "max_length"  # the text tower pools the last position: pad every text to the context
    remote_module = "modeling_siglip"


def patchify(pixel_values: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[B, C, H, W]`` images -> SigLIP 2 inputs: patches ``[B, N, p * p * C]`` in the order
    ``Siglip2ImageProcessor`` writes them (row-major patches, each ``(p, p, C)`` flattened), an all-ones patch
    mask ``[B, N]`` and the patch grid ``[B, 2]``."""
    b, c, h, w = pixel_values.shape
    gh, gw = h // patch_size, w // patch_size
    if gh * patch_size != h or gw * patch_size != w:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch_size}")
    patches = pixel_values.reshape(b, c, gh, patch_size, gw, patch_size).permute(0, 2, 4, 3, 5, 1)
    patches = patches.reshape(b, gh * gw, patch_size * patch_size * c)
    mask = torch.ones(b, gh * gw, dtype=torch.long, device=pixel_values.device)
    shapes = torch.tensor([[gh, gw]], dtype=torch.long, device=pixel_values.device).expand(b, 2)
    return patches, mask, shapes


class SiglipMoeVisionModel(_SiglipHooks, SiglipVisionModel):
    """SigLIP vision tower alone, with the ``SiglipVisionModel`` call contract (LLaVA-style drop-in)."""

    config_class = SiglipMoeVisionConfig
    is_vision_tower = True

    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__(config)
        self._build_moe()


class Siglip2MoeVisionModel(_SiglipHooks, Siglip2VisionModel):
    """SigLIP 2 vision tower alone, with the ``Siglip2VisionModel`` call contract (patches, mask, grid)."""

    config_class = Siglip2MoeVisionConfig
    is_vision_tower = True

    def __init__(self, config: Siglip2VisionConfig) -> None:
        super().__init__(config)
        self._build_moe()


class SiglipMoeModel(_SiglipHooks, SiglipModel):
    """HF ``SiglipModel`` plus MoE FFNs (from ``config.moe``) and CLIP-style encode functions."""

    config_class = SiglipMoeConfig
    vision_tower_class = SiglipMoeVisionModel

    def __init__(self, config: SiglipConfig) -> None:
        super().__init__(config)
        # The width of both towers' features, under the name the rest of clipmoe reads (CLIPConfig's).
        if getattr(config, "projection_dim", None) is None:
            config.projection_dim = config.text_config.projection_size
        self._build_moe()

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image features (the MAP head's pooled output; not normalised)."""
        return self.vision_model(pixel_values=pixel_values).pooler_output

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Text features (the head applied at the last position; not normalised)."""
        return self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output


class Siglip2MoeModel(_SiglipHooks, Siglip2Model):
    """HF ``Siglip2Model`` (NaFlex) plus MoE FFNs and CLIP-style encode functions."""

    config_class = Siglip2MoeConfig
    vision_tower_class = Siglip2MoeVisionModel

    def __init__(self, config: Siglip2Config) -> None:
        super().__init__(config)
        if getattr(config, "projection_dim", None) is None:
            config.projection_dim = config.text_config.projection_size
        self._build_moe()

    def encode_image(
        self,
        pixel_values: torch.Tensor,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Image features from ``[B, 3, H, W]`` images (patchified here, all patches real) or from the
        processor's ``(patches [B, N, p*p*3], pixel_attention_mask, spatial_shapes)``; not normalised."""
        if pixel_values.dim() == 4:
            pixel_values, pixel_attention_mask, spatial_shapes = patchify(
                pixel_values, self.config.vision_config.patch_size
            )
        out = self.vision_model(
            pixel_values=pixel_values, pixel_attention_mask=pixel_attention_mask, spatial_shapes=spatial_shapes
        )
        return out.pooler_output

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Text features (the head applied at the last position; not normalised)."""
        return self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output


# model_type in config.json (dense and MoE) -> the class that opens it (clipmoe.load)
FAMILIES = {
    "siglip": SiglipMoeModel,
    "siglip2": Siglip2MoeModel,
    SiglipMoeConfig.model_type: SiglipMoeModel,
    Siglip2MoeConfig.model_type: Siglip2MoeModel,
}

if __name__.startswith("clipmoe."):  # the installed package, not a saved folder's copy of this file
    register_auto_classes(SiglipMoeConfig, SiglipMoeModel, zero_shot=True)
    register_auto_classes(Siglip2MoeConfig, Siglip2MoeModel, zero_shot=True)
    register_auto_classes(SiglipMoeVisionConfig, SiglipMoeVisionModel, zero_shot=False)
    register_auto_classes(Siglip2MoeVisionConfig, Siglip2MoeVisionModel, zero_shot=False)
