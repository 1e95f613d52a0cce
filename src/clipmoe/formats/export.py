"""Write a CLIP-MoE for use outside clipmoe: the full model, or its vision tower alone (LLaVA-style encoders).

Every folder ``save_pretrained`` writes already carries its modeling code and an ``auto_map``, so
``AutoModel.from_pretrained(folder, trust_remote_code=True)`` rebuilds it with transformers alone. This
module adds the vision-tower-only variant (the ``CLIPVisionModel`` call contract and weight layout, plus
``preprocessor_config.json``; model_type ``clip_moe_vision_model`` when it holds experts, which the dense
``CLIPVisionModel`` refuses, ``clip_vision_model`` when dense), and the ``clipmoe export`` command that turns
any model clipmoe can open (a folder, or a checkpoint file) into such a folder.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from ..model.modeling import ClipMoeModel, ClipMoeVisionModel
from ..utils.dtypes import DTYPE_CHOICES, torch_dtype
from .hub import resolve_model
from .load import load


def vision_tower(model: ClipMoeModel) -> ClipMoeVisionModel:
    """The vision tower of a full (dense or MoE) CLIP as a standalone ``ClipMoeVisionModel``.

    The tower gets copies of the weights, with each tensor's dtype and device kept (so half-precision
    experts stay half and routers stay fp32), the vision config, and the ``moe`` section restricted to
    the vision tower. Its forward is the full model's ``vision_model`` forward, layer for layer.
    """
    tower_class = getattr(model, "vision_tower_class", ClipMoeVisionModel)  # SigLIP: modeling_siglip's towers
    config = tower_class.config_class.from_dict(model.config.vision_config.to_dict())
    spec = model.moe_spec
    if spec is not None and spec.layers.get("vision"):
        config.moe = dataclasses.replace(spec, layers={"vision": spec.layers["vision"]}).to_dict()
    tower = tower_class(config)
    state = {k: v.detach().clone() for k, v in model.vision_model.state_dict().items()}
    tower.load_state_dict(state, strict=True, assign=True)
    if getattr(model, "image_processor", None) is not None:
        tower.image_processor = model.image_processor
    return tower.eval()


def export_vision_tower(model: ClipMoeModel, directory: str | os.PathLike) -> ClipMoeVisionModel:
    """Write the vision tower of ``model`` as an HF folder and return the tower.

    The folder holds config.json (model_type ``clip_moe_vision_model`` with the vision ``moe`` section, or
    ``clip_vision_model`` for a dense tower; SigLIP: ``siglip(2)_moe_vision_model``; and an ``auto_map``),
    model.safetensors with unprefixed keys (``embeddings.*``, ``encoder.*``, as transformers
    5's ``CLIPVisionModel.save_pretrained`` writes them), ``modeling.py``/``moe.py`` and
    ``preprocessor_config.json`` (``CLIPImageProcessor``). The write is atomic.
    """
    if getattr(model, "image_processor", None) is None:
        raise ValueError(
            "the model has no image_processor (its folder had no preprocessor_config.json); a vision-tower folder "
            "must carry one so that CLIPImageProcessor.from_pretrained(folder) works"
        )
    tower = vision_tower(model)
    tower.save_pretrained(directory)
    return tower


def stored_dtype(model: str) -> torch.dtype | None:
    """The half dtype a model folder's config.json says its weights are stored in, else None (``load`` opens
    every model in fp32: an export without ``--dtype`` keeps what the folder had)."""
    path = resolve_model(model)
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        name = config.get("dtype") or config.get("torch_dtype")
    except (OSError, ValueError, AttributeError):
        return None  # a checkpoint file, or a config load() will name the problem of
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(name)


def add_export_arguments(parser) -> None:
    parser.add_argument("model", help="model folder or checkpoint file (anything clipmoe.load opens)")
    parser.add_argument("out", help="folder to write (replaced atomically if it exists)")
    parser.add_argument(
        "--vision-tower",
        action="store_true",
        help="write only the vision tower (CLIPVisionModel call contract; load a MoE tower with AutoModel and "
        "trust_remote_code=True, as LLaVA-style encoders can)",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default=None,
        help="store the weights in this dtype (routers stay float32); default: keep the model's",
    )


def run_export(args) -> int:
    model = load(args.model, dtype=torch_dtype(args.dtype) if args.dtype else stored_dtype(args.model))
    if args.vision_tower:
        export_vision_tower(model, args.out)
        what = "vision tower"
    else:
        model.save_pretrained(args.out)
        what = "model"
    moe = len(model.moe_layers("vision" if args.vision_tower else None))
    print(f"wrote {what} ({moe} MoE layers) to {args.out}")
    print(f"transformers alone loads it: AutoModel.from_pretrained({str(args.out)!r}, trust_remote_code=True)")
    if moe:
        print("transformers' dense classes (CLIPModel, CLIPVisionModel, ...) refuse it: it holds experts")
    return 0
