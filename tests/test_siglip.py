"""SigLIP and SigLIP 2 bases (issue #13): loading, DMU assembly, the sigmoid loss, evaluation and export.

Tiny random models built here (tests/tiny_siglip.py); no downloads. Stock transformers classes are the
reference for what the checkpoints compute.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    Siglip2ImageProcessor,
    Siglip2Model,
    Siglip2VisionModel,
    SiglipImageProcessor,
    SiglipModel,
    SiglipVisionModel,
)

import clipmoe
from clipmoe import assemble_moe, sparse_upcycle
from clipmoe.eval.features import encode_texts
from clipmoe.formats.export import export_vision_tower
from clipmoe.formats.state_dict import CheckpointError
from clipmoe.model.modeling_siglip import Siglip2MoeModel, SiglipMoeModel, patchify
from clipmoe.model.moe import MoEFeedForward, load_balancing_loss
from clipmoe.model.surgery import find_ffns
from clipmoe.train.config import TrainConfig
from clipmoe.train.loop import balance_loss
from clipmoe.train.loss_sigmoid import SigmoidLoss, contrastive_loss, resolve_loss
from conftest import make_tiny_clip
from tiny_siglip import make_tiny_siglip

STOCK = {1: SiglipModel, 2: Siglip2Model}
STOCK_TOWER = {1: SiglipVisionModel, 2: Siglip2VisionModel}
TEXTS = ["a photo of a red cube", "blue sphere on the left", "a small green cone"]


def _pixels(n=3, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _image_inputs(version: int, pixels: torch.Tensor, patch_size: int = 8) -> dict:
    """What the stock model takes for these pixels (SigLIP 2: the processor's patches, mask and grid)."""
    if version == 1:
        return {"pixel_values": pixels}
    patches, mask, shapes = patchify(pixels, patch_size)
    return {"pixel_values": patches, "pixel_attention_mask": mask, "spatial_shapes": shapes}


def _spread_routers(moe, seed=3):
    torch.manual_seed(seed)
    for m in moe.moe_layers():
        torch.nn.init.normal_(m.router.weight)  # spread tokens over experts so routing matters


def _perturb_ffns(model, seed: int):
    """A copy of ``model`` whose block FFNs (only) moved: what an MCL stage produces."""
    import copy

    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for ffns in find_ffns(out).values():
            for f in ffns:
                for p in f.module.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
    return out


# ------------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("version", [1, 2])
def test_load_gives_the_stock_models_features(tmp_path, version):
    base = make_tiny_siglip(version)
    base.save_pretrained(tmp_path / "base")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert config["model_type"] == ("siglip" if version == 1 else "siglip2")
    model = clipmoe.load(tmp_path / "base")
    assert type(model) is (SiglipMoeModel if version == 1 else Siglip2MoeModel)
    stock = STOCK[version].from_pretrained(tmp_path / "base").eval()
    tokens = model.tokenizer(TEXTS)
    assert tokens["input_ids"].shape == (3, 16)  # padded to the full context, as SigLIP was trained
    pixels = _pixels()
    with torch.no_grad():
        # The stock model gets what the checkpoint's own tokenizer returns: no mask for SigLIP.
        stock_text = {"input_ids": tokens["input_ids"]}
        if version == 2:
            stock_text["attention_mask"] = tokens["attention_mask"]
        theirs_txt = stock.get_text_features(**stock_text).pooler_output
        theirs_img = stock.get_image_features(**_image_inputs(version, pixels)).pooler_output
        torch.testing.assert_close(model.encode_text(**tokens), theirs_txt, atol=1e-6, rtol=0)
        torch.testing.assert_close(model.encode_image(pixels), theirs_img, atol=1e-6, rtol=0)
    assert model.config.projection_dim == theirs_img.shape[-1] == 32


def test_text_padding_and_masks_follow_the_checkpoints_tokenizer(tmp_path):
    v1, v2 = make_tiny_siglip(1), make_tiny_siglip(2)
    for model, name in ((v1, "v1"), (v2, "v2")):
        model.save_pretrained(tmp_path / name)
    v1, v2 = clipmoe.load(tmp_path / "v1"), clipmoe.load(tmp_path / "v2")
    t1, t2 = v1.tokenizer(TEXTS), v2.tokenizer(TEXTS)
    # SigLIP: no mask in the tokenizer -> all ones (pads attended to, as in training); SigLIP 2: a real mask.
    assert t1["attention_mask"].all() and not t2["attention_mask"].all()
    assert (t2["attention_mask"].sum(1) == torch.tensor([8, 7, 6])).all()
    assert v1.tokenizer.padding == v2.tokenizer.padding == "max_length"
    assert clipmoe.load(_save(make_tiny_clip(), tmp_path / "clip")).tokenizer.padding == "longest"


def _save(model, path):
    model.save_pretrained(path)
    return path


def test_siglip_preprocessing_matches_the_hf_processors(tmp_path):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((48, 36), (40, 40))]
    for version, processor_class in ((1, SiglipImageProcessor), (2, Siglip2ImageProcessor)):
        model = make_tiny_siglip(version)
        model.save_pretrained(tmp_path / f"v{version}")
        ours = clipmoe.load(tmp_path / f"v{version}").image_processor
        assert ours == model.image_processor  # the config round-trips
        hf = processor_class.from_pretrained(tmp_path / f"v{version}")
        for image in images:
            pixels = ours(image)[None]
            if version == 1:
                torch.testing.assert_close(hf(image, return_tensors="pt")["pixel_values"], pixels, atol=1e-5, rtol=0)
            elif image.size[0] == image.size[1]:  # NaFlex keeps the aspect ratio; a square image is squashed alike
                out = hf(image, return_tensors="pt")
                patches, _mask, shapes = patchify(pixels, 8)
                assert out["spatial_shapes"].tolist() == shapes.tolist()
                assert out["pixel_attention_mask"].all()
                torch.testing.assert_close(out["pixel_values"], patches, atol=1e-5, rtol=0)


