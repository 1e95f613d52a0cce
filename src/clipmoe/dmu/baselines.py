"""The registry of baselines, the budget rules they train under, and the report's rows.

Everything about a baseline is derived from its ``Baseline`` entry: its key (``baselines.enabled``), its
run folders (``baselines/<key>-<rule>/``), the ``baselines`` stage's tasks in ``run``/``status``/``--dry-run``,
what a ``--fork`` may reuse, its report row(s), its cost column (trainable parameters), its budget-rule column,
the verdict's comparison with DMU and its training curve. Adding a baseline = one entry in ``BASELINES`` (a
function that builds and trains the model, and one that counts what it trains) + its test.

Every baseline that trains gets one row per budget rule of ``baselines.budgets`` (budgets.py): ``epoch``, the
paper's (every phase sees the fine-tuning data once, as the official scripts' one epoch; the paper itself states
no budget for its baselines), and ``steps``, ``samples``, ``flops``: as many optimizer steps, training samples or
training FLOPs as all DMU phases together. The controls (random routers, uniform mixture, expert soup) do not
train: one row each.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ..model.modeling import ClipMoeModel
from ..model.surgery import assemble_moe, find_ffns, sparse_upcycle
from ..utils.io import write_json
from .budgets import BUDGETS
from .config import ConfigError, PipelineConfig, TrainConfig
from .stages import DMU, EXPERTS


@dataclass(frozen=True)
class Baseline:
    key: str  # named in baselines.enabled; run folder baselines/<key>[-<rule>]/
    title: str  # row name (with " (<budget label>)" when it trains)
    # (pipeline, budget rule or None, run folder) -> the trained model (saved by the pipeline as <folder>/model)
    build: Callable[[Any, str | None, str], ClipMoeModel]
    # (phase parameter counts of dmu.report.phase_parameters, config) -> parameters trained over all its phases
    trainable: Callable[[dict, PipelineConfig], int]
    sections: tuple[str, ...]  # config sections its model depends on (plus DMU's under the ``steps`` rule)
    trains: bool = True  # False: no training, no budget rule, one row
    compare: bool = True  # the verdict compares DMU with it
    curves: tuple[tuple[str, str], ...] = (("", "train"),)  # (label suffix, subfolder) of its metrics.jsonl
    # (run folder) -> wall times of its expert extraction ({"parts": [...], "sum_s", "max_s"}) or None: the
    # report sets them beside the MCL stages'
    extraction: Callable[[str], dict | None] | None = None


@dataclass(frozen=True)
class BaselineRun:
    """One baseline under one budget rule: one task of the ``baselines`` stage and one report row."""

    baseline: Baseline
    rule: str | None

    @property
    def id(self) -> str:
        return self.baseline.key if self.rule is None else f"{self.baseline.key}-{self.rule}"

    @property
    def name(self) -> str:
        return self.baseline.title if self.rule is None else f"{self.baseline.title} ({BUDGETS[self.rule].label})"

    def sections(self) -> tuple[str, ...]:
        return (*self.baseline.sections, "baselines", *(DMU if self.rule and BUDGETS[self.rule].needs_dmu else ()))


@dataclass(frozen=True)
class Row:
    """One model of the report."""

    name: str
    path: str  # run-directory path of its model folder
    trainable: Callable[[dict, PipelineConfig], int]
    rule: str | None = None  # budget rule, if it is a trained baseline
    curves: tuple[tuple[str, str], ...] = ()  # (label, folder holding metrics.jsonl)
    compare: bool = False  # a baseline the verdict compares DMU with
    extraction: dict | None = None  # wall times of its expert extraction (Baseline.extraction), once trained

    @property
    def slug(self) -> str:
        """File-name form of the name: eval/<slug>.json, plots/routing_<slug>.png."""
        return "".join(c if c.isalnum() else "_" for c in self.name.lower()).strip("_")


# ------------------------------------------------------------------------------------------ building blocks


def budgeted(pipe, tcfg: TrainConfig, rule: str | None, dmu_phases: str = "all", *, model: ClipMoeModel) -> TrainConfig:
    """``tcfg`` under a budget rule (budgets.py) for training ``model``; ``dmu_phases`` says which DMU phases it
    stands for."""
    return BUDGETS[rule].apply(pipe, tcfg, dmu_phases, model) if rule else tcfg


def set_expert_dropout(model: ClipMoeModel, p: float) -> None:
    """Dropout is a training device: the saved model runs without it."""
    for m in model.moe_layers():
        m.expert_dropout.p = p
    if model.config.moe:
        model.config.moe = {**model.config.moe, "expert_dropout": p}


def _dense(pipe, rule: str | None, folder: str) -> ClipMoeModel:
    """Full fine-tuning of the base (every parameter), random batches, the MCL stages' hyperparameters."""
    model = pipe.load(pipe.stage_model(0))
    tcfg = budgeted(pipe, replace(pipe.cfg.mcl, trainable="all"), rule, model=model)
    pipe.train(model, tcfg, os.path.join(folder, "train"), "dense fine-tune")
    return model


