"""Fixtures shared by the agent integration tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from simulators.harness import Mosquitto
from tests.agent_helpers import Collector


@pytest.fixture
def collector(mosquitto: Mosquitto) -> Iterator[Collector]:
    """Everything published under the campus topics of ``mosquitto``, as it arrives."""
    c = Collector(mosquitto)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
async def no_task_left_behind() -> AsyncIterator[None]:
    """Fails a test that leaves asyncio tasks running (use with ``pytest.mark.usefixtures``)."""
    yield
    left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not left, f"tasks left running: {[t.get_name() for t in left]}"
