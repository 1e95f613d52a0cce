"""The shipped tiny CLIP and the README's examples, run as written."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import clipmoe
from clipmoe.assets import TINY_CLIP

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_shipped_model_is_small_and_loads_offline():
    size = sum(os.path.getsize(os.path.join(TINY_CLIP, f)) for f in os.listdir(TINY_CLIP))
    assert size <= 20 * 2**20
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    code = "import clipmoe; from clipmoe.assets import TINY_CLIP; m = clipmoe.load(TINY_CLIP); print(m.moe_layers())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def heldout_world(tmp_path_factory):
    from clipmoe.data.world import WorldConfig, generate_world

    out = tmp_path_factory.mktemp("heldout") / "world"
    # A fresh seed: images the base model never saw (it was pretrained on seed 1, the demo uses seed 0).
    generate_world(out, WorldConfig.preset("test", seed=7, eval_size=240, train_size=8), verbose=False)
    return out


def test_base_model_zero_shot_is_well_above_chance_on_short_caption_attributes(heldout_world):
    from clipmoe.eval import evaluate_classification, load_wds

    model = clipmoe.load(TINY_CLIP)
    for attribute in ("color", "background"):  # the attributes short captions mention
        data = load_wds(heldout_world / "eval" / f"cls_{attribute}")
        result = evaluate_classification(model, data)
        chance = 100.0 / len(data.classnames)
        assert result["top1"] > 3 * chance, (attribute, result["top1"], chance)


def test_base_suppresses_its_rarely_named_attributes_rather_than_lacking_them(tmp_path):
    """The testbed's premise (docs/pretraining.md): what web captions rarely name is in the image features
    (a probe reads it) but far less in what zero-shot matching uses. 2,000 held-out images: a linear probe
    fitted on a few hundred reads too little to show the gap."""
    from clipmoe.data.world import WorldConfig, generate_world
    from clipmoe.eval.attributes import attribute_probes

    world = tmp_path / "probe-world"
    generate_world(world, WorldConfig.preset("test", seed=7, eval_size=2000, train_size=8), verbose=False)
    result = attribute_probes(clipmoe.load(TINY_CLIP), str(world))
    for attribute in ("shape", "size", "position", "texture"):
        r = result[attribute]  # suppressed, not absent: above chance, well below what the features hold
        assert r["chance"] < r["zero_shot"] < r["linear_probe"] - 10, (attribute, r)
    for attribute in ("size", "position", "texture"):
        assert result[attribute]["zero_shot"] > result[attribute]["chance"] + 10, (attribute, result[attribute])
    assert result["color"]["zero_shot"] > 90 and result["background"]["zero_shot"] > 90  # what captions name
    # shape on held-out colour-shape combinations is unbalanced: a constant answer beats its chance (100 / 6)
    assert result["shape"]["majority"] > result["shape"]["chance"] + 2, result["shape"]
    assert abs(result["size"]["majority"] - result["size"]["chance"]) < 3, result["size"]


def test_conditional_zero_shot_tells_words_the_text_tower_carries_from_words_it_ignores(heldout_world):
    """Captions naming an image's colour, shape and background right, varied in one attribute: the base's text
    tower separates position and size words and reads them right; it maps every dot count to the same
    embedding (the one attribute the base lacks, docs/pretraining.md)."""
    from clipmoe.eval.attributes import conditional_zero_shot

    result = conditional_zero_shot(
        clipmoe.load(TINY_CLIP), str(heldout_world), ("position", "size", "count"), max_images=200
    )
    count = result["count"]
    assert count["variant_cosine"] > 0.999 and abs(count["accuracy"] - count["chance"]) < 10, count
    for attribute in ("position", "size"):
        r = result[attribute]
        assert r["accuracy"] > r["chance"] + 15 and r["variant_cosine"] < count["variant_cosine"] - 0.02, (
            attribute,
            r,
        )


@pytest.mark.parametrize(
    "chance, zero_shot, probe, state",
    [
        (10.0, 99.7, 99.9, "known"),  # the shipped base's colour (docs/pretraining.md)
        (33.3, 58.2, 86.1, "suppressed"),  # its size
        (33.3, 34.9, 38.1, "absent"),  # its dot count
        (16.7, 21.3, 94.8, "unaligned"),  # its shape on unseen combinations: in the features, not in the text
        (25.0, 30.0, 40.0, "suppressed"),  # both bars met exactly
        (25.0, 30.0, 39.9, "known"),
        (25.0, 29.9, 35.0, "unaligned"),
        (25.0, 29.9, 34.9, "absent"),
        (100 / 3, 38.3, 48.3, "suppressed"),  # the docs' bar for three values, "at least 38.3", as printed
        (100 / 3, 38.7, 48.7, "suppressed"),  # a 10-point gap that float subtraction puts a hair below 10
        (100 / 3, 38.24, 43.3, "unaligned"),  # 38.2 as printed: 4.9 above chance
    ],
)
def test_attribute_state_is_the_bar_the_docs_hold_every_base_to(chance, zero_shot, probe, state):
    from clipmoe.eval import attribute_state

    assert attribute_state(chance, zero_shot, probe) == state


def test_the_attribute_table_names_attributes_a_constant_answer_reads_above_chance():
    """Shape on held-out colour-shape combinations is unbalanced (docs/pretraining.md): the states keep their
    fixed bar (chance = 100 / values), and the table says which attributes it understates, beyond sampling
    noise of the images' own value shares."""
    from clipmoe.eval.attributes import format_attributes

    def result(images: int) -> dict:
        rows = {
            "shape": {"chance": 100 / 6, "majority": 20.3, "zero_shot": 21.3, "linear_probe": 92.7, "state": "x"},
            "size": {"chance": 100 / 3, "majority": 35.9, "zero_shot": 58.2, "linear_probe": 66.9, "state": "x"},
        }
        return {"attributes": rows, "images": images, "world": "w", "zero_shot_standard_error": 1.6,
                "state_from": "linear_probe"}  # fmt: skip

    table = format_attributes(result(1000))
    assert "| shape | 16.7 | 20.3 | 21.3 | 92.7 | x |" in table
    assert "Unbalanced on these images: shape (the best constant answer" in table  # size: within noise
    assert "Unbalanced" not in format_attributes(result(240))  # 3.6 points is within two standard errors there


