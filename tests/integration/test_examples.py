"""Every shipped example config runs: the real loader and Agent against the device's simulator.

Each file in deploy/examples/ is loaded as written; only what must point at this machine is
changed (device paths and ports → the simulator's pty symlink or 127.0.0.1 port, the outbox and
key file → tmp, the broker → the test's Mosquitto, the camera source → a generated video). The
event types that device kind produces must then arrive at the broker, valid by the wire contract.
An example without an entry in :data:`RIGS` fails, asking for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import os
import tomllib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import psycopg
import pytest

from device_drivers.base import DriverState
from device_drivers.gate import AccessGate
from edge_agent.agent import Agent
from edge_agent.config import AgentConfig, DriverConfig, load_config
from schemas.topics import build as topic
from schemas.uplink import decode_uplink
from simulators.em4100 import Em4100Simulator
from simulators.harness import Mosquitto, wait_until
from simulators.harness_pipeline import HASH_KEY_HEX, IngestServer
from simulators.modbus_sensor import Field, ModbusSensorSim
from simulators.panel import SmartPanel
from simulators.recorder import SmpRecorder
from simulators.signage import SignageScreen
from simulators.vpcd_card import VirtualCard
from simulators.wiegand import WiegandConverter
from tests.agent_helpers import until

# The PC/SC tests' private pcscd (module scope), reached through request.getfixturevalue.

pytestmark = pytest.mark.integration

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "deploy" / "examples").glob("*.toml"))
WITHIN_S = 10.0


async def _nothing() -> None:
    return None


def all_ok(agent: Agent) -> bool:
    return all(d.state == DriverState.OK for d in agent.status().drivers)


@dataclass(frozen=True, slots=True)
class Case:
    """An example made runnable: its drivers re-pointed, what to do, and what must come out."""

    drivers: tuple[DriverConfig, ...]
    expect: frozenset[str]
    stimulate: Callable[[], Awaitable[None]] = _nothing
    #: When the stimulus can be given: by default once every driver says OK.
    ready: Callable[[Agent], bool] = all_ok


Rig = Callable[[Path, AgentConfig, pytest.FixtureRequest], AbstractAsyncContextManager[Case]]


def options(cfg: AgentConfig, *types: str) -> list[dict[str, Any]]:
    """Copies of the example's driver options, checking it has exactly these driver types."""
    have = tuple(d.type for d in cfg.drivers)
    assert have == types, f"{cfg.source.name}: drivers {have}, the rig knows {types}: update it"
    return [copy.deepcopy(dict(d.options)) for d in cfg.drivers]


def point(table: dict[str, Any], key: str, value: object) -> None:
    """Re-point one setting the example has (so a renamed key fails here, not silently)."""
    assert key in table, f"the example no longer sets {key!r} (has {sorted(table)})"
    table[key] = value


def rebuilt(cfg: AgentConfig, tables: list[dict[str, Any]]) -> tuple[DriverConfig, ...]:
    return tuple(DriverConfig(d.type, d.name, t) for d, t in zip(cfg.drivers, tables, strict=True))


def thread(fn: Callable[[], object]) -> Callable[[], Awaitable[None]]:
    """A blocking simulator call as a stimulus, off the event loop."""

    async def run() -> None:
        await asyncio.to_thread(fn)

    return run


# -- one rig per example ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def pcsc_rig(
    work: Path, cfg: AgentConfig, request: pytest.FixtureRequest
) -> AsyncIterator[Case]:
    # test_pcsc_reader's private pcscd (it skips when pcscd/vpcd are missing), only for this case.
    daemon = request.getfixturevalue("pcscd")
    (reader,) = options(cfg, "pcsc")
    point(reader, "reader", daemon.readers[0])  # the PC/SC reader name: vpcd's first slot
    with VirtualCard(daemon.port) as card:
        yield Case(
            rebuilt(cfg, [reader]),
            frozenset({"card.tap"}),
            thread(lambda: card.present(bytes.fromhex("04A1B2C3D4E5F6"))),
        )


@contextlib.asynccontextmanager
async def wiegand_rig(
    work: Path, cfg: AgentConfig, _: pytest.FixtureRequest
) -> AsyncIterator[Case]:
    (door,) = options(cfg, "wiegand")
    with WiegandConverter(work / "ttyWIEGAND") as conv:
        point(door, "port", str(conv.link))
        yield Case(
            rebuilt(cfg, [door]),
            frozenset({"card.tap"}),
            thread(lambda: conv.present(0x0101, facility=0x20)),
        )


