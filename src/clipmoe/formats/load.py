"""Opening models from disk: HF CLIP folders (dense or CLIP-MoE) and, via ``convert``, single files.

Loading is strict: a missing or unexpected key is an error that names the keys, never a silently random
layer; a tensor that is not floating point where the model has floating-point weights (e.g. int64, which
``load_state_dict`` would silently cast), or that holds NaN or inf, is an error naming the tensor. Files are
read with safetensors or ``torch.load(weights_only=True)``; nothing pickled is executed.
"""

from __future__ import annotations

import json
import os

import torch
from transformers import CLIPConfig

from ..data.processing import ImageTransform, TextTokenizer
from ..model.modeling import ClipMoeModel
from .convert import convert_file
from .state_dict import WEIGHT_FILES, CheckpointError, load_state_dict_strict, read_state_dict

__all__ = ["WEIGHT_FILES", "CheckpointError", "attach_processing", "load"]


def load(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> ClipMoeModel:
    """Open a CLIP or CLIP-MoE: an HF folder, or a checkpoint file (OpenAI, open_clip, official CLIP-MoE).

    The returned model has ``.tokenizer`` (``TextTokenizer``) and ``.image_processor`` (``ImageTransform``)
    when the folder provides them. Routers stay fp32 when ``dtype`` is a half type.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        model = _load_folder(path)
    elif os.path.isfile(path):
        model = convert_file(path)
    else:
        raise FileNotFoundError(f"no model at {path}")
    model.to(device=device)
    if dtype is not None:
        model.to(dtype=dtype)
        for m in model.moe_layers():
            m.router.float()
    return model.eval()


def _load_folder(folder: str) -> ClipMoeModel:
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{folder} has no config.json; is it an HF CLIP folder?")
    with open(config_path) as f:
        model_type = json.load(f).get("model_type")
    if model_type != "clip":
        raise CheckpointError(f"{folder} holds a {model_type!r} model; clipmoe.load opens full CLIP models ('clip')")
    config = CLIPConfig.from_pretrained(folder, local_files_only=True)
    weights = next((os.path.join(folder, w) for w in WEIGHT_FILES if os.path.exists(os.path.join(folder, w))), None)
    if weights is None:
        raise CheckpointError(f"{folder} has no weights ({' or '.join(WEIGHT_FILES)})")
    model = ClipMoeModel(config)
    load_state_dict_strict(model, read_state_dict(weights), weights)
    attach_processing(model, folder)
    return model


def attach_processing(model: ClipMoeModel, folder: str) -> None:
    """Give the model the tokenizer and image transform its folder describes, where present."""
    if os.path.exists(os.path.join(folder, "preprocessor_config.json")):
        model.image_processor = ImageTransform.from_folder(folder)
    if any(os.path.exists(os.path.join(folder, f)) for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        model.tokenizer = TextTokenizer.from_folder(folder, model.config.text_config.max_position_embeddings)
