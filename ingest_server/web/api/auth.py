"""API tokens with a role and optional schools, kept as SHA-256 digests; the :class:`Principal`.

A token is ``cet_`` + 43 URL-safe characters (256 random bits), shown once when created. Being
random and long, a plain SHA-256 is a sound digest for it (no password stretching needed), and
lookups stay one index probe. A token in a URL ends up in access logs, proxies and browser
history, so ``?access_token=`` is accepted only where a browser cannot send
``Authorization: Bearer`` (the live stream's EventSource); anywhere else it is refused.

Roles and scoping: one mechanism
--------------------------------
Each token has a role (:data:`ROLE_PERMISSIONS`: ``district_admin`` everything; ``school_admin``
data, commands, config, enrolment codes, quarantine and tokens of its schools; ``reader`` data,
export and live stream; ``service`` the data platform: data, export, live stream and /metrics of
every school) and ``schools`` (None: every school). A request's token is its :class:`Principal`.

How an endpoint is guarded (see :mod:`ingest_server.web.api.access`):

1. Its ``APIRouter`` has ``dependencies=[access.GUARD]``; the guard looks the route up in
   :data:`access.ROUTES` (method, path) -> ``Rule(permission, scoping)`` and lets the token in
   only if its role has the permission. A route missing from the table is refused (403) and
   ``tests/unit/test_route_permissions.py`` fails, so a new endpoint cannot forget its rule.
2. The endpoint takes ``principal: access.Caller`` (the same, cached) and scopes what it touches:
   ``principal.check_device(conn, device_id)`` for a device in the path (404, the same body as an
   unknown device, for one of another school); ``principal.sql_school_filter("school_id")`` ANDed
   into every listing, export and rollup query; ``principal.check_school(s)`` for a school named
   in a body; ``principal.visible_schools(...)`` for the live stream's filter.

``require("read")`` / ``require("admin")`` remain for routers not yet classified: "read" is any
role that may read data, "admin" is ``district_admin`` only (an unscoped endpoint must not be
opened to a school's administrator).
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Literal, cast, get_args

import psycopg
from fastapi import HTTPException, Request, WebSocket, status
from psycopg import sql
from psycopg.rows import tuple_row
from psycopg_pool import PoolTimeout

from ingest_server.control.enrolment import FailureLimiter
from ingest_server.storage.files import put_file
from schemas.topics import ID_PATTERN, ID_RE

Scope = Literal["read", "admin"]
SCOPES: Final[tuple[Scope, ...]] = ("read", "admin")
Role = Literal["district_admin", "school_admin", "reader", "service"]
ROLES: Final[tuple[Role, ...]] = get_args(Role)
#: What a role may do; a school-scoped token does it only for its schools.
Permission = Literal[
    "read",
    "export",
    "live",
    "quarantine",
    "command",
    "config",
    "enrol",
    "tokens",
    "metrics",
    "alerts",
]
PERMISSIONS: Final[tuple[Permission, ...]] = get_args(Permission)
ROLE_PERMISSIONS: Final[dict[Role, frozenset[Permission]]] = {
    "district_admin": frozenset(PERMISSIONS),
    "school_admin": frozenset(
        {"read", "export", "live", "quarantine", "command", "config", "enrol", "tokens", "alerts"}
    ),
    "reader": frozenset({"read", "export", "live"}),
    "service": frozenset({"read", "export", "live", "metrics"}),
}
#: The old ``--scope`` / ``scopes`` values and the role each stands for.
SCOPE_ROLES: Final[dict[str, Role]] = {"admin": "district_admin", "read": "reader"}
#: Roles a token may be limited to schools with (school_admin must be, reader may be).
SCHOOL_ROLES: Final = frozenset({"school_admin", "reader"})
MAX_SCHOOLS: Final = 1000
#: One body for "unknown" and "another school's": a scoped token learns nothing of the other.
NO_DEVICE: Final = "no device {!r} is known"
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


def legacy_scopes(role: str) -> list[str]:
    """The old ``scopes`` a role is shown as: ``admin`` only for district_admin (it meant all)."""
    return ["admin"] if role == "district_admin" else ["read"]


def role_of_scopes(scopes: Iterable[str]) -> Role:
    """The role the old scopes stand for (``admin`` wins); ValueError for anything else."""
    given = set(scopes)
    bad = sorted(given - set(SCOPES))
    if bad or not given:
        raise ValueError(f"scopes must be some of {list(SCOPES)}, got {sorted(given)}")
    return SCOPE_ROLES["admin"] if "admin" in given else SCOPE_ROLES["read"]


def check_grant(role: str, schools: Iterable[str] | None) -> frozenset[str] | None:
    """``schools`` as stored for ``role`` (None: every school); ValueError naming the fault."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {list(ROLES)}, got {role!r}")
    wanted = None if schools is None else frozenset(schools)
    if wanted is not None:
        if role not in SCHOOL_ROLES:
            raise ValueError(f"a {role} token covers every school: give no schools")
        if not wanted:
            raise ValueError("schools: give at least one school, or none for every school")
        if len(wanted) > MAX_SCHOOLS:
            raise ValueError(f"schools: at most {MAX_SCHOOLS}, got {len(wanted)}")
        bad = sorted(s for s in wanted if not ID_RE.match(s))
        if bad:
            raise ValueError(f"schools: {bad[0]!r} does not match {ID_PATTERN}")
    elif role == "school_admin":
        raise ValueError("a school_admin token needs its schools (--school S, or schools: [...])")
    return wanted


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts as: its token's role and schools (None: every school)."""

    id: int
    name: str
    role: Role
    schools: frozenset[str] | None = None

    @property
    def scopes(self) -> frozenset[str]:
        """The old scopes (``admin``: district-wide administration), for older clients."""
        return frozenset(legacy_scopes(self.role))

    @property
    def district_wide(self) -> bool:
        return self.schools is None

    def may(self, permission: Permission) -> bool:
        return permission in ROLE_PERMISSIONS[self.role]

    def allows(self, scope: Scope) -> bool:
        """The old check: ``read`` is reading data, ``admin`` district administration."""
        return self.may("read") if scope == "read" else self.role == "district_admin"

    def sees(self, school: str) -> bool:
        return self.schools is None or school in self.schools

    def visible_schools(self, wanted: frozenset[str] | None) -> frozenset[str] | None:
        """The schools a filter may cover: ``wanted`` cut to this token's (None: every one).
        Asking for schools outside them gives an empty set: nothing, not an error."""
        if self.schools is None:
            return wanted
        return self.schools if wanted is None else wanted & self.schools

    def sql_school_filter(self, column: str) -> tuple[sql.Composable, list[Any]]:
        """A condition limiting ``column`` (a school id, may be ``alias.col``) to this token's
        schools, and its one parameter (none for a district-wide token): AND it in."""
        if self.schools is None:
            return sql.SQL("true"), []
        ident = sql.Identifier(*column.split("."))
        return sql.SQL("{} = ANY(%s)").format(ident), [sorted(self.schools)]

    def check_school(self, school: str) -> None:
        """403 unless this token may act for ``school`` (a school named in a request body)."""
        if not self.sees(school):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"token {self.name!r} may act only for schools {sorted(self.schools or ())}; "
                f"not for {school!r}",
            )

    def check_device(self, conn: psycopg.Connection[Any], device_id: str) -> str:
        """The device's school; 404 if it is unknown or of a school this token does not cover
        (the same body: its existence is not revealed)."""
        row = conn.execute(
            "SELECT school_id FROM devices WHERE device_id = %s", (device_id,)
        ).fetchone()
        if row is None or not self.sees(str(row[0])):
            raise HTTPException(status.HTTP_404_NOT_FOUND, NO_DEVICE.format(device_id))
        return str(row[0])

    def may_grant(self, role: Role, schools: frozenset[str] | None) -> str | None:
        """Why this token may not create a ``role`` token for ``schools``; None if it may."""
        if self.role == "district_admin":
            return None
        if not self.may("tokens"):
            return f"a {self.role} token may not create tokens"
        if role not in SCHOOL_ROLES:
            return f"a {self.role} token may not create a {role} token"
        if schools is None or self.schools is None or not schools <= self.schools:
            return (
                f"a {self.role} token may create tokens only for its schools "
                f"{sorted(self.schools or ())}"
            )
        return None


