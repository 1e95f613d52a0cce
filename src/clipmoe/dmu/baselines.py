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

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..model.modeling import ClipMoeModel
from ..model.surgery import assemble_moe, find_ffns, sparse_upcycle
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
    moe = assemble_moe(base, [base, pipe.load(ffn_model)], cfg.moe, top_k=min(cfg.moe.top_k, 2))
    pipe.train(moe, cfg.route, os.path.join(folder, "train"), "w/o MCL: routing")
    set_expert_dropout(moe, 0.0)
    return moe


def _random_routers(pipe, rule: str | None, folder: str) -> ClipMoeModel:
    """Control: DMU's assembled CLIP-MoE (the same experts, the same top-k) with its routers frozen at the random
    initialisation router training starts from: what learned routing buys."""
    model = pipe.load(pipe.assemble())
    set_expert_dropout(model, 0.0)
    return model


def _uniform(pipe, rule: str | None, folder: str) -> ClipMoeModel:
    """Control: the experts of DMU's assembly without routing: every token through every expert, their outputs
    averaged with equal weights (``MoEOptions.uniform``, recorded in the saved config)."""
    paths = expert_models(pipe)
    base = pipe.load(paths[0])
    torch.manual_seed(pipe.cfg.seed)  # the (unused) routers' init: a deterministic saved model
    return assemble_moe(
        base, [base] + [pipe.load(p) for p in paths[1:]], pipe.cfg.moe, uniform=True, expert_dropout=0.0
    )


def _experts_only(phases: dict, cfg: PipelineConfig) -> int:
    return phases["MCL stage"]["trainable"] * cfg.stages


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
)


def baseline_runs(cfg: PipelineConfig) -> list[BaselineRun]:
    """The enabled baselines, each under every configured budget rule (or once, if it does not train)."""
    enabled = cfg.baselines.enabled
    if enabled != "all":
        unknown = sorted(set(enabled) - {b.key for b in BASELINES})
        if unknown:
            raise ConfigError(
                f"baselines.enabled: unknown baseline(s) {unknown}; known: {', '.join(b.key for b in BASELINES)}"
            )
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
