"""``update_agent``: download a signed release, install it beside the running one, switch, restart.

The agent updates itself only under ``edge-agent-launch`` (:mod:`edge_agent.launch`), which
tells it the base directory in ``CAMPUS_EDGE_LAUNCHER``. The base holds::

    envs/<version>/          one virtual environment per installed release (``.complete`` when done)
    current -> envs/<v>      the env the launcher starts (absent: the launcher's own, "factory");
                             a symlink, or where symlinks are unavailable (Windows without
                             the privilege) a small file holding ``envs/<v>``
    trial.json               an update on trial: {cmd_id, version, previous, healthy_within_s}
    trial.confirmed          ... renamed so by the new agent once it is connected (it won)
    trial.failed             ... renamed so by the launcher when it gives up (it won)
    result.json              the error ack of a rolled-back update, for the previous agent to send

The old agent: checks the args, downloads (bounded, https or loopback http), checks SHA-256 and
the Ed25519 signature against ``[update] public_key_file`` **before anything is written**,
installs into ``envs/<version>`` (a venv whose ``.pth`` reaches the running env's dependencies,
then ``pip install --no-deps --no-index`` of the wheel: works offline), writes ``trial.json``,
points ``current`` at it and exits with :data:`RESTART_EXIT`; the command's ack is deferred.
The new agent, once connected to the broker, renames ``trial.json`` to ``trial.confirmed`` and
acks ``ok``. If it exits or does not connect within ``healthy_within_s``, the launcher renames
``trial.json`` to ``trial.failed``, points ``current`` back, writes ``result.json`` and starts
the previous env, whose agent acks ``error`` with the reason. The rename decides the race.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any, Final
from urllib.parse import urlsplit

import msgspec

from edge_agent import __version__
from edge_agent.commands import CommandHandler, Deferred, Rejected
from edge_agent.config import UpdateSettings
from edge_agent.enroll import is_loopback
from schemas.patterns import whole
from schemas.release import VERSION_PATTERN, ReleaseError, UpdateArgs, verify
from schemas.state import Command, CommandAck

log = logging.getLogger(__name__)

#: The exit status that asks ``edge-agent-launch`` to start ``current`` again at once.
RESTART_EXIT: Final = 75
#: Set by the launcher: its base directory.
LAUNCHER_ENV: Final = "CAMPUS_EDGE_LAUNCHER"
#: Set by the launcher: the version of the env it started ("" for its own, the factory env).
ENV_VERSION_ENV: Final = "CAMPUS_EDGE_ENV"
DEPS_PTH: Final = "_campus_edge_deps.pth"


#: The most a ``current`` pointer file is read of (it holds ``envs/<version>``).
POINTER_MAX_BYTES: Final = 256
_POINTER_VERSION: Final = re.compile(whole(VERSION_PATTERN))


@dataclass(frozen=True, slots=True)
class Layout:
    """The launcher's base directory (see the module docstring)."""

    base: Path
    #: ``sys.platform`` by default; a test passes ``"win32"`` to see Windows' choices.
    platform: str = sys.platform

    @property
    def windows(self) -> bool:
        return self.platform == "win32"

    @property
    def envs(self) -> Path:
        return self.base / "envs"

    @property
    def current(self) -> Path:
        return self.base / "current"

    @property
    def trial(self) -> Path:
        return self.base / "trial.json"

    @property
    def confirmed(self) -> Path:
        return self.base / "trial.confirmed"

    @property
    def failed(self) -> Path:
        return self.base / "trial.failed"

    @property
    def result(self) -> Path:
        return self.base / "result.json"

    def env(self, version: str) -> Path:
        return self.envs / version

    def python(self, version: str) -> Path:
        """The env's interpreter: ``Scripts\\python.exe`` in a Windows venv, ``bin/python`` else."""
        if self.windows:
            return self.env(version) / "Scripts" / "python.exe"
        return self.env(version) / "bin" / "python"

    def complete(self, version: str) -> bool:
        return (self.env(version) / ".complete").is_file()

    def current_version(self) -> str | None:
        """The version ``current`` points at; None when it points nowhere (the factory env)."""
        target: str | None
        try:
            target = os.readlink(self.current)
        except OSError:
            target = self._read_pointer()
        if target is None:
            return None
        name = PureWindowsPath(target).name if self.windows else Path(target).name
        return name if _POINTER_VERSION.match(name) else None

    def _read_pointer(self) -> str | None:
        """A pointer file's ``envs/<version>`` (Windows without symlinks), or None."""
        try:
            with self.current.open("rb") as f:
                raw = f.read(POINTER_MAX_BYTES + 1)
        except OSError:  # absent, or a directory
            return None
        if len(raw) > POINTER_MAX_BYTES:
            return None
        text = raw.decode("utf-8", "replace").strip()
        return text or None

    def point(self, version: str | None) -> None:
        """Switch ``current`` atomically (None: back to the factory env): a symlink, or a
        pointer file where the OS will not make one (Windows; a filesystem without links)."""
        if version is None:
            with contextlib.suppress(FileNotFoundError):
                self.current.unlink()
            return
        tmp = self.base / ".current.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        target = f"envs/{version}"
        linked = False
        if not self.windows:
            try:
                os.symlink(target, tmp)
                linked = True
            except (OSError, NotImplementedError):
                linked = False  # e.g. a FAT or SMB data directory: the pointer file below
        if not linked:
            with tmp.open("w", encoding="utf-8") as f:
                f.write(target + "\n")
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, self.current)
        _fsync_dir(self.base)


