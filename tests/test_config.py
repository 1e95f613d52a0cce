import glob

import pytest
import torch

from clipmoe.dmu.config import ConfigError, config_from_dict, diff_configs, load_config
from clipmoe.model.stretch import stretch_text_positions, stretched_positions
from conftest import make_tiny_clip


def test_shipped_configs_validate():
    paths = glob.glob("configs/paper-*.yaml") + glob.glob("src/clipmoe/configs/*.yaml")
    assert len(paths) >= 3
    for path in paths:
        cfg = load_config(path, check_paths=False)
        assert cfg.moe.top_k <= cfg.moe.experts
    from clipmoe.apps.pretrain import read_pretrain_config

    cfg = read_pretrain_config("configs/pretrain-tiny-clip.yaml", check_paths=False)
    assert cfg.train.logit_scale == 100.0 and cfg.data.caption == "json:web" and cfg.curve["every"] > 0


def test_pretrain_openai_init_draws_position_embeddings_at_openai_scales():
    from clipmoe.apps.pretrain import build_clip, load_tokenizer

    tokenizer = load_tokenizer({"vocabulary": "world"}, 48)
    size = {"image_size": 48, "patch_size": 8, "vision": {"width": 256}, "text": {"width": 64, "context_length": 48}}
    stds = {}
    for init in ("hf", "openai"):
        model = build_clip({**size, "init": init}, tokenizer)
        stds[init] = (
            model.vision_model.embeddings.position_embedding.weight.std().item(),
            model.text_model.embeddings.position_embedding.weight.std().item(),
        )
    assert abs(stds["hf"][0] - 0.02) < 0.002 and abs(stds["hf"][1] - 0.02) < 0.002  # transformers' default
    assert abs(stds["openai"][0] - 256**-0.5) < 0.004 and abs(stds["openai"][1] - 0.01) < 0.001


def test_bad_pretrain_config(tmp_path):
    from clipmoe.apps.pretrain import read_pretrain_config

    p = tmp_path / "p.yaml"
    p.write_text("data: {train: x, colour: 1}\nmodel: {depth: 3, init: jax}\ntrain: {lr: fast}\n")
    with pytest.raises(ConfigError) as e:
        read_pretrain_config(str(p))
    for needle in (
        "out: required",
        "data.colour: unknown key",
        "model.depth: unknown key",
        "model.init: 'jax' is not one of ['hf', 'openai']",
        "train.lr: expected float",
        "tokenizer: give",
    ):
        assert needle in str(e.value)
    p.write_text("out: o\ndata: {train: x}\ntokenizer: {vocabulary: world}\ncurve: {eval: nowhere, every: 0}\n")
    with pytest.raises(ConfigError, match="curve.every: expected a positive integer"):
        read_pretrain_config(str(p))
    p.write_text("out: o\ndata: {train: x}\ntokenizer: {vocabulary: world}\ncurve: {eval: nowhere, every: 5}\n")
    with pytest.raises(ConfigError, match="curve.eval: no such folder: nowhere"):
        read_pretrain_config(str(p))


