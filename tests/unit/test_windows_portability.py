"""The agent on Windows, checked without Windows: every agent module imports with the POSIX-only
modules unavailable and ``sys.platform`` set to ``win32`` (in a subprocess), and the portable
pieces (lock, default paths, stop signals, COM names, the service wrapper's XML) work.

What this cannot show: that the Windows branches *run* on Windows (msvcrt.locking, the ctypes
working-set query, Ctrl+C from WinSW). ``./run test`` type-checks them with
``mypy --platform win32``; docs/install.md says what has not been run on real Windows.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest

from edge_agent import portable
from edge_agent.remote_policy import serial_port_problem
from edge_agent.update import Layout

ROOT = Path(__file__).resolve().parents[2]
AGENT_PACKAGES = ("edge_agent", "device_drivers", "schemas")
#: Modules that exist only on POSIX systems (none of them is on Windows' Python).
POSIX_ONLY = (
    "fcntl",
    "pwd",
    "grp",
    "termios",
    "tty",
    "pty",
    "resource",
    "posix",
    "syslog",
    "_posixsubprocess",
    "_posixshmem",
)

# The child: import everything once as it is (so the standard library and third-party modules
# are loaded as on this machine: they are not under test, and on Windows they choose their own
# Windows modules), then forget the agent's modules and the POSIX-only ones, make those
# unimportable, pretend to be Windows and import every agent module again. msvcrt exists only on
# Windows, so the child gives a stand-in with the names the agent uses; its real signatures are
# what mypy --platform win32 checks.
CHILD = r"""
import importlib, json, os, pkgutil, sys, types
packages, blocked = json.loads(sys.argv[1])
names = []
for pkg in packages:
    mod = importlib.import_module(pkg)
    names.append(pkg)
    for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
        if not info.name.endswith(".__main__"):  # running it would run the CLI
            names.append(info.name)
for name in names:
    importlib.import_module(name)

attempts = []
class NoPosix:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            attempts.append(name)
            raise ImportError(f"{name} is POSIX-only (Windows has no such module)")
        return None

for name in list(sys.modules):
    if name.split(".")[0] in (*packages, *blocked):
        del sys.modules[name]
sys.meta_path.insert(0, NoPosix())
msvcrt = types.ModuleType("msvcrt")
msvcrt.LK_NBLCK, msvcrt.LK_UNLCK, msvcrt.LK_LOCK = 2, 0, 1
msvcrt.locking = lambda fd, mode, nbytes: None
sys.modules["msvcrt"] = msvcrt
sys.platform = "win32"

try:
    import fcntl  # the blocker itself must work, or the rest proves nothing
    blocker = "fcntl imported"
except ImportError:
    blocker = "ok"