def _fsync_dir(path: Path) -> None:
    # Windows has no directory handles to fsync (os.open of a directory fails there)
    if sys.platform != "win32":
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write a small JSON file atomically (a temp file renamed over it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(json.dumps(doc).encode())
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_bytes()[:65536])
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


class UpdateFailed(Exception):
    """The update cannot go ahead; the message is the ack's detail."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_: Any) -> None:
        return None


def check_url(url: str, *, insecure_http: bool) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise Rejected(f"url: expected https://HOST/..., got {url[:200]!r}")
    if parts.scheme == "http" and not insecure_http and not is_loopback(parts.hostname):
        raise Rejected(
            "url: plain http:// only to this machine (or with [update] insecure_http); "
            f"use https:// for {parts.hostname}"
        )


def download(url: str, limit: int, timeout_s: float = 60.0) -> bytes:
    """GET ``url`` (no redirects), at most ``limit`` bytes."""
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(url, timeout=timeout_s) as resp:
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > limit:
                raise UpdateFailed(f"the wheel is {length} bytes; at most {limit} allowed")
            data: bytes = resp.read(limit + 1)
    except urllib.error.HTTPError as exc:
        raise UpdateFailed(f"download failed: HTTP {exc.code} from {url}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UpdateFailed(f"download failed: {reason}") from None
    if len(data) > limit:
        raise UpdateFailed(f"the wheel is over {limit} bytes: refused")
    return data


def check_release(data: bytes, args: UpdateArgs, public_key: bytes) -> None:
    """Raise :class:`UpdateFailed` unless ``data`` is what the district's key signed."""
    digest = hashlib.sha256(data).hexdigest()
    if not hmac.compare_digest(digest, args.sha256):
        raise UpdateFailed(
            f"refused: the downloaded wheel's sha256 is {digest}, the command says {args.sha256}"
        )
    try:
        verify(public_key, args.version, args.sha256, args.signature)
    except ReleaseError as exc:
        raise UpdateFailed(f"refused: {exc}") from None


def dependency_paths() -> list[str]:
    """The running interpreter's site-packages directories: the new env reuses what is there."""
    return [
        p
        for p in sys.path
        if p.rstrip("/").endswith(("site-packages", "dist-packages")) and Path(p).is_dir()
    ]


def install(layout: Layout, version: str, data: bytes, timeout_s: float = 600.0) -> Path:
    """Install the (verified) wheel into ``envs/<version>``; a failure leaves no env behind."""
    env = layout.env(version)
    if env.exists():
        shutil.rmtree(env)  # an earlier attempt that did not finish, or one rolled back
    layout.envs.mkdir(parents=True, exist_ok=True)
    wheel = layout.envs / f"campus_edge-{version}-py3-none-any.whl"
    try:
        wheel.write_bytes(data)
        _run([sys.executable, "-m", "venv", "--without-pip", str(env)], timeout_s)
        python = layout.python(version)
        purelib = _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            timeout_s,
        ).strip()
        # Plain path lines: the running env's own .pth hooks (e.g. an editable install) stay out.
        (Path(purelib) / DEPS_PTH).write_text("".join(f"{p}\n" for p in dependency_paths()))
        _run(
            [
                sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                "--no-index", "--disable-pip-version-check", "--no-input", "-q", str(wheel),
            ],
            timeout_s,
        )  # fmt: skip
        (env / ".complete").write_text(f"{version}\n")
    except BaseException:
        shutil.rmtree(env, ignore_errors=True)
        raise
    finally:
        wheel.unlink(missing_ok=True)
    return env