def test_pretrain_config_refuses_what_it_would_ignore_or_fail_on_later(tmp_path, world):
    """Keys pretraining would ignore (a training seed, MoE settings, data.eval, a typo in a tower), values that
    would fail after the model is built (a temperature of 0, an infinite lr, a width the heads do not
    divide) and a curve on a classification set: all named at once, before any work."""
    from clipmoe.apps.pretrain import read_pretrain_config

    p = tmp_path / "p.yaml"
    p.write_text(
        "out: o\nseed: 1.9\ndata: {train: x, eval: y, num_workers: 2}\ntokenizer: {vocabulary: world, folder: t}\n"
        "model: {image_size: 30, patch_size: 8, vision: {width: 96, layer: 1, heads: 5}, text: 32, hidden_act: gelux}\n"
        "train: {seed: 5, distill_weight: 0.5, num_workers: 2, steps: 10, epochs: 2}\n"
        f"curve: {{eval: {world}/eval/cls_color, every: 2}}\n"
    )
    with pytest.raises(ConfigError) as e:
        read_pretrain_config(str(p))
    for needle in (
        "seed: expected a non-negative integer, got 1.9",
        "data.eval: not used by pretraining",
        "tokenizer: give {vocabulary: WORDS_FILE | world} or {folder: TOKENIZER_DIR}, one of the two",
        "model.image_size: 30 is not a multiple of patch_size 8",
        "model.vision.layer: unknown key",
        "model.vision.width: 96 does not split into 5 heads",
        "model.text: expected a mapping",
        "model.hidden_act: 'gelux' is not one of transformers' activations",
        "train.seed: set the run's seed with the top-level `seed`",
        "train.num_workers: set it as `data.num_workers`",
        "train.distill_weight: a setting of the MoE phases",
        "train.steps, train.epochs: give one",
        "cls_color is a classification set; the curve measures retrieval",
    ):
        assert needle in str(e.value)
    p.write_text("out: o\ndata: {train: x}\ntokenizer: {vocabulary: world}\ntrain: {logit_scale: 0, lr: .inf}\n")
    with pytest.raises(ConfigError, match=r"train: invalid training settings: lr=inf, logit_scale=0"):
        read_pretrain_config(str(p))
    p.write_text("- out\n- data\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        read_pretrain_config(str(p))
    p.write_text("out: o\ndata: {train: x, num_workers: 2}\ntokenizer: {vocabulary: world}\nseed: 3\n")
    train = read_pretrain_config(str(p)).train
    assert (train.seed, train.num_workers) == (3, 2)  # the run's seed and workers reach the training loop


def test_paper_recipe_defaults():
    cfg = config_from_dict({"base_model": "x", "data": {"train": "y"}}, check_paths=False)
    assert (cfg.mcl.lr, cfg.mcl.weight_decay, cfg.mcl.trainable) == (1e-5, 0.2, "ffn")
    assert (cfg.route.lr, cfg.route.weight_decay, cfg.route.trainable, cfg.route.balance_weight) == (
        1e-6,
        0.01,
        "router",
        0.01,
    )
    assert (cfg.moe.experts, cfg.moe.top_k, cfg.cluster.image_clusters, cfg.cluster.text_clusters) == (4, 2, 3, 3)
    assert cfg.mcl.label_smoothing == 0.1 and cfg.mcl.logit_scale == 100.0 and cfg.mcl.warmup_steps == 200


def test_every_problem_is_reported_at_once(tmp_path):
    raw = {
        "base_model": str(tmp_path / "missing-model"),
        "data": {"train": str(tmp_path / "missing-data"), "colour": 1},
        "moe": {"experts": 2, "top_k": 3},
        "mcl": {"lr": "fast"},
        "typo": True,
    }
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    msg = str(e.value)
    for needle in ["typo: unknown key", "data.colour: unknown key", "mcl.lr: expected float, got 'fast'"]:
        assert needle in msg
    raw = {
        "base_model": str(tmp_path / "missing-model"),
        "data": {"train": str(tmp_path / "missing-data")},
        "moe": {"experts": 2, "top_k": 3},
    }
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    msg = str(e.value)
    assert "moe.top_k: 3 is impossible with 2 experts" in msg
    assert "base_model: no such file" in msg and "data.train: no such file" in msg


def test_invalid_yaml_and_missing_required(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("base_model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    p.write_text("data: {train: x}")
    with pytest.raises(ConfigError, match="base_model: required"):
        load_config(p, check_paths=False)


def test_diff_configs():
    assert diff_configs({"a": 1, "b": {"c": 2, "d": 3}}, {"a": 1, "b": {"c": 5, "d": 3}, "e": 0}) == ["b.c", "e"]


def test_long_clip_stretch_matches_the_official_rule():
    pe = torch.randn(77, 8)
    new = stretched_positions(pe)
    assert new.shape == (248, 8)
    torch.testing.assert_close(new[:20], pe[:20])
    for i in range(20, 76):
        for j, t in enumerate((0, 0.25, 0.5, 0.75)):
            torch.testing.assert_close(new[20 + 4 * (i - 20) + j], (1 - t) * pe[i] + t * pe[i + 1])
    for j in range(4):
        torch.testing.assert_close(new[244 + j], pe[76] + j * (pe[76] - pe[75]) / 4)


def test_stretch_model_keeps_short_text_features():
    model = make_tiny_clip()
    text = model.tokenizer(["a red cube"])  # 5 tokens: positions < keep are unchanged
    with torch.no_grad():
        before = model.encode_text(**text)
        stretch_text_positions(model, keep=8, factor=4)
        after = model.encode_text(**text)
    assert model.config.text_config.max_position_embeddings == 8 + 8 * 4
    torch.testing.assert_close(before, after)
    long_text = model.tokenizer(["a red cube " * 20])
    assert long_text["input_ids"].shape[1] == 40  # the tokenizer truncates at the new context
