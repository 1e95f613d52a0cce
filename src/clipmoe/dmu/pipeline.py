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
import math
import os
import shutil
import time
from dataclasses import replace

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from ..data.collate import ClipCollator
from ..data.readers import open_dataset
from ..formats.hub import ModelNotCachedError, ModelNotFoundError, model_config_path
from ..formats.load import load
from ..model.modeling import ClipMoeModel
from ..model.stretch import stretch_text_positions
from ..model.surgery import assemble_moe, init_routers
from ..train.distributed import DistEnv, full_state_dict, on_main
from ..train.loop import CHECKPOINT, Distillation, train
from ..utils import interrupt
from ..utils.io import atomic_file, write_json
from ..utils.lock import lock_folder
from .baselines import BaselineRun, Row, baseline_runs, check_baselines, rows, set_expert_dropout
from .budgets import BUDGETS
from .centroids import router_centroids
from .cluster import cluster_features, write_cluster_outputs
from .config import ConfigError, PipelineConfig, TrainConfig, config_from_dict, diff_configs, load_config
from .embed import FeatureStore, embed_dataset
from .identity import check_identity, dataset_identity, write_identity
from .report import evaluate_row, phase_parameters, write_report
from .stages import STAGE_BY_NAME, Stage, plan


class Stopped(KeyboardInterrupt):
    """Ctrl-C during a task; ``where`` says which task and training step (the CLI prints it in one line)."""

    def __init__(self, where: str) -> None:
        super().__init__(where)
        self.where = where


