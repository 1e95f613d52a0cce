"""The one contrastive loss used everywhere (pretraining, MCL stages, router training, baselines).

Under torch.distributed the features of all ranks are gathered **with gradients** (global negatives, as the
paper and open_clip do); each rank computes the loss of its own rows against all columns. DDP averages the
gradients over ranks, which gives exactly the gradient of the single-process loss on the global batch.

The router losses (``global_router_losses``) likewise use statistics summed over all ranks, so they too
equal the single-process value on the global batch (see docs/distributed.md).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..model.moe import load_balancing_loss, router_z_loss
from .config import TrainConfig

# torch 2.13 renamed all_gather_into_tensor to all_gather_single (the old name warns); keep older torch working.
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllGather(torch.autograd.Function):
    """Rows of all ranks concatenated. Backward: each rank's loss sends gradients to every rank's rows, so
    the gradients are summed over ranks and each rank keeps the slice of its own rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = x.new_empty((dist.get_world_size() * x.shape[0], *x.shape[1:]))
        _all_gather_into(out, x)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # An all-reduce then a slice, rather than a reduce-scatter, which gloo lacks in older torch; features
        # are small next to the model's gradients, so the extra traffic does not matter.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows concatenated (differentiable), and the offset of this rank's rows."""
    if not _distributed():
        return x, 0
    return _AllGather.apply(x), dist.get_rank() * x.shape[0]


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks, differentiable: the backward pass sums the incoming gradients over ranks.

    Every rank then holds the same loss built on the sum, and DDP's gradient averaging divides the summed
    gradient by the world size again, which leaves exactly the single-process gradient.
    """
    if not _distributed():
        return x
    return _AllReduce.apply(x)


def global_router_losses(
    router_logits: torch.Tensor, top_k: int, token_mask: torch.Tensor | None = None, layers: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(balance loss, z-loss) of one tower on the routing of **all ranks together**.

    Same definitions as ``moe.load_balancing_loss`` and ``moe.router_z_loss`` (``E * sum_e f_e * P_e``
    and the mean squared log-sum-exp), but the per-expert slot counts, probability sums, z sums and token
    count are summed over ranks before the ratios are taken. A per-rank balance loss rewards balancing each
    rank's shard, which is a different (and world-size-dependent) objective; this one equals the
    single-process value on the global batch. All sums travel in one all-reduce per call.

    ``router_logits`` is ``[layers * N, E]`` (the tower's layers concatenated). ``layers=1`` pools them into one
    balance loss (the official code's flattening); ``layers=L`` computes the statistics per layer and returns
    the mean of the L per-layer balance losses. The z-loss is the mean over all rows either way.
    """
    num_experts = router_logits.shape[-1]
    logits = router_logits.float().reshape(layers, -1, num_experts)
    probs = logits.softmax(dim=-1)
    m = torch.ones_like(probs[..., 0]) if token_mask is None else token_mask.reshape(layers, -1).to(probs.dtype)
    chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).to(probs.dtype)  # [L, N, k, E]
    z = torch.logsumexp(logits, dim=-1).square()
    sums = torch.cat(
        [
            (probs * m[..., None]).sum(dim=1).reshape(-1),  # [L*E], differentiable
            (z * m).sum()[None],  # [1], differentiable
            (chosen * m[..., None, None]).sum(dim=1).reshape(-1),  # [L*k*E], counts: no gradient
            m.sum(dim=1),  # [L]
        ]
    )
    sums = all_reduce_with_grad(sums)
    prob_sum, z_sum, chosen_sum, count = sums.split([layers * num_experts, 1, layers * top_k * num_experts, layers])
    fraction = chosen_sum.reshape(layers, top_k, num_experts) / count.clamp_min(1.0)[:, None, None]
    mean_prob = prob_sum.reshape(layers, num_experts) / count.clamp_min(1.0)[:, None]
    balance = num_experts * (fraction * mean_prob[:, None, :]).sum(dim=(1, 2)).mean()
    return balance, (z_sum / count.sum().clamp_min(1.0)).squeeze(0)


