"""``campus-sim``: run a district scenario against a broker and a database, and account for it.

    campus-sim run SCENARIO --broker mqtt://HOST:PORT --db postgresql://...
    campus-sim run SCENARIO --local        # its own Mosquitto, PostgreSQL and ingest server
    campus-sim check SCENARIO              # validate the file and print what it describes

Exit status: 0 when every event is stored exactly once, 1 when any is lost or doubled,
2 when the scenario or the command line is wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import sys
from collections import Counter
from pathlib import Path

import msgspec

from simulators.fleet.district import run_local
from simulators.fleet.runner import (
    Fleet,
    FleetError,
    Progress,
    Services,
    device_specs,
    local_services,
)
from simulators.fleet.scenario import Scenario, ScenarioError, load
from simulators.harness import shared_tmpdir


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="campus-sim", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run a scenario and print the accounting report")
    run.add_argument("scenario", type=Path)
    run.add_argument("--broker", help="MQTT broker URL the agents and ingest server use")
    run.add_argument("--db", help="libpq URL of the ingest server's database")
    run.add_argument(
        "--local",
        action="store_true",
        help="start a private Mosquitto, PostgreSQL 15 and ingest server on loopback",
    )
    run.add_argument("--speed", type=float, help="override the scenario's time compression")
    run.add_argument("--json", action="store_true", help="print the report as JSON")
    run.add_argument("--workdir", type=Path, help="outboxes and service data (default: a temp dir)")
    run.add_argument("--drain-timeout", type=float, default=120.0, metavar="S")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    run.add_argument("-v", "--verbose", action="store_true")
    chk = sub.add_parser("check", help="validate a scenario file")
    chk.add_argument("scenario", type=Path)
    return p


def describe(s: Scenario) -> str:
    specs = device_specs(s)
    kinds = Counter(d.kind.value for d in specs)
    lines = [
        f"{s.name}: {len(s.all_schools)} school(s), {len(specs)} devices "
        f"({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))})",
        f"{s.start}-{s.end} at speed {s.speed:g}: {s.wall_seconds:.0f} s wall",
    ]
    if s.health_s:
        lines.append(f"health from every device every {s.health_s:g} s (simulated)")
    if s.layout.multi:
        lo = s.layout
        lines.append(
            f"layout: {lo.workers} simulator process(es), {lo.brokers} broker(s) with an ingest "
            f"worker each, one database; {'TLS' if lo.tls else 'plain TCP'}"
        )
    lines += [f"fault at {f.at}: {f.action} on {f.target}" for f in s.faults]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.ERROR,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        scenario = load(args.scenario)
    except ScenarioError as exc:
        print(f"campus-sim: {exc}", file=sys.stderr)
        return 2
    if args.cmd == "check":
        print(describe(scenario))
        return 0
    if args.speed:
        scenario = msgspec.structs.replace(scenario, speed=args.speed)
    if args.local == bool(args.broker and args.db) or bool(args.broker) != bool(args.db):
        print("campus-sim: give either --local or both --broker and --db", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(scenario, args))
    except (FleetError, ScenarioError) as exc:
        print(f"campus-sim: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


async def _run(scenario: Scenario, args: argparse.Namespace) -> int:
    workdir = args.workdir or shared_tmpdir("campus-sim-")
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)  # PostgreSQL runs as its own user and must reach its data dir
    progress = Progress(quiet=args.quiet)
    try:
        if scenario.layout.multi or scenario.health_s:
            if not args.local:
                raise FleetError("a scenario with a [layout] or health_s runs only with --local")
            report = await run_local(
                scenario, workdir, progress=progress, drain_timeout_s=args.drain_timeout
            )
        elif args.local:
            with local_services(workdir / "services") as services:
                report = await Fleet(
                    scenario,
                    services,
                    workdir,
                    progress=progress,
                    drain_timeout_s=args.drain_timeout,
                ).run()
        else:
            services = Services(args.broker, args.db)
            report = await Fleet(
                scenario, services, workdir, progress=progress, drain_timeout_s=args.drain_timeout
            ).run()
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(report.to_json() if args.json else report.table())
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
