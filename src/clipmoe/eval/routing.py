"""Routing analysis of a CLIP-MoE: which experts the routers pick, per layer and modality, and for what.

While the evaluation encodes images and captions, a ``RoutingCollector`` reads every MoE layer's
``last_router_logits`` (``[tokens, E]``, tokens = batch x sequence, flattened) after each batch; text
padding positions are dropped with the attention mask. Per layer and modality it reports:

* ``load``: the fraction of the top-k routing slots each expert takes (uniform = 1/E);
* ``entropy``: the mean per-token entropy of the router's softmax, in nats (``max_entropy`` = log E);
* ``coselection``: the fraction of tokens that chose both experts i and j (diagonal: chose i);
* ``groups``: for labelled samples (attribute values, classes; every token of a sample carries its
  label), ``load[g][e]``, how group g's slots spread over the experts, and ``expert_share[e][g]``, which
  groups expert e's slots came from.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..model.modeling import tower_layers
from ..model.moe import MoEFeedForward
from ..utils.io import atomic_file
from .datasets import ImageRef
from .features import BatchHook, encode_images, encode_texts

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MODALITY_TOWERS = {"image": "vision", "text": "text"}
Labels = Mapping[str, Sequence] | Sequence


class _Stats:
    """Running sums for one modality: ``L`` MoE layers of ``E`` experts."""

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.tokens = 0
        self.slots = np.zeros((num_layers, num_experts))
        self.entropy = np.zeros(num_layers)
        self.coselection = np.zeros((num_layers, num_experts, num_experts))
        self.group_slots: dict[str, dict[str, np.ndarray]] = {}  # label set -> group -> [L, E]
        self.group_tokens: dict[str, dict[str, int]] = {}


def _as_label_sets(labels: Labels | None, num: int | None = None) -> dict[str, list[str]]:
    if labels is None:
        return {}
    sets = dict(labels) if isinstance(labels, Mapping) else {"label": labels}
    out = {}
    for name, values in sets.items():
        if num is not None and len(values) != num:
            raise ValueError(f"label set {name!r} has {len(values)} labels for {num} samples")
        out[str(name)] = [str(v) for v in values]
    return out


class RoutingCollector:
    """Accumulates routing statistics of ``model``'s MoE layers across encoded batches.

    ``hook(modality, labels)`` gives the ``on_batch`` callback for ``encode_images`` (``"image"``) or
    ``encode_texts`` (``"text"``); ``labels`` (one value per sample, or ``{label set: values}``) are indexed
    by the sample indices the encoder reports.
    """

    def __init__(self, model: nn.Module) -> None:
        towers = tower_layers(model)
        self.layers: dict[str, list[tuple[int, MoEFeedForward]]] = {
            modality: [(i, b.mlp) for i, b in enumerate(towers.get(tower, [])) if isinstance(b.mlp, MoEFeedForward)]
            for modality, tower in MODALITY_TOWERS.items()
        }
        first = next((layers[0][1] for layers in self.layers.values() if layers), None)
        if first is None:
            raise ValueError("routing analysis needs a CLIP-MoE; this model has no MoE layers")
        self.num_experts, self.top_k = first.num_experts, first.top_k
        self.stats = {m: _Stats(len(layers), self.num_experts) for m, layers in self.layers.items() if layers}

    def hook(self, modality: str, labels: Labels | None = None) -> BatchHook:
        if modality not in MODALITY_TOWERS:
            raise ValueError(f"modality must be one of {list(MODALITY_TOWERS)}, got {modality!r}")
        label_sets = _as_label_sets(labels)

        def on_batch(indices: range, attention_mask: torch.Tensor | None) -> None:
            if modality in self.stats:
                self._observe(modality, indices, attention_mask, label_sets)

        return on_batch

    @torch.no_grad()
    def _observe(self, modality: str, indices: range, attention_mask, label_sets: dict[str, list[str]]) -> None:
        stats, n, num_experts = self.stats[modality], len(indices), self.num_experts
        groups = {}
        for name, values in label_sets.items():
            batch = [values[i] for i in indices]
            position = {v: i for i, v in enumerate(dict.fromkeys(batch))}
            groups[name] = (list(position), torch.tensor([position[v] for v in batch]))
        for li, (block, layer) in enumerate(self.layers[modality]):
            logits = layer.last_router_logits
            if logits is None or logits.shape[0] % n:
                raise RuntimeError(f"{modality} MoE layer {block} holds no router logits for this batch")
            sample = torch.arange(n).repeat_interleave(logits.shape[0] // n)
            logits = logits.detach().float().cpu()
            if attention_mask is not None:  # drop text padding
                keep = attention_mask.reshape(-1).bool().cpu()
                logits, sample = logits[keep], sample[keep]
            probs = logits.softmax(dim=-1)
            chosen = torch.zeros_like(probs).scatter_(1, probs.topk(self.top_k, dim=-1).indices, 1.0)  # [T, E]
            if li == 0:
                stats.tokens += len(probs)
            stats.slots[li] += chosen.sum(0).double().numpy()
            stats.entropy[li] += float(-(probs * probs.clamp_min(1e-30).log()).sum())
            stats.coselection[li] += (chosen.T @ chosen).double().numpy()
            for name, (names, gid) in groups.items():
                per_group = torch.zeros(len(names), num_experts).index_add_(0, gid[sample], chosen).double().numpy()
                slots = stats.group_slots.setdefault(name, {})
                tokens = stats.group_tokens.setdefault(name, {})
                for g, group in enumerate(names):
                    slots.setdefault(group, np.zeros_like(stats.slots))[li] += per_group[g]
                    if li == 0:
                        tokens[group] = tokens.get(group, 0) + int(per_group[g].sum()) // self.top_k

    def result(self) -> dict:
        """JSON-able statistics (see the module docstring); modalities with no MoE layer are absent."""
        out: dict = {"num_experts": self.num_experts, "top_k": self.top_k}
        for modality, s in self.stats.items():
            if s.tokens == 0:
                continue
            entry = {
                "layers": [block for block, _ in self.layers[modality]],
                "tokens": s.tokens,
                "load": (s.slots / (s.tokens * self.top_k)).tolist(),
                "entropy": (s.entropy / s.tokens).tolist(),
                "max_entropy": math.log(self.num_experts),
                "coselection": (s.coselection / s.tokens).tolist(),
                "groups": {},
            }
            for name, slots in s.group_slots.items():
                names = sorted(slots)
                counts = np.stack([slots[g] for g in names], axis=1)  # [L, G, E]
                entry["groups"][name] = {
                    "names": names,
                    "tokens": [s.group_tokens[name][g] for g in names],
                    "load": (counts / np.maximum(counts.sum(2, keepdims=True), 1)).tolist(),
                    "expert_share": (counts / np.maximum(counts.sum(1, keepdims=True), 1)).transpose(0, 2, 1).tolist(),
                }
            out[modality] = entry
        return out


def analyze_routing(
    model: nn.Module,
    images: Sequence[ImageRef | Image.Image | str] | None = None,
    texts: Sequence[str] | None = None,
    *,
    image_labels: Labels | None = None,
    text_labels: Labels | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    num_workers: int = 0,
) -> dict:
    """Encode ``images`` and/or ``texts`` and return the routing statistics (``RoutingCollector.result``)."""
    if not images and not texts:
        raise ValueError("routing analysis needs images or texts to encode")
    collector = RoutingCollector(model)
    kw = {"batch_size": batch_size, "device": device, "dtype": dtype}
    if images:
        labels = _as_label_sets(image_labels, len(images))
        encode_images(model, images, num_workers=num_workers, on_batch=collector.hook("image", labels), **kw)
    if texts:
        labels = _as_label_sets(text_labels, len(texts))
        encode_texts(model, texts, on_batch=collector.hook("text", labels), **kw)
    return collector.result()


TOKEN_KINDS = {"image": "image-patch tokens", "text": "caption tokens (padding dropped)"}


def routing_figures(
    result: dict, expert_names: Sequence[str] | None = None, title: str | None = None
) -> dict[str, Figure]:
    """One page-width figure per tower (``{"vision": Figure, "text": Figure}``, the towers the result has).

    Panels, each with labelled axes and colour bar: the expert load per MoE layer, the router entropy per
    layer, which experts are chosen together and, for each label set, how each group's routing spreads over the
    experts (the last two in the tower's last MoE layer). ``expert_names`` names the experts on every axis
    (default "expert 0", ...); ``title`` (the model's name) heads each figure."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    modalities = [m for m in MODALITY_TOWERS if m in result]
    if not modalities:
        raise ValueError("the routing result holds no modality to plot")
    n, k = result["num_experts"], result["top_k"]
    experts = list(expert_names) if expert_names is not None else [f"expert {e}" for e in range(n)]
    if len(experts) != n:
        raise ValueError(f"{len(experts)} expert names for {n} experts")
    figures = {}
    for modality in modalities:
        r = result[modality]
        last = r["layers"][-1]
        panels = len(r["groups"]) + 3
        cols = min(4, panels)
        rows = math.ceil(panels / cols)
        fig = Figure(figsize=(14, 3.6 * rows + 0.6), layout="constrained")
        axes = list(fig.subplots(rows, cols, squeeze=False).flat)
        head = f"Routing of the {MODALITY_TOWERS[modality]} tower" + (f" of {title}" if title else "")
        fig.suptitle(
            f"{head}: top-{k} of {n} experts, over {r['tokens']:,} {TOKEN_KINDS[modality]}; "
            f"(last) = the last MoE layer",
            fontsize=13,
        )
        layer_names = [f"block {b}" for b in r["layers"]]
        # every share-of-slots panel on one colour scale, so their colours compare across panels
        shares = [np.asarray(r["load"]), *(np.asarray(g["load"][-1]) for g in r["groups"].values())]
        top = max(float(a.max()) for a in shares if a.size) or 1.0
        _heatmap(
            fig,
            axes[0],
            r["load"],
            experts,
            layer_names,
            "Expert load per MoE layer",
            "MoE layer",
            f"share of the layer's routing slots\n(rows sum to 1; uniform = {1 / n:.2f})",
            top,
        )
        _entropy(axes[1], r, layer_names)
        _heatmap(
            fig,
            axes[2],
            r["coselection"][-1],
            experts,
            experts,
            f"Chosen together, block {last} (last)",
            "expert",
            "share of tokens routed\nto both (diagonal: to it)",
        )
        for ax, (name, g) in zip(axes[3:], r["groups"].items()):
            label = name.replace("_", " ")
            _heatmap(
                fig,
                ax,
                g["load"][-1],
                experts,
                g["names"],
                f"Load per {label}, block {last} (last)",
                label,
                f"share of the {label}'s routing\nslots (rows sum to 1)",
                top,
            )
        for ax in axes[panels:]:
            ax.axis("off")
        figures[MODALITY_TOWERS[modality]] = fig
    return figures


def _heatmap(
    fig,
    ax,
    data,
    xticks: Sequence[str],
    yticks: Sequence[str],
    title: str,
    ylabel: str,
    clabel: str,
    vmax: float | None = None,
) -> None:
    im = ax.imshow(np.asarray(data), cmap="viridis", aspect="auto", vmin=0, vmax=vmax)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("expert")
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(len(xticks)), xticks, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(yticks)), yticks, fontsize=8)
    fig.colorbar(im, ax=ax).set_label(clabel, fontsize=8)


