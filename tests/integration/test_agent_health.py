"""``agent.health`` events from an in-process agent, through a real Mosquitto."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from edge_agent.agent import Agent
from edge_agent.config import ConfigError, load_config
from simulators.harness import Mosquitto
from tests.agent_helpers import (
    Collector,
    _Url,
    health_events,
    until,
    with_health,
    write_config,
)

_NO_BROKER = _Url("mqtt://127.0.0.1:1883")

pytestmark = pytest.mark.usefixtures("no_task_left_behind")


def other_events(c: Collector) -> int:
    return sum(e.type != "agent.health" for b in list(c.batches) for e in b.events)


@pytest.mark.integration
async def test_health_events_arrive_on_up(
    tmp_path: Path, mosquitto: Mosquitto, collector: Collector
) -> None:
    cfg = load_config(with_health(tmp_path, mosquitto, "0.5"))
    started = time.monotonic()
    async with Agent(cfg):
        await until(lambda: len(health_events(collector)) >= 3, "three agent.health events")
        first_at = min(
            collector.arrivals[i]
            for i, b in enumerate(collector.batches)
            if any(e.type == "agent.health" for e in b.events)
        )
    assert first_at - started >= 0.4  # one interval after start, not at once
    assert all(b.rejected == [] for b in collector.batches)
    seqs = [e.seq for b in collector.batches for e in b.events]
    assert len(seqs) == len(set(seqs))  # health events share the device's seq numbering
    for h in health_events(collector):
        assert 5 < h.rss_mb < 100_000
        assert h.cpu_pct >= 0
        assert h.outbox_depth >= 0
        assert h.oldest_unsent_s >= 0
        assert h.clock_offset_s is None
        assert h.drivers["gen"] in ("ok", "starting")
    assert health_events(collector)[-1].drivers == {"gen": "ok"}


@pytest.mark.integration
async def test_interval_zero_sends_no_health_events(
    tmp_path: Path, mosquitto: Mosquitto, collector: Collector
) -> None:
    cfg = load_config(with_health(tmp_path, mosquitto, "0"))
    async with Agent(cfg):
        assert "health" not in {t.get_name() for t in asyncio.all_tasks()}
        # 40 events at 20/s: about 2 s of running, four intervals' worth at 0.5 s.
        await until(lambda: other_events(collector) >= 40, "40 synthetic events")
    assert health_events(collector) == []


def test_a_negative_interval_is_refused(tmp_path: Path) -> None:
    path = with_health(tmp_path, _NO_BROKER, "-1")
    with pytest.raises(ConfigError, match=r"health\.interval_s: expected .* >= 0"):
        load_config(path)


def test_health_defaults_to_a_minute(tmp_path: Path) -> None:
    path = write_config(tmp_path, _NO_BROKER, "", health_interval_s=None)
    assert load_config(path).health.interval_s == 60
