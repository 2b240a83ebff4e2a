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


#: The server's parts and what each may import (besides schemas, third-party packages and the
#: shared top-level modules settings, metrics and logbound): the data's way through the server.
#: ``docs/design.md`` draws the same arrows.
SERVER_ARROWS: dict[str, frozenset[str]] = {
    "storage": frozenset(),
    "ingest": frozenset({"storage"}),
    "control": frozenset({"storage", "ingest"}),
    "alerts": frozenset({"storage", "ingest", "control"}),
    "embedded": frozenset({"control"}),
    "web": frozenset({"storage", "ingest", "control", "alerts"}),
}
_SHARED = frozenset({"settings", "metrics", "logbound"})


def test_the_server_s_parts_import_only_along_their_arrows() -> None:
    found = []
    for part, allowed in SERVER_ARROWS.items():
        folder = ROOT / "ingest_server" / part
        for path in sorted(folder.rglob("*.py")) if folder.is_dir() else []:
            for name in imported(path):
                bits = name.split(".")
                if bits[0] != "ingest_server" or len(bits) < 2 or bits[1] in (part, *_SHARED):
                    continue
                if bits[1] not in allowed:
                    found.append(f"{path.relative_to(ROOT)} imports {name}")
    assert found == []


def test_every_server_module_sits_in_a_part_or_is_shared() -> None:
    top = {p.stem for p in (ROOT / "ingest_server").glob("*.py")}
    assert top - _SHARED - {"__init__", "__main__", "cli", "server"} == set()


def test_the_agent_and_the_server_meet_only_in_schemas() -> None:
    assert offending("edge_agent", ("ingest_server",)) == []
    assert offending("ingest_server", ("edge_agent",)) == []


#: The simulators are independent implementations of the hardware; only what sits above both
#: (the demo, the API seeding the benches and tests share, and the district layout, which writes
#: its brokers' password files in the server's own hash format) may start or feed a server.
SIMULATORS_ABOVE_THE_SERVER = frozenset({"demo.py", "api_seed.py", "district.py"})


def test_the_simulators_import_no_server_but_from_above() -> None:
    found = [
        line
        for line in offending("simulators", ("ingest_server",))
        if Path(line.split(":")[0]).name not in SIMULATORS_ABOVE_THE_SERVER
    ]
    assert found == []
