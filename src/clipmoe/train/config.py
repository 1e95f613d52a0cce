"""Hyperparameters of one training phase, as a plain torch-free object (the pipeline's ``mcl`` and ``route``
config sections are ``TrainConfig``s; ``clipmoe.dmu.config`` re-exports it with the other config classes)."""

from __future__ import annotations

import math
from dataclasses import dataclass

# GlobalBatchSampler's policies for clusters smaller than a batch (train/samplers.py)
SMALL_CLUSTER_POLICIES = ("shrink", "drop")
# How the Switch balance loss pools a tower's MoE layers (train/loss.py router_losses)
BALANCE_SCOPES = ("tower", "layer")


@dataclass
class TrainConfig:
    """Hyperparameters of one training phase (defaults: the paper's MCL recipe)."""

    steps: int = 0  # optimizer steps; 0 = derive from epochs
    epochs: float = 1.0
    batch_size: int = 64  # global, all ranks together
    lr: float = 1e-5
    router_lr: float | None = None  # a separate learning rate for routers (None: lr)
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 200
    grad_clip: float = 0.0  # 0 = off
    grad_accum: int = 1  # micro-batches per optimizer step (each its own contrastive batch)
    precision: str = "fp32"  # fp32 | bf16 (autocast; routers stay fp32)
    grad_checkpointing: bool = False
    label_smoothing: float = 0.1
    # Fixed scale (the paper: 100, OpenAI CLIP's learned value); "model" = the model's own learned scale, kept
    # fixed (for bases whose temperature is not 100); None = learn it.
    logit_scale: float | str | None = 100.0
    # The contrastive loss: softmax (CLIP's InfoNCE) | sigmoid (SigLIP's pairwise loss) | auto = the family the
    # base was trained with (SigLIP / SigLIP 2: sigmoid). label_smoothing applies to softmax only.
    loss: str = "auto"
    # Sigmoid loss only: a fixed bias; None = the model's own logit_bias (learned when logit_scale is None, else
    # kept at its value), -10 for a model without one (see loss_sigmoid.contrastive_loss).
    logit_bias: float | None = None
    balance_weight: float = 0.0  # x (image balance + text_balance_factor x text balance)
    text_balance_factor: float = 0.5
    balance_mask_padding: bool = True  # False reproduces the official code (padding counted)
    # Router z-loss (ST-MoE; CLIP-UP trains with it): weight x (image z + text_balance_factor x text z), each the
    # mean squared log-sum-exp of the router logits over a tower's MoE layers. Applies with or without balance.
    z_loss_weight: float = 0.0
    # "tower": one balance loss on the routing of all of a tower's MoE layers flattened together (the official
    # code); "layer": the mean over the tower's layers of per-layer balance losses (the paper's Eq. 9).
    balance_scope: str = "tower"
    # Base-preserving routing: + distill_weight x mean (1 - cosine) between the trained model's image embedding
    # and the frozen base model's, on the images of distill_data (a dataset path the readers read; captions are
    # not used). Both or neither.
    distill_weight: float = 0.0
    distill_data: str | None = None
    trainable: str = "all"  # all | ffn | router | router+experts
    last_n_blocks: int | None = None  # with trainable=ffn: only the last N blocks of each tower
    small_clusters: str = "shrink"
    min_batch: int = 8
    checkpoint_every: int = 50
    log_every: int = 10
    num_workers: int = 0
    seed: int = 0
    parallel: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard per block, for towers that do not fit one device)
    # Router losses on routing statistics summed over all ranks (= the single-process value on the global
    # batch); False computes them per rank (the official code does too, and also divides by the world size).
    global_balance: bool = True

    def __post_init__(self) -> None:
        checks = {
            "precision": self.precision in ("fp32", "bf16"),
            "parallel": self.parallel in ("ddp", "fsdp"),
            "batch_size": self.batch_size > 0,
            "grad_accum": self.grad_accum >= 1,
            "lr": self.lr > 0,
            "steps": self.steps >= 0,
            "epochs": self.epochs > 0,
            "logit_scale": not isinstance(self.logit_scale, str) or self.logit_scale == "model",
            "loss": self.loss in ("auto", "softmax", "sigmoid"),  # loss_sigmoid.LOSSES (this module is torch-free)
            "router_lr": self.router_lr is None or self.router_lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "betas": all(0 <= b < 1 for b in self.betas),
            "warmup_steps": self.warmup_steps >= 0,
            "grad_clip": self.grad_clip >= 0,
            "label_smoothing": 0 <= self.label_smoothing < 1,
            "balance_weight": self.balance_weight >= 0,
            "text_balance_factor": self.text_balance_factor >= 0,
            "z_loss_weight": self.z_loss_weight >= 0,
            "balance_scope": self.balance_scope in BALANCE_SCOPES,
            "distill_weight": self.distill_weight >= 0,
            "trainable": self.trainable in ("all", "ffn", "router", "router+experts"),
            "last_n_blocks": self.last_n_blocks is None or self.last_n_blocks >= 1,
            "small_clusters": self.small_clusters in SMALL_CLUSTER_POLICIES,
            "min_batch": self.min_batch >= 1,
            "checkpoint_every": self.checkpoint_every > 0,
            "log_every": self.log_every > 0,
            "num_workers": self.num_workers >= 0,
        }
        if isinstance(self.logit_scale, (int, float)):
            checks["logit_scale"] = self.logit_scale > 0  # its log is taken
        for key, value in vars(self).items():
            if isinstance(value, float) and not math.isfinite(value):  # inf passes the comparisons above
                checks[key] = False
        bad = [f"{k}={getattr(self, k)!r}" for k, ok in checks.items() if not ok]
        if (self.distill_weight > 0) != (self.distill_data is not None):
            bad.append(
                f"distill_weight={self.distill_weight!r} with distill_data={self.distill_data!r} "
                "(the distillation term needs both: a weight > 0 and a dataset of images)"
            )
        if bad:
            raise ValueError(f"invalid training settings: {', '.join(bad)}")
