"""Batched feature extraction and chunked nearest-neighbour search, shared by every evaluation.

Any model with ``encode_image(pixel_values)``, ``encode_text(input_ids, attention_mask)``, a ``tokenizer``
(list of str -> ``{input_ids, attention_mask}``) and an ``image_processor`` (PIL -> ``[3, H, W]``) works:
a ``ClipMoeModel`` from ``clipmoe.load``, dense or MoE. Features come back L2-normalised, fp32, on the CPU,
so each dataset is encoded once and every metric reuses them.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data.processing import ImageRejected
from ..utils import interrupt
from .datasets import ImageRef

# Called after each batch's forward pass with the batch's sample indices and, for text, its attention mask;
# routing analysis reads the MoE layers' router logits there.
BatchHook = Callable[[range, "torch.Tensor | None"], None]

# Similarity blocks are at most QUERY_CHUNK x KEY_CHUNK (64 Mi fp32 = 256 MiB), whatever the dataset size.
QUERY_CHUNK = 1024
KEY_CHUNK = 65536


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _param_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def warn_if_batch_dependent(model: nn.Module) -> None:
    """A MoE that drops tokens at inference too is evaluated as it is, with a warning: its results hold for the
    batch size and order they were measured with. Called once per encoding, not per batch."""
    dropping = [m.capacity_factor for m in getattr(model, "moe_layers", list)() if m.capacity_at_inference]
    if any(f > 0 for f in dropping):
        warnings.warn(
            f"this model drops tokens at inference (capacity_at_inference, capacity_factor {max(dropping)}): each "
            "input's features depend on the other inputs of its batch, so these results hold for this batch size "
            "and order only",
            stacklevel=3,
        )


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """``model`` in eval mode (dropout and expert dropout off) inside, the caller's mode given back after."""
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)


class _Runner:
    """Where and in which precision the model runs: the model is moved to ``device`` (default: where it
    is); ``dtype`` None computes in the weights' own dtype (fp32 for a model loaded without one), a lower
    precision than the weights runs under autocast. Every batch runs in eval mode: a model left in training
    mode (expert dropout on) would give other features at each call."""

    def __init__(self, model: nn.Module, device: str | torch.device | None, dtype: torch.dtype | None) -> None:
        self.model = model
        warn_if_batch_dependent(model)
        self.device = torch.device(device) if device is not None else model_device(model)
        model.to(self.device)
        self.input_dtype = _param_dtype(model)
        dtype = dtype or self.input_dtype
        if dtype.itemsize > self.input_dtype.itemsize:
            raise ValueError(f"the model's weights are {self.input_dtype}; load it in {dtype} to evaluate in {dtype}")
        self.autocast = dtype != self.input_dtype
        self.dtype = dtype

    @contextlib.contextmanager
    def context(self):
        """One batch: in eval mode (dropout, expert dropout off; the caller's mode restored after), under
        autocast where the evaluation dtype is below the weights'."""
        autocast = torch.autocast(self.device.type, dtype=self.dtype) if self.autocast else contextlib.nullcontext()
        with eval_mode(self.model), autocast:
            yield


class _ImageDataset(Dataset):
    def __init__(self, images: Sequence[ImageRef | Image.Image | str], transform) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.images[i]
        if isinstance(item, str):
            item = ImageRef(item)
        image = item.open() if isinstance(item, ImageRef) else item
        try:
            return self.transform(image)
        except ImageRejected as e:  # an eval set is used whole: stop, naming the image
            raise ImageRejected(f"{item if isinstance(item, ImageRef) else f'image {i}'}: {e}") from None


def _require(model: nn.Module, attr: str) -> None:
    if getattr(model, attr, None) is None:
        raise ValueError(
            f"the model has no {attr}; load it with clipmoe.load from a folder that has its "
            f"{'tokenizer files' if attr == 'tokenizer' else 'preprocessor_config.json'}"
        )


