"""The agent without a broker: drivers, the bounded queue, group commits, shutdown, restarts."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec
import pytest

from device_drivers.base import DriverContext, DriverState, Emit, register_driver
from device_drivers.synthetic import SyntheticDriver
from edge_agent.agent import Agent
from edge_agent.config import AgentConfig, ConfigError, PublishConfig, load_config
from edge_agent.outbox import AsyncOutbox, Outbox
from edge_agent.publisher import LinkState, Publisher
from schemas.events import BoardPower, CardTap
from schemas.reading import Reading
from simulators.faults import FaultUnavailable, Tmpfs
from simulators.harness import free_port

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_task_left_behind")]
KEY_HEX = "00112233445566778899aabbccddeeff"


async def until(pred: Callable[[], object], what: str, within: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not pred():
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {within}s waiting for {what}")
        await _sleep(0.01)


_sleep = asyncio.sleep  # the real one, for tests that patch asyncio.sleep


def config(tmp_path: Path, drivers: str, privacy: str = "") -> AgentConfig:
    # Nothing listens on this port: the publisher retries while the outbox fills.
    text = f"""
[device]
id = "cr-0101"
school_id = "s001"
kind = "card_reader"
[outbox]
path = "outbox.db"
[mqtt]
url = "mqtt://127.0.0.1:{free_port()}"
[publish]
backoff_initial_s = 0.05
backoff_max_s = 0.2
[health]
interval_s = 0
[privacy]
{privacy}
{drivers}
"""
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return load_config(path)


SYNTH = '[[drivers]]\ntype = "synthetic"\nname = "gen"\n'


async def test_count_is_exact_across_agent_restarts(tmp_path: Path) -> None:
    cfg = config(tmp_path, SYNTH + "count = 2500\n")
    async with Agent(cfg) as agent:
        assert agent.boot == 1
        await until(lambda: agent.status().drivers[0].state == DriverState.STOPPED, "the count")
        await until(lambda: agent.status().queued == 0, "the queue to drain")
        assert agent.outbox.highest_seq == 2500
        await until(lambda: agent.publisher.state == LinkState.BACKOFF, "a failed connect")
        assert agent.publisher.last_error
    async with Agent(cfg) as agent:
        assert agent.boot == 2
        await until(lambda: agent.status().drivers[0].state == DriverState.STOPPED, "the driver")
        assert agent.outbox.highest_seq == 2500
    with Outbox(cfg.outbox_path) as ob:
        assert [r.seq for r in ob.peek(0, 10_000, 1 << 30)] == list(range(1, 2501))


async def test_shutdown_stores_every_accepted_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stalled disk: emit blocks once the queue is full; on shutdown the queue is stored."""
    monkeypatch.setattr(Agent, "QUEUE_SIZE", 50)
    monkeypatch.setattr(Agent, "WRITE_GROUP_MAX", 20)
    disk = asyncio.Event()
    real_append = AsyncOutbox.append_many

    async def stalled(
        self: AsyncOutbox, readings: list[Reading], *, make_room: bool = False
    ) -> list[int]:
        await disk.wait()
        return await real_append(self, readings, make_room=make_room)

    monkeypatch.setattr(AsyncOutbox, "append_many", stalled)
    cfg = config(tmp_path, SYNTH + "count = 1000\n")
    async with Agent(cfg) as agent:
        driver = agent._slots[0].driver
        assert isinstance(driver, SyntheticDriver)
        try:
            await until(agent._queue.full, "the queue to fill")
            emitted = driver.emitted
            await asyncio.sleep(0.1)
            # The writer holds one group, the queue is full, and the driver's emit waits.
            assert driver.emitted == emitted <= 50 + 20
            assert agent.outbox.highest_seq == 0
        finally:
            disk.set()
        await until(lambda: agent.outbox.highest_seq > emitted, "the disk to catch up")
    with Outbox(cfg.outbox_path) as ob:
        assert ob.highest_seq() == driver.emitted > emitted
        assert ob.depth() == ob.highest_seq()


