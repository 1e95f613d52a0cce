"""Training scenarios that tests/test_distributed.py runs under torchrun and, as the reference, in one process.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_worker.py OUT_DIR [SCENARIO ...]

``SCENARIOS`` (the default) have a one-process reference; ``FAULTS`` (named explicitly) test failures under
DDP: a run killed and resumed (``DIST_WORKER_KILL_AT_STEP=n`` SIGKILLs every rank after step n),
non-finite values met on one rank, too many bad samples (some seen by one rank only) and work of rank 0 alone
that fails. ``DIST_WORKER_TIMEOUT_S`` sets the collective timeout (default 120 s).

Each scenario trains a tiny real HF CLIP or CLIP-MoE with ``clipmoe.train.loop.train`` on a synthetic,
cluster-labelled dataset and writes ``OUT_DIR/SCENARIO/rank{r}.pt``: the trainable weights before and after
training, the gradients every optimizer step applied (DDP-averaged; unsharded under FSDP), the loss of the
first global batch at the initial weights, the dataset indices this rank read, and the tokens each expert
received on this rank. A scenario that raises writes ``rank{r}.error`` instead and ends the run (the ranks
may no longer agree on which collective comes next).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import Dataset

from clipmoe import sparse_upcycle
from clipmoe.dmu.pipeline import Pipeline
from clipmoe.train.config import TrainConfig
from clipmoe.train.distributed import (
    DistEnv,
    all_reduce_sum,
    barrier,
    full_state_dict,
    init_distributed,
    shutdown_distributed,
)
from clipmoe.train.loop import CHECKPOINT, METRICS, NonFiniteError, balance_loss, train
from clipmoe.train.loss import ClipLoss
from clipmoe.train.samplers import GlobalBatchSampler
from conftest import WORDS, make_tiny_clip

N = 48  # samples
LABELS = np.arange(N) % 3  # pseudo-label (cluster) of each sample: 3 clusters of 16


class ClusterData(Dataset):
    """Random 32 px images with captions of 2-6 words (so ranks pad their text differently from one process),
    every seventh sample marked unreadable, and a log of the indices served. ``fail_at`` raises on the n-th
    item, as a kill would interrupt training."""

    def __init__(self, pixels: torch.Tensor | None = None, fail_at: int | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.pixels = torch.randn(N, 3, 32, 32, generator=g) if pixels is None else pixels
        self.captions = [" ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(2 + i % 5)) for i in range(N)]
        self.valid = [i % 7 != 3 for i in range(N)]
        self.fail_at, self.seen = fail_at, []

    def __len__(self) -> int:
        return N

    def item(self, i: int):
        return i, self.pixels[i], self.captions[i], self.valid[i]

    def __getitem__(self, i: int):
        if self.fail_at is not None and len(self.seen) >= self.fail_at:
            raise KeyboardInterrupt("simulated kill")
        self.seen.append(int(i))
        return self.item(i)


def make_collate(model):
    def collate(items):
        return {
            "index": torch.tensor([i for i, _, _, _ in items]),  # the keys a non-finite loss is reported with
            "pixel_values": torch.stack([p for _, p, _, _ in items]),
            **model.tokenizer([c for _, _, c, _ in items]),
            "valid": torch.tensor([v for _, _, _, v in items]),
        }

    return collate


def config(**kw) -> TrainConfig:
    # lr 1e-4: Adam moves every weight by about lr per step, far above the 1e-6 comparison tolerance.
    base = dict(batch_size=8, lr=1e-4, warmup_steps=1, min_batch=4, checkpoint_every=100, log_every=1, seed=0)
    return TrainConfig(**{**base, **kw})


def tiny_moe(layers="all"):
    return sparse_upcycle(make_tiny_clip(), 4, top_k=2, layers=layers, noise=0.01)


# ------------------------------------------------------------------------------------------ measurements
def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()


def trainable_weights(model) -> dict[str, torch.Tensor]:
    return {n: _full(p) for n, p in model.named_parameters() if p.requires_grad}


class GradRecorder(list):
    """Before every optimizer step, records the gradients it applies as ``{name: grad}`` (under FSDP the
    unsharding is collective, which is fine: all ranks step together)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def __enter__(self) -> GradRecorder:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self.handle = register_optimizer_step_pre_hook(self.record)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def record(self, optimizer, args, kwargs) -> None:
        if all(group["lr"] == 0 for group in optimizer.param_groups):
            return  # torch.distributed.checkpoint's lr-0 step that creates optimizer state before loading it
        self.append({n: _full(p.grad) for n, p in self.model.named_parameters() if p.grad is not None})