def test_strict_loading_names_missing_and_unexpected_keys(tmp_path):
    moe = sparse_upcycle(make_tiny_siglip(1), 3, top_k=2, layers={"vision": [1], "text": [0]})
    moe.save_pretrained(tmp_path / "moe")
    weights = tmp_path / "moe" / "model.safetensors"
    state = load_file(weights)
    del state["vision_model.encoder.layers.1.mlp.w1"]
    state["vision_model.encoder.layers.0.mlp.w1"] = torch.zeros(1)
    save_file(state, weights)
    with pytest.raises(CheckpointError, match=r"missing keys: vision_model\.encoder\.layers\.1\.mlp\.w1.*unexpected"):
        clipmoe.load(tmp_path / "moe")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"model_type": "blip"}')
    with pytest.raises(CheckpointError, match="'clip', 'clip_moe', 'siglip', 'siglip2', 'siglip_moe', 'siglip2_moe'"):
        clipmoe.load(tmp_path / "odd")


# ------------------------------------------------------------------------------------------ DMU assembly


@pytest.mark.parametrize("version", [1, 2])
def test_dmu_assembly_both_towers_and_round_trip(tmp_path, version):
    base = make_tiny_siglip(version)
    ffns = find_ffns(base)
    assert [len(ffns[t]) for t in ("vision", "text")] == [2, 2]  # the MAP head's mlp is not a block FFN
    experts = [base, _perturb_ffns(base, 1), _perturb_ffns(base, 2)]
    moe = assemble_moe(base, experts, top_k=2)
    assert len(moe.moe_layers("vision")) == len(moe.moe_layers("text")) == 2
    assert type(moe.vision_model.head.mlp).__name__ == "SiglipMLP" or version == 2
    layer = moe.text_model.encoder.layers[1].mlp
    assert isinstance(layer, MoEFeedForward) and type(layer.act).__name__ == "GELUTanh"
    for e, expert in enumerate(experts):  # expert e of every block is the FFN of model e
        sd = expert.state_dict()
        for tower in ("vision", "text"):
            for i in range(2):
                torch.testing.assert_close(
                    getattr(moe, f"{tower}_model").encoder.layers[i].mlp.w1[e],
                    sd[f"{tower}_model.encoder.layers.{i}.mlp.fc1.weight"],
                )
    _spread_routers(moe)
    moe.save_pretrained(tmp_path / "moe")
    loaded = clipmoe.load(tmp_path / "moe")
    assert type(loaded) is type(moe) and loaded.config.moe == moe.config.moe
    pixels, tokens = _pixels(), moe.tokenizer(TEXTS)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(pixels), moe.encode_image(pixels))
        assert torch.equal(loaded.encode_text(**tokens), moe.encode_text(**tokens))
    assert set(loaded.state_dict()) == set(moe.state_dict())