def test_eval_attributes_reads_what_the_shipped_base_knows_and_lacks(heldout_world, tmp_path, capsys):
    """``clipmoe eval --task attributes`` end to end: every attribute's readings, a state for each, the table."""
    from clipmoe.cli import main

    out = tmp_path / "attributes.json"
    sizes = ["--probe-train-size", "160", "--probe-test-size", "80"]  # the world's 240 evaluation images
    world = str(heldout_world)
    argv = ["eval", "builtin:tiny-clip", "--task", "attributes", "--data", world, "--probe-world", world, *sizes]
    assert main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["attributes"]
    assert list(rows) == ["color", "background", "shape", "size", "position", "texture", "count"]
    assert result["state_from"] == "embedding_mlp"
    for name in ("color", "background"):
        assert rows[name]["state"] == "known" and rows[name]["zero_shot"] > 90, rows[name]
    count = rows["count"]  # the one hidden attribute the base lacks: its words map to one text embedding
    assert count["state"] in ("absent", "unaligned") and count["variant_cosine"] > 0.999, count
    assert "conditional" not in rows["color"] and {"embedding_mlp", "patch_mean_mlp"} <= set(rows["size"])
    assert result["images"] == 240 and result["probe_train_size"] == 160
    table = capsys.readouterr().out
    assert "| attribute | chance | constant answer | zero-shot |" in table
    assert f"| count | 33.3 | {count['majority']:.1f} | {count['zero_shot']:.1f} |" in table
    assert "on 240 evaluation images" in table and "states from the embedding's MLP probe on 160 images" in table
    assert "Too few images for the states' 5-point bar" in table  # 240 images: a standard error of up to 3.2


def test_shipped_tokenizer_fits_every_detailed_caption():
    """Fine-tuning captions must fit the text context the base was pretrained with (no silent truncation)."""
    import numpy as np

    from clipmoe.data.world_language import ATTRIBUTE_BY_NAME, DETAILED_TRAIN_TEMPLATES, CaptionPlan

    model = clipmoe.load(TINY_CLIP)
    rng = np.random.default_rng(0)
    captions = []
    for _ in range(500):
        attributes = {a.name: a.values[rng.integers(len(a.values))] for a in ATTRIBUTE_BY_NAME.values()}
        template = DETAILED_TRAIN_TEMPLATES[rng.integers(len(DETAILED_TRAIN_TEMPLATES))]
        captions.append(CaptionPlan.sample(template, rng).render(attributes))
    lengths = model.tokenizer(captions)["attention_mask"].sum(1)
    assert int(lengths.max()) < model.config.text_config.max_position_embeddings


def test_readme_python_example_runs_as_written(tmp_path):
    text = open(README).read()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([1, 128]) torch.Size([1, 128])" in out.stdout
    assert (tmp_path / "tiny-moe" / "model.safetensors").exists()


def test_text_to_image_search_finds_the_described_images(tmp_path, heldout_world):
    """End to end on the generated world: a caption retrieves its own image among the top hits."""
    import json

    from clipmoe.apps.search import ImageIndex, build_index

    images = tmp_path / "images"
    images.mkdir()
    captions = {}
    root = heldout_world / "eval" / "probes"
    probes = [json.loads(line) for line in open(root / "probes.jsonl")]
    for p in probes:
        if p["kind"] == "swap" and p["attribute"] in ("color", "background"):
            src = root / p["image"]
            dst = images / os.path.basename(p["image"])
            dst.write_bytes(src.read_bytes())
            captions[dst.name] = p["positive"]
    assert len(captions) >= 4
    build_index(str(images), TINY_CLIP, str(tmp_path / "index"), progress=False)
    index = ImageIndex(str(tmp_path / "index"))
    hits = index.search(list(captions.values()), top_k=3)
    found = sum(os.path.basename(name) in {os.path.basename(h.path) for h in hs} for name, hs in zip(captions, hits))
    assert found >= 0.75 * len(captions)
    torch.testing.assert_close(
        torch.tensor([h.score for h in hits[0]]).sort(descending=True).values, torch.tensor([h.score for h in hits[0]])
    )


def test_shipped_model_carries_the_current_remote_code():
    """The folder's modeling.py / moe.py (for trust_remote_code) must be today's package source."""
    src = os.path.join(os.path.dirname(clipmoe.__file__), "model")
    for name in ("modeling.py", "moe.py"):
        with open(os.path.join(TINY_CLIP, name)) as a, open(os.path.join(src, name)) as b:
            assert a.read() == b.read(), f"{name} in the shipped model is stale; re-save the model"
