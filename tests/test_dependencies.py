"""Every third-party import is declared where it is needed (pyproject.toml).

`pip install .` must serve, `.[train]` train, `.[ray]` run replicas, and `.[dev]` run this suite
(CI installs `.[dev]` on a clean machine, so a package that the tests import but nothing declares
would pass here and fail there). Imports are read from the source with `ast`; a module's
distribution comes from the installed metadata.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
OWN = {"server", "prefix_registry", "clients", "tests", "examples", "bench"}
# Source folders -> the extras (besides the base dependencies) that must cover their imports.
GROUPS: dict[str, tuple[str, ...]] = {
    "clients": (),
    "prefix_registry": (),
    "server": (),
    "server/training": ("train",),
    "server/serve_ray": ("ray",),
    "examples": ("train",),
    "tests": ("dev",),
}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


@cache
def declared(extras: tuple[str, ...]) -> frozenset[str]:
    """Distributions declared by the base dependencies plus `extras` (self-references followed)."""
    names = {_name(r) for r in PROJECT["dependencies"]}
    todo = list(extras)
    while todo:
        for requirement in PROJECT["optional-dependencies"][todo.pop()]:
            match = re.match(r"prefix-serve\[([^\]]+)\]", requirement)
            if match:
                todo += match.group(1).split(",")
            else:
                names.add(_name(requirement))
    return frozenset(names)


def imports(path: Path) -> set[str]:
    """Top-level modules imported anywhere in the file (lazy imports inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found - OWN - set(sys.stdlib_module_names) - {"__future__"}


def _group_of(path: Path) -> str:
    relative = path.relative_to(ROOT).as_posix()
    return max((g for g in GROUPS if relative.startswith(g + "/")), key=len)


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_every_import_is_declared(group: str) -> None:
    distributions = packages_distributions()
    wanted = declared(GROUPS[group])
    undeclared = {}
    for path in sorted((ROOT / group).rglob("*.py")):
        if _group_of(path) != group:
            continue
        for module in imports(path):
            names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
            if not names & wanted:
                undeclared.setdefault(module, []).append(path.relative_to(ROOT).as_posix())
    assert not undeclared, f"imported but not declared for {group}: {undeclared}"


def test_the_base_install_has_no_test_or_client_only_packages() -> None:
    base = declared(())
    for name in ("pytest", "openai", "peft", "ray", "schemathesis"):
        assert name not in base, name
    assert {"jinja2", "numpy"} <= base
    torch = [r for r in PROJECT["dependencies"] if _name(r) == "torch"]
    assert len(torch) == 1 and torch[0].startswith("torch>=") and "+" not in torch[0]  # no CPU pin
