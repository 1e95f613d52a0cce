"""The CLIP-MoE model: an HF ``CLIPModel`` whose chosen FFNs are ``MoEFeedForward`` layers.

The MoE structure lives in ``config.moe`` (see ``MoESpec``), so a saved folder is an ordinary HF CLIP
folder plus one config section. This file imports only torch, transformers and ``.moe`` so that it can be
copied next to an exported model and loaded with ``trust_remote_code`` without clipmoe installed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from .moe import EXPERT_KERNELS, MoEFeedForward

TOWERS = ("vision", "text")


@dataclass
class MoESpec:
    """Which blocks of which tower are MoE, and how they route. Stored as ``config.moe``."""

    num_experts: int
    top_k: int = 2
    layers: dict[str, list[int]] = field(default_factory=dict)  # tower -> block indices
    expert_dropout: float = 0.0
    capacity_factor: float = 0.0  # token dropping (moe.MoEFeedForward); 0 = dropless
    capacity_at_inference: bool = False
    always_on_base: bool = False  # expert 0 (the base FFN) runs for every token, top_k of the others added

    @classmethod
    def from_dict(cls, d: dict) -> MoESpec:
        # "dispatch" was saved by versions before it became a run-time choice (set_moe_dispatch): ignored
        d = {k: v for k, v in d.items() if k != "dispatch"}
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown keys in the config's moe section: {sorted(unknown)}")
        d["layers"] = {t: [int(i) for i in v] for t, v in d.get("layers", {}).items()}
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    def layer_options(self) -> dict:
        return {
            "capacity_factor": self.capacity_factor,
            "capacity_at_inference": self.capacity_at_inference,
            "always_on_base": self.always_on_base,
        }


def tower_layers(model: nn.Module) -> dict[str, nn.ModuleList]:
    """The transformer blocks of each tower of an HF CLIP model (full, vision-only or text-only)."""
    if hasattr(model, "vision_model") and hasattr(model, "text_model"):
        return {"vision": model.vision_model.encoder.layers, "text": model.text_model.encoder.layers}
    if isinstance(model, CLIPVisionModel) or getattr(model, "is_vision_tower", False):
        encoder = model.vision_model.encoder if hasattr(model, "vision_model") else model.encoder
        return {"vision": encoder.layers}
    raise TypeError(f"not an HF CLIP model: {type(model).__name__}")


def tower_config(config, tower: str):
    if isinstance(config, CLIPConfig) or hasattr(config, "vision_config"):  # full CLIP / SigLIP configs
        return config.vision_config if tower == "vision" else config.text_config
    return config


def build_moe_structure(model: nn.Module, spec: MoESpec) -> None:
    """Replace the FFNs named by ``spec`` with freshly initialised MoE layers of the right shapes."""
    for tower, blocks in tower_layers(model).items():
        cfg = tower_config(model.config, tower)
        for i in spec.layers.get(tower, []):
            if not 0 <= i < len(blocks):
                raise ValueError(f"moe layer {i} out of range for the {tower} tower ({len(blocks)} blocks)")
            blocks[i].mlp = MoEFeedForward(
                cfg.hidden_size,
                cfg.intermediate_size,
                spec.num_experts,
                spec.top_k,
                cfg.hidden_act,
                spec.expert_dropout,
                **spec.layer_options(),
            )


class _MoEHooks:
    """Hooks shared by the full model and the vision tower (open_clip-style uniform hooks)."""

    @property
    def moe_spec(self) -> MoESpec | None:
        moe = getattr(self.config, "moe", None)
        return MoESpec.from_dict(moe) if moe else None

    def _build_moe(self) -> None:
        spec = self.moe_spec
        if spec is not None:
            self.config.moe = spec.to_dict()  # normalised: drops what older versions wrote (dispatch)
            build_moe_structure(self, spec)

    def moe_layers(self, tower: str | None = None) -> list[MoEFeedForward]:
        """The MoE layers in block order, of one tower or of all."""
        towers = tower_layers(self)
        names = [tower] if tower else list(towers)
        return [b.mlp for t in names for b in towers[t] if isinstance(b.mlp, MoEFeedForward)]

    def router_logits(self, tower: str) -> list[torch.Tensor]:
        """Router logits ``[tokens, E]`` of each MoE layer of ``tower`` from the last forward."""
        return [m.last_router_logits for m in self.moe_layers(tower) if m.last_router_logits is not None]

    def set_trainable(self, mode: str, last_n_blocks: int | None = None) -> None:
        """Freeze everything except: ``all`` | ``ffn`` (MLP / expert weights) | ``router`` |
        ``router+experts``. ``last_n_blocks`` limits ``ffn`` to the last N blocks of each tower."""
        modes = ("all", "ffn", "router", "router+experts")
        if mode not in modes:
            raise ValueError(f"trainable mode must be one of {modes}, got {mode!r}")
        self.requires_grad_(mode == "all")
        if mode == "all":
            return
        for blocks in tower_layers(self).values():
            first = 0 if last_n_blocks is None else max(0, len(blocks) - last_n_blocks)
            for block in list(blocks)[first:]:
                mlp = block.mlp
                if isinstance(mlp, MoEFeedForward):
                    mlp.router.requires_grad_(mode != "ffn")
                    for p in (mlp.w1, mlp.b1, mlp.w2, mlp.b2):
                        p.requires_grad_(mode in ("ffn", "router+experts"))
                else:
                    mlp.requires_grad_(mode == "ffn")

    def set_moe_dispatch(self, dispatch: str) -> None:
        """Choose how every MoE layer computes its experts: ``"auto"`` or a name in ``EXPERT_KERNELS``
        (``"eager"``; with clipmoe installed also ``"loop"`` and ``"grouped_mm"``). A run-time choice,
        never saved: every loaded model starts at ``"auto"``."""
        if dispatch != "auto" and dispatch not in EXPERT_KERNELS:
            raise ValueError(f"dispatch must be 'auto' or one of {sorted(EXPERT_KERNELS)}, got {dispatch!r}")
        for m in self.moe_layers():
            m.dispatch = dispatch

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # Non-reentrant so that side outputs (router logits) stay differentiable through the recompute.
        # Later transformers 5 releases renamed gradient_checkpointing_* to activation_checkpointing_*.
        if hasattr(self, "activation_checkpointing_enable"):
            if enable:
                self.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.activation_checkpointing_disable()
        elif enable:
            self.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.gradient_checkpointing_disable()

    def parameter_counts(self) -> dict[str, int]:
        """Trainable, total, and active-per-token parameters (top_k of E experts counted, plus the base expert
        where it is always on)."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        inactive = 0
        for m in self.moe_layers():
            per_expert = sum(p[0].numel() for p in (m.w1, m.b1, m.w2, m.b2))
            inactive += per_expert * (m.num_experts - m.active_experts)
        return {"trainable": trainable, "total": total, "active": total - inactive}

    def remote_entry(self) -> str:
        """``module.Class`` of this model in the remote code a saved folder carries (its ``auto_map``)."""
        return "ClipMoeVisionModel" if isinstance(self, CLIPVisionModel) else "ClipMoeModel"

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write the HF folder (config with its ``moe`` section, safetensors, tokenizer, preprocessor) into a
        temporary sibling folder, then rename it into place: nothing is left half-written.

        The folder also carries this file and ``moe.py`` plus an ``auto_map`` in config.json, so every saved
        CLIP-MoE is HF-native: ``AutoModel.from_pretrained(folder, trust_remote_code=True)`` rebuilds it
        with transformers alone, without clipmoe installed."""
        target = os.path.abspath(os.fspath(save_directory))
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
        try:
            try:
                super().save_pretrained(tmp, safe_serialization=True, **kwargs)
                write_remote_code(tmp, self.remote_entry())
                for extra in (getattr(self, "tokenizer", None), getattr(self, "image_processor", None)):
                    if extra is not None:
                        extra.save_pretrained(tmp)
            except Exception as e:
                reason = _io_failure(e)
                if reason is None:
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
                raise ModelWriteError(f"could not write {target}: {reason}; removed the partial {tmp}") from e
            old = None
            if os.path.exists(target):
                old = tempfile.mkdtemp(prefix=".old-", dir=parent)
                os.replace(target, os.path.join(old, "x"))
            os.replace(tmp, target)
            if old:
                shutil.rmtree(old)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp)


class ModelWriteError(OSError, ValueError):
    """A model folder could not be written (disk full, I/O error); its temporary folder has been removed."""


def _io_failure(exc: BaseException) -> str | None:
    """The OS's reason when ``exc`` is a failed write (safetensors and torch wrap the OSError), else None."""
    e, seen = exc, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError):
            return e.strerror or str(e)
        e = e.__cause__ or e.__context__
    text = (str(exc).splitlines() or [""])[0]
    if "I/O error" not in text:
        return None
    # safetensors: "Error while serializing: I/O error: No space left on device (os error 28)"
    return text.partition("I/O error: ")[2].partition(" (os error")[0][:200] or text[:200]


