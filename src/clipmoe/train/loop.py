"""One contrastive training loop for every phase: pretraining, MCL stages, router training, baselines.

What differs between phases is only configuration (which parameters train, fixed or learned temperature,
balance-loss weight, how batches are drawn). The loop is resumable: every ``checkpoint_every`` steps it
writes the trainable parameters, optimizer, scheduler, batch position and RNG states; rerunning the same
call continues from there, and an interrupted run loses at most one checkpoint interval.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..formats.state_dict import save_file_atomically
from ..model.modeling import tower_layers
from ..utils import interrupt
from ..utils.io import atomic_file
from ..utils.keys import first_few
from .config import TrainConfig
from .distributed import DistEnv, all_gather_objects, on_main
from .loss import distillation_loss, router_losses
from .loss_sigmoid import contrastive_loss, resolve_loss
from .samplers import GlobalBatchSampler

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


class NonFiniteError(ValueError):
    """Training produced a non-finite loss or weights; the message names the phase, step and batch."""


class _ContrastiveForward(nn.Module):
    """Both encoders in one forward, so DDP/FSDP see (and synchronise) a single module call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values, input_ids, attention_mask, distill_pixels=None):
        # The distillation images go first, so the routers' last logits (the balance loss's) are the batch's.
        distilled = None if distill_pixels is None else self.model.encode_image(distill_pixels)
        return self.model.encode_image(pixel_values), self.model.encode_text(input_ids, attention_mask), distilled


