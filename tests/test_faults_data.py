"""Hostile data files (issue #17): image bombs, duplicate and dotted tar keys, non-UTF-8 rows, weights."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from clipmoe import processing
from clipmoe.data import ClipCollator, open_dataset
from clipmoe.processing import ImageTransform, TextTokenizer, build_word_tokenizer
from conftest import WORDS


def png(width: int, height: int, value: int = 128) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer(build_word_tokenizer(WORDS, 16), 16)


# ---- item 5: image bombs -------------------------------------------------------------------------------


def test_extreme_aspect_png_is_skipped_with_reason_before_any_resize(tmp_path, tokenizer):
    """A ~100-byte 1x4000 PNG would be resized to 32x128000 (224x896000 at 224 px); it is a counted skip."""
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(png(40, 30, 10 * i))
        (tmp_path / f"{i}.txt").write_text("a red cube")
    (tmp_path / "strip.png").write_bytes(png(1, 4000))
    (tmp_path / "strip.txt").write_text("a red cube")
    assert (tmp_path / "strip.png").stat().st_size < 200
    ds = open_dataset(tmp_path, max_skipped_fraction=0.5)
    batch = ClipCollator(tokenizer, ImageTransform(size=32, crop_size=32))([ds[i] for i in range(len(ds))])
    keys = [ds.records[i].key for i in batch["index"].tolist()]
    assert batch["valid"].tolist() == [k != "strip" for k in keys]
    assert batch["pixel_values"].shape == (5, 3, 32, 32)
    assert ds.record_skipped(batch) == 1
    (entry,) = ds.skips.entries
    assert entry.key == "strip" and entry.category == "extreme aspect ratio"
    assert "1x4000" in entry.reason and "max_aspect_ratio 20" in entry.reason
    assert "extreme aspect ratio 1" in ds.end_pass(tmp_path / "skips.tsv")


def test_default_transform_refuses_the_224px_blow_up_and_caps_are_configurable():
    strip = Image.open(io.BytesIO(png(1, 4000)))
    with pytest.raises(
        processing.ImageRejected, match=r"extreme aspect ratio: 1x4000 \(4000.0:1 > max_aspect_ratio 20\)"
    ):
        ImageTransform()(strip)  # checked on the header: nothing decoded or resized
    big = Image.new("RGB", (300, 200))
    with pytest.raises(processing.ImageRejected, match="image too large: 300x200 = 60000 pixels > max_pixels 50000"):
        ImageTransform(size=32, crop_size=32, max_pixels=50_000)(big)
    assert ImageTransform(size=32, crop_size=32, max_aspect_ratio=None)(Image.new("RGB", (1, 100))).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="max_aspect_ratio must be >= 1"):
        ImageTransform(max_aspect_ratio=0.5)


def test_pixel_cap_skips_before_decoding(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(png(20, 20 + 20 * i))
        (tmp_path / f"{i}.txt").write_text("a red cube")
    ds = open_dataset(tmp_path, max_skipped_fraction=1.0, max_pixels=500)
    samples = [ds[i] for i in range(3)]
    assert samples[0].image is not None
    assert [s.error for s in samples[1:]] == [
        "image too large: 20x40 = 800 pixels > max_pixels 500",
        "image too large: 20x60 = 1200 pixels > max_pixels 500",
    ]


def _numpy_peak(fn) -> int:
    """Peak bytes numpy (and Python) allocate while ``fn`` runs; PIL's own buffers are not traced."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_crop_happens_before_float_conversion():
    """The float image is never larger than the crop, however long the (allowed) image is."""
    transform = ImageTransform(size=64, crop_size=64)
    square, long = Image.new("RGB", (64, 64), (9, 99, 199)), Image.new("RGB", (64, 1200), (9, 99, 199))
    assert torch.equal(transform(square), transform(long))  # uniform colour: same crop
    crop_float = 3 * 64 * 64 * 4
    peak_square, peak_long = _numpy_peak(lambda: transform(square)), _numpy_peak(lambda: transform(long))
    assert peak_long < 1.5 * peak_square + 4096, (peak_square, peak_long)
    assert peak_long < 6 * crop_float  # the old path held a 64x1200 float image: 15 crops' worth
