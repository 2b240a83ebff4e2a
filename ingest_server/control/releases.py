"""Agent releases: signed wheels the server keeps in ``releases`` and hands to agents.

:func:`add_release` checks the wheel's signature against the district's release public key
(``--release-pubkey``) before storing it, so the server never holds the private key and never
offers a release the agents would refuse. Downloads are public (``GET
/api/v1/releases/{version}/wheel``): a wheel is not secret, its signature is the trust.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import msgspec
import psycopg

from schemas.release import (
    MAX_WHEEL_BYTES,
    ReleaseError,
    UpdateArgs,
    load_public_key,
    verify,
    wheel_version,
)

WHEEL_PATH: Final = "/api/v1/releases/{version}/wheel"
#: The command whose args :func:`check_update_args` checks before it is stored.
UPDATE_COMMAND: Final = "update_agent"
_AT: Final = re.compile(r" - at `\$\.?([^`]*)`$")


@dataclass(frozen=True, slots=True)
class Release:
    version: str
    sha256: str
    signature: str
    size: int
    created_at: datetime


def add_release(
    conn: psycopg.Connection[Any],
    wheel: Path,
    signature: str,
    pubkey: Path,
    created_by: str | None = None,
) -> Release:
    """Verify and store a release; :class:`ReleaseError` says what is wrong (nothing stored)."""
    version = wheel_version(wheel.name)
    try:
        size = wheel.stat().st_size
    except OSError as exc:
        raise ReleaseError(f"cannot read {wheel}: {exc.strerror}") from None
    if size > MAX_WHEEL_BYTES:
        raise ReleaseError(f"{wheel.name} is {size} bytes; at most {MAX_WHEEL_BYTES} allowed")
    data = wheel.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    verify(load_public_key(pubkey), version, digest, signature.strip())
    row = conn.execute(
        "INSERT INTO releases (version, sha256, signature, size, wheel, created_by) "
        "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (version) DO NOTHING RETURNING created_at",
        (version, digest, signature.strip(), len(data), data, created_by),
    ).fetchone()
    if row is None:
        raise ReleaseError(f"release {version} exists already: a version is never replaced")
    return Release(version, digest, signature.strip(), len(data), row[0])


def list_releases(conn: psycopg.Connection[Any]) -> list[Release]:
    rows = conn.execute(
        "SELECT version, sha256, signature, size, created_at FROM releases "
        "ORDER BY created_at DESC, version"
    ).fetchall()
    return [Release(*r) for r in rows]


def wheel(conn: psycopg.Connection[Any], version: str) -> tuple[str, bytes] | None:
    """(sha256, wheel bytes) of a release, or None."""
    row = conn.execute("SELECT sha256, wheel FROM releases WHERE version = %s", (version,))
    found = row.fetchone()
    return None if found is None else (str(found[0]), bytes(found[1]))


class UpdateArgsError(ValueError):
    """``update_agent`` args the server will not send; ``field`` names the arg at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"args.{field}: {message}" if field else f"args: {message}")
        self.field = field


def check_update_args(conn: psycopg.Connection[Any], args: dict[str, Any]) -> UpdateArgs:
    """``update_agent`` args as :class:`~schemas.release.UpdateArgs`, naming a release stored
    here with the same sha256 and signature (so an operator's typo fails at the API, not on
    every agent of a rollout); :class:`UpdateArgsError` otherwise. ``url`` may point anywhere
    the agents reach (a mirror): the agents check the bytes against sha256 and the key."""
    try:
        parsed = msgspec.convert(args, UpdateArgs)
    except msgspec.ValidationError as exc:
        text = str(exc)
        field = ""
        if m := _AT.search(text):
            field, text = m.group(1), text[: m.start()]
        elif m := re.search(r"field `([^`]*)`", text):
            field = m.group(1)
        raise UpdateArgsError(field, text) from None
    row = conn.execute(
        "SELECT sha256, signature FROM releases WHERE version = %s", (parsed.version,)
    ).fetchone()
    if row is None:
        raise UpdateArgsError(
            "version", f"no release {parsed.version} on this server (ingest-server release add)"
        )
    sha256, signature = str(row[0]), str(row[1])
    if not hmac.compare_digest(sha256, parsed.sha256):
        raise UpdateArgsError(
            "sha256", f"is not release {parsed.version}'s (the stored wheel's is {sha256})"
        )
    if not hmac.compare_digest(signature, parsed.signature):
        raise UpdateArgsError("signature", f"is not release {parsed.version}'s stored signature")
    return parsed
