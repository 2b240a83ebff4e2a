"""The district layout in CI: a reduced district-805 (360 devices, a few seconds) through
``campus-sim run FILE --local --json``: three simulator processes, two TLS Mosquittos with the
schools split, an ingest worker each, one PostgreSQL; an ingest worker killed in the rush and
both brokers restarted. Nothing lost, nothing doubled, every device back online."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from simulators.fleet.district import DistrictBroker, check_district
from simulators.fleet.runner import FleetError
from simulators.fleet.scenario import Fault, Layout, Scenario, Tuning, load

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).parents[2]
DISTRICT = ROOT / "deploy" / "scenarios" / "district-805.toml"


def reduced() -> Scenario:
    """District-805's mix and morning, 24 schools of two classrooms, 07:42-07:54 at 60x."""
    s = load(DISTRICT)
    group = msgspec.structs.replace(s.school_groups[0], count=24, rooms=2)
    return msgspec.structs.replace(
        s,
        name="district-805 reduced",
        start="07:42",
        end="07:54",
        speed=60.0,
        tick_s=0.25,
        school_groups=[group],
        faults=[
            Fault(at="07:46", action="ingest_kill", target="s001", duration_s=1.0),
            Fault(at="07:49", action="broker_restart", target="all", duration_s=1.0),
        ],
        tuning=Tuning(
            keepalive_s=10, backoff_initial_s=0.2, backoff_max_s=2.0, puback_timeout_s=5.0
        ),
        layout=Layout(workers=3, brokers=2, tls=True, connect_concurrency=16),
    )


def test_reduced_district_loses_nothing_through_faults(tmp_path: Path) -> None:
    scenario = reduced()
    path = tmp_path / "reduced.toml"
    path.write_bytes(msgspec.toml.encode(scenario))
    done = subprocess.run(
        [sys.executable, "-m", "simulators.fleet.cli", "run", str(path), "--local", "--json",
         "--quiet", "--drain-timeout", "60"],
        capture_output=True, text=True, timeout=240, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = json.loads(done.stdout)
    assert r["devices"] == 24 * (2 * 4 + 7) == 360
    assert r["connected"] == 360
    assert r["generated"] > 3000, r
    assert r["stored"] == r["generated"] == r["acknowledged"]
    assert r["lost"] == 0
    assert r["duplicates_stored"] == 0
    assert r["unexpected"] == 0
    assert r["gaps"] == 0
    assert r["ok"] is True
    assert r["connect_s"] > 0
    assert r["layout"]["brokers"] == 2
    assert r["layout"]["tls"] is True
    # the broker restart threw every device off: each came back, its backlog re-sent
    assert r["layout"]["reconnects"] >= 360
    assert r["replayed"] > 0
    kinds = {f["action"]: f for f in r["faults"]}
    assert set(kinds) == {"ingest_kill", "broker_restart"}
    assert kinds["broker_restart"]["reconnect_s"] > 0
    assert all(f["recovered_s"] >= 0 for f in r["faults"])
    assert r["recovery_s"] is not None
    # latency split by the faults' windows: the steady part, each fault's own, per minute
    assert r["latency_steady_p99_s"] is not None
    assert r["latency_steady_p50_s"] <= r["latency_steady_p99_s"]
    assert all(f["latency_p99_s"] is not None for f in r["faults"]), r["faults"]
    assert sum(m["events"] for m in r["latency_by_minute"]) == r["stored"]
    assert set(r["cpu_s"]) == {"broker", "ingest", "postgres", "simulator"}
    assert r["cpu_s"]["simulator"] > 0


def test_district_refuses_what_it_cannot_do() -> None:
    s = reduced()
    net = msgspec.structs.replace(s, faults=[Fault(at="07:50", action="network_cut")])
    with pytest.raises(FleetError, match="network_cut is not available"):
        check_district(net, 360)
    crowded = msgspec.structs.replace(s, layout=Layout(workers=1, brokers=2))
    with pytest.raises(FleetError, match="raise \\[layout\\] workers"):
        check_district(crowded, 28_000)
    stranger = msgspec.structs.replace(s, faults=[Fault(at="07:50", action="db_restart",
                                                        target="x999")])  # fmt: skip
    with pytest.raises(FleetError, match="not 'all' or a school"):
        check_district(stranger, 360)


def test_district_broker_requires_credentials(tmp_path: Path) -> None:
    """The layout's broker config: no anonymous clients, the auth files on every listener."""
    b = DistrictBroker(tmp_path, tmp_path / "passwd", tmp_path / "acl", None)
    conf = b.conf.read_text()
    assert "allow_anonymous false" in conf
    assert "allow_anonymous true" not in conf
    assert f"password_file {tmp_path / 'passwd'}" in conf
    assert "per_listener_settings false" in conf
