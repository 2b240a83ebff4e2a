"""Re-export of :mod:`simulators.harness_pipeline`, where the process harness now lives."""

from __future__ import annotations

from simulators.harness_pipeline import (
    BIN,
    HASH_KEY_HEX,
    Agent,
    IngestServer,
    Proc,
    assert_exactly_once,
    count_stored,
    stored,
)

__all__ = [
    "BIN",
    "HASH_KEY_HEX",
    "Agent",
    "IngestServer",
    "Proc",
    "assert_exactly_once",
    "count_stored",
    "stored",
]
