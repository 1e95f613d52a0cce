"""Evaluation dataset readers (COCO, Flickr, ImageFolder, CLIP_benchmark webdataset) on files written here,
plus the writers and reference models the other ``test_eval_*`` modules share."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from clipmoe.eval.datasets import (
    ClassificationDataset,
    ImageRef,
    RetrievalDataset,
    load_coco_captions,
    load_flickr_captions,
    load_image_folder,
    load_wds,
    open_eval_set,
)

# --- shared writers --------------------------------------------------------------------------------------


def noise_image(seed: int, size: int = 32) -> Image.Image:
    """A random RGB image: distinct images give distinct features even in a random tiny CLIP."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def id_image(i: int, size: int = 8) -> Image.Image:
    """A flat image whose colour carries ``i`` < 1024 (red = 8 x (i // 32), green = 8 x (i % 32)), coarse enough
    to survive JPEG: ``LookupClip`` reads it back."""
    arr = np.zeros((size, size, 3), dtype=np.uint8)
    arr[..., 0], arr[..., 1] = 8 * (i // 32), 8 * (i % 32)
    return Image.fromarray(arr)


def image_bytes(image: Image.Image, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format={"jpg": "jpeg"}.get(fmt, fmt), **({"lossless": True} if fmt == "webp" else {}))
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_wds(root, samples: list[dict[str, bytes]], split: str = "test", shards: int = 2, meta: dict | None = None):
    """CLIP_benchmark webdataset layout: ``samples`` (``{ext: bytes}``) split in order across ``shards`` tars
    named 0.tar, 1.tar, ...; ``meta`` maps top-level file names to their text."""
    os.makedirs(os.path.join(root, split), exist_ok=True)
    per_shard = -(-len(samples) // shards) if samples else 0
    for s in range(shards):
        with tarfile.open(os.path.join(root, split, f"{s}.tar"), "w") as tar:
            for n, sample in enumerate(samples[s * per_shard : (s + 1) * per_shard], start=s * per_shard):
                for ext, data in sample.items():
                    _add(tar, f"s{n:07d}.{ext}", data)
    with open(os.path.join(root, split, "nshards.txt"), "w") as f:
        f.write(f"{shards}\n")
    for name, text in (meta or {}).items():
        with open(os.path.join(root, name), "w") as f:
            f.write(text)
    return str(root)


def write_wds_retrieval(root, images: list[Image.Image], captions: list[list[str]], fmt: str = "png", **kw) -> str:
    samples = [{fmt: image_bytes(im, fmt), "txt": "\n".join(caps).encode()} for im, caps in zip(images, captions)]
    return write_wds(root, samples, meta={"dataset_type.txt": "retrieval\n"}, **kw)


def write_wds_classification(root, images, labels, classnames, templates, **kw) -> str:
    samples = [{"webp": image_bytes(im, "webp"), "cls": str(y).encode()} for im, y in zip(images, labels)]
    meta = {
        "classnames.txt": "\n".join(classnames) + "\n",
        "zeroshot_classification_templates.txt": "\n".join(templates),
    }
    return write_wds(root, samples, meta=meta, **kw)


# --- a model with known features ---------------------------------------------------------------------


class LookupClip(nn.Module):
    """A CLIP-like model whose features are given: image i (see ``id_image``) -> ``image_features[i]``,
    text t -> ``text_features[t]``. It has the encode/tokenizer/image_processor interface of a loaded model,
    so the evaluations cannot tell it from a real one; perfect and shuffled models are built from it."""

    def __init__(self, image_features: torch.Tensor, text_features: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.register_buffer("image_table", image_features.float())
        self.vocab = {t: i for i, t in enumerate(text_features)}
        self.register_buffer("text_table", torch.stack(list(text_features.values())).float())
        self.logit_scale = nn.Parameter(torch.tensor(np.log(100.0), dtype=torch.float32))

    def image_processor(self, image: Image.Image) -> torch.Tensor:
        return torch.tensor(np.asarray(image.convert("RGB"))[0, 0, :2].astype(np.float32))

    def tokenizer(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([[self.vocab[t]] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        ids = (pixel_values[:, 0] / 8).round() * 32 + (pixel_values[:, 1] / 8).round()
        return self.image_table[ids.long()]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.text_table[input_ids[:, 0]]


# --- reader tests ----------------------------------------------------------------------------------------


def _save(path, image: Image.Image) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path)
    return str(path)


def _pixels(ref: ImageRef) -> np.ndarray:
    return np.asarray(ref.open().convert("RGB"))


def test_coco_captions_sorted_by_image_id_with_captions_in_file_order(tmp_path):
    for i in (7, 3, 5):
        _save(tmp_path / "val2014" / f"im{i}.jpg", noise_image(i))
    ann = {
        "images": [{"id": i, "file_name": f"im{i}.jpg"} for i in (7, 3, 5)],
        "annotations": [
            {"image_id": 5, "caption": "five a"},
            {"image_id": 3, "caption": "three"},
            {"image_id": 5, "caption": "five b"},
            {"image_id": 7, "caption": "seven"},
        ],
    }
    (tmp_path / "coco_test_karpathy.json").write_text(json.dumps(ann))
    ds = open_eval_set(tmp_path)  # the CLIP_benchmark root layout: images under val2014/
    assert isinstance(ds, RetrievalDataset)
    assert [os.path.basename(r.path) for r in ds.images] == ["im3.jpg", "im5.jpg", "im7.jpg"]
    assert ds.captions == [["three"], ["five a", "five b"], ["seven"]]


def test_coco_captions_naming_a_missing_image_is_an_error(tmp_path):
    _save(tmp_path / "a.png", noise_image(0))
    ann = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "gone.png"}], "annotations": []}
    (tmp_path / "c.json").write_text(json.dumps(ann))
    with pytest.raises(FileNotFoundError, match=r"gone\.png"):
        load_coco_captions(tmp_path / "c.json", tmp_path)
    ann["annotations"] = [{"image_id": 9, "caption": "x"}]
    (tmp_path / "c.json").write_text(json.dumps(ann))
    with pytest.raises(ValueError, match="image id 9"):
        load_coco_captions(tmp_path / "c.json", tmp_path)


def test_flickr_captions_grouped_per_image_and_commas_kept(tmp_path):
    for name in ("1000.jpg", "2000.jpg"):
        _save(tmp_path / name, noise_image(len(name)))
    lines = ["image,caption", "2000.jpg,a dog, running", "1000.jpg,a cat", "2000.jpg,a dog again", ""]
    (tmp_path / "flickr30k_test_karpathy.txt").write_text("\n".join(lines))
    ds = open_eval_set(tmp_path)
    assert [os.path.basename(r.path) for r in ds.images] == ["2000.jpg", "1000.jpg"]
    assert ds.captions == [["a dog, running", "a dog again"], ["a cat"]]


def test_flickr_captions_naming_a_missing_image_is_an_error(tmp_path):
    _save(tmp_path / "1.jpg", noise_image(1))
    (tmp_path / "caps.txt").write_text("image,caption\n1.jpg,one\n404.jpg,lost\n")
    with pytest.raises(FileNotFoundError, match=r"404\.jpg"):
        load_flickr_captions(tmp_path / "caps.txt", tmp_path)
    (tmp_path / "bad.txt").write_text("image,caption\nno image here\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2"):
        load_flickr_captions(tmp_path / "bad.txt", tmp_path)


def test_image_folder_order_names_and_templates(tmp_path):
    _save(tmp_path / "red_cube" / "b.png", noise_image(1))
    _save(tmp_path / "red_cube" / "a.jpg", noise_image(2))
    _save(tmp_path / "blue" / "sub" / "z.png", noise_image(3))
    (tmp_path / "blue" / "notes.txt").write_text("not an image")
    ds = load_image_folder(tmp_path)
    assert ds.classnames == ["blue", "red cube"]
    assert [os.path.relpath(r.path, tmp_path) for r in ds.images] == [
        "blue/sub/z.png",
        "red_cube/a.jpg",
        "red_cube/b.png",
    ]
    assert ds.targets.tolist() == [0, 1, 1]
    assert ds.templates == ["a photo of a {c}."]
    (tmp_path / "zeroshot_classification_templates.txt").write_text("a {c}\nan image of {c}\n")
    assert load_image_folder(tmp_path).templates == ["a {c}", "an image of {c}"]


def test_image_folder_class_without_images_is_an_error(tmp_path):
    _save(tmp_path / "cat" / "1.png", noise_image(1))
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match="class 'dog' has no images"):
        load_image_folder(tmp_path)


def test_template_without_placeholder_is_an_error(tmp_path):
    _save(tmp_path / "cat" / "1.png", noise_image(1))
    with pytest.raises(ValueError, match=r"has no \{c\} placeholder"):
        load_image_folder(tmp_path, templates=["a photo of a cat"])


@pytest.mark.parametrize("fmt", ["png", "webp", "jpg"])
def test_wds_retrieval_reads_images_and_captions_in_shard_order(tmp_path, fmt):
    images = [noise_image(i, 8) for i in range(5)]
    captions = [[f"caption {i} a", f"caption {i} b"][: 1 + i % 2] for i in range(5)]
    root = write_wds_retrieval(tmp_path / "ret", images, captions, fmt=fmt, shards=2)
    ds = load_wds(root)
    assert isinstance(ds, RetrievalDataset)
    assert ds.captions == captions
    assert [os.path.basename(r.path) for r in ds.images] == ["0.tar"] * 3 + ["1.tar"] * 2
    for ref, im in zip(ds.images, images):
        written = Image.open(io.BytesIO(image_bytes(im, fmt))).convert("RGB")  # jpeg is lossy: compare decoded
        assert np.array_equal(_pixels(ref), np.asarray(written))
        if fmt != "jpg":
            assert np.array_equal(_pixels(ref), np.asarray(im))


def test_wds_classification_and_multilabel(tmp_path):
    images = [noise_image(i, 8) for i in range(4)]
    root = write_wds_classification(tmp_path / "cls", images, [2, 0, 1, 2], ["red", "green", "blue"], ["a {c} thing"])
    ds = load_wds(root)
    assert isinstance(ds, ClassificationDataset) and not ds.multilabel
    assert ds.targets.tolist() == [2, 0, 1, 2]
    assert (ds.classnames, ds.templates) == (["red", "green", "blue"], ["a {c} thing"])
    assert np.array_equal(_pixels(ds.images[3]), np.asarray(images[3]))

    labels = np.array([[1, 0, 1], [0, 1, 0]])
    samples = []
    for im, y in zip(images, labels):
        buf = io.BytesIO()
        np.save(buf, y)
        samples.append({"png": image_bytes(im), "npy": buf.getvalue()})
    meta = {"dataset_type.txt": "multilabel", "classnames.txt": "a\nb\nc\n"}
    ml = load_wds(write_wds(tmp_path / "ml", samples, shards=1, meta=meta))
    assert ml.multilabel and ml.targets.tolist() == labels.tolist()


def test_wds_bad_input_errors(tmp_path):
    empty = write_wds(tmp_path / "empty", [], shards=1, meta={"dataset_type.txt": "retrieval"})
    with pytest.raises(ValueError, match="the split is empty"):
        load_wds(empty)
    with pytest.raises(FileNotFoundError, match="no split 'train'"):
        load_wds(empty, split="train")
    no_label = write_wds(tmp_path / "nolabel", [{"png": image_bytes(noise_image(0, 8))}], shards=1)
    with pytest.raises(ValueError, match=r"s0000000.*needs an image .* and a '\.cls' file"):
        load_wds(no_label)
    root = write_wds_classification(tmp_path / "range", [noise_image(0, 8)], [5], ["a", "b"], ["{c}"], shards=1)
    with pytest.raises(ValueError, match="label 5, outside the 2 class names"):
        load_wds(root)
    os.remove(os.path.join(root, "test", "0.tar"))
    with pytest.raises(FileNotFoundError, match=r"0\.tar is missing"):
        load_wds(root)
    no_caps = write_wds_retrieval(tmp_path / "nocaps", [noise_image(0, 8)], [[]], shards=1)
    with pytest.raises(ValueError, match="has no captions"):
        load_wds(no_caps)
    with tarfile.open(os.path.join(no_caps, "test", "0.tar"), "w:gz") as tar:  # compressed: offsets meaningless
        _add(tar, "s0000000.txt", b"a caption")
    with pytest.raises(ValueError, match="not a readable uncompressed tar"):
        load_wds(no_caps)
