"""What differs between Linux and Windows for the agent, in one place.

- :func:`try_lock` / :func:`unlock`: a non-blocking lock on an open file (``flock`` on POSIX,
  ``msvcrt.locking`` of the first byte on Windows), so a second agent on the same outbox is
  refused rather than interleaving seqs.
- :func:`default_config` / :func:`default_data_dir` / :func:`default_outbox`: where the config
  and the outbox live by default (``/etc/campus-edge`` and ``/var/lib/campus-edge`` on Linux,
  ``%ProgramData%\\campus-edge`` on Windows).
- :func:`install_stop_handlers`: the signals that stop ``edge-agent run`` (SIGTERM and SIGINT;
  on Windows Ctrl+C, Ctrl+Break and the service wrapper's stop, which is a Ctrl+C), through the
  event loop where it can, else through :func:`signal.signal`.
- :data:`PCSC_SERVICE`: what serves PC/SC here, for messages that say what to start.

Modules of the agent import no POSIX-only module themselves: the import test
(``tests/unit/test_windows_portability.py``) imports them all with those modules unavailable.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import PurePath, PurePosixPath, PureWindowsPath
from types import FrameType
from typing import Final

WINDOWS: Final = sys.platform == "win32"
#: What serves PC/SC on this platform (pcsc-lite's daemon, or Windows' Smart Card service).
PCSC_SERVICE: Final = "the Smart Card service (SCardSvr)" if WINDOWS else "pcscd"
PCSC_START_HINT: Final = (
    "Services → Smart Card → Start, startup type Automatic"
    if WINDOWS
    else "pcscd, or systemctl start pcscd"
)


# --- file locks -----------------------------------------------------------------------------


def try_lock(fd: int, *, shared: bool = False) -> bool:
    """Lock the open file ``fd`` without waiting; False when another holder has it.

    ``shared`` asks for a shared lock where there is one (POSIX); Windows' byte-range lock is
    always exclusive. The lock goes with the file descriptor: :func:`unlock` or closing it ends it.
    """
    if sys.platform == "win32":
        import msvcrt  # noqa: PLC0415 - Windows only

        # msvcrt.locking locks bytes from the current position: byte 0 is the lock, whatever
        # the file holds (Windows lets a range beyond the end be locked).
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:  # EACCES / EDEADLOCK: another handle holds the byte
            return False
        return True
    else:  # noqa: RET505 - the else keeps mypy --platform win32 from calling this unreachable
        import fcntl  # noqa: PLC0415 - POSIX only: kept off Windows' import path

        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


def unlock(fd: int) -> None:
    """End a lock :func:`try_lock` took on ``fd`` (closing ``fd`` ends it too)."""
    if sys.platform == "win32":
        import msvcrt  # noqa: PLC0415 - Windows only

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        import fcntl  # noqa: PLC0415 - POSIX only: kept off Windows' import path

        fcntl.flock(fd, fcntl.LOCK_UN)


# --- default paths --------------------------------------------------------------------------


def default_data_dir(
    platform: str = sys.platform, environ: Mapping[str, str] = os.environ
) -> PurePath:
    """Where the agent keeps its outbox and secrets by default."""
    if platform == "win32":
        # %ProgramData% is C:\ProgramData on every current Windows; the fallback covers a
        # service started with a stripped environment.
        base = environ.get("ProgramData") or environ.get("PROGRAMDATA") or r"C:\ProgramData"
        return PureWindowsPath(base, "campus-edge")
    return PurePosixPath("/var/lib/campus-edge")


def default_config(
    platform: str = sys.platform, environ: Mapping[str, str] = os.environ
) -> PurePath:
    """The agent's config file by default (``/etc`` on Linux, beside the data on Windows)."""
    if platform == "win32":
        return default_data_dir(platform, environ) / "agent.toml"
    return PurePosixPath("/etc/campus-edge/agent.toml")


def default_outbox(
    platform: str = sys.platform, environ: Mapping[str, str] = os.environ
) -> PurePath:
    """The outbox database by default."""
    return default_data_dir(platform, environ) / "outbox.db"


# --- stopping -------------------------------------------------------------------------------


def stop_signals(platform: str = sys.platform) -> tuple[signal.Signals, ...]:
    """The signals that ask ``edge-agent run`` to stop cleanly on this platform."""
    if platform == "win32":
        # Ctrl+C (also what WinSW and NSSM send on a service stop), Ctrl+Break; SIGTERM only
        # arrives from inside the process on Windows but costs nothing to catch.
        sigs = [signal.SIGINT, signal.SIGTERM]
        brk = getattr(signal, "SIGBREAK", None)
        if isinstance(brk, signal.Signals):
            sigs.insert(1, brk)
        return tuple(sigs)
    return (signal.SIGTERM, signal.SIGINT)


def install_stop_handlers(
    loop: asyncio.AbstractEventLoop,
    stop: Callable[[], None],
    signals: tuple[signal.Signals, ...] | None = None,
) -> Callable[[], None]:
    """Call ``stop`` on the loop when one of ``signals`` arrives; returns what undoes it.

    The loop's own handlers where it has them (Unix loops); elsewhere (Windows' proactor loop
    raises NotImplementedError) :func:`signal.signal`, whose handler runs on the main thread
    and hands over with ``call_soon_threadsafe``, which also wakes the loop.
    """
    undo: list[Callable[[], None]] = []
    for sig in stop_signals() if signals is None else signals:
        try:
            loop.add_signal_handler(sig, stop)
        except NotImplementedError:
            previous = signal.getsignal(sig)

            def handler(signum: int, frame: FrameType | None) -> None:
                loop.call_soon_threadsafe(stop)

            signal.signal(sig, handler)
            undo.append(functools.partial(_restore, sig, previous))
        else:
            undo.append(functools.partial(_remove, loop, sig))

    def undo_all() -> None:
        for step in reversed(undo):
            step()

    return undo_all


def _remove(loop: asyncio.AbstractEventLoop, sig: signal.Signals) -> None:
    loop.remove_signal_handler(sig)


def _restore(sig: signal.Signals, previous: signal._HANDLER) -> None:
    # None: a handler set outside Python; the default is the best that can be put back
    signal.signal(sig, signal.SIG_DFL if previous is None else previous)
