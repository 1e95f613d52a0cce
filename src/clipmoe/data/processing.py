"""Text tokenization and image preprocessing, read from a model folder (offline).

``ImageTransform`` reproduces ``CLIPImageProcessor`` (resize the shortest side, bicubic, center crop, RGB,
rescale, normalise) with PIL and numpy only, so it is fast and needs no torchvision; a test checks it
against the HF processor.

Hostile images are refused before any work: resizing the shortest side keeps the aspect ratio, so a
102-byte 1x4000 PNG would become a 224x896000 image (GBs). ``ImageTransform`` therefore checks the pixel
count (``max_pixels``) and the aspect ratio (``max_aspect_ratio``) from the header alone and raises
``ImageRejected``; the readers count such samples as skipped, with the reason. The crop is taken while the
image is still 8-bit, so the float tensor is never larger than ``[3, crop, crop]``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_PIL_RESAMPLE = {0: Image.NEAREST, 1: Image.LANCZOS, 2: Image.BILINEAR, 3: Image.BICUBIC}
# Defaults of the image caps: 64 Mpx decodes to at most 256 MB (RGBA); an aspect ratio of 20 keeps the
# resized 8-bit image below 20 crops' worth (about 3 MB at 224 px). Panoramas and banners past 20:1 lose
# all but a 1/20 slice to the centre crop anyway.
MAX_PIXELS = 64_000_000
MAX_ASPECT_RATIO = 20.0


class ImageRejected(ValueError):
    """An image refused before decoding or resizing (too many pixels, too extreme an aspect ratio)."""


def check_image_size(
    size: tuple[int, int], max_pixels: int | None = MAX_PIXELS, max_aspect_ratio: float | None = MAX_ASPECT_RATIO
) -> str | None:
    """Why an image of ``size`` (width, height) is refused, or None. ``None`` limits are not checked.

    The reason starts with its skip category (``image too large:``, ``extreme aspect ratio:``)."""
    w, h = size
    if w < 1 or h < 1:
        return f"empty image: {w}x{h} pixels"
    if max_pixels is not None and w * h > max_pixels:
        return f"image too large: {w}x{h} = {w * h} pixels > max_pixels {max_pixels}"
    if max_aspect_ratio is not None and max(w, h) / min(w, h) > max_aspect_ratio:
        return f"extreme aspect ratio: {w}x{h} ({max(w, h) / min(w, h):.1f}:1 > max_aspect_ratio {max_aspect_ratio:g})"
    return None


@dataclass
class ImageTransform:
    """Image -> normalised ``[3, crop, crop]`` float tensor, as the model's ``preprocessor_config.json``."""

    size: int = 224  # shortest edge after resize
    crop_size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    resample: int = 3  # PIL code; 3 = bicubic
    # "clip": resize the shortest edge, center crop (CLIPImageProcessor). "siglip": resize the whole image to
    # crop_size x crop_size, no crop (SiglipImageProcessor). "siglip2": the same square resize, written as the
    # Siglip2ImageProcessor (NaFlex) config that yields exactly these pixels for square images.
    processor: str = "clip"
    patch_size: int = 16  # siglip2 only
    # Refused before decoding/resizing (ImageRejected); None turns a check off.
    max_pixels: int | None = MAX_PIXELS
    max_aspect_ratio: float | None = MAX_ASPECT_RATIO

    def __post_init__(self) -> None:
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1 or None, got {self.max_pixels}")
        if self.max_aspect_ratio is not None and not self.max_aspect_ratio >= 1:
            raise ValueError(f"max_aspect_ratio must be >= 1 or None, got {self.max_aspect_ratio}")

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, **limits) -> ImageTransform:
        """The folder's preprocessing; ``limits`` (``max_pixels``, ``max_aspect_ratio``) override the caps."""
        path = os.path.join(folder, "preprocessor_config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{folder} has no preprocessor_config.json; cannot know the image preprocessing")
        with open(path) as f:
            cfg = json.load(f)
        skipped = _steps_clipmoe_cannot_skip(cfg)
        if skipped:
            raise ValueError(
                f"{path}: {', '.join(skipped)}: clipmoe always resizes, rescales by 1/255, normalises and converts to "
                "RGB, so these images would not be the ones the model was trained on"
            )
        siglip = _siglip_transform(cls, cfg, **limits)
        if siglip is not None:
            return siglip
        if "do_center_crop" in cfg and not cfg["do_center_crop"]:
            raise ValueError(
                f"{path}: do_center_crop {json.dumps(cfg['do_center_crop'])} with a shortest-edge resize: clipmoe always crops the centre of a "
                "CLIP-style input, so these images would not be the ones the model was trained on"
            )
        size = cfg.get("size", 224)
        size = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
        crop = cfg.get("crop_size", size)
        crop = crop.get("height", crop.get("shortest_edge")) if isinstance(crop, dict) else crop
        return cls(
            int(size),
            int(crop),
            tuple(cfg.get("image_mean", OPENAI_MEAN)),
            tuple(cfg.get("image_std", OPENAI_STD)),
            int(cfg.get("resample", 3)),
            **limits,
        )

    def to_processor_config(self) -> dict:
        if self.processor != "clip":
            return _siglip_processor_config(self)
        return {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": self.size},
            "resample": self.resample,
            "do_center_crop": True,
            "crop_size": {"height": self.crop_size, "width": self.crop_size},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "do_convert_rgb": True,
        }

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
            json.dump(self.to_processor_config(), f, indent=2)

    def check(self, image: Image.Image) -> str | None:
        """Why ``image`` is refused (its header size against the caps), or None; decodes nothing."""
        return check_image_size(image.size, self.max_pixels, self.max_aspect_ratio)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        reason = self.check(image)
        if reason is not None:
            raise ImageRejected(reason)
        image = _eight_bit(image)
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            # HF composites transparency onto white before dropping alpha; do the same.
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        image = image.convert("RGB")
        if self.processor != "clip":  # SigLIP: the whole image squashed to a square, no crop
            if image.size != (self.crop_size, self.crop_size):
                image = image.resize((self.crop_size, self.crop_size), resample=_PIL_RESAMPLE[self.resample])
            arr = np.asarray(image, dtype=np.float32)
            arr = (arr * (1 / 255) - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
            return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        w, h = image.size
        # Same rounding as HF's get_resize_output_image_size(default_to_square=False).
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.size, int(self.size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), resample=_PIL_RESAMPLE[self.resample])
        top = (new_h - self.crop_size) // 2
        left = (new_w - self.crop_size) // 2
        crop = self.crop_size
        if top >= 0 and left >= 0:  # crop while 8-bit: only [crop, crop, 3] is ever converted to float
            arr = np.asarray(image.crop((left, top, left + crop, top + crop)))
        else:
            arr = _center_crop(np.asarray(image), top, left, crop)
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        arr = (arr.astype(np.float32) * (1 / 255) - mean) / std
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    def __repr__(self) -> str:
        return f"ImageTransform({asdict(self)})"


SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit greyscale scaled to 8 bits (a 16-bit PNG opens as ``I;16``, or ``I`` in older Pillows; a 16-bit PGM
    as ``I``), its transparent value kept as an alpha channel. PIL's ``convert("RGB")``, and so HF's processor,
    clips such pixels at 255: the image turns almost white, silently. Other 32-bit integer or float pixels have
    no range to scale from and are refused (``ImageRejected``: the sample is skipped and named)."""
    sixteen = image.mode.startswith("I;16") or (image.mode == "I" and image.format in ("PNG", "PPM"))
    if not sixteen:
        if image.mode in ("I", "F"):
            raise ImageRejected(f"unsupported pixels: mode {image.mode!r} (32-bit integer or float), no 8-bit range")
        return image
    raw = np.asarray(image, dtype=np.float32)
    grey = Image.fromarray(np.rint(raw * (255 / 65535)).astype(np.uint8), "L")
    transparent = image.info.get("transparency")
    if transparent is None:
        return grey
    alpha = Image.fromarray(((raw != transparent) * 255).astype(np.uint8), "L")
    return Image.merge("LA", (grey, alpha))


def _steps_clipmoe_cannot_skip(cfg: dict) -> list[str]:
    """The settings of a ``preprocessor_config.json`` that turn off a step ``ImageTransform`` always takes. HF
    skips a step set to ``null`` as one set to ``false`` (an absent key is its default, on); ``do_convert_rgb:
    null`` is what SigLIP processors write, and their images are converted all the same."""
    steps = ("do_resize", "do_rescale", "do_normalize")
    off = [f"{key} {json.dumps(cfg[key])}" for key in steps if key in cfg and not cfg[key]]
    if cfg.get("do_convert_rgb") is False:
        off.append("do_convert_rgb false")
    factor = cfg.get("rescale_factor", 1 / 255)
    number = isinstance(factor, (int, float)) and not isinstance(factor, bool)
    if cfg.get("do_rescale", True) and not (number and math.isclose(factor, 1 / 255, rel_tol=1e-6)):
        off.append(f"rescale_factor {json.dumps(factor)}")
    return off


def _siglip_transform(cls, cfg: dict, **limits) -> ImageTransform | None:
    """The transform of a SigLIP / SigLIP 2 ``preprocessor_config.json``; None for a CLIP-style one."""
    kind = str(cfg.get("image_processor_type", ""))
    mean, std = tuple(cfg.get("image_mean", SIGLIP_MEAN)), tuple(cfg.get("image_std", SIGLIP_STD))
    if kind.startswith("Siglip2") or "max_num_patches" in cfg:
        # NaFlex resizes to the largest patch grid within max_num_patches at the image's aspect ratio; clipmoe
        # feeds square images, for which that grid is floor(sqrt(max_num_patches)) patches a side.
        patch, grid = int(cfg.get("patch_size", 16)), math.isqrt(int(cfg.get("max_num_patches", 256)))
        side = grid * patch
        return cls(side, side, mean, std, int(cfg.get("resample", 2)), "siglip2", patch, **limits)
    size = cfg.get("size")
    squash = isinstance(size, dict) and "height" in size and "shortest_edge" not in size
    if kind.startswith("Siglip") or (squash and not cfg.get("do_center_crop", False)):
        side = int(size["height"]) if isinstance(size, dict) else int(size or 224)
        return cls(side, side, mean, std, int(cfg.get("resample", 3)), "siglip", **limits)
    return None


def _siglip_processor_config(t: ImageTransform) -> dict:
    common = {
        "do_resize": True,
        "resample": t.resample,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(t.mean),
        "image_std": list(t.std),
        "do_convert_rgb": True,
    }
    if t.processor == "siglip2":
        grid = t.crop_size // t.patch_size
        return {
            "image_processor_type": "Siglip2ImageProcessor",
            **common,
            "patch_size": t.patch_size,
            "max_num_patches": grid * grid,
        }
    return {
        "image_processor_type": "SiglipImageProcessor",
        **common,
        "size": {"height": t.crop_size, "width": t.crop_size},
    }


def _center_crop(arr: np.ndarray, top: int, left: int, crop: int) -> np.ndarray:
    h, w = arr.shape[:2]
    if top >= 0 and left >= 0 and h >= crop and w >= crop:
        return arr[top : top + crop, left : left + crop]
    # Image smaller than the crop: pad with zeros around it, as HF's center_crop does.
    out = np.zeros((max(h, crop), max(w, crop), arr.shape[2]), arr.dtype)
    oy, ox = -(-(out.shape[0] - h) // 2), -(-(out.shape[1] - w) // 2)  # ceil, as HF pads
    out[oy : oy + h, ox : ox + w] = arr
    top, left = (out.shape[0] - crop) // 2, (out.shape[1] - crop) // 2
    return out[top : top + crop, left : left + crop]


class TextTokenizer:
    """Wraps the folder's HF tokenizer: pads to the batch's longest text, truncates to the context."""

    def __init__(self, hf_tokenizer, context_length: int, padding: str = "longest") -> None:
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        self.hf = hf_tokenizer
        self.context_length = context_length
        # "max_length" for towers that pool a fixed position (SigLIP pools the last one, trained on 64 tokens)
        self.padding = padding

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, context_length: int, padding: str = "longest") -> TextTokenizer:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        try:
            # A folder that declares the generic tokenizers backend (clipmoe's word tokenizers) gets exactly its
            # tokenizer.json: AutoTokenizer would swap in the model type's own class for some types (SigLIP 2).
            loader = PreTrainedTokenizerFast if _declares_generic_tokenizer(folder) else AutoTokenizer
            tok = loader.from_pretrained(os.fspath(folder), local_files_only=True)
        except Exception as e:
            raise FileNotFoundError(f"cannot load a tokenizer from {folder}: {e}") from e
        return cls(tok, context_length, padding)

    def __call__(self, texts: list[str] | str) -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        enc = self.hf(
            list(texts),
            padding=True if self.padding == "longest" else "max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )
        # A tokenizer without attention_mask in its model_input_names (original SigLIP checkpoints, trained
        # without one) gets an all-ones mask: the model attends to every position, as it was trained, and the
        # router losses count every position.
        mask = enc.get("attention_mask")
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": torch.ones_like(enc["input_ids"]) if mask is None else mask,
        }

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        self.hf.save_pretrained(os.fspath(folder))


def _declares_generic_tokenizer(folder: str | os.PathLike) -> bool:
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.exists(path) or not os.path.exists(os.path.join(folder, "tokenizer.json")):
        return False
    with open(path) as f:
        declared = json.load(f).get("tokenizer_class")
    return declared in ("TokenizersBackend", "PreTrainedTokenizerFast")


def build_word_tokenizer(words: list[str], context_length: int):
    """A small word-level tokenizer (HF ``tokenizers``) for domains with a closed vocabulary.

    Ids: 0 ``<pad>``, 1 ``<unk>``, 2 ``<|startoftext|>``, 3 ``<|endoftext|>``, then ``words``. The EOS id
    is deliberately not 2: HF CLIP treats ``eos_token_id == 2`` as a legacy config and pools by argmax.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(words) - set(specials)))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 2), ("<|endoftext|>", 3)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        model_max_length=context_length,
    )
