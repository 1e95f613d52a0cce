"""The CLIP-MoE model: an HF ``CLIPModel`` whose chosen FFNs are ``MoEFeedForward`` layers.

The MoE structure lives in ``config.moe`` (see ``MoESpec``). A saved MoE folder declares its own model type
(``clip_moe``, ``clip_moe_vision_model`` for a vision tower; ``ClipMoeConfig``, ``ClipMoeVisionConfig``) and
carries this file, ``moe.py`` and an ``auto_map``, so transformers alone rebuilds it with
``trust_remote_code``, and a dense transformers class refuses it (``guard_config``). A dense model saves as
the plain HF type (``clip``): any CLIP loader opens it correctly. This file imports only torch, transformers
and ``.moe`` so that it can be copied next to an exported model and loaded without clipmoe installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForZeroShotImageClassification,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
)

from .moe import EXPERT_KERNELS, MoEFeedForward

TOWERS = ("vision", "text")
TOWER_KEYS = {"vision": "vision_config", "text": "text_config"}  # where a full config.json keeps each tower

# The key that holds a MoE tower's FFN width in a saved config.json; ``intermediate_size`` holds GUARD there.
FFN_WIDTH_KEY = "ffn_intermediate_size"
GUARD = (
    "this tower's FFNs are mixtures of experts (clipmoe), which a dense transformers class would replace with "
    "random FFNs. Open the folder with clipmoe.load(folder) or AutoModel.from_pretrained(folder, "
    f"trust_remote_code=True) (transformers' zero-shot pipeline: trust_remote_code=True). FFN width: {FFN_WIDTH_KEY}"
)


@dataclass
class MoESpec:
    """Which blocks of which tower are MoE, and how they route. Stored as ``config.moe``."""

    num_experts: int
    top_k: int = 2
    layers: dict[str, list[int]] = field(default_factory=dict)  # tower -> block indices
    expert_dropout: float = 0.0
    uniform: bool = False  # the uniform-mixture control: every token through every expert, equal weights
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
            "uniform": self.uniform,
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


def has_moe_layers(moe: dict | None) -> bool:
    """Whether a config's ``moe`` section puts experts in any block (a folder without is a dense model)."""
    return bool(moe) and any(moe.get("layers", {}).values())


# Why a dense class fails instead of warning. transformers 5 opens a folder of another model_type with a
# warning only (``You are using a model of type clip_moe to instantiate a model of type clip``), and loads
# the MoE weights with the FFNs missing, i.e. random, reported in a load report nobody reads. What it does
# refuse is a config whose typed fields have the wrong type: its configs are strict dataclasses, so
# ``CLIPVisionConfig(intermediate_size="...")`` raises, quoting the value. A saved MoE tower therefore keeps
# its FFN width under FFN_WIDTH_KEY and GUARD, the instructions, in ``intermediate_size``: every dense class
# that builds that tower (CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection, SiglipModel, ... on a
# full folder or a tower export) stops there with GUARD in its message, and only towers that hold experts
# are guarded (CLIPTextModel still opens the dense text tower of a vision-only MoE, correctly). The MoE
# config classes put the width back before the strict check (``from_dict``, which every loading path of
# transformers goes through). Renaming the weights file would also stop dense classes, but with an error
# ("no file named model.safetensors") that says nothing about what to do instead.
def guard_config(config: dict, widths: dict[str, int], tower_only: bool = False) -> None:
    """Guard the towers named in ``widths`` (tower -> FFN width) of a config.json dict, in place: a full
    model's ``text_config`` / ``vision_config``, or, with ``tower_only`` (a single tower's flat config),
    the config itself."""
    for tower, width in widths.items():
        target = config if tower_only else config.setdefault(TOWER_KEYS[tower], {})
        target[FFN_WIDTH_KEY] = width
        target["intermediate_size"] = GUARD


def unguard_config(config: dict) -> dict:
    """A copy of a config.json dict with every guarded tower's ``intermediate_size`` restored."""
    config = dict(config)
    for key in (None, *TOWER_KEYS.values()):
        tower = config if key is None else config.get(key)
        if isinstance(tower, dict) and FFN_WIDTH_KEY in tower:
            tower = dict(tower)
            tower["intermediate_size"] = tower.pop(FFN_WIDTH_KEY)
            if key is None:
                config = tower
            else:
                config[key] = tower
    return config


class MoEConfigMixin:
    """What the MoE config classes add to the HF config they subclass: their own ``model_type`` (the class
    attribute; a dict's ``model_type`` is dropped, since a tower's dict names its dense type) and the guarded
    towers of a saved config.json opened again."""

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        config_dict = {k: v for k, v in unguard_config(config_dict).items() if k != "model_type"}
        return super().from_dict(config_dict, **kwargs)


