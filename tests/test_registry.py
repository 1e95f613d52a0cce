"""The stage and baseline registries drive the CLI, the plan, the rows and the budget rules; the CLI stays light."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import yaml
from PIL import Image

import clipmoe
from clipmoe import cli
from clipmoe.dmu.baselines import BASELINES, baseline_runs, rows
from clipmoe.dmu.budgets import BUDGETS, consumed_samples, dmu_phases
from clipmoe.dmu.config import ConfigError, config_from_dict, load_config
from clipmoe.dmu.flops import training_flops_per_sample
from clipmoe.dmu.pipeline import Pipeline, open_run, print_plan
from clipmoe.dmu.stages import STAGES, plan
from clipmoe.train.samplers import GlobalBatchSampler
from conftest import make_tiny_clip


def cfg_of(**over):
    raw = {"base_model": "builtin:tiny-clip", "data": {"train": "x"}, "moe": {"experts": 3}}
    raw.update(over)
    return config_from_dict(raw, check_paths=False)


def test_every_stage_is_a_subcommand_and_the_run_follows_the_registry(tmp_path):
    names = [c.name for c in cli.COMMANDS]
    assert all(s.name in names for s in STAGES)
    tasks = [s.task(i) for s, i in plan(Pipeline(cfg_of(), str(tmp_path)))]
    assert tasks[:7] == ["prepare", "embed 0", "cluster 0", "mcl 1", "embed 1", "cluster 1", "mcl 2"]
    assert tasks[7:9] == ["assemble", "route"] and tasks[-1] == "report"
    assert [t for t in tasks if t.startswith("baselines")] == [
        "baselines dense-epoch",
        "baselines dense-steps",
        "baselines upcycle-epoch",
        "baselines upcycle-steps",
        "baselines wo_mcl-epoch",
        "baselines wo_mcl-steps",
        "baselines random_routers",
        "baselines uniform",
        "baselines soup",
        "baselines clip_up-epoch",
        "baselines clip_up-steps",
        "baselines fmoe-epoch",
        "baselines fmoe-steps",
    ]


def test_help_imports_neither_torch_nor_transformers():
    code = (
        "import sys, clipmoe.cli as c\n"
        "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
    assert out.returncode == 0, out.stderr
    assert "mcl" in out.stdout and "baselines" in out.stdout


def test_one_row_per_baseline_and_budget_rule(tmp_path):
    pipe = Pipeline(cfg_of(baselines={"budgets": ["epoch"], "enabled": ["dense", "wo_mcl", "soup"]}), str(tmp_path))
    names = [r.name for r in rows(pipe)]
    assert names == [
        "base",
        "MCL stage 1",
        "MCL stage 2",
        "dense fine-tune (1 epoch)",
        "w/o MCL (1 epoch)",
        "expert soup",
        "DMU CLIP-MoE",
    ]
    wo = next(r for r in rows(pipe) if r.name.startswith("w/o MCL"))
    assert wo.rule == "epoch" and wo.compare and wo.slug == "w_o_mcl__1_epoch"
    phases = {"MCL stage": {"trainable": 10}, "router training": {"trainable": 30}}  # 3 experts: 10 per expert
    assert wo.trainable(phases, pipe.cfg) == 10 + 20
    # The equal-steps rule depends on every DMU phase; the paper's epoch rule does not.
    runs = {r.id: r for r in baseline_runs(cfg_of())}
    assert "route" in runs["dense-steps"].sections() and "route" not in runs["dense-epoch"].sections()
    assert set(BUDGETS) >= {"epoch", "steps", "samples", "flops"}
    assert {b.key for b in BASELINES} >= {"dense", "upcycle", "wo_mcl", "random_routers", "uniform", "soup"}


def test_unknown_baselines_and_budget_rules_are_config_errors():
    with pytest.raises(ConfigError, match=r"baselines.budgets: unknown rule\(s\) \['watts'\]"):
        cfg_of(baselines={"budgets": ["watts"]})
    with pytest.raises(ConfigError, match=r"unknown baseline\(s\) \['densest'\]"):
        baseline_runs(cfg_of(baselines={"enabled": ["densest"]}))


def test_run_wide_settings_are_set_once():
    cfg = cfg_of(seed=3, precision="bf16", data={"train": "x", "num_workers": 2}, mcl={"seed": 3})
    assert (cfg.mcl.seed, cfg.route.precision, cfg.mcl.num_workers) == (3, "bf16", 2)
    with pytest.raises(ConfigError) as e:
        cfg_of(seed=3, mcl={"seed": 4}, route={"precision": "bf16", "num_workers": 1})
    for needle in ("mcl.seed: 4 conflicts with seed: 3", "route.precision", "route.num_workers"):
        assert needle in str(e.value)


def test_partial_phase_sections_keep_their_own_defaults():
    cfg = cfg_of(mcl={"lr": 0.5}, route={"steps": 3})
    assert (cfg.mcl.lr, cfg.mcl.trainable, cfg.mcl.weight_decay) == (0.5, "ffn", 0.2)
    assert (cfg.route.steps, cfg.route.trainable, cfg.route.lr, cfg.route.balance_weight) == (3, "router", 1e-6, 0.01)


def test_relative_paths_follow_the_config_file_and_the_snapshot_works_from_anywhere(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "data" / "train").mkdir(parents=True)
    for i in range(8):  # a run checks its config against the data before writing anything
        Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(project / "data" / "train" / f"{i}.png")
        (project / "data" / "train" / f"{i}.txt").write_text(f"sample {i}")
    (project / "configs").mkdir()
    cfg_path = project / "configs" / "run.yaml"
    cfg_path.write_text(yaml.safe_dump({"base_model": "builtin:tiny-clip", "data": {"train": "../data/train"}}))
    monkeypatch.chdir(tmp_path)  # not the config's folder
    cfg, run_dir = open_run(str(cfg_path), str(tmp_path / "run"))
    assert cfg.data.train == str(project / "data" / "train")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    snapshot = load_config(os.path.join(run_dir, "config.yaml"))  # validates its paths from another folder
    assert snapshot.data.train == cfg.data.train
    print_plan(snapshot, run_dir)  # the same config: not refused


# ------------------------------------------------------------------------------------------ controls and budget rules

HAND_CONFIG = {  # a CLIP small enough to count by hand: vision 2 blocks, d 4, h 8, 4 patches + class = 5 tokens
    "model_type": "clip",
    "projection_dim": 2,
    "vision_config": {
        "hidden_size": 4,
        "intermediate_size": 8,
        "num_hidden_layers": 2,
        "image_size": 8,
        "patch_size": 4,
    },
    "text_config": {"hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 2, "max_position_embeddings": 6},
}


def test_training_flops_per_sample_match_a_hand_count():
    """Per op and sample, vision (T=5): patch embedding 2*3*16*4*4 = 1536, attention projections 8*5*16 = 640,
    attention products 4*25*4 = 400, FFN 4*5*4*8 = 640, projection 2*4*2 = 16; text (T=6): 768, 576, 768, 16.
    Forward: vision 1536 + 2*(640+400+640) + 16 = 4912, text 2*(768+576+768) + 16 = 4240."""
    # all: weight gradients of every weighted op; input gradients of everything above the embeddings
    # (attention products twice). Vision 4912 + 4112 + (2576 + 2*800) = 13200, text 4240 + 3088 + (3088 + 2*1152).
    assert training_flops_per_sample(HAND_CONFIG, "all") == 13200 + 12720
    # ffn: weight gradients of the FFNs; input gradients above block 0's FFN only (block 1 and the projection).
    assert training_flops_per_sample(HAND_CONFIG, "ffn") == (4912 + 1280 + 2096) + (4240 + 1536 + 2704)
    # ffn, last block: weight gradient of block 1's FFN, input gradient of the projection alone
    assert training_flops_per_sample(HAND_CONFIG, "ffn", last_n_blocks=1) == (4912 + 640 + 16) + (4240 + 768 + 16)
    # a 3-expert top-2 MoE in every block, routers trained: router 2*T*4*3 (120 / 144) + 2 experts (1280 / 1536)
    # forward; weight gradients of the routers; input gradients above block 0's MoE layer.
    moe = {**HAND_CONFIG, "moe": {"num_experts": 3, "top_k": 2, "layers": {"vision": [0, 1], "text": [0, 1]}}}
    vision = (1536 + 2 * (640 + 400 + 1400) + 16) + 2 * 120 + (640 + 2 * 400 + 1400 + 16)
    text = (2 * (768 + 576 + 1680) + 16) + 2 * 144 + (768 + 2 * 576 + 1680 + 16)
    assert training_flops_per_sample(moe, "router") == vision + text == 9528 + 9968
    # a uniform mixture saves top_k = E: every expert runs for every token
    uniform = {**moe, "moe": {**moe["moe"], "top_k": 3, "uniform": True}}
    assert training_flops_per_sample(uniform, "router") - training_flops_per_sample(moe, "router") == (640 + 768) * (
        2 + 1
    )  # one more expert in block 0 (forward) and block 1 (forward + input gradient), per tower
    with pytest.raises(ValueError, match="trainable must be one of"):
        training_flops_per_sample(HAND_CONFIG, "experts")


def test_sampler_counts_the_samples_of_its_first_batches():
    """40 samples in batches of 16: every epoch is 16, 16 and a shrunk 8, in a shuffled order."""
    sampler = GlobalBatchSampler(40, 16)
    assert sampler.samples_in(3) == 40 and sampler.samples_in(6) == 80
    assert sampler.samples_in(4) == 40 + len(sampler.plan(1)[0])
    assert sampler.batches_for(40) == 3 and sampler.batches_for(80) == 6 and sampler.batches_for(41) == 4
    assert sampler.batches_for(57) == 5  # 17 more: two batches of epoch 1 whatever their order (16+8, 8+16, 16+16)


def _images(folder, n: int) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (32, 32), (5 * i, 100, 0)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(["a red cube", "a blue sphere", "a small green cone"][i % 3])


def test_samples_and_flops_rules_derive_steps_from_dmu_phases(tmp_path):
    """Finished DMU phases (2 MCL stages + routing, their train_stats.json as the training loop writes them) of a
    48-sample run; baselines draw random batches of 16, so S samples take ceil(S / 16) steps."""
    _images(tmp_path / "data", 48)
    cfg = config_from_dict(
        {"base_model": "builtin:tiny-clip", "data": {"train": str(tmp_path / "data")}, "moe": {"experts": 3}},
        check_paths=False,
    )
    cfg.mcl.batch_size = cfg.route.batch_size = 16
    pipe = Pipeline(cfg, str(tmp_path / "run"))
    base = make_tiny_clip()
    base.save_pretrained(pipe.stage_model(0))
    clipmoe.assemble_moe(base, [base] * 3, cfg.moe).save_pretrained(pipe.out("assemble", None, "model"))
    for path, steps, samples in (
        (pipe.out("mcl", 1, "stats"), 5, 70),
        (pipe.out("mcl", 2, "stats"), 4, 60),
        (pipe.out("route", None, "stats"), 6, 90),
    ):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"steps": steps, "samples": samples}, f)
    phases = dmu_phases(pipe)
    assert [(p.name, p.steps, p.samples) for p in phases] == [("mcl 1", 5, 70), ("mcl 2", 4, 60), ("route", 6, 90)]
    f_mcl = training_flops_per_sample(base.config.to_dict(), "ffn")
    f_route = training_flops_per_sample(clipmoe.load(pipe.out("assemble", None, "model")).config.to_dict(), "router")
    assert phases[0].flops_per_sample == f_mcl and phases[2].flops_per_sample == f_route > f_mcl

    dense = replace(cfg.mcl, trainable="all")
    assert BUDGETS["steps"].apply(pipe, dense, "all", base).steps == 15
    assert BUDGETS["samples"].apply(pipe, dense, "all", base).steps == math.ceil(220 / 16) == 14
    assert BUDGETS["samples"].apply(pipe, cfg.mcl, "mcl", base).steps == math.ceil(130 / 16) == 9  # w/o MCL's FFN
    f_dense = training_flops_per_sample(base.config.to_dict(), "all")
    samples = round((130 * f_mcl + 90 * f_route) / f_dense)
    assert BUDGETS["flops"].apply(pipe, dense, "all", base).steps == math.ceil(samples / 16)
    assert 0 < samples < 220  # full fine-tuning costs more per sample than DMU's FFN-only and router-only phases
    # FFN-only fine-tuning under equal FLOPs to the MCL stages sees exactly their samples
    assert BUDGETS["flops"].apply(pipe, cfg.mcl, "mcl", base).steps == math.ceil(130 / 16)

    # Stats written before the count: exact for whole epochs of the plan, refused otherwise.
    assert consumed_samples({"steps": 8, "batches_per_epoch": 4, "plan": {"samples": 60}}, 1, "s.json") == 120
    with pytest.raises(ValueError, match=r"s.json does not record how many samples .* rerun that phase"):
        consumed_samples({"steps": 5, "batches_per_epoch": 4, "plan": {"samples": 60}}, 1, "s.json")


@pytest.mark.slow
def test_controls_and_new_rules_run_end_to_end_and_reload_identically(tmp_path, tiny_clip_dir, capsys):
    """A tiny run (2 experts: the base + 1 MCL stage): the random-routers and uniform-mixture rows are built
    without training and reload through clipmoe.load with identical outputs; dense fine-tuning under equal
    samples / equal FLOPs trains the derived number of steps; status and rows list them."""
    _images(tmp_path / "data", 48)
    train = {"steps": 2, "batch_size": 16, "lr": 1e-3, "warmup_steps": 1, "min_batch": 4}
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "base_model": tiny_clip_dir,
                "data": {"train": str(tmp_path / "data")},
                "device": "cpu",
                "cluster": {"image_clusters": 2, "text_clusters": 2},
                "mcl": train,
                "moe": {"experts": 2, "top_k": 1},
                "route": {**train, "lr": 1e-2},
                "baselines": {"enabled": ["dense", "random_routers", "uniform"], "budgets": ["samples", "flops"]},
            }
        )
    )
    pipe = Pipeline(*open_run(str(cfg_path), str(tmp_path / "run")))
    runs = [r.id for r in pipe.baseline_runs()]
    assert runs == ["dense-samples", "dense-flops", "random_routers", "uniform"]
    assert [t for t in pipe.status() if t.startswith("baselines")] == [f"baselines {r}" for r in runs]
    assert [r.name for r in pipe.rows()][2:5] == [
        "dense fine-tune (equal samples)",
        "dense fine-tune (equal FLOPs)",
        "random routers",
    ]
    for run in runs:
        pipe.baseline(run)

    def last_step(sub):
        return [json.loads(line)["step"] for line in open(pipe.path("baselines", sub, "metrics.jsonl"))][-1]

    consumed = [json.load(open(pipe.out(p, i, "stats")))["samples"] for p, i in (("mcl", 1), ("route", None))]
    assert consumed[1] == 2 * 16 and 0 < consumed[0] <= 32  # MCL batches come from one cluster: may be smaller
    assert last_step("dense-samples/train") == math.ceil(sum(consumed) / 16)
    base = clipmoe.load(pipe.stage_model(0))
    per_sample = [p.flops_per_sample for p in dmu_phases(pipe)]
    samples = round(
        sum(n * f for n, f in zip(consumed, per_sample)) / training_flops_per_sample(base.config.to_dict(), "all")
    )
    assert last_step("dense-flops/train") == math.ceil(samples / 16)

    init, routed = clipmoe.load(pipe.out("assemble", None, "model")), clipmoe.load(pipe.out("route", None, "model"))
    pixels = torch.randn(2, 3, 32, 32)
    text = base.tokenizer(["a red cube", "a small green cone"])
    for key in ("random_routers", "uniform"):
        saved = clipmoe.load(pipe.out("baselines", key, "model"))
        rebuilt = pipe.baseline_run(key).baseline.build(pipe, None, pipe.out("baselines", key, "folder"))
        with torch.no_grad():
            for encode in (lambda m: m.encode_image(pixels), lambda m: m.encode_text(**text)):
                torch.testing.assert_close(encode(saved), encode(rebuilt), atol=0, rtol=0)
        assert saved.config.moe["expert_dropout"] == 0.0
    random_routers = clipmoe.load(pipe.out("baselines", "random_routers", "model"))
    layer = random_routers.vision_model.encoder.layers[0].mlp
    assert torch.equal(layer.router.weight, init.vision_model.encoder.layers[0].mlp.router.weight)  # untrained
    assert not torch.equal(layer.router.weight, routed.vision_model.encoder.layers[0].mlp.router.weight)
    assert torch.equal(layer.w1, routed.vision_model.encoder.layers[0].mlp.w1)  # DMU's experts
    uniform = clipmoe.load(pipe.out("baselines", "uniform", "model"))
    assert uniform.config.moe["uniform"] and uniform.config.moe["top_k"] == 2
    assert torch.equal(uniform.vision_model.encoder.layers[0].mlp.w1, layer.w1)

    capsys.readouterr()
    print_plan(pipe.cfg, pipe.run_dir, check=False)  # what `clipmoe status` prints
    plan_text = capsys.readouterr().out
    for line in ("[done] baselines dense-flops", "[done] baselines random_routers", "[done] baselines uniform"):
        assert line in plan_text, line
    assert f"baselines under 'equal FLOPs': {BUDGETS['flops'].rule}" in plan_text
    assert "uniform mixture" in plan_text and "dense fine-tune (equal samples)" in plan_text
