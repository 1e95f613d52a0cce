"""Zero-shot classification: equality with clip_benchmark, perfect and shuffled models, multi-label mAP."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipmoe.eval import evaluate_classification, load_image_folder, load_wds, zero_shot_classifier
from clipmoe.eval.clip_benchmark import eval_loader, wrap
from conftest import make_tiny_clip
from test_eval_data import (
    LookupClip,
    id_image,
    image_bytes,
    noise_image,
    write_wds,
    write_wds_classification,
)

CLASSES = ["red", "green", "blue", "cube", "sphere", "cone"]
TEMPLATES = ["a photo of a {c}", "a {c} on the left", "small {c}"]


def _lookup_model(labels: list[int], classnames, templates, image_noise: float, shuffle: bool = False, seed: int = 0):
    """Image i's feature is its class's vector + noise (``shuffle``: another class's); prompts of a class are
    its vector + a little noise."""
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(len(classnames), 24, generator=g), dim=-1)
    owner = torch.randperm(len(classnames), generator=g) if shuffle else torch.arange(len(classnames))
    images = torch.stack([centers[owner[y]] + image_noise * torch.randn(24, generator=g) for y in labels])
    texts = {
        t.format(c=c): centers[i] + 0.05 * torch.randn(24, generator=g)
        for i, c in enumerate(classnames)
        for t in templates
    }
    return LookupClip(images, texts)


def _clip_benchmark(model, data):
    from clip_benchmark.metrics import zeroshot_classification

    cb_model, transform, tokenizer = wrap(model)
    return zeroshot_classification.evaluate(
        cb_model,
        eval_loader(data, transform, batch_size=8),
        tokenizer,
        data.classnames,
        data.templates,
        "cpu",
        amp=False,
    )


@pytest.mark.parametrize("which", ["tiny_clip", "noisy_lookup", "three_classes"])
def test_classification_equals_clip_benchmark(tmp_path, which, clip_benchmark_numpy):
    classes = CLASSES[:3] if which == "three_classes" else CLASSES
    labels = [(i * 7) % len(classes) for i in range(40)]
    if which == "tiny_clip":
        model, images = make_tiny_clip(), [noise_image(i) for i in range(len(labels))]
    else:
        model = _lookup_model(labels, classes, TEMPLATES, image_noise=0.35)
        images = [id_image(i) for i in range(len(labels))]
    data = load_wds(write_wds_classification(tmp_path / "cls", images, labels, classes, TEMPLATES, shards=2))

    ours = evaluate_classification(model, data, batch_size=16)
    theirs = _clip_benchmark(model, data)
    assert (ours["num_images"], ours["num_classes"]) == (40, len(classes))
    assert ours["top1"] == pytest.approx(100 * theirs["acc1"], abs=1e-4)
    assert ours["mean_per_class_recall"] == pytest.approx(100 * theirs["mean_per_class_recall"], abs=1e-4)
    if which == "three_classes":
        assert "top5" not in ours and math.isnan(theirs["acc5"])
    else:
        assert ours["top5"] == pytest.approx(100 * theirs["acc5"], abs=1e-4)
    if which == "noisy_lookup":  # informative mid-range numbers, and recall differs from accuracy
        assert 20 < ours["top1"] < 95 and ours["top5"] > ours["top1"]


def test_classifier_is_mean_of_normalised_template_features():
    model = make_tiny_clip()
    weights = zero_shot_classifier(model, ["red", "blue"], ["a {c} cube", "a photo of {c}"])
    from clipmoe.eval import encode_texts

    red = encode_texts(model, ["a red cube", "a photo of red"]).mean(0)
    assert weights.shape == (2, model.config.projection_dim)
    assert torch.allclose(weights[0], red / red.norm(), atol=1e-6)
    assert torch.allclose(weights.norm(dim=1), torch.ones(2), atol=1e-6)


def test_perfect_model_scores_100_and_shuffled_near_chance(tmp_path):
    classes = [f"class{i}" for i in range(10)]
    labels = [i % 10 for i in range(300)]
    images = [id_image(i) for i in range(len(labels))]
    data = load_wds(write_wds_classification(tmp_path / "cls", images, labels, classes, ["a {c}"], shards=2))

    perfect = evaluate_classification(_lookup_model(labels, classes, ["a {c}"], image_noise=0.0), data)
    assert perfect["top1"] == perfect["top5"] == perfect["mean_per_class_recall"] == 100.0

    shuffled = evaluate_classification(_lookup_model(labels, classes, ["a {c}"], 0.0, shuffle=True, seed=3), data)
    assert shuffled["top1"] < 25 and shuffled["mean_per_class_recall"] < 25  # chance 10
    assert shuffled["top5"] < 80  # chance 50


def test_multilabel_mean_average_precision_equals_clip_benchmark(tmp_path):
    g = np.random.default_rng(0)
    targets = (g.random((24, 4)) < 0.4).astype(np.int64)
    targets[0] = 1  # every class has a positive
    samples = []
    for i, y in enumerate(targets):
        buf = io.BytesIO()
        np.save(buf, y)
        samples.append({"png": image_bytes(noise_image(i)), "npy": buf.getvalue()})
    meta = {
        "dataset_type.txt": "multilabel",
        "classnames.txt": "red\ngreen\nblue\ncube\n",
        "zeroshot_classification_templates.txt": "a {c}",
    }
    data = load_wds(write_wds(tmp_path / "ml", samples, shards=2, meta=meta))
    model = make_tiny_clip()
    ours = evaluate_classification(model, data, batch_size=10)
    theirs = _clip_benchmark(model, data)
    assert ours["mean_average_precision"] == pytest.approx(100 * theirs["mean_average_precision"], abs=1e-4)


def test_image_folder_classification(tmp_path):
    for i in range(6):
        path = tmp_path / ("red" if i % 2 else "blue") / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        id_image(i).save(path)
    data = load_image_folder(tmp_path, templates=["a {c}"])
    # Image i (in the red folder when odd) gets the feature of class i % 2 of ["blue", "red"].
    model = _lookup_model([0, 1, 0, 1, 0, 1], ["blue", "red"], ["a {c}"], image_noise=0.0)
    result = evaluate_classification(model, data)
    assert result == {
        "top1": 100.0,
        "mean_per_class_recall": 100.0,
        "per_class_recall/blue": 100.0,
        "per_class_recall/red": 100.0,
        "num_images": 6,
        "num_classes": 2,
    }


def test_per_class_recall_names_the_class_a_model_misses(tmp_path):
    for i in range(6):
        path = tmp_path / ("red" if i % 2 else "blue") / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        id_image(i).save(path)
    data = load_image_folder(tmp_path, templates=["a {c}"])
    # Every image looks like class 0 ("blue"): blue is always recalled, red never.
    model = _lookup_model([0, 0, 0, 0, 0, 0], ["blue", "red"], ["a {c}"], image_noise=0.0)
    result = evaluate_classification(model, data)
    assert result["per_class_recall/blue"] == 100.0 and result["per_class_recall/red"] == 0.0
    assert result["mean_per_class_recall"] == 50.0


def test_linear_probe_reads_a_linear_attribute_and_not_noise():
    from clipmoe.eval.linear_probe import linear_probe_accuracy
    from clipmoe.eval.mlp_probe import mlp_probe_accuracy

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (600,), generator=g)
    centres = torch.randn(3, 16, generator=g) * 3
    features = centres[labels] + torch.randn(600, 16, generator=g)
    acc = linear_probe_accuracy(features[:400], labels[:400], features[400:], labels[400:], 3)
    assert acc > 95
    noise = torch.randn(600, 16, generator=g)
    chance = linear_probe_accuracy(noise[:400], labels[:400], noise[400:], labels[400:], 3)
    assert chance < 50  # chance is 33%: nothing to read
    state = torch.get_rng_state()  # a probe measured during training (a curve) must not move training's RNG
    linear_probe_accuracy(features[:400], labels[:400], features[400:], labels[400:], 3)
    mlp_probe_accuracy(features[:400], labels[:400], features[400:], labels[400:], 3)
    assert torch.equal(torch.get_rng_state(), state)


def test_mlp_probe_reads_what_a_linear_probe_cannot_and_not_noise():
    from clipmoe.eval.linear_probe import linear_probe_accuracy
    from clipmoe.eval.mlp_probe import mlp_probe_accuracy

    # XOR of the signs of two feature directions: no linear boundary separates it, a small MLP does.
    g = torch.Generator().manual_seed(0)
    features = torch.randn(1200, 16, generator=g)
    labels = ((features[:, 0] > 0) ^ (features[:, 1] > 0)).long()
    split = slice(0, 1000), slice(1000, None)
    args = (features[split[0]], labels[split[0]], features[split[1]], labels[split[1]], 2)
    assert linear_probe_accuracy(*args) < 65  # chance is 50%
    assert mlp_probe_accuracy(*args) > 75
    assert mlp_probe_accuracy(*args) == mlp_probe_accuracy(*args)  # seeded: the same number every time
    noise = torch.randn(1200, 16, generator=g)
    assert mlp_probe_accuracy(noise[:1000], labels[:1000], noise[1000:], labels[1000:], 2) < 62


def test_attribute_probe_strength_on_a_world_and_a_world_too_small(tmp_path):
    import clipmoe
    from clipmoe.assets import TINY_CLIP
    from clipmoe.data.world import WorldConfig, generate_world
    from clipmoe.eval.attributes import attribute_probe_strength

    generate_world(tmp_path / "w", WorldConfig.preset("test", seed=5, eval_size=90), verbose=False)
    model = clipmoe.load(TINY_CLIP)
    result = attribute_probe_strength(model, str(tmp_path / "w"), train_sizes=(30, 60), test_size=30)
    assert set(result) == {"color", "background", "shape", "size", "position", "texture", "count"}
    assert result["color"]["chance"] == 10.0 and set(result["color"]["linear"]) == {30, 60}
    assert result["background"]["linear"][60] > 80 and result["background"]["mlp"] > 80  # the base knows it
    patches = attribute_probe_strength(model, str(tmp_path / "w"), (30, 60), 30, features="patch_mean")
    assert set(patches) == set(result) and patches["color"]["linear"] != result["color"]["linear"]
    with pytest.raises(ValueError, match=r"image features 'cls': choose one of \['embedding', 'pooled'"):
        attribute_probe_strength(model, str(tmp_path / "w"), (30, 60), 30, features="cls")
    with pytest.raises(ValueError, match=r"90 evaluation images, probes need 60 \+ 40.*--eval-size"):
        attribute_probe_strength(model, str(tmp_path / "w"), train_sizes=(60,), test_size=40)