def _upcycle(pipe, rule: str | None, folder: str) -> ClipMoeModel:
    """Sparse upcycling: every expert a (noisy) copy of the base FFN; routers and experts train together."""
    cfg, b = pipe.cfg, pipe.cfg.baselines
    torch.manual_seed(cfg.seed)  # router init
    model = sparse_upcycle(
        pipe.load(pipe.stage_model(0)), cfg.moe.experts, cfg.moe, noise=b.upcycle_noise, seed=cfg.seed
    )
    # experts learn at the MCL stages' rate, routers at the routing rate
    tcfg = replace(cfg.route, trainable=b.upcycle_trainable, lr=cfg.mcl.lr, router_lr=cfg.route.lr)
    pipe.train(model, budgeted(pipe, tcfg, rule, model=model), os.path.join(folder, "train"), "sparse upcycling")
    set_expert_dropout(model, 0.0)
    return model


def expert_models(pipe) -> list[str]:
    """The model of each expert: the base (expert 0) and every MCL stage (trained first if needed)."""
    return [pipe.mcl(s) if s else pipe.stage_model(0) for s in range(pipe.cfg.moe.experts)]


def _soup(pipe, rule: str | None, folder: str) -> ClipMoeModel:
    """Expert soup: the MCL stages' FFNs averaged into one dense model (no training)."""
    paths = expert_models(pipe)
    soup = pipe.load(paths[0])
    states = [pipe.load(p).state_dict() for p in paths[1:]]
    with torch.no_grad():
        for tower_ffns in find_ffns(soup).values():
            for f in tower_ffns:
                for name, p in f.module.named_parameters():
                    key = f"{f.path}.{name}"
                    p.copy_(torch.stack([p] + [s[key] for s in states]).mean(0))
    return soup


def _wo_mcl(pipe, rule: str | None, folder: str) -> ClipMoeModel:
    """The paper's Table 4 "w/o MCL": a 2-expert MoE of {base FFN, an FFN fine-tuned directly} (FFN-only, random
    batches, under the budget rule), routers trained exactly as DMU's routing phase."""
    cfg = pipe.cfg
    ffn_model = os.path.join(folder, "ffn", "model")
    if not os.path.exists(ffn_model):
        tuned = pipe.load(pipe.stage_model(0))
        tcfg = budgeted(pipe, cfg.mcl, rule, dmu_phases="mcl", model=tuned)  # stands for the MCL stages
        pipe.train(tuned, tcfg, os.path.join(folder, "ffn", "train"), "w/o MCL: FFN fine-tune")
        pipe.save(tuned, ffn_model)
    base = pipe.load(pipe.stage_model(0))
    torch.manual_seed(cfg.seed)  # router init, as DMU's assembly
    routed = 2 - int(cfg.moe.always_on_base)  # with the base always on, the tuned FFN is the one routed expert
    moe = assemble_moe(base, [base, pipe.load(ffn_model)], cfg.moe, top_k=min(cfg.moe.top_k, routed))
    pipe.train(moe, cfg.route, os.path.join(folder, "train"), "w/o MCL: routing")
    set_expert_dropout(moe, 0.0)
    return moe


def _random_routers(pipe, rule: str | None, folder: str) -> ClipMoeModel:
    """Control: DMU's assembled CLIP-MoE (the same experts, the same top-k) with its routers frozen at the random
    initialisation router training starts from: what learned routing buys."""
    model = pipe.load(pipe.assemble())
    set_expert_dropout(model, 0.0)
    return model