#: The name the rest of the server knew the principal by.
Token = Principal


@dataclass(frozen=True, slots=True)
class TokenInfo:
    id: int
    name: str
    role: str
    schools: list[str] | None
    scopes: list[str]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def create_token(
    conn: psycopg.Connection[Any],
    name: str,
    role: Role | list[str],
    schools: Iterable[str] | None = None,
) -> tuple[int, str]:
    """Store a new token's digest; return its id and the token (the only time it is seen).

    ``role`` may also be a list of the old scopes (``["read"]``: reader, ``["admin"]``:
    district_admin). ValueError names what is wrong.
    """
    role = role_of_scopes(role) if isinstance(role, list) else role
    wanted = check_grant(role, schools)
    if not name.strip():
        raise ValueError("a token needs a name saying who or what uses it")
    token = PREFIX + secrets.token_urlsafe(32)
    row = conn.execute(
        "INSERT INTO api_tokens (name, token_sha256, role, schools, scopes)"
        " VALUES (%s, %s, %s, %s, %s) RETURNING id",
        (
            name,
            digest(token),
            role,
            None if wanted is None else sorted(wanted),
            legacy_scopes(role),
        ),
    ).fetchone()
    assert row is not None
    return int(row[0]), token


def _visible_tokens(by: Principal | None) -> tuple[sql.Composable, list[Any]]:
    """Tokens ``by`` may see and revoke: all for a district-wide admin (or the CLI, None);
    for a school-scoped one, those limited to a subset of its schools."""
    if by is None or by.role == "district_admin":
        return sql.SQL("true"), []
    if by.schools is None:
        return sql.SQL("false"), []
    return sql.SQL("schools IS NOT NULL AND schools <@ %s::text[]"), [sorted(by.schools)]