@contextlib.asynccontextmanager
async def signage_rig(
    work: Path, cfg: AgentConfig, _: pytest.FixtureRequest
) -> AsyncIterator[Case]:
    (signage,) = options(cfg, "signage")
    (cards,) = signage["cards"]
    assert cards["type"] == "em4100", "the rig simulates an em4100 reader: update it"
    async with SignageScreen() as screen:
        with Em4100Simulator(work / "ttyRFID") as rdm:
            point(cards, "port", str(rdm.link))
            point(signage, "screen", f"127.0.0.1:{screen.port}")
            yield Case(
                rebuilt(cfg, [signage]),
                frozenset({"attendance.checkin"}),
                thread(lambda: rdm.present(bytes.fromhex("0A1B2C3D4E"), repeats=3)),
            )


@contextlib.asynccontextmanager
async def env_rig(work: Path, cfg: AgentConfig, _: pytest.FixtureRequest) -> AsyncIterator[Case]:
    (sensor,) = options(cfg, "modbus_env")
    with ModbusSensorSim(unit=sensor.get("unit", 1)) as sim:
        sim.set(humidity_pct=45.0, temperature_c=21.5, co2_ppm=800, pm25_ugm3=12, noise_db=41.0)
        sim.start_rtu(work / "ttyMODBUS")
        point(sensor, "port", str(work / "ttyMODBUS"))
        yield Case(rebuilt(cfg, [sensor]), frozenset({"env.reading"}))  # polled at start


def readers_ok(agent: Agent) -> bool:
    """The gate's card readers are open (its thermometer is only read at a pass)."""
    (slot,) = agent._slots
    assert isinstance(slot.driver, AccessGate)
    return all(d.state == DriverState.OK for d in slot.driver.cards.drivers)


@contextlib.asynccontextmanager
async def gate_rig(work: Path, cfg: AgentConfig, _: pytest.FixtureRequest) -> AsyncIterator[Case]:
    (gate,) = options(cfg, "gate")
    therm = gate["thermometer"]
    assert "host" not in therm, "the rig simulates an RTU thermometer: update it"
    layout = {
        "body": Field(
            therm.get("address", 0),
            table=therm.get("table", "holding"),
            dtype=therm.get("type", "int16"),
            scale=therm.get("scale", 1.0),
        )
    }
    with ExitStack() as stack:
        readers = []
        for i, entry in enumerate(gate["cards"]):
            assert entry["type"] == "wiegand", "the rig simulates wiegand readers: update it"
            conv = stack.enter_context(WiegandConverter(work / f"ttyWIEGAND{i}"))
            point(entry, "port", str(conv.link))
            readers.append(conv)
        sim = stack.enter_context(ModbusSensorSim(layout, unit=therm.get("unit", 1)))
        sim.set(body=36.6)
        sim.start_rtu(work / "ttyTHERMO")
        point(therm, "port", str(work / "ttyTHERMO"))
        yield Case(
            rebuilt(cfg, [gate]),
            frozenset({"access.pass"}),
            thread(lambda: readers[0].present(0x0101, facility=0x20)),
            readers_ok,
        )


@contextlib.asynccontextmanager
async def board_rig(work: Path, cfg: AgentConfig, _: pytest.FixtureRequest) -> AsyncIterator[Case]:
    panel_opts, os_opts = options(cfg, "panel", "board_os")
    assert panel_opts.get("profile", "smart") == "smart", "the rig simulates a SMART panel"
    feed = work / "activity.fifo"
    os.mkfifo(feed)
    point(os_opts, "path", str(feed))

    def helper_writes() -> None:  # the on-board helper; the driver holds the FIFO open by now
        fd = os.open(feed, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, b'{"type": "app", "app": "com.smart.notebook"}\n')
            os.write(fd, b'{"type": "touch", "touches": 37, "window_s": 60}\n')
        finally:
            os.close(fd)

    with SmartPanel(work / "ttyPANEL", power="on", source="hdmi1") as panel:
        point(panel_opts, "port", panel.port)
        yield Case(
            rebuilt(cfg, [panel_opts, os_opts]),
            frozenset({"board.power", "board.input", "board.app", "board.touch"}),
            thread(helper_writes),
        )


@contextlib.asynccontextmanager
async def recorder_rig(
    work: Path, cfg: AgentConfig, _: pytest.FixtureRequest
) -> AsyncIterator[Case]:
    (unit,) = options(cfg, "recorder")
    with SmpRecorder(work / "ttySMP", state="record", free_mb=4096) as rec:
        # The example speaks SIS over Telnet: the simulator's TCP side, not its pty.
        assert str(unit["port"]).startswith("tcp://"), "the example moved off TCP: update the rig"
        point(unit, "port", rec.url)
        yield Case(rebuilt(cfg, [unit]), frozenset({"recorder.status"}))  # the first poll


