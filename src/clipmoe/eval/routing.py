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

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..model.modeling import tower_layers
from ..model.moe import MoEFeedForward
from ..utils.io import atomic_file
from .datasets import ImageRef
from .features import BatchHook, encode_images, encode_texts

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


def plot_routing(result: dict, out_png: str | os.PathLike) -> None:
    """One row per modality: expert load per layer, expert co-selection and each label set's per-group load
    (both in the last MoE layer). Written atomically (temporary file, then rename)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    modalities = [m for m in MODALITY_TOWERS if m in result]
    if not modalities:
        raise ValueError("the routing result holds no modality to plot")
    cols = 2 + max(len(result[m]["groups"]) for m in modalities)
    fig = Figure(figsize=(4.2 * cols, 3.6 * len(modalities)), layout="constrained")
    axes = fig.subplots(len(modalities), cols, squeeze=False)
    experts = [str(e) for e in range(result["num_experts"])]
    for row, modality in zip(axes, modalities):
        r = result[modality]
        last = r["layers"][-1]
        panels = [
            (r["load"], f"{modality}: expert load per layer", experts, [str(b) for b in r["layers"]]),
            (r["coselection"][-1], f"{modality} block {last}: chosen together", experts, experts),
        ]
        for name, g in r["groups"].items():
            panels.append((g["load"][-1], f"{modality} block {last}: load per {name}", experts, g["names"]))
        for ax, (data, title, xticks, yticks) in zip(row, panels):
            im = ax.imshow(np.asarray(data), cmap="viridis", aspect="auto", vmin=0)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("expert")
            ax.set_xticks(range(len(xticks)), xticks)
            ax.set_yticks(range(len(yticks)), yticks, fontsize=7)
            fig.colorbar(im, ax=ax)
        for ax in row[len(panels) :]:
            ax.axis("off")
    with atomic_file(out_png, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
