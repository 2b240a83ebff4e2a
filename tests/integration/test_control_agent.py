"""End to end: a real edge agent process receives ``ping`` and ``flush_outbox`` sent through
the API, and its acks are what the API then reports."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest_server.server import IngestServer
from simulators.harness import Mosquitto, shared_tmpdir, wait_until
from simulators.harness_pipeline import Agent
from tests.api_client import Api, _settings

pytestmark = pytest.mark.integration


@pytest.fixture
def agent(mosquitto: Mosquitto) -> Iterator[Agent]:
    # a directory of its own: pytest may prune old basetemps while other sessions run
    workdir = shared_tmpdir("campus-ctl-agent-")
    proc = Agent(workdir, "env-0101", mosquitto.url, count=5)
    proc.start()
    try:
        yield proc
    finally:
        proc.terminate()
        shutil.rmtree(workdir, ignore_errors=True)


def test_agent_acks_commands_sent_through_the_api(
    mosquitto: Mosquitto, db_url: str, tmp_path: Path, agent: Agent
) -> None:
    cfg = _settings(mosquitto, db_url, tmp_path)
    with IngestServer(cfg) as srv:
        wait_until(cfg.token_file.exists, 60, "the bootstrap admin token")
        api = Api(srv)

        def online() -> bool:
            status, body = api("GET", "/api/v1/devices/env-0101/presence")
            return status == 200 and body["state"] == "online"

        try:
            wait_until(online, 30, "the agent online")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; the agent's log:\n{agent.tail()}") from None
        path = "/api/v1/devices/env-0101/commands"
        status, ping = api("POST", path, {"name": "ping", "id": "e2e-ping"})
        assert ping["status"] == "pending"
        assert status == 201
        status, flush = api("POST", path, {"name": "flush_outbox"})
        assert status == 201
        status, bogus = api("POST", path, {"name": "self_destruct"})
        assert status == 201

        assert api.wait_status("e2e-ping", "ok", 30)["detail"] is None
        flushed = api.wait_status(flush["id"], "ok", 30)
        assert isinstance(flushed["detail"]["depth"], int)
        refused = api.wait_status(bogus["id"], "rejected", 30)
        assert "unknown command 'self_destruct'" in refused["detail"]
        assert agent.running
