"""Staged fleet rollouts on the real stack: Mosquitto, PostgreSQL, the ingest server (its
control plane and rollout runner) and 20 device processes, each a real MQTT client answering
``cmd`` and ``config`` as the agent does (``simulators/fleet/ack_agent.py``); four of them
reject every config."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ingest_server.server import IngestServer
from simulators.harness import Mosquitto, shared_tmpdir, wait_until
from simulators.harness_pipeline import Proc
from tests.api_client import Api, _settings

pytestmark = pytest.mark.integration

SCHOOL = "s001"
DEVICES = [f"d{i:02d}" for i in range(20)]
REJECTING = {"d03", "d04", "d05", "d06"}


class Fleet:
    def __init__(self, broker: Mosquitto, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[str, Proc] = {}
        self.broker = f"{broker.host}:{broker.port}"

    def start(self, device: str) -> None:
        argv = [
            sys.executable, "-m", "simulators.fleet.ack_agent", "--broker", self.broker,
            "--school", SCHOOL, "--device", device,
            "--state-file", str(self.workdir / f"{device}.json"),
        ]  # fmt: skip
        if device in REJECTING:
            argv += ["--reject-config", "this unit refuses remote configs"]
        proc = Proc(argv, self.workdir / f"{device}.log")
        proc.start()
        self.procs[device] = proc

    def applied(self, device: str) -> dict[str, Any]:
        path = self.workdir / f"{device}.json"
        if not path.exists():
            return {"config_version": None, "config": None, "commands": []}
        result: dict[str, Any] = json.loads(path.read_text())
        return result

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate(5)


@pytest.fixture
def fleet(mosquitto: Mosquitto) -> Iterator[Fleet]:
    workdir = shared_tmpdir("campus-rollouts-")
    f = Fleet(mosquitto, workdir)
    try:
        yield f
    finally:
        f.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def rollout(api: Api, rid: int, **query: Any) -> dict[str, Any]:
    qs = "&".join(f"{k}={v}" for k, v in {"limit": 1000, **query}.items())
    status, body = api("GET", f"/api/v1/rollouts/{rid}?{qs}")
    assert status == 200, body
    result: dict[str, Any] = body
    return result


def by_device(detail: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["device_id"]: d for d in detail["devices"]}


def test_canary_rollouts_halt_finish_pause_and_reach_offline_devices(
    mosquitto: Mosquitto, db_url: str, tmp_path: Path, fleet: Fleet
) -> None:
    cfg = dataclasses.replace(_settings(mosquitto, db_url, tmp_path), rollout_tick_s=0.2)
    with IngestServer(cfg) as srv:
        wait_until(cfg.token_file.exists, 60, "the bootstrap admin token")
        api = Api(srv)
        with psycopg.connect(db_url, autocommit=True) as conn:
            for d in DEVICES:
                conn.execute(
                    "INSERT INTO devices (device_id, school_id, kind) VALUES (%s, %s, %s)",
                    (d, SCHOOL, "env_sensor"),
                )
        for d in DEVICES:
            fleet.start(d)

        def online() -> int:
            status, body = api("GET", f"/api/v1/devices?school={SCHOOL}&state=online")
            return len(body) if status == 200 else 0

        wait_until(lambda: online() == 20, 60, "20 devices online")

        # 1. canary 2, batch 5, max failure share 0.3: the second batch meets the rejecting
        # devices; the rollout halts and the devices after them are never touched
        strategy = {"canary": 2, "batch_size": 5, "max_failure_share": 0.3, "device_timeout_s": 60}
        status, bad = api(
            "POST",
            "/api/v1/rollouts",
            {"target": {"schools": [SCHOOL]}, "config": {"drivers": []}, "strategy": strategy},
        )
        assert status == 201, bad
        assert (bad["state"], bad["total"], bad["canary"]) == ("running", 20, 2)
        wait_until(lambda: rollout(api, bad["id"])["state"] == "halted", 60, "the halt")
        # what was issued before the halt still settles
        wait_until(lambda: rollout(api, bad["id"])["counts"]["sent"] == 0, 30, "batch 2 settled")
        got = rollout(api, bad["id"])
        rows = by_device(got)
        assert got["batches"] == 2, got
        assert "settled devices failed" in got["reason"]
        assert [rows[d]["outcome"] for d in DEVICES[:3]] == ["ok"] * 3
        for d in sorted(REJECTING):
            assert rows[d]["outcome"] == "failed", rows[d]
            assert rows[d]["detail"] == "rejected: this unit refuses remote configs"
        rest = DEVICES[7:]
        assert all(rows[d]["outcome"] == "pending" and rows[d]["batch"] is None for d in rest)
        assert got["counts"] == {"pending": 13, "sent": 0, "ok": 3, "failed": 4, "skipped": 0}
        assert all(fleet.applied(d)["config_version"] is None for d in rest)
        assert fleet.applied("d00")["config"] == {"drivers": []}
        with psycopg.connect(db_url) as conn:
            untouched = conn.execute(
                "SELECT count(*) FROM device_config WHERE device_id = ANY(%s)", (rest,)
            ).fetchone()
        assert untouched == (0,)
        # abort: the untouched rest is skipped, and nothing can resume it
        status, aborted = api("POST", f"/api/v1/rollouts/{bad['id']}/abort")
        assert (status, aborted["state"]) == (200, "aborted")
        assert aborted["counts"]["skipped"] == 13
        status, refused = api("POST", f"/api/v1/rollouts/{bad['id']}/resume")
        assert status == 409
        assert "aborted" in refused["detail"]

        # 2. a good rollout by tag, paused after its start, with one device offline
        good = [d for d in DEVICES if d not in REJECTING]
        for d in good:
            status, tags = api("PUT", f"/api/v1/devices/{d}/tags", {"tags": ["pilot", "floor-1"]})
            assert (status, tags["tags"]) == (200, ["floor-1", "pilot"])
        fleet.procs["d12"].kill()  # SIGKILL: its will says offline
        wait_until(lambda: online() == 19, 30, "d12 offline")
        config = {"drivers": [{"type": "synthetic", "name": "gen", "rate": 5}]}
        status, run = api(
            "POST",
            "/api/v1/rollouts",
            {"target": {"tags": ["pilot"]}, "config": config, "strategy": strategy},
        )
        assert (status, run["total"]) == (201, 16), run
        status, paused = api("POST", f"/api/v1/rollouts/{run['id']}/pause")
        assert (status, paused["state"]) == (200, "paused")
        issued = paused["batches"]
        runner = srv.rollouts
        assert runner is not None
        wait_until(
            lambda: rollout(api, run["id"])["counts"]["sent"] == 0, 30, "issued devices settled"
        )
        passes = runner.passes
        wait_until(lambda: runner.passes >= passes + 3, 30, "three more runner passes")
        held = rollout(api, run["id"])
        assert (held["state"], held["batches"]) == ("paused", issued), held
        assert held["counts"]["pending"] > 0
        status, resumed = api("POST", f"/api/v1/rollouts/{run['id']}/resume")
        assert (status, resumed["state"]) == (200, "running")

        def all_but_offline_ok() -> bool:
            r = rollout(api, run["id"])
            return r["counts"]["ok"] == 15 and r["counts"]["pending"] == 1

        wait_until(all_but_offline_ok, 60, "15 devices ok, the offline one pending")
        waiting = rollout(api, run["id"])
        d12 = by_device(waiting)["d12"]
        assert waiting["state"] == "running"
        assert d12["outcome"] == "pending"
        assert d12["detail"] == "waiting for the device to come online"
        assert d12["batch"] is not None  # issued: it gets it when it is back
        fleet.start("d12")
        wait_until(lambda: rollout(api, run["id"])["state"] == "done", 60, "done")
        done = rollout(api, run["id"])
        assert done["counts"] == {"pending": 0, "sent": 0, "ok": 16, "failed": 0, "skipped": 0}
        assert all(fleet.applied(d)["config"] == config for d in good)

        # 3. a command rollout carries any command; an update_agent's args are checked first
        #    (the signed-update rollouts on real agents: tests/integration/test_agent_update.py)
        status, bad_update = api(
            "POST",
            "/api/v1/rollouts",
            {
                "target": {"devices": ["d00"]},
                "command": {"name": "update_agent", "args": {"version": "9.9.9"}},
            },
        )
        assert status == 422, bad_update
        (err,) = bad_update["detail"]
        assert err["loc"] == ["body", "command", "args", "url"]
        assert err["msg"] == "update_agent args.url: Object missing required field `url`"
        status, cmd = api(
            "POST",
            "/api/v1/rollouts",
            {
                "target": {"devices": ["d00", "d01", "d02", "d03", "d07"]},
                "command": {"name": "flush_outbox", "args": {"reason": "rollout test"}},
                "strategy": {"canary": 1, "batch_size": 2},
            },
        )
        assert status == 201, cmd
        wait_until(lambda: rollout(api, cmd["id"])["state"] == "done", 60, "command rollout")
        rows = by_device(rollout(api, cmd["id"]))
        assert {d: r["outcome"] for d, r in rows.items()} == dict.fromkeys(rows, "ok")
        for d, r in rows.items():
            assert r["command_id"] in fleet.applied(d)["commands"]
            assert api.command(r["command_id"])["status"] == "ok"

        status, listed = api("GET", "/api/v1/rollouts")
        assert [r["id"] for r in listed] == [cmd["id"], run["id"], bad["id"]]
        assert [r["state"] for r in listed] == ["done", "done", "aborted"]
