"""Stopping the agent is bounded whatever its MQTT link is doing, and leaves nothing running.

A real Mosquitto throughout; "frozen" is the broker SIGSTOPped: its TCP connections stay open
(the kernel accepts and buffers) but nothing is ever answered.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from edge_agent.agent import Agent
from edge_agent.commands import CommandHandler
from edge_agent.config import load_config
from edge_agent.publisher import LinkState, Publisher
from simulators.harness import Mosquitto
from tests.agent_helpers import DEVICE, SCHOOL, Collector, _Url, until, write_config
from tests.agent_server import DeviceServer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_task_left_behind")]

#: A stop slower than this has hung. A healthy one takes well under a second; against a frozen
#: broker the publisher spends at most twice CLOSE_TIMEOUT_S (0.5 s here) saying goodbye.
STOP_DEADLINE_S = 8.0


@pytest.fixture(autouse=True)
def short_close(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Publisher, "CLOSE_TIMEOUT_S", 0.5)


@contextmanager
def frozen(broker: Mosquitto) -> Iterator[None]:
    assert broker.proc is not None
    pid = broker.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def publisher_task() -> asyncio.Task[Any]:
    return next(t for t in asyncio.all_tasks() if t.get_name() == "publisher")


async def stop_within(agent: Agent, seconds: float = STOP_DEADLINE_S) -> float:
    """Leave the agent's context; fail, not hang, when that takes longer than ``seconds``."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    stop = asyncio.create_task(agent.__aexit__(None, None, None), name="test-stop")
    await asyncio.wait({stop}, timeout=seconds)
    if not stop.done():
        # Cancel whatever the stop waits on (again and again) so that the test ends.
        stuck: list[str] = []
        for _ in range(20):
            for task in asyncio.all_tasks():
                if task not in (stop, asyncio.current_task()):
                    stuck.append(task.get_name())
                    task.cancel()
            await asyncio.wait({stop}, timeout=0.5)
            if stop.done():
                break
        pytest.fail(f"Agent.__aexit__ did not return within {seconds} s; stuck: {set(stuck)}")
    stop.result()
    return loop.time() - started


