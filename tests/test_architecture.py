"""The layers of docs/architecture.md hold: imports point one way, with no cycle, not even through a function-level
import; the config modules and the CLI's table stay torch-free."""

from __future__ import annotations

import ast
import os

import clipmoe

SRC = os.path.dirname(clipmoe.__file__)
# Package -> layer. A module may import its own package or a lower layer only (peers do not import each other).
LAYERS = {
    "utils": 0,
    "assets": 0,
    "model": 1,
    "data": 1,
    "formats": 2,
    "eval": 3,
    "train": 3,
    "dmu": 4,
    "apps": 5,
    "cli": 6,
}
TORCH_FREE = {
    "clipmoe.cli",
    "clipmoe.dmu.config",
    "clipmoe.dmu.stages",
    "clipmoe.dmu.budgets",
    "clipmoe.dmu.flops",
    "clipmoe.train.config",
    "clipmoe.model.options",
    "clipmoe.formats.hub",  # model-name resolution, used by the config's validation
    "clipmoe.utils.interrupt",  # the CLI installs its Ctrl-C handler before any subcommand is imported
}


def modules() -> dict[str, str]:
    out = {}
    for root, dirs, files in os.walk(SRC):
        dirs[:] = [d for d in dirs if d not in ("assets", "__pycache__")]
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), SRC)[:-3].replace(os.sep, ".")
                name = "clipmoe" + ("" if rel == "__init__" else "." + rel.removesuffix(".__init__"))
                out[name] = os.path.join(root, f)
    return out


def imports(name: str, path: str) -> list[tuple[str, bool]]:
    """(imported clipmoe module, at module level?) for every import outside ``if TYPE_CHECKING``."""
    tree = ast.parse(open(path).read())
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = []

    def visit(node, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.ImportFrom):
                base = package.split(".")
                if child.level:
                    base = base[: len(base) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                for alias in child.names:
                    full = f"{target}.{alias.name}"
                    found.append((full if full in ALL else target, top))
            elif isinstance(child, ast.Import):
                found.extend((a.name, top) for a in child.names)
            visit(child, top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, True)
    return [(m, top) for m, top in found if m.startswith("clipmoe")]


ALL = modules()


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_imports_point_down_the_layers():
    wrong = []
    for name, path in ALL.items():
        here = layer(name)
        for target, _ in imports(name, path):
            there = layer(target)
            same = target.split(".")[:2] == name.split(".")[:2]
            if here is not None and there is not None and not same and there >= here:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles_even_through_function_level_imports():
    graph = {name: {t for t, _ in imports(name, path) if t in ALL and t != name} for name, path in ALL.items()}
    graph["clipmoe"] = set()  # the package's lazy public API is resolved on use
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_config_modules_and_the_cli_table_do_not_import_torch():
    for name in TORCH_FREE:
        heavy = [m for m, top in imports(name, ALL[name]) if top and m in ALL and m not in TORCH_FREE]
        src = open(ALL[name]).read()
        assert "import torch" not in src and not heavy, (name, heavy)
