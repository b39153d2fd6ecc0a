"""The packages import each other without circles, and without DESIGN.md's forbidden arrows.

The graph is read from the source with `ast`, not by importing anything. Every import counts,
wherever it sits (module top, function body, `try:`): a circle hidden in a function-level import is
still a circle, only deferred to run time. Imports under `if TYPE_CHECKING:` do not count, since
they never run. `from pkg import name` is an arrow to `pkg.name` when that is a module of ours,
else to `pkg`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("server", "prefix_registry", "clients")
Graph = dict[str, set[str]]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:  # the `else:` of a TYPE_CHECKING test does run
                yield from _imports(ast.Module(body=[child], type_ignores=[]))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node)


def _base(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = _base(module, path, node)
    for alias in node.names:
        yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base


def _all_targets(module: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {t for node in _imports(tree) for t in _targets(module, path, node)}


MODULES = _modules()
RAW = {module: _all_targets(module, path) for module, path in MODULES.items()}


def _ours(target: str) -> str | None:
    """The module of ours that `target` names, or its nearest package of ours."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def graph(raw: dict[str, set[str]]) -> Graph:
    edges: Graph = {}
    for module, targets in raw.items():
        ours = {_ours(t) for t in targets}
        edges[module] = {t for t in ours if t and t != module}
    return edges


def find_cycle(edges: Graph) -> list[str] | None:
    """One circle as [a, b, ..., a], or None. Depth-first, colouring nodes."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_there_are_no_import_circles() -> None:
    cycle = find_cycle(graph(RAW))
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_a_planted_circle_is_found() -> None:
    edges = graph(RAW)
    edges["prefix_registry.validation"] = edges["prefix_registry.validation"] | {
        "prefix_registry.store"
    }
    cycle = find_cycle(edges)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert "prefix_registry.store" in cycle and "prefix_registry.validation" in cycle


def _arrows(source: str, forbidden: str) -> list[str]:
    return sorted(
        f"{module} -> {target}"
        for module, targets in RAW.items()
        if module == source or module.startswith(source + ".")
        for target in targets
        if target == forbidden or target.startswith(forbidden + ".")
    )


@pytest.mark.parametrize(
    ("source", "forbidden"),
    [
        ("clients", "server"),  # users install the SDK without the server's weight
        ("clients", "torch"),
        ("prefix_registry", "server"),  # the registry knows tensors and bytes, not HTTP
        ("server.engine", "server.api"),  # the engine knows nothing of HTTP
        ("server.engine.scheduler", "torch"),  # it decides with ids and counts
    ],
)
def test_design_forbidden_arrows_do_not_exist(source: str, forbidden: str) -> None:
    assert _arrows(source, forbidden) == []


def _top_level_names(path: Path) -> Iterator[str]:
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.name
        elif isinstance(node, ast.Assign):
            yield from (t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            yield node.target.id


@pytest.mark.parametrize(
    "name",
    [
        "check_unicode",
        "_check_unicode",
        "KeyLookup",
        "MAX_SEED",
        # Defined in prefix_registry.errors only (server.errors re-exports them by import);
        # server/api/errors.py gives each its HTTP status and type.
        "NotFoundError",
        "ConflictError",
        "QuotaExceededError",
        "RegistryUnavailableError",
    ],
)
def test_the_server_and_registry_define_each_once(name: str) -> None:
    """Names once defined twice, with drifting meanings. The SDK (clients/) keeps its own error
    classes on purpose: it may not import the server or the registry."""
    where = [
        module
        for module, path in MODULES.items()
        if not module.startswith("clients") and name in _top_level_names(path)
    ]
    assert len(where) <= 1, f"{name} is defined in {where}"
