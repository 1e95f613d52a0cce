"""The shipped tiny CLIP and the README's examples, run as written."""

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