class ClipMoeConfig(MoEConfigMixin, CLIPConfig):
    """``CLIPConfig`` of a CLIP-MoE (model_type ``clip_moe``); ``moe`` is its ``MoESpec`` as a dict."""

    model_type = "clip_moe"
    dense_config_class = CLIPConfig
    moe: dict | None = None


class ClipMoeVisionConfig(MoEConfigMixin, CLIPVisionConfig):
    """``CLIPVisionConfig`` of a CLIP-MoE vision tower (model_type ``clip_moe_vision_model``)."""

    model_type = "clip_moe_vision_model"
    dense_config_class = CLIPVisionConfig
    moe: dict | None = None


class _MoEHooks:
    """Hooks shared by the full model and the vision tower (open_clip-style uniform hooks)."""

    # transformers loading a half-precision folder keeps the routers in fp32, as clipmoe.load does: top-k
    # selection on rounded logits would route tokens differently
    _keep_in_fp32_modules_strict = ("router",)

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

    remote_module = "modeling"  # the file of the remote code that defines this class

    def remote_entry(self) -> str:
        """``module.Class`` of this model in the remote code a saved folder carries (its ``auto_map``): the
        class itself, or for a subclass defined elsewhere, the clipmoe class it derives from."""
        cls = next(c for c in type(self).__mro__ if c.__module__.rpartition(".")[2] == self.remote_module)
        return f"{self.remote_module}.{cls.__name__}"

    def save_pretrained(self, save_directory: str | os.PathLike, overwrite: bool = False, **kwargs) -> None:
        """Write the HF folder (config with its ``moe`` section, safetensors, tokenizer, preprocessor) into a
        temporary sibling folder, then rename it into place: nothing is left half-written.

        The folder also carries this file and ``moe.py`` plus an ``auto_map`` in config.json, so every saved
        CLIP-MoE is HF-native: ``AutoModel.from_pretrained(folder, trust_remote_code=True)`` rebuilds it
        with transformers alone, without clipmoe installed. A model with MoE layers is saved under its own
        model_type with its MoE towers guarded against dense classes (``write_remote_code``).

        The folder is replaced whole: a folder holding anything but an earlier saved model is refused unless
        ``overwrite`` (a file, the working directory and an empty name always are)."""
        target = _replaceable_target(save_directory, overwrite)
        bad = _non_finite(self.state_dict())
        if bad:  # a model no later phase can use: nothing is written, not even over an earlier good copy
            raise ValueError(f"not saved to {target}: {bad}")
        parent = os.path.dirname(target)
        try:
            os.makedirs(parent, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
        except OSError as e:  # a file on the path, no permission: one error naming the target
            raise ModelWriteError(f"could not write {target}: {e.strerror or e}") from e
        try:
            try:
                super().save_pretrained(tmp, safe_serialization=True, **kwargs)
                write_remote_code(tmp, self)
                for extra in (getattr(self, "tokenizer", None), getattr(self, "image_processor", None)):
                    if extra is not None:
                        extra.save_pretrained(tmp)
            except Exception as e:
                reason = _io_failure(e)
                if reason is None:
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
                raise ModelWriteError(f"could not write {target}: {reason}; removed the partial {tmp}") from e
            _make_shared(tmp)
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


def _replaceable_target(save_directory: str | os.PathLike, overwrite: bool = False) -> str:
    """The folder a save may replace: a new path, an empty folder or an earlier saved model. Replacing is a
    rename of the whole folder, so anything else there (a file, someone's folder, the working directory)
    would be deleted: refused, with nothing written."""
    if not os.fspath(save_directory):
        raise ValueError("save_pretrained: no folder given")
    target = os.path.abspath(os.fspath(save_directory))
    here = os.path.abspath(os.getcwd())
    if os.path.isfile(target):
        raise ValueError(f"{target} is a file; a model is saved as a folder (nothing was written)")
    if here == target or here.startswith(target.rstrip(os.sep) + os.sep):
        raise ValueError(f"{target} holds the working directory; save the model to a folder of its own")
    saved = os.path.exists(os.path.join(target, "config.json"))
    if os.path.isdir(target) and os.listdir(target) and not saved and not overwrite:
        raise ValueError(
            f"{target} holds files that are not a saved model; saving replaces the whole folder: choose a new or"
            " empty folder (nothing was written)"
        )
    return target


def _non_finite(state: dict) -> str | None:
    """Which tensor holds NaN or inf values (a fp16 cast can overflow), or None."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            nan = int(torch.isnan(t).sum())
            return f"tensor {name} holds {nan} NaN and {int(t.numel() - nan - torch.isfinite(t).sum())} inf value(s)"
    return None


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


def _make_shared(folder: str) -> None:
    """mkdtemp made the folder private; a model is ordinary data: give it the mode mkdir would (the umask read
    from Linux's /proc where it shows it, not set and reset under other threads). Best effort, as a file system
    that refuses modes keeps its own. (This file travels as remote code, so it cannot use clipmoe's utils.)"""
    umask = None
    try:
        with open("/proc/self/status") as f:
            umask = next((int(line.split()[1], 8) for line in f if line.startswith("Umask:")), None)
    except OSError:
        pass
    if umask is None:
        umask = os.umask(0o077)
        os.umask(umask)
    with contextlib.suppress(OSError):
        os.chmod(folder, 0o777 & ~umask)
        for name in os.listdir(folder):  # safetensors writes its file private too
            path = os.path.join(folder, name)
            os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)


def write_remote_code(folder: str, model: _MoEHooks) -> None:
    """Copy this file, ``moe.py`` and the model's own module into ``folder`` and finish its config.json.

    The copies are taken from wherever this module was imported from, so a model that was itself loaded
    as remote code saves the same code again. A model with MoE layers gets its MoE model_type, guarded
    towers (``guard_config``) and an ``auto_map`` for ``AutoConfig``, ``AutoModel`` and, for a full model,
    ``AutoModelForZeroShotImageClassification`` (transformers' zero-shot pipeline). A dense model keeps the
    plain HF model_type and maps ``AutoModel`` only (to a class with the clipmoe hooks): HF's own classes
    open it correctly.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    for module in dict.fromkeys(("modeling", "moe", model.remote_module)):
        shutil.copyfile(os.path.join(here, f"{module}.py"), os.path.join(folder, f"{module}.py"))
    config_path = os.path.join(folder, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    entry, config_class = model.remote_entry(), model.config_class
    if has_moe_layers(config.get("moe")):
        config["model_type"] = config_class.model_type
        layers, tower_only = config["moe"]["layers"], getattr(model, "is_vision_tower", False)
        widths = {t: tower_config(model.config, t).intermediate_size for t in TOWERS if layers.get(t)}
        guard_config(config, widths, tower_only)
        config["auto_map"] = {"AutoConfig": f"{model.remote_module}.{config_class.__name__}", "AutoModel": entry}
        if not tower_only:
            config["auto_map"]["AutoModelForZeroShotImageClassification"] = entry
    else:
        config["model_type"] = config_class.dense_config_class.model_type
        config["auto_map"] = {"AutoModel": entry}
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def register_auto_classes(config_class: type, model_class: type, zero_shot: bool) -> None:
    """Make transformers' Auto classes (and so its pipelines) open ``config_class.model_type`` folders with
    ``model_class`` without ``trust_remote_code``. clipmoe calls it when its model code is imported; a
    folder's remote code does not (its ``auto_map`` serves that purpose, only for the code it carries)."""
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(config_class, model_class, exist_ok=True)
    if zero_shot:
        AutoModelForZeroShotImageClassification.register(config_class, model_class, exist_ok=True)


class ClipMoeModel(_MoEHooks, CLIPModel):
    """HF ``CLIPModel`` plus MoE FFNs (from ``config.moe``) and CLIP-style encode functions. Built from a
    ``ClipMoeConfig`` or, for a dense CLIP or a model being assembled, a plain ``CLIPConfig``."""

    config_class = ClipMoeConfig

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
    """Vision tower only, with the ``CLIPVisionModel`` call contract (LLaVA-style feature extraction)."""

    config_class = ClipMoeVisionConfig
    is_vision_tower = True
    # transformers 5 saves a vision tower with unprefixed keys (``encoder.*``), while 4.x (LLaVA pins 4.37)
    # nests the tower under ``.vision_model``. With this prefix 4.x strips nothing and loads the unprefixed
    # keys into that submodule, so one folder serves both; 5.x has no such submodule and ignores it.
    base_model_prefix = "vision_model"

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__(config)
        self._build_moe()


if __name__.startswith("clipmoe."):  # the installed package, not a saved folder's copy of this file
    register_auto_classes(ClipMoeConfig, ClipMoeModel, zero_shot=True)
    register_auto_classes(ClipMoeVisionConfig, ClipMoeVisionModel, zero_shot=False)
