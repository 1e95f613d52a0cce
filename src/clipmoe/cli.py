"""clipmoe command line: turn a pretrained CLIP into a sparse Mixture-of-Experts CLIP (DMU).

Every subcommand is a pair of functions here, ``add_NAME`` (its arguments) and ``run_NAME`` (what it does, by
calling library functions); the pipeline's stage subcommands (``prepare`` ... ``report``) come from the stage
registry ``clipmoe.dmu.stages.STAGES`` and run through ``run_stage``. Heavy modules (torch, transformers) are
imported inside those functions, and only the chosen subcommand's arguments are built, so ``clipmoe --help``
answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from .dmu.stages import STAGE_BY_NAME, STAGES, Stage
from .utils import interrupt

# ------------------------------------------------------------------------------------------ pipeline commands


def add_run(p: argparse.ArgumentParser) -> None:
    _add_config_arguments(p)
    p.add_argument("--fork", metavar="NEW_RUN_DIR", help="start a new run reusing the unchanged finished stages")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan; do nothing")


def run_run(args: argparse.Namespace) -> None:
    pipe = _open_pipeline(args)
    if pipe is not None:
        t0 = time.perf_counter()
        pipe.run()
        pipe.log(f"run finished in {(time.perf_counter() - t0) / 60:.1f} min\n{pipe.summary()}")
        _close(pipe)


def add_status(p: argparse.ArgumentParser) -> None:
    _add_config_arguments(p)


def run_status(args: argparse.Namespace) -> None:
    from .dmu.config import load_config
    from .dmu.pipeline import default_run_dir, print_plan

    print_plan(load_config(args.config), args.run_dir or default_run_dir(args.config), check=False)


def add_stage(p: argparse.ArgumentParser, stage: Stage) -> None:
    _add_config_arguments(p)
    if stage.argument == "stage":
        p.add_argument("--stage", type=int, required=True, help="stage number")
    elif stage.argument == "only":
        p.add_argument("--only", metavar="RUN", help="only this run (for example dense-epoch); default: all")


def run_stage(args: argparse.Namespace) -> None:
    """A stage subcommand: the stage named ``args.command`` of the registry, for one instance or all."""
    stage = STAGE_BY_NAME[args.command]
    pipe = _open_pipeline(args)
    selected = getattr(args, stage.argument, None) if stage.argument else None
    instances = list(stage.instances(pipe))
    if selected is not None and selected not in instances:
        _close(pipe)
        raise ValueError(f"--{stage.argument} {selected}: this run's {stage.name} has {', '.join(map(str, instances))}")
    for instance in [selected] if selected is not None else instances:
        pipe.log(pipe.run_stage(stage, instance))
    _close(pipe)


def _add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="pipeline YAML")
    p.add_argument("--run-dir", help="run directory (default: CONFIG without extension + '-run')")


def _open_pipeline(args: argparse.Namespace):
    from .dmu.config import load_config
    from .dmu.pipeline import default_run_dir, open_pipeline, print_plan
    from .train.distributed import init_distributed

    if getattr(args, "dry_run", False):  # the same checks as a run (validate_run), then the plan
        print_plan(load_config(args.config), args.run_dir or default_run_dir(args.config), args.fork)
        return None
    return open_pipeline(args.config, args.run_dir, getattr(args, "fork", None), init_distributed)


def _close(pipe) -> None:
    from .train.distributed import shutdown_distributed

    shutdown_distributed(pipe.env)


# ------------------------------------------------------------------------------------------ other commands
# Each delegates to the module that owns the work; its arguments are defined there, next to the code they feed.


def add_demo(p: argparse.ArgumentParser) -> None:
    from .apps.demo import add_demo_arguments

    add_demo_arguments(p)


def run_demo(args: argparse.Namespace) -> None:
    from .apps.demo import run_demo

    return run_demo(args)


def add_world(p: argparse.ArgumentParser) -> None:
    from .data.world import __doc__ as doc
    from .data.world import add_world_arguments

    p.description = doc
    add_world_arguments(p)


def run_world(args: argparse.Namespace):
    from .data.world import run_world

    return run_world(args)


def add_pretrain(p: argparse.ArgumentParser) -> None:
    from .apps.pretrain import CLI_PRETRAIN_HELP, add_pretrain_arguments

    p.description = CLI_PRETRAIN_HELP
    add_pretrain_arguments(p)


def run_pretrain(args: argparse.Namespace):
    from .apps.pretrain import run_pretrain

    return run_pretrain(args)


def add_eval(p: argparse.ArgumentParser) -> None:
    from .eval.cli import __doc__ as doc
    from .eval.cli import add_eval_arguments

    p.description = doc
    add_eval_arguments(p)


def run_eval(args: argparse.Namespace):
    from .eval.cli import run_eval

    return run_eval(args)


def add_export(p: argparse.ArgumentParser) -> None:
    from .formats.export import __doc__ as doc
    from .formats.export import add_export_arguments

    p.description = doc
    add_export_arguments(p)


def run_export(args: argparse.Namespace):
    from .formats.export import run_export

    return run_export(args)


def add_index(p: argparse.ArgumentParser) -> None:
    from .apps.search import CLI_INDEX_HELP, add_index_arguments

    p.description = CLI_INDEX_HELP
    add_index_arguments(p)


def run_index(args: argparse.Namespace):
    from .apps.search import run_index

    return run_index(args)


def add_search(p: argparse.ArgumentParser) -> None:
    from .apps.search import CLI_SEARCH_HELP, add_search_arguments

    p.description = CLI_SEARCH_HELP
    add_search_arguments(p)


def run_search(args: argparse.Namespace):
    from .apps.search import run_search

    return run_search(args)


def add_convert(p: argparse.ArgumentParser) -> None:
    from .formats.convert import CLI_CONVERT_HELP, add_convert_arguments

    p.description = CLI_CONVERT_HELP
    add_convert_arguments(p)


def run_convert(args: argparse.Namespace):
    from .formats.convert import run_convert

    return run_convert(args)


# ------------------------------------------------------------------------------------------ the command table


@dataclass(frozen=True)
class Command:
    name: str
    help: str  # one line, shown by ``clipmoe --help``
    add: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    computes: bool = (
        True  # sets torch's thread count (--threads) before it runs; False: status, export, convert, search
    )


def _stage_command(stage: Stage) -> Command:
    return Command(stage.name, stage.help, lambda p: add_stage(p, stage), run_stage)


# In the order --help shows them: the demo, the pipeline (the stage registry's order), then the tools.
COMMANDS: tuple[Command, ...] = (
    Command("demo", "Run the whole DMU pipeline on a generated world from the shipped tiny CLIP.", add_demo, run_demo),
    Command(
        "run",
        "Run the whole DMU pipeline from a config file (skips finished stages, resumes the rest).",
        add_run,
        run_run,
    ),
    Command(
        "status",
        "Show which stages of a run are done and what is left (writes nothing).",
        add_status,
        run_status,
        False,
    ),
    *(_stage_command(stage) for stage in STAGES),
    Command(
        "world", "Generate a world: images with known attributes, captions, evaluation sets.", add_world, run_world
    ),
    Command("pretrain", "Train a CLIP from scratch on image-caption data (resumable).", add_pretrain, run_pretrain),
    Command(
        "eval",
        "Evaluate a CLIP or CLIP-MoE: retrieval, classification, MMVP, probes, routing, world attributes.",
        add_eval,
        run_eval,
    ),
    Command(
        "export",
        "Copy a model folder, or export its vision tower as a CLIPVisionModel folder.",
        add_export,
        run_export,
        False,
    ),
    Command("index", "Embed a folder of images into a text-searchable faiss index (resumable).", add_index, run_index),
    # search prints data (one result per line, or JSON) and computes little: torch's defaults, no thread line
    Command("search", "Find the images of an index that best match a text query.", add_search, run_search, False),
    Command(
        "convert",
        "Convert a checkpoint file (OpenAI, open_clip, official CLIP-MoE) to a clipmoe folder.",
        add_convert,
        run_convert,
        False,
    ),
)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser; only the subcommand named in ``argv`` gets its arguments (and imports its module)."""
    parser = argparse.ArgumentParser(prog="clipmoe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _chosen(argv)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        if command is chosen:
            command.add(p)
            if command.computes:
                p.add_argument("--threads", type=int, metavar="N", help=THREADS_HELP)
    return parser


THREADS_HELP = (
    "torch/OpenMP threads (default: the cores available to this process; 1 with passive OpenMP waiting when the "
    "load average says the machine is busy; OMP_NUM_THREADS from the environment is respected)"
)
# Commands whose rerun continues where an interrupted one stopped (the others start over).
RESUMABLE = {"demo", "run", "pretrain", "index", *(stage.name for stage in STAGES)}


def _chosen(argv: list[str]) -> Command | None:
    name = next((a for a in argv if not a.startswith("-")), None)
    return next((c for c in COMMANDS if c.name == name), None)


def _set_threads(argv: list[str]) -> None:
    """Decide the thread count and put it in the environment before torch is imported (OpenMP reads it once)."""
    from .utils.threads import apply_threads, available_cores, choose_threads, load_average

    pre = argparse.ArgumentParser(prog="clipmoe", add_help=False, allow_abbrev=False)
    pre.add_argument("--threads", type=int)
    requested = pre.parse_known_args(argv)[0].threads
    choice = choose_threads(available_cores(), load_average(), requested, os.environ)
    apply_threads(choice)
    print(choice.line(), flush=True)  # stdout, with the run's other progress lines; stderr is for errors


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = _chosen(argv)
    name = chosen.name if chosen else "?"
    interrupt.install()
    try:
        if chosen is not None and chosen.computes and not {"-h", "--help", "--dry-run"} & set(argv):
            _set_threads(argv)  # before the subcommand's module (and with it torch) is imported
        args = build_parser(argv).parse_args(argv)
        return chosen.run(args) or 0
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"clipmoe {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: one line, no traceback; the pipeline says where it stopped
        where = getattr(e, "where", None)
        stopped = f"stopped at {where}" if where else "stopped"
        tail = "; rerun the same command to resume" if name in RESUMABLE else " (interrupted)"
        print(f"clipmoe {name}: {stopped}{tail}", file=sys.stderr)
        return 130
    finally:
        interrupt.uninstall()


if __name__ == "__main__":
    sys.exit(main())
