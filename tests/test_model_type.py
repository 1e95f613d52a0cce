"""Saved MoE folders declare their own model types: transformers' Auto classes and its zero-shot pipeline open
them as MoEs (registered by clipmoe, or through the folder's remote code), and its dense classes refuse them."""

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForZeroShotImageClassification,
    CLIPModel,
    CLIPTextModel,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    Siglip2Model,
    Siglip2VisionModel,
    SiglipModel,
    SiglipVisionModel,
)

import clipmoe
from clipmoe import sparse_upcycle
from clipmoe.assets import TINY_CLIP
from clipmoe.eval.classification import zero_shot_classifier
from clipmoe.formats.export import export_vision_tower
from clipmoe.model.modeling import FFN_WIDTH_KEY, ClipMoeConfig, ClipMoeModel, ClipMoeVisionModel
from clipmoe.model.modeling_siglip import Siglip2MoeModel, SiglipMoeModel
from conftest import make_tiny_clip
from tiny_siglip import make_tiny_siglip


def _moe(base=None, layers="all"):
    moe = sparse_upcycle(base if base is not None else make_tiny_clip(), 4, top_k=2, noise=0.05, layers=layers)
    torch.manual_seed(3)
    for m in moe.moe_layers():
        torch.nn.init.normal_(m.router.weight)  # spread tokens over experts so routing matters
    return moe


def _images(n=4, seed=0, square=False):
    # Even center-crop margins, where HF's CLIPImageProcessor and clipmoe's transform agree (test_export.py).
    # Square ones for SigLIP 2: clipmoe feeds NaFlex a square patch grid, which is what HF's processor makes of a
    # square image (a non-square one it keeps at its aspect ratio; README, "Images").
    rng = np.random.default_rng(seed)
    sizes = [(48, 48), (36, 36), (40, 40), (64, 64)][:n] if square else [(48, 36), (36, 64), (40, 40), (64, 48)][:n]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def test_moe_folders_declare_their_own_types(tmp_path):
    moe = _moe(layers={"vision": [1], "text": "all"})
    moe.save_pretrained(tmp_path / "full")
    export_vision_tower(moe, tmp_path / "tower")
    full = json.loads((tmp_path / "full" / "config.json").read_text())
    assert full["model_type"] == "clip_moe"
    assert full["auto_map"] == {
        "AutoConfig": "modeling.ClipMoeConfig",
        "AutoModel": "modeling.ClipMoeModel",
        "AutoModelForZeroShotImageClassification": "modeling.ClipMoeModel",
    }
    # Both towers hold experts: both are guarded, their FFN width kept aside.
    for key in ("vision_config", "text_config"):
        assert full[key][FFN_WIDTH_KEY] == 64 and "clipmoe.load" in full[key]["intermediate_size"]
    tower = json.loads((tmp_path / "tower" / "config.json").read_text())
    assert tower["model_type"] == "clip_moe_vision_model"
    assert tower["auto_map"] == {
        "AutoConfig": "modeling.ClipMoeVisionConfig",
        "AutoModel": "modeling.ClipMoeVisionModel",
    }
    assert tower[FFN_WIDTH_KEY] == 64 and "trust_remote_code=True" in tower["intermediate_size"]

    # clipmoe opens them as before: the config types are clipmoe's, the widths restored, outputs identical.
    loaded = clipmoe.load(tmp_path / "full")
    assert type(loaded.config) is ClipMoeConfig and loaded.config.model_type == "clip_moe"
    assert loaded.config.vision_config.intermediate_size == loaded.config.text_config.intermediate_size == 64
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(pixels), moe.encode_image(pixels))
    tower_model = ClipMoeVisionModel.from_pretrained(tmp_path / "tower")
    assert len(tower_model.moe_layers()) == 1 and tower_model.config.intermediate_size == 64

    # Saving a loaded MoE again writes the same config.
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == full


