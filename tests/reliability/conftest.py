"""The reliability suite's shared pieces: the tiny model served by real processes, and the
figures every scenario records, printed at the end of the session (`pytest -q` shows them)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server.models.loader import LoadedModel, load_model

FIGURES: dict[str, dict[str, Any]] = {}  # scenario -> figure -> value


def record(scenario: str, **figures: Any) -> None:
    """Keep figures for the session summary (and show them with -rP)."""
    FIGURES.setdefault(scenario, {}).update(figures)
    print(f"[reliability] {scenario}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    terminalreporter.section("reliability figures")
    for scenario, figures in FIGURES.items():
        values = ", ".join(f"{k}={v}" for k, v in figures.items())
        terminalreporter.write_line(f"{scenario}: {values}")


@pytest.fixture(scope="session")
def model_dir(tiny_model_dir: Callable[..., Path]) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="session")
def model(model_dir: Path) -> LoadedModel:
    """The same model loaded here, for shapes and tokens (the servers load their own)."""
    return load_model(str(model_dir), dtype="float32")