@torch.no_grad()
def encode_images(
    model: nn.Module,
    images: Sequence[ImageRef | Image.Image | str],
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    num_workers: int = 0,
    on_batch: BatchHook | None = None,
    desc: str = "images",
) -> torch.Tensor:
    """L2-normalised fp32 image features ``[N, D]`` (CPU). ``num_workers`` > 0 decodes in worker processes."""
    _require(model, "image_processor")
    run = _Runner(model, device, dtype)
    loader = DataLoader(_ImageDataset(images, model.image_processor), batch_size=batch_size, num_workers=num_workers)
    out, start = [], 0
    for pixels in tqdm(loader, desc=f"encoding {desc}", unit="batch", leave=False):
        interrupt.check()
        with run.context():
            features = model.encode_image(pixels.to(run.device, run.input_dtype))
        if on_batch is not None:
            on_batch(range(start, start + len(pixels)), None)
        out.append(F.normalize(features.float(), dim=-1).cpu())
        start += len(pixels)
    return torch.cat(out) if out else torch.empty(0, 0)


def dataset_image_features(
    model: nn.Module,
    images: Sequence[ImageRef],
    name: str,
    image_features: torch.Tensor | None,
    image_hook: BatchHook | None,
    num_workers: int = 0,
    **kw,
) -> torch.Tensor:
    """An evaluation set's image features: ``image_features`` when the caller already encoded the set's images
    with this model (checked against the set's size), else ``encode_images`` with ``image_hook``."""
    if image_features is None:
        return encode_images(model, images, num_workers=num_workers, on_batch=image_hook, desc=name, **kw)
    if image_hook is not None:
        raise ValueError(f"{name}: image_hook runs while images are encoded; with image_features none are")
    if len(image_features) != len(images):
        raise ValueError(f"{name}: {len(image_features)} image features for {len(images)} images")
    return image_features


@torch.no_grad()
def encode_texts(
    model: nn.Module,
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    on_batch: BatchHook | None = None,
    desc: str = "texts",
) -> torch.Tensor:
    """L2-normalised fp32 text features ``[N, D]`` (CPU), tokenised by the model's own tokenizer."""
    _require(model, "tokenizer")
    run = _Runner(model, device, dtype)
    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc=f"encoding {desc}", unit="batch", leave=False):
        interrupt.check()
        chunk = list(texts[start : start + batch_size])
        tokens = model.tokenizer(chunk)
        mask = tokens["attention_mask"].to(run.device)
        with run.context():
            features = model.encode_text(tokens["input_ids"].to(run.device), mask)
        if on_batch is not None:
            on_batch(range(start, start + len(chunk)), mask)
        out.append(F.normalize(features.float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


@torch.no_grad()
def topk_similarity(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    *,
    device: str | torch.device = "cpu",
    query_chunk: int = QUERY_CHUNK,
    key_chunk: int = KEY_CHUNK,
    desc: str = "ranking",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` inner products of every query against all keys: ``(scores, indices)``, each ``[Nq, k]``,
    best first; ``k`` is capped at the number of keys.

    The full ``Nq x Nk`` matrix is never built: each block of queries walks over blocks of keys and keeps a
    running top-k, so memory is ``O(query_chunk x key_chunk)`` for any dataset size (100k images x 500k
    captions included).
    """
    k = min(k, len(keys))
    all_scores, all_indices = [], []
    for qs in tqdm(range(0, len(queries), query_chunk), desc=desc, unit="chunk", leave=False):
        q = queries[qs : qs + query_chunk].to(device)
        best_s = torch.empty(len(q), 0, device=device)
        best_i = torch.empty(len(q), 0, dtype=torch.long, device=device)
        for ks in range(0, len(keys), key_chunk):
            block = q @ keys[ks : ks + key_chunk].to(device).T
            s, i = block.topk(min(k, block.shape[1]), dim=1)
            merged = torch.cat([best_s, s], dim=1)
            best_s, order = merged.topk(min(k, merged.shape[1]), dim=1)
            best_i = torch.cat([best_i, i + ks], dim=1).gather(1, order)
        all_scores.append(best_s.cpu())
        all_indices.append(best_i.cpu())
    return torch.cat(all_scores), torch.cat(all_indices)
