"""``python -m bench fleet [SCENARIO] [--speed X]``: a district fleet on local services, its report.

Default: deploy/scenarios/district-1000.toml (1,000 lightweight agents in one process, each
with its own SQLite outbox and MQTT connection, into Mosquitto → ingest server → PostgreSQL).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import time
from pathlib import Path

import msgspec

from simulators.fleet.runner import Fleet, Progress, local_services
from simulators.fleet.scenario import load
from simulators.harness import shared_tmpdir

DEFAULT = Path(__file__).parents[1] / "deploy" / "scenarios" / "district-1000.toml"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench fleet")
    p.add_argument("scenario", nargs="?", type=Path, default=DEFAULT)
    p.add_argument("--speed", type=float)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    scenario = load(args.scenario)
    if args.speed:
        scenario = msgspec.structs.replace(scenario, speed=args.speed)
    workdir = shared_tmpdir("campus-bench-fleet-")
    t0 = time.monotonic()
    try:
        with local_services(workdir / "services") as services:
            report = asyncio.run(Fleet(scenario, services, workdir, progress=Progress()).run())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(report.to_json() if args.json else report.table())
    print(f"total with service start and stop: {time.monotonic() - t0:.1f} s")
    return 0 if report.ok else 1
