"""Router options (#16): z-loss, balance scope, centroid-initialised routers, base-preserving distillation."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from clipmoe import assemble_moe, sparse_upcycle
from clipmoe.apps.quality import RECIPES, SIZES, pipeline_config
from clipmoe.data.collate import ClipCollator
from clipmoe.dmu.centroids import stage_samples
from clipmoe.dmu.config import ConfigError, config_from_dict
from clipmoe.dmu.pipeline import Pipeline, open_run
from clipmoe.model.surgery import find_ffns, init_routers
from clipmoe.train.config import TrainConfig
from clipmoe.train.loop import METRICS, Distillation, train
from clipmoe.train.loss import router_losses
from conftest import WORDS, generate_test_world, make_tiny_clip


class Pairs(torch.utils.data.Dataset):
    """Random images; captions of 4 words each, so every caption has the same padding mask."""

    def __init__(self, n=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.pixels = torch.randn(n, 3, 32, 32, generator=g)
        self.captions = [" ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(4)) for i in range(n)]

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return self.pixels[i], self.captions[i]


def collate_for(model):
    def collate(items):
        return {
            "pixel_values": torch.stack([p for p, _ in items]),
            **model.tokenizer([c for _, c in items]),
            "valid": torch.ones(len(items), dtype=torch.bool),
        }

    return collate


def tcfg(**kw):
    base = dict(steps=1, batch_size=8, lr=1e-3, warmup_steps=1, checkpoint_every=50, log_every=1, min_batch=4)
    return TrainConfig(**{**base, **kw})


def records(folder):
    return [json.loads(line) for line in open(os.path.join(folder, METRICS))]


# ------------------------------------------------------------------ hand computations


def hand_switch(logits: torch.Tensor, k: int, mask: torch.Tensor | None = None) -> float:
    """E * sum_e f_e * P_e, token by token: f_e = share of the N*k routing slots on e, P_e = mean probability."""
    logits = logits.detach().double()
    e = logits.shape[1]
    rows = range(logits.shape[0]) if mask is None else [i for i in range(logits.shape[0]) if mask[i]]
    slots, probs = torch.zeros(e, dtype=torch.float64), torch.zeros(e, dtype=torch.float64)
    for i in rows:
        p = torch.exp(logits[i] - logits[i].max())
        p = p / p.sum()
        probs += p
        for j in torch.argsort(p, descending=True)[:k]:
            slots[j] += 1
    n = len(rows)
    # the formula's f_e per top-slot position, summed over the k positions, is (slots on e) / N
    return float(e * ((slots / n) * (probs / n)).sum())


def hand_z(logits: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    z = torch.logsumexp(logits.double(), dim=-1) ** 2
    return float((z.mean() if mask is None else z[mask].mean()).detach())


def tiny_moe(seed=0, experts=3):
    torch.manual_seed(seed)
    return sparse_upcycle(make_tiny_clip(seed), experts, top_k=2, noise=0.05, seed=seed)


# ------------------------------------------------------------------ z-loss


def test_z_loss_adds_weight_times_the_hand_computed_z_of_the_logged_router_logits(tmp_path):
    model = tiny_moe()
    runs = {}
    for w in (0.0, 0.1):
        m = copy.deepcopy(model)
        folder = str(tmp_path / f"z{w}")
        train(m, Pairs(), collate_for(m), tcfg(trainable="router", z_loss_weight=w), folder)
        runs[w] = (m, records(folder)[0])
    m, rec = runs[0.1]
    mask = m.tokenizer([Pairs().captions[0]])["attention_mask"].reshape(-1).bool()
    vision = torch.cat(m.router_logits("vision"))
    text = torch.cat(m.router_logits("text"))
    text_mask = mask.repeat(text.shape[0] // mask.shape[0])
    z = hand_z(vision) + 0.5 * hand_z(text, text_mask)  # text_balance_factor 0.5, padding masked
    assert rec["z_loss"] == pytest.approx(z, rel=1e-5)
    assert rec["loss"] - rec["clip"] == pytest.approx(0.1 * z, rel=1e-4)
    assert runs[0.0][1]["clip"] == pytest.approx(rec["clip"], rel=1e-6)  # same init, same batch
    assert rec["loss"] - runs[0.0][1]["loss"] == pytest.approx(0.1 * z, rel=1e-4)
    assert "z_loss" not in runs[0.0][1]  # balance and z weights both 0: no router term computed


# ------------------------------------------------------------------ balance scope


@pytest.mark.parametrize("global_balance", [True, False])
def test_balance_scope_tower_flattens_layers_and_layer_averages_per_layer_losses(global_balance):
    model = tiny_moe(1)
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    text = model.tokenizer(["a red cube", "blue sphere on the left", "a small green cone", "cube"])
    model.train()
    model.encode_image(pixels)
    model.encode_text(text["input_ids"], text["attention_mask"])
    vision, txt = model.router_logits("vision"), model.router_logits("text")
    mask = text["attention_mask"].reshape(-1).bool()
    assert not mask.all()  # padding present: the mask matters
    expected = {
        "tower": hand_switch(torch.cat(vision), 2) + 0.5 * hand_switch(torch.cat(txt), 2, mask.repeat(len(txt))),
        "layer": np.mean([hand_switch(x, 2) for x in vision]) + 0.5 * np.mean([hand_switch(x, 2, mask) for x in txt]),
    }
    assert abs(expected["tower"] - expected["layer"]) > 1e-4  # the two scopes differ on this batch
    for scope, value in expected.items():
        cfg = TrainConfig(balance_scope=scope, global_balance=global_balance)
        got = router_losses(model, text["attention_mask"], cfg)
        assert got["balance"].item() == pytest.approx(value, rel=1e-5), scope
        z = hand_z(torch.cat(vision)) + 0.5 * hand_z(torch.cat(txt), mask.repeat(len(txt)))
        assert got["z_loss"].item() == pytest.approx(z, rel=1e-5)  # the z-loss does not depend on the scope
    assert TrainConfig().balance_scope == "tower"  # the default: today's (and the official code's) form


def test_router_option_values_are_checked():
    with pytest.raises(ValueError, match="balance_scope"):
        TrainConfig(balance_scope="block")
    with pytest.raises(ValueError, match="distillation term needs both"):
        TrainConfig(distill_weight=0.5)
    with pytest.raises(ValueError, match="distillation term needs both"):
        TrainConfig(distill_data="/x")
    raw = {
        "base_model": "builtin:tiny-clip",
        "data": {"train": "t"},
        "moe": {"router_init": "kmeans", "router_init_samples": 0},
        "mcl": {"distill_weight": 1.0, "distill_data": "d"},
        "route": {"distill_weight": 1.0, "distill_data": "missing-folder"},
    }
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw, check_paths=True, base_dir="/nonexistent")
    text = str(e.value)
    for key in ("moe.router_init:", "moe.router_init_samples", "mcl.distill_weight", "route.distill_data"):
        assert key in text
    assert "/nonexistent/missing-folder" in text  # resolved against the config's folder


# ------------------------------------------------------------------ centroid init (the surgery)


def test_init_routers_points_rows_at_the_centroids_and_a_centroid_token_routes_to_its_expert():
    model = tiny_moe(3)
    g = torch.Generator().manual_seed(4)
    centroids = {tower: {b: torch.randn(3, 32, generator=g) + 2.0 for b in range(2)} for tower in ("vision", "text")}
    norms = {(t, b): m.router.weight.norm(dim=1) for t in ("vision", "text") for b, m in enumerate(model.moe_layers(t))}
    init_routers(model, centroids)
    for tower in ("vision", "text"):
        for b, layer in enumerate(model.moe_layers(tower)):
            w, c = layer.router.weight.detach(), centroids[tower][b]
            assert F.cosine_similarity(w, c, dim=1).min() > 0.9999
            torch.testing.assert_close(w.norm(dim=1), norms[(tower, b)])  # only the directions changed
            _, _, chosen = layer.route(c)  # token e = centroid e
            assert chosen[:, 0].tolist() == [0, 1, 2]
    init_routers(model, centroids, norm=5.0)
    assert model.moe_layers("vision")[0].router.weight.norm(dim=1).tolist() == pytest.approx([5.0] * 3)
    with pytest.raises(ValueError, match="no centroids"):
        init_routers(model, {"vision": centroids["vision"]})


# ------------------------------------------------------------------ distillation (the loop)


def perturbed_moe(seed=0):
    """Expert 0 = the base FFN; experts 1, 2 = the base with strongly perturbed FFNs (output far from the base)."""
    base = make_tiny_clip(seed)
    others = []
    for s in (1, 2):
        other = copy.deepcopy(base)
        g = torch.Generator().manual_seed(10 + s)
        with torch.no_grad():
            for ffns in find_ffns(other).values():
                for f in ffns:
                    for p in f.module.parameters():
                        p.add_(torch.randn(p.shape, generator=g) * 3 * p.std())
        others.append(other)
    torch.manual_seed(seed)
    return base, assemble_moe(base, [base, *others], top_k=2)


def embedding_distance(model, base, pixels):
    with torch.no_grad():
        return float((1 - F.cosine_similarity(model.encode_image(pixels), base.encode_image(pixels))).mean())


def test_distillation_pulls_the_moe_towards_the_base_on_its_images(tmp_path):
    base, moe = perturbed_moe()
    images = Pairs(48, seed=5)
    held = torch.stack([images[i][0] for i in range(len(images))])
    start = embedding_distance(moe.eval(), base, held)
    out = {}
    for w in (0.0, 1.0):
        m = copy.deepcopy(moe)
        folder = str(tmp_path / f"d{w}")
        distill = Distillation(copy.deepcopy(base), images, collate_for(m)) if w else None
        c = tcfg(steps=8, lr=3e-2, trainable="router", balance_weight=0.01, logit_scale=10.0)
        if w:
            c = TrainConfig(**{**c.__dict__, "distill_weight": w, "distill_data": "(in memory)"})
        train(m, Pairs(32), collate_for(m), c, folder, distill=distill)
        out[w] = (embedding_distance(m, base, held), records(folder))
    assert all("distill" in r for r in out[1.0][1]) and not any("distill" in r for r in out[0.0][1])
    first = out[1.0][1][0]
    assert first["loss"] == pytest.approx(first["clip"] + 0.01 * first["balance"] + first["distill"], rel=1e-5)
    # measured: 0.29 before, 0.45 after router training alone, 0.02 with the distillation term
    assert out[1.0][0] < out[0.0][0] - 0.1, (start, out[0.0][0], out[1.0][0])
    assert out[1.0][0] < start - 0.1
    with pytest.raises(ValueError, match="no distillation images"):
        train(copy.deepcopy(moe), Pairs(), collate_for(moe), c, str(tmp_path / "none"))


# ------------------------------------------------------------------ end to end in the pipeline


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_test_world(tmp_path_factory, train_size=64)


def test_pipeline_runs_every_router_option_and_centroid_rows_point_at_hand_centroids(tmp_path, world, base_dir):
    train_cfg = {"steps": 3, "batch_size": 16, "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 50, "min_batch": 4}
    raw = {
        "base_model": str(base_dir),
        "data": {"train": str(world / "train")},
        "device": "cpu",
        "cluster": {"image_clusters": 2, "text_clusters": 2},
        "mcl": train_cfg,
        "moe": {"experts": 3, "top_k": 2, "router_init": "centroid", "router_init_samples": 40},
        "route": {
            **train_cfg,
            "lr": 1e-2,
            "log_every": 1,
            "balance_scope": "layer",
            "z_loss_weight": 0.001,
            "distill_weight": 0.5,
            "distill_data": "world/train",  # relative to the config's folder
        },
    }
    os.symlink(world, tmp_path / "world")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg, run_dir = open_run(str(path), str(tmp_path / "run"))
    pipe = Pipeline(cfg, run_dir)
    pipe.prepare()
    pipe.route()

    with open(os.path.join(run_dir, "config.yaml")) as f:
        snapshot = yaml.safe_load(f)
    assert snapshot["moe"]["router_init"] == "centroid" and snapshot["route"]["balance_scope"] == "layer"
    assert snapshot["route"]["distill_data"] == str(tmp_path / "world/train")
    recs = records(pipe.out("route", None, "train"))
    assert all({"distill", "z_loss", "balance"} <= set(r) for r in recs)
    for r in recs:
        assert r["loss"] == pytest.approx(
            r["clip"] + 0.01 * r["balance"] + 0.001 * r["z_loss"] + 0.5 * r["distill"], rel=1e-5
        )
    record = json.load(open(pipe.out("assemble", None, "router_init")))
    assert record["samples_per_expert"][0] == 40

    # Hand centroids of vision block 1: mean over each sample's tokens of the LayerNorm before the FFN
    # (hooked at the norm's output, not where the pipeline hooks), over the samples each expert trained on.
    base = pipe.load(pipe.stage_model(0))
    labels = pipe.cluster(0)
    subset = np.sort(np.random.default_rng(cfg.seed).choice(np.flatnonzero(labels >= 0), 40, replace=False))
    block = base.vision_model.encoder.layers[1]
    seen = []
    hook = block.layer_norm2.register_forward_hook(lambda _m, _a, out: seen.append(out.mean(dim=1)))
    collate = ClipCollator(base.tokenizer, base.image_processor)
    with torch.no_grad():
        base.encode_image(collate([pipe.dataset()[int(i)] for i in subset])["pixel_values"])
    hook.remove()
    feats = seen[0]
    members = [subset, *(stage_samples(pipe, e) for e in (1, 2))]
    router = pipe.load(pipe.assemble()).moe_layers("vision")[1].router.weight.detach()
    for e, samples in enumerate(members):
        centroid = feats[torch.from_numpy(np.isin(subset, samples))].mean(dim=0)
        assert F.cosine_similarity(router[e], centroid, dim=0) > 0.9999
        scores = router @ centroid  # a token equal to centroid e scores highest on e (ties: identical rows)
        assert scores[e] >= scores.max() - 1e-5


# ------------------------------------------------------------------ the quality testbed's variants


def test_quality_recipe_variants_set_the_router_options(tmp_path):
    size = SIZES["tiny"]
    for name in ("tuned+centroid", "tuned+distill", "tuned+zloss", "tuned+layer-balance"):
        assert name in RECIPES
    cfg = pipeline_config(str(tmp_path), "tuned+centroid", size, 0, "builtin:tiny-clip", "cpu")
    assert cfg["moe"]["router_init"] == "centroid" and cfg["route"]["lr"] == RECIPES["tuned"]["router_lr"]
    cfg = pipeline_config(str(tmp_path), "tuned+distill", size, 0, "builtin:tiny-clip", "cpu", broad=str(tmp_path))
    assert cfg["route"]["distill_weight"] > 0 and cfg["route"]["distill_data"] == os.path.join(str(tmp_path), "train")
    assert pipeline_config(str(tmp_path), "tuned+zloss", size, 0, "builtin:tiny-clip", "cpu")["route"]["z_loss_weight"]
    cfg = pipeline_config(str(tmp_path), "tuned+layer-balance", size, 0, "builtin:tiny-clip", "cpu")
    assert cfg["route"]["balance_scope"] == "layer"
    assert "router_init" not in pipeline_config(str(tmp_path), "tuned", size, 0, "builtin:tiny-clip", "cpu")["moe"]


# ------------------------------------------------------------------ runs written before these options existed


def test_a_run_or_checkpoint_written_before_the_new_keys_is_not_a_changed_config(tmp_path, world, base_dir):
    from clipmoe.dmu.pipeline import _changed_keys
    from clipmoe.train.loop import CHECKPOINT

    raw = {"base_model": str(base_dir), "data": {"train": str(world / "train")}, "device": "cpu"}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg, run_dir = open_run(str(path), str(tmp_path / "run"))
    snapshot = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))
    del snapshot["moe"]["router_init"], snapshot["route"]["balance_scope"], snapshot["route"]["distill_weight"]
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(snapshot, f)
    assert _changed_keys(run_dir, cfg) == []
    snapshot["moe"]["experts"] = 2  # a real change is still named
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(snapshot, f)
    assert _changed_keys(run_dir, cfg) == ["moe.experts"]

    model = tiny_moe()
    folder = str(tmp_path / "train")
    c = tcfg(steps=2, checkpoint_every=1, trainable="router")
    train(copy.deepcopy(model), Pairs(), collate_for(model), c, folder)
    state = torch.load(os.path.join(folder, CHECKPOINT), weights_only=True)
    old = json.loads(state["config"])
    for key in ("balance_scope", "distill_weight", "distill_data"):
        del old[key]
    state["config"] = json.dumps(old)
    torch.save(state, os.path.join(folder, CHECKPOINT))
    train(copy.deepcopy(model), Pairs(), collate_for(model), c, folder)  # resumes from step 1, not refused
    assert [r["step"] for r in records(folder)] == [1, 2]


def test_unusable_distillation_images_stop_the_run_before_any_work(tmp_path, world, base_dir):
    (tmp_path / "empty").mkdir()
    raw = {
        "base_model": str(base_dir),
        "data": {"train": str(world / "train")},
        "device": "cpu",
        "route": {"distill_weight": 1.0, "distill_data": "empty"},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="route.distill_data: no usable samples"):
        open_run(str(path), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")
