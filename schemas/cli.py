"""``campus-schemas``: export the contract as JSON Schema, or validate a payload by hand."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from schemas import events, state, uplink
from schemas.errors import ContractError
from schemas.patterns import publish_patterns


def export_all() -> dict[str, dict[str, Any]]:
    """Every schema of the contract, keyed by file name."""
    out: dict[str, dict[str, Any]] = {
        "uplink_batch.json": msgspec.json.schema(uplink.UplinkBatch),
        "state.json": msgspec.json.schema(state.DeviceState),
        "cmd.json": msgspec.json.schema(state.Command),
        "cmd_ack.json": msgspec.json.schema(state.CommandAck),
        "config.json": msgspec.json.schema(state.ConfigDocument),
        "config_ack.json": msgspec.json.schema(state.ConfigAck),
    }
    for name, etype in sorted(events.REGISTRY.items()):
        schema = msgspec.json.schema(etype.data)
        schema["title"] = name
        schema["description"] = etype.description
        if etype.metrics:
            schema["x-readings"] = dict(etype.metrics)
        out[f"event.{name}.json"] = schema
    # the contract's `$` (patterns end in \Z for Python: schemas.patterns)
    return {name: publish_patterns(schema) for name, schema in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="campus-schemas", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    exp = sub.add_parser("export", help="write the JSON Schemas of the contract")
    exp.add_argument("--out", type=Path, help="directory to write into (default: print JSON)")
    val = sub.add_parser("validate", help="validate an uplink payload file against a topic")
    val.add_argument("topic")
    val.add_argument("file", type=Path, help="payload file, or - for standard input")
    sub.add_parser("types", help="list registered event types")
    args = parser.parse_args(argv)

    if args.cmd == "export":
        schemas = export_all()
        if args.out is None:
            json.dump(schemas, sys.stdout, indent=2, sort_keys=True)
            sys.stdout.write("\n")
            return 0
        args.out.mkdir(parents=True, exist_ok=True)
        for stale in args.out.glob("*.json"):
            if stale.name not in schemas:
                stale.unlink()
        for fname, schema in schemas.items():
            (args.out / fname).write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        print(f"wrote {len(schemas)} schemas to {args.out}")
        return 0
    if args.cmd == "types":
        for name, etype in sorted(events.REGISTRY.items()):
            print(f"{name:24} {etype.description}")
        return 0
    payload = sys.stdin.buffer.read() if str(args.file) == "-" else args.file.read_bytes()
    try:
        decoded = uplink.decode_uplink(args.topic, payload)
    except ContractError as exc:
        print(f"rejected: {exc}")
        return 1
    print(f"{len(decoded.events)} valid event(s), {len(decoded.rejected)} rejected")
    for rej in decoded.rejected:
        print(f"  rejected: {rej.reason}")
    return 0 if not decoded.rejected else 1


if __name__ == "__main__":
    raise SystemExit(main())
