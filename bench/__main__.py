"""``python -m bench [NAME] [args]`` — run a benchmark (default: ingest_e2e)."""

from __future__ import annotations

import importlib
import sys

BENCHES = ("ingest_e2e", "mqtt_drain", "scaleout", "latency")


def main() -> int:
    args = sys.argv[1:]
    name = args.pop(0) if args and not args[0].startswith("-") else "ingest_e2e"
    if name not in BENCHES:
        print(f"unknown benchmark {name!r}; known: {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"bench.{name}")
    result: int = module.main(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
