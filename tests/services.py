"""Re-export of :mod:`simulators.harness`, where the services now live (for the plugin)."""

from __future__ import annotations

from simulators.harness import (
    PG_BINDIRS,
    Mosquitto,
    Postgres,
    free_port,
    port_open,
    shared_tmpdir,
    wait_until,
)

__all__ = [
    "PG_BINDIRS",
    "Mosquitto",
    "Postgres",
    "free_port",
    "port_open",
    "shared_tmpdir",
    "wait_until",
]
