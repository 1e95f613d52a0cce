"""The quality testbed (docs/quality.md): DMU against its baselines in a miniature of the paper's setting.

For each seed: a fine-tuning world (detailed captions, a narrower image distribution than the base's
pretraining corpus, broad held-out evaluation sets), then one pipeline run per recipe (``paper``, ``tuned``, and
the router-option variants of ``tuned``) from the shipped base, each with every row. Everything is resumable:
worlds are reused when complete, runs skip finished stages. The tables, verdicts and plots go to
``OUT/quality.md``.

A run trains its baselines under the testbed's rules that ``--budgets`` names (both by default; ``--budgets
epoch`` for the paper's alone). Other rules (``--budgets ... samples flops``) each train in a fork of the
(recipe, seed) run, ``runs/<recipe>-seed<s>-<rule>``, that reuses its DMU phases and trains only the baselines
under that rule; their rows join the run's in the report.

    python benchmarks/bench_quality.py [--size default|large|tiny] [--seeds 0 1 2] [--out quality-run]
"""

from __future__ import annotations

import json
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch
import yaml

from ..data.world import FINETUNE_BACKGROUNDS, FINETUNE_COLORS, WorldConfig, generate_world
from ..dmu.baselines import BASELINES
from ..dmu.budgets import BUDGETS
from ..dmu.config import config_from_dict, load_config
from ..dmu.pipeline import Pipeline, open_run
from ..dmu.report import mcl_wall_times
from ..eval.attributes import HIDDEN_ATTRIBUTES, KNOWN_ATTRIBUTES
from ..eval.suite import evaluate_suite
from ..train.distributed import init_distributed
from ..utils.io import atomic_file, write_json, write_text
from ..utils.threads import ThreadChoice, available_cores, choose_threads, load_average, thread_variables

WORLD_SEED_OFFSET = 100  # fine-tuning worlds never share a seed with the base's pretraining corpus (seed 1)
PAPER_WARMUP_FRACTION = 200 / 1500  # the paper's 200 warmup steps of a ~1,500-step phase
TESTBED_BUDGETS = ("epoch", "steps")  # a run's own rules (those asked for); other rules train in forks
# The default rows: the paper's (dense, sparse upcycling, w/o MCL), the expert soup and the two routing
# controls. The field's later recipes (clip_up, fmoe) join with baselines "all": they add about half again to a
# run's training, which the default size's time budget (docs/quality.md, "Seeds and sizes") does not hold.
DEFAULT_BASELINES = ("dense", "upcycle", "wo_mcl", "soup", "random_routers", "uniform")
# The report's heading per rule; a rule without one here is described by its dmu/budgets.py sentence.
RULE_HEADINGS = {
    "epoch": "the paper's rule: every phase sees the fine-tuning data once",
    "steps": "equal compute: baselines get all DMU phases' optimizer steps",
}


@dataclass(frozen=True)
class Size:
    train_size: int
    eval_size: int
    mmvp_pairs: int
    probe_pairs: int
    batch_size: int
    experts: int = 4


SIZES = {
    "tiny": Size(train_size=96, eval_size=24, mmvp_pairs=2, probe_pairs=2, batch_size=16, experts=3),  # tests
    "default": Size(train_size=3000, eval_size=1000, mmvp_pairs=30, probe_pairs=30, batch_size=64),
    "large": Size(train_size=50000, eval_size=2000, mmvp_pairs=30, probe_pairs=30, batch_size=64),
}

# The recipes compared (docs/quality.md, "Recipes"). Only the keys that differ between them are here.
_PAPER = {"mcl_lr": 1e-5, "router_lr": 1e-6, "small_clusters": "drop"}
_TUNED = {"mcl_lr": 3e-4, "router_lr": 1e-3, "small_clusters": "shrink"}
# Router options (docs/pipeline.md, "Router options") as variants of `tuned`: "moe" / "route" keys are set in
# those sections; "distill" trains the routers with the base-preserving term on a broad world's images. A
# variant changes only the assembly and routing, so it runs as a fork of its recipe's run that reuses the MCL
# stages and trains no baseline; its DMU model joins that run's table as the row "DMU CLIP-MoE, <row>".
RECIPES: dict[str, dict] = {
    "paper": _PAPER,
    "tuned": _TUNED,
    "tuned+centroid": {**_TUNED, "moe": {"router_init": "centroid"}, "variant_of": "tuned", "row": "centroid routers"},
    # ST-MoE's weight; CLIP-UP's is not public
    "tuned+zloss": {**_TUNED, "route": {"z_loss_weight": 1e-3}, "variant_of": "tuned", "row": "router z-loss"},
    "tuned+layer-balance": {
        **_TUNED,
        "route": {"balance_scope": "layer"},
        "variant_of": "tuned",
        "row": "per-layer balance",
    },
    "tuned+distill": {
        **_TUNED,
        "route": {"distill_weight": 1.0},
        "distill": True,
        "variant_of": "tuned",
        "row": "base-preserving routing",
    },
}
DMU_ROW = "DMU CLIP-MoE"
BROAD_SEED_OFFSET = 200  # the distillation images' world: neither the base's corpus (1) nor fine-tuning (100+)


def world_config(size: Size, seed: int) -> WorldConfig:
    return WorldConfig(
        seed=WORLD_SEED_OFFSET + seed,
        train_size=size.train_size,
        val_size=0,
        eval_size=size.eval_size,
        mmvp_pairs=size.mmvp_pairs,
        probe_pairs=size.probe_pairs,
        train_colors=FINETUNE_COLORS,
        train_backgrounds=FINETUNE_BACKGROUNDS,
    )


def _trained(baselines: str | list[str]) -> list[str]:
    """The baselines of ``baselines`` ("all" or registry keys) that train (the only ones a budget rule changes)."""
    return [b.key for b in BASELINES if b.trains and (baselines == "all" or b.key in baselines)]


