"""Shared fixtures: tiny real HF CLIP models written to disk, with tokenizer and preprocessor files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

from clipmoe.apps.pretrain import build_clip, load_tokenizer
from clipmoe.data.processing import ImageTransform, TextTokenizer, build_word_tokenizer
from clipmoe.data.world import WorldConfig, generate_world
from clipmoe.model.modeling import ClipMoeModel

WORDS = "a photo of red green blue cube sphere cone small large left right on the".split()

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


def make_tiny_clip(seed: int = 0, hidden_act: str = "quick_gelu", layers: int = 2) -> ClipMoeModel:
    """A random tiny CLIP (32-wide, 2 blocks per tower, 32 px images, 16-token context)."""
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(WORDS, context_length=16)
    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=16,
        projection_dim=16,
        hidden_act=hidden_act,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=16,
        hidden_act=hidden_act,
    )
    model = ClipMoeModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16))
    model.tokenizer = TextTokenizer(tokenizer, 16)
    model.image_processor = ImageTransform(size=32, crop_size=32)
    return model.eval()


@pytest.fixture
def tiny_clip() -> ClipMoeModel:
    return make_tiny_clip()


@pytest.fixture
def tiny_clip_dir(tmp_path, tiny_clip) -> str:
    path = tmp_path / "tiny-clip"
    tiny_clip.save_pretrained(path)
    return str(path)


@pytest.fixture
def batch(tiny_clip):
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, 32, 32)
    text = tiny_clip.tokenizer(["a photo of a red cube", "blue sphere on the left", "a small green cone"])
    return pixels, text


def _topk_accuracy(output, target, topk=(1,)):
    """clip_benchmark's ``accuracy``, unchanged but for ``.item()``: its ``float()`` of a 1-element array is a
    TypeError from numpy 2.4 on (``clipmoe.eval.clip_benchmark.check_numpy``)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


@pytest.fixture
def clip_benchmark_numpy(monkeypatch):
    """clip_benchmark's zero-shot classification as is where the installed numpy runs it, else with the one
    numpy-2.4-safe line above."""
    from clip_benchmark.metrics import zeroshot_classification

    from clipmoe.eval.clip_benchmark import check_numpy

    try:
        check_numpy()
    except RuntimeError:
        monkeypatch.setattr(zeroshot_classification, "accuracy", _topk_accuracy)


def generate_test_world(tmp_path_factory, train_size: int) -> Path:
    """The generated world of the `test` preset with ``train_size`` training images (a module's pipeline runs)."""
    out = tmp_path_factory.mktemp("w") / "world"
    generate_world(out, WorldConfig.preset("test", train_size=train_size), verbose=False)
    return out


def save_world_clip(tmp_path_factory, width: int = 64, image_size: int = 48, context_length: int = 48) -> Path:
    """A random 2-block HF CLIP with the world vocabulary (16 px patches), saved to disk: a pipeline test's base."""
    torch.manual_seed(0)
    config = {
        "image_size": image_size,
        "patch_size": 16,
        "vision": {"width": width, "layers": 2},
        "text": {"width": width, "layers": 2, "context_length": context_length},
        "projection_dim": width // 2,
    }
    model = build_clip(config, load_tokenizer({"vocabulary": "world"}, context_length))
    path = tmp_path_factory.mktemp("b") / "base"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The pipeline tests' world: the `test` preset with 96 training images (a module needing another defines
    its own ``world``)."""
    return generate_test_world(tmp_path_factory, train_size=96)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """The pipeline tests' base: ``save_world_clip``'s defaults (a module needing another defines its own)."""
    return save_world_clip(tmp_path_factory)
