"""The permission table of every route, and the one guard that enforces it.

:data:`ROUTES` maps each route (method, path as declared) to a :class:`Rule`: the permission a
token's role needs (:data:`auth.ROLE_PERMISSIONS`; None: no token, the route is public) and how
the endpoint keeps a school-scoped token to its schools (``scoping``):

- ``rows``: every row it returns is filtered with ``principal.sql_school_filter`` (listings,
  exports, rollups, quarantine, enrolment codes) or the live filter's schools are cut with
  ``principal.visible_schools``; a ``school=`` filter outside the token's schools matches nothing;
- ``device``: ``{device_id}`` in the path goes through ``principal.check_device`` first: 404,
  the body of an unknown device, for another school's;
- ``command``: the command's device's school is checked the same way (404 as unknown);
- ``body``: a school (or device) named in the body is checked (403 / 404);
- ``tokens``: a school admin sees and revokes only tokens within its schools, creates only
  school_admin/reader tokens for them;
- ``global``: nothing school-specific is returned (``/meta``; ``/metrics`` is district-wide
  counters, hence only district_admin and service);
- ``public``: no token (``/healthz``, ``/api/v1/enrol``: the code authenticates, the docs,
  the dashboard's static files);
- ``device_credentials``: no API token (public at the token level); the endpoint authenticates
  the device itself with its own MQTT credentials (HTTP Basic, username = ``{device_id}``,
  checked against ``device_credentials``), and it writes only as that device, to its school
  (``POST /api/v1/devices/{device_id}/up``); an API token is never accepted there;
- ``webhook``: no API token; the endpoint authenticates the vendor source by its shared secret
  or HMAC signature from its mapping file (``POST /api/v1/ingest/webhooks/{source}``).

A new endpoint: add its router with ``dependencies=[GUARD]``, its rule here, and take
``principal: Caller`` to scope what it reads or changes. ``tests/unit/test_route_permissions.py``
fails while a route of the app is missing here (or is guarded by something else).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated, Final, Literal

from fastapi import Depends, HTTPException, Request, status
from starlette.concurrency import run_in_threadpool

from ingest_server.web.api import auth

log = logging.getLogger(__name__)

Scoping = Literal[
    "rows",
    "device",
    "command",
    "body",
    "tokens",
    "global",
    "public",
    "device_credentials",
    "webhook",
]
#: The scopings of routes without an API token (the guard is not on them).
TOKENLESS: Final[frozenset[Scoping]] = frozenset({"public", "device_credentials", "webhook"})


@dataclass(frozen=True, slots=True)
class Rule:
    permission: auth.Permission | None
    scoping: Scoping
    #: ``?access_token=`` accepted (only the live stream: EventSource cannot send headers).
    query_token: bool = False


_R: Final = Rule("read", "rows")
_D: Final = Rule("read", "device")
_ROLLUPS: Final = (
    "card-taps",
    "attendance",
    "board-power",
    "board-input",
    "env",
    "device-online",
    "library",
    "library-top-items",
    "card-purchases",
    "health-checks",
    "health-vision",
)

ROUTES: Final[dict[tuple[str, str], Rule]] = {
    ("GET", "/healthz"): Rule(None, "public"),
    ("GET", "/metrics"): Rule("metrics", "global"),
    ("GET", "/openapi.json"): Rule(None, "public"),
    ("GET", "/docs"): Rule(None, "public"),
    ("GET", "/docs/assets/{name}"): Rule(None, "public"),
    ("GET", "/dashboard"): Rule(None, "public"),
    ("MOUNT", "/dashboard"): Rule(None, "public"),
    ("MOUNT", "/dashboard/vendor"): Rule(None, "public"),
    ("GET", "/api/v1/meta"): Rule("read", "global"),
    ("GET", "/api/v1/tokens"): Rule("tokens", "tokens"),
    ("POST", "/api/v1/tokens"): Rule("tokens", "tokens"),
    ("DELETE", "/api/v1/tokens/{token_id}"): Rule("tokens", "tokens"),
    ("GET", "/api/v1/devices"): _R,
    ("GET", "/api/v1/schools/summary"): _R,
    ("GET", "/api/v1/devices/{device_id}"): _D,
    ("GET", "/api/v1/events"): _R,
    ("GET", "/api/v1/readings"): _R,
    ("GET", "/api/v1/export/events.{fmt}"): Rule("export", "rows"),
    ("GET", "/api/v1/export/readings.{fmt}"): Rule("export", "rows"),
    **{("GET", f"/api/v1/rollups/{name}"): _R for name in _ROLLUPS},
    ("GET", "/api/v1/quarantine"): Rule("quarantine", "rows"),
    ("GET", "/api/v1/quarantine/reasons"): Rule("quarantine", "rows"),
    ("GET", "/api/v1/live"): Rule("live", "rows", query_token=True),
    ("POST", "/api/v1/devices/{device_id}/commands"): Rule("command", "device"),
    ("GET", "/api/v1/devices/{device_id}/commands"): _D,
    ("GET", "/api/v1/commands/{command_id}"): Rule("read", "command"),
    ("PUT", "/api/v1/devices/{device_id}/config"): Rule("config", "device"),
    ("GET", "/api/v1/devices/{device_id}/config"): _D,
    ("GET", "/api/v1/devices/{device_id}/presence"): _D,
    ("POST", "/api/v1/enrolment-codes"): Rule("enrol", "body"),
    ("GET", "/api/v1/enrolment-codes"): Rule("enrol", "rows"),
    ("POST", "/api/v1/enrol"): Rule(None, "public"),
    # device groups and rollouts: targets resolved within the caller's schools, and a rollout
    # reaching a school the caller does not cover is not found
    ("PUT", "/api/v1/devices/{device_id}/tags"): Rule("config", "device"),
    ("GET", "/api/v1/devices/{device_id}/tags"): _D,
    ("POST", "/api/v1/targets/resolve"): _R,
    ("POST", "/api/v1/rollouts"): Rule("config", "rows"),
    ("GET", "/api/v1/rollouts"): _R,
    ("GET", "/api/v1/rollouts/{rollout_id}"): _R,
    ("POST", "/api/v1/rollouts/{rollout_id}/pause"): Rule("config", "rows"),
    ("POST", "/api/v1/rollouts/{rollout_id}/resume"): Rule("config", "rows"),
    ("POST", "/api/v1/rollouts/{rollout_id}/abort"): Rule("config", "rows"),
    # alerts: read like data, acknowledged and resolved by admins, each within its schools
    ("GET", "/api/v1/alerts"): _R,
    ("GET", "/api/v1/alerts/{alert_id}"): _R,
    ("POST", "/api/v1/alerts/{alert_id}/acknowledge"): Rule("alerts", "rows"),
    ("POST", "/api/v1/alerts/{alert_id}/resolve"): Rule("alerts", "rows"),
    # signed agent releases: the list for any reader; a wheel is public (its signature is
    # what an agent trusts, and agents hold no API token)
    ("GET", "/api/v1/releases"): Rule("read", "global"),
    ("GET", "/api/v1/releases/{version}/wheel"): Rule(None, "public"),
    # HTTP ingest: a device with its own credentials, a vendor platform with its secret
    ("POST", "/api/v1/devices/{device_id}/up"): Rule(None, "device_credentials"),
    ("POST", "/api/v1/ingest/webhooks/{source}"): Rule(None, "webhook"),
}


def rule_of(request: Request) -> Rule | None:
    """The rule of the route this request matched (None: not in the table)."""
    route = request.scope.get("route")
    path = getattr(route, "path", None)
    return None if path is None else ROUTES.get((request.method, path))


async def guard(request: Request) -> auth.Principal:
    """FastAPI dependency of every guarded router: the request's principal, let in only if its
    role has the permission :data:`ROUTES` gives this route. A route not in the table is
    refused: forgetting a rule closes an endpoint, never opens it.

    A token checked within ``auth.CACHE_S`` is answered on the event loop (no I/O); only a
    lookup in the database goes to a worker thread. That hop cost every request ~0.1-1 ms
    (more on a loaded machine), a large share of a small answer's time.
    """
    rule = rule_of(request)
    if rule is None or rule.permission is None:
        log.error("route %s %s has no rule in access.ROUTES: refused", request.method,
                  request.url.path)  # fmt: skip
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, "this endpoint has no permission rule on this server"
        )
    try:
        return auth.authenticate(request, rule.permission, rule.query_token, cached_only=True)
    except auth.NotCached:
        return await run_in_threadpool(
            auth.authenticate, request, rule.permission, rule.query_token
        )


#: Put on each guarded ``APIRouter`` (``dependencies=[GUARD]``).
GUARD: Final = Depends(guard)
#: An endpoint's parameter: the caller's principal (the guard's, computed once per request).
Caller = Annotated[auth.Principal, Depends(guard)]
