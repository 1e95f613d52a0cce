"""The one contrastive loss used everywhere (pretraining, MCL stages, router training, baselines).

Under torch.distributed the features of all ranks are gathered **with gradients** (global negatives, as the
paper and open_clip do); each rank computes the loss of its own rows against all columns. DDP averages the
gradients over ranks, which gives exactly the gradient of the single-process loss on the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows concatenated (differentiable), and the offset of this rank's rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    import torch.distributed.nn.functional as dist_fn

    parts = dist_fn.all_gather(x)
    return torch.cat(parts, dim=0), dist.get_rank() * x.shape[0]


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
        if valid is not None:
            all_valid, _ = gather_with_grad(valid.float())
            col_mask = all_valid < 0.5
            logits_i2t = logits_i2t.masked_fill(col_mask[None], float("-inf"))
            logits_t2i = logits_t2i.masked_fill(col_mask[None], float("-inf"))
            keep = valid.bool()
            logits_i2t, logits_t2i, labels = logits_i2t[keep], logits_t2i[keep], labels[keep]
            # Label smoothing spreads mass over every column, masked ones included (-inf -> nan);
            # so smooth only over the valid columns by hand.
            if self.label_smoothing > 0:
                return 0.5 * (
                    _smoothed_ce(logits_i2t, labels, self.label_smoothing, ~col_mask)
                    + _smoothed_ce(logits_t2i, labels, self.label_smoothing, ~col_mask)
                )
        ce = F.cross_entropy
        s = self.label_smoothing
        return 0.5 * (ce(logits_i2t, labels, label_smoothing=s) + ce(logits_t2i, labels, label_smoothing=s))


def _smoothed_ce(logits: torch.Tensor, labels: torch.Tensor, eps: float, col_ok: torch.Tensor) -> torch.Tensor:
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    logp = logits.log_softmax(dim=-1).masked_fill(~col_ok[None], 0.0)
    nll = -logp.gather(1, labels[:, None]).squeeze(1)
    smooth = -logp.sum(dim=-1) / col_ok.sum()
    return ((1 - eps) * nll + eps * smooth).mean()
