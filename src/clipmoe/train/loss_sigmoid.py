"""SigLIP's sigmoid loss, and the choice between it and the softmax (InfoNCE) loss for a training phase.

The sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training", Eq. 1) treats every
image-text pair of the batch as an independent binary classification::

    L = -1/|B| * sum_i sum_j log sigmoid(z_ij * (t * x_i . y_j + b)),   z_ij = 1 if i == j else -1

with L2-normalised image features x, text features y, temperature t = exp(t') and bias b. Under
torch.distributed each rank scores its own images against the texts of **all** ranks (gathered with
gradients, as ``ClipLoss`` does): the ranks' pair sets partition the global batch's pairs, each rank divides
by its local batch size, and DDP's gradient averaging then yields exactly the single-process gradient of the
loss on the global batch (global negatives; tests/test_siglip.py checks 2 gloo processes against one).

``contrastive_loss(model, cfg)`` picks the loss of a phase from ``cfg.loss``: ``softmax``, ``sigmoid``, or
``auto`` = the family the model was trained with (``model.loss_family``: ``"sigmoid"`` for SigLIP and SigLIP 2
bases, softmax for CLIP).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .loss import ClipLoss, gather_with_grad

LOSSES = ("auto", "softmax", "sigmoid")
SIGLIP_INIT_BIAS = -10.0  # the paper's initial bias, for a model without a logit_bias of its own (CLIP)


class SigmoidLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss on L2-normalised features, with global negatives across ranks.

    ``valid`` (per local row) masks samples whose image could not be read, as in ``ClipLoss``: their rows
    and columns drop out of every sum, and the mean is over the valid samples of the global batch.
    """

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        img = F.normalize(image_features.float(), dim=-1)
        txt = F.normalize(text_features.float(), dim=-1)
        all_txt, offset = gather_with_grad(txt)
        n = img.shape[0]
        logits = logit_scale * img @ all_txt.T + logit_bias  # [local images, global texts]
        signs = -torch.ones_like(logits)
        signs[torch.arange(n, device=img.device), torch.arange(offset, offset + n, device=img.device)] = 1.0
        nll = -F.logsigmoid(signs * logits)
        if valid is None:
            return nll.sum() / n
        all_valid, _ = gather_with_grad(valid.float())
        rows = (nll * (all_valid > 0.5).to(nll.dtype)[None]).sum(dim=1)[valid.bool()]
        # divided by (global valid count / world size): see ClipLoss
        valid_per_rank = all_valid.sum().clamp_min(1.0) * n / all_valid.shape[0]
        return rows.sum() / valid_per_rank


def resolve_loss(loss: str, model: nn.Module) -> str:
    """``softmax`` or ``sigmoid``: ``auto`` is the model's own family (``loss_family``; CLIP: softmax)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    return getattr(model, "loss_family", "softmax") if loss == "auto" else loss


def contrastive_loss(model: nn.Module, cfg) -> Callable[..., torch.Tensor]:
    """``fn(image_features, text_features, valid)`` -> the phase's contrastive loss (``cfg``: a TrainConfig).

    Temperature (``cfg.logit_scale``): a number = fixed at that value; ``"model"`` = the model's own
    ``exp(logit_scale)``, kept fixed ("keep the base's temperature"); None = the model's, learned.
    Bias (sigmoid loss only; ``cfg.logit_bias``): a number = fixed at that value; None = the model's own
    ``logit_bias`` (a SigLIP base's), learned exactly when the temperature is learned, else kept fixed at its
    value; a model without one (CLIP) gets the paper's initial -10, fixed. So for a SigLIP base,
    ``logit_scale: model`` keeps both of the base's calibration parameters.
    """
    sigmoid = resolve_loss(getattr(cfg, "loss", "auto"), model) == "sigmoid"
    learn = cfg.logit_scale is None
    fixed_scale = model.logit_scale.exp().item() if cfg.logit_scale == "model" else cfg.logit_scale

    def scale():
        return fixed_scale if fixed_scale is not None else model.logit_scale.exp()

    if not sigmoid:
        softmax = ClipLoss(cfg.label_smoothing)
        return lambda img, txt, valid=None: softmax(img, txt, scale(), valid)

    own_bias = getattr(model, "logit_bias", None)
    if cfg.logit_bias is not None:
        fixed_bias = float(cfg.logit_bias)
    elif own_bias is None:
        fixed_bias = SIGLIP_INIT_BIAS
    else:
        fixed_bias = None if learn else own_bias.detach().float().item()
    pairwise = SigmoidLoss()  # label smoothing does not apply to a per-pair binary loss

    def bias():
        return fixed_bias if fixed_bias is not None else own_bias

    return lambda img, txt, valid=None: pairwise(img, txt, scale(), bias(), valid)
