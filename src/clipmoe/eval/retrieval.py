"""Zero-shot image-text retrieval with several captions per image, as CLIP_benchmark defines it.

* image -> text R@k: an image is a hit if **any** of its captions is among its k nearest captions;
  averaged over images (CLIP_benchmark's ``text_retrieval_recall@k``).
* text -> image R@k: a caption is a hit if its image is among its k nearest images; averaged over every
  caption (CLIP_benchmark's ``image_retrieval_recall@k``).

Scores are cosine similarities of L2-normalised features; numbers are percentages.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .datasets import RetrievalDataset
from .features import BatchHook, dataset_image_features, encode_texts, model_device, topk_similarity

DEFAULT_KS = (1, 5, 10)


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_image_index: Sequence[int] | torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """R@k in both directions from normalised features; ``text_image_index[t]`` is caption t's image.

    A k larger than the candidate set counts every query as a hit (CLIP_benchmark would raise there).
    """
    text_image_index = torch.as_tensor(text_image_index, dtype=torch.long)
    if len(text_image_index) != len(text_features):
        raise ValueError(f"{len(text_features)} text features but {len(text_image_index)} caption->image indices")
    kmax = max(ks)
    _, i2t = topk_similarity(image_features, text_features, kmax, device=device, desc="ranking captions")
    _, t2i = topk_similarity(text_features, image_features, kmax, device=device, desc="ranking images")
    i2t_hit = text_image_index[i2t] == torch.arange(len(image_features))[:, None]  # [N_images, k]
    t2i_hit = t2i == text_image_index[:, None]  # [N_texts, k]
    metrics = {}
    for k in ks:
        metrics[f"image_to_text_R@{k}"] = 100.0 * i2t_hit[:, :k].any(dim=1).float().mean().item()
    for k in ks:
        metrics[f"text_to_image_R@{k}"] = 100.0 * t2i_hit[:, :k].any(dim=1).float().mean().item()
    return metrics


def evaluate_retrieval(
    model: nn.Module,
    dataset: RetrievalDataset,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    num_workers: int = 0,
    image_hook: BatchHook | None = None,
    text_hook: BatchHook | None = None,
    image_features: torch.Tensor | None = None,
) -> dict[str, float]:
    """Encode the dataset once and return R@k both ways, plus the image and caption counts.

    ``image_hook`` / ``text_hook`` run after each encoded batch (see ``RoutingCollector``). ``image_features``:
    the dataset's images already encoded by this model (``encode_images``), not encoded again."""
    texts = [c for caps in dataset.captions for c in caps]
    text_image_index = [i for i, caps in enumerate(dataset.captions) for _ in caps]
    kw = {"batch_size": batch_size, "device": device, "dtype": dtype}
    images = dataset_image_features(model, dataset.images, dataset.name, image_features, image_hook, num_workers, **kw)
    text_features = encode_texts(model, texts, on_batch=text_hook, desc=f"{dataset.name} captions", **kw)
    metrics = retrieval_metrics(images, text_features, text_image_index, ks, device=model_device(model))
    return {**metrics, "num_images": len(images), "num_texts": len(texts)}