def test_a_subclass_is_saved_as_the_clipmoe_class_it_derives_from(tmp_path):
    class Custom(ClipMoeModel):  # e.g. a user's subclass adding a method: the folder's code does not have it
        pass

    moe = _moe()
    custom = Custom(moe.config)
    custom.load_state_dict(moe.state_dict())
    custom.save_pretrained(tmp_path / "custom")
    config = json.loads((tmp_path / "custom" / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling.ClipMoeModel"
    assert config["model_type"] == "clip_moe"


def test_dense_folders_stay_plain_hf_types(tmp_path):
    dense = make_tiny_clip()
    dense.save_pretrained(tmp_path / "full")
    export_vision_tower(dense, tmp_path / "tower")
    full = json.loads((tmp_path / "full" / "config.json").read_text())
    assert full["model_type"] == "clip" and full["auto_map"] == {"AutoModel": "modeling.ClipMoeModel"}
    assert isinstance(full["vision_config"]["intermediate_size"], int)
    assert json.loads((tmp_path / "tower" / "config.json").read_text())["model_type"] == "clip_vision_model"
    # A dense HF class opens a dense folder correctly.
    stock = CLIPModel.from_pretrained(tmp_path / "full")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(stock.get_image_features(pixels).pooler_output, dense.encode_image(pixels))
    # The shipped base is such a dense folder.
    assert json.loads(open(os.path.join(TINY_CLIP, "config.json")).read())["model_type"] == "clip"


def test_dense_hf_classes_refuse_moe_folders(tmp_path):
    """The trap: transformers opens a folder of another model_type with a warning only and gives the missing
    FFNs random weights. A MoE folder makes every dense class raise, saying what to use instead."""
    moe = _moe(layers={"vision": [1]})  # the text tower stays dense
    moe.save_pretrained(tmp_path / "full")
    export_vision_tower(moe, tmp_path / "tower")
    for cls, folder in (
        (CLIPModel, "full"),
        (CLIPVisionModel, "tower"),
        (CLIPVisionModelWithProjection, "tower"),
        (CLIPVisionModel, "full"),  # descends into the full folder's vision_config
    ):
        with pytest.raises(Exception, match=r"clipmoe\.load\(folder\) or AutoModel\.from_pretrained") as info:
            cls.from_pretrained(tmp_path / folder)
        assert "intermediate_size" in str(info.value), (cls.__name__, folder)
    # A tower without experts is not guarded: the dense class opens it, and correctly.
    text = CLIPTextModel.from_pretrained(tmp_path / "full")
    tokens = moe.tokenizer(["a photo of a red cube"])
    with torch.no_grad():
        ours = moe.text_model(**tokens).pooler_output
        assert torch.equal(text(**tokens).pooler_output, ours)


@pytest.mark.parametrize("version", [1, 2])
def test_dense_siglip_classes_refuse_siglip_moe_folders(tmp_path, version):
    moe = _moe(make_tiny_siglip(version), layers={"vision": "all", "text": [1]})
    moe.save_pretrained(tmp_path / "full")
    export_vision_tower(moe, tmp_path / "tower")
    prefix = "siglip" if version == 1 else "siglip2"
    assert json.loads((tmp_path / "full" / "config.json").read_text())["model_type"] == f"{prefix}_moe"
    tower = json.loads((tmp_path / "tower" / "config.json").read_text())
    assert tower["model_type"] == f"{prefix}_moe_vision_model"
    assert tower["auto_map"]["AutoModel"] == f"modeling_siglip.{moe.vision_tower_class.__name__}"
    full_class, tower_class = (SiglipModel, SiglipVisionModel) if version == 1 else (Siglip2Model, Siglip2VisionModel)
    for cls, folder in ((full_class, "full"), (tower_class, "tower")):
        with pytest.raises(Exception, match=r"clipmoe\.load\(folder\)"):
            cls.from_pretrained(tmp_path / folder)
    loaded = clipmoe.load(tmp_path / "full")
    assert type(loaded) is (SiglipMoeModel if version == 1 else Siglip2MoeModel)
    assert loaded.config.model_type == f"{prefix}_moe" and len(loaded.moe_layers()) == 3
    # Registered with the Auto classes once clipmoe's model code is imported (no trust_remote_code).
    assert type(AutoModel.from_pretrained(tmp_path / "tower")) is moe.vision_tower_class


def test_auto_classes_open_moe_folders_once_clipmoe_is_imported(tmp_path):
    moe = _moe()
    moe.save_pretrained(tmp_path / "full")
    export_vision_tower(moe, tmp_path / "tower")
    assert type(AutoConfig.from_pretrained(tmp_path / "full")) is ClipMoeConfig
    pixels = torch.randn(2, 3, 32, 32)
    for auto in (AutoModel, AutoModelForZeroShotImageClassification):
        model = auto.from_pretrained(tmp_path / "full")
        assert type(model) is ClipMoeModel and len(model.moe_layers()) == 4
        with torch.no_grad():
            assert torch.equal(model.encode_image(pixels), moe.encode_image(pixels))
    tower = AutoModel.from_pretrained(tmp_path / "tower")
    assert type(tower) is ClipMoeVisionModel
    with torch.no_grad():
        assert torch.equal(tower(pixels).pooler_output, moe.vision_model(pixel_values=pixels).pooler_output)


# Runs with transformers alone: clipmoe imports are refused, as on a machine without it installed.
PIPELINE = textwrap.dedent(
    """
    import json
    import sys

    class NoClipmoe:
        def find_spec(self, name, path=None, target=None):
            if name == "clipmoe" or name.startswith("clipmoe."):
                raise ImportError("clipmoe is not installed here")

    sys.meta_path.insert(0, NoClipmoe())

    from PIL import Image
    from transformers import AutoModel, pipeline

    folder, images, labels, template, out = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(","), *sys.argv[4:6]
    # Without trust_remote_code, transformers refuses the unknown type rather than guessing.
    try:
        AutoModel.from_pretrained(folder)
        sys.exit("AutoModel opened a clip_moe folder without trust_remote_code")
    except ValueError as e:
        refusal = str(e)
    classify = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
    results = classify([Image.open(p) for p in images], candidate_labels=labels, hypothesis_template=template)
    model = classify.model
    with open(out, "w") as f:
        json.dump({"class": type(model).__module__ + "." + type(model).__name__, "moe": len(model.moe_layers()),
                   "results": results, "refusal": refusal}, f)
    """
)


def _pipeline(moe, tmp_path, labels, template, square_images=False):
    """Saves ``moe``, copies it elsewhere and runs HF's zero-shot pipeline on the copy in a fresh interpreter that
    cannot import clipmoe (the folder is self-contained); returns the pipeline's output and the image paths."""
    moe.save_pretrained(tmp_path / "saved")
    folder = tmp_path / "elsewhere" / "moe"
    shutil.copytree(tmp_path / "saved", folder)
    paths = []
    for i, image in enumerate(_images(square=square_images)):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    (tmp_path / "pipe.py").write_text(PIPELINE)
    args = [str(folder), ",".join(paths), ",".join(labels), template, str(tmp_path / "out.json")]
    run = subprocess.run(
        [sys.executable, str(tmp_path / "pipe.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["class"].startswith("transformers_modules.")  # built from the folder's own code
    assert out["class"].endswith("." + type(moe).__name__)
    assert out["moe"] == len(moe.moe_layers())
    assert "trust_remote_code" in out["refusal"]
    return out, paths


def _our_scores(ours, labels, template, paths):
    """Our classifier's per-label scores: cosine similarities of one template, scaled by the model's temperature
    (and shifted by its bias for SigLIP), then softmax (CLIP) or sigmoid (SigLIP), as the pipeline reports them."""
    classifier = zero_shot_classifier(ours, labels, [template.replace("{}", "{c}")])
    with torch.no_grad():
        pixels = torch.stack([ours.image_processor(Image.open(p)) for p in paths])
        features = torch.nn.functional.normalize(ours.encode_image(pixels), dim=-1)
        logits = ours.logit_scale.exp() * features @ classifier.T
        if hasattr(ours, "logit_bias"):
            return (logits + ours.logit_bias).sigmoid()
        return logits.softmax(dim=-1)


def test_zero_shot_pipeline_on_a_moe_folder_gives_our_classifier_predictions(tmp_path):
    labels = ["red cube", "blue sphere", "green cone", "small cone on the left"]
    template = "a photo of a {}"
    out, paths = _pipeline(_moe(), tmp_path, labels, template)
    # The pipeline's scores are the softmax of the model's scaled similarities (logits_per_image), so the ranking
    # and the probabilities both match ours.
    probs = _our_scores(clipmoe.load(tmp_path / "saved"), labels, template, paths)
    for result, p in zip(out["results"], probs):
        assert result[0]["label"] == labels[int(p.argmax())]
        scores = {r["label"]: r["score"] for r in result}
        torch.testing.assert_close(torch.tensor([scores[label] for label in labels]), p, atol=1e-4, rtol=0)
    assert (probs.max(0).values - probs.min(0).values).max() > 1e-3  # per-image scores, not one constant answer


@pytest.mark.parametrize("version", [1, 2])
def test_zero_shot_pipeline_on_a_siglip_moe_folder_gives_our_sigmoid_scores(tmp_path, version):
    # The pipeline pads SigLIP texts to 64 tokens (the real checkpoints' context), so this tiny SigLIP has that
    # context; it reports sigmoid(scale * cos + bias) per label, independent across labels.
    base = make_tiny_siglip(version, context=64)
    with torch.no_grad():  # a temperature and bias that put the scores mid-range, where a mismatch would show
        base.logit_scale.fill_(math.log(20.0))
        base.logit_bias.fill_(0.0)
    labels = ["red cube", "blue sphere", "green cone", "small cone on the left"]
    template = "a photo of a {}"
    moe = _moe(base, layers={"vision": "all", "text": [1]})
    out, paths = _pipeline(moe, tmp_path, labels, template, square_images=True)
    probs = _our_scores(clipmoe.load(tmp_path / "saved"), labels, template, paths)
    for result, p in zip(out["results"], probs):
        assert result[0]["label"] == labels[int(p.argmax())]
        scores = {r["label"]: r["score"] for r in result}
        torch.testing.assert_close(torch.tensor([scores[label] for label in labels]), p, atol=1e-4, rtol=0)
    assert (probs.max(0).values - probs.min(0).values).max() > 1e-3


def test_old_moe_folders_load_with_a_message_on_how_to_resave(tmp_path):
    """A MoE saved as model_type "clip" (before MoE folders had their own type) still opens with clipmoe.load,
    with one warning that says how to re-save it; re-saved, it has its own type."""
    moe = _moe()
    moe.save_pretrained(tmp_path / "new")
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "new", old)
    config = json.loads((old / "config.json").read_text())
    config["model_type"] = "clip"  # the old form: plain type, unguarded towers, AutoModel only
    config["auto_map"] = {"AutoModel": "modeling.ClipMoeModel"}
    for key in ("vision_config", "text_config"):
        config[key]["intermediate_size"] = config[key].pop(FFN_WIDTH_KEY)
    (old / "config.json").write_text(json.dumps(config))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = clipmoe.load(old)
    messages = [str(w.message) for w in caught if "re-save" in str(w.message).lower()]
    assert len(messages) == 1, [str(w.message) for w in caught]
    assert f"clipmoe export {old} NEW_FOLDER" in messages[0] and "model.save_pretrained" in messages[0]
    assert len(model.moe_layers()) == 4
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.encode_image(pixels), moe.encode_image(pixels))

    model.save_pretrained(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "config.json").read_text())["model_type"] == "clip_moe"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clipmoe.load(tmp_path / "resaved")
        clipmoe.load(TINY_CLIP)  # dense, plain type: nothing to re-save
    assert not [w for w in caught if "re-save" in str(w.message).lower()]
