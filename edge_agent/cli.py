"""``edge-agent``: enrol a device, run the agent, show its outbox, or check the gateway."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sqlite3
import sys
from pathlib import Path

from edge_agent.agent import Agent, config_store_path
from edge_agent.clock import ClockError, measure
from edge_agent.config import DEFAULT_OUTBOX, AgentConfig, ConfigError, load_config
from edge_agent.doctor import run as doctor_run
from edge_agent.enroll import EnrollError, enroll
from edge_agent.outbox import Outbox, OutboxError
from edge_agent.portable import default_config, install_stop_handlers
from edge_agent.update import RESTART_EXIT

log = logging.getLogger("edge_agent")


def _setup_logging(verbosity: int) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if verbosity >= 2 else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    if verbosity == 1:
        logging.getLogger("edge_agent").setLevel(logging.DEBUG)
    if verbosity < 2:  # paho's packet trace only at -vv
        logging.getLogger("edge_agent.mqtt").setLevel(logging.WARNING)


async def _run(config: AgentConfig) -> int:
    """Run until SIGTERM/SIGINT (0) or until an update asks for a restart (RESTART_EXIT)."""
    stop = asyncio.Event()
    undo = install_stop_handlers(asyncio.get_running_loop(), stop.set)
    try:
        async with Agent(config) as agent:
            assert agent.updater is not None
            waits = [asyncio.ensure_future(e.wait()) for e in (stop, agent.updater.restart)]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            restart = agent.updater.restart.is_set() and not stop.is_set()
            log.info("stopping%s", " to restart into the update" if restart else "")
    finally:
        undo()
    return RESTART_EXIT if restart else 0


def cmd_run(config: AgentConfig) -> int:
    return asyncio.run(_run(config))


def cmd_status(config: AgentConfig, *, as_json: bool) -> int:
    path = config.outbox_path
    if not path.exists():
        print(f"edge-agent: no outbox at {path} yet (the agent has not run)", file=sys.stderr)
        return 1
    with Outbox(path, readonly=True) as outbox:
        s = outbox.stats()
    version = _config_version(path)
    offset, clock = _clock(config)
    if as_json:
        doc = {
            "device_id": config.device.id,
            "outbox": str(path),
            "depth": s.depth,
            "oldest_unsent_s": s.oldest_age_s,
            "highest_seq": s.highest_seq,
            "boot": s.boot,
            "dropped": s.dropped,
            "config_version": version,
            "clock_offset_s": offset,
        }
        print(json.dumps(doc))
        return 0
    oldest = "-" if s.oldest_age_s is None else f"{s.oldest_age_s:.1f} s"
    print(f"device          {config.device.id} ({config.device.kind})")
    print(f"outbox          {path}")
    print(f"unsent events   {s.depth}")
    print(f"oldest unsent   {oldest}")
    print(f"highest seq     {s.highest_seq}")
    print(f"boots           {s.boot}")
    print(f"remote config   {'-' if version is None else f'version {version}'}")
    print(f"clock offset    {clock}")
    if s.dropped:
        total = sum(s.dropped.values())
        kinds = ", ".join(f"{t} {n}" for t, n in sorted(s.dropped.items()))
        print(f"DROPPED         {total} unsent event(s) over the quota or a full disk: {kinds}")
    return 0


def _clock(config: AgentConfig) -> tuple[float | None, str]:
    """The clock offset against the config's reference, measured now, and a line saying it."""
    if not config.clock.reference:
        return None, "- (no [clock] reference in the config)"
    try:
        sample = asyncio.run(measure(config.clock.reference, config.clock.timeout_s))
    except ClockError as exc:
        return None, f"unknown: {exc}"
    return round(sample.offset_s, 3), f"{sample.offset_s:+.3f} s: {sample.describe()}"


def _config_version(outbox: Path) -> int | None:
    try:
        doc = json.loads(config_store_path(outbox).read_bytes())
    except (OSError, ValueError):
        return None
    version = doc.get("version") if isinstance(doc, dict) else None
    return version if isinstance(version, int) else None


