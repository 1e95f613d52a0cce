"""Zero-shot image-text retrieval with several captions per image, as CLIP_benchmark defines it.

* image -> text R@k: an image is a hit if **any** of its captions is among its k nearest captions;
  averaged over images (CLIP_benchmark's ``text_retrieval_recall@k``).
* text -> image R@k: a caption is a hit if its image is among its k nearest images; averaged over every
  caption (CLIP_benchmark's ``image_retrieval_recall@k``).

Scores are cosine similarities of L2-normalised features; numbers are percentages.

**Captions the model reads as one text** (the same tokens: the same string, or strings its tokenizer maps to
the same ids) are one candidate: their features are equal, so which of them ``topk`` ranks first is arbitrary,
and CLIP_benchmark's numbers then depend on that order (and on the ks asked). Here such a text is a hit for
every image it captions, in both directions; where every caption is its own text (COCO, Flickr) the metrics are
CLIP_benchmark's exactly. The generated world's ordinary captions name three attributes, so many images share
one: a model that reads those three perfectly scored 27% image->text R@1 under the arbitrary order, ~93% here.
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
    same_text: Sequence[int] | torch.Tensor | None = None,
) -> dict[str, float]:
    """R@k in both directions from normalised features; ``text_image_index[t]`` is caption t's image.

    ``same_text[t]``: an id shared by the captions the model reads as one text (``text_ids``); such captions are
    one candidate, a hit for each of their images. None: every caption is its own text.
    A k larger than the candidate set counts every query as a hit (CLIP_benchmark would raise there).
    """
    text_image_index = torch.as_tensor(text_image_index, dtype=torch.long)
    if len(text_image_index) != len(text_features):
        raise ValueError(f"{len(text_features)} text features but {len(text_image_index)} caption->image indices")
    if same_text is None:
        same_text = torch.arange(len(text_features))
    same_text = torch.as_tensor(same_text, dtype=torch.long)
    if len(same_text) != len(text_features):
        raise ValueError(f"{len(text_features)} text features but {len(same_text)} same_text ids")
    # text t -> its candidate u (0..U-1), the first caption of each text standing for it
    kinds, candidate = torch.unique(same_text, return_inverse=True)
    first = torch.full((len(kinds),), len(same_text), dtype=torch.long).scatter_reduce(
        0, candidate, torch.arange(len(same_text)), reduce="amin"
    )
    n_candidates = len(kinds)
    # every (image, text) pair that counts as a match, as one integer each
    positives = torch.unique(text_image_index * n_candidates + candidate)
    kmax = max(ks)
    _, i2t = topk_similarity(image_features, text_features[first], kmax, device=device, desc="ranking captions")
    _, t2i = topk_similarity(text_features, image_features, kmax, device=device, desc="ranking images")
    i2t_hit = torch.isin(torch.arange(len(image_features))[:, None] * n_candidates + i2t, positives)
    t2i_hit = torch.isin(t2i * n_candidates + candidate[:, None], positives)
    metrics = {}
    for k in ks:
        metrics[f"image_to_text_R@{k}"] = 100.0 * i2t_hit[:, :k].any(dim=1).float().mean().item()
    for k in ks:
        metrics[f"text_to_image_R@{k}"] = 100.0 * t2i_hit[:, :k].any(dim=1).float().mean().item()
    return metrics


def text_ids(model: nn.Module, texts: Sequence[str], batch_size: int = 1024) -> list[int]:
    """One id per distinct text as the model reads it: captions with the same token ids (after its tokenizer's
    normalisation and truncation) share an id, so their features are equal and they are one candidate."""
    ids: dict[tuple[int, ...], int] = {}
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = model.tokenizer(list(texts[start : start + batch_size]))
        for row, mask in zip(tokens["input_ids"], tokens["attention_mask"]):
            out.append(ids.setdefault(tuple(row[mask.bool()].tolist()), len(ids)))
    return out


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
    same_text = text_ids(model, texts)
    metrics = retrieval_metrics(images, text_features, text_image_index, ks, model_device(model), same_text)
    return {**metrics, "num_images": len(images), "num_texts": len(texts)}
