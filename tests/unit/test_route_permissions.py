"""Every route of the app has a rule in ``access.ROUTES`` and is guarded by it; the roles, the
principal's scoping helpers and who may grant what."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.routing import Mount, Route

from ingest_server.metrics import IngestMetrics
from ingest_server.web.api import access, auth
from ingest_server.web.app import create_app
from simulators.api_seed import _Healthy


@pytest.fixture(scope="module")
def app() -> FastAPI:
    # a database nobody listens on: the pool opens without waiting and is closed at once
    made = create_app(_Healthy(), IngestMetrics(), "postgresql://nobody@127.0.0.1:9/none")
    made.state.pool.close()
    return made


def routes(items: list[Any]) -> Iterator[tuple[tuple[str, str], Any]]:
    """(method, path) of every route, included routers walked (FastAPI keeps them lazily)."""
    for route in items:
        original = getattr(route, "original_router", None)
        if original is not None:
            yield from routes(original.routes)
        elif isinstance(route, Mount):
            yield ("MOUNT", route.path), route
        elif isinstance(route, APIRoute | Route):
            for method in sorted((route.methods or set()) - {"HEAD"}):
                yield (method, route.path), route
        else:
            raise AssertionError(f"a route of an unknown kind: {route!r}")


def calls(dependant: Any) -> Iterator[Any]:
    for dep in dependant.dependencies:
        yield dep.call
        yield from calls(dep)


def test_every_route_is_classified_and_every_rule_is_a_route(app: FastAPI) -> None:
    found = dict(routes(app.routes))
    unclassified = sorted(set(found) - set(access.ROUTES))
    assert not unclassified, f"routes without a rule in access.ROUTES: {unclassified}"
    stale = sorted(set(access.ROUTES) - set(found))
    assert not stale, f"rules of routes the app does not have: {stale}"
    assert len(found) >= 30  # the walk did reach the included routers


def test_guarded_routes_depend_on_the_guard_and_public_ones_do_not(app: FastAPI) -> None:
    for key, route in routes(app.routes):
        rule = access.ROUTES[key]
        if not isinstance(route, APIRoute):
            assert rule.permission is None, f"{key} is not an API route: it cannot be guarded"
            continue
        deps = list(calls(route.dependant))
        if rule.permission is None:
            assert access.guard not in deps, key
            assert rule.scoping in access.TOKENLESS, key
        else:
            assert access.guard in deps, f"{key} has a rule but not the guard"
            assert rule.scoping not in access.TOKENLESS, key
        # the guard alone decides: the old scope dependencies must not linger
        assert not any(getattr(d, "__qualname__", "").startswith("require.") for d in deps), key


def test_device_paths_are_scoped_by_device() -> None:
    for (method, path), rule in access.ROUTES.items():
        scoped = rule.scoping in ("device", "device_credentials")
        assert ("{device_id}" in path) == scoped, (method, path, rule)
        assert rule.query_token == (path == "/api/v1/live"), (method, path)


def test_roles_table() -> None:
    perms = auth.ROLE_PERMISSIONS
    assert perms["district_admin"] == frozenset(auth.PERMISSIONS)
    writes = {"command", "config", "tokens", "enrol", "alerts"}
    assert not perms["service"] & writes
    assert {"read", "export", "live", "metrics"} <= perms["service"]
    assert not perms["reader"] & (writes | {"metrics", "quarantine"})
    assert writes | {"quarantine"} <= perms["school_admin"]
    assert "metrics" not in perms["school_admin"]
    # the writes of the table need a role that has them
    reads_by_post = {("POST", "/api/v1/targets/resolve")}  # a target in a body, changes nothing
    for (method, path), rule in access.ROUTES.items():
        if (method, path) in reads_by_post:
            continue
        if method in {"POST", "PUT", "DELETE"} and rule.permission is not None:
            assert rule.permission in writes, (method, path)


def test_principal_scoping_helpers() -> None:
    district = auth.Principal(1, "d", "district_admin")
    school = auth.Principal(2, "s", "school_admin", frozenset({"s001", "s003"}))
    cond, params = district.sql_school_filter("d.school_id")
    assert (cond.as_string(None), params) == ("true", [])
    cond, params = school.sql_school_filter("d.school_id")
    assert (cond.as_string(None), params) == ('"d"."school_id" = ANY(%s)', [["s001", "s003"]])
    assert school.visible_schools(None) == {"s001", "s003"}
    assert school.visible_schools(frozenset({"s001", "s002"})) == {"s001"}
    assert school.visible_schools(frozenset({"s002"})) == frozenset()
    assert district.visible_schools(None) is None
    assert school.sees("s003")
    assert not school.sees("s002")
    assert (school.scopes, district.scopes) == ({"read"}, {"admin"})
    assert school.allows("read")
    assert not school.allows("admin")
    with pytest.raises(Exception, match="not for 's002'"):
        school.check_school("s002")


def test_who_may_grant_what() -> None:
    school = auth.Principal(2, "s", "school_admin", frozenset({"s001", "s003"}))
    assert school.may_grant("reader", frozenset({"s001"})) is None
    assert school.may_grant("school_admin", frozenset({"s001", "s003"})) is None
    assert "only for its schools" in (school.may_grant("reader", frozenset({"s002"})) or "")
    assert "only for its schools" in (school.may_grant("reader", None) or "")
    assert "district_admin" in (school.may_grant("district_admin", None) or "")
    assert "service" in (school.may_grant("service", None) or "")
    reader = auth.Principal(3, "r", "reader")
    assert "may not create tokens" in (reader.may_grant("reader", frozenset({"s001"})) or "")
    assert auth.Principal(1, "d", "district_admin").may_grant("service", None) is None


@pytest.mark.parametrize(
    ("role", "schools", "message"),
    [
        ("root", None, "role must be one of"),
        ("school_admin", None, "needs its schools"),
        ("service", ["s001"], "covers every school"),
        ("district_admin", ["s001"], "covers every school"),
        ("reader", [], "at least one school"),
        ("reader", ["S 1"], "does not match"),
        # a final newline is not the end of a school id (Python's `$` would let it through)
        ("reader", ["s001\n"], r"does not match \^\[a-z0-9\]\[a-z0-9_-\]\{0,63\}\$"),
    ],
)
def test_bad_grants_name_the_fault(role: str, schools: list[str] | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        auth.check_grant(role, schools)


def test_old_scopes_map_to_roles() -> None:
    assert auth.role_of_scopes(["read"]) == "reader"
    assert auth.role_of_scopes(["admin"]) == "district_admin"
    assert auth.role_of_scopes(["read", "admin"]) == "district_admin"
    with pytest.raises(ValueError, match="scopes must be some of"):
        auth.role_of_scopes(["root"])
