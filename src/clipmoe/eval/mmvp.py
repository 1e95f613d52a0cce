"""MMVP-VLM (Tong et al., "Eyes Wide Shut?", arXiv 2401.06209), read and scored as its authors do.

Layout: ``<root>/Questions.csv`` (``Question ID, Type, Statement``; consecutive rows form a pair) and an image
folder named ``MMVP_VLM_Images`` (the README) or ``MLLM_VLM Images`` (the official script); the image of
question q is ``<folder>/<Type>/<q>.jpg``.

Scoring (``scripts/evaluate_vlm.py``): each statement, prompted as ``"a photo of " + statement``, takes a
softmax over the pair's two images (with the model's logit scale) and picks image 1 if its probability is
above 0.5, else image 2 (so a tie goes to image 2). A pair counts only if both statements pick their own
image. Scores are percentages per pattern (``Type``) and their mean.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .datasets import ImageRef
from .features import BatchHook, encode_images, encode_texts

IMAGE_FOLDERS = ("MMVP_VLM_Images", "MLLM_VLM Images")
PROMPT = "a photo of "


@dataclass(frozen=True)
class MMVPPair:
    """Two images that differ in one visual pattern, and one statement true of each."""

    pattern: str
    qids: tuple[str, str]
    statements: tuple[str, str]
    images: tuple[ImageRef, ImageRef]


def load_mmvp(root: str | os.PathLike) -> list[MMVPPair]:
    """The pairs of an MMVP-VLM folder, in file order."""
    root = os.fspath(root)
    questions = os.path.join(root, "Questions.csv")
    if not os.path.isfile(questions):
        raise FileNotFoundError(f"{root} is not an MMVP-VLM folder: {questions} is missing")
    folder = next((os.path.join(root, n) for n in IMAGE_FOLDERS if os.path.isdir(os.path.join(root, n))), None)
    if folder is None:
        raise FileNotFoundError(f"{root} has no image folder (expected one of {list(IMAGE_FOLDERS)})")
    with open(questions, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if any(cell.strip() for cell in r)]
    if not rows:
        raise ValueError(f"{questions} is empty")
    header = [c.strip().lower() for c in rows[0]]
    if {"question id", "type", "statement"} <= set(header):
        cols = [header.index("question id"), header.index("type"), header.index("statement")]
    else:  # the official script reads the columns by position
        cols = [0, 1, 2]
    rows = [[r[c].strip() for c in cols] for r in rows[1:]]
    if not rows:
        raise ValueError(f"{questions} has no questions")
    if len(rows) % 2:
        raise ValueError(f"{questions} has {len(rows)} questions; MMVP-VLM questions come in pairs")
    pairs = []
    for (q1, t1, s1), (q2, t2, s2) in zip(rows[0::2], rows[1::2]):
        if t1 != t2:
            raise ValueError(f"{questions}: questions {q1} and {q2} form a pair but have types {t1!r} and {t2!r}")
        images = (ImageRef(os.path.join(folder, t1, f"{q1}.jpg")), ImageRef(os.path.join(folder, t2, f"{q2}.jpg")))
        for ref in images:
            if not os.path.isfile(ref.path):
                raise FileNotFoundError(f"{questions} names an image that does not exist: {ref.path}")
        pairs.append(MMVPPair(t1, (q1, q2), (s1, s2), images))
    return pairs


def logit_scale(model: nn.Module) -> float:
    """The model's learned temperature exp(logit_scale), or CLIP's usual 100 when it has none."""
    scale = getattr(model, "logit_scale", None)
    return float(scale.detach().float().exp()) if isinstance(scale, torch.Tensor) else 100.0


def pair_choices(image_features: torch.Tensor, text_features: torch.Tensor, scale: float) -> torch.Tensor:
    """For ``P`` pairs (``[P, 2, D]`` images and statements), which image (0/1) each statement picks:
    ``[P, 2]``. Image 1 (index 0) only when its softmax probability is strictly above 0.5."""
    logits = scale * torch.einsum("psd,pid->psi", text_features, image_features)
    return (logits.softmax(dim=-1)[..., 0] <= 0.5).long()


def pair_correct(image_features: torch.Tensor, text_features: torch.Tensor, scale: float) -> torch.Tensor:
    """``[P]`` bool: both statements picked their own image."""
    return (pair_choices(image_features, text_features, scale) == torch.tensor([0, 1])).all(dim=1)


def evaluate_mmvp(
    model: nn.Module,
    data: str | os.PathLike | Sequence[MMVPPair],
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    image_hook: BatchHook | None = None,
    text_hook: BatchHook | None = None,
) -> dict:
    """``{"mean", "num_pairs", "pattern/<Type>": ...}`` for an MMVP-VLM folder (or loaded pairs)."""
    pairs = load_mmvp(data) if isinstance(data, (str, os.PathLike)) else list(data)
    if not pairs:
        raise ValueError("MMVP-VLM: no pairs to score")
    kw = {"batch_size": batch_size, "device": device, "dtype": dtype}
    images = encode_images(model, [r for p in pairs for r in p.images], on_batch=image_hook, desc="MMVP images", **kw)
    texts = encode_texts(model, [PROMPT + s for p in pairs for s in p.statements], on_batch=text_hook, **kw)
    correct = pair_correct(images.view(len(pairs), 2, -1), texts.view(len(pairs), 2, -1), logit_scale(model))
    per_pattern: dict[str, list[bool]] = {}
    for pair, ok in zip(pairs, correct.tolist()):
        per_pattern.setdefault(pair.pattern, []).append(ok)
    scores = {f"pattern/{p}": 100.0 * sum(v) / len(v) for p, v in per_pattern.items()}
    return {"mean": sum(scores.values()) / len(scores), "num_pairs": len(pairs), **scores}
