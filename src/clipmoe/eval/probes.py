"""Attribute probes on the generated world: does the model see each attribute?

``probes/probes.jsonl`` holds one probe per line, image paths relative to the file's folder:

* ``{"attribute": A, "kind": "pair", "images": [p1, p2], "captions": [c1, c2]}``: two images differing in
  attribute A; correct only if each caption picks its own image (the MMVP-VLM rule; chance 25%);
* ``{"attribute": A, "kind": "swap", "image": p, "positive": c, "negative": c'}``: ``c'`` is ``c`` with A's
  value swapped; correct if the image is strictly closer to ``c`` (chance 50%).

Scores are percentages per attribute and kind, and their means over attributes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from .datasets import ImageRef
from .features import BatchHook, encode_images, encode_texts
from .mmvp import logit_scale, pair_correct

PROBES_FILE = "probes.jsonl"
KINDS = ("pair", "swap")


@dataclass(frozen=True)
class Probe:
    """``images`` and ``captions``: two each for a pair; for a swap one image and (positive, negative)."""

    attribute: str
    kind: str
    images: tuple[str, ...]
    captions: tuple[str, str]


def load_probes(path: str | os.PathLike) -> list[Probe]:
    """Probes from a ``probes.jsonl`` file or the folder holding one."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, PROBES_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no probes file at {path}")
    folder = os.path.dirname(os.path.abspath(path))
    probes = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
                kind, attribute = rec["kind"], str(rec["attribute"])
                if kind == "pair":
                    images, captions = rec["images"], rec["captions"]
                    if len(images) != 2 or len(captions) != 2:
                        raise ValueError("a pair probe needs exactly 2 images and 2 captions")
                elif kind == "swap":
                    images, captions = [rec["image"]], [rec["positive"], rec["negative"]]
                else:
                    raise ValueError(f"unknown probe kind {kind!r}; expected one of {KINDS}")
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                detail = f"missing field {e}" if isinstance(e, KeyError) else str(e)
                raise ValueError(f"{where}: bad probe: {detail}") from None
            paths = tuple(os.path.join(folder, p) for p in images)
            for p in paths:
                if not os.path.isfile(p):
                    raise FileNotFoundError(f"{where}: the probe names an image that does not exist: {p}")
            probes.append(Probe(attribute, kind, paths, (str(captions[0]), str(captions[1]))))
    if not probes:
        raise ValueError(f"{path} holds no probes")
    return probes


def _index(items: list[str]) -> tuple[list[str], dict[str, int]]:
    unique = list(dict.fromkeys(items))
    return unique, {x: i for i, x in enumerate(unique)}


def evaluate_probes(
    model: nn.Module,
    data: str | os.PathLike | list[Probe],
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    image_hook: BatchHook | None = None,
    text_hook: BatchHook | None = None,
) -> dict:
    """``{"pair/<A>", "swap/<A>", "pair_mean", "swap_mean", "num_pair", "num_swap"}`` (kinds present only).

    Each distinct image and caption is encoded once. Hooks see images and captions in first-use order
    (``probe_image_labels`` / ``probe_caption_labels`` give their attributes)."""
    probes = load_probes(data) if isinstance(data, (str, os.PathLike)) else list(data)
    image_paths, image_idx = _index([p for probe in probes for p in probe.images])
    captions, caption_idx = _index([c for probe in probes for c in probe.captions])
    kw = {"batch_size": batch_size, "device": device, "dtype": dtype}
    images = encode_images(model, [ImageRef(p) for p in image_paths], on_batch=image_hook, desc="probe images", **kw)
    texts = encode_texts(model, captions, on_batch=text_hook, desc="probe captions", **kw)

    results: dict[tuple[str, str], list[bool]] = {}
    pairs = [p for p in probes if p.kind == "pair"]
    if pairs:
        img = images[torch.tensor([[image_idx[x] for x in p.images] for p in pairs])]  # [P, 2, D]
        txt = texts[torch.tensor([[caption_idx[c] for c in p.captions] for p in pairs])]
        for probe, ok in zip(pairs, pair_correct(img, txt, logit_scale(model)).tolist()):
            results.setdefault(("pair", probe.attribute), []).append(ok)
    for probe in (p for p in probes if p.kind == "swap"):
        image = images[image_idx[probe.images[0]]]
        positive, negative = texts[caption_idx[probe.captions[0]]], texts[caption_idx[probe.captions[1]]]
        results.setdefault(("swap", probe.attribute), []).append(bool(image @ positive > image @ negative))

    out: dict = {}
    for kind in KINDS:
        scores = {a: 100.0 * sum(v) / len(v) for (k, a), v in sorted(results.items()) if k == kind}
        if scores:
            out[f"{kind}_mean"] = sum(scores.values()) / len(scores)
            out[f"num_{kind}"] = sum(len(v) for (k, _), v in results.items() if k == kind)
            out.update({f"{kind}/{a}": s for a, s in scores.items()})
    return out


def probe_image_labels(probes: list[Probe]) -> list[str]:
    """The attribute of each distinct probe image, in the order ``evaluate_probes`` encodes them."""
    return _first_attribute(probes, lambda probe: probe.images)


def probe_caption_labels(probes: list[Probe]) -> list[str]:
    """The attribute of each distinct probe caption, in the order ``evaluate_probes`` encodes them."""
    return _first_attribute(probes, lambda probe: probe.captions)


def _first_attribute(probes: list[Probe], items) -> list[str]:
    labels: dict[str, str] = {}
    for probe in probes:
        for x in items(probe):
            labels.setdefault(x, probe.attribute)
    return list(labels.values())
