"""The stage and baseline registries drive the CLI, the plan, the rows and the budget rules; the CLI stays light."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from PIL import Image

from clipmoe import cli
from clipmoe.dmu.baselines import BASELINES, baseline_runs, rows
from clipmoe.dmu.budgets import BUDGETS
from clipmoe.dmu.config import ConfigError, config_from_dict, load_config
from clipmoe.dmu.pipeline import Pipeline, open_run, print_plan
from clipmoe.dmu.stages import STAGES, plan


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
    assert set(BUDGETS) == {"epoch", "steps"} and {b.key for b in BASELINES} >= {"dense", "upcycle", "wo_mcl", "soup"}


def test_unknown_baselines_and_budget_rules_are_config_errors():
    with pytest.raises(ConfigError, match=r"baselines.budgets: unknown rule\(s\) \['flops'\]"):
        cfg_of(baselines={"budgets": ["flops"]})
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
