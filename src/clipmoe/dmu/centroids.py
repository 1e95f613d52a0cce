"""Centroid-initialised routers (``moe.router_init: centroid``): where each expert's router row starts.

Cluster-aware Upcycling (arXiv 2604.13508) sets router weights to the centroids of the clusters its experts
were built from. DMU's analogue: expert 0 is the base FFN, expert e >= 1 the FFN that MCL stage e fine-tuned
on the batches of stage e-1's accumulated clusters. At every MoE layer, expert e's row points at the mean
FFN input (the hidden state after the pre-FFN LayerNorm, i.e. what the router sees) of the training samples
that stage e's batches held; expert 0's at the mean over all readable training samples. Hidden states come
from the base model (the MoE's attention, norms and embeddings are the base's); each sample contributes the
mean over its tokens (text: real tokens only). A seeded subsample of ``moe.router_init_samples`` training
samples is encoded once.

Every MCL stage visits every cluster of its labels (each *batch* is one cluster), so the stages' sample sets
differ only by what their small-cluster rule left out; ``router_init.json`` records how far apart the
resulting rows are (their mean pairwise cosine per layer).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from ..data.collate import ClipCollator
from ..model.modeling import ClipMoeModel
from ..model.surgery import find_ffns, resolve_layers
from ..train.samplers import GlobalBatchSampler


def stage_samples(pipe, stage: int) -> np.ndarray:
    """Indices of the training samples MCL stage ``stage`` trained on (every epoch of its batch plan)."""
    tcfg = replace(pipe.cfg.mcl, seed=pipe.cfg.seed + stage)
    labels = pipe.cluster(stage - 1)
    sampler = GlobalBatchSampler(
        len(labels),
        tcfg.batch_size,
        labels,
        world_size=pipe.env.world_size,
        seed=tcfg.seed,
        small_clusters=tcfg.small_clusters,
        min_batch=tcfg.min_batch,
    )
    with open(pipe.out("mcl", stage, "stats")) as f:
        micro = json.load(f)["steps"] * tcfg.grad_accum
    epochs = math.ceil(micro / len(sampler))
    batches = [b for epoch in range(epochs) for b in sampler.plan(epoch)][:micro]
    return np.unique(np.concatenate(batches))


def ffn_input_means(
    model: ClipMoeModel, dataset, blocks: dict[str, list[int]], batch_size: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Per tower, ``[samples, len(blocks[tower]), dim]``: each sample's mean FFN input at each chosen block
    (forward pre-hooks on the dense model's FFNs; text padding left out of the mean)."""
    ffns = find_ffns(model)
    captured: dict[str, dict[int, torch.Tensor]] = {t: {} for t in blocks}
    hooks = []
    for tower, chosen in blocks.items():
        for b in chosen:

            def hook(_module, args, tower=tower, b=b):
                captured[tower][b] = args[0].detach().float()

            hooks.append(ffns[tower][b].module.register_forward_pre_hook(hook))
    out: dict[str, list[torch.Tensor]] = {t: [] for t in blocks}
    collate = ClipCollator(model.tokenizer, model.image_processor)
    model.to(device).eval()
    try:
        with torch.no_grad():
            for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
                if batch["skipped"]:  # rows must stay aligned with the samples asked for
                    raise ValueError(f"moe.router_init: cannot read {'; '.join(batch['skipped'])}")
                if blocks.get("vision"):
                    model.encode_image(batch["pixel_values"].to(device))
                    means = torch.stack([captured["vision"][b].mean(dim=1) for b in blocks["vision"]], dim=1)
                    out["vision"].append(means.cpu())
                if blocks.get("text"):
                    mask = batch["attention_mask"].to(device)
                    model.encode_text(batch["input_ids"].to(device), mask)
                    w = mask.float()[:, :, None] / mask.sum(dim=1).clamp_min(1)[:, None, None]
                    means = torch.stack([(captured["text"][b] * w).sum(dim=1) for b in blocks["text"]], dim=1)
                    out["text"].append(means.cpu())
    finally:
        for h in hooks:
            h.remove()
    return {t: torch.cat(v) for t, v in out.items() if v}


def router_centroids(pipe, base: ClipMoeModel) -> tuple[dict[str, dict[int, torch.Tensor]], dict]:
    """``({tower: {block: [E, dim]}}, record)``: each MoE layer's expert centroids (module docstring), and what
    ``router_init.json`` keeps of them (samples per expert, the rows' mean pairwise cosine per layer)."""
    cfg = pipe.cfg
    dataset = pipe.dataset()
    n = len(dataset)
    labels = pipe.cluster(0)
    readable = np.flatnonzero(labels >= 0)  # the embed stage marks unreadable images -1
    rng = np.random.default_rng(cfg.seed)
    subset = np.sort(rng.choice(readable, size=min(cfg.moe.router_init_samples, len(readable)), replace=False))
    members = [readable] + [stage_samples(pipe, e) for e in range(1, cfg.moe.experts)]
    depth = {t: len(f) for t, f in find_ffns(base).items()}
    blocks = {t: b for t, b in resolve_layers(cfg.moe.layers, depth).items() if b}
    means = ffn_input_means(base, Subset(dataset, subset.tolist()), blocks, cfg.embed.batch_size, pipe.env.device)
    picks = []
    for e, samples in enumerate(members):
        pick = np.isin(subset, samples)
        if not pick.any():
            raise ValueError(
                f"moe.router_init: none of the {len(subset)} sampled training samples (of {n}) is one expert {e} "
                "was fine-tuned on; raise moe.router_init_samples"
            )
        picks.append(torch.from_numpy(pick))
    centroids: dict[str, dict[int, torch.Tensor]] = {}
    record: dict = {"samples_per_expert": [int(p.sum()) for p in picks], "mean_pairwise_cosine": {}}
    for tower, feats in means.items():
        rows = torch.stack([feats[p].mean(dim=0) for p in picks], dim=1)  # [layers, E, dim]
        centroids[tower] = {b: rows[i] for i, b in enumerate(blocks[tower])}
        unit = torch.nn.functional.normalize(rows, dim=-1)
        cos = unit @ unit.transpose(1, 2)
        e = rows.shape[1]
        off = (cos.sum(dim=(1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(dim=1)) / max(e * (e - 1), 1)
        record["mean_pairwise_cosine"][tower] = {str(b): round(float(c), 6) for b, c in zip(blocks[tower], off)}
    return centroids, record
