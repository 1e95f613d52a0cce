"""Opening models from disk: HF CLIP folders (dense or CLIP-MoE) and, via ``convert``, single files.

Loading is strict: a missing or unexpected key is an error that names the keys, never a silently random
layer. Files are read with safetensors or ``torch.load(weights_only=True)``; nothing pickled is executed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch

from .modeling import ClipMoeModel
from .processing import ImageTransform, TextTokenizer

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked (wrong format, keys, shapes, truncated file)."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a plain torch state-dict pickle (weights only)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path} cannot be read as a weights-only torch checkpoint ({type(e).__name__}: {str(e)[:300]}). "
            "Loading it would require executing pickled code, which clipmoe refuses; "
            "convert it to safetensors with a trusted tool first."
        ) from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_state_dict_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists what is missing, extra or mis-shaped."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = [
        f"{k}: {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or mis_shaped:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
            if keys:
                shown = ", ".join(keys[:10]) + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "")
                parts.append(f"{label} keys: {shown}")
        raise CheckpointError(f"{source} does not match the model built from its config; " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


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
        from .convert import convert_file

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
    from .modeling_siglip import FAMILIES

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
