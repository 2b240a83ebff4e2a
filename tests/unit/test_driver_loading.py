"""Built-in drivers load on demand: a gateway without a camera never imports OpenCV."""

from __future__ import annotations

import importlib
import subprocess
import sys

from device_drivers.base import BUILTIN_MODULES, BUILTIN_TYPES, DRIVERS, load_builtin_drivers


def test_every_builtin_type_is_registered_by_the_module_named() -> None:
    load_builtin_drivers()
    assert set(BUILTIN_TYPES.values()) == set(BUILTIN_MODULES)
    for type_name, module in BUILTIN_TYPES.items():
        assert type_name in DRIVERS, type_name
        assert DRIVERS[type_name].__module__ == importlib.import_module(module).__name__


def test_an_agent_with_a_synthetic_driver_does_not_load_opencv() -> None:
    code = """
import sys
from device_drivers.base import DriverContext, UidHasher, build_driver
from edge_agent import agent, cli  # noqa: F401  # everything the agent process imports
ctx = DriverContext(device_id="d1", hasher=UidHasher(bytes(32)))
build_driver("synthetic", "load", {"rate": 1}, ctx)
print("cv2" in sys.modules)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "False", out.stderr