class Crashy:
    """Emits one reading, then crashes, every time it runs."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = DriverState.STARTING
        self.last_error: str | None = None

    async def run(self, emit: Emit) -> None:
        self.state = DriverState.OK
        await emit(Reading("board.power", BoardPower(state="on")))
        raise RuntimeError("the panel said something odd")


@register_driver("test-crashy")
def _crashy(name: str, options: Mapping[str, Any], ctx: DriverContext) -> Crashy:
    return Crashy(name)


async def test_a_crashed_driver_is_restarted_with_backoff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Agent, "DRIVER_BACKOFF_INITIAL_S", 0.05)
    monkeypatch.setattr(Agent, "DRIVER_BACKOFF_MAX_S", 0.1)
    cfg = config(tmp_path, '[[drivers]]\ntype = "test-crashy"\nname = "panel"\n' + SYNTH)
    async with Agent(cfg) as agent:
        await until(lambda: agent.status().drivers[0].restarts >= 3, "three restarts")
        crashy, synth = agent.status().drivers
        assert crashy.last_error == "RuntimeError: the panel said something odd"
        assert crashy.state in (DriverState.FAILED, DriverState.OK)
        assert synth.state == DriverState.OK  # the other driver carries on
        assert synth.restarts == 0
        await until(lambda: agent.outbox.highest_seq > 100, "events from both")
    with Outbox(cfg.outbox_path) as ob:
        types = {r.type for r in ob.peek(0, 100_000, 1 << 30)}
    assert types == {"board.power", "env.reading"}


async def test_card_taps_are_hashed_with_the_district_key(tmp_path: Path) -> None:
    drivers = SYNTH + 'event_type = "card.tap"\ncount = 10\n'
    cfg = config(tmp_path, drivers, f'hash_key_hex = "{KEY_HEX}"')
    async with Agent(cfg) as agent:
        await until(lambda: agent.outbox.highest_seq == 10, "ten taps")
    with Outbox(cfg.outbox_path) as ob:
        taps = [msgspec.json.decode(r.data, type=CardTap) for r in ob.peek(0, 100, 1 << 20)]
    assert len(taps) == 10
    assert all(len(t.uid_hash) == 64 and t.uid is None and t.reader == "gen" for t in taps)


async def test_card_taps_without_a_key_fail_saying_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Agent, "DRIVER_BACKOFF_INITIAL_S", 0.05)
    cfg = config(tmp_path, SYNTH + 'event_type = "card.tap"\n')
    async with Agent(cfg) as agent:
        await until(lambda: agent.status().drivers[0].restarts >= 1, "the driver to fail")
        assert "no district hashing key" in (agent.status().drivers[0].last_error or "")
        assert agent.outbox.highest_seq == 0


async def test_bad_driver_options_are_a_config_error(tmp_path: Path) -> None:
    cfg = config(tmp_path, SYNTH + "rate = -1\n")
    with pytest.raises(ConfigError, match=r"agent.toml: drivers\[0\] \(gen\): .*rate"):
        await Agent(cfg).__aenter__()
    cfg = config(tmp_path, '[[drivers]]\ntype = "flux-capacitor"\n')
    with pytest.raises(ConfigError, match="unknown driver type 'flux-capacitor'"):
        await Agent(cfg).__aenter__()


async def test_cancelling_the_owner_leaves_no_task(tmp_path: Path) -> None:
    cfg = config(tmp_path, SYNTH + "rate = 1000\n")

    async def owner() -> None:
        async with Agent(cfg):
            await asyncio.Event().wait()

    task = asyncio.create_task(owner())
    await until(cfg.outbox_path.exists, "the agent to start")
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The autouse fixture checks that nothing is left running.


async def test_publisher_backoff_grows_and_is_jittered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    waits: list[float] = []

    async def fake_sleep(delay: float) -> None:
        waits.append(delay)
        await _sleep(0)

    monkeypatch.setattr(Publisher, "BACKOFF_INITIAL_S", 1.0)
    monkeypatch.setattr(Publisher, "BACKOFF_MAX_S", 4.0)
    cfg = dataclasses.replace(config(tmp_path, ""), publish=PublishConfig())
    async with AsyncOutbox(cfg.outbox_path) as ob:
        pub = Publisher(cfg.device, cfg.broker, cfg.publish, ob, boot=1)
        monkeypatch.setattr(asyncio, "sleep", fake_sleep)
        task = asyncio.create_task(pub.run())
        await until(lambda: len(waits) >= 5, "five retries")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    bases = [1.0, 2.0, 4.0, 4.0, 4.0]
    for wait, base in zip(waits, bases, strict=False):
        assert base * 0.75 <= wait <= base * 1.25
    assert pub.state == LinkState.STOPPED


async def test_a_full_disk_loses_no_accepted_reading(tmp_path: Path) -> None:
    """A real full filesystem under the outbox: readings wait in memory, then all get stored."""
    try:
        disk = Tmpfs(tmp_path / "disk", size_mb=16).__enter__()
    except FaultUnavailable as exc:
        pytest.skip(str(exc))
    try:
        cfg = config(disk.path, SYNTH + "count = 3000\nrate = 1000\n")
        async with Agent(cfg) as agent:
            await until(lambda: agent.outbox.highest_seq > 100, "the first readings")
            await asyncio.to_thread(disk.fill)
            try:
                await until(lambda: len(agent._pending) > 200, "readings held in memory")
            finally:
                disk.free()
            await until(lambda: agent.outbox.highest_seq >= 3000, "the rest stored", within=20)
            assert agent.status().queued == 0
        with Outbox(cfg.outbox_path) as ob:
            assert [r.seq for r in ob.peek(0, 10_000, 1 << 30)] == list(range(1, 3001))
            assert ob.dropped_total() == {}  # a transient full disk drops nothing
    finally:
        disk.__exit__()