@contextlib.asynccontextmanager
async def camera_rig(work: Path, cfg: AgentConfig, _: pytest.FixtureRequest) -> AsyncIterator[Case]:
    from simulators.camera import make_test_video

    (cam,) = options(cfg, "camera")
    video = work / "lesson.avi"
    make_test_video(video, [("normal", 2)], fps=10)
    point(cam, "source", str(video))
    point(cam, "report_s", 1)
    cam["loop"] = True
    yield Case(rebuilt(cfg, [cam]), frozenset({"camera.health", "camera.activity"}))


@contextlib.asynccontextmanager
async def synthetic_rig(
    work: Path, cfg: AgentConfig, _: pytest.FixtureRequest
) -> AsyncIterator[Case]:
    (gen,) = options(cfg, "synthetic")  # a load generator: no device to simulate
    yield Case(rebuilt(cfg, [gen]), frozenset({gen.get("event_type", "env.reading")}))


@contextlib.asynccontextmanager
async def library_rig(
    work: Path, cfg: AgentConfig, request: pytest.FixtureRequest
) -> AsyncIterator[Case]:
    from simulators.barcode_scanner import BarcodeScannerSim
    from simulators.library_tags import BookTag, book_block, memory_of

    daemon = request.getfixturevalue("pcscd")
    (terminal,) = options(cfg, "library_terminal")
    (cards,) = terminal["cards"]
    assert cards["type"] == "em4100", "the rig simulates an em4100 reader: update it"
    suffix = terminal["scanner"].get("suffix", "cr")
    with (
        Em4100Simulator(work / "ttyCARD") as rdm,
        BarcodeScannerSim(work / "ttySCAN", suffix=suffix) as scanner,
        BookTag(daemon.port) as tag,
    ):
        point(cards, "port", str(rdm.link))
        point(terminal["scanner"], "port", str(scanner.link))
        point(terminal["pad"], "reader", daemon.readers[0])

        seen: list[Agent] = []

        def ready(agent: Agent) -> bool:
            seen[:] = [agent]
            return all_ok(agent)

        def handled(n: int) -> None:  # the terminal's beep: the desk waits for it
            driver = seen[0]._slots[0].driver
            wait_until(lambda: getattr(driver, "handled", 0) >= n, WITHIN_S, f"input {n}")

        def lend_and_return() -> None:
            scanner.scan("9787020002207")  # no card yet: a return
            handled(1)
            rdm.present(bytes.fromhex("1A00C0FFEE"))
            handled(2)
            tag.lay(bytes.fromhex("E004015012345678"), memory_of(book_block("T0000001")))

        yield Case(
            rebuilt(cfg, [terminal]),
            frozenset({"library.loan", "library.return"}),
            thread(lend_and_return),
            ready,
        )


#: Example file stem → its simulator rig. A new example needs an entry here.
RIGS: dict[str, Rig] = {
    "card_reader_pcsc": pcsc_rig,
    "card_reader_wiegand": wiegand_rig,
    "class_signage": signage_rig,
    "env_sensor": env_rig,
    "access_gate": gate_rig,
    "smart_board": board_rig,
    "recording_unit": recorder_rig,
    "recording_unit_camera": camera_rig,
    "agent-synthetic": synthetic_rig,
    "library_terminal": library_rig,
}


def copied(example: Path, work: Path) -> Path:
    """The example in a fresh dir, with a test key where its key file is expected."""
    work.mkdir()
    (work / example.name).write_bytes(example.read_bytes())
    key_file = tomllib.loads(example.read_text()).get("privacy", {}).get("hash_key_file")
    if key_file:
        assert not Path(key_file).is_absolute(), "keep the example's key file relative"
        (work / key_file).write_text(HASH_KEY_HEX)
    return work / example.name


@contextlib.asynccontextmanager
async def prepared(
    example: Path, tmp_path: Path, broker: Mosquitto, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[AgentConfig, Case]]:
    """The example loaded by the real loader from a tmp copy, re-pointed at this machine."""
    rig = RIGS.get(example.stem)
    if rig is None:
        pytest.fail(
            f"{example.name} has no simulator mapping: add a rig for it to RIGS in {__file__}"
        )
    work = tmp_path / example.stem
    cfg = load_config(copied(example, work))
    async with rig(work, cfg, request) as case:
        yield (
            dataclasses.replace(
                cfg,
                outbox_path=work / "outbox.db",
                broker=dataclasses.replace(
                    cfg.broker, host=broker.host, port=broker.port, tls=False
                ),
                drivers=case.drivers,
            ),
            case,
        )