class Pipeline:
    """The work of each stage of one DMU run (see ``stages.STAGES``); each returns at once when already done."""

    def __init__(self, cfg: PipelineConfig, run_dir: str, env: DistEnv | None = None) -> None:
        self.cfg, self.run_dir = cfg, os.path.abspath(run_dir)
        self.env = env or DistEnv()
        self._dataset, self._identity = None, None
        self.log = _log if self.env.is_main else (lambda *a, **k: None)
        self._phase: tuple[str, int, int] | None = None  # the training phase under way: (name, step, steps)
        self._eta: _Eta | None = None  # set by run(): the work left, for the estimate printed after a few steps

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
            dataset = open_dataset(d.train, **d.reader_options())
            identity = dataset_identity(dataset)
            if os.path.isdir(self.run_dir):
                check_identity(self.run_dir, identity)
            self._dataset, self._identity = dataset, identity
        return self._dataset

    def record_data(self, folder: str) -> None:
        """Record the training set's identity in a stage's folder before the stage reads it."""
        self.dataset()
        on_main(lambda: write_identity(folder, self._identity), self.env)

    def load(self, path: str) -> ClipMoeModel:
        with hf_bars_off():
            model = load(path, device=self.env.device)
        model.set_moe_dispatch(self.cfg.moe.dispatch)  # a run-time choice: saved models do not carry it
        return model

    def save(self, model: ClipMoeModel, path: str) -> None:
        state = full_state_dict(model, self.env)  # collective when FSDP left the model sharded; else None

        def write() -> None:
            refuse_nonfinite(state if state is not None else model.state_dict(), path)
            with hf_bars_off():
                model.save_pretrained(path, **({"state_dict": state} if state is not None else {}))

        on_main(write, self.env)  # a refusal or a failed write on rank 0 raises on every rank, none waits

    def train(self, model: ClipMoeModel, tcfg: TrainConfig, folder: str, desc: str, labels=None) -> dict:
        """One training phase on the run's training set (the one loop every phase uses). With
        ``distill_weight`` > 0 the frozen base (stage 0) and ``distill_data``'s images join it."""
        collate = ClipCollator(model.tokenizer, model.image_processor)
        self.record_data(folder)
        if os.path.exists(os.path.join(folder, CHECKPOINT)):
            self.log(f"{desc}: resuming from its last checkpoint")
        start = time.perf_counter()

        def on_step(step: int, steps: int) -> None:
            self._phase = (desc, step, steps)
            if self._eta is not None:
                self._eta.observe(desc, step, steps, tcfg.batch_size, time.perf_counter() - start, self.log)

        distill = None
        if tcfg.distill_weight:
            d = self.cfg.data
            images = open_dataset(tcfg.distill_data, max_skipped_fraction=d.max_skipped_fraction)
            distill = Distillation(self.load(self.stage_model(0)), images, collate)
        self._phase = (desc, 0, 0)
        stats = train(
            model,
            self.dataset(),
            collate,
            tcfg,
            folder,
            self.env,
            labels=labels,
            desc=desc,
            on_step=on_step,
            distill=distill,
        )
        self._phase = None
        return stats

    def training_work(self, tcfg: TrainConfig) -> float:
        """A phase's work for the estimate, in sample passes (a training sample counts 3: forward and backward)."""
        n = len(self.dataset())
        steps = tcfg.steps or math.ceil(tcfg.epochs * math.ceil(n / tcfg.batch_size))
        return 3.0 * steps * tcfg.batch_size

    def baseline_work(self, run_id: str) -> float:
        """Rough: each of a baseline's training phases costs one pass over the data, or under a rule that
        matches DMU's phases, as much as all of them."""
        run = self.baseline_run(run_id)
        if not run.baseline.trains:
            return 0.0
        dmu = self.training_work(self.cfg.mcl) * self.cfg.stages + self.training_work(self.cfg.route)
        per_phase = dmu if run.rule and BUDGETS[run.rule].needs_dmu else 3.0 * len(self.dataset())
        return per_phase * len(run.baseline.curves)

    def _timed(self, name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        seconds = round(time.perf_counter() - t0, 2)

        def write() -> None:
            path = self.timings_path
            timings = json.load(open(path)) if os.path.exists(path) else {}
            timings.setdefault(name, seconds)
            write_json(path, timings)

        on_main(write, self.env)
        return out

    def _write_stats(self, path: str, stats: dict) -> None:
        if stats["skipped_samples"]:
            self.log(f"{len(stats['skipped_samples'])} unreadable samples were masked out; see {path}")
        on_main(lambda: write_json(path, stats), self.env)

    # ---------------------------------------------------------------- stages (registered in stages.py)
    def prepare(self) -> str:
        """Stage 0: the base model, optionally with stretched text positions, saved into the run."""
        out = self.out("prepare", None, "model")
        if os.path.exists(out):
            return out
        with hf_bars_off():
            model = load(self.cfg.base_model)  # a path, builtin: or hub id (formats/hub.py)
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

            def kmeans() -> None:  # on rank 0; its error (k-means, a failed write) raises on every rank
                labels = cluster_features(
                    store, c.image_clusters, c.text_clusters, previous, self.cfg.seed + s, niter=c.niter
                )
                stats = write_cluster_outputs(folder, labels, f"after stage {s}")
                self.log(
                    f"stage {s}: {stats['clusters']} accumulated clusters, largest {stats['largest']}, "
                    f"smallest {stats['smallest']}"
                )

            on_main(kmeans, self.env)
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
        for row in tqdm(self.rows(), desc="evaluate", unit="model", disable=not self.env.is_main):
            out = os.path.join(self.out("report", None, "eval"), row.slug + ".json")
            if not os.path.exists(out):  # evaluated on rank 0; its error raises on every rank
                self._phase = (f"evaluate {row.name}", 0, 0)
                on_main(lambda row=row, out=out: write_json(out, self._evaluate_row(row)), self.env)
            results[row.name] = json.load(open(out))
        self._phase = None
        return results

    def _evaluate_row(self, row: Row) -> dict:
        return evaluate_row(self.load(row.path), self.cfg, row.name)

    def results(self) -> dict[str, dict]:
        """The evaluation results of every row (after ``evaluate``)."""
        folder = self.out("report", None, "eval")
        return {row.name: json.load(open(os.path.join(folder, row.slug + ".json"))) for row in self.rows()}

    def report(self) -> str:
        results = self.evaluate()
        path = self.out("report", None, "report")
        folder = self.out("report", None, "eval")
        evals = [os.path.join(folder, row.slug + ".json") for row in self.rows()]
        if os.path.exists(path) and all(os.path.getmtime(e) <= os.path.getmtime(path) for e in evals):
            return path  # up to date: a rerun does not redraw every plot (delete report.md to force it)
        on_main(lambda: write_report(self, results, path), self.env)
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
        """One task, timed into timings.json. Ctrl-C becomes ``Stopped``, saying where (task and step)."""
        task = stage.task(instance)
        try:
            interrupt.check()
            return self._timed(task, lambda: stage.run(self, instance))
        except Stopped:
            raise
        except KeyboardInterrupt:
            raise Stopped(self._where(task)) from None

    def _where(self, task: str) -> str:
        if self._phase is None:
            return task
        name, step, steps = self._phase
        if not steps:
            return f"{task} ({name})"
        return f"{task} ({name}) step {step} of {steps}"

    def run(self) -> str:
        self.check_data()
        tasks = self.tasks()
        done = self.status()
        work = {stage.task(i): 0.0 if done[stage.task(i)] else stage.work(self, i) for stage, i in tasks}
        self._eta = _Eta(work)
        todo = [t for t, ok in done.items() if not ok]
        self.log(
            f"plan: {len(tasks)} tasks, {len(tasks) - len(todo)} already done; to do: {', '.join(todo) or 'nothing'}"
        )
        if todo:
            self.log(
                f"  about {sum(work.values()) / 1e3:,.0f}k sample passes of embedding and training (a training "
                "sample counts 3); a time estimate follows the first training steps"
            )
        out = None
        for stage, instance in tasks:
            out = self.run_stage(stage, instance)
            self._eta.finish(stage.task(instance))
        return out

    def artifacts(self) -> dict[str, str]:
        """What a finished run leaves for a person: the final model, the report, the plots."""
        return {
            "model": self.out("route", None, "model"),
            "report": self.out("report", None, "report"),
            "plots": self.out("report", None, "plots"),
        }

    def summary(self) -> str:
        """The end of a run, in words: where the final model, the report and the plots are."""
        a = self.artifacts()
        plots = [f for f in os.listdir(a["plots"]) if f.endswith(".png")] if os.path.isdir(a["plots"]) else []
        lines = {
            "final model (DMU CLIP-MoE)": a["model"],
            "report": a["report"],
            f"plots ({len(plots)} PNG files)": a["plots"],
        }
        width = max(map(len, lines)) + 1
        return "\n".join(f"{f'{name}:':<{width}} {path}" for name, path in lines.items())

    def status(self) -> dict[str, bool]:
        """Task name -> finished, for every task of the run (from each stage's done-check)."""
        return {s.task(i): os.path.exists(self.path(s.done_path(i))) for s, i in self.tasks()}


def _log(*parts) -> None:
    """print, but below the progress bar under way instead of through it."""
    tqdm.write(" ".join(str(p) for p in parts))


class _Eta:
    """The run's remaining work (sample passes per task) and, after the first few steps of each training phase,
    an estimate of the time left from the throughput measured on those steps (so it is refreshed phase by phase:
    MoE phases cost more per sample than the MCL stages' dense ones)."""

    MEASURED_STEPS = 5  # after the first step (which pays for warm-up)

    def __init__(self, work: dict[str, float]) -> None:
        self.work, self.finished, self.printed = work, set(), set()
        self.first: tuple[str, int, float] | None = None  # (phase, step, seconds) where the measurement starts

    def finish(self, task: str) -> None:
        self.finished.add(task)

    def observe(self, phase: str, step: int, steps: int, batch: int, elapsed: float, log) -> None:
        if phase in self.printed:
            return
        if self.first is None or self.first[0] != phase:
            self.first = (phase, step, elapsed)
            return
        _, first_step, first_time = self.first
        measured = step - first_step
        if measured < self.MEASURED_STEPS and step < steps:
            return
        per_pass = (elapsed - first_time) / (3.0 * batch * measured)
        left = sum(w for t, w in self.work.items() if t not in self.finished) - 3.0 * batch * step
        self.printed.add(phase)
        log(
            f"estimate: about {_duration(max(left, 0.0) * per_pass)} of embedding and training left, then the "
            f"report's evaluation (its bar shows its own time) (rough: {(elapsed - first_time) / measured:.2f} s/step "
            f"measured on {phase}, scaled by sample passes)"
        )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@contextlib.contextmanager
def hf_bars_off():
    """transformers' own progress bars ("Loading weights", "Writing model shards") off while we load or save:
    the run shows one bar per phase."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


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


def base_model_unavailable(cfg: PipelineConfig) -> str | None:
    """Why the base model's config cannot be read now: a hub id neither in the HF cache nor downloadable
    (offline, no network). None when it can (a local path, a builtin, a cached or downloadable id)."""
    try:
        model_config_path(cfg.base_model)
    except ModelNotCachedError as e:
        return str(e)
    except ModelNotFoundError:  # no such path or repo: config validation names it (status only counts fewer)
        pass
    return None


def validate_run(
    cfg: PipelineConfig, run_dir: str, fork: str | None = None, env: DistEnv | None = None, dry_run: bool = False
) -> Pipeline:
    """Every check a run makes before it writes anything; ``clipmoe run`` and ``--dry-run`` both call it.

    The config against the run directory's snapshot (or the fork's source and target), the device, the base
    model, and the config against the data (``Pipeline.check_data``). Returns the pipeline over the directory
    the run writes (the fork's with ``fork``); raises ``ConfigError`` (a ``ValueError``) listing the problems.
    A base model that is a hub id whose config is not cached and cannot be downloaded now is a refusal for a
    run; ``dry_run`` lets it pass (``print_plan`` says it would be downloaded)."""
    if fork:
        if os.path.exists(fork):
            raise ConfigError(f"cannot fork into {fork}: it exists")
        if not os.path.exists(os.path.join(run_dir, "config.yaml")):
            raise ConfigError(f"cannot fork {run_dir}: it is not a run directory (no config.yaml)")
    elif os.path.exists(os.path.join(run_dir, "config.yaml")):
        _refuse_changed_config(run_dir, cfg)
    check_device(cfg.device)
    check_baselines(cfg)
    unavailable = None if dry_run else base_model_unavailable(cfg)
    if unavailable:
        raise ConfigError(f"base_model: {unavailable}")
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

    def bind() -> None:  # validation passed: from here on the run directory is written
        if fork:
            _fork(run_dir, fork, cfg)
        lock_folder(pipe.run_dir)  # one run per directory, for the life of this (main) process
        snapshot = pipe.path("config.yaml")
        if not os.path.exists(snapshot):
            with atomic_file(snapshot) as f:
                yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)

    on_main(bind, pipe.env)  # a locked run directory on rank 0 refuses on every rank, none waits
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
        validate_run(cfg, run_dir, fork, dry_run=True)
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
    unavailable = base_model_unavailable(cfg)
    params = {}
    if unavailable:  # a dry run or status (a run refuses in validate_run)
        print(f"would download {cfg.base_model} (config not cached; layers checked at run time)")
        print(f"  ({unavailable})")
    else:
        try:
            params = phase_parameters(cfg)
        except (OSError, ValueError) as e:
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
