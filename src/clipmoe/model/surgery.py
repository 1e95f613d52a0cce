"""Model surgery: find the FFNs of CLIP towers, and turn dense CLIPs into CLIP-MoEs (upcycling).

Works on HF CLIP models (``mlp.fc1 / mlp.fc2``) and on OpenAI / open_clip module trees
(``mlp.c_fc / mlp.c_proj``), so users can upcycle whatever CLIP object they hold.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..utils.keys import key_mismatch
from .modeling import TOWERS, ClipMoeModel, MoESpec, tower_config, tower_layers
from .moe import MoEFeedForward
from .options import MoEOptions, resolve_layers

# (pattern on the module path, tower). Order matters: the first match wins.
_FFN_PATTERNS = [
    (re.compile(r"^vision_model\.(?:vision_model\.)?encoder\.layers\.(\d+)\.mlp$"), "vision"),
    (re.compile(r"^text_model\.(?:text_model\.)?encoder\.layers\.(\d+)\.mlp$"), "text"),
    (re.compile(r"^visual\.transformer\.resblocks\.(\d+)\.mlp$"), "vision"),
    (re.compile(r"^(?:text\.)?transformer\.resblocks\.(\d+)\.mlp$"), "text"),
]
_FFN_PARTS = (("fc1", "activation_fn", "fc2"), ("c_fc", "gelu", "c_proj"))


@dataclass
class FFN:
    """One transformer block's feed-forward network, wherever it lives in the model."""

    tower: str
    block: int
    path: str  # module path of the FFN, e.g. "vision_model.encoder.layers.3.mlp"
    module: nn.Module

    def parts(self) -> tuple[nn.Linear, nn.Module, nn.Linear]:
        for up, act, down in _FFN_PARTS:
            if hasattr(self.module, up) and hasattr(self.module, down):
                return getattr(self.module, up), getattr(self.module, act), getattr(self.module, down)
        raise TypeError(f"{self.path} is not a dense FFN (no fc1/fc2 or c_fc/c_proj)")


def find_ffns(model: nn.Module) -> dict[str, list[FFN]]:
    """Every block FFN of both towers, in block order: ``{"vision": [...], "text": [...]}``."""
    if getattr(getattr(model, "config", None), "moe", None):
        raise ValueError("the model is already a CLIP-MoE; upcycle a dense model")
    found: dict[str, list[FFN]] = {t: [] for t in TOWERS}
    for path, module in model.named_modules():
        for pattern, tower in _FFN_PATTERNS:
            match = pattern.match(path)
            if match:
                found[tower].append(FFN(tower, int(match.group(1)), path, module))
                break
    if not any(found.values()):
        raise TypeError(f"no CLIP transformer FFNs found in {type(model).__name__}")
    for ffns in found.values():
        ffns.sort(key=lambda f: f.block)
    return found


def _ffn_weights(ffn: FFN) -> tuple[torch.Tensor, ...]:
    up, _, down = ffn.parts()
    return up.weight, up.bias, down.weight, down.bias


