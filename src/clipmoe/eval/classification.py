"""Zero-shot classification with class names and prompt templates, as CLIP_benchmark defines it.

Each class's weight is the mean of its L2-normalised template features (``template.format(c=name)``),
renormalised; an image's prediction ranks classes by cosine similarity. Single-label data gives top-1,
top-5 (only with at least 5 classes) and mean per-class recall (sklearn's ``balanced_accuracy_score``: the
recall of each class present in the labels, averaged); multi-label data gives mean average precision.
Numbers are percentages.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .datasets import ClassificationDataset, check_templates
from .features import KEY_CHUNK, BatchHook, dataset_image_features, encode_texts


def class_prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template filled with every class name, class-major: ``[c0t0, c0t1, ..., c1t0, ...]``."""
    check_templates(templates, "zero-shot classifier")
    return [t.format(c=name) for name in classnames for t in templates]


def zero_shot_classifier(
    model: nn.Module,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    on_batch: BatchHook | None = None,
) -> torch.Tensor:
    """Class weights ``[C, D]``: per class, the renormalised mean of its normalised template features."""
    texts = class_prompts(classnames, templates)
    features = encode_texts(
        model, texts, batch_size=batch_size, device=device, dtype=dtype, on_batch=on_batch, desc="class prompts"
    )
    per_class = features.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1)


def classification_metrics(image_features: torch.Tensor, classifier: torch.Tensor, targets: torch.Tensor) -> dict:
    """Metrics of normalised image features against class weights (see the module docstring)."""
    num_classes = len(classifier)
    if targets.dim() == 2:
        scores = image_features @ classifier.T
        return {"mean_average_precision": 100.0 * average_precision_per_class(scores, targets).mean().item()}
    k = min(5, num_classes)
    top = torch.cat([(chunk @ classifier.T).topk(k, dim=1).indices for chunk in image_features.split(KEY_CHUNK)])
    hits = top == targets[:, None]
    pred = top[:, 0]
    metrics = {"top1": 100.0 * hits[:, 0].float().mean().item()}
    if num_classes >= 5:
        metrics["top5"] = 100.0 * hits.any(dim=1).float().mean().item()
    present = targets.unique()
    recall = [(pred[targets == c] == c).float().mean() for c in present]
    metrics["mean_per_class_recall"] = 100.0 * torch.stack(recall).mean().item()
    return metrics


def average_precision_per_class(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """AP of each class column: mean precision at the rank of each positive (0 for a class with none)."""
    order = scores.argsort(dim=0, descending=True)
    truth = targets.gather(0, order).float()  # [N, C], ranked per class
    precision = truth.cumsum(0) / torch.arange(1, len(scores) + 1, dtype=torch.float32)[:, None]
    return (precision * truth).sum(0) / truth.sum(0).clamp_min(1.0)


def evaluate_classification(
    model: nn.Module,
    dataset: ClassificationDataset,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    num_workers: int = 0,
    image_hook: BatchHook | None = None,
    text_hook: BatchHook | None = None,
    image_features: torch.Tensor | None = None,
) -> dict:
    """Build the zero-shot classifier from the dataset's class names and templates, encode the images once,
    and return the metrics plus image and class counts. Hooks: see ``RoutingCollector``. ``image_features``:
    the dataset's images already encoded by this model (``encode_images``), not encoded again."""
    kw = {"device": device, "dtype": dtype}
    classifier = zero_shot_classifier(
        model, dataset.classnames, dataset.templates, batch_size=batch_size, on_batch=text_hook, **kw
    )
    features = dataset_image_features(
        model, dataset.images, dataset.name, image_features, image_hook, num_workers, batch_size=batch_size, **kw
    )
    metrics = classification_metrics(features, classifier, dataset.targets)
    if dataset.targets.dim() == 1:  # recall per class name: which classes a model keeps or forgets
        pred = (features @ classifier.T).argmax(dim=1)
        for c in dataset.targets.unique().tolist():
            hit = (pred[dataset.targets == c] == c).float().mean().item()
            metrics[f"per_class_recall/{dataset.classnames[c]}"] = 100.0 * hit
    return {**metrics, "num_images": len(features), "num_classes": len(dataset.classnames)}
