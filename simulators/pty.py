"""The device end of a simulated serial device: a raw pty behind a stable symlink."""

from __future__ import annotations

import contextlib
import os
import tty
from collections.abc import Iterable
from pathlib import Path


def open_pty(avoid: str | None = None) -> tuple[int, int, str]:
    """A raw pty pair ``(master, slave)`` and its /dev/pts name, which is never ``avoid``.

    Passing the previous name makes a re-plug visibly a new device, as a re-enumerated adapter is.
    """
    master, slave = os.openpty()
    if os.ttyname(slave) == avoid:
        spare = (master, slave)  # held open meanwhile, so the next pty gets another number
        master, slave = os.openpty()
        close_fds(spare)
    tty.setraw(slave)
    return master, slave, os.ttyname(slave)


def point_link(link: Path, target: str | Path) -> None:
    """Point the symlink ``link`` at ``target`` in one step: an opener never finds it missing."""
    staging = link.with_name(f".{link.name}.new")
    staging.unlink(missing_ok=True)
    staging.symlink_to(target)
    staging.replace(link)


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
