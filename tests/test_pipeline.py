"""End-to-end DMU pipeline on a very small generated world (CPU, seconds)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

import clipmoe
from clipmoe.dmu.cluster import cluster_features
from clipmoe.dmu.config import ConfigError
from clipmoe.dmu.embed import FeatureStore
from clipmoe.dmu.pipeline import Pipeline, open_run, print_plan


def write_config(tmp_path, world, base_dir, experts=3, **over):
    train = {"steps": 4, "batch_size": 16, "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 2, "min_batch": 4}
    raw = {
        "base_model": str(base_dir),
        "data": {"train": str(world / "train"), "eval": str(world / "eval")},
        "device": "cpu",
        "cluster": {"image_clusters": 2, "text_clusters": 2},
        "mcl": dict(train),
        "moe": {"experts": experts, "top_k": 2},
        "route": {**train, "lr": 1e-2},
        "eval": {"batch_size": 64, "throughput_batch": 4},
    }
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.slow
def test_whole_pipeline_writes_every_artifact(tmp_path, world, base_dir):
    cfg, run_dir = open_run(write_config(tmp_path, world, base_dir), str(tmp_path / "run"))
    pipe = Pipeline(cfg, run_dir)
    report = pipe.run()
    for rel in [
        "config.yaml",
        "base/model.safetensors",
        "stage0/embed/DONE",
        "stage0/cluster/labels.npy",
        "stage0/cluster/stats.json",
        "stage0/cluster/cluster_sizes.png",
        "stage1/cluster/labels.npy",
        "stage1/model/config.json",
        "stage2/model/model.safetensors",
        "stage2/train/metrics.jsonl",
        "moe/init/config.json",
        "moe/model/model.safetensors",
        "baselines/dense-epoch/model/config.json",
        "baselines/dense-steps/model/config.json",
        "baselines/upcycle-epoch/model/config.json",
        "baselines/upcycle-steps/model/config.json",
        "baselines/wo_mcl-epoch/model/config.json",
        "baselines/wo_mcl-steps/ffn/model/config.json",
        "baselines/soup/model/config.json",
        "eval/dmu_clip_moe.json",
        "eval/base.json",
        "plots/training_curves.png",
        "timings.json",
    ]:
        assert os.path.exists(os.path.join(run_dir, rel)), rel
    text = open(report).read()
    for row in [
        "| base |",
        "| MCL stage 1 |",
        "| dense fine-tune (1 epoch) | 1 epoch |",
        "| dense fine-tune (equal steps) | equal steps |",
        "| sparse upcycling (1 epoch) |",
        "| sparse upcycling (equal steps) |",
        "| w/o MCL (1 epoch) |",
        "| w/o MCL (equal steps) |",
        "| expert soup | - |",
        "**1 epoch** (`epoch`): every baseline phase sees the fine-tuning data once",
        "| DMU CLIP-MoE |",
        "Does this run agree with the paper?",
    ]:
        assert row in text, row

    # MCL invariants: only FFN weights changed in a stage; labels accumulate across stages.
    base, stage = clipmoe.load(pipe.stage_model(0)).state_dict(), clipmoe.load(pipe.stage_model(1)).state_dict()
    changed = {k for k in base if not torch.equal(base[k], stage[k])}
    assert changed and all(".mlp." in k for k in changed)
    l0, l1 = np.load(f"{run_dir}/stage0/cluster/labels.npy"), np.load(f"{run_dir}/stage1/cluster/labels.npy")
    assert ((l1 // 4) == l0).all() and len(np.unique(l1)) >= len(np.unique(l0))

    moe = clipmoe.load(pipe.path("moe", "model"))
    assert moe.config.moe["num_experts"] == 3 and moe.config.moe["expert_dropout"] == 0.0
    for s in range(3):  # expert s of every block is the FFN of stage s
        stage_sd = clipmoe.load(pipe.stage_model(s)).state_dict()
        torch.testing.assert_close(
            moe.vision_model.encoder.layers[1].mlp.w1[s], stage_sd["vision_model.encoder.layers.1.mlp.fc1.weight"]
        )

    # Budget rules: equal steps = all DMU phases (2 MCL stages + routing, 4 steps each); 1 epoch = 96 / 16.
    def last_step(run):
        return [json.loads(line)["step"] for line in open(pipe.path("baselines", run, "train/metrics.jsonl"))][-1]

    assert pipe.budget_steps() == 3 * 4 and pipe.budget_steps("mcl") == 2 * 4
    assert last_step("dense-steps") == last_step("upcycle-steps") == 12
    assert last_step("dense-epoch") == last_step("upcycle-epoch") == 96 // 16

    # w/o MCL (the paper's Table 4): a 2-expert MoE of {the base FFN, an FFN fine-tuned directly on random batches
    # under the budget rule}, routers trained as DMU's routing phase.
    for rule, ffn_steps in (("epoch", 96 // 16), ("steps", 2 * 4)):
        wo = clipmoe.load(pipe.path(f"baselines/wo_mcl-{rule}/model"))
        tuned = clipmoe.load(pipe.path(f"baselines/wo_mcl-{rule}/ffn/model")).state_dict()
        assert wo.config.moe["num_experts"] == 2 and wo.config.moe["expert_dropout"] == 0.0
        changed = {k for k in base if not torch.equal(base[k], tuned[k])}
        assert changed and all(".mlp." in k for k in changed)
        key = "vision_model.encoder.layers.1.mlp.fc1.weight"
        torch.testing.assert_close(wo.vision_model.encoder.layers[1].mlp.w1[0], base[key])
        torch.testing.assert_close(wo.vision_model.encoder.layers[1].mlp.w1[1], tuned[key])
        assert last_step(f"wo_mcl-{rule}/ffn") == ffn_steps and last_step(f"wo_mcl-{rule}") == 4

    # Rerunning is a no-op that skips every finished stage.
    t = time.perf_counter()
    Pipeline(*open_run(write_config(tmp_path, world, base_dir), str(tmp_path / "run"))).run()
    assert time.perf_counter() - t < 30


def test_changed_config_is_refused_then_forked(tmp_path, world, base_dir):
    open_run(write_config(tmp_path, world, base_dir), str(tmp_path / "run"))
    os.makedirs(tmp_path / "run" / "stage0" / "embed")
    changed = write_config(tmp_path, world, base_dir, route={"lr": 0.5})
    with pytest.raises(ConfigError, match=r"changed keys: route\.lr"):
        open_run(changed, str(tmp_path / "run"))
    cfg, run_dir = open_run(changed, str(tmp_path / "run"), fork=str(tmp_path / "fork"))
    assert run_dir == str(tmp_path / "fork") and os.path.isdir(tmp_path / "fork" / "stage0" / "embed")
    assert cfg.route.lr == 0.5
    with pytest.raises(ConfigError, match=r"cannot fork .*nowhere: it is not a run directory"):
        open_run(changed, str(tmp_path / "nowhere"), fork=str(tmp_path / "fork2"))
    assert not (tmp_path / "fork2").exists()


def test_dry_run_predicts_refusal_and_fork_without_writing(tmp_path, world, base_dir, capsys):
    run = tmp_path / "run"
    open_run(write_config(tmp_path, world, base_dir), str(run))
    for done in ("base/config.json", "stage0/embed/DONE", "stage0/cluster/labels.npy", "stage1/model/config.json"):
        os.makedirs((run / done).parent, exist_ok=True)
        (run / done).touch()
    changed = write_config(tmp_path, world, base_dir, mcl={"lr": 0.5})
    cfg = clipmoe.dmu.config.load_config(changed)
    with pytest.raises(ConfigError, match=r"changed keys: mcl\.lr"):
        print_plan(cfg, str(run))  # as the run itself would refuse
    print_plan(cfg, str(run), fork=str(tmp_path / "fork"))
    out = capsys.readouterr().out
    assert "changed: mcl" in out and f"run directory: {tmp_path / 'fork'}" in out
    for line in ("[reused] prepare", "[reused] embed 0", "[reused] cluster 0", "[todo] mcl 1", "[todo] route"):
        assert line in out, line
    assert not (tmp_path / "fork").exists()
    print_plan(clipmoe.dmu.config.load_config(write_config(tmp_path, world, base_dir)), str(run))
    assert "[done] mcl 1" in capsys.readouterr().out


def test_labels_accumulate():
    class Store:  # a FeatureStore-shaped object with known clusters
        num_samples = 8
        valid = np.array([1, 1, 1, 1, 1, 1, 1, 0], dtype=np.uint8)
        image = np.eye(8, 4, dtype=np.float32)[[0, 0, 1, 1, 0, 0, 1, 0]] * 1.0
        text = np.eye(8, 4, dtype=np.float32)[[2, 3, 2, 3, 2, 3, 2, 0]] * 1.0

    prev = np.array([5, 5, 5, 5, 7, 7, 7, -1])
    labels = cluster_features(Store, 2, 2, prev, seed=0)
    assert labels[-1] == -1
    assert ((labels[:-1] // 4) == prev[:-1]).all()
    assert len(set(labels[:-1] % 4)) == 4  # 2 image x 2 text clusters all used


@pytest.mark.slow
def test_kill_mid_stage_then_rerun_matches_uninterrupted(tmp_path, world, base_dir):
    cfg_path = write_config(
        tmp_path,
        world,
        base_dir,
        experts=2,
        mcl={"steps": 30, "checkpoint_every": 3},
        baselines={"enabled": [], "stages": False},
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "clipmoe.cli", "run", cfg_path, "--run-dir", str(tmp_path / "killed")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "stage1" / "train" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert ckpt.exists() and proc.poll() is None, "the run ended before it could be killed mid-stage"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "stage1" / "model").exists()
    subprocess.run(cmd, env=env, check=True, timeout=300, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(
        [*cmd[:-1], str(tmp_path / "clean")],
        env=env,
        check=True,
        timeout=300,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for rel in ("stage1/model", "moe/model"):
        a, b = clipmoe.load(tmp_path / "killed" / rel).state_dict(), clipmoe.load(tmp_path / "clean" / rel).state_dict()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=f"{rel}: {k}")
    assert (
        np.load(tmp_path / "killed/stage0/cluster/labels.npy") == np.load(tmp_path / "clean/stage0/cluster/labels.npy")
    ).all()
    assert FeatureStore.open(str(tmp_path / "killed/stage0/embed")).num_samples == 96


def test_impossible_values_for_the_data_stop_before_any_work(tmp_path, world, base_dir):
    cfg_path = write_config(tmp_path, world, base_dir, cluster={"image_clusters": 500})
    with pytest.raises(ConfigError, match="cannot make 500 k-means clusters from 96 training samples"):
        open_run(cfg_path, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")  # not even its config.yaml


def test_epoch_rule_baselines_need_no_dmu_phase_and_wo_mcl_is_a_two_expert_moe(tmp_path, world, base_dir):
    """The paper's rule (one epoch) and its Table 4 "w/o MCL" row, straight from the baseline registry."""
    cfg, run_dir = open_run(
        write_config(tmp_path, world, base_dir, baselines={"enabled": ["dense", "wo_mcl"], "budgets": ["epoch"]}),
        str(tmp_path / "run"),
    )
    pipe = Pipeline(cfg, run_dir)
    assert [r.id for r in pipe.baseline_runs()] == ["dense-epoch", "wo_mcl-epoch"]
    for run in pipe.baseline_runs():
        pipe.baseline(run.id)
    assert not os.path.exists(pipe.path("moe")) and not os.path.exists(pipe.path("stage1"))  # no DMU phase ran

    def steps(sub):
        return [json.loads(line)["step"] for line in open(pipe.path("baselines", sub, "metrics.jsonl"))][-1]

    assert steps("dense-epoch/train") == steps("wo_mcl-epoch/ffn/train") == 96 // 16  # one pass over the data
    assert steps("wo_mcl-epoch/train") == cfg.route.steps  # routing exactly as DMU's routing phase
    base = clipmoe.load(pipe.stage_model(0)).state_dict()
    tuned = clipmoe.load(pipe.path("baselines/wo_mcl-epoch/ffn/model")).state_dict()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(".mlp." in k for k in changed)  # FFN-only fine-tuning
    wo = clipmoe.load(pipe.path("baselines/wo_mcl-epoch/model"))
    assert wo.config.moe["num_experts"] == 2 and wo.config.moe["expert_dropout"] == 0.0
    key = "text_model.encoder.layers.0.mlp.fc2.weight"
    torch.testing.assert_close(wo.text_model.encoder.layers[0].mlp.w2[0], base[key])
    torch.testing.assert_close(wo.text_model.encoder.layers[0].mlp.w2[1], tuned[key])
