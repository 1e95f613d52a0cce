"""Sigmoid-loss training scenarios that tests/test_siglip.py runs under torchrun (2 gloo processes) and, as the
reference, in one process; the measurements and file layout are dist_worker.py's.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/siglip_dist_worker.py OUT_DIR
"""

from __future__ import annotations

import os
import sys
import traceback

import torch

from clipmoe import sparse_upcycle
from clipmoe.train.config import TrainConfig
from clipmoe.train.distributed import DistEnv, all_reduce_sum, init_distributed, shutdown_distributed
from clipmoe.train.loop import balance_loss, train
from clipmoe.train.loss_sigmoid import contrastive_loss
from clipmoe.train.samplers import GlobalBatchSampler
from dist_worker import LABELS, ClusterData, GradRecorder, N, config, make_collate, trainable_weights
from tiny_siglip import make_tiny_siglip


def first_batch_loss(model, data: ClusterData, cfg: TrainConfig, env: DistEnv, labels) -> dict[str, float]:
    """The phase's contrastive loss (and balance loss) on the first global batch, as the mean over ranks."""
    sampler = GlobalBatchSampler(
        N, cfg.batch_size, labels, world_size=env.world_size, rank=env.rank, seed=cfg.seed, min_batch=cfg.min_batch
    )
    batch = make_collate(model)([data.item(i) for i in next(sampler.local_batches(0))])
    with torch.no_grad():
        img = model.encode_image(batch["pixel_values"])
        txt = model.encode_text(batch["input_ids"], batch["attention_mask"])
        out = {"contrastive": contrastive_loss(model, cfg)(img, txt, batch["valid"])}
        if cfg.balance_weight:
            out["balance"] = balance_loss(model, batch["attention_mask"], cfg)
    return {k: (all_reduce_sum(v, env) / env.world_size).item() for k, v in out.items()}


def run_training(model, cfg: TrainConfig, out_dir: str, env: DistEnv, labels=None) -> dict:
    data = ClusterData()
    result = {"initial": trainable_weights(model), "loss": first_batch_loss(model, data, cfg, env, labels)}
    with GradRecorder(model) as grads:
        stats = train(model, data, make_collate(model), cfg, out_dir, env, labels)
    return {
        **result,
        "weights": trainable_weights(model),
        "grads": list(grads),
        "seen": data.seen,
        "loss_family": stats["loss"],
    }


def sigmoid_mcl(out_dir: str, env: DistEnv) -> dict:
    """An MCL stage of a SigLIP: FFNs only, the base's own temperature and bias (fixed), cluster batches."""
    cfg = config(epochs=1, trainable="ffn", logit_scale="model")
    return run_training(make_tiny_siglip(1), cfg, out_dir, env, LABELS)


def sigmoid_learned(out_dir: str, env: DistEnv) -> dict:
    """A SigLIP 2 CLIP-MoE, everything trainable with a learned temperature and bias and the balance loss on
    real text tokens only (global statistics)."""
    cfg = config(steps=2, trainable="all", logit_scale=None, balance_weight=0.01)
    return run_training(sparse_upcycle(make_tiny_siglip(2), 4, top_k=2, noise=0.01), cfg, out_dir, env)


def sigmoid_fsdp(out_dir: str, env: DistEnv) -> dict:
    """``sigmoid_learned`` on a SigLIP under FSDP2 with gradient checkpointing (the 1-element temperature and
    bias of a SigLIP stay replicated)."""
    cfg = config(steps=2, trainable="all", logit_scale=None, parallel="fsdp", grad_checkpointing=True)
    return run_training(sparse_upcycle(make_tiny_siglip(1), 4, top_k=2, noise=0.01), cfg, out_dir, env)


SCENARIOS = {f.__name__: f for f in (sigmoid_mcl, sigmoid_learned, sigmoid_fsdp)}


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    out_dir = argv[0]
    env = init_distributed("cpu", timeout_s=120)
    try:
        for name, scenario in SCENARIOS.items():
            os.makedirs(os.path.join(out_dir, name), exist_ok=True)
            try:
                result = scenario(os.path.join(out_dir, name, "train"), env)
            except Exception:
                with open(os.path.join(out_dir, name, f"rank{env.rank}.error"), "w") as f:
                    f.write(traceback.format_exc())
                return 1
            torch.save(result, os.path.join(out_dir, name, f"rank{env.rank}.pt"))
    finally:
        shutdown_distributed(env)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
