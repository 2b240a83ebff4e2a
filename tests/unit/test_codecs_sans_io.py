"""The protocol cores import without the hardware libraries, and simulators keep to their side."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HARDWARE_LIBS = ("serial", "smartcard", "cv2", "pymodbus")

# Runs in a fresh interpreter: a meta-path finder refuses the hardware libraries, then every
# module under device_drivers.codecs (and the module named on the command line) is imported.
_PROBE = """
import importlib, importlib.abc, json, pkgutil, sys

BLOCKED = set(sys.argv[1].split(","))

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked for this test")
        return None

sys.meta_path.insert(0, Refuse())
import device_drivers.codecs as codecs

result = {}
names = [m.name for m in pkgutil.iter_modules(codecs.__path__, "device_drivers.codecs.")]
for name in names + sys.argv[2:]:
    try:
        importlib.import_module(name)
        result[name] = "ok"
    except ImportError as exc:
        result[name] = str(exc)
print(json.dumps(result))
"""


def _import_blocked(*extra: str) -> dict[str, str]:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, ",".join(HARDWARE_LIBS), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, str] = json.loads(proc.stdout)
    return result


def test_every_codec_imports_without_hardware_libraries() -> None:
    result = _import_blocked("device_drivers.em4100", "device_drivers.modbus_env")
    codecs = {name: why for name, why in result.items() if ".codecs." in name}
    expected = {p.stem for p in (ROOT / "device_drivers" / "codecs").glob("*.py")} - {"__init__"}
    assert {name.rsplit(".", 1)[1] for name in codecs} == expected
    assert {name: why for name, why in codecs.items() if why != "ok"} == {}
    # The blocker works: drivers that need pyserial or pymodbus do not import under it.
    assert "blocked" in result["device_drivers.em4100"]
    assert "blocked" in result["device_drivers.modbus_env"]


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        # (simulators/demo.py joins the packages for `./run demo`, so ingest_server is not checked)
        ("simulators", {"device_drivers"}),
        ("device_drivers", {"edge_agent", "ingest_server", "simulators"}),
        ("schemas", {"device_drivers", "edge_agent", "ingest_server", "simulators"}),
    ],
)
def test_dependency_rules(package: str, forbidden: set[str]) -> None:
    """ARCHITECTURE section 2: one direction only."""
    breaking = {
        str(path.relative_to(ROOT)): sorted(_imported_packages(path) & forbidden)
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert {path: names for path, names in breaking.items() if names} == {}