def list_tokens(conn: psycopg.Connection[Any], by: Principal | None = None) -> list[TokenInfo]:
    cond, params = _visible_tokens(by)
    query = sql.SQL(
        "SELECT id, name, role, schools, scopes, created_at, last_used_at, revoked_at"
        " FROM api_tokens WHERE {} ORDER BY id"
    ).format(cond)
    rows = conn.cursor(row_factory=tuple_row).execute(query, params).fetchall()
    return [TokenInfo(*row) for row in rows]


def revoke_token(conn: psycopg.Connection[Any], token_id: int, by: Principal | None = None) -> bool:
    cond, params = _visible_tokens(by)
    query = sql.SQL(
        "UPDATE api_tokens SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL AND {}"
    ).format(cond)
    cur = conn.execute(query, [token_id, *params])
    return cur.rowcount == 1


def _principal(row: Any) -> Principal:
    """A token row (id, name, role, schools) as the principal it makes."""
    schools = None if row[3] is None else frozenset(row[3])
    return Principal(int(row[0]), row[1], cast(Role, row[2]), schools)


class TooManyFailures(Exception):
    def __init__(self, client: str, retry_after_s: float) -> None:
        super().__init__(f"too many invalid API tokens from {client}; try again later")
        self.retry_after_s = retry_after_s


class NotCached(Exception):
    """The token is not in the checker's cache: checking it needs the database (a thread)."""


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

    def check(
        self, token: str, client: str | None = None, cached_only: bool = False
    ) -> Token | None:
        """The token's record, or None if it is not valid.

        ``cached_only``: raise :class:`NotCached` rather than ask the database, so the event
        loop can answer from the cache and hand only a miss to a worker thread.

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
        if cached_only:
            raise NotCached
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
                        " AND revoked_at IS NULL RETURNING id, name, role, schools",
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
                return Principal(0, "bootstrap", "district_admin")
            raise
        found = None if row is None else _principal(row)
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


def authenticate(
    conn: Request | WebSocket,
    permission: Permission,
    query_token: bool = False,
    cached_only: bool = False,
) -> Principal:
    """The caller's principal if its role has ``permission``; 401 (none or unknown) or 403.

    ``query_token``: also take ``?access_token=`` (for clients that cannot set headers).
    ``cached_only``: :class:`NotCached` instead of a database lookup (see
    :meth:`TokenChecker.check`); nothing is counted or changed then.
    """
    presented = _presented(conn, query_token)
    if presented is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "an API token is required: send 'Authorization: Bearer <token>' "
            "(create one with: ingest-server token create --name NAME --role reader)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    checker: TokenChecker = conn.app.state.tokens
    client = conn.client.host if conn.client else "unknown"
    try:
        token = checker.check(presented, client, cached_only)
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
    if not token.may(permission):
        raise forbidden(token, permission)
    conn.state.token = token  # for per-token limits (live streams, exports)
    return token


def forbidden(token: Principal, permission: Permission) -> HTTPException:
    """403 naming the token's role and the roles that would do."""
    roles = [r for r in ROLES if permission in ROLE_PERMISSIONS[r]]
    return HTTPException(
        status.HTTP_403_FORBIDDEN,
        f"token {token.name!r} has role {token.role!r}, which may not do this "
        f"(needs {permission!r}: roles {', '.join(roles)})",
    )


def require(scope: Scope, query_token: bool = False) -> Callable[[Request], Principal]:
    """FastAPI dependency of routers not yet in ``access.ROUTES``: ``read`` lets in any role
    that reads data; ``admin`` only ``district_admin`` (see the module's docstring)."""

    def dependency(request: Request) -> Principal:
        token = authenticate(request, "read", query_token)
        if scope == "admin" and token.role != "district_admin":
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"token {token.name!r} has role {token.role!r}; this needs 'district_admin'",
            )
        return token

    return dependency


def bootstrap(conn: psycopg.Connection[Any], path: Path) -> str | None:
    """Make sure an administrator can get in; return what was done, for the log.

    A token already in ``path`` is registered (district_admin) if the database does not know
    it yet, so a deployment can provision it; with no file and no active district_admin token,
    a new one is created and written to ``path`` (mode 0600). A revoked token is never brought back.
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
                "INSERT INTO api_tokens (name, token_sha256, role, scopes)"
                " VALUES (%s, %s, 'district_admin', %s)",
                (f"bootstrap ({path.name})", digest(token), ["admin"]),
            )
            return f"registered the admin token in {path}"
        return f"the token in {path} is revoked" if row[0] else None
    active = conn.execute(
        "SELECT 1 FROM api_tokens WHERE role = 'district_admin' AND revoked_at IS NULL LIMIT 1"
    ).fetchone()
    if active is not None:
        return None
    _, token = create_token(conn, f"bootstrap ({path.name})", "district_admin")
    # appears whole or not at all: whoever waits for the file (a provisioning script, a test)
    # must never read it empty; never over a file that appeared meanwhile
    put_file(path, token + "\n", 0o600, replace=False)
    return f"no admin token existed: created one in {path} (readable by this user only)"