def clip_up_phase(cfg: PipelineConfig) -> TrainConfig:
    """The ``clip_up`` training phase before its budget rule: the routing phase's settings, routers and experts
    trainable, routers at ``router_lr`` (default route.lr), experts ``expert_lr_scale`` times slower, z-loss."""
    up = cfg.baselines.clip_up
    router_lr = up.router_lr or cfg.route.lr
    return replace(
        cfg.route,
        trainable="router+experts",
        lr=router_lr * up.expert_lr_scale,
        router_lr=router_lr,
        z_loss_weight=up.z_loss_weight,
    )


def _clip_up(pipe, rule: str | None, folder: str) -> ClipMoeModel:
    """Sparse upcycling the CLIP-UP way: noisy copies of the base FFN, routers and experts trained together
    with the balance loss and a router z-loss, experts at a reduced learning rate (``expert_lr_scale`` x the
    routers'), and Switch/GShard token dropping at ``capacity_factor`` while training."""
    cfg, up = pipe.cfg, pipe.cfg.baselines.clip_up
    torch.manual_seed(cfg.seed)  # router init
    options = replace(cfg.moe, capacity_factor=up.capacity_factor, capacity_at_inference=up.capacity_at_inference)
    model = sparse_upcycle(pipe.load(pipe.stage_model(0)), cfg.moe.experts, options, noise=up.noise, seed=cfg.seed)
    tcfg = budgeted(pipe, clip_up_phase(cfg), rule, model=model)
    pipe.train(model, tcfg, os.path.join(folder, "train"), "CLIP-UP upcycling")
    set_expert_dropout(model, 0.0)
    return model


def _uniform(pipe, rule: str | None, folder: str) -> ClipMoeModel:
    """Control: the experts of DMU's assembly without routing: every token through every expert, their outputs
    averaged with equal weights (``MoEOptions.uniform``, recorded in the saved config)."""
    paths = expert_models(pipe)
    base = pipe.load(paths[0])
    torch.manual_seed(pipe.cfg.seed)  # the (unused) routers' init: a deterministic saved model
    return assemble_moe(
        base,
        [base] + [pipe.load(p) for p in paths[1:]],
        pipe.cfg.moe,
        uniform=True,
        expert_dropout=0.0,
        always_on_base=False,  # every expert is on: the base among them
    )


def _experts_only(phases: dict, cfg: PipelineConfig) -> int:
    return phases["MCL stage"]["trainable"] * cfg.stages


def fmoe_partitions(labels: np.ndarray, parts: int, how: str = "balanced") -> list[list[int]]:
    """Group the clusters of ``labels`` (-1 = no cluster) into ``parts`` partitions of cluster ids.

    ``balanced``: clusters from the largest down, each into the partition with the fewest samples so far
    (ties: the lower index), which evens out partition sizes. ``largest``: the ``parts - 1`` largest clusters
    alone, every other cluster in the last partition. Ties between cluster sizes go to the lower id."""
    ids, sizes = np.unique(labels[labels >= 0], return_counts=True)
    if len(ids) < parts:
        raise ValueError(f"fmoe: {parts} partitions need at least {parts} non-empty clusters, the data has {len(ids)}")
    order = [int(c) for _, c in sorted(zip(-sizes, ids))]
    if how == "largest":
        groups = [[c] for c in order[: parts - 1]] + [order[parts - 1 :]]
    elif how == "balanced":
        groups, totals = [[] for _ in range(parts)], [0] * parts
        size = dict(zip(ids.tolist(), sizes.tolist()))
        for c in order:
            i = totals.index(min(totals))
            groups[i].append(c)
            totals[i] += size[c]
    else:
        raise ValueError(f"fmoe: unknown partition rule {how!r}")
    return [sorted(g) for g in groups]


