"""The agent against a real Mosquitto: every seq delivered, presence, broker and agent crashes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as mqtt
import pytest

from edge_agent.agent import Agent
from edge_agent.config import load_config
from edge_agent.outbox import Outbox
from schemas.events import EnvReading
from schemas.reading import Reading
from schemas.state import DeviceState
from schemas.uplink import decode_uplink
from simulators.harness import Mosquitto, wait_until
from tests.agent_helpers import DEVICE, SCHOOL, Collector, _Url, spawn, until, write_config

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_task_left_behind")]


def retained_state(broker: Mosquitto) -> DeviceState:
    """What a newcomer sees on the device's ``state`` topic."""
    c = Collector(broker)
    try:
        wait_until(lambda: c.states, 10, "the retained state")
        return c.states[-1]
    finally:
        c.close()


async def drained(agent: Agent, within: float = 30.0) -> None:
    """Wait until every stored event has had its PUBACK and left the outbox."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while depth := await agent.outbox.depth():
        if loop.time() > deadline:
            raise TimeoutError(f"{depth} events still in the outbox after {within}s")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_every_event_arrives_once_in_bounded_batches(
    tmp_path: Path, mosquitto: Mosquitto, collector: Collector, protocol: str
) -> None:
    count = 3000
    publish = "max_batch_events = 200\nmax_batch_bytes = 16384\n"
    cfg = load_config(
        write_config(tmp_path, mosquitto, f"count = {count}", protocol=protocol, publish=publish)
    )
    async with Agent(cfg) as agent:
        await until(lambda: collector.has_all(count), f"{count} events")
        await drained(agent)
        assert agent.publisher.stats.events == count
        assert collector.states[-1].state == "online"
        assert collector.states[-1].boot == 1
    assert sorted(collector.seqs()) == list(range(1, count + 1))
    for batch in collector.batches:
        assert batch.rejected == []
        assert len(batch.events) <= 200
    assert max(collector.sizes) <= 16384
    assert max(collector.sizes) > 16384 * 0.9  # the byte bound, not the count, cut them
    await until(lambda: collector.states[-1].state == "offline", "the offline state")
    assert collector.states[-1].boot == 1


async def test_works_with_the_embedded_mqtt_311_broker(tmp_path: Path) -> None:
    # Imported here: another team's module should not stop the rest of this file loading.
    from ingest_server.embedded.broker import EmbeddedBroker

    count = 2000
    async with EmbeddedBroker() as broker:
        host, port = broker.host, broker.port
        got: list[int] = []
        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="collector-embedded")
        sub.on_message = lambda _c, _u, m: got.extend(
            e.seq for e in decode_uplink(m.topic, m.payload).events
        )
        subscribed = threading.Event()
        sub.on_subscribe = lambda *_: subscribed.set()
        await asyncio.to_thread(sub.connect, host, port)
        sub.loop_start()
        try:
            sub.subscribe(f"campus/v1/{SCHOOL}/{DEVICE}/up", qos=1)
            await until(subscribed.is_set, "the subscription")
            path = write_config(tmp_path, _Url(broker.url), f"count = {count}", protocol="")
            async with Agent(load_config(path)) as agent:
                assert agent.config.broker.protocol == "3.1.1"  # from the url's ?protocol=
                await until(lambda: set(got) >= set(range(1, count + 1)), f"{count} events")
                await drained(agent)
        finally:
            sub.disconnect()
            sub.loop_stop()


async def test_no_more_than_inflight_batches_await_their_puback(
    tmp_path: Path, mosquitto: Mosquitto, collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    waiting, most = 0, 0
    real_publish = aiomqtt.Client.publish

    async def counting(self: aiomqtt.Client, topic: str, *args: Any, **kwargs: Any) -> None:
        nonlocal waiting, most
        if not topic.endswith("/up"):
            return await real_publish(self, topic, *args, **kwargs)
        waiting += 1
        most = max(most, waiting)
        try:
            result = await real_publish(self, topic, *args, **kwargs)
            await asyncio.sleep(0.02)  # a slow PUBACK path, so the window has to fill
            return result
        finally:
            waiting -= 1

    monkeypatch.setattr(aiomqtt.Client, "publish", counting)
    publish = "inflight = 3\nmax_batch_events = 20\n"
    cfg = load_config(write_config(tmp_path, mosquitto, "count = 3000", publish=publish))
    async with Agent(cfg) as agent:
        await until(lambda: collector.has_all(3000), "3000 events")
        await drained(agent)
    # The window is used (batches overlap) and never exceeded.
    assert 2 <= most <= 3


async def test_pushes_a_backlog_as_paced_replay_then_goes_live(
    tmp_path: Path, mosquitto: Mosquitto, collector: Collector
) -> None:
    path = write_config(
        tmp_path,
        mosquitto,
        "rate = 200",
        publish="replay_rate = 1000\nmax_batch_events = 100\nlinger_ms = 0",
    )
    cfg = load_config(path)
    with Outbox(cfg.outbox_path) as ob:  # an outage's worth of events, stored earlier
        ob.append_many([Reading("env.reading", EnvReading(sensor="old"))] * 2000)
    async with Agent(cfg) as agent:
        await until(lambda: collector.has_all(2000) and max(collector.seqs()) > 2100, "live")
        assert agent.publisher.stats.replayed_events >= 2000
    replay = [i for i, b in enumerate(collector.batches) if b.replay]
    live = [i for i, b in enumerate(collector.batches) if not b.replay]
    # The backlog is what the outbox held when the link came up: the old 2000, and maybe a
    # few the driver stored before the connection was made.
    replayed = {e.seq for i in replay for e in collector.batches[i].events}
    assert replayed == set(range(1, max(replayed) + 1))
    assert 2000 <= max(replayed) < 2400  # the driver makes 200/s; the link comes up in < 2 s
    assert all(e.seq > max(replayed) for i in live for e in collector.batches[i].events)
    # 20 batches of 100 at 1000 events/s: the last leaves ~1.9 s after the first.
    spread = collector.arrivals[replay[-1]] - collector.arrivals[replay[0]]
    assert 1.6 < spread < 6.0  # paced, not a burst; the upper bound leaves room for a slow CI


async def test_broker_restart_mid_stream_loses_nothing(
    tmp_path: Path, mosquitto: Mosquitto, collector: Collector
) -> None:
    count = 6000
    cfg = load_config(write_config(tmp_path, mosquitto, f"rate = 2000\ncount = {count}"))
    async with Agent(cfg) as agent:
        await until(lambda: len(collector.seqs()) > 1000, "the stream to flow")
        await asyncio.to_thread(mosquitto.stop)
        await asyncio.sleep(0.5)  # the outage: the driver keeps producing meanwhile
        await asyncio.to_thread(mosquitto.start)
        restarted_at = len(collector.batches)
        await until(lambda: collector.has_all(count), f"all {count} events")
        await until(lambda: agent.publisher.stats.connects >= 2, "the reconnect")
        await until(lambda: agent.outbox.highest_seq == count, "the count")
        await drained(agent)
        backlog = agent.publisher.replay_until
    assert set(collector.seqs()) == set(range(1, count + 1))
    # After the restart: the backlog of the outage went as replay, what followed as live.
    after = collector.batches[restarted_at:]
    first = next(i for i, b in enumerate(after) if b.replay)
    assert all(e.seq <= backlog for b in after if b.replay for e in b.events)
    assert all(e.seq > backlog for b in after[first:] if not b.replay for e in b.events)
    assert any(not b.replay for b in after[first:])


def status(config: Path) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "edge_agent", "status", "--config", str(config), "--json"],
        check=True,
        capture_output=True,
        text=True,
    )
    doc: dict[str, object] = json.loads(out.stdout)
    return doc


def test_presence_online_then_offline_by_will_after_sigkill(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    config = write_config(tmp_path, mosquitto, "rate = 10")
    agent = spawn(config, tmp_path / "agent.log")
    try:
        c = Collector(mosquitto)
        try:
            wait_until(lambda: c.states, 10, "the online state")
            assert (c.states[-1].state, c.states[-1].boot) == ("online", 1)
            os.kill(agent.pid, signal.SIGKILL)
            agent.wait(10)
            wait_until(lambda: c.states[-1].state == "offline", 10, "the will")
        finally:
            c.close()
        assert (retained_state(mosquitto).state, retained_state(mosquitto).boot) == ("offline", 1)
    finally:
        agent.kill()
        agent.wait(10)


def test_sigterm_says_offline_and_exits_cleanly(tmp_path: Path, mosquitto: Mosquitto) -> None:
    config = write_config(tmp_path, mosquitto, "rate = 10")
    agent = spawn(config, tmp_path / "agent.log")
    try:
        wait_until(lambda: retained_state(mosquitto).state == "online", 10, "online")
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(15) == 0, (tmp_path / "agent.log").read_text()
    finally:
        agent.kill()
        agent.wait(10)
    assert retained_state(mosquitto).state == "offline"
    log = (tmp_path / "agent.log").read_text()
    assert "Traceback" not in log


@pytest.mark.chaos
@pytest.mark.slow
def test_agent_killed_mid_publish_resumes_without_renumbering(
    tmp_path: Path, mosquitto: Mosquitto, collector: Collector
) -> None:
    count = 20_000
    config = write_config(tmp_path, mosquitto, f"count = {count}")
    log = tmp_path / "agent.log"
    agent = spawn(config, log)
    try:
        wait_until(lambda: len(collector.seqs()) >= 2000, 30, "the first events")
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait(10)
        seen_before = set(collector.seqs())
        assert len(seen_before) < count, "the agent finished before it could be killed"
        agent = spawn(config, log)
        wait_until(lambda: collector.has_all(count), 60, f"all {count} events")
        wait_until(lambda: status(config)["depth"] == 0, 30, "an empty outbox")
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(15)
    assert set(collector.seqs()) == set(range(1, count + 1))
    # A seq sent twice is the same event both times: same ts, same data.
    first: dict[int, tuple[object, bytes]] = {}
    for batch in collector.batches:
        for e in batch.events:
            assert first.setdefault(e.seq, (e.ts, e.data_json)) == (e.ts, e.data_json)
    assert status(config) | {"oldest_unsent_s": None} == {
        "device_id": DEVICE,
        "outbox": str(tmp_path / "outbox.db"),
        "depth": 0,
        "oldest_unsent_s": None,
        "highest_seq": count,
        "boot": 2,
        "dropped": {},
        "config_version": None,
        "clock_offset_s": None,  # no [clock] reference in this config
    }
    assert [s.boot for s in collector.states if s.state == "online"][-1] == 2


async def test_a_restart_on_an_empty_outbox_waits_for_events_instead_of_spinning(
    tmp_path: Path, mosquitto: Mosquitto, collector: Collector
) -> None:
    """Seqs go on across restarts: an agent starting on an emptied outbox (highest seq 3, no
    rows) must wait for its next event. It used to ask the outbox again and again, a core at
    full load until an event came (seen after every update, in test_agent_update)."""
    cfg = load_config(write_config(tmp_path, mosquitto, "count = 3"))
    async with Agent(cfg) as agent:
        await until(lambda: collector.has_all(3), "3 events")
        await drained(agent)
    cfg = load_config(write_config(tmp_path, mosquitto, "count = 0"))
    async with Agent(cfg) as agent:
        assert agent.outbox.highest_seq == 3
        await until(lambda: agent.publisher.state.value == "online", "online again")
        peeks = 0
        peek = agent.outbox.peek

        async def counted(*args: Any, **kw: Any) -> Any:
            nonlocal peeks
            peeks += 1
            return await peek(*args, **kw)

        agent.outbox.peek = counted  # type: ignore[method-assign]
        # an observation window, not a synchronisation: idle, the pump asks at most once more;
        # spinning, it asked thousands of times in it
        await asyncio.sleep(0.5)
        assert peeks <= 1, f"the publisher asked the empty outbox {peeks} times in 0.5 s"
    assert sorted(collector.seqs()) == [1, 2, 3]
