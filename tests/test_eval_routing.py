"""Routing analysis on a sparse-upcycled tiny CLIP-MoE: statistics checked against a direct recount."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import clipmoe
from clipmoe.eval import analyze_routing, plot_routing
from clipmoe.eval.features import encode_images, encode_texts
from conftest import make_tiny_clip
from test_eval_data import noise_image

TEXTS = ["red", "a small green cone on the left", "blue sphere", "a photo of a large red cube on the right", "cone"]
IMAGE_COLORS = ["red", "red", "blue", "green", "blue", "red", "green"]


@pytest.fixture(scope="module")
def moe():
    return clipmoe.sparse_upcycle(make_tiny_clip(), num_experts=4, top_k=2, noise=0.2, seed=1)


@pytest.fixture(scope="module")
def result(moe):
    images = [noise_image(i) for i in range(len(IMAGE_COLORS))]
    return analyze_routing(
        moe,
        images,
        TEXTS,
        image_labels={"color": IMAGE_COLORS},
        text_labels=["short", "long", "short", "long", "short"],
        batch_size=3,
    )


def _recount(moe, tower: str, mask: torch.Tensor | None) -> list[np.ndarray]:
    """Slots per expert of each MoE layer from the last forward (one batch holding every input)."""
    counts = []
    for logits in moe.router_logits(tower):
        if mask is not None:
            logits = logits[mask.reshape(-1).bool()]
        chosen = logits.softmax(-1).topk(2, dim=-1).indices
        counts.append(np.bincount(chosen.flatten().numpy(), minlength=4))
    return counts


def test_load_matches_a_direct_recount_without_padding(moe, result):
    images = [noise_image(i) for i in range(len(IMAGE_COLORS))]
    encode_images(moe, images, batch_size=len(images))
    image_counts = _recount(moe, "vision", None)
    tokens = moe.tokenizer(TEXTS)
    encode_texts(moe, TEXTS, batch_size=len(TEXTS))
    text_counts = _recount(moe, "text", tokens["attention_mask"])

    assert result["num_experts"] == 4 and result["top_k"] == 2
    image, text = result["image"], result["text"]
    assert image["layers"] == text["layers"] == [0, 1]
    assert image["tokens"] == len(IMAGE_COLORS) * 17  # 4 x 4 patches + CLS per 32 px image
    assert text["tokens"] == int(tokens["attention_mask"].sum())  # padding dropped
    for stats, counts in ((image, image_counts), (text, text_counts)):
        for layer, load in enumerate(stats["load"]):
            np.testing.assert_allclose(load, counts[layer] / (stats["tokens"] * 2), atol=1e-9)
            assert sum(load) == pytest.approx(1.0)


def test_entropy_and_coselection(result):
    for stats in (result["image"], result["text"]):
        assert stats["max_entropy"] == pytest.approx(math.log(4))
        assert all(0 < h <= math.log(4) for h in stats["entropy"])
        for layer, co in enumerate(stats["coselection"]):
            co = np.asarray(co)
            np.testing.assert_allclose(co, co.T)
            np.testing.assert_allclose(np.diag(co), 2 * np.asarray(stats["load"][layer]))  # chose e, of 2 slots
            # every token picks exactly one pair of distinct experts
            assert (co.sum() - np.trace(co)) / 2 == pytest.approx(1.0)


def test_group_loads(result):
    colors = result["image"]["groups"]["color"]
    assert colors["names"] == ["blue", "green", "red"]
    assert colors["tokens"] == [2 * 17, 2 * 17, 3 * 17]
    for layer in range(2):
        np.testing.assert_allclose(np.sum(colors["load"][layer], axis=1), 1.0)
        shares = np.asarray(colors["expert_share"][layer])
        used = np.asarray(result["image"]["load"][layer]) > 0
        np.testing.assert_allclose(shares[used].sum(axis=1), 1.0)
        # group loads, weighted by group tokens, add back up to the overall load
        weighted = np.asarray(colors["tokens"]) @ np.asarray(colors["load"][layer]) / result["image"]["tokens"]
        np.testing.assert_allclose(weighted, result["image"]["load"][layer], atol=1e-9)
    assert result["text"]["groups"]["label"]["names"] == ["long", "short"]


def test_plot_routing_writes_one_page_width_png_per_tower(result, tmp_path):
    out = tmp_path / "figs" / "routing.png"
    paths = plot_routing(result, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["routing_text.png", "routing_vision.png"]  # no temporaries
    for path in paths:
        with Image.open(path) as im:
            assert im.format == "PNG" and 1200 <= im.width <= 1600 and im.height <= 1.2 * im.width


def test_dense_model_and_bad_labels_are_errors(moe):
    with pytest.raises(ValueError, match="no MoE layers"):
        analyze_routing(make_tiny_clip(), texts=["red"])
    with pytest.raises(ValueError, match="2 labels for 1 samples"):
        analyze_routing(moe, texts=["red"], text_labels={"x": ["a", "b"]})
