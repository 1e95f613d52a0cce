"""``clipmoe demo``: the whole DMU pipeline on a generated world, from the tiny CLIP shipped in the package.

Generates the quality testbed's fine-tuning world at demo size (detailed captions on a narrower image
distribution than the base's web-caption pretraining corpus; broad held-out evaluation sets, docs/quality.md),
runs the MCL stages, assembles and routes the CLIP-MoE, runs every baseline under the paper's budget rule (one
pass over the data per phase), evaluates everything and writes the report; offline, on CPU, in under ten
minutes on two cores. Rerunning continues where it stopped. The full comparison (3 seeds, both recipes, both
budget rules) is ``benchmarks/bench_quality.py``.
"""

from __future__ import annotations

import argparse
import os
import time

import yaml

from ..assets import TINY_CLIP
from ..data.world import PRESETS, WorldConfig, generate_world
from ..dmu.config import load_config
from ..dmu.pipeline import Pipeline, open_run
from ..dmu.report import summary_scores
from ..train.distributed import init_distributed

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")


def run_demo_pipeline(
    out: str, world_preset: str = "demo", config_path: str = DEMO_CONFIG, train_size: int | None = None
) -> tuple[Pipeline, str]:
    """Generate the world into ``out/world`` and run the demo config on it in ``out/run``."""
    t0 = time.perf_counter()
    out = os.path.abspath(out)  # the config written below names the world by absolute path
    world = os.path.join(out, "world")
    overrides = {"train_size": train_size} if train_size else {}
    generate_world(world, WorldConfig.preset(world_preset, **overrides))
    with open(config_path) as f:
        raw = yaml.safe_load(f)
    raw["data"]["train"] = os.path.join(world, "train")
    raw["data"]["eval"] = os.path.join(world, "eval")
    if raw["base_model"] == "builtin:tiny-clip" and not os.path.isdir(TINY_CLIP):
        raise FileNotFoundError(f"the shipped base model is missing ({TINY_CLIP}); reinstall clipmoe")
    cfg_path = os.path.join(out, "demo.yaml")
    os.makedirs(out, exist_ok=True)
    with open(cfg_path, "w") as f:
        yaml.safe_dump(raw, f, sort_keys=False)
    cfg, run_dir = open_run(cfg_path, os.path.join(out, "run"))
    pipe = Pipeline(cfg, run_dir, init_distributed(cfg.device))
    report = pipe.run()
    pipe.log(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return pipe, report


def summary_table(pipe: Pipeline) -> str:
    """The terminal summary: one line per model with the report's headline numbers."""
    results = pipe.results()
    scores = summary_scores(results)
    cols = ["retrieval R@1", "zero-shot top-1", "MMVP"]
    width = max(len(n) for n in scores) + 2
    lines = [f"{'model':<{width}}" + "".join(f"{c:>18}" for c in cols) + f"{'active params':>16}"]
    for name, s in scores.items():
        vals = "".join(f"{s[c]:>18.1f}" if s[c] is not None else f"{'-':>18}" for c in cols)
        lines.append(f"{name:<{width}}{vals}{results[name]['parameters']['active']:>16,}")
    return "\n".join(lines)


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-run", help="folder for the world, the run and the report (default: demo-run)")
    p.add_argument("--world", default="demo", choices=sorted(PRESETS), help="world preset (default: demo)")
    p.add_argument("--config", default=DEMO_CONFIG, help="pipeline config to run on the world (default: the demo's)")
    p.add_argument("--train-size", type=int, default=0, help="training images of the world (default: the preset's)")


def run_demo(args: argparse.Namespace) -> None:
    load_config(args.config, check_paths=False)  # fail on a bad config before generating anything
    pipe, _ = run_demo_pipeline(args.out, args.world, args.config, args.train_size or None)
    if pipe.env.is_main:
        print()
        print(summary_table(pipe))
        print()
        print(pipe.summary())
