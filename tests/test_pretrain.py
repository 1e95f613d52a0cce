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
