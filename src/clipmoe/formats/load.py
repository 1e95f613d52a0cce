"""Opening models from disk: HF CLIP, SigLIP and SigLIP 2 folders (dense or MoE) and, via ``convert``, single files.

Loading is strict: a missing or unexpected key is an error that names the keys, never a silently random
layer; a tensor that is not floating point where the model has floating-point weights (e.g. int64, which
``load_state_dict`` would silently cast), or that holds NaN or inf, is an error naming the tensor. Files are
read with safetensors or ``torch.load(weights_only=True)``; nothing pickled is executed.
"""

from __future__ import annotations

import json
import os

import torch

from ..data.processing import ImageTransform, TextTokenizer
from ..model.modeling import ClipMoeModel
from .convert import convert_file
from .hub import resolve_model
from .state_dict import WEIGHT_FILES, CheckpointError, load_state_dict_strict, read_state_dict

__all__ = ["WEIGHT_FILES", "CheckpointError", "attach_processing", "load", "model_class_for"]


def load(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> ClipMoeModel:
    """Open a CLIP or CLIP-MoE: an HF folder, a checkpoint file (OpenAI, open_clip, official CLIP-MoE), a shipped
    ``builtin:`` model or a Hugging Face Hub id ``owner/name[@revision]`` (``formats/hub.py``: the HF cache).

    The returned model has ``.tokenizer`` (``TextTokenizer``) and ``.image_processor`` (``ImageTransform``)
    when the folder provides them. Routers stay fp32 when ``dtype`` is a half type.
    """
    path = resolve_model(path)
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
    model_class = model_class_for(model_type, folder)
    config = model_class.config_class.from_pretrained(folder, local_files_only=True)
    weights = next((os.path.join(folder, w) for w in WEIGHT_FILES if os.path.exists(os.path.join(folder, w))), None)
    if weights is None:
        raise CheckpointError(f"{folder} has no weights ({' or '.join(WEIGHT_FILES)})")
    model = model_class(config)
    load_state_dict_strict(model, read_state_dict(weights), weights)
    attach_processing(model, folder)
    return model


def model_class_for(model_type: str | None, folder: str = "the folder"):
    """The clipmoe class that opens a full model of this ``model_type`` (config.json): CLIP, SigLIP, SigLIP 2."""
    if model_type == "clip":
        return ClipMoeModel
    from ..model.modeling_siglip import FAMILIES

    if model_type in FAMILIES:
        return FAMILIES[model_type]
    raise CheckpointError(
        f"{folder} holds a {model_type!r} model; clipmoe.load opens full CLIP, SigLIP and SigLIP 2 models "
        f"('clip', {', '.join(repr(t) for t in FAMILIES)})"
    )


def attach_processing(model: ClipMoeModel, folder: str) -> None:
    """Give the model the tokenizer and image transform its folder describes, where present."""
    if os.path.exists(os.path.join(folder, "preprocessor_config.json")):
        model.image_processor = ImageTransform.from_folder(folder)
    if any(os.path.exists(os.path.join(folder, f)) for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        model.tokenizer = TextTokenizer.from_folder(
            folder, model.config.text_config.max_position_embeddings, getattr(model, "text_padding", "longest")
        )
