"""The DMU pipeline end to end, as resumable stages over one run directory.

    prepare -> [embed(s) -> cluster(s) -> mcl(s+1)] for s < N-1 -> build -> route -> baselines -> eval -> report

Every stage writes its outputs atomically and is skipped when they exist, so ``clipmoe run CONFIG`` can be
rerun after any interruption: finished stages are skipped and an unfinished training phase resumes from its
last checkpoint. The run directory holds the config snapshot; a changed config is refused (naming the
differing keys) unless the user forks into a new run directory.

Layout of a run directory::

    config.yaml                    snapshot of the validated config
    base/                          the prepared base model (stage 0)
    stage{s}/embed/                features of the training set under the stage-s model
    stage{s}/cluster/              accumulated pseudo-labels after stage s, sizes, histogram
    stage{s}/train/, stage{s}/model/   MCL stage s (s >= 1): checkpoint + metrics, final model folder
    moe/init/, moe/train/, moe/model/  assembled CLIP-MoE, router training, final CLIP-MoE
    baselines/{dense,upcycle,soup}/    the paper's baselines at equal budget
    eval/{row}.json, report.md, plots/
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import torch
import yaml

from . import checkpoint
from .assets import resolve_model_path
from .cluster import cluster_features, write_cluster_outputs
from .config import ConfigError, PipelineConfig, diff_configs, load_config
from .distributed import DistEnv, barrier, full_state_dict, init_distributed, shutdown_distributed
from .embed import FeatureStore, embed_dataset
from .modeling import ClipMoeModel
from .surgery import find_ffns, sparse_upcycle, upcycle
from .train import TrainConfig, train

STATS = "train_stats.json"


class Pipeline:
    """Stages of one DMU run. Each public method is one stage and returns quickly when already done."""

    def __init__(self, cfg: PipelineConfig, run_dir: str, env: DistEnv | None = None) -> None:
        self.cfg, self.run_dir = cfg, os.path.abspath(run_dir)
        self.env = env or DistEnv()
        self._dataset = None
        self.log = print if self.env.is_main else (lambda *a, **k: None)

    # ---------------------------------------------------------------- helpers
    def path(self, *parts: str) -> str:
        return os.path.join(self.run_dir, *parts)

    def dataset(self):
        if self._dataset is None:
            from .data.readers import open_dataset

            d = self.cfg.data
            self._dataset = open_dataset(
                d.train, d.format, caption=d.caption, root=d.root, max_skipped_fraction=d.max_skipped_fraction
            )
        return self._dataset

    def collate(self, model: ClipMoeModel):
        from .data.collate import ClipCollator

        return ClipCollator(model.tokenizer, model.image_processor)

    def load(self, path: str) -> ClipMoeModel:
        model = checkpoint.load(path, device=self.env.device)
        model.set_moe_dispatch(self.cfg.moe.dispatch)  # a run-time choice: saved models do not carry it
        return model

    def _save(self, model: ClipMoeModel, path: str) -> None:
        state = full_state_dict(model, self.env)  # collective when FSDP left the model sharded; else None
        if self.env.is_main:
            model.save_pretrained(path, **({"state_dict": state} if state is not None else {}))
        barrier(self.env)

    def _timed(self, name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        if self.env.is_main:
            path = self.path("timings.json")
            timings = json.load(open(path)) if os.path.exists(path) else {}
            timings.setdefault(name, round(time.perf_counter() - t0, 2))
            with open(path, "w") as f:
                json.dump(timings, f, indent=1)
        return out

    # ---------------------------------------------------------------- stages
    def prepare(self) -> str:
        """Stage 0: the base model, optionally with stretched text positions, saved into the run."""
        out = self.path("base")
        if os.path.exists(out):
            return out
        model = checkpoint.load(resolve_model_path(self.cfg.base_model))
        for attr in ("tokenizer", "image_processor"):
            if getattr(model, attr, None) is None:
                raise ValueError(
                    f"the base model has no {attr}; give it a folder with tokenizer and preprocessor files"
                )
        if model.moe_layers():
            raise ValueError("the base model is already a CLIP-MoE; DMU starts from a dense CLIP")
        p = self.cfg.prepare
        if p.stretch_text_positions:
            from .prepare import stretch_text_positions

            stretch_text_positions(model, p.keep_positions, p.stretch_factor)
        self._save(model, out)
        return out

    def stage_model(self, s: int) -> str:
        return self.path("base") if s == 0 else self.path(f"stage{s}", "model")

    def embed(self, s: int) -> FeatureStore:
        folder = self.path(f"stage{s}", "embed")
        if os.path.exists(os.path.join(folder, "DONE")):
            return FeatureStore.open(folder)
        model = self.load(self.stage_model(s))
        return embed_dataset(
            model,
            self.dataset(),
            self.collate(model),
            folder,
            self.env,
            self.cfg.embed.batch_size,
            self.cfg.embed.chunk_size,
            self.cfg.data.num_workers,
            self.cfg.precision,
            desc=f"embed stage {s}",
        )

    def cluster(self, s: int) -> np.ndarray:
        folder = self.path(f"stage{s}", "cluster")
        labels_path = os.path.join(folder, "labels.npy")
        if not os.path.exists(labels_path):
            store = self.embed(s)
            previous = self.cluster(s - 1) if s > 0 else None
            c = self.cfg.cluster
            if self.env.is_main:
                labels = cluster_features(store, c.image_clusters, c.text_clusters, previous, self.cfg.seed + s)
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
        tcfg = _with_seed(self.cfg.mcl, self.cfg.seed + s, self.cfg.precision)
        stats = train(
            model,
            self.dataset(),
            self.collate(model),
            tcfg,
            self.path(f"stage{s}", "train"),
            self.env,
            labels=labels,
            desc=f"mcl stage {s}",
        )
        self._write_stats(self.path(f"stage{s}", STATS), stats)
        self._save(model, out)
        return out

    def build(self) -> str:
        """Assemble the CLIP-MoE: expert e of every chosen block is the FFN of MCL stage e."""
        out = self.path("moe", "init")
        if os.path.exists(out):
            return out
        experts = [self.mcl(s) if s else self.stage_model(0) for s in range(self.cfg.moe.experts)]
        base = self.load(experts[0])
        models = [base] + [self.load(p) for p in experts[1:]]
        m = self.cfg.moe
        torch.manual_seed(self.cfg.seed)  # router init
        moe = upcycle(base, models, m.top_k, _layers(m.layers), m.expert_dropout, m.dispatch)
        self._save(moe, out)
        return out

    def route(self) -> str:
        """Router training on the whole training set (random batches)."""
        out = self.path("moe", "model")
        if os.path.exists(out):
            return out
        model = self.load(self.build())
        tcfg = _with_seed(self.cfg.route, self.cfg.seed, self.cfg.precision)
        stats = train(
            model, self.dataset(), self.collate(model), tcfg, self.path("moe", "train"), self.env, desc="route"
        )
        self._write_stats(self.path("moe", STATS), stats)
        _set_expert_dropout(model, 0.0)  # dropout is a training device; the saved model runs without it
        self._save(model, out)
        return out

    def budget_steps(self) -> int:
        """Optimizer steps spent by DMU (all MCL stages + routing): the baselines get the same."""
        total = 0
        for s in range(1, self.cfg.moe.experts):
            total += json.load(open(self.path(f"stage{s}", STATS)))["steps"]
        return total + json.load(open(self.path("moe", STATS)))["steps"]

    def baseline_dense(self) -> str:
        out = self.path("baselines", "dense", "model")
        if os.path.exists(out):
            return out
        model = self.load(self.stage_model(0))
        tcfg = _with_seed(self.cfg.mcl, self.cfg.seed, self.cfg.precision, steps=self.budget_steps(), trainable="all")
        train(
            model,
            self.dataset(),
            self.collate(model),
            tcfg,
            self.path("baselines", "dense", "train"),
            self.env,
            desc="dense fine-tune",
        )
        self._save(model, out)
        return out

    def baseline_upcycle(self) -> str:
        out = self.path("baselines", "upcycle", "model")
        if os.path.exists(out):
            return out
        base = self.load(self.stage_model(0))
        m, b = self.cfg.moe, self.cfg.baselines
        torch.manual_seed(self.cfg.seed)
        model = sparse_upcycle(
            base,
            m.experts,
            m.top_k,
            _layers(m.layers),
            b.upcycle_noise,
            m.expert_dropout,
            m.dispatch,
            seed=self.cfg.seed,
        )
        tcfg = _with_seed(
            self.cfg.route,
            self.cfg.seed,
            self.cfg.precision,
            steps=self.budget_steps(),
            trainable=b.upcycle_trainable,
            lr=self.cfg.mcl.lr,  # experts learn at the MCL stages' rate, routers at the routing rate
            router_lr=self.cfg.route.lr,
        )
        train(
            model,
            self.dataset(),
            self.collate(model),
            tcfg,
            self.path("baselines", "upcycle", "train"),
            self.env,
            desc="sparse upcycling",
        )
        _set_expert_dropout(model, 0.0)
        self._save(model, out)
        return out

    def baseline_soup(self) -> str:
        """Expert soup: the MCL stages' FFNs averaged into one dense model."""
        out = self.path("baselines", "soup", "model")
        if os.path.exists(out):
            return out
        paths = [self.stage_model(s) for s in range(self.cfg.moe.experts)]
        soup = self.load(paths[0])
        states = [self.load(p).state_dict() for p in paths[1:]]
        with torch.no_grad():
            for tower_ffns in find_ffns(soup).values():
                for f in tower_ffns:
                    for name, p in f.module.named_parameters():
                        key = f"{f.path}.{name}"
                        p.copy_(torch.stack([p] + [s[key] for s in states]).mean(0))
        self._save(soup, out)
        return out

    def rows(self) -> dict[str, str]:
        """The models the report compares, in table order."""
        b = self.cfg.baselines
        rows = {"base": self.stage_model(0)}
        if b.stages:
            rows.update({f"MCL stage {s}": self.stage_model(s) for s in range(1, self.cfg.moe.experts)})
        if b.dense:
            rows["dense fine-tune"] = self.path("baselines", "dense", "model")
        if b.upcycle:
            rows["sparse upcycling"] = self.path("baselines", "upcycle", "model")
        if b.soup:
            rows["expert soup"] = self.path("baselines", "soup", "model")
        rows["DMU CLIP-MoE"] = self.path("moe", "model")
        return rows

    def baselines(self) -> None:
        b = self.cfg.baselines
        if b.dense:
            self._timed("baseline dense", self.baseline_dense)
        if b.upcycle:
            self._timed("baseline upcycle", self.baseline_upcycle)
        if b.soup:
            self._timed("baseline soup", self.baseline_soup)

    def evaluate(self) -> dict[str, dict]:
        from .report import evaluate_row

        results = {}
        for name, path in self.rows().items():
            out = self.path("eval", row_slug(name) + ".json")
            if not os.path.exists(out) and self.env.is_main:
                result = evaluate_row(self.load(path), self.cfg, name)
                os.makedirs(os.path.dirname(out), exist_ok=True)
                _write_json(out, result)
            barrier(self.env)
            results[name] = json.load(open(out))
        return results

    def results(self) -> dict[str, dict]:
        """The evaluation results of every row (after ``evaluate``)."""
        return {name: json.load(open(self.path("eval", row_slug(name) + ".json"))) for name in self.rows()}

    def report(self) -> str:
        from .report import write_report

        results = self.evaluate()
        path = self.path("report.md")
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
        if errors:
            raise ConfigError(f"{len(errors)} problem(s) with this config and data:\n  - " + "\n  - ".join(errors))

    def run(self) -> str:
        self.check_data()
        self._timed("prepare", self.prepare)
        for s in range(1, self.cfg.moe.experts):
            self._timed(f"embed {s - 1}", lambda s=s: self.embed(s - 1))
            self._timed(f"cluster {s - 1}", lambda s=s: self.cluster(s - 1))
            self._timed(f"mcl {s}", lambda s=s: self.mcl(s))
        self._timed("build", self.build)
        self._timed("route", self.route)
        self.baselines()
        return self._timed("eval + report", self.report)

    def _write_stats(self, path: str, stats: dict) -> None:
        if self.env.is_main:
            if stats["skipped_samples"]:
                self.log(f"{len(stats['skipped_samples'])} unreadable samples were masked out; see {path}")
            _write_json(path, stats)

    # ---------------------------------------------------------------- planning
    def status(self) -> dict[str, bool]:
        done = {"prepare": os.path.exists(self.path("base"))}
        for s in range(1, self.cfg.moe.experts):
            done[f"embed {s - 1}"] = os.path.exists(self.path(f"stage{s - 1}", "embed", "DONE"))
            done[f"cluster {s - 1}"] = os.path.exists(self.path(f"stage{s - 1}", "cluster", "labels.npy"))
            done[f"mcl {s}"] = os.path.exists(self.stage_model(s))
        done["build"] = os.path.exists(self.path("moe", "init"))
        done["route"] = os.path.exists(self.path("moe", "model"))
        for name in ("dense", "upcycle", "soup"):
            if getattr(self.cfg.baselines, name):
                done[f"baseline {name}"] = os.path.exists(self.path("baselines", name, "model"))
        done["report"] = os.path.exists(self.path("report.md"))
        return done


