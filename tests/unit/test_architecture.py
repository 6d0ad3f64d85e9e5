"""The package's imports point one way: down the tiers below, and never in a cycle.

    0  errors, extras, files, shape, version
                                       what everything uses
    1  model                           the elastic model, its weights I/O, adapters, the NLL
    2  data, memory, importance, search, export, runtime, evaluate
                                       what works on a model: scores, Shapes, export, metrics
    3  train, checkpoints, router, prune, share, compress
                                       methods that train or transform a model
    4  deploy, serve                   tools across runtimes: speed, the family report; the server
    5  cli, __main__, and the package root (the public API)

Every import counts, a lazy one inside a function too; only those under `if TYPE_CHECKING:`
(annotations) do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "anyshape"
TIERS = {
    **dict.fromkeys(("errors", "extras", "files", "shape", "version"), 0),
    "model": 1,
    **dict.fromkeys(("data", "memory", "importance", "search", "export", "runtime", "evaluate"), 2),
    **dict.fromkeys(("train", "checkpoints", "router", "prune", "share", "compress"), 3),
    **dict.fromkeys(("deploy", "serve"), 4),
    **dict.fromkeys(("cli", "__main__", ""), 5),  # "": the package root, anyshape/__init__.py
}
HEAVY = ("lm_eval", "gguf", "llama_cpp", "optuna", "matplotlib", "fastapi", "uvicorn", "prometheus_client")


def module_name(path: Path) -> str:
    parts = ("anyshape", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The anyshape modules `path` imports (a name imported from a package counts as its module
    where it is one), outside `if TYPE_CHECKING:` blocks."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "anyshape")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            if base.split(".")[0] == "anyshape":
                for alias in node.names:
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imported_modules(path, modules) & modules for path in paths}


def tier(module: str) -> int:
    parts = module.split(".")
    return TIERS[parts[1] if len(parts) > 1 else ""]


def test_every_module_has_a_tier():
    assert [m for m in import_graph() if (m.split(".") + [""])[1] not in TIERS] == []


def test_no_import_points_to_a_higher_tier():
    upward = sorted(
        f"{source} (tier {tier(source)}) imports {target} (tier {tier(target)})"
        for source, targets in import_graph().items()
        for target in targets
        if tier(target) > tier(source)
    )
    assert upward == []


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


@pytest.mark.parametrize("tiny", ["anyshape.model.nll", "anyshape.shape"])
def test_the_checker_sees_imports(tiny):
    """The checks above would pass on an empty graph: make sure it is not one."""
    graph = import_graph()
    assert "anyshape.model.llama" in graph[tiny] or "anyshape.errors" in graph[tiny]
