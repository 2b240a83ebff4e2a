"""Agent releases: signed wheels the server keeps in ``releases`` and hands to agents.

:func:`add_release` checks the wheel's signature against the district's release public key
(``--release-pubkey``) before storing it, so the server never holds the private key and never
offers a release the agents would refuse. Downloads are public (``GET
/api/v1/releases/{version}/wheel``): a wheel is not secret, its signature is the trust.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import psycopg

from schemas.release import MAX_WHEEL_BYTES, ReleaseError, load_public_key, verify, wheel_version

WHEEL_PATH: Final = "/api/v1/releases/{version}/wheel"


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