class MetricsLog:
    """Scalars per logged step: JSONL in the phase folder (always), and TensorBoard when it is installed."""

    def __init__(self, out_dir: str) -> None:
        self.file = open(os.path.join(out_dir, METRICS), "a")
        self.tb = None
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"{record.get('phase', 'train')}/{key}", value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def cosine_schedule(warmup: int, total: int):
    """Linear warmup for ``warmup`` steps, then cosine to zero (the official code's schedule)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def balance_loss(model, attention_mask: torch.Tensor, cfg: TrainConfig) -> torch.Tensor | None:
    """Image balance + ``text_balance_factor`` x text balance of the last forward (``loss.router_losses``);
    None when the model has no MoE layer."""
    return router_losses(model, attention_mask, cfg).get("balance")


@dataclass
class Distillation:
    """The base-preserving term's inputs: the frozen model whose image embeddings are the targets, and the
    images (any dataset of ``readers.Sample``; captions unused) with their collator."""

    teacher: nn.Module
    images: Dataset
    collate: Callable


def dropped_fraction(model) -> float | None:
    """Mean over the MoE layers with a capacity of the fraction of routed (token, slot) pairs their last
    forward dropped (``MoEFeedForward.last_dropped``); None when no layer dropped by capacity."""
    layers = model.moe_layers() if hasattr(model, "moe_layers") else []
    values = [m.last_dropped for m in layers if m.last_dropped is not None]
    return torch.stack(values).mean().item() if values else None


def train(
    model: nn.Module,
    dataset: Dataset,
    collate,
    cfg: TrainConfig,
    out_dir: str,
    env: DistEnv | None = None,
    labels: np.ndarray | None = None,
    desc: str = "train",
    on_step: Callable[[int, int], None] | None = None,
    distill: Distillation | None = None,
) -> dict:
    """Train ``model`` in place with the contrastive loss; resumable from ``out_dir``. Returns run stats.

    ``on_step(step, total_steps)`` runs after every optimizer step, before that step's checkpoint (for example
    a held-out evaluation curve); it must leave the model in training mode. ``distill`` is required when ``cfg.distill_weight`` > 0."""
    env = env or DistEnv()
    if cfg.distill_weight and distill is None:
        raise ValueError(f"{desc}: distill_weight={cfg.distill_weight} but no distillation images were given")
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model.set_trainable(cfg.trainable, cfg.last_n_blocks)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    model.to(env.device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"nothing to train: trainable={cfg.trainable!r} selects no parameters")

    sampler = GlobalBatchSampler(
        len(dataset),
        cfg.batch_size,
        labels,
        world_size=env.world_size,
        rank=env.rank,
        seed=cfg.seed,
        small_clusters=cfg.small_clusters,
        min_batch=cfg.min_batch,
    )
    per_epoch = len(sampler)
    micro_total = cfg.steps * cfg.grad_accum if cfg.steps else max(1, math.ceil(cfg.epochs * per_epoch))
    total_steps = math.ceil(micro_total / cfg.grad_accum)

    forward = _wrap_parallel(_ContrastiveForward(model), cfg, env)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # after wrapping: FSDP2 swaps in DTensors
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(_param_groups(named, cfg), lr=cfg.lr, betas=cfg.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(cfg.warmup_steps, total_steps))
    loss_fn = contrastive_loss(model, cfg)  # softmax or sigmoid, temperature (and bias) per cfg
    clamp_scale = cfg.logit_scale is None and resolve_loss(cfg.loss, model) == "softmax"
    step = 0
    ckpt_path = os.path.join(out_dir, CHECKPOINT)
    skipped: list[str] = []
    if os.path.exists(ckpt_path):
        resumed: dict = {}
        step = _load_checkpoint(ckpt_path, model, optimizer, scheduler, cfg, resumed, env.rank)
        # Skips seen before the checkpoint are a property of the data: counted again, not forgotten. The file
        # holds every rank's; rank 0 carries them on (each rank adds its own later ones, gathered at the end).
        skipped = json.loads(resumed.get("skipped", "[]")) if env.is_main else []
        if hasattr(dataset, "skips"):
            dataset.skips.restore(json.loads(resumed.get("skips", "[]")))
    if env.is_main:
        drop_records_after(os.path.join(out_dir, METRICS), step)  # a resumed run logs those steps again
    metrics = MetricsLog(out_dir) if env.is_main else None

    bar = tqdm(total=total_steps, initial=step, desc=desc, disable=not env.is_main, unit="step", dynamic_ncols=True)
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    samples_seen, t0 = 0, time.perf_counter()
    micro = step * cfg.grad_accum
    batches = _batch_stream(dataset, sampler, collate, micro, cfg.num_workers, cfg.seed)
    distill_batches = None
    if cfg.distill_weight:
        distill.teacher.to(env.device).eval().requires_grad_(False)
        distill_batches = _distill_stream(distill, cfg.batch_size // env.world_size, env, micro, cfg)
    try:
        while step < total_steps:
            interrupt.check()
            optimizer.zero_grad(set_to_none=True)
            logged: dict[str, float] = {}
            for accum in range(cfg.grad_accum):
                batch = next(batches)
                if batch.get("skipped"):
                    skipped.extend(batch["skipped"])
                    if hasattr(dataset, "record_skipped"):
                        dataset.record_skipped(batch)
                sync = accum == cfg.grad_accum - 1
                side = next(distill_batches) if distill_batches is not None else None
                with _no_sync(forward, sync), autocast:
                    img, txt, distilled = forward(
                        batch["pixel_values"].to(env.device),
                        batch["input_ids"].to(env.device),
                        batch["attention_mask"].to(env.device),
                        None if side is None else side["pixel_values"].to(env.device),
                    )
                    valid = batch.get("valid")
                    clip = loss_fn(img, txt, None if valid is None else valid.to(env.device))
                    loss = clip
                    terms: dict[str, torch.Tensor] = {}
                    if cfg.balance_weight or cfg.z_loss_weight:
                        terms = router_losses(model, batch["attention_mask"].to(env.device), cfg)
                        if terms:
                            loss = loss + cfg.balance_weight * terms["balance"] + cfg.z_loss_weight * terms["z_loss"]
                    if side is not None:
                        with torch.no_grad():
                            target = distill.teacher.encode_image(side["pixel_values"].to(env.device))
                        terms["distill"] = distillation_loss(distilled, target, side["valid"].to(env.device))
                        loss = loss + cfg.distill_weight * terms["distill"]
                    for name, value in terms.items():  # logged unweighted; "loss" is the weighted total
                        logged[name] = logged.get(name, 0.0) + value.item() / cfg.grad_accum
                    _check_loss(loss, (img, txt), valid, dataset, batch, env, desc, step + 1, total_steps)
                    (loss / cfg.grad_accum).backward()
                dropped = dropped_fraction(model)
                if dropped is not None:
                    logged["dropped"] = logged.get("dropped", 0.0) + dropped / cfg.grad_accum
                logged["clip"] = logged.get("clip", 0.0) + clip.item() / cfg.grad_accum
                logged["loss"] = logged.get("loss", 0.0) + loss.item() / cfg.grad_accum
                samples_seen += len(batch["input_ids"]) * env.world_size
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            if clamp_scale:  # open_clip's cap on a learned softmax temperature (SigLIP's go higher, uncapped)
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(100))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{logged['loss']:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if metrics and (step % cfg.log_every == 0 or step == total_steps):
                rate = samples_seen / max(time.perf_counter() - t0, 1e-9)
                record = {
                    "phase": desc,
                    "step": step,
                    "lr": scheduler.get_last_lr()[0],
                    "samples_per_s": rate,
                    **logged,
                }
                metrics.write(record)
            if (step % cfg.checkpoint_every == 0 and step < total_steps) or step == total_steps:
                _check_finite(named, env, f"{desc}: non-finite weights after step {step} of {total_steps}")
            if on_step is not None:  # before the checkpoint: a run stopped inside it does this step's work again
                on_step(step, total_steps)
            if step % cfg.checkpoint_every == 0 and step < total_steps:
                _save_checkpoint(
                    ckpt_path, model, optimizer, scheduler, step, cfg, env, extra=_skip_state(dataset, skipped, env)
                )
    finally:
        bar.close()
        if metrics:
            metrics.close()
    model.eval()
    model.set_grad_checkpointing(False)
    skipped = _all_ranks_skips(dataset, skipped, env)
    if hasattr(dataset, "end_pass"):

        def end_pass() -> None:
            summary = dataset.end_pass(os.path.join(out_dir, "skipped.log"))  # raises above the skip limit
            if len(dataset.skips):
                print(f"{desc}: {summary}")

        on_main(end_pass, env)  # the limit's DataError (or a failed write) raises on every rank, none waits
    return {
        "steps": total_steps,
        "samples": sampler.samples_in(total_steps * cfg.grad_accum),  # what the phase consumed (budget rules)
        "loss": resolve_loss(cfg.loss, model),  # the contrastive loss this phase used (softmax | sigmoid)
        "batches_per_epoch": per_epoch,
        "plan": asdict(sampler.stats()),
        "skipped_samples": skipped,
        "seconds": time.perf_counter() - t0,
    }


def _param_groups(named: list[tuple[str, nn.Parameter]], cfg: TrainConfig) -> list[dict]:
    """Weight decay only on matrices (nanoGPT's rule; norms, biases and the temperature are exempt), and
    routers at ``router_lr`` when set (new routers next to pretrained experts want a larger step)."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in named:
        is_router = cfg.router_lr is not None and name.endswith("router.weight")
        groups.setdefault((is_router, p.ndim >= 2), []).append(p)
    return [
        {"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "lr": cfg.router_lr if router else cfg.lr}
        for (router, decay), ps in sorted(groups.items())
    ]


def _batch_stream(dataset, sampler: GlobalBatchSampler, collate, start_micro: int, num_workers: int, seed: int = 0):
    """Endless micro-batches, epoch after epoch, starting at global micro-batch ``start_micro``.

    Each epoch's DataLoader draws its workers' base seed from its own generator, seeded by (seed, epoch):
    without one, opening an iterator draws from the global torch RNG, so a run resumed mid-epoch (a new
    iterator where the uninterrupted run had none) would shift every later dropout mask."""
    per_epoch = len(sampler)
    epoch, pos = divmod(start_micro, per_epoch)
    while True:
        loader = DataLoader(
            dataset,
            batch_sampler=list(sampler.local_batches(epoch, pos)),
            collate_fn=collate,
            num_workers=num_workers,
            persistent_workers=False,
            generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch),
        )
        yield from loader
        epoch, pos = epoch + 1, 0


def _distill_stream(distill: Distillation, per_rank: int, env: DistEnv, start_micro: int, cfg: TrainConfig):
    """Endless micro-batches of distillation images, ``per_rank`` per rank: micro-batch m takes positions
    ``[m * B, (m + 1) * B)`` (B = the global batch) of a stream of seeded permutations of the images, so a
    resumed run draws exactly the images the uninterrupted one would have."""
    n, size = len(distill.images), per_rank * env.world_size
    chunk = 64  # micro-batches per DataLoader (its workers decode ahead within a chunk)
    micro = start_micro
    while True:
        batches = []
        for m in range(micro, micro + chunk):
            positions = np.arange(m * size + env.rank * per_rank, m * size + (env.rank + 1) * per_rank)
            epochs, offsets = np.divmod(positions, n)
            batches.append([int(_permutation(n, cfg.seed, e)[o]) for e, o in zip(epochs, offsets)])
        loader = DataLoader(
            distill.images, batch_sampler=batches, collate_fn=distill.collate, num_workers=cfg.num_workers
        )
        yield from loader
        micro += chunk


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 7]).permutation(n)  # 7: not the sampler's (seed, epoch) stream