def write_remote_code(folder: str, class_name: str) -> None:
    """Copy this file and ``moe.py`` into ``folder`` and point config.json's ``auto_map`` at ``class_name``.

    ``class_name`` may name another module of this folder (``"modeling_siglip.SiglipMoeModel"``): that file
    is copied too.

    The copies are taken from wherever this module was imported from, so a model that was itself loaded
    as remote code saves the same code again. Only ``AutoModel`` is mapped: it is the entry point LLaVA-style
    loaders and feature extractors use, and mapping more classes would promise behaviour nobody tests.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    shutil.copyfile(os.path.join(here, "modeling.py"), os.path.join(folder, "modeling.py"))
    shutil.copyfile(os.path.join(here, "moe.py"), os.path.join(folder, "moe.py"))
    module, _, name = class_name.rpartition(".")
    if module and module != "modeling":
        shutil.copyfile(os.path.join(here, f"{module}.py"), os.path.join(folder, f"{module}.py"))
    config_path = os.path.join(folder, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["auto_map"] = {"AutoModel": f"{module or 'modeling'}.{name}"}
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


class ClipMoeModel(_MoEHooks, CLIPModel):
    """HF ``CLIPModel`` plus MoE FFNs (from ``config.moe``) and CLIP-style encode functions."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__(config)
        self._build_moe()

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image features (not normalised)."""
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        return self.visual_projection(pooled)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Projected text features (not normalised), pooled at the EOS token."""
        pooled = self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return self.text_projection(pooled)


class ClipMoeVisionModel(_MoEHooks, CLIPVisionModel):
    """Vision tower only, with the ``CLIPVisionModel`` call contract (LLaVA-style drop-in)."""

    config_class = CLIPVisionConfig
    # transformers 5 saves a vision tower with unprefixed keys (``encoder.*``), while 4.x (LLaVA pins 4.37)
    # nests the tower under ``.vision_model``. With this prefix 4.x strips nothing and loads the unprefixed
    # keys into that submodule, so one folder serves both; 5.x has no such submodule and ignores it.
    base_model_prefix = "vision_model"

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__(config)
        self._build_moe()