class ExpertTokens(dict):
    """Per MoE layer, how many (token, slot) pairs each expert received on this rank over all forwards, and
    the dtypes of the router logits seen (routers must stay fp32 under bf16 autocast)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.dtypes: set[str] = set()
        for name, module in model.named_modules():
            if hasattr(module, "last_router_logits"):
                self[name] = torch.zeros(module.num_experts, dtype=torch.long)
                module.register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(module, args, output) -> None:
            logits = module.last_router_logits
            self.dtypes.add(str(logits.dtype))
            chosen = logits.topk(module.top_k, dim=-1).indices.reshape(-1)
            self[name] += torch.bincount(chosen, minlength=module.num_experts)

        return hook


def first_batch_loss(model, data: ClusterData, cfg: TrainConfig, env: DistEnv, labels) -> dict[str, float]:
    """The loss ``train`` optimises, on the first global batch at the current weights, as the mean over ranks
    (what DDP's gradient averaging optimises): the contrastive loss, the balance loss as configured (global:
    the same on every rank) and, for comparison, the balance loss computed per rank (the official code)."""
    sampler = GlobalBatchSampler(
        N, cfg.batch_size, labels, world_size=env.world_size, rank=env.rank, seed=cfg.seed, min_batch=cfg.min_batch
    )
    batch = make_collate(model)([data.item(i) for i in next(sampler.local_batches(0))])
    with torch.no_grad():
        img = model.encode_image(batch["pixel_values"])
        txt = model.encode_text(batch["input_ids"], batch["attention_mask"])
        out = {"clip": ClipLoss(cfg.label_smoothing)(img, txt, cfg.logit_scale, batch["valid"])}
        if cfg.balance_weight:
            out["balance"] = balance_loss(model, batch["attention_mask"], cfg)
            out["balance_per_rank"] = balance_loss(model, batch["attention_mask"], replace(cfg, global_balance=False))
    return {k: (all_reduce_sum(v, env) / env.world_size).item() for k, v in out.items()}


def run_training(model, data: ClusterData, cfg: TrainConfig, out_dir: str, env: DistEnv, labels=None) -> dict:
    result = {"initial": trainable_weights(model), "loss": first_batch_loss(model, data, cfg, env, labels)}
    tokens = ExpertTokens(model)
    with GradRecorder(model) as grads:
        train(model, data, make_collate(model), cfg, out_dir, env, labels)
    return {
        **result,
        "weights": trainable_weights(model),
        "grads": list(grads),
        "seen": data.seen,
        "expert_tokens": dict(tokens),
        "router_dtypes": sorted(tokens.dtypes),
    }


# ---------------------------------------------------------------------------------------------- scenarios
def mcl(out_dir: str, env: DistEnv) -> dict:
    """One epoch of an MCL stage: FFNs only, fixed logit scale 100, label smoothing 0.1, cluster batches."""
    cfg = config(epochs=1, trainable="ffn", logit_scale=100.0, label_smoothing=0.1)
    return run_training(make_tiny_clip(), ClusterData(), cfg, out_dir, env, LABELS)


def router(out_dir: str, env: DistEnv) -> dict:
    """Router training of a sparse-upcycled CLIP-MoE with the balance loss and a z-loss (global statistics)."""
    cfg = config(steps=2, trainable="router", balance_weight=0.01, z_loss_weight=0.001)
    return run_training(tiny_moe(), ClusterData(), cfg, out_dir, env)


def accum_ckpt(out_dir: str, env: DistEnv) -> dict:
    """Gradient checkpointing per block and 2 micro-batches per step (DDP's no_sync on the first), fp32."""
    cfg = config(steps=2, trainable="router+experts", balance_weight=0.01, grad_checkpointing=True, grad_accum=2)
    return run_training(tiny_moe(), ClusterData(), cfg, out_dir, env)


def bf16(out_dir: str, env: DistEnv) -> dict:
    """``accum_ckpt`` under bf16 autocast (routers computed in fp32)."""
    cfg = config(
        steps=2,
        trainable="router+experts",
        balance_weight=0.01,
        grad_checkpointing=True,
        grad_accum=2,
        precision="bf16",
    )
    return run_training(tiny_moe(), ClusterData(), cfg, out_dir, env)


def unused_expert(out_dir: str, env: DistEnv) -> dict:
    """Rank 1 routes no token to expert 3 while rank 0 does, so only rank 0 has a gradient for it.

    Rank 1's samples (known in advance: the batch plan is a pure function of the seed) get all-zero images,
    whose tokens at the vision MoE layer are the same 17 vectors X for every image. Expert 3's router row is
    set to the minimum-norm w with w.x = -20 for each of them, the other rows to zero: on rank 1 expert 3's
    logit is always the lowest, while rank 0's random images score w.x > 0 on some tokens. Routers are
    frozen (trainable="ffn"), so this holds for the whole run.
    """
    cfg = config(steps=2, trainable="ffn")
    rank1 = GlobalBatchSampler(N, cfg.batch_size, world_size=2, rank=1, seed=cfg.seed, min_batch=cfg.min_batch)
    pixels = ClusterData().pixels.clone()
    for idx in list(rank1.local_batches(0))[: cfg.steps]:
        pixels[idx] = 0.0
    model = tiny_moe({"vision": [0]})
    layer = model.moe_layers("vision")[0]
    inputs = []
    hook = layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model.encode_image(torch.zeros(1, 3, 32, 32))
        hook.remove()
        layer.router.weight.zero_()
        layer.router.weight[3] = -20.0 * torch.linalg.pinv(inputs[0]) @ torch.ones(len(inputs[0]))
    return run_training(model, ClusterData(pixels), cfg, out_dir, env)


def fsdp(out_dir: str, env: DistEnv) -> dict:
    """FSDP2 (plain training in one process): every parameter trainable with a learned logit scale, gradient
    clipping and checkpointing; killed during step 3 and resumed from the step-2 checkpoint."""
    cfg = config(
        steps=4,
        trainable="all",
        parallel="fsdp",
        logit_scale=None,
        grad_clip=1.0,
        grad_checkpointing=True,
        balance_weight=0.01,
        checkpoint_every=2,
    )
    model = tiny_moe()
    initial = trainable_weights(model)
    grads = []
    if env.enabled:
        with GradRecorder(model) as grads:
            try:
                kill = ClusterData(fail_at=2 * cfg.batch_size // env.world_size)
                train(model, kill, make_collate(model), cfg, out_dir, env)
                raise AssertionError("the simulated kill did not happen")
            except KeyboardInterrupt:
                pass
        model = tiny_moe()  # a fresh process starts from the base again and resumes from the checkpoint
    with GradRecorder(model) as resumed:
        train(model, ClusterData(), make_collate(model), cfg, out_dir, env)
    saved = os.path.join(out_dir, "model")
    state = full_state_dict(model, env)  # how a caller saves a model FSDP2 left sharded
    if env.is_main:
        model.save_pretrained(saved, state_dict=state)
    barrier(env)
    return {"initial": initial, "weights": trainable_weights(model), "grads": [*grads, *resumed], "saved": saved}


def embed(out_dir: str, env: DistEnv) -> dict:
    """Sharded embedding of a CLIP-MoE: chunks of 5 samples interleave over ranks into one on-disk store."""
    from clipmoe.dmu.embed import embed_dataset

    model = tiny_moe()
    data = ClusterData()
    items = [data.item(i) for i in range(len(data))]  # the embedding pass needs each sample's index: items carry it
    store = embed_dataset(model, items, make_collate(model), out_dir, env, batch_size=3, chunk_size=5)
    return {
        "image": torch.from_numpy(np.array(store.image)),
        "text": torch.from_numpy(np.array(store.text)),
        "valid": torch.from_numpy(np.array(store.valid)),
        "chunks_by_me": sorted(os.listdir(os.path.join(out_dir, "chunks"))),
    }


SCENARIOS = {f.__name__: f for f in (mcl, router, accum_ckpt, bf16, unused_expert, fsdp, embed)}


# ------------------------------------------------------------------------------------------------- faults
def dropout(out_dir: str, env: DistEnv) -> dict:
    """Routers and experts with expert dropout 0.1, 6 steps, a checkpoint every 2. With
    ``DIST_WORKER_KILL_AT_STEP=n`` every rank SIGKILLs itself right after step n (after a barrier, so rank 0
    has logged step n): the process group dies as under a real kill, and the same command then resumes."""
    kill_at = int(os.environ.get("DIST_WORKER_KILL_AT_STEP", "0"))

    def kill(step: int, total: int) -> None:
        if step == kill_at:
            barrier(env)
            os.kill(os.getpid(), signal.SIGKILL)

    cfg = config(steps=6, lr=1e-3, trainable="router+experts", balance_weight=0.01, checkpoint_every=2)
    model = sparse_upcycle(make_tiny_clip(), 4, top_k=2, noise=0.01, expert_dropout=0.1)
    initial = trainable_weights(model)
    train(model, ClusterData(), make_collate(model), cfg, out_dir, env, on_step=kill)
    return {"initial": initial, "weights": trainable_weights(model), "rng": torch.get_rng_state()}


def _expect_error(fn, error: type[Exception]) -> dict:
    """Run ``fn``, which must raise ``error``: its message and how long this rank took to get it."""
    t0 = time.perf_counter()
    try:
        fn()
    except error as e:
        return {"error": str(e), "seconds": time.perf_counter() - t0}
    raise AssertionError(f"no {error.__name__} raised")


def nan_one_rank(out_dir: str, env: DistEnv) -> dict:
    """One sample of rank 1's third batch has NaN pixels: every rank must stop at step 3 with one message
    naming it, leaving the step-2 checkpoint (finite) and no step-3 record."""
    cfg = config(steps=6, trainable="ffn", checkpoint_every=2)
    rank1 = GlobalBatchSampler(N, cfg.batch_size, world_size=2, rank=1, seed=cfg.seed, min_batch=cfg.min_batch)
    bad = next(i for i in list(rank1.local_batches(0))[2] if ClusterData().valid[i])
    pixels = ClusterData().pixels.clone()
    pixels[bad] = float("nan")
    model = make_tiny_clip()
    data = ClusterData(pixels)
    result = _expect_error(lambda: train(model, data, make_collate(model), cfg, out_dir, env), NonFiniteError)
    return {**result, "bad": bad, **_leftovers(out_dir)}


def huge_lr(out_dir: str, env: DistEnv) -> dict:
    """lr 1000 on the FFNs: the weights diverge; every rank stops with the same message."""
    cfg = config(steps=30, lr=1000.0, trainable="ffn", checkpoint_every=2)
    model = make_tiny_clip()
    result = _expect_error(lambda: train(model, ClusterData(), make_collate(model), cfg, out_dir, env), NonFiniteError)
    return {**result, **_leftovers(out_dir)}


def save_nan(out_dir: str, env: DistEnv) -> dict:
    """The pipeline's save of a model holding a NaN (checked on rank 0, which holds the whole state): every
    rank raises, none waits at a barrier, nothing is written."""
    model = make_tiny_clip()
    with torch.no_grad():
        model.text_projection.weight[0, 0] = float("nan")
    path = os.path.join(out_dir, "model")
    pipe = Pipeline(None, out_dir, env)  # save reads only the process group from the pipeline
    return {**_expect_error(lambda: pipe.save(model, path), ValueError), "written": os.path.exists(path)}


BAD_IMAGES = (1, 6, 14)  # in chunks 0, 1 and 3 of 4 samples: rank 0's chunk and two of rank 1's


def _bad_images_folder(data: str, env: DistEnv) -> None:
    """24 real PNG + caption files in ``data``, the ``BAD_IMAGES`` cut short (12.5%: above the 1% limit)."""
    from PIL import Image

    if env.is_main:
        os.makedirs(data)
        for i in range(24):
            path = os.path.join(data, f"s{i:02d}.png")
            Image.new("RGB", (32, 32), (10 * i, 128, 255 - 10 * i)).save(path)
            if i in BAD_IMAGES:
                with open(path, "r+b") as f:
                    f.truncate(40)  # indexed fine, fails to decode
            with open(os.path.join(data, f"s{i:02d}.txt"), "w") as f:
                f.write(WORDS[i % len(WORDS)])
    barrier(env)


def embed_skips(out_dir: str, env: DistEnv) -> dict:
    """The embed stage over ``_bad_images_folder``: every rank raises the same DataError at once, naming all
    three bad samples (two were read by rank 1 only); then a rerun (a fresh dataset, the chunks already done)
    fails the same way."""
    from clipmoe.data.collate import ClipCollator
    from clipmoe.data.readers import DataError, open_dataset
    from clipmoe.dmu.embed import DONE, embed_dataset

    data, features = os.path.join(out_dir, "data"), os.path.join(out_dir, "features")
    _bad_images_folder(data, env)
    model = make_tiny_clip()
    collate = ClipCollator(model.tokenizer, model.image_processor)
    runs = []
    for _ in range(2):
        dataset = open_dataset(data)
        runs.append(
            _expect_error(lambda: embed_dataset(model, dataset, collate, features, env, 4, 4), DataError)  # noqa: B023
        )
    with open(os.path.join(features, "skipped.log")) as f:
        logged = sorted(line.split("\t")[0] for line in f.read().splitlines()[1:])
    return {"runs": runs, "logged": logged, "done": os.path.exists(os.path.join(features, DONE))}


def train_skips(out_dir: str, env: DistEnv) -> dict:
    """One epoch of training over ``_bad_images_folder`` (each rank reads its half of every batch), with a
    checkpoint after step 2: under a 50% limit it passes and lists every rank's skips; under the default 1%
    every rank raises the same DataError at once, counting all three."""
    from clipmoe.data.collate import ClipCollator
    from clipmoe.data.readers import DataError, open_dataset

    data = os.path.join(out_dir, "data")
    _bad_images_folder(data, env)
    model = make_tiny_clip()
    collate = ClipCollator(model.tokenizer, model.image_processor)
    cfg = config(epochs=1, trainable="ffn", checkpoint_every=2)
    lenient = open_dataset(data, max_skipped_fraction=0.5)
    stats = train(model, lenient, collate, cfg, os.path.join(out_dir, "lenient"), env)
    strict = open_dataset(data)
    failed = _expect_error(lambda: train(model, strict, collate, cfg, os.path.join(out_dir, "strict"), env), DataError)
    with open(os.path.join(out_dir, "lenient", "skipped.log")) as f:
        logged = sorted(line.split("\t")[0] for line in f.read().splitlines()[1:])
    named = sorted(s.partition(":")[0] for s in stats["skipped_samples"])
    return {**failed, "named": named, "logged": logged}


def cluster_fails(out_dir: str, env: DistEnv) -> dict:
    """The cluster stage's k-means, on rank 0 only, fails (2 embedded samples for 3 clusters): every rank
    raises its error at once and no labels are written."""
    from clipmoe.dmu.config import DataConfig, PipelineConfig
    from clipmoe.dmu.embed import DONE, FeatureStore

    pipe = Pipeline(PipelineConfig("unused", DataConfig("unused")), out_dir, env)
    store = pipe.out("embed", 0, "features")
    if env.is_main:  # a finished store of 2 samples, as the embed stage leaves it
        os.makedirs(store)
        FeatureStore.create(store, 2, 16)
        with open(os.path.join(store, "meta.json"), "w") as f:
            json.dump({"num_samples": 2, "dim": 16}, f)
        valid = FeatureStore(store, 2, 16, "r+").valid
        valid[:] = 1
        valid.flush()
        open(os.path.join(store, DONE), "w").close()
    barrier(env)
    result = _expect_error(lambda: pipe.cluster(0), ValueError)
    return {**result, "written": os.path.exists(pipe.out("cluster", 0, "labels"))}


def _leftovers(out_dir: str) -> dict:
    """What a failed phase left: the checkpoint's step and whether its weights are finite, the logged steps."""
    ckpt = os.path.join(out_dir, CHECKPOINT)
    state = torch.load(ckpt, weights_only=True) if os.path.exists(ckpt) else None
    metrics = os.path.join(out_dir, METRICS)
    return {
        "checkpoint_step": state and state["step"],
        "checkpoint_finite": state is not None and all(torch.isfinite(t).all() for t in state["trainable"].values()),
        "logged": [json.loads(line)["step"] for line in open(metrics)] if os.path.exists(metrics) else [],
    }


FAULTS = {
    f.__name__: f for f in (dropout, nan_one_rank, huge_lr, save_nan, embed_skips, train_skips, cluster_fails)
} | {"dropout_uninterrupted": dropout}


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    out_dir, names = argv[0], argv[1:] or list(SCENARIOS)
    # A collective that waits longer fails instead of hanging.
    env = init_distributed("cpu", timeout_s=float(os.environ.get("DIST_WORKER_TIMEOUT_S", "120")))
    try:
        for name in names:
            os.makedirs(os.path.join(out_dir, name), exist_ok=True)
            try:
                result = {**SCENARIOS, **FAULTS}[name](os.path.join(out_dir, name, "train"), env)
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
