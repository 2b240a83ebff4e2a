"""``python -m bench`` runs every benchmark; ``python -m bench NAME [args]`` runs one."""

from __future__ import annotations

import importlib
import sys

BENCHES = (
    "ingest_e2e",
    "mqtt_drain",
    "scaleout",
    "latency",
    "agent",
    "connections",
    "fleet",
    "district",
    "district_api",
    "api_queries",
    "devices_list",
    "decode_cost",
    "mqtt_codec",
    "copy_encode",
    "metrics_cost",
    "alerts_cost",
)


def main() -> int:
    args = sys.argv[1:]
    if not args:
        # the whole district takes the length of its morning: run it by name only
        every = [name for name in BENCHES if name != "district"]
        failed = [name for name in every if importlib.import_module(f"bench.{name}").main([])]
        if failed:
            print(f"\nmissed their checks: {', '.join(failed)}", file=sys.stderr)
        return 1 if failed else 0
    name = args.pop(0)
    if name not in BENCHES:
        print(f"unknown benchmark {name!r}; known: {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    result: int = importlib.import_module(f"bench.{name}").main(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
