"""The budget rules the baselines train under (``baselines.budgets``); a report row names its rule.

Adding a rule = one ``Budget`` entry (how it changes a baseline phase's training config) + its test.
Torch-free: the config validates rule names against this registry.

The rules that match DMU's cost read its finished phases (``dmu_phases``): the optimizer steps, the samples
each consumed (its batches: what an MCL stage's small-cluster rule left out is not counted) and its training
FLOPs per sample (``flops.py``). A baseline phase then gets as many of its own random batches as reach that
many samples (``steps_for_samples``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from .flops import training_flops_per_sample


@dataclass(frozen=True)
class Budget:
    key: str  # named in baselines.budgets; run folders baselines/<baseline>-<key>/
    label: str  # in row names: "dense fine-tune (1 epoch)"
    rule: str  # one sentence for the report and the plan
    # (pipeline, a baseline phase's TrainConfig, which DMU phases it stands for: "all" | "mcl", the model that
    # phase trains) -> its TrainConfig
    apply: Callable[[Any, Any, str, Any], Any]
    needs_dmu: bool = False  # its budget is read from DMU's finished phases


@dataclass(frozen=True)
class DmuPhase:
    """One finished DMU training phase, as the budget rules count it."""

    name: str  # "mcl 1", "route"
    steps: int  # optimizer steps
    samples: int  # training samples its batches held
    flops_per_sample: float  # training FLOPs per sample (flops.py)


def dmu_phases(pipe, phases: str = "all") -> list[DmuPhase]:
    """DMU's finished phases a baseline phase stands for: every MCL stage, and routing unless ``phases`` is
    ``"mcl"``. Each MCL stage trains the base's FFNs, routing the assembled CLIP-MoE's routers."""
    cfg = pipe.cfg
    todo = [(f"mcl {s}", pipe.out("mcl", s, "stats"), pipe.stage_model(0), cfg.mcl) for s in range(1, cfg.moe.experts)]
    if phases != "mcl":
        todo.append(("route", pipe.out("route", None, "stats"), pipe.out("assemble", None, "model"), cfg.route))
    out = []
    for name, stats_path, model, tcfg in todo:
        with open(stats_path) as f:
            stats = json.load(f)
        flops = training_flops_per_sample(model_config(model), tcfg.trainable, tcfg.last_n_blocks)
        out.append(DmuPhase(name, stats["steps"], consumed_samples(stats, tcfg.grad_accum, stats_path), flops))
    return out


def consumed_samples(stats: dict, grad_accum: int, path: str) -> int:
    """The training samples a phase's batches held, from its train_stats.json."""
    if "samples" in stats:
        return stats["samples"]
    # Stats written before the count was recorded: exact when the phase ran whole epochs of its batch plan
    # (every epoch holds the same batches), which a phase of ``epochs: 1`` does.
    batches, per_epoch = stats["steps"] * grad_accum, stats["batches_per_epoch"]
    if batches % per_epoch:
        raise ValueError(
            f"{path} does not record how many samples its phase consumed ({batches} batches, not whole epochs of "
            f"{per_epoch}); rerun that phase to count them"
        )
    return batches // per_epoch * stats["plan"]["samples"]


def model_config(folder: str) -> dict:
    """A saved model's config as a dict with every default filled in (what ``model.config.to_dict()`` gives)."""
    from ..formats.load import model_class_for  # transformers: imported when a rule runs, not with the config

    with open(f"{folder}/config.json") as f:
        model_class = model_class_for(json.load(f).get("model_type"), folder)
    return model_class.config_class.from_pretrained(folder, local_files_only=True).to_dict()


def steps_for_samples(pipe, tcfg, samples: int) -> int:
    """Optimizer steps of a baseline phase (random batches of ``tcfg``, as the training loop draws them) whose
    batches hold at least ``samples`` samples."""
    from ..train.samplers import GlobalBatchSampler

    sampler = GlobalBatchSampler(
        len(pipe.dataset()),
        tcfg.batch_size,
        world_size=pipe.env.world_size,
        seed=tcfg.seed,
        small_clusters=tcfg.small_clusters,
        min_batch=tcfg.min_batch,
    )
    return max(1, math.ceil(sampler.batches_for(samples) / tcfg.grad_accum))


def _equal_samples(pipe, tcfg, phases: str, model) -> Any:
    samples = sum(p.samples for p in dmu_phases(pipe, phases))
    steps = steps_for_samples(pipe, tcfg, samples)
    pipe.log(f"equal samples: {samples:,} samples seen by DMU's phases = {steps} steps of batch {tcfg.batch_size}")
    return replace(tcfg, steps=steps)


def _equal_flops(pipe, tcfg, phases: str, model) -> Any:
    total = sum(p.samples * p.flops_per_sample for p in dmu_phases(pipe, phases))
    per_sample = training_flops_per_sample(model.config.to_dict(), tcfg.trainable, tcfg.last_n_blocks)
    samples = round(total / per_sample)  # the whole number of samples whose FLOPs come closest to DMU's
    steps = steps_for_samples(pipe, tcfg, samples)
    pipe.log(
        f"equal FLOPs: DMU's phases {total:.3g} FLOPs = {samples:,} samples at {per_sample:.3g} FLOPs each "
        f"= {steps} steps of batch {tcfg.batch_size}"
    )
    return replace(tcfg, steps=steps)


BUDGETS: dict[str, Budget] = {
    b.key: b
    for b in (
        Budget(
            "epoch",
            "1 epoch",
            "every baseline phase sees the fine-tuning data once (the paper's rule: its official scripts run one "
            "epoch)",
            apply=lambda pipe, tcfg, phases, model: replace(tcfg, steps=0, epochs=1.0),
        ),
        Budget(
            "steps",
            "equal steps",
            "equal optimizer steps: as many optimizer steps as all DMU phases (MCL stages + routing) together",
            apply=lambda pipe, tcfg, phases, model: replace(tcfg, steps=pipe.budget_steps(phases)),
            needs_dmu=True,
        ),
        Budget(
            "samples",
            "equal samples",
            "equal data: as many training samples as all DMU phases (MCL stages + routing) consumed together, "
            "counted from their batches (what an MCL stage's small-cluster rule left out is not counted)",
            apply=_equal_samples,
            needs_dmu=True,
        ),
        Budget(
            "flops",
            "equal FLOPs",
            "equal training compute: as many training FLOPs as all DMU phases together, each phase's samples times "
            "its forward + backward FLOPs per sample (dmu/flops.py: a frozen weight costs no weight gradient, "
            "top-k routing runs k experts per token)",
            apply=_equal_flops,
            needs_dmu=True,
        ),
    )
}