def fmoe_expert(pipe, rule: str | None, folder: str, p: int, clusters: list[int], labels: np.ndarray) -> dict:
    """Partition expert ``p``: a fresh copy of the base, FFNs only, trained on the samples of ``clusters`` (every
    batch from one of them, as MCL's), under the budget rule's share. Reads only the base and the stage-0
    labels, so the partitions are independent tasks (they could run at once); returns its record (wall times)."""
    out = os.path.join(folder, f"partition{p}")
    record_path = os.path.join(out, "extraction.json")
    if os.path.exists(record_path):
        with open(record_path) as f:
            return json.load(f)
    t0 = time.perf_counter()
    cfg = pipe.cfg
    mine = np.isin(labels, clusters)
    model = pipe.load(pipe.stage_model(0))
    # all partition experts together stand for MCL
    whole = budgeted(pipe, cfg.mcl, rule, dmu_phases="mcl", model=model)
    tcfg = replace(whole, seed=cfg.seed + 1 + p)
    if whole.steps:  # a step budget is shared in proportion to the partitions' sizes
        tcfg = replace(tcfg, steps=max(1, round(whole.steps * mine.sum() / (labels >= 0).sum())))
    stats = pipe.train(
        model, tcfg, os.path.join(out, "train"), f"fmoe partition {p}", labels=np.where(mine, labels, -1)
    )
    pipe.save(model, os.path.join(out, "model"))
    record = {
        "partition": p,
        "clusters": clusters,
        "samples": int(mine.sum()),
        "steps": stats["steps"],
        "train_s": round(stats["seconds"], 2),  # the training loop, as MCL's train_stats.json "seconds"
        "wall_s": round(time.perf_counter() - t0, 2),  # load + train + save
    }
    if pipe.env.is_main:
        write_json(record_path, record)
    return record


def _fmoe(pipe, rule: str | None, folder: str) -> ClipMoeModel:
    """Cluster-partition experts fused with the base FFN (CLIP-FMoE's idea): the stage-0 clusters grouped into
    (experts - 1) partitions, one FFN-only expert fine-tuned from the base per partition (``fmoe_expert``),
    then a MoE whose gate keeps the base FFN for every token and adds top-k of the partition experts, the gate
    trained exactly as DMU's routing phase."""
    cfg = pipe.cfg
    parts = cfg.moe.experts - 1
    labels = pipe.cluster(0)  # the run's stage-0 joint clusters (computed here if DMU has not run)
    groups = fmoe_partitions(labels, parts, cfg.baselines.fmoe.partitions)
    records = [fmoe_expert(pipe, rule, folder, p, g, labels) for p, g in enumerate(groups)]
    if pipe.env.is_main:
        write_json(os.path.join(folder, "extraction.json"), _extraction_summary(records))
    base = pipe.load(pipe.stage_model(0))
    experts = [base] + [pipe.load(os.path.join(folder, f"partition{p}", "model")) for p in range(parts)]
    torch.manual_seed(cfg.seed)  # gate init, as DMU's assembly
    moe = assemble_moe(base, experts, cfg.moe, top_k=min(cfg.moe.top_k, parts), always_on_base=True)
    pipe.train(moe, cfg.route, os.path.join(folder, "train"), "fmoe: fusion gate")
    set_expert_dropout(moe, 0.0)
    return moe


def _extraction_summary(records: list[dict]) -> dict:
    return {
        "parts": records,
        "sum_s": round(sum(r["train_s"] for r in records), 2),
        "max_s": round(max(r["train_s"] for r in records), 2),  # the wall time if the partitions ran at once
        "wall_sum_s": round(sum(r["wall_s"] for r in records), 2),
        "wall_max_s": round(max(r["wall_s"] for r in records), 2),
    }


