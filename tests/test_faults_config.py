"""Issue #17 item 7: every config value is checked before any work, the run and ``--dry-run`` make the same
checks, and a run that fails validation writes nothing into its run directory."""

from __future__ import annotations

import os

import pytest
import yaml

from clipmoe.cli import main
from clipmoe.dmu.config import ConfigError, config_from_dict, load_config
from clipmoe.dmu.pipeline import open_run


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from clipmoe.data.world import WorldConfig, generate_world

    out = tmp_path_factory.mktemp("w") / "world"
    generate_world(out, WorldConfig.preset("test", train_size=24), verbose=False)
    return out


def _raw(base, train="y", **over):
    raw = {"base_model": str(base), "data": {"train": str(train)}, "device": "cpu"}
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return raw


def _problems(raw, check_paths=False) -> str:
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw, check_paths=check_paths)
    return str(e.value)


@pytest.mark.parametrize(
    "section, value, message",
    [
        ({"moe": {"expert_dropout": 1.5}}, None, "moe.expert_dropout: must be in [0, 1), got 1.5"),
        ({"moe": {"expert_dropout": -0.1}}, None, "moe.expert_dropout: must be in [0, 1)"),
        ({"eval": {"batch_size": 0}}, None, "eval.batch_size: must be > 0, got 0"),
        ({"embed": {"chunk_size": 0}}, None, "embed.chunk_size: must be > 0, got 0"),
        ({"embed": {"batch_size": -1}}, None, "embed.batch_size: must be > 0"),
        ({"mcl": {"checkpoint_every": 0}}, None, "mcl: invalid training settings: checkpoint_every=0"),
        ({"route": {"log_every": 0}}, None, "route: invalid training settings: log_every=0"),
        ({"mcl": {"warmup_steps": -3}}, None, "mcl: invalid training settings: warmup_steps=-3"),
        ({"device": "tpu"}, None, "device: must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        ({"device": "cuda:x"}, None, "device: must be auto, cpu, cuda or cuda:N"),
        ({"cluster": {"niter": 0}}, None, "cluster.niter: must be >= 1"),
        ({"data": {"train": "y", "max_skipped_fraction": 2.0}}, None, "data.max_skipped_fraction: must be in [0, 1]"),
        ({"moe": {"layers": -1}}, None, "moe.layers: cannot make the last -1 blocks MoE"),
        ({"moe": {"layers": [-1]}}, None, "moe.layers: block indices [-1] out of range"),
        ({"moe": {"layers": "some"}}, None, "moe.layers: expected 'all', an int or a list"),
        ({"baselines": {"upcycle_trainable": "ffn"}}, None, "baselines.upcycle_trainable: must be one of"),
        ({"precision": "fp16"}, None, "precision: must be fp32 or bf16, got 'fp16'"),  # not a bare phase error
        ({"data": {"train": "y", "num_workers": -1}}, None, "data.num_workers: must be >= 0, got -1"),
        ({"baselines": {"budgets": [["epoch"]]}}, None, "baselines.budgets: unknown rule(s) [['epoch']]"),
        ({"moe": {"capacity_factor": float("inf")}}, None, "moe.capacity_factor: must be a finite number, got inf"),
        (
            {"baselines": {"clip_up": {"router_lr": float("inf")}}},
            None,
            "baselines.clip_up.router_lr: must be a finite",
        ),
        ({"seed": 2**31}, None, "seed: must be in [0, 2^31)"),
        ({"moe": {"layers": 0}}, None, "moe.layers: 0 selects no block in either tower"),
        ({"mcl": {"balance_weight": 0.01}}, None, "mcl.balance_weight: MCL stages train dense FFNs: no router"),
        ({"mcl": {"router_lr": 1e-3}}, None, "mcl.router_lr: MCL stages train dense FFNs: no router"),
        ({"moe": {"layers": {"vision": []}}}, None, "selects no block in either tower"),
    ],
)
def test_each_bad_value_is_named(section, value, message):
    assert message in _problems(_raw("x", **section))


def test_settings_the_recipe_never_reads_are_refused_but_a_runs_own_snapshot_loads():
    """A setting moved from its default for a baseline that is not run, or a stretch setting without the
    stretch, would change nothing: refused, naming the key and the fix. A run's snapshot holds every key at its
    default and loads."""
    dense = {"enabled": ["dense"]}
    text = _problems(
        _raw(
            "x",
            baselines={**dense, "clip_up": {"noise": 0.02}, "fmoe": {"partitions": "largest"}, "upcycle_noise": 0.05},
            prepare={"stretch_factor": 2},
        )
    )
    assert "has 4 problem(s)" in text
    for needle in (
        "baselines.clip_up.noise: 0.02 has no effect: the clip_up baseline is not in baselines.enabled ['dense']; "
        "remove the setting or enable clip_up",
        "baselines.fmoe.partitions: 'largest' has no effect: the fmoe baseline is not in",
        "baselines.upcycle_noise: 0.05 has no effect: the upcycle baseline is not in",
        "prepare.stretch_factor: 2 has no effect: prepare.stretch_text_positions is false",
    ):
        assert needle in text
    used = config_from_dict(
        _raw(
            "x",
            baselines={"enabled": ["clip_up", "upcycle"], "clip_up": {"noise": 0.02}, "upcycle_noise": 0.05},
            prepare={"stretch_text_positions": True, "stretch_factor": 2},
        ),
        check_paths=False,
    )
    assert (used.baselines.clip_up.noise, used.prepare.stretch_factor) == (0.02, 2)
    snapshot = config_from_dict(_raw("x", baselines=dense), check_paths=False).to_dict()
    assert snapshot["baselines"]["clip_up"] and snapshot["prepare"]["stretch_factor"] == 4  # every key written
    assert config_from_dict(snapshot, check_paths=False).to_dict() == snapshot


def test_layers_are_checked_against_the_base_models_depth(tiny_clip_dir):
    # tiny_clip_dir: 2 blocks per tower, read from its config.json
    text = _problems(_raw(tiny_clip_dir, train=tiny_clip_dir, moe={"layers": [99]}), check_paths=True)
    assert "moe.layers: block indices [99] out of range (the base model's vision tower has 2 blocks)" in text
    text = _problems(_raw(tiny_clip_dir, train=tiny_clip_dir, moe={"layers": {"text": 3}}), check_paths=True)
    assert "moe.layers.text: cannot make the last 3 blocks MoE (the base model's text tower has 2 blocks)" in text
    ok = config_from_dict(_raw(tiny_clip_dir, train=tiny_clip_dir, moe={"layers": [0, 1]}))
    assert ok.moe.layers == [0, 1]
    late = _raw(tiny_clip_dir, train=tiny_clip_dir, moe={"layers": [0]}, route={"last_n_blocks": 1})
    assert "route.last_n_blocks: 1: no MoE block (moe.layers [0]) is among the last 1" in _problems(late, True)
    shipped = _problems(_raw("builtin:tiny-clip", train=tiny_clip_dir, moe={"layers": [50]}), check_paths=True)
    assert "moe.layers: block indices [50] out of range (the base model's vision tower has" in shipped


def test_all_problems_of_one_file_at_once():
    text = _problems(_raw("x", eval={"batch_size": 0}, embed={"chunk_size": 0}, device="tpu"))
    assert "has 3 problem(s)" in text
    # a typo inside a section no longer hides the range checks of the others
    text = _problems(_raw("x", mcl={"lrr": 1.0}, moe={"top_k": 9, "experts": "three"}, seed=-1))
    assert "has 4 problem(s)" in text
    for needle in ("mcl.lrr: unknown key", "moe.experts: expected int", "moe.top_k: 9 is impossible", "seed: must be"):
        assert needle in text


def test_yaml_duplicate_keys_are_an_error_and_exponents_are_floats(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("base_model: x\ndata: {train: y}\nmcl:\n  lr: 1e-4\n  lr: 2e-4\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'lr' \(first given on line 4\)"):
        load_config(p, check_paths=False)
    p.write_text("base_model: x\ndata: {train: y}\nmcl: {lr: 1e-5, weight_decay: 2E-2}\nroute: {lr: -1.5e+3}\n")
    with pytest.raises(ConfigError, match=r"route: invalid training settings: lr=-1500.0"):
        load_config(p, check_paths=False)  # read as a float (and then refused as one), not as a string
    p.write_text("base_model: x\ndata: {train: y}\nmcl: {lr: 1e-5, weight_decay: 2E-2}\nroute: {lr: 5e-6}\n")
    cfg = load_config(p, check_paths=False)
    assert (cfg.mcl.lr, cfg.mcl.weight_decay, cfg.route.lr) == (1e-5, 2e-2, 5e-6)


def test_yaml_keys_written_beside_a_merge_override_it(tmp_path):
    """``<<: *anchor`` then a key of its own is YAML's override, not a duplicate; a key written twice still is."""
    p = tmp_path / "c.yaml"
    p.write_text(
        "base_model: x\ndata: {train: y}\nmcl: &phase {lr: 1e-5, weight_decay: 0.2}\nroute:\n  <<: *phase\n  lr: 1e-6\n"
    )
    cfg = load_config(p, check_paths=False)
    assert (cfg.mcl.lr, cfg.route.lr, cfg.route.weight_decay) == (1e-5, 1e-6, 0.2)
    p.write_text(
        "base_model: x\ndata: {train: y}\nmcl: &phase {lr: 1e-5}\nroute:\n  <<: *phase\n  lr: 1e-6\n  lr: 2e-6\n"
    )
    with pytest.raises(ConfigError, match=r"duplicate key 'lr' \(first given on line 6\)"):
        load_config(p, check_paths=False)
    for text, message in (
        ("mcl: &a {lr: 1e-5}\nroute: &c {lr: 1e-6}\neval: {<<: *a, <<: *c}\n", "duplicate key '<<'"),
        ("mcl: {<<: {lr: 1e-5, lr: 2e-5}, weight_decay: 0.1}\n", "duplicate key 'lr'"),
    ):
        p.write_text("base_model: x\ndata: {train: y}\n" + text)
        with pytest.raises(ConfigError, match=message):
            load_config(p, check_paths=False)


def test_cluster_niter_reaches_kmeans(monkeypatch):
    import numpy as np

    from clipmoe.dmu import cluster

    seen = []
    real = cluster.faiss.Kmeans

    def spy(d, k, **kw):
        seen.append(kw["niter"])
        return real(d, k, **kw)

    monkeypatch.setattr(cluster.faiss, "Kmeans", spy)

    class Store:
        num_samples = 8
        valid = np.ones(8, np.uint8)
        image = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
        text = np.random.default_rng(1).normal(size=(8, 4)).astype(np.float32)

    cluster.cluster_features(Store, 2, 2, seed=0, niter=7)
    assert seen == [7, 7]


def _write(tmp_path, world, base, **over):
    raw = {
        "base_model": str(base),
        "data": {"train": str(world / "train")},
        "device": "cpu",
        "cluster": {"image_clusters": 2, "text_clusters": 2},
        "moe": {"experts": 2},
        "baselines": {"enabled": [], "stages": False},
    }
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize(
    "over, message",
    [
        ({"cluster": {"image_clusters": 500}}, "cannot make 500 k-means clusters from 24 training samples"),
        ({"moe": {"layers": [7]}}, "moe.layers: block indices [7] out of range"),
        ({"eval": {"batch_size": 0}}, "eval.batch_size: must be > 0"),
        ({"baselines": {"enabled": ["dense", "upcyle"]}}, "baselines.enabled: unknown baseline(s) ['upcyle']"),
        ({"baselines": {"enabled": ["dense", "dense"]}}, "baselines.enabled: ['dense'] listed more than once"),
        ({"baselines": {"enabled": ["dense"], "budgets": []}}, "baselines.budgets: empty, so ['dense'] would not run"),
    ],
)
def test_failed_validation_writes_nothing_and_dry_run_refuses_the_same(
    tmp_path, world, tiny_clip_dir, capsys, over, message
):
    cfg = _write(tmp_path, world, tiny_clip_dir, **over)
    run = tmp_path / "run"
    assert main(["run", cfg, "--run-dir", str(run), "--dry-run"]) == 2
    assert message in capsys.readouterr().err
    assert main(["run", cfg, "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("clipmoe run: error:")
    assert not run.exists()  # not even config.yaml: the corrected config is then accepted as a new run
    good = _write(tmp_path, world, tiny_clip_dir)
    assert main(["run", good, "--run-dir", str(run), "--dry-run"]) == 0
    assert not run.exists()
    cfg, run_dir = open_run(good, str(run))
    assert os.path.exists(os.path.join(run_dir, "config.yaml"))


def test_unavailable_cuda_device_is_refused_before_any_write(tmp_path, world, tiny_clip_dir, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    cfg = _write(tmp_path, world, tiny_clip_dir, device="cuda:0")
    assert main(["run", cfg, "--run-dir", str(tmp_path / "run"), "--dry-run"]) == 2
    assert "device: 'cuda:0', but no CUDA device is available" in capsys.readouterr().err
    assert main(["run", cfg, "--run-dir", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()


def test_a_stage_the_config_does_not_have_is_refused_naming_the_ones_it_has(tmp_path, world, tiny_clip_dir, capsys):
    """`clipmoe mcl --stage 7` on a 3-expert run would embed the last stage's model and train a stage outside
    the run; `--stage 0` would look for a stage -1."""
    cfg = _write(tmp_path, world, tiny_clip_dir, moe={"experts": 3})
    run = tmp_path / "run"
    for stage in ("7", "0"):
        assert main(["mcl", cfg, "--run-dir", str(run), "--stage", stage]) == 2
        assert f"--stage {stage}: this run's mcl has 1, 2" in capsys.readouterr().err
    assert not (run / "stage1").exists() and not (run / "embed0").exists()


def test_a_csv_with_other_columns_or_commas_can_be_named_in_the_config(tmp_path):
    """The reader's error says to set separator / image_key / caption_key: the config has them, and the run
    reads its training set with them."""
    from test_faults_data import png

    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(png(12, 12))
    (tmp_path / "train.csv").write_text("path,text\n" + "".join(f"{i}.png,cube {i}\n" for i in range(3)))
    raw = _raw("x", train=str(tmp_path / "train.csv"))
    raw["data"].update(separator=",", image_key="path", caption_key="text")
    cfg = config_from_dict(raw, check_paths=False)
    from clipmoe.data import open_dataset

    ds = open_dataset(cfg.data.train, **cfg.data.reader_options())
    assert [s.caption for s in ds] == ["cube 0", "cube 1", "cube 2"]