def _batch_keys(dataset, batch: dict) -> list[str]:
    """The sample keys of a batch (dataset indices when the dataset has no keys), for error messages."""
    index = batch["index"].tolist() if "index" in batch else []
    records = getattr(dataset, "records", None)
    return [records[i].key if records is not None else str(i) for i in index]


def _check_loss(loss, features, valid, dataset, batch: dict, env: DistEnv, desc: str, step: int, total: int) -> None:
    """Raise ``NonFiniteError`` on every rank, with one message, when the loss is non-finite on any rank.

    Collective (one scalar all-reduce per micro-batch, before the backward pass): a rank raising alone would
    leave the others waiting in DDP's gradient all-reduce until the timeout. The message names the samples
    whose features are non-finite, on any rank (the likely culprits: the gathered features spread one bad
    sample to every rank's loss), or, when every feature is finite, the batches of the ranks whose loss is not.
    """
    value = loss.item()
    bad = not math.isfinite(value)
    if env.enabled:
        flag = torch.tensor(float(bad), device=env.device)
        dist.all_reduce(flag)
        bad = flag.item() > 0
    if not bad:
        return
    keys = _batch_keys(dataset, batch)
    rows = ~torch.stack([torch.isfinite(f).all(-1) for f in features]).all(0).cpu()
    if valid is not None:  # unreadable samples' rows are dropped from the loss: not culprits
        rows &= valid.bool().cpu()
    report = (value, [k for k, r in zip(keys, rows.tolist()) if r], [] if math.isfinite(value) else keys)
    reports = [report]
    if env.enabled:
        reports = [None] * env.world_size
        dist.all_gather_object(reports, report)
    value = next(v for v, _, _ in reports if not math.isfinite(v))
    named = [k for _, culprits, _ in reports for k in culprits] or [k for _, _, whole in reports for k in whole]
    raise NonFiniteError(
        f"{desc}: non-finite loss ({value}) at step {step} of {total}; batch keys: {first_few(named, 8) or 'unknown'}"
    )


