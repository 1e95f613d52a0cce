"""Run every evaluation found in a world-style ``eval/`` folder, for one model, into one flat result dict.

Each sub-folder is recognised by its layout, not its name: a CLIP_benchmark webdataset folder (retrieval
or classification, e.g. ``retrieval_short/``, ``retrieval_detailed/``, ``cls_<attribute>/``), an MMVP-VLM
folder (``Questions.csv``; e.g. ``mmvp/``) or a probes folder (``probes.jsonl``; e.g. ``probes/``). Results
are keyed ``<folder>/<metric>``. For a CLIP-MoE the same encodings also feed the routing analysis (under
``routing``), with classification images and prompts labelled by ``<attribute>`` = class name (the folder
name without ``cls_``), MMVP inputs by ``mmvp_pattern`` and probe inputs by ``probe_attribute``.

Sets that hold the same images (a world writes its evaluation images into every retrieval and classification
folder, as CLIP_benchmark expects) are encoded once: the features are the same tensors the sets would each
compute (same images, order and batches), and the routing analysis counts each image once, with every label
its sets give it.
"""

from __future__ import annotations

import hashlib
import os

import torch
from torch import nn

from .classification import evaluate_classification
from .datasets import RetrievalDataset, load_wds, wds_splits
from .features import encode_images
from .mmvp import evaluate_mmvp, load_mmvp
from .probes import PROBES_FILE, evaluate_probes, load_probes, probe_caption_labels, probe_image_labels
from .retrieval import evaluate_retrieval
from .routing import RoutingCollector


def find_eval_sets(eval_dir: str | os.PathLike) -> dict[str, tuple[str, str]]:
    """``{name: (kind, path)}`` with kind ``wds`` | ``mmvp`` | ``probes``, for every recognised sub-folder."""
    eval_dir = os.fspath(eval_dir)
    if not os.path.isdir(eval_dir):
        raise FileNotFoundError(f"no evaluation folder at {eval_dir}")
    found = {}
    for entry in sorted(os.scandir(eval_dir), key=lambda e: e.name):
        if not entry.is_dir():
            continue
        if wds_splits(entry.path):
            found[entry.name] = ("wds", entry.path)
        elif os.path.isfile(os.path.join(entry.path, "Questions.csv")):
            found[entry.name] = ("mmvp", entry.path)
        elif os.path.isfile(os.path.join(entry.path, PROBES_FILE)):
            found[entry.name] = ("probes", entry.path)
    if not found:
        raise ValueError(
            f"{eval_dir} holds no evaluation set (webdataset folders, an MMVP-VLM folder or a probes folder)"
        )
    return found


def evaluate_suite(
    model: nn.Module,
    eval_dir: str | os.PathLike,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    num_workers: int = 0,
    routing: bool | None = None,
) -> dict:
    """Every evaluation set in ``eval_dir``: ``{"<set>/<metric>": value, ..., "routing": {...}}``.

    ``routing`` None analyses routing exactly when the model has MoE layers."""
    sets = find_eval_sets(eval_dir)
    if routing is None:
        routing = bool(getattr(model, "moe_layers", list)())
    collector = RoutingCollector(model) if routing else None

    def hooks(**labels):
        if collector is None:
            return {}
        image = {k: v[0] for k, v in labels.items()}
        text = {k: v[1] for k, v in labels.items()}
        return {"image_hook": collector.hook("image", image), "text_hook": collector.hook("text", text)}

    kw = {"batch_size": batch_size, "device": device, "dtype": dtype}
    datasets = {name: load_wds(path) for name, (kind, path) in sets.items() if kind == "wds"}
    labels = {name: _class_labels(name, data) for name, data in datasets.items()}
    features = {}
    for names in _same_images(datasets).values():  # each distinct image list encoded once
        shared = {k: v for name in names for k, v in labels[name].items()}
        hook = hooks(**shared).get("image_hook")
        first = datasets[names[0]]
        desc = first.name + (f" (the images of {len(names)} sets)" if len(names) > 1 else "")
        encoded = encode_images(model, first.images, num_workers=num_workers, on_batch=hook, desc=desc, **kw)
        features.update(dict.fromkeys(names, encoded))
    results: dict = {}
    for name, (kind, path) in sets.items():
        if kind == "wds":
            data, text_hook = datasets[name], hooks(**labels[name]).get("text_hook")
            evaluate = evaluate_retrieval if isinstance(data, RetrievalDataset) else evaluate_classification
            metrics = evaluate(model, data, image_features=features[name], text_hook=text_hook, **kw)
        elif kind == "mmvp":
            pairs = load_mmvp(path)
            patterns = [p.pattern for p in pairs for _ in p.images]
            metrics = evaluate_mmvp(model, pairs, **hooks(mmvp_pattern=(patterns, patterns)), **kw)
        else:
            probes = load_probes(path)
            probe_labels = {"probe_attribute": (probe_image_labels(probes), probe_caption_labels(probes))}
            metrics = evaluate_probes(model, probes, **hooks(**probe_labels), **kw)
        results.update({f"{name}/{k}": v for k, v in metrics.items()})
    if collector is not None:
        results["routing"] = collector.result()
    return results


def _class_labels(name: str, data) -> dict[str, tuple[list[str], list[str]]]:
    """Routing labels of a single-label classification set: each image and each prompt by its class name."""
    if isinstance(data, RetrievalDataset) or data.multilabel:
        return {}
    names = data.classnames
    prompts = [c for c in names for _ in data.templates]
    return {name.removeprefix("cls_"): ([names[t] for t in data.targets.tolist()], prompts)}


def _same_images(datasets: dict) -> dict[tuple, list[str]]:
    """Set names grouped by the bytes of their images, in order. Sets are first told apart by their images'
    sizes (no reads); only sets that agree on those are read and compared by a digest of every image."""
    by_sizes: dict[tuple, list[str]] = {}
    for name, data in datasets.items():
        sizes = tuple(i.size if i.size >= 0 else os.path.getsize(i.path) for i in data.images)
        by_sizes.setdefault(sizes, []).append(name)
    groups: dict[tuple, list[str]] = {}
    for sizes, names in by_sizes.items():
        for name in names:
            digest = hashlib.sha256()
            if len(names) > 1:
                for image in datasets[name].images:
                    digest.update(image.read())  # the sizes, already equal, delimit the images
            groups.setdefault((sizes, digest.hexdigest()), []).append(name)
    return groups
