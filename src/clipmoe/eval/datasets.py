"""Evaluation datasets read from local disk, in the layouts CLIP_benchmark reads.

* COCO captions JSON (Karpathy splits): ``images[].file_name``, ``annotations[].image_id / caption``;
* Flickr caption files: a header line, then ``<img>.jpg,<caption>`` lines, grouped per image;
* ImageFolder for classification (class = folder name);
* the CLIP_benchmark webdataset layout: ``<root>/<split>/nshards.txt``, ``<split>/0.tar .. N-1.tar``,
  ``classnames.txt``, ``zeroshot_classification_templates.txt``, ``dataset_type.txt``.

Sample order is the one CLIP_benchmark's readers produce (torchvision's ``CocoCaptions`` sorts by image id,
``Flickr`` keeps first-appearance order, ``ImageFolder`` sorts, webdataset keeps tar order), so that
per-sample results line up with theirs. Images are not decoded here: an ``ImageRef`` names a file or a
byte range inside a tar shard and is opened only when encoded, so a 100k-image split costs little memory.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..data.webdataset import index_tar, read_member
from ..data.world import is_world
from ..utils.images import IMAGE_EXTENSIONS, is_image_file

# torchvision's ImageFolder extensions (compared lower-case).
# CLIP_benchmark's webdataset reader takes the first of these present in a sample.
# CLIP_benchmark falls back to its packaged prompts; without them the single most common CLIP prompt.
DEFAULT_TEMPLATES = ("a photo of a {c}.",)


@dataclass(frozen=True)
class ImageRef:
    """One image on disk: a whole file, or ``size`` bytes at ``offset`` inside a tar shard (``member``)."""

    path: str
    offset: int = 0
    size: int = -1  # -1: the whole file
    member: str = ""

    def read(self) -> bytes:
        """The encoded image, as stored."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read() if self.size < 0 else f.read(self.size)

    def open(self) -> Image.Image:
        data = self.read()
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except Exception as e:
            raise ValueError(f"cannot decode image {self}: {e}") from e
        return image

    def __str__(self) -> str:
        return f"{self.path}:{self.member}" if self.member else self.path


@dataclass
class RetrievalDataset:
    """Images, each with one or more captions."""

    images: list[ImageRef]
    captions: list[list[str]]
    name: str = "retrieval"

    def __post_init__(self) -> None:
        if len(self.images) != len(self.captions):
            raise ValueError(f"{self.name}: {len(self.images)} images but {len(self.captions)} caption lists")
        if not self.images:
            raise ValueError(f"{self.name}: the split is empty (no images)")
        for image, caps in zip(self.images, self.captions):
            if not caps:
                raise ValueError(f"{self.name}: image {image} has no captions")

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class ClassificationDataset:
    """Images with class labels: ``targets`` is ``[N]`` class ids, or ``[N, C]`` 0/1 for multi-label data."""

    images: list[ImageRef]
    targets: torch.Tensor
    classnames: list[str]
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    name: str = "classification"

    def __post_init__(self) -> None:
        if not self.images:
            raise ValueError(f"{self.name}: the split is empty (no images)")
        if len(self.targets) != len(self.images):
            raise ValueError(f"{self.name}: {len(self.images)} images but {len(self.targets)} labels")
        if not self.classnames:
            raise ValueError(f"{self.name}: no class names")
        empty = [i for i, c in enumerate(self.classnames) if not c.strip()]
        if empty:
            raise ValueError(f"{self.name}: class names at lines {empty[:5]} are empty")
        check_templates(self.templates, self.name)
        num_classes = len(self.classnames)
        if self.multilabel:
            if self.targets.shape[1] != num_classes:
                raise ValueError(f"{self.name}: labels have {self.targets.shape[1]} columns but {num_classes} classes")
        else:
            bad = ((self.targets < 0) | (self.targets >= num_classes)).nonzero().flatten()
            if len(bad):
                i = int(bad[0])
                raise ValueError(
                    f"{self.name}: image {self.images[i]} has label {int(self.targets[i])}, "
                    f"outside the {num_classes} class names"
                )

    @property
    def multilabel(self) -> bool:
        return self.targets.dim() == 2

    def __len__(self) -> int:
        return len(self.images)