def _check_finite(named: list[tuple[str, torch.Tensor]], env: DistEnv, what: str) -> None:
    """Raise ``NonFiniteError`` if any trainable parameter holds a NaN or an infinity (every rank agrees)."""
    from torch.distributed.tensor import DTensor

    bad = [n for n, p in named if not torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all()]
    if env.enabled:  # FSDP shards differ per rank: one verdict for all
        flag = torch.tensor(float(len(bad)), device=env.device)
        dist.all_reduce(flag)
        if flag.item() and not bad:
            bad = ["(a shard on another rank)"]
    if bad:
        raise NonFiniteError(f"{what}: {', '.join(bad[:5])}" + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))


class _no_sync:
    """DDP's no_sync for all but the last micro-batch of an accumulation step."""

    def __init__(self, module, sync: bool) -> None:
        self.ctx = module.no_sync() if (not sync and hasattr(module, "no_sync")) else None

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx else None

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx else False


def _wrap_parallel(module: nn.Module, cfg: TrainConfig, env: DistEnv) -> nn.Module:
    """DDP, or FSDP2 with one shard group per transformer block plus one for the rest (embeddings,
    projections, final norms). Either way all ranks must hold the same weights before the first step:
    DDP broadcasts rank 0's, FSDP2 shards whatever each rank holds, so every rank builds the same model."""
    if not env.enabled:
        return module
    if cfg.parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        # fully_shard cannot shard 0-dim parameters (CLIP's logit_scale) and would split SigLIP's 1-element
        # logit_scale / logit_bias into padded DTensor shards: keep them replicated and average their gradients
        # over ranks ourselves, as DDP would.
        scalars = {p for p in module.parameters() if p.ndim == 0 or p.numel() == 1}
        for p in scalars:
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(_average_grad_over_ranks)
        for blocks in tower_layers(module.model).values():
            for block in blocks:
                fully_shard(block, mesh=mesh)
        fully_shard(module, mesh=mesh, ignored_params=scalars)
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def _average_grad_over_ranks(p: torch.Tensor) -> None:
    # Runs after every micro-batch's accumulation; averaging the running sum each time still yields the
    # average of the sums, since all ranks hold the same average after the previous micro-batch.
    dist.all_reduce(p.grad)
    p.grad /= dist.get_world_size()


