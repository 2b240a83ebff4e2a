"""API tokens with scopes, kept as SHA-256 digests; the ``require(scope)`` dependency.

A token is ``cet_`` + 43 URL-safe characters (256 random bits), shown once when created. Being
random and long, a plain SHA-256 is a sound digest for it (no password stretching needed), and
lookups stay one index probe. ``admin`` includes ``read``. A token in a URL ends up in access
logs, proxies and browser history, so ``?access_token=`` is accepted only where a browser cannot
send ``Authorization: Bearer`` (the live stream's EventSource); anywhere else it is refused.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Literal

import psycopg
from fastapi import HTTPException, Request, WebSocket, status
from psycopg.rows import tuple_row
from psycopg_pool import PoolTimeout

from ingest_server.control.enrolment import FailureLimiter

Scope = Literal["read", "admin"]
SCOPES: Final[tuple[Scope, ...]] = ("read", "admin")
PREFIX: Final = "cet_"
#: How long a checked token is trusted without asking the database again (revocation delay).
CACHE_S: Final = 5.0
#: How long a checked token is still trusted while the database cannot be asked.
STALE_S: Final = 3600.0
#: Query parameters that carry a token; only endpoints that allow it read ``access_token``.
QUERY_TOKEN_PARAMS: Final = ("access_token", "token")
#: Lengths a token can have (issued ones are ``PREFIX`` + 43; a provisioned one may be longer,
#: see :func:`bootstrap`); anything else, or without the prefix, is refused without a query.
TOKEN_LENS: Final = range(len(PREFIX) + 32, 257)
#: Token lookups that may use pooled connections at once (the API pool has 4), so a flood of
#: unknown tokens cannot take every connection.
MAX_LOOKUPS: Final = 2
#: Failed token checks a client address may make in ``FAILED_WINDOW_S`` before it gets 429.
MAX_FAILED: Final = 60
FAILED_WINDOW_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class Token:
    id: int
    name: str
    scopes: frozenset[str]

    def allows(self, scope: Scope) -> bool:
        return scope in self.scopes or "admin" in self.scopes


@dataclass(frozen=True, slots=True)
class TokenInfo:
    id: int
    name: str
    scopes: list[str]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def create_token(conn: psycopg.Connection[Any], name: str, scopes: list[str]) -> tuple[int, str]:
    """Store a new token's digest; return its id and the token (the only time it is seen)."""
    bad = sorted(set(scopes) - set(SCOPES))
    if bad or not scopes:
        raise ValueError(f"scopes must be some of {list(SCOPES)}, got {scopes}")
    if not name.strip():
        raise ValueError("a token needs a name saying who or what uses it")
    token = PREFIX + secrets.token_urlsafe(32)
    row = conn.execute(
        "INSERT INTO api_tokens (name, token_sha256, scopes) VALUES (%s, %s, %s) RETURNING id",
        (name, digest(token), sorted(set(scopes))),
    ).fetchone()
    assert row is not None
    return int(row[0]), token


def list_tokens(conn: psycopg.Connection[Any]) -> list[TokenInfo]:
    cur = conn.cursor(row_factory=tuple_row)
    rows = cur.execute(
        "SELECT id, name, scopes, created_at, last_used_at, revoked_at FROM api_tokens ORDER BY id"
    ).fetchall()
    return [TokenInfo(*row) for row in rows]


def revoke_token(conn: psycopg.Connection[Any], token_id: int) -> bool:
    cur = conn.execute(
        "UPDATE api_tokens SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL",
        (token_id,),
    )
    return cur.rowcount == 1


class TooManyFailures(Exception):
    def __init__(self, client: str, retry_after_s: float) -> None:
        super().__init__(f"too many invalid API tokens from {client}; try again later")
        self.retry_after_s = retry_after_s