def check_templates(templates: Sequence[str], source: str) -> None:
    """Prompt templates must each contain the ``{c}`` placeholder (CLIP_benchmark's convention)."""
    if not templates:
        raise ValueError(f"{source}: no prompt templates")
    for t in templates:
        if "{c}" not in t:
            raise ValueError(f"{source}: prompt template {t!r} has no {{c}} placeholder for the class name")


def _check_files_exist(refs: Sequence[ImageRef], source: str) -> None:
    missing = [r.path for r in refs if not os.path.isfile(r.path)]
    if missing:
        shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{source} names images that do not exist: {shown}")


def _read_lines(path: str) -> list[str]:
    """Stripped non-blank lines (a trailing blank line is not a class or a template)."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f.read().splitlines() if line.strip()]


# --- COCO and Flickr caption files -------------------------------------------------------------------


def load_coco_captions(annotation_file: str | os.PathLike, image_root: str | os.PathLike) -> RetrievalDataset:
    """A COCO captions JSON (e.g. ``coco_test_karpathy.json``) with its images under ``image_root``."""
    annotation_file = os.fspath(annotation_file)
    with open(annotation_file, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{annotation_file} is not a COCO captions JSON (needs 'images' and 'annotations')")
    files = {img["id"]: img["file_name"] for img in data["images"]}
    captions: dict[int, list[str]] = {i: [] for i in files}
    for ann in data["annotations"]:
        if ann["image_id"] not in captions:
            raise ValueError(f"{annotation_file}: a caption refers to image id {ann['image_id']}, not in 'images'")
        captions[ann["image_id"]].append(ann["caption"])
    ids = sorted(files)  # torchvision's CocoCaptions order
    refs = [ImageRef(os.path.join(os.fspath(image_root), files[i])) for i in ids]
    _check_files_exist(refs, annotation_file)
    return RetrievalDataset(refs, [captions[i] for i in ids], name=os.path.basename(annotation_file))


def load_flickr_captions(annotation_file: str | os.PathLike, image_root: str | os.PathLike) -> RetrievalDataset:
    """A Flickr caption file (``flickr30k_test_karpathy.txt``): header, then ``<img>.jpg,<caption>`` lines."""
    annotation_file = os.fspath(annotation_file)
    grouped: dict[str, list[str]] = {}
    with open(annotation_file, encoding="utf-8") as f:
        f.readline()  # header
        for lineno, line in enumerate(f, start=2):
            line = line.strip()
            if not line:
                continue
            # Split at ".jpg," as CLIP_benchmark does: captions may themselves contain commas.
            image, sep, caption = line.partition(".jpg,")
            if not sep:
                raise ValueError(f"{annotation_file}:{lineno}: expected '<image>.jpg,<caption>', got {line[:80]!r}")
            grouped.setdefault(image + ".jpg", []).append(caption)
    refs = [ImageRef(os.path.join(os.fspath(image_root), name)) for name in grouped]
    _check_files_exist(refs, annotation_file)
    return RetrievalDataset(refs, list(grouped.values()), name=os.path.basename(annotation_file))


# --- ImageFolder -------------------------------------------------------------------------------------


def load_image_folder(root: str | os.PathLike, templates: Sequence[str] | None = None) -> ClassificationDataset:
    """One folder per class, as torchvision's ``ImageFolder`` (sorted classes, sorted recursive walk).

    Class names are the folder names with ``_`` as spaces, or the lines of ``root/classnames.txt`` (one
    per class folder, in sorted folder order). Templates: ``templates``, else the lines of
    ``root/zeroshot_classification_templates.txt``, else ``DEFAULT_TEMPLATES``.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no such dataset folder: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class folders")
    refs, labels = [], []
    for label, cls in enumerate(classes):
        found = []
        for dirpath, _, fnames in sorted(os.walk(os.path.join(root, cls), followlinks=True)):
            found += [os.path.join(dirpath, n) for n in sorted(fnames) if is_image_file(n)]
        if not found:
            raise ValueError(f"class {cls!r} has no images (folder {os.path.join(root, cls)})")
        refs += [ImageRef(p) for p in found]
        labels += [label] * len(found)
    classnames = [c.replace("_", " ") for c in classes]
    names_file = os.path.join(root, "classnames.txt")
    if os.path.exists(names_file):
        classnames = _read_lines(names_file)
        if len(classnames) != len(classes):
            raise ValueError(f"{names_file} has {len(classnames)} names for {len(classes)} class folders")
    if templates is None:
        templates_file = os.path.join(root, "zeroshot_classification_templates.txt")
        templates = _read_lines(templates_file) if os.path.exists(templates_file) else DEFAULT_TEMPLATES
    return ClassificationDataset(refs, torch.tensor(labels), classnames, list(templates), name=os.path.basename(root))