def _run(argv: list[str], timeout_s: float) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout_s, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        raise UpdateFailed(f"install: {argv[2]} took over {timeout_s:g} s") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-500:]
        raise UpdateFailed(f"install failed ({' '.join(argv[1:3])}): {tail}")
    return done.stdout


class Updater:
    """The ``update_agent`` handler and, at start, the second half of an update (confirm/report)."""

    #: The longest a download plus install may take.
    TIMEOUT_S: Final = 900.0
    POLL_S: Final = 0.1

    def __init__(
        self,
        settings: UpdateSettings,
        commands: CommandHandler,
        online: Callable[[], bool],
        environ: dict[str, str] | None = None,
    ) -> None:
        env = os.environ if environ is None else environ
        base = env.get(LAUNCHER_ENV)
        self.layout = Layout(Path(base)) if base else None
        self.running_env = env.get(ENV_VERSION_ENV) or None
        self.settings = settings
        self._commands = commands
        self._online = online
        #: Set when a new version is in place and the agent should exit with RESTART_EXIT.
        self.restart = asyncio.Event()

    async def handle(self, cmd: Command) -> CommandAck:
        try:
            args = msgspec.convert(cmd.args, UpdateArgs)
        except msgspec.ValidationError as exc:
            raise Rejected(f"bad args: {exc}") from None
        if self.layout is None:
            raise Rejected("this agent does not run under edge-agent-launch: it cannot update")
        key = self.settings.public_key
        if key is None:
            raise Rejected("no [update] public_key_file in the local config: updates are refused")
        if args.version in (__version__, self.running_env):
            return CommandAck(
                id=cmd.id, status="ok", detail={"version": __version__, "already_running": True}
            )
        check_url(args.url, insecure_http=self.settings.insecure_http)
        layout = self.layout
        try:
            data = await asyncio.to_thread(download, args.url, self.settings.max_wheel_bytes)
            check_release(data, args, key)  # nothing is written before this passes
            log.info("update %s: %d bytes, signature good; installing", args.version, len(data))
            await asyncio.to_thread(install, layout, args.version, data)
        except UpdateFailed as exc:
            log.error("update to %s: %s", args.version, exc)
            return CommandAck(id=cmd.id, status="error", detail=str(exc))
        previous = layout.current_version()
        write_json(
            layout.trial,
            {
                "cmd_id": cmd.id,
                "version": args.version,
                "previous": previous,
                "previous_version": __version__,
                "healthy_within_s": self.settings.healthy_within_s,
            },
        )
        layout.point(args.version)
        log.info("update %s installed; restarting into it", args.version)
        self.restart.set()
        raise Deferred

    async def run(self) -> None:
        """At start: send a rolled-back update's error; confirm an update on trial once online."""
        if self.layout is None:
            return
        layout = self.layout
        if (result := read_json(layout.result)) is not None:
            cmd_id = result.get("cmd_id")
            if isinstance(cmd_id, str) and cmd_id:
                detail = str(result.get("detail", "rolled back"))
                await self._commands.report(CommandAck(id=cmd_id, status="error", detail=detail))
            layout.result.unlink(missing_ok=True)
        trial = read_json(layout.trial)
        if trial is None or trial.get("version") != self.running_env:
            return
        limit = float(trial.get("healthy_within_s", self.settings.healthy_within_s))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        for _ in range(int(limit / self.POLL_S) + 1):  # the publisher signals no event: poll
            if self._online() or loop.time() >= deadline:
                break
            await asyncio.sleep(self.POLL_S)
        if not self._online():
            return  # the launcher rolls back
        try:
            os.replace(layout.trial, layout.confirmed)
        except FileNotFoundError:
            return  # the launcher gave up first
        log.info("update to %s confirmed: connected", self.running_env)
        cmd_id = str(trial.get("cmd_id"))
        await self._commands.report(
            CommandAck(
                id=cmd_id,
                status="ok",
                detail={"version": __version__, "previous": trial.get("previous_version")},
            )
        )