def _with_seed(cfg: TrainConfig, seed: int, precision: str, **overrides) -> TrainConfig:
    from dataclasses import replace

    return replace(cfg, seed=seed, precision=precision, **overrides)


def _layers(layers):
    return layers if not isinstance(layers, list) else [int(i) for i in layers]


def _set_expert_dropout(model: ClipMoeModel, p: float) -> None:
    for m in model.moe_layers():
        m.expert_dropout.p = p
    if model.config.moe:
        model.config.moe = {**model.config.moe, "expert_dropout": p}


def row_slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


# -------------------------------------------------------------------- run directory


def open_run(config_path: str, run_dir: str | None = None, fork: str | None = None) -> tuple[PipelineConfig, str]:
    """Validate the config and bind it to its run directory (snapshot; refuse a changed config)."""
    cfg = load_config(config_path)
    run_dir = run_dir or os.path.splitext(config_path)[0] + "-run"
    if fork:
        _fork(run_dir, fork, cfg)
        run_dir = fork
    snapshot = os.path.join(run_dir, "config.yaml")
    if os.path.exists(snapshot):
        _refuse_changed_config(run_dir, cfg)
    else:
        os.makedirs(run_dir, exist_ok=True)
        with open(snapshot, "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    return cfg, run_dir


def _changed_keys(run_dir: str, cfg: PipelineConfig) -> list[str]:
    """Config keys that differ from the run directory's snapshot (none if it has no snapshot yet)."""
    snapshot = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(snapshot):
        return []
    with open(snapshot) as f:
        return diff_configs(yaml.safe_load(f), cfg.to_dict())


def _refuse_changed_config(run_dir: str, cfg: PipelineConfig) -> None:
    changed = _changed_keys(run_dir, cfg)
    if changed:
        raise ConfigError(
            f"{run_dir} was started with a different config; changed keys: {', '.join(changed)}. "
            f"Use the old config to resume, or --fork NEW_RUN_DIR to start a new run that reuses what is unchanged."
        )


# What each stage's outputs depend on: a fork reuses a finished stage only if none of these changed.
_STAGE_INPUTS = {
    "base": ["base_model", "prepare"],
    "stage0": ["base_model", "prepare", "data", "seed", "precision", "embed", "cluster"],
    "stage": ["base_model", "prepare", "data", "seed", "precision", "embed", "cluster", "mcl"],
    "moe": ["base_model", "prepare", "data", "seed", "precision", "embed", "cluster", "mcl", "moe", "route"],
}


def _reusable(src: str, cfg: PipelineConfig) -> tuple[list[str], set[str]]:
    """The top-level entries of run ``src`` that a fork with ``cfg`` reuses, and the changed config sections."""
    if not os.path.exists(os.path.join(src, "config.yaml")):
        raise ConfigError(f"cannot fork {src}: it is not a run directory (no config.yaml)")
    changed = {k.split(".")[0] for k in _changed_keys(src, cfg)}
    reuse = []
    for name in sorted(os.listdir(src)):
        kind = "stage" if name.startswith("stage") and name != "stage0" else name
        inputs = _STAGE_INPUTS.get(kind)
        if inputs is not None and not changed & set(inputs):
            reuse.append(name)
    return reuse, changed


def _fork(src: str, dst: str, cfg: PipelineConfig) -> None:
    if os.path.exists(dst):
        raise ConfigError(f"cannot fork into {dst}: it exists")
    reuse, changed = _reusable(src, cfg)
    os.makedirs(dst)
    for name in reuse:
        shutil.copytree(os.path.join(src, name), os.path.join(dst, name), symlinks=True)
    print(f"forked {src} -> {dst}; reused: {', '.join(reuse) or 'nothing'} (changed: {', '.join(sorted(changed))})")


# -------------------------------------------------------------------- command line

CLI_RUN_HELP = "Run the whole DMU pipeline from a config file (skips finished stages, resumes the rest)."


def add_run_arguments(p) -> None:
    p.add_argument("config", help="pipeline YAML")
    p.add_argument("--run-dir", help="run directory (default: CONFIG without extension + '-run')")
    p.add_argument("--fork", metavar="NEW_RUN_DIR", help="start a new run reusing the unchanged finished stages")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan; do nothing")


def _open(args) -> Pipeline:
    if getattr(args, "dry_run", False):
        cfg = load_config(args.config)
        run_dir = args.run_dir or os.path.splitext(args.config)[0] + "-run"
        print_plan(cfg, run_dir, getattr(args, "fork", None))
        return None
    cfg, run_dir = open_run(args.config, args.run_dir, getattr(args, "fork", None))
    return Pipeline(cfg, run_dir, init_distributed(cfg.device))


def run_run(args) -> None:
    pipe = _open(args)
    if pipe is not None:
        report = pipe.run()
        pipe.log(f"report: {report}")
        shutdown_distributed(pipe.env)


def print_plan(cfg: PipelineConfig, run_dir: str, fork: str | None = None) -> None:
    """What ``clipmoe run`` would do, writing nothing: it refuses here what the run would refuse."""
    from .report import phase_parameters

    done = Pipeline(cfg, run_dir).status() if os.path.exists(run_dir) else {}
    if fork:
        if os.path.exists(fork):
            raise ConfigError(f"cannot fork into {fork}: it exists")
        reuse, changed = _reusable(run_dir, cfg)
        done = {name: ok and _stage_entry(name) in reuse for name, ok in done.items()}
        print(f"fork of {run_dir} (changed: {', '.join(sorted(changed)) or 'nothing'})")
        run_dir = fork
    elif os.path.exists(run_dir):
        _refuse_changed_config(run_dir, cfg)
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
    stages = ["prepare"] + [
        x for s in range(1, cfg.moe.experts) for x in (f"embed {s - 1}", f"cluster {s - 1}", f"mcl {s}")
    ]
    stages += ["build", "route"] + [f"baseline {n}" for n in ("dense", "upcycle", "soup") if getattr(cfg.baselines, n)]
    stages += ["report"]
    for name in stages:
        mark = ("reused" if fork else "done") if done.get(name) else "todo"
        print(f"  [{mark}] {name}")
    steps = f"{cfg.mcl.steps} steps" if cfg.mcl.steps else f"{cfg.mcl.epochs} epoch(s)"
    print(
        f"MCL stages: {steps} each, global batch {cfg.mcl.batch_size}, lr {cfg.mcl.lr}; routing: "
        f"{cfg.route.steps or cfg.route.epochs} {'steps' if cfg.route.steps else 'epoch(s)'}, lr {cfg.route.lr}; "
        "baselines: the same number of optimizer steps as all MCL stages + routing"
    )


def _stage_entry(stage: str) -> str:
    """The top-level run-directory entry a stage of ``Pipeline.status`` writes."""
    kind, _, number = stage.partition(" ")
    if kind == "prepare":
        return "base"
    if kind in ("embed", "cluster", "mcl"):
        return f"stage{number}"
    return {"build": "moe", "route": "moe", "baseline": "baselines"}.get(kind, "report.md")


def _stage_command(name: str, needs_stage: bool, doc: str):
    def add(p) -> None:
        p.add_argument("config", help="pipeline YAML")
        p.add_argument("--run-dir", help="run directory (default: CONFIG without extension + '-run')")
        if needs_stage:
            p.add_argument("--stage", type=int, required=True, help="stage number")

    def run(args) -> None:
        pipe = _open(args)
        fn = getattr(pipe, name)
        result = fn(args.stage) if needs_stage else fn()
        pipe.log(result)
        shutdown_distributed(pipe.env)

    return add, run, doc


for _name, _needs, _doc in [
    ("prepare", False, "Stage 0: the base model (optionally with stretched text positions) into the run."),
    ("embed", True, "Embed the training set with the stage-S model (sharded, resumable)."),
    ("cluster", True, "k-means pseudo-labels after stage S, accumulated with earlier stages."),
    ("mcl", True, "Train MCL stage S (S >= 1): FFNs only, every global batch from one cluster."),
    ("build", False, "Assemble the CLIP-MoE from the base and the MCL stages."),
    ("route", False, "Train the routers of the assembled CLIP-MoE."),
    ("baselines", False, "Dense fine-tuning, sparse upcycling and expert soup at equal budget."),
    ("report", False, "Evaluate every model of the run and write report.md with plots."),
]:
    _add, _run, _help = _stage_command(_name, _needs, _doc)
    globals()[f"add_{_name}_arguments"], globals()[f"run_{_name}"] = _add, _run
    globals()[f"CLI_{_name.upper()}_HELP"] = _help
