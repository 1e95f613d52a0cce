"""Opening models from disk: HF CLIP, SigLIP and SigLIP 2 folders (dense or MoE) and, via ``convert``, single files.

A folder's model_type picks the class and its config class: the plain HF type (``clip``, ``siglip``,
``siglip2``) is a dense model, or an MoE saved before MoE folders had their own type (opened as before, with
a warning that says how to re-save it); ``clip_moe``, ``siglip_moe``, ``siglip2_moe`` are MoE folders.

Loading is strict: a missing or unexpected key is an error that names the keys, never a silently random
layer; a tensor that is not floating point where the model has floating-point weights (e.g. int64, which
``load_state_dict`` would silently cast), or that holds NaN or inf, is an error naming the tensor. Files are
read with safetensors or ``torch.load(weights_only=True)``; nothing pickled is executed.
"""

from __future__ import annotations

import json
import os
import warnings

import torch

from ..data.processing import ImageTransform, TextTokenizer
from ..model.modeling import ClipMoeModel, has_moe_layers
from ..model.modeling_siglip import FAMILIES
from .convert import convert_file
from .hub import resolve_model
from .state_dict import WEIGHT_FILES, CheckpointError, load_state_dict_strict, read_state_dict

__all__ = ["WEIGHT_FILES", "CheckpointError", "attach_processing", "load", "model_class_for", "read_config"]


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
        routers = [
            (m.router, {k: v.float().clone() for k, v in m.router.state_dict().items()}) for m in model.moe_layers()
        ]
        model.to(dtype=dtype)
        for router, weights in routers:  # fp32 values, not fp32 copies of the half-precision ones
            router.float().load_state_dict(weights)
    return model.eval()


def _load_folder(folder: str) -> ClipMoeModel:
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{folder} has no config.json; is it an HF CLIP folder?")
    model_class, config = read_config(folder)
    # one weights file, else the index of a sharded folder (save_pretrained(max_shard_size=...), large hub repos)
    names = [*WEIGHT_FILES, *(f"{w}.index.json" for w in WEIGHT_FILES)]
    weights = next((os.path.join(folder, n) for n in names if os.path.exists(os.path.join(folder, n))), None)
    if weights is None:
        raise CheckpointError(f"{folder} has no weights ({' or '.join(WEIGHT_FILES)}, or a sharded index of them)")
    try:
        model = model_class(config)
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # e.g. an MoE config missing its FFN sizes
        raise CheckpointError(f"{config_path} cannot build a model: {type(e).__name__}: {e}") from None
    state = _read_shards(weights) if weights.endswith(".index.json") else read_state_dict(weights)
    load_state_dict_strict(model, state, weights)
    attach_processing(model, folder)
    return model


def _read_shards(index: str) -> dict:
    """The tensors of a sharded folder (``save_pretrained(max_shard_size=...)``, large hub repos): each shard
    its index names, read once; a tensor the index places in another shard than the one holding it, or a
    shard missing, is an error naming it."""
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index} is not a readable shard index: {e}") from None
    state: dict = {}
    folder = os.path.dirname(index)
    for shard in dict.fromkeys(weight_map.values()):
        tensors = read_state_dict(os.path.join(folder, shard))
        misplaced = sorted(k for k in tensors if weight_map.get(k) != shard)
        if misplaced:
            raise CheckpointError(f"{index}: {shard} holds {misplaced[:3]}, which the index places elsewhere or omits")
        state.update(tensors)
    return state


def model_class_for(model_type: str | None, folder: str = "the folder"):
    """The clipmoe class that opens a full model of this ``model_type`` (config.json): CLIP, SigLIP, SigLIP 2,
    dense or MoE."""
    if model_type in ("clip", ClipMoeModel.config_class.model_type):
        return ClipMoeModel
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    known = ["clip", ClipMoeModel.config_class.model_type, *FAMILIES]
    raise CheckpointError(
        f"{folder} holds a {model_type!r} model; clipmoe.load opens full CLIP, SigLIP and SigLIP 2 models, "
        f"dense or MoE ({', '.join(repr(t) for t in known)})"
    )


def read_config(folder: str):
    """``(model class, config)`` of a model folder: the MoE config class for an MoE model_type, the dense HF
    one for a plain type. An MoE saved under the plain type (by an older clipmoe) opens as before, with
    one warning: such a folder is opened silently, with random FFNs, by transformers' dense classes."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON (truncated?): {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds {type(raw).__name__}, not a model config")
    model_type = raw.get("model_type")
    model_class = model_class_for(model_type, folder)
    moe_config = model_class.config_class
    config_class = moe_config if model_type == moe_config.model_type else moe_config.dense_config_class
    if config_class is not moe_config and has_moe_layers(raw.get("moe")):
        warnings.warn(
            f"{folder} is a MoE saved with model_type {model_type!r} (an older clipmoe): transformers' dense "
            f"classes open it silently, with random FFNs. Re-save it to get model_type {moe_config.model_type!r}: "
            f"clipmoe export {folder} NEW_FOLDER (or model.save_pretrained(NEW_FOLDER))",
            stacklevel=2,
        )
    try:
        return model_class, config_class.from_pretrained(folder, local_files_only=True)
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # transformers' validation of its fields
        raise CheckpointError(f"{path} cannot configure a {model_type!r} model: {type(e).__name__}: {e}") from None


def attach_processing(model: ClipMoeModel, folder: str) -> None:
    """Give the model the tokenizer and image transform its folder describes, where present."""
    if os.path.exists(os.path.join(folder, "preprocessor_config.json")):
        try:
            model.image_processor = ImageTransform.from_folder(folder)
        except ValueError as e:  # a preprocessing clipmoe would not reproduce: never embed other pixels silently
            raise CheckpointError(str(e)) from None
    if any(os.path.exists(os.path.join(folder, f)) for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        model.tokenizer = TextTokenizer.from_folder(
            folder, model.config.text_config.max_position_embeddings, getattr(model, "text_padding", "longest")
        )