def _read_extraction(folder: str) -> dict | None:
    path = os.path.join(folder, "extraction.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _routers(phases: dict, cfg: PipelineConfig, experts: int) -> int:
    return phases["router training"]["trainable"] * experts // cfg.moe.experts


BASELINES: tuple[Baseline, ...] = (
    Baseline(
        "dense",
        "dense fine-tune",
        _dense,
        trainable=lambda phases, cfg: phases["dense fine-tune"]["trainable"],
        sections=("base_model", "prepare", "data", "seed", "precision", "mcl"),
    ),
    Baseline(
        "upcycle",
        "sparse upcycling",
        _upcycle,
        trainable=lambda phases, cfg: phases["sparse upcycling"]["trainable"],
        sections=("base_model", "prepare", "data", "seed", "precision", "mcl", "moe", "route"),
    ),
    Baseline(
        "wo_mcl",
        "w/o MCL",
        _wo_mcl,
        trainable=lambda phases, cfg: phases["MCL stage"]["trainable"] + _routers(phases, cfg, 2),
        sections=("base_model", "prepare", "data", "seed", "precision", "mcl", "moe", "route"),
        curves=((" FFN", "ffn/train"), (" routing", "train")),
    ),
    Baseline(
        "random_routers",
        "random routers",
        _random_routers,
        trainable=_experts_only,
        sections=(*EXPERTS, "moe"),
        trains=False,
    ),
    Baseline(
        "uniform",
        "uniform mixture",
        _uniform,
        trainable=_experts_only,
        sections=(*EXPERTS, "moe"),
        trains=False,
    ),
    Baseline(
        "soup",
        "expert soup",
        _soup,
        trainable=lambda phases, cfg: 0,
        sections=EXPERTS,
        trains=False,
    ),
    Baseline(
        "clip_up",
        "CLIP-UP upcycling",
        _clip_up,
        trainable=lambda phases, cfg: phases["sparse upcycling"]["trainable"],
        sections=("base_model", "prepare", "data", "seed", "precision", "moe", "route"),
    ),
    Baseline(
        "fmoe",
        "cluster-partition fusion",
        _fmoe,
        trainable=lambda phases, cfg: (
            phases["MCL stage"]["trainable"] * cfg.stages + phases["router training"]["trainable"]
        ),
        sections=DMU,
        curves=((" gate", "train"),),
        extraction=_read_extraction,
    ),
)


def check_baselines(cfg: PipelineConfig) -> None:
    """The ``baselines`` section against the registry, before a run writes anything: known keys, each once, and
    budget rules for the baselines that train (each rule once)."""
    enabled, errors = cfg.baselines.enabled, []
    if enabled != "all":
        unknown = sorted(set(enabled) - {b.key for b in BASELINES})
        if unknown:
            errors.append(
                f"baselines.enabled: unknown baseline(s) {unknown}; known: {', '.join(b.key for b in BASELINES)}"
            )
        twice = sorted({k for k in enabled if enabled.count(k) > 1})
        if twice:
            errors.append(f"baselines.enabled: {twice} listed more than once")
    budgets = cfg.baselines.budgets
    training = [b.key for b in BASELINES if b.trains and (enabled == "all" or b.key in enabled)]
    if training and not budgets:
        errors.append(f"baselines.budgets: empty, so {training} would not run; name at least one rule")
    twice = sorted({r for r in budgets if isinstance(r, str) and budgets.count(r) > 1})
    if twice:
        errors.append(f"baselines.budgets: {twice} listed more than once")
    if errors:
        raise ConfigError("; ".join(errors))


def baseline_runs(cfg: PipelineConfig) -> list[BaselineRun]:
    """The enabled baselines, each under every configured budget rule (or once, if it does not train)."""
    check_baselines(cfg)
    enabled = cfg.baselines.enabled
    runs = []
    for b in BASELINES:
        if enabled == "all" or b.key in enabled:
            runs += [BaselineRun(b, r) for r in cfg.baselines.budgets] if b.trains else [BaselineRun(b, None)]
    return runs


def rows(pipe) -> list[Row]:
    """The report's models in table order: base, each MCL stage, the baselines, the DMU CLIP-MoE."""
    cfg = pipe.cfg
    out = [Row("base", pipe.stage_model(0), lambda phases, cfg: 0)]
    if cfg.baselines.stages:
        out += [
            Row(
                f"MCL stage {s}",
                pipe.stage_model(s),
                lambda phases, cfg: phases["MCL stage"]["trainable"],
                curves=((f"MCL stage {s}", pipe.out("mcl", s, "train")),),
            )
            for s in range(1, cfg.moe.experts)
        ]
    for run in baseline_runs(cfg):
        folder = pipe.out("baselines", run.id, "folder")
        curves = tuple((run.name + suffix, os.path.join(folder, sub)) for suffix, sub in run.baseline.curves)
        out.append(
            Row(
                run.name,
                pipe.out("baselines", run.id, "model"),
                run.baseline.trainable,
                run.rule,
                curves if run.baseline.trains else (),
                run.baseline.compare,
                run.baseline.extraction(folder) if run.baseline.extraction else None,
            )
        )
    out.append(
        Row(
            "DMU CLIP-MoE",
            pipe.out("route", None, "model"),
            lambda phases, cfg: phases["MCL stage"]["trainable"] * cfg.stages + phases["router training"]["trainable"],
            curves=(("DMU routing", pipe.out("route", None, "train")),),
        )
    )
    return out
