"""The two recipes beyond the paper: sparse upcycling the CLIP-UP way (capacity factor with token dropping) and
cluster-partition experts with a fusion gate that keeps the base FFN (CLIP-FMoE's idea); by hand on small
inputs, saved and reloaded, and end to end on a tiny run."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModel

import clipmoe
from clipmoe.dmu.baselines import clip_up_phase, fmoe_partitions, rows
from clipmoe.dmu.config import ConfigError, config_from_dict
from clipmoe.dmu.pipeline import Pipeline, open_run
from clipmoe.model import kernels  # noqa: F401  (registers the fast kernels)
from clipmoe.model.moe import MoEFeedForward, capacity_mask, load_balancing_loss, router_z_loss
from clipmoe.model.surgery import assemble_moe, sparse_upcycle

FAST = ["loop", "grouped_mm", "auto"]


def expert_out(layer: MoEFeedForward, e: int, x: torch.Tensor) -> torch.Tensor:
    return layer.act(x @ layer.w1[e].T + layer.b1[e]) @ layer.w2[e].T + layer.b2[e]


def layer_of(num_experts=4, top_k=2, seed=0, **options) -> MoEFeedForward:
    torch.manual_seed(seed)
    layer = MoEFeedForward(8, 16, num_experts, top_k, "quick_gelu", **options)
    with torch.no_grad():
        layer.b1.normal_()
        layer.b2.normal_()
        layer.router.weight.normal_()
    return layer


# ---------------------------------------------------------------- capacity factor with token dropping


def test_capacity_drops_by_hand():
    # 4 tokens, top-2 of 4 experts, factor 1: capacity = ceil(1 * 4 * 2 / 4) = 2 pairs per expert. First slots
    # go first (token order), then second slots: expert 0 gets t0, t1 (slot 0), then t2's slot 0 and t3's slot
    # 1 overflow it.
    experts = torch.tensor([[0, 1], [0, 1], [0, 2], [3, 0]])
    keep = capacity_mask(experts, 4, 1.0)
    assert keep.tolist() == [[True, True], [True, True], [False, True], [True, False]]
    assert capacity_mask(experts, 4, 2.0).all()  # capacity 4: nothing dropped
    # capacity ceil(0.5 * 4 * 2 / 4) = 1: the first pair of each expert in slot-major order
    assert capacity_mask(experts, 4, 0.5).tolist() == [[True, True], [False, False], [False, True], [True, False]]


def test_dropped_slots_output_zero_and_the_rest_is_unchanged():
    layer = layer_of(capacity_factor=0.5).train()
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(3))
    probs = F.linear(x, layer.router.weight).softmax(-1)
    w, idx = probs.topk(2, -1)
    w = w / w.sum(-1, keepdim=True)
    keep = capacity_mask(idx, 4, 0.5)  # capacity ceil(0.5 * 12 * 2 / 4) = 3
    assert (~keep).sum() > 0
    expected = torch.zeros(12, 8)
    for t in range(12):
        for s in range(2):
            if keep[t, s]:
                expected[t] += w[t, s] * expert_out(layer, int(idx[t, s]), x[t])
    layer.dispatch = "eager"
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert layer.last_dropped.item() == pytest.approx((~keep).float().mean().item())
    # at inference the capacity is off unless asked for
    layer.eval()
    dropless = layer(x)
    assert layer.last_dropped is None and not torch.allclose(dropless, expected)
    layer.capacity_at_inference = True
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", FAST)
@pytest.mark.parametrize(
    "options", [{"capacity_factor": 0.6}, {"always_on_base": True}, {"always_on_base": True, "capacity_factor": 0.6}]
)
def test_fast_kernels_match_the_plain_path(kernel, options):
    base = layer_of(top_k=2, **options).train()
    x = torch.randn(2, 15, 8, generator=torch.Generator().manual_seed(4), requires_grad=True)
    g = torch.randn(2, 15, 8, generator=torch.Generator().manual_seed(5))
    results = []
    for dispatch in ("eager", kernel):
        layer = copy.deepcopy(base)
        layer.dispatch = dispatch
        xx = x.detach().clone().requires_grad_(True)
        y = layer(xx)
        logits = layer.last_router_logits  # the balance and z losses see the routed experts only
        loss = (y * g).sum() + load_balancing_loss(logits, layer.top_k) + router_z_loss(logits)
        loss.backward()
        results.append([y, xx.grad, *(p.grad for p in (layer.router.weight, layer.w1, layer.b1, layer.w2, layer.b2))])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("options", [{"capacity_factor": 0.6}, {"always_on_base": True, "capacity_factor": 0.6}])
def test_grouped_mm_matches_the_plain_path_on_cuda(options):
    torch.manual_seed(0)
    base = MoEFeedForward(64, 256, 4, 2, "quick_gelu", **options).cuda().train()
    x, g = torch.randn(300, 64, device="cuda"), torch.randn(300, 64, device="cuda")
    outs = []
    for dispatch in ("eager", "grouped_mm"):
        layer = copy.deepcopy(base)
        layer.dispatch = dispatch
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(xx)
        ((y.float() * g).sum() + router_z_loss(layer.last_router_logits)).backward()
        outs.append([y.float(), xx.grad, layer.w1.grad, layer.router.weight.grad])
    for a, b in zip(*outs):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-1, rtol=5e-2)


# ---------------------------------------------------------------- the fusion gate that keeps the base FFN


@pytest.mark.parametrize("dispatch", ["eager", "loop"])
def test_fusion_gate_is_base_plus_weighted_deltas_by_hand(dispatch):
    layer = layer_of(num_experts=4, top_k=2, always_on_base=True).eval()
    layer.dispatch = dispatch
    x = torch.randn(9, 8, generator=torch.Generator().manual_seed(6))
    p = F.linear(x, layer.router.weight).softmax(-1)  # over all 4 logits, the base's included
    expected = torch.zeros(9, 8)
    for t in range(9):
        chosen = (p[t, 1:].topk(2).indices + 1).tolist()  # top-2 of experts 1..3: never the base
        base = expert_out(layer, 0, x[t])
        expected[t] = base + sum(p[t, e] * (expert_out(layer, e, x[t]) - base) for e in chosen)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    # the router statistics the losses and the routing analysis read cover the routed experts only
    assert torch.isinf(layer.last_router_logits[:, 0]).all() and torch.isfinite(layer.last_router_logits[:, 1:]).all()
    assert layer.active_experts == 3
    with pytest.raises(ValueError, match="top_k must be in"):
        MoEFeedForward(8, 16, 3, 3, always_on_base=True)  # only 2 experts are routed


def test_fusion_gate_with_every_other_expert_is_a_soft_gate_on_the_base():
    layer = layer_of(num_experts=3, top_k=2, always_on_base=True).eval()
    x = torch.randn(5, 8)
    p = F.linear(x, layer.router.weight).softmax(-1)
    with torch.no_grad():
        expected = sum(p[:, e, None] * expert_out(layer, e, x) for e in range(3))  # the base keeps exactly p_0
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- saved, reloaded


def test_options_are_saved_and_reload_with_clipmoe_and_the_remote_code(tmp_path):
    from conftest import make_tiny_clip

    base = make_tiny_clip(0)
    others = [make_tiny_clip(0) for _ in range(2)]
    with torch.no_grad():
        for i, m in enumerate(others):
            for p in m.vision_model.encoder.layers[1].mlp.parameters():
                p.add_(0.1 * (i + 1))
    models = {
        "fused": assemble_moe(base, [base, *others], top_k=1, always_on_base=True),
        "capacity": sparse_upcycle(base, 3, noise=0.05, capacity_factor=0.5, capacity_at_inference=True),
    }
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32)
    for name, model in models.items():
        model.save_pretrained(tmp_path / name)
        spec = json.loads((tmp_path / name / "config.json").read_text())["moe"]
        assert spec["always_on_base"] == (name == "fused")
        assert spec["capacity_factor"] == (0.5 if name == "capacity" else 0.0)
        with torch.no_grad():
            expected = model.eval().encode_image(pixels)
            for loaded in (
                clipmoe.load(tmp_path / name),
                AutoModel.from_pretrained(tmp_path / name, trust_remote_code=True),
            ):
                layer = loaded.vision_model.encoder.layers[1].mlp
                assert layer.always_on_base == (name == "fused") and layer.capacity_factor == spec["capacity_factor"]
                torch.testing.assert_close(loaded.eval().encode_image(pixels), expected, atol=1e-5, rtol=1e-5)
        if name == "capacity":
            assert models[name].vision_model.encoder.layers[1].mlp.last_dropped is not None  # dropped at inference
    counts = models["fused"].parameter_counts()
    per_layer_expert = sum(
        p[0].numel()
        for p in (
            models["fused"].moe_layers()[0].w1,
            models["fused"].moe_layers()[0].b1,
            models["fused"].moe_layers()[0].w2,
            models["fused"].moe_layers()[0].b2,
        )
    )
    # top-1 of 2 routed experts + the base: 1 of 3 experts idle per layer
    assert counts["total"] - counts["active"] == per_layer_expert * len(models["fused"].moe_layers())


# ---------------------------------------------------------------- partitions and config


def test_partitions_by_hand():
    labels = np.array([0] * 5 + [1] * 4 + [2] * 3 + [3] * 2 + [4] * 1 + [-1] * 3)
    # balanced: 0 (5) -> A, 1 (4) -> B, 2 (3) -> C, 3 (2) -> C (3 < 4 < 5), 4 (1) -> B (4 < 5 = 5)
    assert fmoe_partitions(labels, 3) == [[0], [1, 4], [2, 3]]
    assert fmoe_partitions(labels, 3, "largest") == [[0], [1], [2, 3, 4]]
    with pytest.raises(ValueError, match="6 partitions need at least 6 non-empty clusters, the data has 5"):
        fmoe_partitions(labels, 6)


def test_recipe_config_is_checked():
    raw = {"base_model": "builtin:tiny-clip", "data": {"train": "x"}, "moe": {"experts": 4}}
    cfg = config_from_dict(raw, check_paths=False)
    assert cfg.baselines.clip_up.capacity_factor == 1.25 and cfg.baselines.fmoe.partitions == "balanced"
    bad = {
        **raw,
        "cluster": {"image_clusters": 1, "text_clusters": 2},
        "baselines": {"clip_up": {"capacity_factor": -1, "expert_lr_scale": 0}, "fmoe": {"partitions": "random"}},
    }
    with pytest.raises(ConfigError) as e:
        config_from_dict(bad, check_paths=False)
    for needle in (
        "baselines.clip_up.capacity_factor: must be >= 0",
        "baselines.clip_up.expert_lr_scale: must be > 0",
        "baselines.fmoe.partitions: must be one of balanced, largest",
        "baselines.fmoe: 3 partition experts need at least as many stage-0 clusters, but cluster makes 2",
    ):
        assert needle in str(e.value), needle
    up = {**raw, "baselines": {"clip_up": {"expert_lr_scale": 0.25}}}
    phase = clip_up_phase(config_from_dict(up, check_paths=False))
    assert (phase.router_lr, phase.lr, phase.z_loss_weight, phase.trainable) == (1e-6, 2.5e-7, 0.001, "router+experts")
    with pytest.raises(ConfigError, match=r"moe.top_k: 4 is impossible with 4 experts \(expert 0 always on\)"):
        config_from_dict({**raw, "moe": {"experts": 4, "top_k": 4, "always_on_base": True}}, check_paths=False)


# ---------------------------------------------------------------- end to end, tiny


def recipe_config(tmp_path, world, base_dir, **baselines) -> str:
    train = {"steps": 4, "batch_size": 16, "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 2, "min_batch": 4}
    raw = {
        "base_model": str(base_dir),
        "data": {"train": str(world / "train"), "eval": str(world / "eval")},
        "device": "cpu",
        "cluster": {"image_clusters": 2, "text_clusters": 2},
        "mcl": dict(train),
        "moe": {"experts": 3, "top_k": 2},
        "route": {**train, "lr": 1e-2},
        "eval": {"batch_size": 64, "throughput_batch": 4},
        "baselines": {
            "enabled": ["clip_up", "fmoe"],
            "stages": False,
            "clip_up": {"capacity_factor": 0.5, "z_loss_weight": 0.01, "expert_lr_scale": 0.5},
            **baselines,
        },
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_both_recipes_under_the_epoch_rule_need_no_dmu_phase(tmp_path, world, base_dir):
    cfg, run_dir = open_run(recipe_config(tmp_path, world, base_dir, budgets=["epoch"]), str(tmp_path / "run"))
    pipe = Pipeline(cfg, run_dir)
    assert [r.id for r in pipe.baseline_runs()] == ["clip_up-epoch", "fmoe-epoch"]
    for run in pipe.baseline_runs():
        pipe.baseline(run.id)
    assert not os.path.exists(pipe.path("moe")) and not os.path.exists(pipe.path("stage1"))  # no MCL, no routing
    recs = [json.loads(line) for line in open(pipe.path("baselines/clip_up-epoch/train/metrics.jsonl"))]
    assert recs[-1]["step"] == 96 // 16 and all(0 < r["dropped"] < 1 for r in recs)  # dropping, measured
    up = clipmoe.load(pipe.path("baselines/clip_up-epoch/model"))
    assert up.config.moe["capacity_factor"] == 0.5 and up.config.moe["num_experts"] == 3
    summary = json.load(open(pipe.path("baselines/fmoe-epoch/extraction.json")))
    labels = np.load(pipe.path("stage0/cluster/labels.npy"))  # the run's own stage-0 clusters
    assert sorted(c for p in summary["parts"] for c in p["clusters"]) == np.unique(labels[labels >= 0]).tolist()
    for p in summary["parts"]:  # one pass over its own partition: its one-cluster batches, at most one short each
        assert p["steps"] <= p["samples"] // 16 + len(p["clusters"])
    moe = clipmoe.load(pipe.path("baselines/fmoe-epoch/model"))
    assert moe.config.moe["always_on_base"] and moe.moe_layers()[0].active_experts == 3


@pytest.mark.slow
def test_both_recipes_end_to_end_under_both_budget_rules(tmp_path, world, base_dir):
    cfg, run_dir = open_run(recipe_config(tmp_path, world, base_dir), str(tmp_path / "run"))
    pipe = Pipeline(cfg, run_dir)
    assert [r.id for r in pipe.baseline_runs()] == ["clip_up-epoch", "clip_up-steps", "fmoe-epoch", "fmoe-steps"]
    report = open(pipe.run()).read()
    base = clipmoe.load(pipe.stage_model(0)).state_dict()

    def records(sub):
        return [json.loads(line) for line in open(pipe.path("baselines", sub, "metrics.jsonl"))]

    # CLIP-UP: 3 noisy upcycled experts, token dropping while training (measured), dropless saved model
    for rule, steps in (("epoch", 96 // 16), ("steps", 3 * 4)):
        recs = records(f"clip_up-{rule}/train")
        assert recs[-1]["step"] == steps and all(0 < r["dropped"] < 1 for r in recs)
        up = clipmoe.load(pipe.path(f"baselines/clip_up-{rule}/model"))
        assert up.config.moe["capacity_factor"] == 0.5 and not up.config.moe["capacity_at_inference"]
        assert up.config.moe["num_experts"] == 3 and up.config.moe["expert_dropout"] == 0.0

    # fmoe: 2 partitions of the 4 stage-0 clusters, one FFN-only expert each, under the budget rule's share
    labels = np.load(pipe.path("stage0/cluster/labels.npy"))
    for rule in ("epoch", "steps"):
        summary = json.load(open(pipe.path(f"baselines/fmoe-{rule}/extraction.json")))
        parts = summary["parts"]
        assert sorted(c for p in parts for c in p["clusters"]) == sorted(np.unique(labels[labels >= 0]).tolist())
        assert sum(p["samples"] for p in parts) == (labels >= 0).sum()
        assert summary["max_s"] == max(p["train_s"] for p in parts) and summary["sum_s"] >= summary["max_s"]
        if rule == "steps":  # all MCL stages' steps (2 x 4), shared in proportion to the partitions' sizes
            assert sum(p["steps"] for p in parts) == pytest.approx(8, abs=1)
        moe = clipmoe.load(pipe.path(f"baselines/fmoe-{rule}/model"))
        assert moe.config.moe["always_on_base"] and moe.config.moe["num_experts"] == 3
        key = "vision_model.encoder.layers.1.mlp.fc1.weight"
        torch.testing.assert_close(moe.vision_model.encoder.layers[1].mlp.w1[0], base[key])  # the base FFN kept
        for p in range(2):
            tuned = clipmoe.load(pipe.path(f"baselines/fmoe-{rule}/partition{p}/model")).state_dict()
            changed = {k for k in base if not torch.equal(base[k], tuned[k])}
            assert changed and all(".mlp." in k for k in changed)
            torch.testing.assert_close(moe.vision_model.encoder.layers[1].mlp.w1[1 + p], tuned[key])
        assert records(f"fmoe-{rule}/train")[-1]["step"] == cfg.route.steps  # the gate: DMU's routing phase
    for line in (
        "| CLIP-UP upcycling (1 epoch) |",
        "| CLIP-UP upcycling (equal steps) |",
        "| cluster-partition fusion (1 epoch) |",
        "| cluster-partition fusion (equal steps) |",
        "## Expert extraction wall time",
        "| MCL stages (sequential) |",
    ):
        assert line in report, line
    names = [r.name for r in rows(pipe)]
    assert names[-5:-1] == [
        "CLIP-UP upcycling (1 epoch)",
        "CLIP-UP upcycling (equal steps)",
        "cluster-partition fusion (1 epoch)",
        "cluster-partition fusion (equal steps)",
    ]
    fm = next(r for r in rows(pipe) if r.name == "cluster-partition fusion (1 epoch)")
    phases = {"MCL stage": {"trainable": 10}, "router training": {"trainable": 30}}
    assert fm.trainable(phases, cfg) == 2 * 10 + 30 and fm.extraction["parts"]
    assert os.path.exists(pipe.path("eval", "cluster_partition_fusion__1_epoch.json"))


def test_the_ablation_and_the_uniform_control_build_under_an_always_on_base(tmp_path, world, base_dir):
    """`moe.always_on_base` is a DMU option the config accepts: "w/o MCL" (2 experts, the base always on) routes
    its one other expert, and the uniform mixture, where every expert is on anyway, ignores it; both used to
    refuse only after the MCL stages had trained."""
    from test_pipeline import write_config

    over = {"moe": {"experts": 3, "top_k": 2, "always_on_base": True}, "baselines": {"budgets": ["epoch"]}}
    cfg, run_dir = open_run(write_config(tmp_path, world, base_dir, **over), str(tmp_path / "run"))
    pipe = Pipeline(cfg, run_dir)
    for run in ("wo_mcl-epoch", "uniform"):
        pipe.baseline(run)
    ablation = clipmoe.load(pipe.path("baselines/wo_mcl-epoch/model"))
    assert ablation.config.moe["always_on_base"] and ablation.moe_layers()[0].active_experts == 2
    uniform = clipmoe.load(pipe.path("baselines/uniform/model"))
    assert uniform.config.moe["uniform"] and not uniform.config.moe["always_on_base"]