class Watcher:
    """Every uplink event the broker delivers for one device, subscribed before the agent runs."""

    def __init__(self, broker: Mosquitto, cfg: AgentConfig) -> None:
        self.types: Counter[str] = Counter()
        self.rejected: list[str] = []
        self._topic = topic(cfg.device.school_id, cfg.device.id, "up")
        self._client = aiomqtt.Client(
            broker.host, broker.port, identifier=f"watch-{uuid.uuid4().hex[:8]}"
        )
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> Watcher:
        await self._stack.enter_async_context(self._client)
        await self._client.subscribe(self._topic, qos=1)
        task = asyncio.create_task(self._read(), name="watcher")
        self._stack.push_async_callback(self._cancel, task)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    @staticmethod
    async def _cancel(task: asyncio.Task[None]) -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _read(self) -> None:
        async for msg in self._client.messages:
            assert isinstance(msg.payload, bytes)
            up = decode_uplink(str(msg.topic), msg.payload)
            self.types.update(e.type for e in up.events)
            self.rejected += [r.reason for r in up.rejected]


async def ready(agent: Agent, pred: Callable[[Agent], bool] = all_ok) -> None:
    try:
        await until(lambda: pred(agent), "the drivers to be ready", within=WITHIN_S)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {agent.status().drivers}") from None


def no_restarts(agent: Agent) -> None:
    crashed = [d for d in agent.status().drivers if d.restarts]
    assert not crashed, f"drivers crashed and were restarted: {crashed}"


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
async def test_example_config_runs_and_its_events_reach_the_broker(
    example: Path, tmp_path: Path, mosquitto: Mosquitto, request: pytest.FixtureRequest
) -> None:
    async with (
        prepared(example, tmp_path, mosquitto, request) as (cfg, case),
        Watcher(mosquitto, cfg) as seen,
        Agent(cfg) as agent,
    ):
        await ready(agent, case.ready)
        await case.stimulate()
        await until(
            lambda: case.expect <= seen.types.keys(),
            f"{sorted(case.expect)} at the broker (seen {dict(seen.types)}; "
            f"drivers {agent.status().drivers})",
            within=WITHIN_S,
        )
        no_restarts(agent)
    assert not seen.rejected, f"the broker carried events the contract rejects: {seen.rejected}"


def test_every_example_has_a_rig() -> None:
    assert EXAMPLES, "no example configs found"
    assert not RIGS.keys() - {p.stem for p in EXAMPLES}, "a rig for an example that is gone"


def stored(db_url: str) -> set[str]:
    """``device_id:type`` of every stored event and ``device_id:metric`` of every reading."""
    with psycopg.connect(db_url) as conn:
        events = conn.execute("SELECT device_id, type FROM events").fetchall()
        metrics = conn.execute("SELECT device_id, metric FROM readings").fetchall()
    return {f"{d}:{t}" for d, t in [*events, *metrics]}


async def test_recorder_and_gate_examples_reach_postgresql(
    tmp_path: Path, mosquitto: Mosquitto, db_url: str, request: pytest.FixtureRequest
) -> None:
    server = IngestServer(tmp_path, mosquitto.url, db_url)
    server.start()
    try:
        await asyncio.to_thread(server.wait_healthy)
        by_stem = {p.stem: p for p in EXAMPLES}
        async with (
            prepared(by_stem["recording_unit"], tmp_path, mosquitto, request) as (rec_cfg, _),
            prepared(by_stem["access_gate"], tmp_path, mosquitto, request) as (gate_cfg, gate),
            Agent(rec_cfg) as recorder,
            Agent(gate_cfg) as turnstile,
        ):
            await ready(recorder)
            await ready(turnstile, gate.ready)
            await gate.stimulate()
            rec, turn = rec_cfg.device.id, gate_cfg.device.id
            want = {
                f"{rec}:recorder.status",
                f"{rec}:recorder_free_space_mb",
                f"{turn}:access.pass",
                f"{turn}:body_temperature_c",
            }
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while not want <= (got := await asyncio.to_thread(stored, db_url)):
                if loop.time() > deadline or not server.running:
                    raise AssertionError(f"missing {want - got}; server log:\n{server.tail()}")
                await asyncio.sleep(0.1)
            no_restarts(recorder)
            no_restarts(turnstile)
        with psycopg.connect(db_url) as conn:
            temp = conn.execute(
                "SELECT value FROM readings WHERE metric = 'body_temperature_c'"
            ).fetchone()
            free = conn.execute(
                "SELECT value FROM readings WHERE metric = 'recorder_free_space_mb'"
            ).fetchone()
            data = conn.execute("SELECT data FROM events WHERE type = 'access.pass'").fetchone()
        assert temp is not None
        assert temp[0] == pytest.approx(36.6)
        assert free is not None
        assert free[0] == pytest.approx(4096)
        assert data is not None
        assert data[0]["result"] == "granted", data[0]
    finally:
        server.terminate()
