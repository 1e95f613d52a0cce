"""CLIP_benchmark interop: a ``clipmoe`` model type for its registry and CLI, and its metrics on our datasets.

CLIP_benchmark (pip ``clip-benchmark``) loads models through ``clip_benchmark.models.load_clip(model_type,
model_name, pretrained, cache_dir, device)``, which looks ``model_type`` up in ``TYPE2FUNC``; a loader returns
``(model, transform, tokenizer)``. ``register()`` adds ``clipmoe`` there: ``pretrained`` is anything
``clipmoe.load`` opens, ``model_name`` is only the label its CLI writes into result file names. The model's
``encode_image`` / ``encode_text`` return projected features *unnormalised*, as open_clip's do: CLIP_benchmark
normalises them itself (and its linear probe only under ``--normalize``).

CLIP_benchmark is optional and imported only when used. Two limits of clip-benchmark 1.6.2, found here:

* ``clip_benchmark.models`` imports ``open_clip`` at module level and ``clip_benchmark.cli`` also imports
  ``torchvision`` (its dataset builder), ``pycocoevalcap`` and ``requests``; without them ``register()`` and ``main()`` fail
  with one line naming the missing package. Its metric modules (``zeroshot_classification``,
  ``zeroshot_retrieval``) need only torch, tqdm and scikit-learn: with ``eval_loader`` over a dataset
  ``clipmoe eval`` reads (``clipmoe.eval.open_eval_set``) they run without open_clip or torchvision.
* its top-k accuracy calls ``float()`` on a 1-element array, a TypeError from numpy 2.4 on (a warning in
  1.25-2.3): ``check_numpy()`` says so before a run instead of after the whole dataset is encoded.

``python -m clipmoe.eval.clip_benchmark eval --pretrained MODEL --dataset ...`` (or ``clipmoe-benchmark``)
registers the type and runs CLIP_benchmark's own CLI, with ``--model_type clipmoe`` unless given.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..formats.load import load
from .datasets import ClassificationDataset, RetrievalDataset

MODEL_TYPE = "clipmoe"
EXTRA = "pip install 'clipmoe[clip-benchmark]'"
# A missing module whose pip package has another name (torchvision, pycocoevalcap, webdataset: the same name).
_PIP_NAMES = {"open_clip": "open_clip_torch", "sklearn": "scikit-learn"}


class ClipBenchmarkModel(nn.Module):
    """A clipmoe model (or anything with its ``encode_image(pixels)`` / ``encode_text(ids, mask)``) under
    CLIP_benchmark's calls: ``encode_image(images)`` and ``encode_text(tokenizer(texts).to(device))``.
    Images are cast to the weights' dtype, so a half-precision model takes the fp32 transform's output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        weight = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        if weight is not None and images.is_floating_point():
            images = images.to(weight.dtype)
        return self.model.encode_image(images)

    def encode_text(self, tokens) -> torch.Tensor:
        return self.model.encode_text(tokens["input_ids"], tokens["attention_mask"])


class ClipBenchmarkTokenizer:
    """The model's tokenizer returning a ``BatchEncoding``: a dict with ``.to(device)``, as CLIP_benchmark needs."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, texts: Sequence[str]):
        from transformers import BatchEncoding

        return BatchEncoding(self.tokenizer(list(texts)))


def wrap(model: nn.Module) -> tuple[ClipBenchmarkModel, object, ClipBenchmarkTokenizer]:
    """``(model, transform, tokenizer)`` as a CLIP_benchmark loader returns them, from a loaded model."""
    for attr in ("tokenizer", "image_processor"):
        if getattr(model, attr, None) is None:
            raise ValueError(f"the model has no {attr}; load it with clipmoe.load from a folder that has one")
    return ClipBenchmarkModel(model).eval(), model.image_processor, ClipBenchmarkTokenizer(model.tokenizer)


def load_clipmoe(
    model_name: str = MODEL_TYPE,
    pretrained: str = "",
    cache_dir: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[ClipBenchmarkModel, object, ClipBenchmarkTokenizer]:
    """CLIP_benchmark's loader for ``model_type="clipmoe"``: ``pretrained`` is what ``clipmoe.load`` opens;
    ``model_name`` only labels results. Hub ids use the Hugging Face cache (``HF_HOME``), so a
    ``cache_dir`` (``--model_cache_dir``) is refused rather than ignored."""
    if not pretrained:
        raise ValueError("the clipmoe model type needs --pretrained: a model folder, checkpoint file or hub id")
    if cache_dir is not None:
        raise ValueError(
            f"the clipmoe model type reads hub models from the Hugging Face cache (set HF_HOME), not from "
            f"--model_cache_dir {cache_dir}"
        )
    return wrap(load(pretrained, device=device))


class _Samples(Dataset):
    """A dataset ``clipmoe eval`` reads, yielding what CLIP_benchmark's readers yield: ``(image tensor,
    captions list)`` for retrieval, ``(image tensor, label)`` for classification (``classes`` as theirs)."""

    def __init__(self, dataset: RetrievalDataset | ClassificationDataset, transform) -> None:
        self.dataset, self.transform = dataset, transform
        self.classes = getattr(dataset, "classnames", None)
        self.templates = getattr(dataset, "templates", None)

    def __len__(self) -> int:
        return len(self.dataset.images)

    def __getitem__(self, i: int):
        labels = self.dataset.captions if isinstance(self.dataset, RetrievalDataset) else self.dataset.targets
        return self.transform(self.dataset.images[i].open()), labels[i]


def _image_captions_collate(batch):
    """CLIP_benchmark's ``image_captions_collate_fn``: stacked images, caption lists kept as lists."""
    return torch.stack([image for image, _ in batch]), [captions for _, captions in batch]


