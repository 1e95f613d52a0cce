"""The DMU pipeline end to end, as resumable stages over one run directory.

The stages, their order, outputs and config dependencies are the registry in ``stages.py``; the baselines and
the report's rows are the registry in ``baselines.py``. This module holds the run directory (config snapshot,
refusal of a changed config, ``--fork``), the status and ``--dry-run`` plan derived from the registries, and
the ``Pipeline`` whose methods do each stage's work. Every stage writes its outputs atomically and is skipped
when they exist, so a run can be rerun after any interruption: finished stages are skipped and an unfinished
training phase resumes from its last checkpoint.

Layout of a run directory::

    config.yaml                    snapshot of the validated config (paths made absolute), written only
                                   after every check (validate_run) has passed
    .lock                          held by the run's main process (utils/lock.py): one run per directory
    */dataset.json.gz              the training set's identity, recorded by each stage that reads it
    base/                          the prepared base model (stage 0)
    stage{s}/embed/                features of the training set under the stage-s model
    stage{s}/cluster/              accumulated pseudo-labels after stage s, sizes, histogram
    stage{s}/train/, stage{s}/model/   MCL stage s (s >= 1): checkpoint + metrics, final model folder
    moe/init/, moe/train/, moe/model/  assembled CLIP-MoE, router training, final CLIP-MoE
    moe/router_init.json           with moe.router_init: centroid, samples per expert and how alike the rows are
    baselines/{key}-{rule}/            each baseline under each budget rule (baselines.py)
    eval/{row}.json, report.md, plots/, timings.json
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import replace

import numpy as np
import torch
import yaml

from ..assets import resolve_model_path
from ..data.collate import ClipCollator
from ..data.readers import open_dataset
from ..formats.load import load
from ..model.modeling import ClipMoeModel
from ..model.stretch import stretch_text_positions
from ..model.surgery import assemble_moe, init_routers
from ..train.distributed import DistEnv, barrier, full_state_dict
from ..train.loop import Distillation, train
from ..utils.io import atomic_file, write_json
from ..utils.lock import lock_folder
from .baselines import BaselineRun, Row, baseline_runs, rows, set_expert_dropout
from .budgets import BUDGETS
from .centroids import router_centroids
from .cluster import cluster_features, write_cluster_outputs
from .config import ConfigError, PipelineConfig, TrainConfig, config_from_dict, diff_configs, load_config
from .embed import FeatureStore, embed_dataset
from .identity import check_identity, dataset_identity, write_identity
from .report import evaluate_row, phase_parameters, write_report
from .stages import STAGE_BY_NAME, Stage, plan


class Pipeline:
    """The work of each stage of one DMU run (see ``stages.STAGES``); each returns at once when already done."""

    def __init__(self, cfg: PipelineConfig, run_dir: str, env: DistEnv | None = None) -> None:
        self.cfg, self.run_dir = cfg, os.path.abspath(run_dir)
        self.env = env or DistEnv()
        self._dataset, self._identity = None, None
        self.log = print if self.env.is_main else (lambda *a, **k: None)

    # ---------------------------------------------------------------- helpers
    def path(self, *parts: str) -> str:
        return os.path.join(self.run_dir, *parts)

    @property
    def timings_path(self) -> str:
        """Wall time per task, written by every task (``run_stage``), shown by the report."""
        return self.path("timings.json")

    def out(self, stage: str, instance, name: str) -> str:
        """The path of output ``name`` of a stage (its layout is declared once, in stages.STAGES)."""
        return self.path(STAGE_BY_NAME[stage].outputs(instance)[name])

    def dataset(self):
        """The training set, refused (``DataChanged``) if it differs from what any stage of this run read."""
        if self._dataset is None:
            d = self.cfg.data
            dataset = open_dataset(
                d.train, d.format, caption=d.caption, root=d.root, max_skipped_fraction=d.max_skipped_fraction
            )
            identity = dataset_identity(dataset)
            if os.path.isdir(self.run_dir):
                check_identity(self.run_dir, identity)
            self._dataset, self._identity = dataset, identity
        return self._dataset

    def record_data(self, folder: str) -> None:
        """Record the training set's identity in a stage's folder before the stage reads it."""
        self.dataset()
        if self.env.is_main:
            write_identity(folder, self._identity)

    def load(self, path: str) -> ClipMoeModel:
        model = load(path, device=self.env.device)
        model.set_moe_dispatch(self.cfg.moe.dispatch)  # a run-time choice: saved models do not carry it
        return model

    def save(self, model: ClipMoeModel, path: str) -> None:
        state = full_state_dict(model, self.env)  # collective when FSDP left the model sharded; else None
        if self.env.is_main:
            refuse_nonfinite(state if state is not None else model.state_dict(), path)
            model.save_pretrained(path, **({"state_dict": state} if state is not None else {}))
        barrier(self.env)

    def train(self, model: ClipMoeModel, tcfg: TrainConfig, folder: str, desc: str, labels=None) -> dict:
        """One training phase on the run's training set (the one loop every phase uses). With
        ``distill_weight`` > 0 the frozen base (stage 0) and ``distill_data``'s images join it."""
        collate = ClipCollator(model.tokenizer, model.image_processor)
        self.record_data(folder)
        distill = None
        if tcfg.distill_weight:
            d = self.cfg.data
            images = open_dataset(tcfg.distill_data, max_skipped_fraction=d.max_skipped_fraction)
            distill = Distillation(self.load(self.stage_model(0)), images, collate)
        return train(model, self.dataset(), collate, tcfg, folder, self.env, labels=labels, desc=desc, distill=distill)

    def _timed(self, name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        if self.env.is_main:
            path = self.timings_path
            timings = json.load(open(path)) if os.path.exists(path) else {}
            timings.setdefault(name, round(time.perf_counter() - t0, 2))
            write_json(path, timings)
        return out

    def _write_stats(self, path: str, stats: dict) -> None:
        if self.env.is_main:
            if stats["skipped_samples"]:
                self.log(f"{len(stats['skipped_samples'])} unreadable samples were masked out; see {path}")
            write_json(path, stats)

    # ---------------------------------------------------------------- stages (registered in stages.py)
    def prepare(self) -> str:
        """Stage 0: the base model, optionally with stretched text positions, saved into the run."""
        out = self.out("prepare", None, "model")
        if os.path.exists(out):
            return out
        model = load(resolve_model_path(self.cfg.base_model))
        for attr in ("tokenizer", "image_processor"):
            if getattr(model, attr, None) is None:
                raise ValueError(
                    f"the base model has no {attr}; give it a folder with tokenizer and preprocessor files"
                )
        if model.moe_layers():
            raise ValueError("the base model is already a CLIP-MoE; DMU starts from a dense CLIP")
        p = self.cfg.prepare
        if p.stretch_text_positions:
            stretch_text_positions(model, p.keep_positions, p.stretch_factor)
        self.save(model, out)
        return out

    def stage_model(self, s: int) -> str:
        return self.out("prepare", None, "model") if s == 0 else self.out("mcl", s, "model")

    def embed(self, s: int) -> FeatureStore:
        folder = self.out("embed", s, "features")
        if os.path.exists(self.out("embed", s, "done")):
            return FeatureStore.open(folder)
        model = self.load(self.stage_model(s))
        self.record_data(folder)
        return embed_dataset(
            model,
            self.dataset(),
            ClipCollator(model.tokenizer, model.image_processor),
            folder,
            self.env,
            self.cfg.embed.batch_size,
            self.cfg.embed.chunk_size,
            self.cfg.data.num_workers,
            self.cfg.precision,
            desc=f"embed stage {s}",
        )

    def cluster(self, s: int) -> np.ndarray:
        folder, labels_path = self.out("cluster", s, "folder"), self.out("cluster", s, "labels")
        if not os.path.exists(labels_path):
            store = self.embed(s)
            previous = self.cluster(s - 1) if s > 0 else None
            c = self.cfg.cluster
            if self.env.is_main:
                labels = cluster_features(
                    store, c.image_clusters, c.text_clusters, previous, self.cfg.seed + s, niter=c.niter
                )
                stats = write_cluster_outputs(folder, labels, f"after stage {s}")
                self.log(
                    f"stage {s}: {stats['clusters']} accumulated clusters, largest {stats['largest']}, "
                    f"smallest {stats['smallest']}"
                )
            barrier(self.env)
        return np.load(labels_path)

    def mcl(self, s: int) -> str:
        """MCL stage s >= 1: a fresh copy of the base, FFNs only, every batch from one stage-(s-1) cluster."""
        out = self.stage_model(s)
        if os.path.exists(out):
            return out
        labels = self.cluster(s - 1)
        model = self.load(self.stage_model(0))
        tcfg = replace(self.cfg.mcl, seed=self.cfg.seed + s)
        stats = self.train(model, tcfg, self.out("mcl", s, "train"), f"mcl stage {s}", labels=labels)
        self._write_stats(self.out("mcl", s, "stats"), stats)
        self.save(model, out)
        return out

    def assemble(self) -> str:
        """Assemble the CLIP-MoE: expert e of every chosen block is the FFN of MCL stage e."""
        out = self.out("assemble", None, "model")
        if os.path.exists(out):
            return out
        experts = [self.mcl(s) if s else self.stage_model(0) for s in range(self.cfg.moe.experts)]
        base = self.load(experts[0])
        models = [base] + [self.load(p) for p in experts[1:]]
        torch.manual_seed(self.cfg.seed)  # router init
        moe = assemble_moe(base, models, self.cfg.moe)
        if self.cfg.moe.router_init == "centroid":
            centroids, record = router_centroids(self, base)
            init_routers(moe, centroids)
            if self.env.is_main:
                write_json(self.out("assemble", None, "router_init"), record)
        self.save(moe, out)
        return out

    def route(self) -> str:
        """Router training on the whole training set (random batches)."""
        out = self.out("route", None, "model")
        if os.path.exists(out):
            return out
        model = self.load(self.assemble())
        stats = self.train(model, self.cfg.route, self.out("route", None, "train"), "route")
        self._write_stats(self.out("route", None, "stats"), stats)
        set_expert_dropout(model, 0.0)
        self.save(model, out)
        return out

    def budget_steps(self, phases: str = "all") -> int:
        """Optimizer steps DMU spent: all MCL stages, plus routing unless ``phases`` is ``"mcl"``."""
        steps = [json.load(open(self.out("mcl", s, "stats")))["steps"] for s in range(1, self.cfg.moe.experts)]
        if phases != "mcl":
            steps.append(json.load(open(self.out("route", None, "stats")))["steps"])
        return sum(steps)

    def baseline_runs(self) -> list[BaselineRun]:
        return baseline_runs(self.cfg)

    def baseline_run(self, run_id: str) -> BaselineRun:
        runs = {r.id: r for r in self.baseline_runs()}
        if run_id not in runs:
            raise ValueError(f"no baseline run {run_id!r} in this config; it has: {', '.join(runs) or 'none'}")
        return runs[run_id]

    def baseline(self, run_id: str) -> str:
        """One baseline under one budget rule (baselines.py builds and trains it)."""
        run = self.baseline_run(run_id)
        folder, out = self.out("baselines", run.id, "folder"), self.out("baselines", run.id, "model")
        if os.path.exists(out):
            return out
        self.prepare()
        if run.rule and BUDGETS[run.rule].needs_dmu:
            self.route()  # its budget is read from DMU's finished phases
        self.save(run.baseline.build(self, run.rule, folder), out)
        return out

    def rows(self) -> list[Row]:
        """The models the report compares, in table order (baselines.rows)."""
        return rows(self)

    def evaluate(self) -> dict[str, dict]:
        results = {}
        for row in self.rows():
            out = os.path.join(self.out("report", None, "eval"), row.slug + ".json")
            if not os.path.exists(out) and self.env.is_main:
                write_json(out, evaluate_row(self.load(row.path), self.cfg, row.name))
            barrier(self.env)
            results[row.name] = json.load(open(out))
        return results

    def results(self) -> dict[str, dict]:
        """The evaluation results of every row (after ``evaluate``)."""
        folder = self.out("report", None, "eval")
        return {row.name: json.load(open(os.path.join(folder, row.slug + ".json"))) for row in self.rows()}

    def report(self) -> str:
        results = self.evaluate()
        path = self.out("report", None, "report")
        if self.env.is_main:
            write_report(self, results, path)
        barrier(self.env)
        return path

    def check_data(self) -> None:
        """Config checks that need the dataset's size (indexing only, no decoding); all problems at once."""
        n = len(self.dataset())
        c, errors = self.cfg.cluster, []
        for name, k in (("cluster.image_clusters", c.image_clusters), ("cluster.text_clusters", c.text_clusters)):
            if k > n:
                errors.append(f"{name}: cannot make {k} k-means clusters from {n} training samples")
        for phase in ("mcl", "route"):
            t = getattr(self.cfg, phase)
            if t.batch_size % self.env.world_size:
                errors.append(
                    f"{phase}.batch_size: {t.batch_size} is not divisible by the world size {self.env.world_size}"
                )
            if min(t.batch_size, n) < t.min_batch:
                errors.append(
                    f"{phase}.batch_size: batches of {min(t.batch_size, n)} are below min_batch {t.min_batch}"
                )
        if self.cfg.route.distill_weight:  # indexed now, so an unreadable one stops the run before MCL, not after
            try:
                open_dataset(self.cfg.route.distill_data, max_skipped_fraction=self.cfg.data.max_skipped_fraction)
            except (OSError, ValueError) as e:
                errors.append(f"route.distill_data: {e}")
        if errors:
            raise ConfigError(f"{len(errors)} problem(s) with this config and data:\n  - " + "\n  - ".join(errors))

    # ---------------------------------------------------------------- the registry, run as a whole
    def tasks(self) -> list[tuple[Stage, object]]:
        return plan(self)

    def run_stage(self, stage: Stage, instance=None):
        """One task, timed into timings.json."""
        return self._timed(stage.task(instance), lambda: stage.run(self, instance))

    def run(self) -> str:
        self.check_data()
        out = None
        for stage, instance in self.tasks():
            out = self.run_stage(stage, instance)
        return out

    def status(self) -> dict[str, bool]:
        """Task name -> finished, for every task of the run (from each stage's done-check)."""
        return {s.task(i): os.path.exists(self.path(s.done_path(i))) for s, i in self.tasks()}


def refuse_nonfinite(state: dict[str, torch.Tensor], path: str) -> None:
    """No model is saved with a NaN or an infinity in it: raise naming the tensors instead."""
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in state.items() if v.is_floating_point()}
    bad = {k: n for k, n in bad.items() if n}
    if bad:
        names = ", ".join(f"{k} ({n})" for k, n in list(bad.items())[:5]) + (" ..." if len(bad) > 5 else "")
        raise ValueError(f"refusing to save {path}: {sum(bad.values())} non-finite values in {names}")


