"""The registry of pipeline stages: what each stage reads, writes and depends on, and how it runs.

Everything about stages is derived from ``STAGES``: the order ``clipmoe run`` follows, ``status`` and the
``--dry-run`` plan, what ``--fork`` may reuse, the run-directory layout and the stage subcommands of the CLI.
Torch-free (the ``run`` callables receive the ``Pipeline``), so ``clipmoe --help`` stays fast.

    prepare -> [embed s -> cluster s -> mcl s+1] for s < N-1 -> assemble -> route -> baseline X -> report

Adding a stage: one ``Stage`` entry here (in execution order) and a ``Pipeline`` method that does the work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# Config sections each kind of output depends on (a fork reuses an output only if none of them changed).
BASE = ("base_model", "prepare")
DATA = (*BASE, "data", "seed", "precision")
EXPERTS = (*DATA, "embed", "cluster", "mcl")  # the MCL stages' models
DMU = (*EXPERTS, "moe", "route")  # the assembled and routed CLIP-MoE


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline. ``instances`` are its numbers (an MCL stage s, a baseline run id) or [None]."""

    name: str  # the CLI subcommand and the first word of its task names ("mcl 2")
    help: str
    # instance -> {name: run-directory path} of what it writes: the one place the run directory's layout is
    # spelled (the Pipeline asks for ``pipe.out(stage, instance, name)``); a fork copies them
    outputs: Callable[[Any], dict[str, str]]
    done: str  # the output whose existence means the stage finished
    sections: Callable[[Any, Any], Sequence[str]]  # (instance, pipeline) -> config sections its outputs depend on
    run: Callable[[Any, Any], Any]  # (pipeline, instance) -> what it produced; returns at once when done
    instances: Callable[[Any], Sequence[Any]] = lambda pipe: [None]
    argument: str | None = None  # the CLI option selecting one instance ("stage": --stage S, required)
    loop: bool = False  # part of the MCL loop: runs interleaved with the other loop stages, instance by instance
    reusable: bool = True  # False: a fork always redoes it
    # (pipeline, instance) -> rough embedding/training work in sample passes (a training sample counts 3), for
    # the run's time estimate (the report's evaluation has its own bar)
    work: Callable[[Any, Any], float] = lambda pipe, instance: 0.0

    def task(self, instance: Any) -> str:
        return self.name if instance is None else f"{self.name} {instance}"

    def done_path(self, instance: Any) -> str:
        return self.outputs(instance)[self.done]


STAGES: tuple[Stage, ...] = (
    Stage(
        "prepare",
        "Stage 0: the base model (optionally with stretched text positions) into the run.",
        outputs=lambda _: {"model": "base"},
        done="model",
        sections=lambda _, pipe: BASE,
        run=lambda pipe, _: pipe.prepare(),
    ),
    Stage(
        "embed",
        "Embed the training set with the stage-S model (sharded, resumable).",
        outputs=lambda s: {"features": f"stage{s}/embed", "done": f"stage{s}/embed/DONE"},
        done="done",
        sections=lambda s, pipe: (*DATA, "embed") if s == 0 else (*EXPERTS,),
        run=lambda pipe, s: pipe.embed(s),
        work=lambda pipe, s: float(len(pipe.dataset())),
        instances=lambda pipe: range(pipe.cfg.stages),
        argument="stage",
        loop=True,
    ),
    Stage(
        "cluster",
        "k-means pseudo-labels after stage S, accumulated with earlier stages.",
        outputs=lambda s: {"folder": f"stage{s}/cluster", "labels": f"stage{s}/cluster/labels.npy"},
        done="labels",
        sections=lambda s, pipe: (*DATA, "embed", "cluster") if s == 0 else EXPERTS,
        run=lambda pipe, s: pipe.cluster(s),
        instances=lambda pipe: range(pipe.cfg.stages),
        argument="stage",
        loop=True,
    ),
    Stage(
        "mcl",
        "Train MCL stage S (S >= 1): FFNs only, every global batch from one cluster.",
        outputs=lambda s: {
            "model": f"stage{s}/model",
            "train": f"stage{s}/train",
            "stats": f"stage{s}/train_stats.json",
        },
        done="model",
        sections=lambda s, pipe: EXPERTS,
        run=lambda pipe, s: pipe.mcl(s),
        work=lambda pipe, s: pipe.training_work(pipe.cfg.mcl),
        instances=lambda pipe: range(1, pipe.cfg.moe.experts),
        argument="stage",
        loop=True,
    ),
    Stage(
        "assemble",
        "Assemble the CLIP-MoE: expert e of every chosen block is the FFN of MCL stage e (stage 0 = the base).",
        outputs=lambda _: {"model": "moe/init", "router_init": "moe/router_init.json"},
        done="model",
        sections=lambda _, pipe: (*EXPERTS, "moe"),
        run=lambda pipe, _: pipe.assemble(),
    ),
    Stage(
        "route",
        "Train the routers of the assembled CLIP-MoE.",
        outputs=lambda _: {"model": "moe/model", "train": "moe/train", "stats": "moe/train_stats.json"},
        done="model",
        sections=lambda _, pipe: DMU,
        run=lambda pipe, _: pipe.route(),
        work=lambda pipe, _: pipe.training_work(pipe.cfg.route),
    ),
    Stage(
        "baselines",
        "Train the baselines of dmu/baselines.py that the config enables (--only RUN for one).",
        outputs=lambda run_id: {"folder": f"baselines/{run_id}", "model": f"baselines/{run_id}/model"},
        done="model",
        sections=lambda run_id, pipe: pipe.baseline_run(run_id).sections(),
        run=lambda pipe, run_id: pipe.baseline(run_id),
        work=lambda pipe, run_id: pipe.baseline_work(run_id),
        instances=lambda pipe: [r.id for r in pipe.baseline_runs()],
        argument="only",
    ),
    Stage(
        "report",
        "Evaluate every model of the run and write report.md with plots.",
        outputs=lambda _: {"report": "report.md", "eval": "eval", "plots": "plots"},
        done="report",
        sections=lambda _, pipe: (),
        run=lambda pipe, _: pipe.report(),
        reusable=False,  # cheap, and it reads every other output
    ),
)

STAGE_BY_NAME = {s.name: s for s in STAGES}


def plan(pipe) -> list[tuple[Stage, Any]]:
    """Every (stage, instance) of a run in execution order; the MCL loop's stages interleave by instance."""
    tasks: list[tuple[Stage, Any]] = []
    i = 0
    while i < len(STAGES):
        if STAGES[i].loop:
            group = []
            while i < len(STAGES) and STAGES[i].loop:
                group.append(STAGES[i])
                i += 1
            for instances in zip(*(list(s.instances(pipe)) for s in group)):
                tasks += list(zip(group, instances))
        else:
            tasks += [(STAGES[i], x) for x in STAGES[i].instances(pipe)]
            i += 1
    return tasks
