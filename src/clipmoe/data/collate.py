"""Batch collation for CLIP training and embedding passes.

A sample whose image could not be decoded is kept as an *invalid row* (zero pixels, ``valid=False``) instead
of being dropped: under DDP every rank must run the same batch shape (the contrastive loss gathers features
across ranks), so the loss masks invalid rows rather than the batch shrinking. The collator runs inside
DataLoader workers, so it also carries the skip reasons out to the main process in ``batch["skipped"]``,
where ``ImageTextDataset.record_skipped(batch)`` logs them. An image the transform refuses before resizing
(``ImageRejected``: too many pixels, too extreme an aspect ratio) becomes an invalid row the same way, with
the transform's reason.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from .processing import ImageRejected, TextTokenizer
from .readers import Sample


class ClipCollator:
    """``list[Sample]`` -> ``{index, pixel_values, input_ids, attention_mask, valid, skipped}``.

    ``transform`` maps a PIL image to a ``[3, H, W]`` tensor (the model's ``ImageTransform``); it must have a
    ``crop_size`` attribute or see at least one valid image per batch, so invalid rows get the right shape.
    """

    def __init__(self, tokenizer: TextTokenizer, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.tokenizer = tokenizer
        self.transform = transform

    def __call__(self, samples: list[Sample]) -> dict:
        if not samples:
            raise ValueError("cannot collate an empty batch")
        pixels, reasons = [], []
        for s in samples:
            pixel, reason = None, s.error or "unreadable image"
            if s.image is not None:
                try:
                    pixel = self.transform(s.image)
                except ImageRejected as e:
                    reason = str(e)
            pixels.append(pixel)
            reasons.append(reason)
        valid = torch.tensor([p is not None for p in pixels], dtype=torch.bool)
        shape = next((p.shape for p in pixels if p is not None), None)
        if shape is None:
            crop = getattr(self.transform, "crop_size", None)
            if crop is None:
                raise ValueError("every image in the batch is invalid and the transform has no crop_size")
            shape = (3, crop, crop)
        pixel_values = torch.stack([p if p is not None else torch.zeros(shape) for p in pixels])
        text = self.tokenizer([s.caption for s in samples])
        return {
            "index": torch.tensor([s.index for s in samples], dtype=torch.long),
            "pixel_values": pixel_values,
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "valid": valid,
            "skipped": [f"{s.key}: {r}" for s, p, r in zip(samples, pixels, reasons) if p is None],
        }
