"""`--version` on each of the three commands prints the installed package's version and exits 0
(before any model, server or network is touched)."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any

import pytest

import clients
from clients import cli as prefixctl
from server import __main__ as prefix_serve
from server.training import cli as prefix_train

COMMANDS: dict[str, Callable[[list[str]], Any]] = {
    "prefix-serve": prefix_serve.main,
    "prefixctl": prefixctl.main,
    "prefix-train": prefix_train.main,
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_version(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = COMMANDS[command](["--version"])  # prefixctl returns its exit code
    except SystemExit as exited:
        code = exited.code
    assert code == 0
    version = importlib.metadata.version("prefix-serve")
    assert capsys.readouterr().out == f"{command} {version}\n"


def test_the_sdk_reports_the_package_version() -> None:
    assert clients.__version__ == importlib.metadata.version("prefix-serve")