@pytest.mark.parametrize("version", [1, 2])
def test_identical_experts_reproduce_the_dense_model(version):
    """Sparse upcycling without noise: every token's k expert outputs are the base FFN's, weights sum to 1."""
    base = make_tiny_siglip(version)
    moe = sparse_upcycle(base, 4, top_k=2)
    _spread_routers(moe)
    pixels, tokens = _pixels(), base.tokenizer(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(moe.encode_image(pixels), base.encode_image(pixels), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(moe.encode_text(**tokens), base.encode_text(**tokens), atol=1e-5, rtol=1e-5)


def test_experts_may_differ_from_the_base_only_in_block_ffns():
    base = make_tiny_siglip(1)
    attention = _perturb_ffns(base, 1)
    with torch.no_grad():
        attention.text_model.encoder.layers[0].self_attn.q_proj.weight.add_(1e-3)
    with pytest.raises(ValueError, match=r"non-FFN tensor text_model\.encoder\.layers\.0\.self_attn\.q_proj\.weight"):
        assemble_moe(base, [base, attention])
    head = _perturb_ffns(base, 1)
    with torch.no_grad():  # the attention-pooling head's MLP is part of the base, not an expert
        head.vision_model.head.mlp.fc1.weight.add_(1e-3)
    with pytest.raises(ValueError, match=r"non-FFN tensor vision_model\.head\.mlp\.fc1\.weight"):
        assemble_moe(base, [base, head])
    bias = _perturb_ffns(base, 1)
    with torch.no_grad():
        bias.logit_bias.add_(1.0)
    with pytest.raises(ValueError, match="non-FFN tensor logit_bias"):
        assemble_moe(base, [base, bias])


def test_mcl_trains_block_ffns_only():
    moe = make_tiny_siglip(1)
    moe.set_trainable("ffn")
    trainable = {n for n, p in moe.named_parameters() if p.requires_grad}
    assert trainable and all(".encoder.layers." in n and ".mlp." in n for n in trainable)
    moe = sparse_upcycle(make_tiny_siglip(2), 3, top_k=2)
    moe.set_trainable("router")
    assert {n.rsplit(".", 2)[-2] for n, p in moe.named_parameters() if p.requires_grad} == {"router"}


def test_text_router_losses_count_real_tokens_only_where_a_mask_exists():
    for version in (1, 2):
        moe = sparse_upcycle(make_tiny_siglip(version), 4, top_k=2, layers={"text": "all"})
        _spread_routers(moe)
        tokens = moe.tokenizer(TEXTS)
        with torch.no_grad():
            moe.encode_text(**tokens)
        cfg = TrainConfig(balance_weight=1.0, text_balance_factor=1.0, global_balance=False)
        got = balance_loss(moe, tokens["attention_mask"], cfg)
        logits = torch.cat(moe.router_logits("text"))
        real = tokens["attention_mask"].reshape(-1).bool().repeat(2)
        # every position is routed (SigLIP pools the last one, a pad); the statistics skip masked pads
        assert logits.shape[0] == 2 * 3 * 16
        torch.testing.assert_close(got, load_balancing_loss(logits[real], 2))
        if version == 1:  # no mask: every position counts
            torch.testing.assert_close(got, load_balancing_loss(logits, 2))
        else:
            assert real.sum() < len(real)


# ------------------------------------------------------------------------------------------ sigmoid loss


def reference_sigmoid_loss(img, txt, t, b, valid=None):
    """Eq. 1 of the SigLIP paper, term by term in float64: -1/|B| sum_i sum_j log(1 / (1 + exp(z_ij (-t x.y - b))))."""
    x = img.double() / img.double().norm(dim=-1, keepdim=True)
    y = txt.double() / txt.double().norm(dim=-1, keepdim=True)
    keep = range(len(x)) if valid is None else [i for i in range(len(x)) if valid[i]]
    total = 0.0
    for i in keep:
        for j in keep:
            z = 1.0 if i == j else -1.0
            logit = t * float(x[i] @ y[j]) + b
            total += -math.log(1.0 / (1.0 + math.exp(-z * logit)))
    return total / len(keep)


def test_sigmoid_loss_equals_the_paper_formula():
    g = torch.Generator().manual_seed(0)
    for n, d, t, b in ((8, 16, 10.0, -10.0), (5, 7, 117.3, -12.9), (12, 32, 1.0, 0.5)):
        img, txt = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
        got = SigmoidLoss()(img, txt, t, b)
        assert abs(got.item() - reference_sigmoid_loss(img, txt, t, b)) < 1e-6 * max(1.0, abs(got.item()))
        valid = torch.rand(n, generator=g) > 0.3
        valid[0] = True
        got = SigmoidLoss()(img, txt, t, b, valid)
        ref = reference_sigmoid_loss(img, txt, t, b, valid.tolist())
        assert abs(got.item() - ref) < 1e-6 * max(1.0, abs(ref))


def test_keep_the_base_temperature_means_the_siglip_scale_and_bias():
    model = make_tiny_siglip(1)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(117.0))  # values like a trained SigLIP's
        model.logit_bias.fill_(-12.5)
    pixels, tokens = _pixels(4), model.tokenizer([*TEXTS, "left cone"])
    assert resolve_loss("auto", model) == "sigmoid" and resolve_loss("auto", make_tiny_clip()) == "softmax"
    with torch.no_grad():
        img, txt = model.encode_image(pixels), model.encode_text(**tokens)
        loss = contrastive_loss(model, TrainConfig(logit_scale="model"))(img, txt)
        # The stock model's own loss on the same batch uses exp(logit_scale) and logit_bias: the same number.
        stock = SiglipModel.forward(model, input_ids=tokens["input_ids"], pixel_values=pixels, return_loss=True)
    torch.testing.assert_close(loss, stock.loss, atol=1e-5, rtol=1e-6)
    assert abs(loss.item() - reference_sigmoid_loss(img, txt, 117.0, -12.5)) < 1e-5
    # A fixed number overrides the scale; logit_bias overrides the bias; softmax ignores the bias.
    fixed = contrastive_loss(model, TrainConfig(logit_scale=10.0, logit_bias=-3.0))(img, txt)
    assert abs(fixed.item() - reference_sigmoid_loss(img, txt, 10.0, -3.0)) < 1e-5
    softmax = contrastive_loss(model, TrainConfig(loss="softmax", logit_scale="model", label_smoothing=0.0))(img, txt)
    labels = torch.arange(4)
    logits = 117.0 * F.normalize(img) @ F.normalize(txt).T
    torch.testing.assert_close(softmax, (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2)


def test_learned_temperature_and_bias_get_gradients():
    model = make_tiny_siglip(2)
    model.set_trainable("all")
    pixels, tokens = _pixels(3), model.tokenizer(TEXTS)
    loss = contrastive_loss(model, TrainConfig(logit_scale=None))(
        model.encode_image(pixels), model.encode_text(**tokens)
    )
    loss.backward()
    assert model.logit_scale.grad.abs().item() > 0 and model.logit_bias.grad.abs().item() > 0
    with pytest.raises(ValueError, match="invalid training settings: loss='hinge'"):
        TrainConfig(loss="hinge")


# ------------------------------------------------------------------------------------------ evaluation


@pytest.mark.parametrize("version", [1, 2])
def test_zero_shot_ranking_is_the_sigmoid_scores_ranking(version):
    model = sparse_upcycle(make_tiny_siglip(version), 3, top_k=2, noise=0.05)
    _spread_routers(model)
    pixels = _pixels(6)
    texts = [f"a photo of a {c} {s}" for c in ("red", "green", "blue") for s in ("cube", "sphere")]
    text_features = encode_texts(model, texts)
    with torch.no_grad():
        image_features = F.normalize(model.encode_image(pixels))
        tokens = model.tokenizer(texts)
        inputs = _image_inputs(version, pixels)
        mask = {"attention_mask": tokens["attention_mask"]} if version == 2 else {}
        out = STOCK[version].forward(model, input_ids=tokens["input_ids"], **inputs, **mask)
    scores = image_features @ text_features.T
    torch.testing.assert_close(
        out.logits_per_image, model.logit_scale.exp() * scores + model.logit_bias, atol=1e-4, rtol=0
    )
    assert torch.equal(scores.argsort(dim=1), out.logits_per_image.argsort(dim=1))
    assert torch.equal(scores.argsort(dim=0), out.logits_per_image.argsort(dim=0))


@pytest.mark.parametrize("version", [1, 2])
def test_image_search_with_a_siglip_moe(tmp_path, version):
    from clipmoe.apps.search import ImageIndex, build_index

    moe = sparse_upcycle(make_tiny_siglip(version), 3, top_k=2, noise=0.05)
    _spread_routers(moe)
    moe.save_pretrained(tmp_path / "moe")
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
    build_index(tmp_path / "images", tmp_path / "moe", tmp_path / "index", batch_size=4, progress=False)
    index = ImageIndex(tmp_path / "index")
    hits = index.search("a red cube on the left", top_k=6)[0]
    with torch.no_grad():
        pixels = torch.stack([moe.image_processor(Image.open(tmp_path / "images" / p)) for p in index.relative_paths])
        img = F.normalize(moe.encode_image(pixels), dim=-1)
        txt = F.normalize(moe.encode_text(**moe.tokenizer(["a red cube on the left"])), dim=-1)
    scores = (img @ txt[0]).numpy()
    order = np.argsort(-scores)
    assert [os.path.basename(h.path) for h in hits] == [index.relative_paths[i] for i in order]
    np.testing.assert_allclose([h.score for h in hits], scores[order], atol=1e-5)


def test_throughput_measurement_with_siglip_special_token_ids():
    from clipmoe.dmu.report import measure_throughput

    model = make_tiny_siglip(1)
    model.config.text_config.bos_token_id, model.config.text_config.eos_token_id = 49406, 49407  # SigLIP's defaults
    rates = measure_throughput(model, batch=2, repeats=1)
    assert rates["images_per_s"] > 0 and rates["texts_per_s"] > 0


# ------------------------------------------------------------------------------------------ export

STANDALONE = textwrap.dedent(
    """
    import sys

    class NoClipmoe:
        def find_spec(self, name, path=None, target=None):
            if name == "clipmoe" or name.startswith("clipmoe."):
                raise ImportError("clipmoe is not installed here")

    sys.meta_path.insert(0, NoClipmoe())
    import torch
    from transformers import AutoModel

    full_dir, tower_dir, io_path = sys.argv[1:4]
    inputs = torch.load(io_path + ".in")
    full = AutoModel.from_pretrained(full_dir, trust_remote_code=True)
    tower = AutoModel.from_pretrained(tower_dir, trust_remote_code=True)
    out = {"classes": [type(m).__module__ + "." + type(m).__name__ for m in (full, tower)]}
    with torch.no_grad():
        out["image"] = full.encode_image(inputs["pixels"])
        out["text"] = full.encode_text(inputs["input_ids"], inputs["attention_mask"])
        outs = tower(**inputs["tower"], output_hidden_states=True)
    out["pooled"], out["hidden"] = outs.pooler_output, outs.hidden_states[-2]
    torch.save(out, io_path + ".out")
    """
)


@pytest.mark.parametrize("version", [1, 2])
def test_exported_towers_load_in_stock_transformers(tmp_path, version):
    # Dense: the unchanged Siglip(2)VisionModel.from_pretrained loads the exported tower.
    dense = make_tiny_siglip(version)
    export_vision_tower(dense, tmp_path / "dense")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert config["model_type"] == ("siglip_vision_model" if version == 1 else "siglip2_vision_model")
    stock = STOCK_TOWER[version].from_pretrained(tmp_path / "dense").eval()
    pixels = _pixels()
    with torch.no_grad():
        torch.testing.assert_close(stock(**_image_inputs(version, pixels)).pooler_output, dense.encode_image(pixels))

    # MoE: the same features through the folders' own code, with transformers alone.
    moe = sparse_upcycle(dense, 4, top_k=2, noise=0.05, layers={"vision": "all", "text": [1]})
    _spread_routers(moe)
    moe.save_pretrained(tmp_path / "full")
    export_vision_tower(moe, tmp_path / "tower")
    assert sorted(os.listdir(tmp_path / "tower")) == [
        "config.json",
        "model.safetensors",
        "modeling.py",
        "modeling_siglip.py",
        "moe.py",
        "preprocessor_config.json",
    ]
    tokens = moe.tokenizer(TEXTS)
    torch.save({"pixels": pixels, **tokens, "tower": _image_inputs(version, pixels)}, tmp_path / "io.in")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    (tmp_path / "standalone.py").write_text(STANDALONE)
    run = subprocess.run(
        [
            sys.executable,
            str(tmp_path / "standalone.py"),
            str(tmp_path / "full"),
            str(tmp_path / "tower"),
            str(tmp_path / "io"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = torch.load(tmp_path / "io.out")
    name = "Siglip" if version == 1 else "Siglip2"
    assert out["classes"][0].startswith("transformers_modules.")
    assert out["classes"][0].endswith(f".{name}MoeModel") and out["classes"][1].endswith(f".{name}MoeVisionModel")
    with torch.no_grad():
        ours = moe.vision_model(**_image_inputs(version, pixels), output_hidden_states=True)
        torch.testing.assert_close(out["image"], moe.encode_image(pixels), atol=1e-5, rtol=0)
        torch.testing.assert_close(out["text"], moe.encode_text(**tokens), atol=1e-5, rtol=0)
    torch.testing.assert_close(out["pooled"], ours.pooler_output, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["hidden"], ours.hidden_states[-2], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ pipeline


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from clipmoe.data.world import WorldConfig, generate_world

    out = tmp_path_factory.mktemp("w") / "world"
    generate_world(out, WorldConfig.preset("test", train_size=64), verbose=False)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("version", [1, 2])
def test_clipmoe_run_end_to_end(tmp_path, world, version, capsys):
    """``clipmoe run`` on a tiny SigLIP / SigLIP 2: MCL with the base's own sigmoid loss, temperature and bias,
    DMU assembly, router training, the baselines, evaluation and the report."""
    import yaml

    from clipmoe import cli
    from clipmoe.data.world import world_vocabulary

    base = make_tiny_siglip(version, words=world_vocabulary(), width=64, image_size=48, patch_size=16, context=48)
    with torch.no_grad():
        base.logit_scale.fill_(math.log(20.0))
        base.logit_bias.fill_(-5.0)
    base.save_pretrained(tmp_path / "base")
    train = {"steps": 3, "batch_size": 16, "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 2, "min_batch": 4}
    raw = {
        "base_model": str(tmp_path / "base"),
        "data": {"train": str(world / "train"), "eval": str(world / "eval")},
        "device": "cpu",
        "cluster": {"image_clusters": 2, "text_clusters": 2},
        "mcl": {**train, "logit_scale": "model"},  # the paper's fixed temperature, transposed: the base's own
        "moe": {"experts": 2, "top_k": 2},
        "route": {**train, "lr": 1e-2, "logit_scale": "model"},
        # the MoE baseline and the soup (dense fine-tuning and w/o MCL run the same code as for CLIP)
        "baselines": {"stages": False, "enabled": ["upcycle", "soup"], "budgets": ["steps"]},
        "eval": {"batch_size": 64, "throughput_batch": 4},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    assert cli.main(["run", str(tmp_path / "cfg.yaml"), "--run-dir", str(run_dir), "--dry-run"]) == 0
    assert "parameter counts unavailable" not in capsys.readouterr().out and not run_dir.exists()
    assert cli.main(["run", str(tmp_path / "cfg.yaml"), "--run-dir", str(run_dir)]) == 0
    report = (run_dir / "report.md").read_text()
    for row in ("| base |", "| sparse upcycling (equal steps) |", "| expert soup |", "| DMU CLIP-MoE |"):
        assert row in report, row
    for phase in ("stage1", "moe"):  # loss: auto chose the base's family
        assert json.loads((run_dir / phase / "train_stats.json").read_text())["loss"] == "sigmoid"

    cls = SiglipMoeModel if version == 1 else Siglip2MoeModel
    base_sd = clipmoe.load(run_dir / "base").state_dict()
    stage = clipmoe.load(run_dir / "stage1" / "model")
    changed = {k for k, v in stage.state_dict().items() if not torch.equal(v, base_sd[k])}
    assert changed and all(".encoder.layers." in k and ".mlp." in k for k in changed)  # MCL: block FFNs only
    moe = clipmoe.load(run_dir / "moe" / "model")
    assert type(moe) is cls and len(moe.moe_layers("vision")) == len(moe.moe_layers("text")) == 2
    assert moe.logit_scale.exp().item() == pytest.approx(20.0) and moe.logit_bias.item() == pytest.approx(-5.0)
    torch.testing.assert_close(
        moe.text_model.encoder.layers[0].mlp.w1[1], stage.state_dict()["text_model.encoder.layers.0.mlp.fc1.weight"]
    )
    metrics = json.loads((run_dir / "eval" / "dmu_clip_moe.json").read_text())["metrics"]
    assert any(k.startswith("retrieval_") for k in metrics) and any(k.startswith("cls_") for k in metrics)


# ------------------------------------------------------------------------------------------ distributed


@pytest.fixture(scope="module")
def sigmoid_runs(tmp_path_factory):
    """The sigmoid scenarios under torchrun (2 gloo processes) and, as the reference, in this process."""
    import signal

    import siglip_dist_worker
    from clipmoe.train.distributed import DistEnv
    from test_distributed import Runs

    out = str(tmp_path_factory.mktemp("sigmoid-ddp"))
    worker = os.path.join(os.path.dirname(__file__), "siglip_dist_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", worker, out]
    with open(os.path.join(out, "torchrun.log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            reference = {
                name: scenario(os.path.join(out, "reference", name), DistEnv())
                for name, scenario in siglip_dist_worker.SCENARIOS.items()
            }
            returncode = proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return Runs(out, reference, returncode)


@pytest.mark.parametrize("scenario", ["sigmoid_mcl", "sigmoid_learned", "sigmoid_fsdp"])
def test_two_processes_equal_one_for_the_sigmoid_loss(sigmoid_runs, scenario):
    from dist_worker import LABELS
    from test_distributed import assert_ranks_identical, assert_same_grads, assert_same_weights, assert_trained

    r0, r1 = sigmoid_runs.ranks(scenario)
    ref = sigmoid_runs.reference[scenario]
    assert r0["loss_family"] == ref["loss_family"] == "sigmoid"  # loss: auto chose the base's family
    for key, value in ref["loss"].items():  # the first global batch's loss: 1e-6 relative
        torch.testing.assert_close(r0["loss"][key], value, rtol=1e-6, atol=0, msg=key)
    assert_same_grads(ref["grads"], r0["grads"])
    assert_same_weights(ref, r0)
    assert_ranks_identical(r0, r1)
    assert_trained(r0)
    if scenario == "sigmoid_mcl":
        assert all(".encoder.layers." in n and ".mlp." in n for n in r0["weights"])
        per_rank, seen = 4, r0["seen"]  # every global batch from one cluster: MCL's sampler unchanged
        for t in range(len(seen) // per_rank):
            batch = seen[t * per_rank : (t + 1) * per_rank] + r1["seen"][t * per_rank : (t + 1) * per_rank]
            assert len({int(LABELS[i]) for i in batch}) == 1
    else:
        assert {"logit_scale", "logit_bias"} <= set(r0["weights"])
        assert "balance" in r0["loss"] or scenario == "sigmoid_fsdp"
        for name in ("logit_scale", "logit_bias"):  # learned, identically on both ranks
            assert (r0["weights"][name] - r0["initial"][name]).abs().item() > 5e-5


class _Picture:
    """What ``attributes.image_features`` reads: an object whose ``open()`` gives the image."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))

    def open(self) -> Image.Image:
        return self.image


@pytest.mark.parametrize("version", [1, 2])
def test_attribute_features_of_a_siglip_tower_read_every_patch(version):
    """SigLIP's tower has no class token (a CLIP's first token is one), so the mean patch token is the mean of
    all of them; SigLIP 2's tower reads patches with their mask and grid."""
    from clipmoe.eval.attributes import image_features

    model = make_tiny_siglip(version)
    pictures = [_Picture(i) for i in range(3)]
    pixels = torch.stack([model.image_processor(p.open()) for p in pictures])
    with torch.no_grad():
        if version == 2:
            keys = ("pixel_values", "pixel_attention_mask", "spatial_shapes")
            tower = model.vision_model(**dict(zip(keys, patchify(pixels, model.config.vision_config.patch_size))))
        else:
            tower = model.vision_model(pixel_values=pixels)
    assert tower.last_hidden_state.shape[1] == 16  # 4 x 4 patches, nothing else
    got = image_features(model, pictures, "patch_mean", batch_size=2)
    assert torch.allclose(got, tower.last_hidden_state.mean(1), atol=1e-5)
    assert torch.allclose(image_features(model, pictures, "pooled"), tower.pooler_output, atol=1e-5)