async def depth(agent: Agent, at_most: int, within: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while (d := await agent.outbox.depth()) > at_most:
        if loop.time() > deadline:
            raise TimeoutError(f"{d} events still in the outbox after {within}s")
        await asyncio.sleep(0.05)


async def test_stop_when_the_cancel_lands_as_an_acks_puback_arrives(
    tmp_path: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CI hang: the stop's cancel and the PUBACK of a command ack in the same loop turn.

    The publisher's TaskGroup then cancels ``mqtt-acks`` while its publish has its PUBACK but
    has not resumed; ``asyncio.wait_for`` (aiomqtt's timeout) swallowed that cancel, the task
    went back to waiting for acks, and the group, which cancels only once, waited for ever.
    """
    server = DeviceServer(mosquitto, SCHOOL, DEVICE)
    armed: list[asyncio.Task[Any]] = []
    fired: list[int] = []
    real_on_publish = aiomqtt.Client._on_publish

    def on_publish(self: aiomqtt.Client, client: Any, userdata: Any, mid: int, *rest: Any) -> None:
        real_on_publish(self, client, userdata, mid, *rest)
        if armed:  # Agent._stop's cancel, landing in the turn that brought the PUBACK
            armed.pop().cancel()
            fired.append(mid)

    monkeypatch.setattr(aiomqtt.Client, "_on_publish", on_publish)
    agent = Agent(load_config(write_config(tmp_path, mosquitto, "count = 3")))
    await agent.__aenter__()
    stopped = False
    try:
        await until(lambda: agent.publisher.state is LinkState.ONLINE, "the link")
        await depth(agent, 0)  # nothing else awaits a PUBACK: the next one is the ack's
        armed.append(publisher_task())
        server.send_command("p-1", "ping")
        await until(lambda: fired, "the PUBACK of the ack")
        await stop_within(agent)
        stopped = True
        assert server.ack("p-1") is not None
    finally:
        if not stopped:
            await stop_within(agent)
        server.close()


async def test_a_child_that_swallows_its_cancel_gets_another(
    tmp_path: Path,
    mosquitto: Mosquitto,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Whatever swallows a cancel next, the publisher's TaskGroup no longer waits for ever."""
    swallowed: list[str] = []

    async def stubborn(self: CommandHandler, publish: object) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.append("once")  # the bug this stands for: the cancel goes unnoticed
        await asyncio.Event().wait()

    monkeypatch.setattr(CommandHandler, "send_acks", stubborn)
    monkeypatch.setattr("edge_agent.publisher._Children.RECANCEL_S", 0.1)
    agent = Agent(load_config(write_config(tmp_path, mosquitto, "count = 3")))
    await agent.__aenter__()
    try:
        await until(lambda: agent.publisher.state is LinkState.ONLINE, "the link")
    finally:
        await stop_within(agent)
    assert swallowed == ["once"]
    assert "task mqtt-acks ignored a cancel; cancelling it again" in caplog.text


async def test_stop_with_batches_awaiting_a_frozen_brokers_puback_loses_nothing(
    tmp_path: Path, mosquitto: Mosquitto, collector: Collector
) -> None:
    count = 200
    cfg = load_config(write_config(tmp_path, mosquitto, f"count = {count}\nrate = 100"))
    agent = Agent(cfg)
    await agent.__aenter__()
    stopped = False
    try:
        await until(collector.seqs, "the first batch")
        with frozen(mosquitto):
            await until(lambda: agent.outbox.highest_seq == count, "every event stored")
            unacked = [r.seq for r in await agent.outbox.peek(0, count, 1 << 30)]
            assert unacked, "everything was acknowledged before the broker froze"
            stopped = True
            await stop_within(agent)
    finally:
        if not stopped:
            await stop_within(agent)
    # The outbox kept every row whose PUBACK the stop abandoned: the next start sends them.
    before = len(collector.batches)
    async with Agent(cfg) as again:
        await depth(again, 0)
    resent = {e.seq for b in collector.batches[before:] for e in b.events}
    assert set(unacked) <= resent
    assert collector.has_all(count)


async def test_stop_while_connecting_to_a_frozen_broker_leaves_no_socket(
    tmp_path: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    clients: list[aiomqtt.Client] = []
    real_client = Publisher._client

    def recording(self: Publisher) -> aiomqtt.Client:
        clients.append(real_client(self))
        return clients[-1]

    monkeypatch.setattr(Publisher, "_client", recording)
    with frozen(mosquitto):
        agent = Agent(load_config(write_config(tmp_path, mosquitto, "count = 3")))
        await agent.__aenter__()
        try:
            # TCP is up (the kernel accepted it); the CONNACK never comes.
            await until(lambda: clients and clients[-1]._client.socket(), "the TCP connection")
            assert agent.publisher.state is LinkState.CONNECTING
        finally:
            await stop_within(agent)
    assert clients[-1]._client.socket() is None


async def test_stop_while_the_broker_is_down(tmp_path: Path, mosquitto: Mosquitto) -> None:
    mosquitto.stop()
    agent = Agent(load_config(write_config(tmp_path, mosquitto, "count = 3")))
    await agent.__aenter__()
    try:
        await until(lambda: agent.publisher.last_error, "a refused connect")
    finally:
        await stop_within(agent)


async def test_stop_during_the_tcp_connect_leaves_no_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel does not stop aiomqtt's executor thread: a socket it opens later is closed."""
    entered, exited = threading.Event(), threading.Event()
    real_connect = aiomqtt.Client._client_connect

    def connecting(self: aiomqtt.Client) -> None:
        entered.set()
        try:
            real_connect(self)
        finally:
            exited.set()

    clients: list[aiomqtt.Client] = []
    real_client = Publisher._client

    def recording(self: Publisher) -> aiomqtt.Client:
        clients.append(real_client(self))
        return clients[-1]

    monkeypatch.setattr(aiomqtt.Client, "_client_connect", connecting)
    monkeypatch.setattr(Publisher, "_client", recording)
    with socket.socket() as listener:
        # A full accept queue: the kernel drops the agent's SYN, so its connect() blocks
        # (retrying) until the test accepts what fills the queue.
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        try:
            for f in fillers:
                f.setblocking(False)
                f.connect_ex(("127.0.0.1", port))
            url = _Url(f"mqtt://127.0.0.1:{port}")
            agent = Agent(load_config(write_config(tmp_path, url, "count = 3")))
            await agent.__aenter__()
            stop: asyncio.Task[float] | None = None
            try:
                await until(entered.is_set, "the TCP connect")
                assert not exited.is_set(), "the connect did not block"
                stop = asyncio.create_task(stop_within(agent))
                listener.setblocking(False)
                loop = asyncio.get_running_loop()
                deadline = loop.time() + STOP_DEADLINE_S
                # Make room, so that the connect succeeds after the cancel; paho gives up 5 s
                # after it began.
                while not exited.is_set() and loop.time() < deadline:
                    try:
                        fillers.append(listener.accept()[0])
                    except BlockingIOError:
                        await asyncio.sleep(0.02)
            finally:
                if stop is None:
                    await stop_within(agent)
                else:
                    await stop  # bounded by stop_within's deadline
            assert exited.is_set()
        finally:
            for f in fillers:
                f.close()
    assert clients[-1]._client.socket() is None
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