def router_losses(model, attention_mask: torch.Tensor, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """``{"balance": ..., "z_loss": ...}`` of the last forward: image + ``text_balance_factor`` x text each.

    ``cfg.balance_scope`` pools a tower's MoE layers: ``tower`` = one loss on all its layers' routing flattened
    together (the official code), ``layer`` = the mean of per-layer losses (the paper's Eq. 9). With
    ``cfg.global_balance`` the statistics are summed over ranks first (one small all-reduce per tower), so the
    value and its gradient do not depend on how the global batch is split across ranks. Text padding is left
    out of both statistics unless ``cfg.balance_mask_padding`` is false. Empty when the model has no MoE layer.
    """
    balance, z_loss = [], []
    for tower, factor in (("vision", 1.0), ("text", cfg.text_balance_factor)):
        logits = model.router_logits(tower)
        if not logits:
            continue
        mask = None
        if tower == "text" and cfg.balance_mask_padding:
            mask = attention_mask.reshape(-1).bool().repeat(len(logits))
        stacked = torch.cat(logits)
        top_k = model.moe_layers(tower)[0].top_k
        layers = len(logits) if cfg.balance_scope == "layer" else 1
        if cfg.global_balance:
            term, z = global_router_losses(stacked, top_k, mask, layers)
        else:
            per_layer = stacked.chunk(layers)
            masks = mask.chunk(layers) if mask is not None else [None] * layers
            term = torch.stack([load_balancing_loss(x, top_k, k) for x, k in zip(per_layer, masks)]).mean()
            z = router_z_loss(stacked, mask)
        balance.append(factor * term)
        z_loss.append(factor * z)
    return {"balance": sum(balance), "z_loss": sum(z_loss)} if balance else {}


def distillation_loss(features: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cosine distance ``1 - cos(features, target)`` over the valid rows (the base-preserving term: the
    trained model's image embeddings pulled towards the frozen base's). Per rank; DDP averages the ranks."""
    distance = 1 - F.cosine_similarity(features.float(), target.float(), dim=-1)
    if valid is None:
        return distance.mean()
    v = valid.to(distance.dtype)
    return (distance * v).sum() / v.sum().clamp_min(1.0)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE on L2-normalised features.

    ``valid`` (per local row) masks samples whose image could not be read: their rows are dropped and their
    columns can never be chosen, so a skipped sample changes nothing but the batch size while every rank
    keeps the same tensor shapes.
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        img = F.normalize(image_features.float(), dim=-1)
        txt = F.normalize(text_features.float(), dim=-1)
        all_img, offset = gather_with_grad(img)
        all_txt, _ = gather_with_grad(txt)
        n = img.shape[0]
        labels = torch.arange(offset, offset + n, device=img.device)
        logits_i2t = logit_scale * img @ all_txt.T
        logits_t2i = logit_scale * txt @ all_img.T
        if valid is None:
            ce, s = F.cross_entropy, self.label_smoothing
            return 0.5 * (ce(logits_i2t, labels, label_smoothing=s) + ce(logits_t2i, labels, label_smoothing=s))
        all_valid, _ = gather_with_grad(valid.float())
        col_ok = all_valid > 0.5
        keep = valid.bool()
        rows = _row_ce(logits_i2t[keep], labels[keep], self.label_smoothing, col_ok) + _row_ce(
            logits_t2i[keep], labels[keep], self.label_smoothing, col_ok
        )
        # Mean over the valid rows of the *global* batch: each rank divides its sum by (global count / world
        # size) and DDP's averaging divides by the world size again. A rank that skipped more samples then
        # weighs its rows like any other, exactly as one process on the global batch would.
        valid_per_rank = all_valid.sum().clamp_min(1.0) * n / all_valid.shape[0]
        return 0.5 * rows.sum() / valid_per_rank


def _row_ce(logits: torch.Tensor, labels: torch.Tensor, eps: float, col_ok: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy over the valid columns only, label smoothing included. (F.cross_entropy's
    smoothing spreads mass over every column, masked ones too, which turns -inf logits into nan.)"""
    logp = logits.masked_fill(~col_ok[None], float("-inf")).log_softmax(dim=-1).masked_fill(~col_ok[None], 0.0)
    nll = -logp.gather(1, labels[:, None]).squeeze(1)
    smooth = -logp.sum(dim=-1) / col_ok.sum()
    return (1 - eps) * nll + eps * smooth
