"""The running API fuzzed against its own OpenAPI schema (schemathesis), over seeded data.

Bounded: ``MAX_EXAMPLES`` generated requests per operation. Every response must be free of
5xx and match the schema the app publishes. Read endpoints go with a read token, admin ones
(quarantine, tokens) with an admin token. Not fuzzed: the live stream (it never ends) and
token revocation (it would revoke the tokens this test uses).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
)

from simulators.api_seed import api_server, make_tokens, seed
from simulators.harness import Postgres

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 15
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]


@pytest.fixture(scope="module")
def running(pg_server: Postgres) -> Iterator[dict[str, Any]]:
    name = f"t_fuzz_{uuid.uuid4().hex[:8]}"
    db_url = pg_server.create_database(name)
    try:
        seed(db_url)
        tokens = make_tokens(db_url)
        with api_server(db_url) as http:
            yield {"url": http.url, "tokens": tokens}
    finally:
        pg_server.drop_database(name)


# schemathesis's own strategies draw from the global `random` (its generation/dictionaries.py);
# hypothesis flags that once it has seen other tests' strategies in the same session.
@pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies"
    ":hypothesis.errors.HypothesisDeprecationWarning"
)
def test_api_conforms_to_its_schema(running: dict[str, Any]) -> None:
    schema = schemathesis.openapi.from_url(running["url"] + "/openapi.json")
    schema = schema.exclude(path="/api/v1/live").exclude(method="DELETE")
    tried = []
    for result in schema.get_all_operations():
        operation = result.ok()
        admin = operation.path.startswith(("/api/v1/quarantine", "/api/v1/tokens"))
        headers = {"Authorization": f"Bearer {running['tokens']['admin' if admin else 'read']}"}

        @given(case=operation.as_strategy())
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,  # the same requests every run: a failure here is reproducible
            database=None,
        )
        def fuzz(case: Any) -> None:
            case.call_and_validate(headers=headers, checks=CHECKS, timeout=30)  # noqa: B023

        fuzz()  # at once, in this iteration: the closure's headers are this operation's
        tried.append(operation.label)
    assert len(tried) >= 18, tried  # every operation but the excluded ones
