"""Pretraining from scratch: the held-out curve that shows when retrieval plateaus, and resuming it."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import clipmoe
from clipmoe.apps.pretrain import pretrain
from clipmoe.data.world import WorldConfig, generate_world


def _config(tmp_path, world, **train) -> dict:
    return {
        "out": str(tmp_path / "clip"),
        "data": {"train": str(world / "train"), "caption": "json:web"},
        "tokenizer": {"vocabulary": "world"},
        "model": {
            "image_size": 32,
            "patch_size": 8,
            "vision": {"width": 64, "layers": 1},
            "text": {"width": 64, "layers": 1, "context_length": 48},
            "projection_dim": 32,
        },
        "train": {"epochs": 1, "batch_size": 16, "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 2, **train},
        "curve": {"eval": str(world / "eval" / "retrieval_short"), "every": 2},
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "world"
    generate_world(out, WorldConfig.preset("test", seed=1, train_size=64), verbose=False)
    return out


def test_pretraining_records_a_heldout_curve_and_a_rerun_keeps_it(tmp_path, world):
    config = _config(tmp_path, world)
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(config))
    pretrain(str(path))
    curve_path = tmp_path / "clip.train" / "curve.jsonl"
    points = [json.loads(line) for line in curve_path.read_text().splitlines()]
    assert [p["step"] for p in points] == [2, 4]
    for p in points:
        assert p["temperature"] > 1 and 0 <= p["image_to_text_R@1"] <= 100 and 0 <= p["text_to_image_R@1"] <= 100
    assert (tmp_path / "clip" / "model.safetensors").exists()
    pretrain(str(path))  # finished: nothing retrained, the curve is not extended
    assert curve_path.read_text().count("\n") == 2


def test_pretraining_at_a_fixed_temperature_saves_that_temperature(tmp_path, world):
    """A later phase with `logit_scale: model` must use the temperature the base was trained at, not the init."""
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, world, logit_scale=100.0)))
    pretrain(str(path))
    points = [json.loads(line) for line in (tmp_path / "clip.train" / "curve.jsonl").read_text().splitlines()]
    assert [p["temperature"] for p in points] == [100.0, 100.0]
    assert clipmoe.load(str(tmp_path / "clip")).logit_scale.exp().item() == pytest.approx(100.0, rel=1e-5)


def test_the_curve_follows_the_attributes_on_a_world_without_changing_training(tmp_path, world):
    """`curve.attributes`: each curve point reads every attribute (zero-shot, linear probe, state) on a world,
    to see suppression form during pretraining; measuring must not change what is trained."""
    from safetensors.torch import load_file

    from clipmoe.eval.attributes import STATES

    runs = {}
    for name, curve in (("plain", {}), ("followed", {"attributes": str(world)})):
        config = _config(tmp_path / name, world)
        config["curve"].update(curve)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        pretrain(str(path))
        runs[name] = tmp_path / name
    points = [json.loads(line) for line in (runs["followed"] / "clip.train" / "curve.jsonl").read_text().splitlines()]
    assert [p["step"] for p in points] == [2, 4]
    for p in points:
        assert list(p["attributes"]) == ["color", "background", "shape", "size", "position", "texture", "count"]
        for r in p["attributes"].values():
            assert r["state"] in STATES and 0 <= r["zero_shot"] <= 100 and 0 <= r["linear_probe"] <= 100
    plain, followed = (load_file(runs[n] / "clip" / "model.safetensors") for n in ("plain", "followed"))
    assert plain.keys() == followed.keys() and all(torch.equal(plain[k], followed[k]) for k in plain)


def test_a_curve_on_attributes_needs_a_generated_world(tmp_path, world):
    from clipmoe.dmu.config import ConfigError

    config = _config(tmp_path, world)
    config["curve"]["attributes"] = str(world / "eval")
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"curve.attributes: .*/eval is not a generated world \(no world.json\)"):
        pretrain(str(path))
    assert not (tmp_path / "clip.train").exists()  # refused before any work


def _interrupted(path, after_step: int) -> None:
    """Run ``pretrain`` and stop it as Ctrl-C would, inside the work that follows optimizer step ``after_step``
    (its curve point written, its checkpoint not yet)."""
    import clipmoe.apps.pretrain as module

    real = module.train

    def train(*args, on_step=None, **kwargs):
        def stop_at(step, total):
            on_step(step, total)
            if step == after_step:
                raise KeyboardInterrupt

        return real(*args, on_step=stop_at, **kwargs)

    module.train = train
    try:
        with pytest.raises(KeyboardInterrupt):
            pretrain(str(path))
    finally:
        module.train = real


def _curve(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "clip.train" / "curve.jsonl").read_text().splitlines()]


def test_a_stopped_pretraining_resumes_exactly_and_measures_every_curve_point_once(tmp_path, world):
    """Stopped while measuring a checkpoint step's curve point, a rerun measures it again (the checkpoint comes
    after the point) and drops what was measured past its checkpoint, and a line cut short by the kill; the
    weights and the curve are those of a run never stopped. Starting over (checkpoint deleted, another lr)
    leaves no point of the earlier run in the curve."""
    from safetensors.torch import load_file

    config = _config(tmp_path / "whole", world, epochs=2)  # 8 steps, checkpoints at 2, 4, 6
    whole = tmp_path / "whole.yaml"
    whole.write_text(yaml.safe_dump(config))
    pretrain(str(whole))
    config["out"] = str(tmp_path / "clip")
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(config))
    _interrupted(path, after_step=6)
    assert [p["step"] for p in _curve(tmp_path)] == [2, 4, 6]
    with open(tmp_path / "clip.train" / "curve.jsonl", "a") as f:
        f.write('{"step": 7, "temper')  # the kill cut a line short
    pretrain(str(path))
    assert _curve(tmp_path) == _curve(tmp_path / "whole")
    a, b = (
        load_file(tmp_path / "whole" / "clip" / "model.safetensors"),
        load_file(tmp_path / "clip" / "model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)

    config["out"] = str(tmp_path / "again" / "clip")
    path.write_text(yaml.safe_dump(config))
    _interrupted(path, after_step=5)
    (tmp_path / "again" / "clip.train" / "checkpoint.pt").unlink()  # start over, with another learning rate
    config["train"]["lr"] = 5e-3
    path.write_text(yaml.safe_dump(config))
    pretrain(str(path))
    points = _curve(tmp_path / "again")
    assert [p["step"] for p in points] == [2, 4, 6, 8] and points != _curve(tmp_path / "whole")


def test_a_checkpoint_resumes_only_the_model_data_and_seed_it_was_trained_with(tmp_path, world):
    """The training settings are compared by the loop; another head count, activation, corpus or seed would
    load without an error and save a model half trained as each, so the rerun refuses, naming what changed,
    before any work; the same config resumes."""
    from clipmoe.dmu.config import ConfigError

    config = _config(tmp_path, world)
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(config))
    _interrupted(path, after_step=3)
    checkpoint = tmp_path / "clip.train" / "checkpoint.pt"
    before = checkpoint.stat().st_mtime_ns
    changed = json.loads(json.dumps(config))
    changed["model"]["vision"]["heads"] = 2
    changed["model"]["hidden_act"] = "gelu"
    changed["seed"] = 1
    path.write_text(yaml.safe_dump(changed))
    with pytest.raises(ConfigError) as e:
        pretrain(str(path))
    assert "model.hidden_act, model.vision.heads, seed" in str(e.value) and "delete" in str(e.value)
    assert checkpoint.stat().st_mtime_ns == before and not (tmp_path / "clip").exists()
    config["data"]["num_workers"] = 1  # how the images are decoded changes nothing trained: it resumes
    path.write_text(yaml.safe_dump(config))
    pretrain(str(path))
    assert (tmp_path / "clip" / "model.safetensors").exists()


def test_an_out_folder_without_a_model_is_not_taken_for_a_finished_run(tmp_path, world):
    from clipmoe.dmu.config import ConfigError

    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, world)))
    (tmp_path / "clip").mkdir()
    with pytest.raises(ConfigError, match=r"out: .*/clip exists and holds no saved model"):
        pretrain(str(path))
