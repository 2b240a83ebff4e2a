"""Package layering: the server never imports the simulators, bench and tests share no modules
but the installed packages, and test modules import helpers, never each other."""

from __future__ import annotations

import ast
import importlib
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest_server import cli

ROOT = Path(__file__).resolve().parents[2]


def imported(path: Path) -> Iterator[str]:
    """Every module name ``path`` imports (absolute imports; the project uses no relative ones)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module


def offending(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{p.relative_to(ROOT)}: {name}"
        for p in sorted((ROOT / folder).rglob("*.py"))
        for name in imported(p)
        if name.split(".")[0] in forbidden or any(name.startswith(f + ".") for f in forbidden)
    ]


def test_the_server_never_imports_the_simulators_or_tests() -> None:
    assert offending("ingest_server", ("simulators", "tests", "bench")) == []


def test_the_packages_import_no_tests_or_bench_module() -> None:
    for package in ("schemas", "edge_agent", "device_drivers", "simulators"):
        assert offending(package, ("tests", "bench")) == [], package


def test_bench_imports_no_tests_module() -> None:
    assert offending("bench", ("tests",)) == []


def test_no_test_module_is_imported_as_a_helper() -> None:
    found = [
        f"{p.relative_to(ROOT)}: {name}"
        for p in sorted((ROOT / "tests").rglob("*.py"))
        for name in imported(p)
        if name.startswith("tests.") and name.rsplit(".", 1)[-1].startswith(("test_", "conftest"))
    ]
    assert found == []


def test_the_demo_is_registered_as_an_ingest_server_command() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    target = project["entry-points"][cli.COMMANDS_GROUP]["demo"]
    module, _, attr = target.partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


def test_an_unregistered_command_says_what_is_missing(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli._command_from_entry_point("no-such-command", []) == 2
    err = capsys.readouterr().err
    assert "ingest-server no-such-command: not installed" in err
    assert cli.COMMANDS_GROUP in err