# -------------------------------------------------------------------- run directory


def default_run_dir(config_path: str) -> str:
    return os.path.splitext(config_path)[0] + "-run"


def check_device(device: str) -> None:
    """The config's device exists here (``auto`` always does)."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {device!r}, but no CUDA device is available (use cpu or auto)")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device: {device!r}, but there are only {torch.cuda.device_count()} CUDA device(s)")


def validate_run(cfg: PipelineConfig, run_dir: str, fork: str | None = None, env: DistEnv | None = None) -> Pipeline:
    """Every check a run makes before it writes anything; ``clipmoe run`` and ``--dry-run`` both call it.

    The config against the run directory's snapshot (or the fork's source and target), the device, and the
    config against the data (``Pipeline.check_data``). Returns the pipeline over the directory the run writes
    (the fork's with ``fork``); raises ``ConfigError`` (a ``ValueError``) listing the problems."""
    if fork:
        if os.path.exists(fork):
            raise ConfigError(f"cannot fork into {fork}: it exists")
        if not os.path.exists(os.path.join(run_dir, "config.yaml")):
            raise ConfigError(f"cannot fork {run_dir}: it is not a run directory (no config.yaml)")
    elif os.path.exists(os.path.join(run_dir, "config.yaml")):
        _refuse_changed_config(run_dir, cfg)
    check_device(cfg.device)
    pipe = Pipeline(cfg, fork or run_dir, env)
    pipe.check_data()
    return pipe


def open_pipeline(config_path: str, run_dir: str | None = None, fork: str | None = None, init_env=None) -> Pipeline:
    """Validate the config (``validate_run``), then bind it to its run directory: fork, lock, snapshot.
    Nothing is written before every check has passed; a second process on the same run directory gets
    ``FolderLocked`` (one line naming the holder). ``init_env(device)`` sets up the process group (the CLI's
    ``init_distributed``); None: one process."""
    cfg = load_config(config_path)
    run_dir = run_dir or default_run_dir(config_path)
    check_device(cfg.device)
    pipe = validate_run(cfg, run_dir, fork, init_env(cfg.device) if init_env else None)
    if pipe.env.is_main:  # validation passed: from here on the run directory is written
        if fork:
            _fork(run_dir, fork, cfg)
        lock_folder(pipe.run_dir)  # one run per directory, for the life of this (main) process
        snapshot = pipe.path("config.yaml")
        if not os.path.exists(snapshot):
            with atomic_file(snapshot) as f:
                yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    barrier(pipe.env)
    return pipe


def open_run(config_path: str, run_dir: str | None = None, fork: str | None = None) -> tuple[PipelineConfig, str]:
    """Validate the config and bind it to its run directory (``open_pipeline``): (config, run directory)."""
    pipe = open_pipeline(config_path, run_dir, fork)
    return pipe.cfg, pipe.run_dir


def _changed_keys(run_dir: str, cfg: PipelineConfig) -> list[str]:
    """Config keys that differ from the run directory's snapshot (none if it has no snapshot yet)."""
    snapshot = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(snapshot):
        return []
    with open(snapshot) as f:
        old = yaml.safe_load(f)
    # A key added to the config since the snapshot was written counts at its default value; a snapshot that no
    # longer validates (a key since removed) is compared raw, which names that key.
    with contextlib.suppress(ConfigError):
        old = config_from_dict(old, check_paths=False).to_dict()
    return diff_configs(old, cfg.to_dict())


def _refuse_changed_config(run_dir: str, cfg: PipelineConfig) -> None:
    changed = _changed_keys(run_dir, cfg)
    if changed:
        raise ConfigError(
            f"{run_dir} was started with a different config; changed keys: {', '.join(changed)}. "
            f"Use the old config to resume, or --fork NEW_RUN_DIR to start a new run that reuses what is unchanged."
        )


def _reusable(src: str, cfg: PipelineConfig) -> tuple[dict[str, list[str]], set[str]]:
    """Task -> its outputs in run ``src`` that a fork with ``cfg`` reuses (its config sections are unchanged),
    and the changed config sections."""
    if not os.path.exists(os.path.join(src, "config.yaml")):
        raise ConfigError(f"cannot fork {src}: it is not a run directory (no config.yaml)")
    changed = {k.split(".")[0] for k in _changed_keys(src, cfg)}
    pipe = Pipeline(cfg, src)
    reuse = {}
    for stage, instance in pipe.tasks():
        if stage.reusable and not changed & set(stage.sections(instance, pipe)):
            paths = stage.outputs(instance).values()
            outer = [p for p in paths if not any(p.startswith(q + "/") for q in paths)]  # copy folders once
            reuse[stage.task(instance)] = [p for p in outer if os.path.exists(pipe.path(p))]
    return reuse, changed


def _fork(src: str, dst: str, cfg: PipelineConfig) -> None:
    if os.path.exists(dst):
        raise ConfigError(f"cannot fork into {dst}: it exists")
    reuse, changed = _reusable(src, cfg)
    os.makedirs(dst)
    copied = []
    for paths in reuse.values():
        for rel in paths:
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
            if os.path.isdir(os.path.join(src, rel)):
                shutil.copytree(os.path.join(src, rel), os.path.join(dst, rel), symlinks=True)
            else:
                shutil.copy2(os.path.join(src, rel), os.path.join(dst, rel))
            copied.append(rel)
    print(f"forked {src} -> {dst}; reused: {', '.join(copied) or 'nothing'} (changed: {', '.join(sorted(changed))})")


def print_plan(cfg: PipelineConfig, run_dir: str, fork: str | None = None, check: bool = True) -> None:
    """What ``clipmoe run`` would do, writing nothing: it refuses here (``validate_run``, the same checks) what
    the run would refuse. ``check=False`` (``clipmoe status``) skips the checks that read the data."""
    if check:
        validate_run(cfg, run_dir, fork)
    elif not fork and os.path.exists(run_dir):
        _refuse_changed_config(run_dir, cfg)
    done = Pipeline(cfg, run_dir).status() if os.path.exists(run_dir) else {}
    if fork:
        if os.path.exists(fork):
            raise ConfigError(f"cannot fork into {fork}: it exists")
        reuse, changed = _reusable(run_dir, cfg)
        done = {task: ok and task in reuse for task, ok in done.items()}
        print(f"fork of {run_dir} (changed: {', '.join(sorted(changed)) or 'nothing'})")
        run_dir = fork
    print(f"run directory: {run_dir}")
    print(
        f"base model: {cfg.base_model}; {cfg.moe.experts} experts (top-{cfg.moe.top_k}) = base FFN + "
        f"{cfg.stages} MCL stage(s)"
    )
    try:
        params = phase_parameters(cfg)
    except (OSError, ValueError) as e:
        params = {}
        print(f"(parameter counts unavailable: {e})")
    for phase, counts in params.items():
        print(
            f"  {phase:<18} trainable {counts['trainable']:>13,}  total {counts['total']:>13,}  "
            f"active {counts['active']:>13,}"
        )
    for task in Pipeline(cfg, run_dir).status():
        mark = ("reused" if fork else "done") if done.get(task) else "todo"
        print(f"  [{mark}] {task}")
    steps = f"{cfg.mcl.steps} steps" if cfg.mcl.steps else f"{cfg.mcl.epochs} epoch(s)"
    print(
        f"MCL stages: {steps} each, global batch {cfg.mcl.batch_size}, lr {cfg.mcl.lr}; routing: "
        f"{cfg.route.steps or cfg.route.epochs} {'steps' if cfg.route.steps else 'epoch(s)'}, lr {cfg.route.lr}"
    )
    for rule in cfg.baselines.budgets:
        print(f"baselines under '{BUDGETS[rule].label}': {BUDGETS[rule].rule}")
    if params:
        print("report rows (trainable parameters over all their phases):")
        for row in rows(Pipeline(cfg, run_dir)):
            print(f"  {row.name:<32} {row.trainable(params, cfg):>13,}")