def broad_world_config(size: Size, seed: int) -> WorldConfig:
    """Unlabelled images of the broad distribution (every colour and background) for the distillation term;
    a world of its own, so no evaluation image is trained on."""
    return WorldConfig(
        seed=BROAD_SEED_OFFSET + seed,
        train_size=max(size.batch_size, size.train_size // 3),
        val_size=0,
        eval_size=1,
        mmvp_pairs=1,
        probe_pairs=1,
    )


def pipeline_config(
    world: str,
    recipe: str,
    size: Size,
    seed: int,
    base_model: str,
    device: str,
    budgets: tuple[str, ...] = TESTBED_BUDGETS,
    baselines: str | list[str] | tuple[str, ...] = DEFAULT_BASELINES,
    broad: str | None = None,
) -> dict:
    """The pipeline config of one (recipe, seed) run: the paper's recipe with ``RECIPES[recipe]`` applied;
    ``baselines``: the rows of the pipeline's baseline registry to run (``baselines.enabled``). Other
    ``budgets`` than the testbed's make the config of a fork that trains only the baselines under them
    (``run_budgets`` splits a request into the run's own rules and its forks' rules).
    ``broad``: the broad world (``broad_world_config``) whose training images a ``distill`` recipe uses."""
    r = RECIPES[recipe]
    own = set(budgets) <= set(TESTBED_BUDGETS)  # the (recipe, seed) run itself, not a fork of it
    if r.get("distill") and broad is None:
        raise ValueError(f"recipe {recipe!r} distils on a broad world's images: give broad=")
    warmup = max(1, round(PAPER_WARMUP_FRACTION * math.ceil(size.train_size / size.batch_size)))
    phase = {
        "epochs": 1,
        "batch_size": size.batch_size,
        "warmup_steps": warmup,
        "label_smoothing": 0.1,
        "logit_scale": "model",  # the paper's fixed 100 is its base's own learned scale
        "checkpoint_every": 50,
        "log_every": 10,
    }
    return {
        "base_model": base_model,
        "data": {"train": os.path.join(world, "train"), "caption": "txt", "eval": os.path.join(world, "eval")},
        "seed": seed,
        "device": device,
        "cluster": {"image_clusters": 3, "text_clusters": 3},
        "mcl": {**phase, "lr": r["mcl_lr"], "weight_decay": 0.2, "small_clusters": r["small_clusters"]},
        "moe": {"experts": size.experts, "top_k": 2, "layers": "all", "expert_dropout": 0.1, **r.get("moe", {})},
        "route": {
            **phase,
            "lr": r["router_lr"],
            "weight_decay": 0.01,
            "balance_weight": 0.01,
            **r.get("route", {}),
            **({"distill_data": os.path.join(broad, "train")} if r.get("distill") else {}),
        },
        "baselines": {
            "enabled": (baselines if baselines == "all" else list(baselines)) if own else _trained(baselines),
            "stages": own,  # a fork's report need not evaluate the stages again
            "budgets": list(budgets),
        },
    }


def run_budgets(budgets: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The budget rules a (recipe, seed) run trains its baselines under (the testbed's rules asked for), and
    the rules each trained in a fork of it. A fork needs a run to reuse, so one testbed rule is required."""
    unknown = sorted(set(budgets) - set(BUDGETS))
    if unknown:
        raise ValueError(f"unknown budget rule(s) {unknown}; choose from {', '.join(BUDGETS)}")
    own = tuple(b for b in TESTBED_BUDGETS if b in budgets)
    if not own:
        raise ValueError(
            f"budgets {list(budgets)} name neither {' nor '.join(TESTBED_BUDGETS)}: every run trains its baselines "
            "under at least one of them, and the other rules train in forks of that run"
        )
    return own, tuple(b for b in BUDGETS if b in budgets and b not in TESTBED_BUDGETS)


def run_quality(
    out: str,
    size: str = "default",
    seeds: tuple[int, ...] = (0, 1, 2),
    recipes: tuple[str, ...] = ("paper", "tuned"),
    base_model: str = "builtin:tiny-clip",
    device: str = "auto",
    report_only: bool = False,
    budgets: tuple[str, ...] = TESTBED_BUDGETS,
    baselines: str | list[str] | tuple[str, ...] = DEFAULT_BASELINES,
    jobs: int = 1,
) -> str:
    """Build the worlds, run every (recipe, seed), and write ``out/quality.md``; returns its path.
    ``report_only`` writes the report from finished runs (for runs done by several processes) and trains nothing;
    ``budgets`` beyond the testbed's two train in forks of each run (see the module docstring); ``baselines``
    selects the baseline rows (keys of dmu/baselines.py's registry, or "all"); ``jobs`` > 1 trains the runs in
    that many processes at once (``default_jobs``), each seed's recipe with its variants in one."""
    recipes = _checked_recipes(size, recipes)
    run_budgets(budgets)  # refuses a request no run can hold before anything is written
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise ValueError(f"seed(s) {twice} given more than once")
    if isinstance(baselines, str) and baselines != "all":
        baselines = (baselines,)
    if baselines != "all":
        known = [b.key for b in BASELINES]
        unknown = sorted(set(baselines) - set(known))
        if unknown:
            raise ValueError(f"unknown baseline(s) {unknown}; choose from {', '.join(known)} or all")
        repeated = sorted({b for b in baselines if list(baselines).count(b) > 1})
        if repeated:
            raise ValueError(f"baseline(s) {repeated} given more than once")
    # the runs' configs name the worlds by absolute path: they resolve against their own folder (out/configs)
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{out} is a file; --out names the folder of the worlds, runs and report")
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    settings = (size, base_model, device, budgets, baselines)
    if jobs > 1 and not report_only:
        _train_in_parallel(out, seeds, recipes, settings, jobs)
        report_only = True  # every run is finished: the pass below reads them
    runs = _runs(out, seeds, recipes, settings, report_only)
    elapsed = time.perf_counter() - t0
    path = os.path.join(out, "quality.md")
    write_text(path, quality_report(runs, size, elapsed))
    print(f"quality: report {path}")
    return path


def _checked_recipes(size: str, recipes: tuple[str, ...]) -> tuple[str, ...]:
    """The recipes of a request, each variant after its parent; an unknown size or recipe, or a variant without
    its parent, is refused."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
    unknown = sorted(set(recipes) - set(RECIPES))
    if unknown:
        raise ValueError(f"unknown recipe(s) {unknown}; choose from {sorted(RECIPES)}")
    orphans = sorted(r for r in recipes if RECIPES[r].get("variant_of", r) not in recipes)
    if orphans:
        raise ValueError(f"recipe(s) {orphans} are forks of {RECIPES[orphans[0]]['variant_of']!r}: run it too")
    return tuple(sorted(recipes, key=lambda r: "variant_of" in RECIPES[r]))  # a variant after its parent


def compare_quality(
    out: str,
    reference: str,
    size: str = "default",
    seeds: tuple[int, ...] = (0, 1, 2),
    recipes: tuple[str, ...] = ("paper", "tuned"),
    budgets: tuple[str, ...] = TESTBED_BUDGETS,
) -> str:
    """Set the verdicts of the finished runs in ``out`` beside those in ``reference`` (another testbed output,
    for example the same testbed on another base; both read as ``report_only``), and write ``out/compare.md``
    (``compare_report``); returns its path."""
    recipes = _checked_recipes(size, recipes)
    # only the budgets are read: a finished run is read with its own config (base, device, baselines)
    settings = (size, "builtin:tiny-clip", "cpu", budgets, DEFAULT_BASELINES)
    read = [_runs(os.path.abspath(folder), seeds, recipes, settings, report_only=True) for folder in (reference, out)]
    path = os.path.join(out, "compare.md")
    write_text(path, compare_report(read[0], read[1], (reference, out)))
    print(f"quality: comparison {path}")
    return path


def _runs(out: str, seeds: tuple[int, ...], recipes: tuple[str, ...], settings: tuple, report_only: bool) -> dict:
    """Run (or, ``report_only``, read) every (recipe, seed) run in this process; their results by run name."""
    size, base_model, device, budgets, baselines = settings
    own, forked = run_budgets(budgets)
    s = SIZES[size]
    runs: dict = {}
    for seed in seeds:
        world, broad = _worlds(out, s, seed, recipes, generate=not report_only)
        for recipe in recipes:
            name = f"{recipe}-seed{seed}"
            print(f"quality: {name} ({len(runs) + 1} of {len(seeds) * len(recipes)})", flush=True)
            parent = RECIPES[recipe].get("variant_of")
            if parent:  # a fork of the parent's run: DMU's assembly and routing only (see RECIPES)
                config = pipeline_config(world, recipe, s, seed, base_model, device, baselines=[], broad=broad)
                config["baselines"]["stages"] = False
                host = runs[f"{parent}-seed{seed}"]
                pipe = _run(out, name, config, report_only, fork_of=host["run_dir"])
                row = f"{DMU_ROW}, {RECIPES[recipe]['row']}"
                dmu = host["results"].pop(DMU_ROW)  # stays the last row
                host["results"][row] = pipe.results()[DMU_ROW]
                host["results"][DMU_ROW] = dmu
                host.setdefault("init_routing_of", {})[row] = _init_routing(pipe)
                with open(pipe.timings_path) as f:
                    host["seconds"] += sum(json.load(f).values())
                continue
            config = pipeline_config(world, recipe, s, seed, base_model, device, own, baselines, broad)
            pipe = _run(out, name, config, report_only)
            runs[name] = {"recipe": recipe, "seed": seed, "run_dir": pipe.run_dir, "results": pipe.results()}
            forks = []
            for rule in forked:
                config = pipeline_config(world, recipe, s, seed, base_model, device, (rule,), baselines, broad)
                forks.append(_run(out, f"{name}-{rule}", config, report_only, fork_of=pipe.run_dir))
                results = runs[name]["results"]
                dmu = results.pop("DMU CLIP-MoE")  # stays the last row
                results.update({k: v for k, v in forks[-1].results().items() if row_rule(k) == rule})
                results["DMU CLIP-MoE"] = dmu
            runs[name]["init_routing"] = _init_routing(pipe)
            runs[name]["stages"] = _stage_plans(pipe)
            runs[name]["extraction"] = _extraction_times(pipe)
            runs[name]["seconds"] = 0.0
            for p in (pipe, *forks):
                with open(p.timings_path) as f:
                    runs[name]["seconds"] += sum(json.load(f).values())
    return runs


def _worlds(out: str, s: Size, seed: int, recipes: tuple[str, ...], generate: bool = True) -> tuple[str, str | None]:
    """The seed's fine-tuning world, and its broad world when a recipe distils; ``generate``: made unless
    complete (a report from finished runs makes none: their own configs name the worlds they used)."""
    world = os.path.join(out, "worlds", f"seed{seed}")
    if generate:
        generate_world(world, world_config(s, seed), verbose=False)
    broad = None
    if any(RECIPES[r].get("distill") for r in recipes):
        broad = os.path.join(out, "worlds", f"seed{seed}-broad")
        if generate:
            generate_world(broad, broad_world_config(s, seed), verbose=False)
    return world, broad


def default_jobs(device: str) -> int:
    """Processes to train in: one per core the thread rule (utils/threads.py) leaves free on a CPU (two
    one-thread processes beat one two-thread process on small models), one on a GPU."""
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return 1
    return choose_threads(available_cores(), load_average(), None, {}).threads  # cores, not a thread setting


def _train_in_parallel(out: str, seeds: tuple[int, ...], recipes: tuple[str, ...], settings: tuple, jobs: int) -> None:
    """Train every run in up to ``jobs`` processes at once: one task per seed and recipe (with its variants,
    which fork it), the cores shared among them, each task's output in ``out/logs/<recipe>-seed<s>.log``. A
    task that fails or dies is named with its log; the others go on."""
    size, base_model, device, budgets, baselines = settings
    own, _ = run_budgets(budgets)
    for seed in seeds:  # the worlds first, so that no two tasks generate one at once; every config checked
        world, broad = _worlds(out, SIZES[size], seed, recipes)
        for recipe in recipes:
            config = pipeline_config(world, recipe, SIZES[size], seed, base_model, device, own, baselines, broad)
            config_from_dict(config, source=f"the {recipe}-seed{seed} run's config")
    chains = [
        (r, *(v for v in recipes if RECIPES[v].get("variant_of") == r))
        for r in recipes
        if "variant_of" not in RECIPES[r]
    ]
    # Recipe-major: a recipe's seeds take about as long as each other, so the processes finish close together.
    tasks = [
        (f"{chain[0]}-seed{seed}", (out, (seed,), chain, settings, os.getpid())) for chain in chains for seed in seeds
    ]
    jobs = min(jobs, len(tasks))
    machine = choose_threads(available_cores(), load_average(), None, {})
    threads = max(1, machine.threads // jobs)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    print(
        f"quality: {len(tasks)} tasks in {jobs} processes of {threads} thread(s) each; progress in {logs}/", flush=True
    )
    # Each task in a fresh interpreter that reads its thread settings from the environment before torch loads.
    context = multiprocessing.get_context("spawn")
    child_env = thread_variables(ThreadChoice(threads, machine.passive, "quality task"), os.environ)
    pending, running, failed, done = list(tasks), {}, [], 0
    # A scheduler or `kill` stops the run with SIGTERM, whose default would leave the tasks training on as
    # orphans: it raises here instead, so that the finally below stops them (each resumes on a rerun).
    previous = (
        signal.signal(signal.SIGTERM, _raise_on_sigterm)
        if threading.current_thread() is threading.main_thread()
        else None
    )
    try:
        while pending or running:
            while pending and len(running) < jobs:
                name, task = pending.pop(0)
                process = context.Process(target=_train_task, args=(name, task), name=name)
                saved = {k: os.environ.get(k) for k in child_env}
                os.environ.update(child_env)
                try:
                    process.start()
                finally:
                    for k, v in saved.items():
                        if v is None:
                            os.environ.pop(k, None)
                        else:
                            os.environ[k] = v
                running[process.sentinel] = (name, process)
            for sentinel in multiprocessing.connection.wait(list(running)):
                name, process = running.pop(sentinel)
                process.join()
                done += 1
                log = os.path.join(logs, f"{name}.log")
                error = _task_error(logs, name, process.exitcode)
                if error:
                    failed.append(f"{name}: {error} (log: {log})")
                state = f"failed: {error}" if error else "finished"
                print(f"quality: {name} {state} ({done} of {len(tasks)}; log {log})", flush=True)
    finally:  # Ctrl-C, SIGTERM or an error here: no task outlives the invocation (each resumes on a rerun)
        for _, process in running.values():
            process.terminate()
            process.join()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if failed:
        raise TasksFailed(f"{len(failed)} task(s) failed; rerun to resume them:\n  " + "\n  ".join(failed))


class TasksFailed(RuntimeError):
    """Tasks of a parallel run failed (each named with its error and log); the others finished and are kept."""


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # stopped as by Ctrl-C: the tasks stopped, the finished phases kept


def _stop_with_parent(parent: int) -> None:
    """Linux: the kernel sends this task SIGTERM when the invocation's process dies, even by SIGKILL or the
    out-of-memory killer, which no handler sees; without it the task would train on as an orphan."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took hold
        os._exit(1)


def _task_error(logs: str, name: str, exitcode: int | None) -> str | None:
    """What went wrong in a task process, from its exit code and the one line it left (None: it finished)."""
    path = os.path.join(logs, f"{name}.error")
    if exitcode == 0:
        return None
    if os.path.exists(path):
        with open(path) as f:
            return f.read().strip()
    if exitcode is not None and exitcode < 0:
        return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def _train_task(name: str, task: tuple) -> None:
    """One task of ``_train_in_parallel``, in its own process: its runs, all output to its log file; an error
    leaves one line in ``<name>.error`` and exit code 1."""
    out, seeds, chain, settings, parent = task
    _stop_with_parent(parent)
    logs = os.path.join(out, "logs")
    error = os.path.join(logs, f"{name}.error")
    if os.path.exists(error):
        os.remove(error)
    with open(os.path.join(logs, f"{name}.log"), "a") as log:
        os.dup2(log.fileno(), 1)  # the pipeline's progress bars and lines, from Python and from native code
        os.dup2(log.fileno(), 2)
        try:
            _runs(out, seeds, chain, settings, report_only=False)
        except BaseException as e:  # Ctrl-C too: the parent reports every task that did not finish
            traceback.print_exc()
            sys.stderr.flush()
            with open(error, "w") as f:
                f.write(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            sys.exit(1)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()


def _run(out: str, name: str, config: dict, report_only: bool, fork_of: str | None = None) -> Pipeline:
    """One pipeline run, resumed where it stopped; ``fork_of``: started as a fork of that run (reusing its DMU
    phases). ``report_only`` refuses an unfinished run instead of running it, and reads the run's own config
    (recipes run by separate invocations with different ``--baselines`` still make one report)."""
    run_dir = os.path.join(out, "runs", name)
    if report_only:
        snapshot = os.path.join(run_dir, "config.yaml")
        if not os.path.exists(snapshot):
            raise ValueError(f"{run_dir} does not exist; run it first")
        # A finished run's results are files: it is read wherever it ran (runs made on a GPU, reported on a
        # laptop), so neither its device nor its base model nor its data is checked, and nothing is written.
        pipe = Pipeline(load_config(snapshot, check_paths=False), run_dir, init_distributed("cpu"))
        unfinished = [task for task, done in pipe.status().items() if not done]
        if unfinished:
            raise ValueError(f"{run_dir} is not finished ({', '.join(unfinished)}); run it first")
        return pipe
    cfg_path = os.path.join(out, "configs", f"{name}.yaml")
    os.makedirs(os.path.dirname(cfg_path), exist_ok=True)
    with atomic_file(cfg_path) as f:
        yaml.safe_dump(config, f, sort_keys=False)
    if fork_of and not os.path.exists(run_dir):
        cfg, run_dir = open_run(cfg_path, fork_of, fork=run_dir)
    else:
        cfg, run_dir = open_run(cfg_path, run_dir)
    pipe = Pipeline(cfg, run_dir, init_distributed(cfg.device))
    pipe.run()
    return pipe


def _init_routing(pipe) -> dict:
    """Routing of the assembled CLIP-MoE before router training (the control of the specialisation claim)."""
    path = pipe.path("eval", "moe_init_routing.json")
    if not os.path.exists(path):
        model = pipe.load(pipe.assemble())
        routing = evaluate_suite(model, pipe.cfg.data.eval, batch_size=pipe.cfg.eval.batch_size)["routing"]
        write_json(path, routing)  # atomic: a file cut short by a kill would be read as this run's routing
    with open(path) as f:
        return json.load(f)


def _stage_plans(pipe) -> list[dict]:
    """Per MCL stage: the batch plan of its single epoch (clusters used / left out, samples left out)."""
    plans = []
    for s in range(1, pipe.cfg.moe.experts):
        with open(pipe.out("mcl", s, "stats")) as f:
            plans.append({"stage": s, **json.load(f)["plan"]})
    return plans


def _extraction_times(pipe) -> dict:
    """Training-loop seconds of expert extraction: the MCL stages (sequential) and, per row that extracts its
    experts as independent tasks (the cluster-partition experts), their sum and the slowest one."""
    out = {"MCL stages": mcl_wall_times(pipe)}
    out.update({row.name: row.extraction for row in pipe.rows() if row.extraction})
    return {k: v for k, v in out.items() if v}


# ------------------------------------------------------------------------------------------ measures


def mean_metric(metrics: dict, keys: list[str]) -> float:
    return float(np.mean([metrics[k] for k in keys]))


def retrieval_r1(metrics: dict) -> float:
    """Mean R@1, both directions, ordinary (short) and detailed captions."""
    keys = [
        f"{s}/{d}_R@1" for s in ("retrieval_short", "retrieval_detailed") for d in ("image_to_text", "text_to_image")
    ]
    return mean_metric(metrics, keys)


def known_zero_shot(metrics: dict) -> float:
    return mean_metric(metrics, [f"cls_{a}/top1" for a in KNOWN_ATTRIBUTES])


def hidden_zero_shot(metrics: dict) -> float:
    return mean_metric(metrics, [f"cls_{a}/top1" for a in HIDDEN_ATTRIBUTES])


def unseen_recall(metrics: dict) -> float:
    """Zero-shot recall on the colours and backgrounds the fine-tuning images never show."""
    colors = [c for c in metrics_classes(metrics, "color") if c not in FINETUNE_COLORS]
    backgrounds = [b for b in metrics_classes(metrics, "background") if b not in FINETUNE_BACKGROUNDS]
    keys = [f"cls_color/per_class_recall/{c}" for c in colors]
    keys += [f"cls_background/per_class_recall/{b}" for b in backgrounds]
    return mean_metric(metrics, keys)


def metrics_classes(metrics: dict, attribute: str) -> list[str]:
    prefix = f"cls_{attribute}/per_class_recall/"
    return [k.removeprefix(prefix) for k in metrics if k.startswith(prefix)]


def routing_mutual_information(routing: dict, modality: str = "image") -> float | None:
    """Mutual information (nats) between an attribute's value and the experts a token is routed to, averaged
    over layers and the attributes labelled in the routing analysis; None without routing data."""
    entry = routing.get(modality) if routing else None
    if not entry or not entry.get("groups"):
        return None
    values = []
    for attribute in KNOWN_ATTRIBUTES + HIDDEN_ATTRIBUTES:
        g = entry["groups"].get(attribute)
        if not g:
            continue
        weights = np.asarray(g["tokens"], dtype=float)
        weights /= weights.sum()
        for load in np.asarray(g["load"]):  # [groups, experts] per layer
            mixed = weights @ load
            values.append(_entropy(mixed) - float(weights @ np.array([_entropy(row) for row in load])))
    return float(np.mean(values)) if values else None


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


MEASURES = {
    "retrieval R@1": retrieval_r1,
    "ordinary I2T R@1": lambda m: m["retrieval_short/image_to_text_R@1"],
    "ordinary T2I R@1": lambda m: m["retrieval_short/text_to_image_R@1"],
    "ordinary T2I R@5": lambda m: m["retrieval_short/text_to_image_R@5"],
    "detailed I2T R@1": lambda m: m["retrieval_detailed/image_to_text_R@1"],
    "detailed T2I R@1": lambda m: m["retrieval_detailed/text_to_image_R@1"],
    "known zero-shot": known_zero_shot,
    "unseen colours+bg": unseen_recall,
    "hidden zero-shot": hidden_zero_shot,
    "MMVP": lambda m: m["mmvp/mean"],
}


# ------------------------------------------------------------------------------------------ report


def row_rule(name: str) -> str | None:
    """The budget rule a row's name states (None: the row does not depend on the rule)."""
    return next((key for key, b in BUDGETS.items() if name.endswith(f" ({b.label})")), None)


def _seed_values(runs: dict, recipe: str, row: str, measure) -> list[float]:
    out = []
    for r in runs.values():
        if r["recipe"] == recipe and row in r["results"]:
            out.append(measure(r["results"][row]["metrics"]))
    return out


def _seed_count(runs: dict, recipe: str) -> int:
    return sum(r["recipe"] == recipe for r in runs.values())


def _cell(values: list[float], of: int) -> str:
    """Mean (min-max) over the seeds that have the row, marked when that is fewer than the recipe's ``of``."""
    if not values:
        return "-"
    cell = f"{values[0]:.1f}" if len(values) == 1 else f"{np.mean(values):.1f} ({min(values):.1f}-{max(values):.1f})"
    return cell + (f" [{len(values)} of {of} seeds]" if len(values) < of else "")


def decide(differences: list[float], margin: float = 0.0, inclusive: bool = False) -> str:
    """The testbed's pre-registered rule: the claimed sign in every seed holds, the opposite sign in every
    seed does not hold, anything else is within noise. ``inclusive``: a difference of exactly ``margin``
    counts for the claim ("within 1 point": a loss of 1.0 is within it; "beats": a tie does not beat)."""
    if differences and all(d >= margin if inclusive else d > margin for d in differences):
        return "holds"
    if differences and all(d < margin for d in differences):
        return "does not hold"
    return "within noise"


def keeps_classification(differences: list[float]) -> str:
    """The claim "within 1 point of the base": every seed's loss at most 1 point."""
    return decide(differences, -1.0, inclusive=True)


def _paired(runs: dict, recipe: str, row_a: str, row_b: str, measure) -> list[float]:
    out = []
    for r in runs.values():
        res = r["results"]
        if r["recipe"] == recipe and row_a in res and row_b in res:
            out.append(measure(res[row_a]["metrics"]) - measure(res[row_b]["metrics"]))
    return out


def _places(diffs: list[float]) -> int:
    """Two decimals when a nonzero difference (or their mean) would round to zero at one: "+0.0 ... holds"
    would read as a contradiction."""
    small = [abs(d) for d in (*diffs, float(np.mean(diffs))) if d]
    return 2 if small and min(small) < 0.05 else 1


def _claim_line(claim: str, diffs: list[float], verdict: str, of: int, unit: str = "points") -> str:
    if not diffs:
        return f"| {claim} | - | not measured |"
    places = _places(diffs)
    cell = f"{np.mean(diffs):+.{places}f} ({min(diffs):+.{places}f} to {max(diffs):+.{places}f}) {unit}"
    return f"| {claim} | {cell} | **{_seeds_said(verdict, diffs, of)}** |"


def _seeds_said(verdict: str, diffs: list[float], of: int) -> str:
    """The verdict, marked when it rests on one seed (the rule, the same sign in every seed, then says only a
    sign) or on fewer seeds than the recipe ran (a row missing from some runs)."""
    if len(diffs) < of:
        return f"{verdict}, {len(diffs)} of {of} seeds"
    return f"{verdict}, one seed" if len(diffs) == 1 else verdict


def claims(runs: dict, recipe: str, rule: str) -> list[tuple[str, list[float], str, str]]:
    """Every claim the testbed decides for ``recipe`` under ``rule``: (claim, per-seed paired differences, verdict,
    unit). Claims whose rows the runs lack are left out (the later recipes, the controls) or have no differences."""
    rows = _rows(runs, recipe)
    dense = next((r for r in rows if r.startswith("dense fine-tune") and row_rule(r) == rule), None)
    upcycle = next((r for r in rows if r.startswith("sparse upcycling") and row_rule(r) == rule), None)
    dmu, base = "DMU CLIP-MoE", "base"
    out = []

    def add(claim: str, diffs: list[float], verdict, unit: str = "points") -> None:
        out.append((claim, diffs, verdict(diffs), unit))

    for claim, other in (
        ("DMU beats direct fine-tuning on retrieval", dense),
        ("DMU beats sparse upcycling on retrieval", upcycle),
    ):
        add(claim, _paired(runs, recipe, dmu, other, retrieval_r1) if other else [], decide)
    add(
        "DMU keeps classification within 1 point of the base",
        _paired(runs, recipe, dmu, base, known_zero_shot),
        keeps_classification,
    )
    for claim, prefix in (
        ("DMU beats CLIP-UP upcycling on retrieval", "CLIP-UP upcycling"),
        ("DMU beats cluster-partition fusion on retrieval", "cluster-partition fusion"),
    ):
        other = next((r for r in rows if r.startswith(prefix) and row_rule(r) == rule), None)
        if other:
            add(claim, _paired(runs, recipe, dmu, other, retrieval_r1), decide)
    wo_mcl = next((r for r in rows if r.startswith("w/o MCL") and row_rule(r) == rule), None)
    add(
        "DMU beats w/o MCL on retrieval (MCL matters)",
        _paired(runs, recipe, dmu, wo_mcl, retrieval_r1) if wo_mcl else [],
        decide,
    )
    for claim, control in (
        ("DMU beats random routers on retrieval (learned routing matters)", "random routers"),
        ("DMU beats the uniform mixture on retrieval (routing matters)", "uniform mixture"),
    ):
        if control in rows:  # runs made before the controls existed have no such row
            add(claim, _paired(runs, recipe, dmu, control, retrieval_r1), decide)
    mi = []
    for r in runs.values():
        if r["recipe"] == recipe and dmu in r["results"]:
            trained = routing_mutual_information(r["results"][dmu]["metrics"].get("routing", {}))
            init = routing_mutual_information(r.get("init_routing", {}))
            if trained is not None and init is not None:
                mi.append(1000 * (trained - init))
    add("Experts specialise (routing-attribute MI, trained minus untrained routers)", mi, decide, "mnats")
    return out


def verdicts(runs: dict, recipe: str, rule: str) -> list[str]:
    """The claims table of one recipe and rule (``claims``), as the report prints it."""
    of = _seed_count(runs, recipe)
    lines = ["| claim | DMU minus the other (mean, range over seeds) | verdict |", "|---|---|---|"]
    return lines + [_claim_line(c, diffs, verdict, of, unit) for c, diffs, verdict, unit in claims(runs, recipe, rule)]


def _candidates(runs: dict, recipe: str, rule: str) -> list[str]:
    """The rows a user could adopt as a recipe under ``rule``: every model but the base and the MCL stages."""
    rows = _rows(runs, recipe)
    return [r for r in rows if r != "base" and not r.startswith("MCL stage") and row_rule(r) in (None, rule)]


def _routing_gain(runs: dict, recipe: str, row: str) -> list[float]:
    """Per seed, the routing-attribute MI of ``row`` minus that of its untrained routers (mnats); DMU rows only."""
    out = []
    for r in runs.values():
        if r["recipe"] != recipe or row not in r["results"]:
            continue
        init = r.get("init_routing") if row == DMU_ROW else r.get("init_routing_of", {}).get(row)
        trained = routing_mutual_information(r["results"][row]["metrics"].get("routing", {}))
        before = routing_mutual_information(init or {})
        if trained is not None and before is not None:
            out.append(1000 * (trained - before))
    return out


def recipe_claims(runs: dict, recipe: str, rule: str) -> list[str]:
    """The recipes x claims table: per candidate row, its mean retrieval R@1 and known zero-shot, and the
    testbed's claims decided for it (per-seed paired differences, as ``verdicts``)."""
    rows = _rows(runs, recipe)
    dense = next((r for r in rows if r.startswith("dense fine-tune") and row_rule(r) == rule), None)
    lines = [
        "| recipe (row) | retrieval R@1 | vs dense fine-tune | known zero-shot | within 1 point of the base | "
        "unseen colours+bg | vs dense fine-tune | routing MI gain (mnats) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    of = _seed_count(runs, recipe)

    def claim(diffs: list[float], verdict) -> str:
        if not diffs:
            return "-"
        return f"{np.mean(diffs):+.{_places(diffs)}f}: {_seeds_said(verdict(diffs), diffs, of)}"

    for row in _candidates(runs, recipe, rule):
        vs_dense = _paired(runs, recipe, row, dense, retrieval_r1) if dense and row != dense else []
        forget = _paired(runs, recipe, row, dense, unseen_recall) if dense and row != dense else []
        keep = _paired(runs, recipe, row, "base", known_zero_shot)
        cells = [
            _cell(_seed_values(runs, recipe, row, retrieval_r1), of),
            claim(vs_dense, decide),
            _cell(_seed_values(runs, recipe, row, known_zero_shot), of),
            claim(keep, keeps_classification),
            _cell(_seed_values(runs, recipe, row, unseen_recall), of),
            claim(forget, decide),
            claim(_routing_gain(runs, recipe, row), decide),
        ]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def pick(runs: dict, recipe: str, rule: str = "epoch") -> tuple[str, str]:
    """The default-recipe rule fixed before running (docs/quality.md): among the rows that keep classification
    within 1 point of the base in every seed, the highest mean retrieval R@1; if none does, the highest mean of
    retrieval R@1 and known zero-shot. Returns the row and why."""
    rows = _candidates(runs, recipe, rule)
    keep = [r for r in rows if keeps_classification(_paired(runs, recipe, r, "base", known_zero_shot)) == "holds"]

    def mean(row: str, measure) -> float:
        return float(np.mean(_seed_values(runs, recipe, row, measure)))

    if keep:
        best = max(keep, key=lambda r: mean(r, retrieval_r1))
        return best, (
            "keeps classification within 1 point of the base in every seed, and has the highest retrieval R@1 of those"
        )
    best = max(rows, key=lambda r: (mean(r, retrieval_r1) + mean(r, known_zero_shot)) / 2)
    return best, (
        "no row keeps classification within 1 point of the base in every seed; it has the highest mean of "
        f"retrieval R@1 and known zero-shot ({mean(best, known_zero_shot) - mean('base', known_zero_shot):+.1f} "
        "points of known zero-shot against the base)"
    )


def recommend(runs: dict, recipe: str, rule: str = "epoch") -> str:
    """The pre-registered pick (``pick``) as the report prints it."""
    best, why = pick(runs, recipe, rule)
    return f"Recommended under `{rule}` by the pre-registered rule: **{best}**: {why}."


def _rows(runs: dict, recipe: str) -> list[str]:
    rows: list[str] = []
    for r in runs.values():
        if r["recipe"] == recipe:
            rows += [n for n in r["results"] if n not in rows]
    return rows


def _rules(runs: dict, recipe: str) -> list[str]:
    """The budget rules some row of ``recipe`` was trained under, in the registry's order."""
    rows = _rows(runs, recipe)
    return [b for b in BUDGETS if any(row_rule(row) == b for row in rows)]


def quality_report(runs: dict, size: str, elapsed: float) -> str:

    seeds = sorted({r["seed"] for r in runs.values()})
    recipes = list(dict.fromkeys(r["recipe"] for r in runs.values()))
    compute = sum(r.get("seconds", 0.0) for r in runs.values())
    lines = [
        "# Quality testbed results",
        "",
        f"Size `{size}`, seeds {seeds}, recipes {recipes}; {compute / 60:.0f} min of pipeline time summed over "
        f"the {len(runs)} runs (this invocation: {elapsed / 60:.1f} min) on {platform.machine()}, "
        f"{os.cpu_count()} CPU(s), torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
        + ".",
        "Cells: mean over seeds (min-max). Scores in % on held-out images of the broad distribution.",
        "",
    ]
    for recipe in recipes:
        rows = _rows(runs, recipe)
        of = _seed_count(runs, recipe)
        # no baseline that trains (only the soup and the controls): one table, under no budget rule
        for rule in _rules(runs, recipe) or [None]:
            shown = [r for r in rows if row_rule(r) in (None, rule)]
            if rule is None:
                lines += [f"## Recipe `{recipe}` (no baseline trains, so no budget rule applies)", ""]
            else:
                text = RULE_HEADINGS.get(rule, BUDGETS[rule].rule)
                lines += [f"## Recipe `{recipe}`, budget rule `{rule}` ({text})", ""]
            lines += ["| model | " + " | ".join(MEASURES) + " |", "|---" * (len(MEASURES) + 1) + "|"]
            for row in shown:
                cells = [_cell(_seed_values(runs, recipe, row, m), of) for m in MEASURES.values()]
                lines.append(f"| {row} | " + " | ".join(cells) + " |")
            lines += ["", *verdicts(runs, recipe, rule), ""]
            if any(r.startswith(f"{DMU_ROW}, ") or r.startswith("CLIP-UP") for r in rows):
                lines += [f"Recipes x claims, recipe `{recipe}`, budget rule `{rule}`:", ""]
                lines += [*recipe_claims(runs, recipe, rule), ""]
            if rule is not None:  # the pre-registered pick, whatever rows ran
                lines += [recommend(runs, recipe, rule), ""]
        lines += _stage_plan_table(runs, recipe)
        lines += _extraction_table(runs, recipe)
    return "\n".join(lines) + "\n"


def compare_report(reference: dict, runs: dict, names: tuple[str, str]) -> str:
    """Each claim's verdict and mean difference, and the pre-registered pick, of the ``reference`` runs -> those
    of ``runs``, per recipe and budget rule both hold; a verdict or pick that differs is in bold."""
    recipes = [
        r
        for r in dict.fromkeys(x["recipe"] for x in reference.values())
        if any(y["recipe"] == r for y in runs.values())
    ]
    columns = [
        (recipe, rule) for recipe in recipes for rule in _rules(reference, recipe) if rule in _rules(runs, recipe)
    ]
    if not columns:
        raise ValueError(f"{names[0]} and {names[1]} share no recipe and budget rule to compare")
    decided = [[{c: (v, d, u) for c, d, v, u in claims(side, *col)} for col in columns] for side in (reference, runs)]
    fullest = max((list(col) for side in decided for col in side), key=len)  # the report's order of claims
    order = list(dict.fromkeys([*fullest, *(c for side in decided for col in side for c in col)]))

    def said(x: tuple | None) -> str:
        if x is None or not x[1]:
            return "not measured"
        verdict, diffs, unit = x
        return f"{verdict} {np.mean(diffs):+.{_places(diffs)}f}" + ("" if unit == "points" else f" {unit}")

    def cell(a: str, b: str, differs: bool) -> str:
        return f"**{a} -> {b}**" if differs else f"{a} -> {b}"

    lines = [
        f"# The testbed's verdicts: {names[0]} -> {names[1]}",
        "",
        "Per recipe and budget rule: each claim's verdict and DMU's mean difference over the seeds (as in each "
        "report), then the pre-registered pick; in bold where the two differ.",
        "",
        "| claim | " + " | ".join(f"`{recipe}`, `{rule}`" for recipe, rule in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for c in order:
        cells = []
        for i in range(len(columns)):
            a, b = decided[0][i].get(c), decided[1][i].get(c)
            differs = bool(a and b and a[1] and b[1] and a[0] != b[0])
            cells.append(cell(said(a), said(b), differs))
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    picks = [(pick(reference, *col)[0], pick(runs, *col)[0]) for col in columns]
    lines.append("| pre-registered pick | " + " | ".join(cell(a, b, a != b) for a, b in picks) + " |")
    return "\n".join(lines) + "\n"


def _extraction_table(runs: dict, recipe: str) -> list[str]:
    """Expert extraction wall time (training-loop seconds, mean over seeds): MCL's sequential stages against
    each row whose experts are independent tasks (their sum here, the slowest one if run at once)."""
    sums: dict[str, list[float]] = {}
    slowest: dict[str, list[float]] = {}
    for r in runs.values():
        if r["recipe"] == recipe:
            for name, e in r.get("extraction", {}).items():
                sums.setdefault(name, []).append(e["sum_s"])
                slowest.setdefault(name, []).append(e.get("max_s", e["sum_s"]))
    if len(sums) < 2:
        return []
    lines = [
        f"Expert extraction of recipe `{recipe}` (training-loop seconds, mean over seeds): MCL stages run one "
        "after another; partition experts are independent tasks, run one after another here (sum) or at once "
        "(the slowest one).",
        "",
        "| experts of | sum (s) | slowest (s) |",
        "|---|---|---|",
    ]
    for name in sums:
        slow = "-" if name == "MCL stages" else f"{np.mean(slowest[name]):.1f}"
        lines.append(f"| {name} | {np.mean(sums[name]):.1f} | {slow} |")
    return [*lines, ""]


def _stage_plan_table(runs: dict, recipe: str) -> list[str]:
    """What each MCL stage trained on: its one-cluster batches, and what its small-cluster rule left out."""
    per_stage: dict[int, list[dict]] = {}
    for r in runs.values():
        if r["recipe"] == recipe:
            for plan in r.get("stages", []):
                per_stage.setdefault(plan["stage"], []).append(plan)
    if not per_stage:
        return []
    lines = [
        f"MCL stages of recipe `{recipe}` (mean over seeds): batches of one accumulated cluster, and what the "
        "small-cluster rule left out of the stage's epoch.",
        "",
        "| stage | batches | mean batch | clusters used | clusters left out | samples left out |",
        "|---|---|---|---|---|---|",
    ]
    for stage, plans in sorted(per_stage.items()):
        mean = {k: float(np.mean([p[k] for p in plans])) for k in plans[0] if k != "stage"}
        lines.append(
            f"| {stage} | {mean['batches']:.0f} | {mean['samples'] / max(mean['batches'], 1):.0f} | "
            f"{mean['clusters_used']:.0f} | {mean['clusters_dropped']:.0f} | {mean['dropped']:.0f} |"
        )
    return [*lines, ""]