def eval_loader(
    dataset: RetrievalDataset | ClassificationDataset, transform, batch_size: int = 64, num_workers: int = 0
) -> DataLoader:
    """A DataLoader over ``dataset`` (from ``clipmoe.eval.open_eval_set``), in order, for CLIP_benchmark's
    ``zeroshot_retrieval.evaluate`` / ``zeroshot_classification.evaluate``; ``dataset.classnames`` and
    ``.templates`` are the classification arguments."""
    retrieval = isinstance(dataset, RetrievalDataset)
    return DataLoader(
        _Samples(dataset, transform),
        batch_size,
        num_workers=num_workers,
        collate_fn=_image_captions_collate if retrieval else None,
    )


def _import_error(what: str, e: BaseException) -> ImportError:
    """One line: which package is missing and how to install it, or why it does not import."""
    missing = e.name.split(".")[0] if isinstance(e, ModuleNotFoundError) and e.name else None
    if missing == "clip_benchmark":
        return ImportError(f"CLIP_benchmark is not installed ({EXTRA})")
    if missing is not None:
        return ImportError(
            f"{what} needs {missing}, which is not installed (pip install {_PIP_NAMES.get(missing, missing)})"
        )
    return ImportError(f"{what} does not import here: {type(e).__name__}: {e}")


def register() -> None:
    """Add the ``clipmoe`` model type to CLIP_benchmark's registry (idempotent): ``load_clip("clipmoe", ...)``
    and the CLI's ``--model_type clipmoe`` then open clipmoe models."""
    try:
        import clip_benchmark.models as registry
    except Exception as e:  # not only ImportError: a broken dependency (torchvision built for another torch)
        raise _import_error("CLIP_benchmark's model registry (clip_benchmark.models)", e) from e
    registry.TYPE2FUNC[MODEL_TYPE] = load_clipmoe
    # load_clip and the CLI's --model_type choices read this list (bound at import), not TYPE2FUNC.
    if MODEL_TYPE not in registry.MODEL_TYPES:
        registry.MODEL_TYPES.append(MODEL_TYPE)


def check_numpy() -> None:
    """Raise, in one line, if CLIP_benchmark's top-k accuracy fails under the installed numpy."""
    import numpy as np
    from clip_benchmark.metrics import zeroshot_classification

    try:
        zeroshot_classification.accuracy(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long))
    except TypeError as e:
        raise RuntimeError(
            f"CLIP_benchmark's zero-shot accuracy fails under numpy {np.__version__} ({e}); "
            f"install numpy<2.4 ({EXTRA} pins it)"
        ) from None


def _with_model_type(argv: list[str]) -> list[str]:
    if argv[:1] == ["eval"] and not any(a.startswith("--model_type") for a in argv):
        return [*argv, "--model_type", MODEL_TYPE]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    """CLIP_benchmark's CLI with the ``clipmoe`` model type registered (the default ``--model_type``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        register()
        try:
            from clip_benchmark import cli
        except Exception as e:
            raise _import_error("CLIP_benchmark's CLI (clip_benchmark.cli)", e) from e
        check_numpy()
    except (ImportError, RuntimeError) as e:
        print(f"clipmoe-benchmark: error: {e}", file=sys.stderr)
        return 2
    saved, sys.argv = sys.argv, ["clip_benchmark", *_with_model_type(argv)]  # its main() parses sys.argv
    try:
        cli.main()
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
