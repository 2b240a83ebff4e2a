"""Files other programs read while we write them: they appear whole or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def put_file(path: Path, text: str, mode: int, *, replace: bool) -> None:
    """Write ``text`` beside ``path`` (synced, ``mode``), then move it into place: over an
    existing file with ``replace`` (one rename: readers see the old or the new), else only if
    there is none (a link: :class:`FileExistsError` if one appeared meanwhile)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staged = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(staged, mode)
        if replace:
            os.replace(staged, path)
        else:
            os.link(staged, path)
    finally:
        Path(staged).unlink(missing_ok=True)


__all__ = ["put_file"]