def _full(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter, gathered from all ranks if FSDP2 sharded it (a collective)."""
    from torch.distributed.tensor import DTensor

    return p.full_tensor() if isinstance(p, DTensor) else p


def _trainable_state(model: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """Full CPU copies of the trainable parameters. Every rank must call it (FSDP2 gathers shards); ranks
    with ``keep=False`` drop each gathered tensor at once, so they never hold more than one."""
    state = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            full = _full(p.detach())
            if keep:
                state[n] = full.cpu().clone()
    return state


def _all_ranks_skips(dataset, skipped: list[str], env: DistEnv) -> list[str]:
    """Every rank's skips so far (a collective): the phase's list, in rank order, returned; the load-time
    skips added to this rank's ``dataset.skips``. Each rank reads its own shard of every batch, so the skip
    limit and the log need all of them."""
    rows = dataset.skips.load_time() if hasattr(dataset, "skips") else []
    ranks = all_gather_objects((skipped, rows), env)
    if hasattr(dataset, "skips"):
        for _, r in ranks:
            dataset.skips.restore(r)
    return [s for listed, _ in ranks for s in listed]


def _skip_state(dataset, skipped: list[str], env: DistEnv) -> dict[str, str]:
    """What a checkpoint keeps of the skips so far, every rank's (a collective): this phase's list and the
    dataset's load-time skips."""
    every = _all_ranks_skips(dataset, skipped, env)
    rows = dataset.skips.load_time() if hasattr(dataset, "skips") else []
    return {"skipped": json.dumps(every), "skips": json.dumps(rows)}


def _save_checkpoint(path, model, optimizer, scheduler, step, cfg, env: DistEnv, extra: dict | None = None) -> None:
    """Called on every rank: the gathering is collective; rank 0 writes; every rank waits for the write (a rank
    that stopped right after could otherwise resume from the old file) and raises if it failed.

    The RNG states are every rank's: ranks draw different numbers of dropout values (their tokens reach the
    experts in different numbers), so after the first step their generators differ, and a resumed rank 1 with
    rank 0's state would draw other dropout masks than the uninterrupted run."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    trainable = _trainable_state(model, keep=env.is_main)
    # Keyed by parameter name and unsharded, so a checkpoint resumes under any world size and either wrapper.
    optim_state = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    rng = _rng_state()
    ranks = [rng]
    if env.enabled:
        ranks = [None] * env.world_size if env.is_main else None
        dist.gather_object(rng, ranks, dst=0)

    def write() -> None:
        state = {
            "step": step,
            "config": json.dumps(asdict(cfg), sort_keys=True, default=str),
            "trainable": trainable,
            "optimizer": optim_state,
            "scheduler": scheduler.state_dict(),
            "rng": ranks,  # rank r's at index r
            **(extra or {}),
        }
        # Atomic: a kill mid-write leaves the previous checkpoint intact; a full disk removes the temporary and
        # raises one WriteError naming the file (on every rank).
        save_file_atomically(state, path)

    on_main(write, env)


def _rng_state() -> dict:
    """This process's RNG states: torch (CPU, and every CUDA device once initialised), numpy, Python."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": json.dumps(_np_state_to_json(np.random.get_state())),
        "python": json.dumps(_py_state_to_json(random.getstate())),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state(_np_state_from_json(json.loads(rng["numpy"])))
    random.setstate(_py_state_from_json(json.loads(rng["python"])))
    cuda = rng.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _load_checkpoint(
    path, model, optimizer, scheduler, cfg: TrainConfig, extra: dict | None = None, rank: int = 0
) -> int:
    """Every rank reads the whole file and keeps its own shard of each parameter and optimizer state and its
    own RNG states; the ``extra`` entries it was saved with are put into ``extra``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from torch.distributed.tensor import DTensor, distribute_tensor

    state = torch.load(path, map_location="cpu", weights_only=True)

    def plain(c: TrainConfig) -> dict:
        return json.loads(json.dumps(asdict(c), sort_keys=True, default=str))

    # a setting added since the checkpoint was written counts at its default value
    saved_cfg = {**plain(TrainConfig()), **json.loads(state["config"])}
    now_cfg = plain(cfg)
    # a setting removed since is ignored, and so is num_workers: how the batches are decoded, not what they hold
    changed = sorted(k for k in now_cfg if k != "num_workers" and saved_cfg.get(k) != now_cfg[k])
    if changed:
        raise ValueError(
            f"{path} was written with different training settings ({', '.join(changed)}); "
            "delete it to restart this phase"
        )
    if "rng" not in state:
        raise ValueError(
            f"{path} was written by an older clipmoe (one RNG state, not one per rank); delete it to restart this phase"
        )
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(state["trainable"]) != expected:
        raise ValueError(f"{path} holds other trainable parameters than this model/phase")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state["trainable"]:
                full = state["trainable"][n].to(p.device)
                if isinstance(p, DTensor):  # every rank holds the full tensor: cut its shard, no communication
                    full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
                p.copy_(full)
    # strict=False: a trainable parameter that never received a gradient (e.g. logit_scale under a fixed
    # scale) has no optimizer state, at save time as now.
    set_optimizer_state_dict(
        model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True, strict=False)
    )
    scheduler.load_state_dict(state["scheduler"])
    # Under another world size than at save time the batches differ anyway: ranks without a state take rank 0's.
    rngs = state["rng"]
    _set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    if extra is not None:
        extra.update({k: state[k] for k in ("skipped", "skips") if k in state})
    return int(state["step"])


def drop_records_after(path: str, step: int) -> None:
    """Keep only the records of steps <= ``step`` (the checkpoint a run resumes from; 0 when it starts over) of
    a JSON-lines log whose records have a ``step``; a line cut short by a kill goes too."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    if len(keep) != len(lines):
        with atomic_file(path) as f:
            f.writelines(keep)


# RNG states travel as JSON strings so the checkpoint loads with weights_only=True.
def _np_state_to_json(s):
    return [s[0], s[1].tolist(), s[2], s[3], s[4]]


def _np_state_from_json(s):
    return (s[0], np.array(s[1], dtype=np.uint32), s[2], s[3], s[4])


def _py_state_to_json(s):
    return [s[0], list(s[1]), s[2]]


def _py_state_from_json(s):
    return (s[0], tuple(s[1]), s[2])
