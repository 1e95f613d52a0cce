"""MMVP-VLM reading and scoring (both image-folder names, the authors' rules) and attribute probes."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from clipmoe.eval import evaluate_mmvp, evaluate_probes, load_mmvp, load_probes
from clipmoe.eval.mmvp import pair_choices
from conftest import make_tiny_clip
from test_eval_data import LookupClip, id_image, noise_image

# (pattern, pair ok?) for 4 pairs: pattern "Orientation" 2/2 pairs right, "Color" 1/2.
PAIRS = [("Orientation", True), ("Orientation", True), ("Color", True), ("Color", False)]


def write_mmvp(root, folder: str, pairs=PAIRS, header=("Question ID", "Type", "Statement")) -> tuple[str, LookupClip]:
    """An MMVP-VLM folder whose images are ``id_image(qid)``, and a model that gets exactly the pairs marked
    ok right (in a wrong pair, both statements point at image 1)."""
    features, texts, rows = torch.eye(2 * len(pairs) + 1), {}, []
    for p, (pattern, ok) in enumerate(pairs):
        q1, q2 = 2 * p + 1, 2 * p + 2
        for q in (q1, q2):
            path = root / folder / pattern / f"{q}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            id_image(q).save(path)
        rows += [(q1, pattern, f"statement {q1}"), (q2, pattern, f"statement {q2}")]
        texts[f"a photo of statement {q1}"] = features[q1]
        texts[f"a photo of statement {q2}"] = features[q2] if ok else features[q1]
    with open(root / "Questions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(root), LookupClip(features, texts)


@pytest.mark.parametrize("folder", ["MMVP_VLM_Images", "MLLM_VLM Images"])
def test_mmvp_scores_per_pattern_with_both_folder_names(tmp_path, folder):
    root, model = write_mmvp(tmp_path, folder)
    pairs = load_mmvp(root)
    assert [p.qids for p in pairs] == [("1", "2"), ("3", "4"), ("5", "6"), ("7", "8")]
    assert pairs[2].images[1].path.endswith(f"{folder}/Color/6.jpg")
    result = evaluate_mmvp(model, root)
    assert result == {"mean": 75.0, "num_pairs": 4, "pattern/Orientation": 100.0, "pattern/Color": 50.0}


def test_mmvp_reads_columns_by_position_without_named_header(tmp_path):
    root, model = write_mmvp(tmp_path, "MMVP_VLM_Images", header=("qid", "kind", "text"))
    assert evaluate_mmvp(model, root)["mean"] == 75.0


def test_mmvp_pair_rule_tie_goes_to_image_2():
    images = torch.tensor([[[1.0, 0], [0, 1]], [[1.0, 0], [1.0, 0]]])  # pair 2: identical images (a tie)
    texts = torch.tensor([[[1.0, 0], [0, 1]], [[1.0, 0], [1.0, 0]]])
    assert pair_choices(images, texts, 100.0).tolist() == [[0, 1], [1, 1]]


def test_mmvp_on_a_real_tiny_clip_runs_end_to_end(tmp_path):
    root, _ = write_mmvp(tmp_path, "MMVP_VLM_Images")
    result = evaluate_mmvp(make_tiny_clip(), root)
    assert set(result) == {"mean", "num_pairs", "pattern/Orientation", "pattern/Color"}
    assert all(v in (0.0, 50.0, 100.0) for k, v in result.items() if k.startswith("pattern/"))


def test_mmvp_bad_input(tmp_path):
    root, _ = write_mmvp(tmp_path / "a", "MMVP_VLM_Images")
    (tmp_path / "a" / "MMVP_VLM_Images" / "Color" / "6.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"Color/6\.jpg"):
        load_mmvp(root)
    root, _ = write_mmvp(tmp_path / "b", "MMVP_VLM_Images")
    with open(tmp_path / "b" / "Questions.csv", "a") as f:
        f.write("9,Color,a lone statement\n")
    with pytest.raises(ValueError, match="come in pairs"):
        load_mmvp(root)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "Questions.csv").write_text("Question ID,Type,Statement\n")
    with pytest.raises(FileNotFoundError, match="no image folder"):
        load_mmvp(tmp_path / "c")


def write_probes(root) -> tuple[str, LookupClip]:
    """Probes for 'color' (pairs: 1 of 2 right; swaps: 2 of 2) and 'count' (swaps: 0 of 1), with a model
    whose features make exactly those right."""
    (root / "img").mkdir(parents=True)
    for i in range(6):
        id_image(i).save(root / "img" / f"{i}.png")
    e = torch.eye(6)
    texts = {
        "red cube": e[0],
        "blue cube": e[1],
        "red ball": e[2],
        "blue ball": e[2],  # both captions of pair 2 point at image 2: the pair fails
        "one red cube": e[0],
        "one blue cube": e[1],
        "two cones": e[5],
        "three cones": e[4],
    }
    probes = [
        {
            "attribute": "color",
            "kind": "pair",
            "images": ["img/0.png", "img/1.png"],
            "captions": ["red cube", "blue cube"],
        },
        {
            "attribute": "color",
            "kind": "pair",
            "images": ["img/2.png", "img/3.png"],
            "captions": ["red ball", "blue ball"],
        },
        {
            "attribute": "color",
            "kind": "swap",
            "image": "img/0.png",
            "positive": "one red cube",
            "negative": "one blue cube",
        },
        {
            "attribute": "color",
            "kind": "swap",
            "image": "img/1.png",
            "positive": "one blue cube",
            "negative": "one red cube",
        },
        {
            "attribute": "count",
            "kind": "swap",
            "image": "img/4.png",
            "positive": "two cones",
            "negative": "three cones",
        },
    ]
    (root / "probes.jsonl").write_text("\n".join(json.dumps(p) for p in probes) + "\n")
    return str(root), LookupClip(e, texts)


def test_probes_per_attribute_accuracies(tmp_path):
    root, model = write_probes(tmp_path / "probes")
    result = evaluate_probes(model, root)
    assert result == {
        "pair_mean": 50.0,
        "num_pair": 2,
        "pair/color": 50.0,
        "swap_mean": 50.0,  # color 100, count 0
        "num_swap": 3,
        "swap/color": 100.0,
        "swap/count": 0.0,
    }
    assert evaluate_probes(model, f"{root}/probes.jsonl") == result


def test_probes_bad_input(tmp_path):
    noise_image(0).save(tmp_path / "a.png")
    bad = {
        '{"attribute": "x", "kind": "pair", "images": ["a.png"], "captions": ["p", "q"]}': "exactly 2 images",
        '{"attribute": "x", "kind": "swap", "image": "a.png", "positive": "p"}': "missing field 'negative'",
        '{"attribute": "x", "kind": "triple"}': "unknown probe kind",
        "not json": "bad probe",
        '{"attribute": "x", "kind": "swap", "image": "b.png", "positive": "p", "negative": "q"}': r"b\.png",
    }
    for line, message in bad.items():
        (tmp_path / "probes.jsonl").write_text(
            '{"attribute": "x", "kind": "swap", "image": "a.png", "positive": "p", "negative": "q"}\n' + line
        )
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            load_probes(tmp_path)
    (tmp_path / "probes.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no probes"):
        load_probes(tmp_path)