def _as_state_dict(expert: nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    return expert.state_dict() if isinstance(expert, nn.Module) else expert


_BLOCK_FFN_KEY = re.compile(r"(?:^|\.)(?:layers|resblocks)\.\d+\.mlp\.")


def _is_ffn_key(key: str) -> bool:
    # A transformer block's FFN only: SigLIP's attention-pooling head has an ``mlp`` too, which is not an expert.
    return _BLOCK_FFN_KEY.search(key) is not None


def check_same_base(base: nn.Module, expert: nn.Module | Mapping[str, torch.Tensor], name: str) -> None:
    """Fail unless every non-FFN tensor of ``expert`` equals the base's (DMU experts differ only in FFNs)."""
    ref = base.state_dict()
    other = _as_state_dict(expert)
    missing = sorted(set(ref) - set(other))
    extra = sorted(set(other) - set(ref))
    if missing or extra:
        raise ValueError(
            f"{name} does not have the base's parameters: {key_mismatch(missing=missing, unexpected=extra)}"
        )
    for key, value in ref.items():
        if _is_ffn_key(key):
            continue
        theirs = other[key]
        if theirs.shape != value.shape:
            raise ValueError(
                f"{name} differs from the base at {key}: shape {tuple(theirs.shape)} vs {tuple(value.shape)}"
            )
        if not torch.equal(theirs.to(value.device, value.dtype), value):
            diff = (theirs.to(value.device).float() - value.float()).abs().max().item()
            raise ValueError(
                f"{name} is not fine-tuned from this base: non-FFN tensor {key} differs (max |diff| = {diff:.3g}); "
                "DMU experts may differ from the base only in FFN weights"
            )


def _assemble(
    base: ClipMoeModel,
    expert_ffns: Sequence[Mapping[str, Sequence[tuple[torch.Tensor, ...]]]],
    options: MoEOptions,
) -> ClipMoeModel:
    num_experts = len(expert_ffns)
    top_k = num_experts if options.uniform else options.top_k  # a uniform mixture uses every expert
    routed = num_experts - int(options.always_on_base)
    if not 1 <= top_k <= (num_experts if options.uniform else routed):
        raise ValueError(
            f"top_k={top_k} must be between 1 and the number of experts ({num_experts})"
            + (" less the always-on base" if options.always_on_base else "")
        )
    ffns = find_ffns(base)
    chosen = resolve_layers(options.layers, {t: len(f) for t, f in ffns.items()})
    model = copy.deepcopy(base)
    model_ffns = find_ffns(model)
    for tower, blocks in chosen.items():
        for i in blocks:
            target = model_ffns[tower][i]
            # the activation by its config name, as the FFN was built (the fast kernels key closed forms on it)
            hidden_act = tower_config(model.config, tower).hidden_act
            moe = MoEFeedForward.from_ffns(
                [e[tower][i] for e in expert_ffns],
                hidden_act,
                top_k,
                options.expert_dropout,
                options.dispatch,
                **options.layer_options(),
            )
            parent_path, _, attr = target.path.rpartition(".")
            setattr(model.get_submodule(parent_path), attr, moe)
    # dispatch is a run-time choice, not config
    spec = MoESpec(num_experts, top_k, chosen, options.expert_dropout, **options.layer_options())
    model.config.moe = spec.to_dict()
    for attr in ("tokenizer", "image_processor"):
        if hasattr(base, attr):
            setattr(model, attr, getattr(base, attr))
    return model


def _options(options: MoEOptions | None, overrides: dict) -> MoEOptions:
    """``options`` (default ``MoEOptions()``) with keyword overrides; an unknown name is a TypeError."""
    options = options if options is not None else MoEOptions()
    return dataclasses.replace(options, **overrides) if overrides else options


def assemble_moe(
    base: ClipMoeModel,
    experts: Sequence[nn.Module | Mapping[str, torch.Tensor]],
    options: MoEOptions | None = None,
    **overrides,
) -> ClipMoeModel:
    """DMU assembly (diversified multiplet upcycling): expert e of every chosen block is the FFN of ``experts[e]``.

    ``options`` (``MoEOptions``: top_k, layers, expert_dropout, dispatch, uniform; the pipeline passes its ``moe``
    config) with any field overridden by keyword, e.g. ``assemble_moe(base, experts, top_k=1)``;
    ``uniform=True`` builds the uniform mixture (every token through every expert, equal weights, no routing).

    ``experts`` are models (or state dicts) fine-tuned from ``base`` in which only FFNs changed (the MCL
    stages; DMU passes the base itself as expert 0). Attention, norms, embeddings and projections come
    from ``base``. Routers start from nn.Linear's default init, as in the paper.
    """
    if len(experts) < 1:
        raise ValueError("assemble_moe needs at least one expert")
    ffns = find_ffns(base)
    expert_ffns = []
    for n, expert in enumerate(experts):
        check_same_base(base, expert, f"expert {n}")
        sd = _as_state_dict(expert)
        expert_ffns.append(
            {
                tower: [tuple(sd[f"{f.path}.{p}"] for p in _param_names(f)) for f in tower_ffns]
                for tower, tower_ffns in ffns.items()
            }
        )
    return _assemble(base, expert_ffns, _options(options, overrides))


def init_routers(
    model: ClipMoeModel, centroids: Mapping[str, Mapping[int, torch.Tensor]], norm: float | None = None
) -> None:
    """Point every router's rows at given directions (centroid-initialised routing, Cluster-aware Upcycling).

    ``centroids[tower][block]`` is ``[E, dim]``: row e is what expert e's router row will point at (the mean
    FFN input of the data expert e was fine-tuned on). Each row is L2-normalised and scaled to ``norm``, or,
    with None, to the norm of the row it replaces (nn.Linear's default init gives about 1/sqrt(3)), so only
    the directions change. A token equal to centroid e then scores highest on expert e whenever the
    centroids' directions differ. Blocks without a MoE layer, or missing from ``centroids``, are an error.
    """
    layers = {
        (tower, b): block.mlp
        for tower, blocks in tower_layers(model).items()
        for b, block in enumerate(blocks)
        if isinstance(block.mlp, MoEFeedForward)
    }
    for tower, blocks in centroids.items():
        for block, rows in blocks.items():
            layer = layers.get((tower, block))
            if layer is None:
                raise ValueError(f"block {block} of the {tower} tower is not a MoE layer")
            weight = layer.router.weight
            if rows.shape != weight.shape:
                raise ValueError(f"{tower} block {block}: centroids {tuple(rows.shape)}, router {tuple(weight.shape)}")
            with torch.no_grad():
                scale = weight.norm(dim=1, keepdim=True) if norm is None else torch.full_like(weight[:, :1], norm)
                weight.copy_(torch.nn.functional.normalize(rows.to(weight), dim=1) * scale)
    missing = [key for key in layers if key[1] not in centroids.get(key[0], {})]
    if missing:
        raise ValueError(f"no centroids for the MoE layers {missing}")


def _param_names(ffn: FFN) -> tuple[str, str, str, str]:
    up, _, down = ffn.parts()
    names = {id(m): n for n, m in ffn.module.named_children()}
    return (f"{names[id(up)]}.weight", f"{names[id(up)]}.bias", f"{names[id(down)]}.weight", f"{names[id(down)]}.bias")


def sparse_upcycle(
    base: ClipMoeModel,
    num_experts: int,
    options: MoEOptions | None = None,
    *,
    noise: float = 0.0,
    seed: int = 0,
    **overrides,
) -> ClipMoeModel:
    """Sparse upcycling (the CLIP-UP / paper "Upcycling" baseline): every expert a copy of the base FFN.

    ``options`` and keyword overrides as in ``assemble_moe``, e.g. ``sparse_upcycle(base, 4, top_k=2)``.

    ``noise`` > 0 multiplies each copy's weights by ``1 + noise * N(0, 1)`` to break the symmetry.
    """
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    gen = torch.Generator().manual_seed(seed)
    ffns = find_ffns(base)
    expert_ffns = []
    for _ in range(num_experts):
        copies = {}
        for tower, tower_ffns in ffns.items():
            copies[tower] = []
            for f in tower_ffns:
                ws = []
                for w in _ffn_weights(f):
                    w = w.detach().clone()
                    if noise > 0:
                        w = w * (1 + noise * torch.randn(w.shape, generator=gen).to(w))
                    ws.append(w)
                copies[tower].append(tuple(ws))
        expert_ffns.append(copies)
    return _assemble(base, expert_ffns, _options(options, overrides))