def cmd_enroll(args: argparse.Namespace) -> int:
    try:
        written = enroll(
            args.server,
            args.code,
            args.config,
            kind=args.kind,
            room=args.room,
            outbox_path=args.outbox,
            force=args.force,
            insecure=args.insecure,
            ca_file=args.ca,
        )
    except EnrollError as exc:
        print(f"edge-agent enroll: {exc}", file=sys.stderr)
        return 1
    floor = f"; seqs continue above {written.seq_floor}" if written.seq_floor else ""
    print(
        f"enrolled as {written.device_id} (school {written.school_id}){floor}; "
        f"config written to {written.config}. Start it with: edge-agent run --config "
        f"{written.config}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run the agent")
    run.add_argument("--config", type=Path, required=True, help="the agent's TOML config")
    run.add_argument("-v", "--verbose", action="count", default=0, help="-v debug, -vv with MQTT")
    status = sub.add_parser("status", help="show the outbox: unsent events, highest seq, boots")
    status.add_argument("--config", type=Path, required=True, help="the agent's TOML config")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    doctor = sub.add_parser(
        "doctor",
        help="check config, broker, clock, outbox, hardware and drivers",
        description="A check-up of this gateway: one OK / WARN / FAIL line per check, saying "
        "what to do about each problem. Exit status: 0 when no check FAILs (WARNs allowed), "
        "1 when any check FAILs, 2 when the config file is unusable.",
    )
    doctor.add_argument("--config", type=Path, required=True, help="the agent's TOML config")
    doctor.add_argument(
        "--server",
        metavar="URL",
        help="check the clock against this URL (default: the config's [clock] reference), "
        "e.g. the ingest server's http://HOST:PORT/healthz or ntp://HOST",
    )
    doctor.add_argument("--json", action="store_true", help="print a JSON list of checks")
    enrol = sub.add_parser(
        "enroll",
        help="enrol this device with a one-time code and write its config",
        description="Ask the server for this device's identity and credentials with a one-time "
        "enrolment code, and write the agent config (secrets in 0600 files beside it).",
    )
    enrol.add_argument(
        "--server",
        required=True,
        metavar="URL",
        help="e.g. https://ingest:8080 (http:// only to this machine, or with --insecure)",
    )
    enrol.add_argument(
        "--ca",
        type=Path,
        metavar="FILE",
        help="PEM CA certificate that signed the https server's certificate (a private CA)",
    )
    enrol.add_argument(
        "--insecure",
        action="store_true",
        help="allow plain http:// to another machine: the MQTT password and the district "
        "hashing key then cross the network unencrypted",
    )
    enrol.add_argument("--code", required=True, help="the one-time enrolment code")
    enrol.add_argument(
        "--config",
        type=Path,
        default=Path(default_config()),
        help="where to write the config (default: %(default)s)",
    )
    enrol.add_argument("--kind", default="gateway", help="device kind (default: %(default)s)")
    enrol.add_argument("--room", help="the room this device is in")
    enrol.add_argument(
        "--outbox",
        help=f"the outbox path (default: outbox.db beside the config; {DEFAULT_OUTBOX} is usual)",
    )
    enrol.add_argument("--force", action="store_true", help="replace an existing config")
    args = parser.parse_args(argv)
    if args.cmd == "enroll":
        return cmd_enroll(args)
    if args.cmd == "doctor":
        return doctor_run(args.config, server=args.server, as_json=args.json)

    try:
        config = load_config(args.config)
        if args.cmd == "status":
            return cmd_status(config, as_json=args.json)
        _setup_logging(args.verbose)
        with contextlib.suppress(KeyboardInterrupt):
            return cmd_run(config)
        return 0
    except (ConfigError, OutboxError) as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 2
    except sqlite3.Error as exc:
        print(f"edge-agent: the outbox {config.outbox_path}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
