"""``edge-agent-launch``: run the agent of the ``current`` env, restart it into updates, roll back.

``edge-agent-launch --base /var/lib/campus-edge/agent -- run --config /etc/campus-edge/agent.toml``
starts ``<base>/envs/<v>/bin/python -m edge_agent run ...`` for the env ``current`` names
(``Scripts\\python.exe`` on Windows, where ``current`` may be a pointer file instead of a symlink;
see :class:`~edge_agent.update.Layout`), or, without ``current``, the agent of the launcher's own
environment, and supervises it: exit status
:data:`~edge_agent.update.RESTART_EXIT` starts ``current`` again at once (an update switched
it); an update on trial (``trial.json``) that exits or does not confirm within its
``healthy_within_s`` is rolled back (see :mod:`edge_agent.update`); any other exit ends the
launcher with the agent's status, for systemd to restart. SIGTERM/SIGINT go to the agent.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Final

from edge_agent.update import (
    ENV_VERSION_ENV,
    LAUNCHER_ENV,
    RESTART_EXIT,
    Layout,
    read_json,
    write_json,
)

log = logging.getLogger("edge_agent.launch")
POLL_S: Final = 0.2
STOP_TIMEOUT_S: Final = 30.0


class Launcher:
    def __init__(self, base: Path, agent_args: list[str]) -> None:
        self.layout = Layout(base)
        self.agent_args = agent_args
        self.stopping = False
        self.child: subprocess.Popen[bytes] | None = None

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def start(self, version: str | None) -> subprocess.Popen[bytes]:
        env = {**os.environ, LAUNCHER_ENV: str(self.layout.base), ENV_VERSION_ENV: version or ""}
        if version is None:
            argv = [sys.executable, "-m", "edge_agent"]
        else:
            # isolated (-I): an installed env is whole; neither PYTHONPATH nor the working
            # directory may shadow its packages
            argv = [str(self.layout.python(version)), "-I", "-m", "edge_agent"]
            env.pop("PYTHONPATH", None)
        log.info("starting the agent of %s", f"env {version}" if version else "the factory env")
        return subprocess.Popen([*argv, *self.agent_args], env=env, cwd=self.layout.base)

    def run(self) -> int:
        self.layout.base.mkdir(parents=True, exist_ok=True)
        while True:
            version = self.layout.current_version()
            if version is not None and not self.layout.complete(version):
                pending = read_json(self.layout.trial)
                mine = pending is not None and pending.get("version") == version
                why = f"env {version} is missing or incomplete"
                self.roll_back(version, why, claimed=mine and self.claim())
                continue
            trial = read_json(self.layout.trial)
            if trial is not None and trial.get("version") != version:
                trial = None
            self.child = child = self.start(version)
            started = time.monotonic()
            limit = float(trial.get("healthy_within_s", 120)) if trial else 0.0
            while (code := child.poll()) is None:
                if trial is not None:
                    if self.layout.confirmed.exists():
                        self.layout.confirmed.unlink(missing_ok=True)
                        log.info("update to %s confirmed by the agent", version)
                        trial = None
                    elif time.monotonic() - started > limit and self.claim():
                        self.stop(child)
                        assert version is not None
                        self.roll_back(
                            version, f"no broker connection within {limit:g} s", claimed=True
                        )
                        break
                time.sleep(POLL_S)
            else:
                if self.stopping:
                    return code
                if trial is not None and self.claim():
                    assert version is not None
                    why = f"it exited with status {code} before connecting to the broker"
                    self.roll_back(version, why, claimed=True)
                    continue
                if code == RESTART_EXIT:
                    continue
                return code
            if self.stopping:
                return 0

    def claim(self) -> bool:
        """Take the trial from the agent (a rename: exactly one of the two wins)."""
        try:
            os.rename(self.layout.trial, self.layout.failed)
        except FileNotFoundError:
            return False
        return True

    def stop(self, child: subprocess.Popen[bytes]) -> None:
        child.terminate()
        try:
            child.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()

    def roll_back(self, version: str, why: str, *, claimed: bool = False) -> None:
        trial = read_json(self.layout.failed) if claimed else None
        previous = trial.get("previous") if trial else None
        if not (isinstance(previous, str) and self.layout.complete(previous)):
            previous = None
        self.layout.point(previous)
        detail = f"update to {version} rolled back: {why}; running {previous or 'the factory env'}"
        log.error("%s", detail)
        if trial is not None:
            write_json(self.layout.result, {"cmd_id": trial.get("cmd_id"), "detail": detail})
        with contextlib.suppress(FileNotFoundError):
            self.layout.failed.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-agent-launch", description=__doc__)
    parser.add_argument(
        "--base",
        type=Path,
        default=Path("/var/lib/campus-edge/agent"),
        help="where envs/, current and the update state live (default: %(default)s)",
    )
    parser.add_argument("agent_args", nargs=argparse.REMAINDER, help="-- run --config FILE")
    args = parser.parse_args(argv)
    agent_args = list(args.agent_args)
    if agent_args[:1] == ["--"]:
        agent_args = agent_args[1:]
    if not agent_args:
        parser.error("give the agent's arguments after --, e.g. -- run --config FILE")
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    launcher = Launcher(args.base.absolute(), agent_args)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, launcher.on_signal)
    return launcher.run()


if __name__ == "__main__":
    raise SystemExit(main())