attempts.clear()
failed = {}
for name in names:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed[name] = f"{type(exc).__name__}: {exc}"
config, portable = sys.modules.get("edge_agent.config"), sys.modules.get("edge_agent.portable")
print(json.dumps({
    "blocker": blocker,
    "modules": names,
    "failed": failed,
    "posix_attempts": attempts,
    "default_outbox": getattr(config, "DEFAULT_OUTBOX", None),
    "pcsc_service": getattr(portable, "PCSC_SERVICE", None),
    "stop_signals": [s.name for s in portable.stop_signals()] if portable else [],
}))
"""


@pytest.fixture(scope="module")
def as_windows() -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ProgramData": r"D:\Data"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps([AGENT_PACKAGES, POSIX_ONLY])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_every_agent_module_imports_without_posix_modules_as_win32(
    as_windows: dict[str, object],
) -> None:
    assert as_windows["blocker"] == "ok"
    modules = as_windows["modules"]
    assert isinstance(modules, list)
    expected = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for pkg in AGENT_PACKAGES
        for p in (ROOT / pkg).rglob("*.py")
        if p.name != "__main__.py"
    }
    assert set(modules) == expected  # every module was tried, none skipped
    assert as_windows["failed"] == {}
    assert as_windows["posix_attempts"] == []


def test_windows_defaults_seen_by_the_imported_modules(as_windows: dict[str, object]) -> None:
    assert as_windows["default_outbox"] == r"D:\Data\campus-edge\outbox.db"
    assert as_windows["pcsc_service"] == "the Smart Card service (SCardSvr)"
    assert as_windows["stop_signals"][0] == "SIGINT"  # type: ignore[index]


def _guarded_by_platform(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "sys.platform" in ast.unparse(node.test):
            return True
    return False


def test_posix_only_imports_sit_behind_a_platform_check() -> None:
    """Imports inside functions escape the import test; each must be under ``sys.platform``."""
    found = []
    for pkg in AGENT_PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            parents = {
                child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)
            }
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names = [node.module]
                posix = any(n.split(".")[0] in POSIX_ONLY for n in names)
                if posix and not _guarded_by_platform(node, parents):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []


# --- the lock -------------------------------------------------------------------------------


def test_lock_is_exclusive_between_two_opens(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db.lock"
    first = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    second = os.open(path, os.O_RDWR)
    try:
        assert portable.try_lock(first)
        assert not portable.try_lock(second)
        assert not portable.try_lock(second, shared=True)
        portable.unlock(first)
        assert portable.try_lock(second)
        assert not portable.try_lock(first)
    finally:
        os.close(first)
        os.close(second)


def test_closing_the_descriptor_ends_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    first = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    assert portable.try_lock(first)
    os.close(first)
    second = os.open(path, os.O_RDWR)
    try:
        assert portable.try_lock(second)
    finally:
        os.close(second)


def test_the_outbox_refuses_a_second_agent_through_the_lock(tmp_path: Path) -> None:
    from edge_agent.outbox import Outbox, OutboxError

    with (
        Outbox(tmp_path / "outbox.db", lock=True),
        pytest.raises(OutboxError, match="another edge-agent is using the outbox"),
    ):
        Outbox(tmp_path / "outbox.db", lock=True)
    with Outbox(tmp_path / "outbox.db", lock=True):  # released on close
        pass


# --- default paths --------------------------------------------------------------------------


def test_default_paths_on_linux() -> None:
    assert portable.default_outbox("linux", {}) == PurePosixPath("/var/lib/campus-edge/outbox.db")
    assert portable.default_config("linux", {}) == PurePosixPath("/etc/campus-edge/agent.toml")


def test_default_paths_on_windows_follow_programdata() -> None:
    env = {"ProgramData": r"E:\PD"}
    assert portable.default_outbox("win32", env) == PureWindowsPath(r"E:\PD\campus-edge\outbox.db")
    assert portable.default_config("win32", env) == PureWindowsPath(r"E:\PD\campus-edge\agent.toml")
    assert str(portable.default_data_dir("win32", {"PROGRAMDATA": r"F:\X"})) == r"F:\X\campus-edge"


def test_default_paths_on_windows_without_programdata() -> None:
    assert str(portable.default_outbox("win32", {})) == r"C:\ProgramData\campus-edge\outbox.db"


def test_the_config_default_and_enrol_default_come_from_portable() -> None:
    from edge_agent.config import DEFAULT_OUTBOX, OutboxConfig

    assert str(portable.default_outbox()) == DEFAULT_OUTBOX
    assert OutboxConfig().path == DEFAULT_OUTBOX


# --- stopping -------------------------------------------------------------------------------


def test_stop_signals_per_platform() -> None:
    assert portable.stop_signals("linux") == (signal.SIGTERM, signal.SIGINT)
    win = portable.stop_signals("win32")
    assert win[0] == signal.SIGINT  # Ctrl+C, and what WinSW / NSSM send on a service stop
    assert signal.SIGTERM in win


async def _stopped_by(sig: signal.Signals, *, loop_handlers: bool) -> bool:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    if not loop_handlers:  # as on Windows' proactor loop
        original = loop.add_signal_handler

        def refuse(*args: object) -> None:
            raise NotImplementedError

        loop.add_signal_handler = refuse  # type: ignore[method-assign,assignment]
    try:
        undo = portable.install_stop_handlers(loop, stop.set, (sig,))
    finally:
        if not loop_handlers:
            loop.add_signal_handler = original  # type: ignore[method-assign]
    try:
        signal.raise_signal(sig)
        async with asyncio.timeout(10):
            await stop.wait()
    finally:
        undo()
    return stop.is_set()


async def test_a_stop_signal_sets_stop_through_the_loop() -> None:
    assert await _stopped_by(signal.SIGTERM, loop_handlers=True)


async def test_ctrl_c_sets_stop_where_the_loop_has_no_signal_handlers() -> None:
    """Windows' proactor loop: the handler goes through signal.signal and is undone after."""
    before = signal.getsignal(signal.SIGINT)
    assert await _stopped_by(signal.SIGINT, loop_handlers=False)
    assert signal.getsignal(signal.SIGINT) == before


# --- COM ports ------------------------------------------------------------------------------


@pytest.mark.parametrize("port", ["COM1", "COM3", "com10", "COM256", r"\\.\COM10", r"\\.\com3"])
def test_com_names_pass_on_windows(port: str) -> None:
    assert serial_port_problem(port, windows=True) is None