def _entropy(ax, r: dict, layer_names: Sequence[str]) -> None:
    ax.plot(range(len(layer_names)), r["entropy"], marker="o", label="mean per token")
    ax.axhline(r["max_entropy"], color="grey", linestyle="--", label=f"maximum (ln E = {r['max_entropy']:.2f})")
    ax.set_ylim(0, r["max_entropy"] * 1.1)
    ax.set_xticks(range(len(layer_names)), layer_names, rotation=30, ha="right", fontsize=8)
    ax.set_title("Router entropy per MoE layer (low = confident)", fontsize=10)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("entropy of the router softmax (nats)")
    ax.legend(fontsize=8, loc="center")  # clear of the curve (near the maximum) and of the axis labels


def plot_routing(
    result: dict, out_png: str | os.PathLike, expert_names: Sequence[str] | None = None, title: str | None = None
) -> list[str]:
    """Write ``routing_figures`` as one PNG per tower, ``<out_png stem>_<tower>.png`` (each written atomically:
    a temporary file, then a rename); returns their paths."""
    stem = os.path.splitext(os.fspath(out_png))[0]
    paths = []
    for tower, fig in routing_figures(result, expert_names, title).items():
        path = f"{stem}_{tower}.png"
        with atomic_file(path, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        paths.append(path)
    return paths