# --- CLIP_benchmark webdataset layout ----------------------------------------------------------------


def wds_splits(root: str | os.PathLike) -> list[str]:
    """The splits of a CLIP_benchmark webdataset folder (sub-folders holding ``nshards.txt``)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        return []
    return sorted(
        e.name for e in os.scandir(root) if e.is_dir() and os.path.isfile(os.path.join(e.path, "nshards.txt"))
    )


def resolve_split(root: str | os.PathLike, split: str | None) -> str:
    """``split`` if given; else ``test`` when present, else the only split there is."""
    splits = wds_splits(root)
    if split is not None:
        if split not in splits:
            raise FileNotFoundError(
                f"{root} has no split {split!r} ({os.path.join(os.fspath(root), split, 'nshards.txt')} is missing); "
                f"splits found: {splits or 'none'}"
            )
        return split
    if "test" in splits:
        return "test"
    if len(splits) == 1:
        return splits[0]
    if not splits:
        raise FileNotFoundError(f"{root} is not a webdataset folder: no <split>/nshards.txt in it")
    raise ValueError(f"{root} has several splits {splits}; say which one")


def wds_dataset_type(root: str | os.PathLike) -> str:
    """``retrieval``, ``multilabel`` or ``classification`` (``dataset_type.txt`` absent)."""
    path = os.path.join(os.fspath(root), "dataset_type.txt")
    if not os.path.exists(path):
        return "classification"
    with open(path, encoding="utf-8") as f:
        return f.read().strip().lower()


def load_wds(root: str | os.PathLike, split: str | None = None) -> RetrievalDataset | ClassificationDataset:
    """A CLIP_benchmark webdataset folder: retrieval (``.txt``, one caption per line), classification
    (``.cls``) or multi-label (``.npy``) samples, each with one image (``webp``, ``png``, ``jpg``, ``jpeg``)."""
    root = os.fspath(root)
    split = resolve_split(root, split)
    dataset_type = wds_dataset_type(root)
    label_ext = {"retrieval": "txt", "multilabel": "npy", "classification": "cls"}.get(dataset_type)
    if label_ext is None:
        raise ValueError(f"{root}/dataset_type.txt says {dataset_type!r}; expected 'retrieval' or 'multilabel'")
    nshards_file = os.path.join(root, split, "nshards.txt")
    with open(nshards_file, encoding="utf-8") as f:
        text = f.read().strip()
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{nshards_file} must hold a positive shard count, got {text!r}")
    name = f"{os.path.basename(os.path.normpath(root))}/{split}"
    refs, labels = [], []
    for shard in range(int(text)):
        path = os.path.join(root, split, f"{shard}.tar")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{name}: shard {path} is missing (nshards.txt says {text})")
        with open(path, "rb") as f:
            samples = index_tar(path)
            for key, sample in samples.items():
                image_ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
                if image_ext is None or label_ext not in sample:
                    raise ValueError(
                        f"{path}: sample {key!r} needs an image ({'/'.join(IMAGE_EXTENSIONS)}) and a '.{label_ext}' "
                        f"file; it has {sorted(sample)}"
                    )
                image, label = sample[image_ext], sample[label_ext]
                refs.append(ImageRef(path, image.offset, image.size, image.name))
                labels.append(_decode_label(read_member(f, label), label_ext, f"{path}:{label.name}"))
    if not refs:
        raise ValueError(f"{name}: the split is empty (no samples in {text} shard(s))")
    if dataset_type == "retrieval":
        return RetrievalDataset(refs, labels, name=name)
    names_file = os.path.join(root, "classnames.txt")
    if not os.path.exists(names_file):
        raise FileNotFoundError(f"{name}: {names_file} is missing; zero-shot classification needs class names")
    templates_file = os.path.join(root, "zeroshot_classification_templates.txt")
    templates = _read_lines(templates_file) if os.path.exists(templates_file) else list(DEFAULT_TEMPLATES)
    targets = torch.from_numpy(np.stack(labels)) if dataset_type == "multilabel" else torch.tensor(labels)
    return ClassificationDataset(refs, targets, _read_lines(names_file), templates, name=name)


def _decode_label(raw: bytes, ext: str, where: str):
    if ext == "txt":
        return raw.decode("utf-8").splitlines()
    if ext == "cls":
        try:
            return int(raw.decode("utf-8").strip())
        except ValueError:
            raise ValueError(f"{where}: a .cls file must hold an integer class id, got {raw[:40]!r}") from None
    labels = np.load(io.BytesIO(raw), allow_pickle=False)
    if labels.ndim != 1:
        raise ValueError(f"{where}: a multi-label .npy must be a 1-D 0/1 vector, got shape {labels.shape}")
    return labels.astype(np.int64)


# --- one entry point for the CLI -----------------------------------------------------------------------


def open_eval_set(
    path: str | os.PathLike, split: str | None = None, images: str | os.PathLike | None = None
) -> RetrievalDataset | ClassificationDataset:
    """Open whichever layout ``path`` is: a webdataset folder, a COCO JSON or Flickr caption file (images
    under ``images``, default: the file's folder), a CLIP_benchmark COCO/Flickr root (``coco_<split>_karpathy.json``
    with images in ``val2014``/``train2014``; ``flickr*_<split>_karpathy.txt`` with images beside it), or an
    ImageFolder."""
    path = os.fspath(path)
    if os.path.isfile(path):
        root = os.fspath(images) if images is not None else os.path.dirname(os.path.abspath(path))
        return load_coco_captions(path, root) if path.endswith(".json") else load_flickr_captions(path, root)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no dataset at {path}")
    if is_world(path):  # not an ImageFolder whose classes are train/ and eval/
        raise ValueError(
            f"{path} is a generated world, not one evaluation set: give one of its sets ({path}/eval/retrieval_short,"
            f" {path}/eval/cls_color, ...), all of them with --task suite --data {path}/eval, or read its attributes"
            " with --task attributes"
        )
    if wds_splits(path):
        return load_wds(path, split)
    sets = sorted(n for n in os.listdir(path) if wds_splits(os.path.join(path, n)))
    if sets:  # an eval/ folder: its sets are not the classes of an ImageFolder
        raise ValueError(
            f"{path} holds evaluation sets ({', '.join(sets[:3])}{', ...' if len(sets) > 3 else ''}): give one of"
            " them, or evaluate all with --task suite"
        )
    split = split or "test"
    coco = os.path.join(path, f"coco_{split}_karpathy.json")
    if os.path.exists(coco):
        default_images = os.path.join(path, "train2014" if split == "train" else "val2014")
        return load_coco_captions(coco, images if images is not None else default_images)
    flickr = sorted(n for n in os.listdir(path) if n.startswith("flickr") and n.endswith(f"_{split}_karpathy.txt"))
    if flickr:
        return load_flickr_captions(os.path.join(path, flickr[0]), images if images is not None else path)
    return load_image_folder(path)
