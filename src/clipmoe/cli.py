"""clipmoe command line: turn a pretrained CLIP into a sparse Mixture-of-Experts CLIP (DMU).

Each subcommand NAME lives in the module that does the work, which defines ``add_NAME_arguments(parser)``,
``run_NAME(args) -> int | None`` and its help text (``CLI_NAME_HELP`` or the module docstring)."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module. Order is the order shown in --help (the pipeline's order).
COMMAND_MODULES: dict[str, str] = {
    "demo": "clipmoe.apps.demo",
    "run": "clipmoe.dmu.pipeline",
    "prepare": "clipmoe.dmu.pipeline",
    "embed": "clipmoe.dmu.pipeline",
    "cluster": "clipmoe.dmu.pipeline",
    "mcl": "clipmoe.dmu.pipeline",
    "build": "clipmoe.dmu.pipeline",
    "route": "clipmoe.dmu.pipeline",
    "baselines": "clipmoe.dmu.pipeline",
    "report": "clipmoe.dmu.pipeline",
    "world": "clipmoe.data.world",
    "pretrain": "clipmoe.apps.pretrain",
    "eval": "clipmoe.eval.cli",
    "export": "clipmoe.formats.export",
    "index": "clipmoe.apps.search",
    "search": "clipmoe.apps.search",
    "convert": "clipmoe.formats.convert",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clipmoe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name, module_name in COMMAND_MODULES.items():
        module = importlib.import_module(module_name)
        command_doc = getattr(module, f"CLI_{name.upper().replace('-', '_')}_HELP", None) or module.__doc__
        p = sub.add_parser(name, help=command_doc.strip().splitlines()[0], description=command_doc)
        getattr(module, f"add_{name.replace('-', '_')}_arguments")(p)
        modules[name] = module
    args = parser.parse_args(argv)
    try:
        return getattr(modules[args.command], f"run_{args.command.replace('-', '_')}")(args) or 0
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"clipmoe {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