class TokenChecker:
    """Looks tokens up by digest, with a short cache so each request is not a query."""

    def __init__(self, connect: Callable[[], Any], bootstrap_file: Path | None = None) -> None:
        self._connect = connect  # a context manager yielding a psycopg connection (a pool's)
        self._bootstrap_file = bootstrap_file
        self._cache: dict[bytes, tuple[float, Token | None]] = {}
        self._lock = threading.Lock()
        self._lookups = threading.BoundedSemaphore(MAX_LOOKUPS)
        #: Failed checks per client address (see :func:`authenticate`).
        self.failures = FailureLimiter(MAX_FAILED, FAILED_WINDOW_S)

    def check(self, token: str, client: str | None = None) -> Token | None:
        """The token's record, or None if it is not valid.

        Raises :class:`TooManyFailures` when ``client`` has failed too often lately and the
        token is not one known good: a client behind the same address with a token checked
        within ``STALE_S`` still gets in, but no new lookup is made for that address.
        """
        if len(token) not in TOKEN_LENS or not token.startswith(PREFIX):
            return None  # not one this server could have issued: no query
        key = digest(token)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and now - hit[0] < CACHE_S:
            return hit[1]
        if client is not None and (wait := self.failures.retry_after(client)) is not None:
            if hit is not None and hit[1] is not None and now - hit[0] < STALE_S:
                return hit[1]
            raise TooManyFailures(client, wait)
        try:
            if not self._lookups.acquire(timeout=CACHE_S):
                raise PoolTimeout(f"{MAX_LOOKUPS} token lookups are waiting on the database")
            try:
                with self._connect() as conn:
                    row = conn.execute(
                        "UPDATE api_tokens SET last_used_at = now() WHERE token_sha256 = %s"
                        " AND revoked_at IS NULL RETURNING id, name, scopes",
                        (key,),
                    ).fetchone()
            finally:
                self._lookups.release()
        except (psycopg.Error, PoolTimeout):
            # The database is down: a token it accepted lately still opens /metrics and the
            # like (stale-if-error), so watching an outage does not need the database.
            if hit is not None and now - hit[0] < STALE_S:
                return hit[1]
            if self._is_bootstrap(key):
                return Token(0, "bootstrap", frozenset({"admin"}))
            raise
        found = None if row is None else Token(int(row[0]), row[1], frozenset(row[2]))
        with self._lock:
            if len(self._cache) > 10_000:  # bounded: a flood of wrong tokens cannot grow it
                self._cache.clear()
            self._cache[key] = (now, found)
        return found

    def _is_bootstrap(self, key: bytes) -> bool:
        try:
            text = self._bootstrap_file.read_text(encoding="utf-8") if self._bootstrap_file else ""
        except OSError:
            return False
        return bool(text.strip()) and secrets.compare_digest(digest(text.strip()), key)


def _presented(conn: Request | WebSocket, query_token: bool) -> str | None:
    in_query = [p for p in QUERY_TOKEN_PARAMS if p in conn.query_params]
    if in_query and (not query_token or in_query != ["access_token"]):
        also = " (or, on this endpoint only, ?access_token=)" if query_token else ""
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            f"API tokens are not accepted in the query string (?{in_query[-1]}=): URLs end up "
            f"in logs and browser history. Send 'Authorization: Bearer <token>'{also}",
            headers={"WWW-Authenticate": "Bearer"},
        )
    header = conn.headers.get("authorization")
    if header:
        kind, _, value = header.partition(" ")
        if kind.lower() != "bearer" or not value.strip():
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "the Authorization header must be 'Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return value.strip()
    return conn.query_params.get("access_token")


def authenticate(conn: Request | WebSocket, scope: Scope, query_token: bool = False) -> Token:
    """The caller's token if it grants ``scope``; 401 (none or unknown) or 403 (too narrow).

    ``query_token``: also take ``?access_token=`` (for clients that cannot set headers).
    """
    presented = _presented(conn, query_token)
    if presented is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "an API token is required: send 'Authorization: Bearer <token>' "
            "(create one with: ingest-server token create --name NAME --scope read)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    checker: TokenChecker = conn.app.state.tokens
    client = conn.client.host if conn.client else "unknown"
    try:
        token = checker.check(presented, client)
    except TooManyFailures as exc:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            str(exc),
            headers={"Retry-After": str(int(exc.retry_after_s) + 1)},
        ) from None
    if token is None:
        checker.failures.failed(client)
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "this API token is not valid: unknown or revoked",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    if not token.allows(scope):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"token {token.name!r} has scopes {sorted(token.scopes)}; this needs {scope!r}",
        )
    conn.state.token = token  # for per-token limits (live streams, exports)
    return token


def require(scope: Scope, query_token: bool = False) -> Callable[[Request], Token]:
    """FastAPI dependency: the request's token, which must grant ``scope`` (``query_token``:
    ``?access_token=`` is taken too; only for the live stream's EventSource)."""

    def dependency(request: Request) -> Token:
        return authenticate(request, scope, query_token)

    return dependency


def bootstrap(conn: psycopg.Connection[Any], path: Path) -> str | None:
    """Make sure an administrator can get in; return what was done, for the log.

    A token already in ``path`` is registered (admin) if the database does not know it yet, so
    a deployment can provision it; with no file and no active admin token, a new one is
    created and written to ``path`` (mode 0600). A revoked token is never brought back.
    """
    if path.exists():
        token = path.read_text(encoding="utf-8").strip()
        if not token.startswith(PREFIX) or len(token) < len(PREFIX) + 32:
            return f"{path} does not hold an API token ({PREFIX}...); ignored"
        row = conn.execute(
            "SELECT revoked_at IS NOT NULL FROM api_tokens WHERE token_sha256 = %s",
            (digest(token),),
        ).fetchone()
        if row is None:
            conn.execute(
                "INSERT INTO api_tokens (name, token_sha256, scopes) VALUES (%s, %s, %s)",
                (f"bootstrap ({path.name})", digest(token), ["admin"]),
            )
            return f"registered the admin token in {path}"
        return f"the token in {path} is revoked" if row[0] else None
    active = conn.execute(
        "SELECT 1 FROM api_tokens WHERE 'admin' = ANY(scopes) AND revoked_at IS NULL LIMIT 1"
    ).fetchone()
    if active is not None:
        return None
    _, token = create_token(conn, f"bootstrap ({path.name})", ["admin"])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    return f"no admin token existed: created one in {path} (readable by this user only)"