@pytest.mark.parametrize(
    "port", ["COM0", "COM", "COM1000", "COM3:", r"\\.\COM0", r"\\?\COM3", "COM3 ", r"\\.\LPT1"]
)
def test_bad_com_names_are_refused_on_windows(port: str) -> None:
    why = serial_port_problem(port, windows=True)
    assert why is not None
    assert "COM1…COM999" in why or "URL" in why


def test_com_names_are_refused_off_windows() -> None:
    assert serial_port_problem("COM3", windows=False) == "COM ports exist only on Windows"
    assert serial_port_problem(r"\\.\COM3", windows=False) == "COM ports exist only on Windows"


def test_device_nodes_are_no_serial_ports_on_windows() -> None:
    assert serial_port_problem("/dev/ttyUSB0", windows=True) is not None
    assert serial_port_problem("/dev/ttyUSB0", windows=False) is None


# --- the service wrapper --------------------------------------------------------------------


def test_winsw_service_xml_runs_the_agent_with_a_graceful_stop() -> None:
    root = ET.parse(ROOT / "deploy/windows/campus-edge-agent.xml").getroot()  # noqa: S314 - our file
    assert root.tag == "service"
    assert root.findtext("id") == "campus-edge-agent"
    assert (root.findtext("executable") or "").endswith(r"\Scripts\edge-agent.exe")
    args = [a.text for a in root.findall("argument")]
    assert args == ["run", "--config", r"%ProgramData%\campus-edge\agent.toml"]
    assert root.find("stopargument") is None  # the stop is WinSW's Ctrl+C, which the agent catches
    assert root.findtext("stoptimeout") == "30 sec"
    assert [e.get("action") for e in root.findall("onfailure")] == ["restart", "restart"]
    assert root.findtext("startmode") == "Automatic"


def test_install_script_names_the_xml_and_locks_down_the_data_dir() -> None:
    text = (ROOT / "deploy/windows/install.ps1").read_text(encoding="utf-8")
    assert "campus-edge-agent.xml" in text
    assert "icacls" in text
    assert "/inheritance:r" in text
    assert r"NT AUTHORITY\LocalService" in text
    assert "SCardSvr" in text


# -- the update launcher's env layout (edge_agent.update.Layout) ------------------------------


def test_launcher_starts_bin_python_on_posix_and_scripts_python_exe_on_windows(
    tmp_path: Path,
) -> None:
    assert Layout(tmp_path, "linux").python("1.2.3") == tmp_path / "envs/1.2.3/bin/python"
    assert Layout(tmp_path, "darwin").python("1.2.3") == tmp_path / "envs/1.2.3/bin/python"
    assert Layout(tmp_path, "win32").python("1.2.3") == tmp_path / "envs/1.2.3/Scripts/python.exe"


def test_windows_layout_switches_a_pointer_file_not_a_symlink(tmp_path: Path) -> None:
    layout = Layout(tmp_path, "win32")
    assert layout.current_version() is None
    layout.point("1.2.3")
    current = tmp_path / "current"
    assert current.is_file()
    assert not current.is_symlink()
    assert current.read_text().strip() == "envs/1.2.3"
    assert layout.current_version() == "1.2.3"
    layout.point("1.2.4")  # replaced in place
    assert layout.current_version() == "1.2.4"
    assert not (tmp_path / ".current.tmp").exists()
    layout.point(None)
    assert not current.exists()
    assert layout.current_version() is None


def test_a_pointer_file_written_by_hand_or_on_windows_is_read_on_posix(tmp_path: Path) -> None:
    (tmp_path / "current").write_text("envs\\2.0.0\r\n")
    assert Layout(tmp_path, "win32").current_version() == "2.0.0"
    (tmp_path / "current").write_text("envs/2.0.1\n")
    assert Layout(tmp_path, "linux").current_version() == "2.0.1"


def test_posix_falls_back_to_the_pointer_file_where_symlinks_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_symlinks(*_: object, **__: object) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "symlink", no_symlinks)
    layout = Layout(tmp_path, "linux")
    layout.point("3.0.0")
    assert (tmp_path / "current").is_file()
    assert layout.current_version() == "3.0.0"


@pytest.mark.parametrize(
    "content",
    ["", "envs/../../etc\n", "envs/a b\n", "x" * 300, "envs/.hidden\n"],
)
def test_a_bad_pointer_file_means_the_factory_env(tmp_path: Path, content: str) -> None:
    (tmp_path / "current").write_text(content)
    assert Layout(tmp_path, "win32").current_version() is None
    assert Layout(tmp_path, "linux").current_version() is None
