"""The panel driver against the panel simulators, over a real pty (pyserial) and over TCP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from device_drivers.base import DriverContext, DriverState
from device_drivers.panel import PanelPoller, build, probe
from schemas.events import BoardInput, BoardPower
from simulators.panel import MaxhubPanel, SimulatedPanel, SmartPanel
from tests.driver_harness import RunningDriver, ctx_fixture, fast_backoff, until

pytestmark = pytest.mark.integration

PROFILES = {"smart": SmartPanel, "maxhub": MaxhubPanel}


def running(driver: PanelPoller) -> RunningDriver:
    return RunningDriver(driver, threads=f"link-{driver.name}".__eq__)


fast = fast_backoff(PanelPoller)
ctx = ctx_fixture("sb-0101")


@pytest.fixture(params=["smart", "maxhub"])
def profile(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["pty", "tcp"])
def via(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def panel(tmp_path: Path, profile: str) -> Iterator[SimulatedPanel]:
    with PROFILES[profile](tmp_path / "ttyPANEL") as sim:
        yield sim


def driver_for(ctx: DriverContext, sim: SimulatedPanel, profile: str, via: str) -> PanelPoller:
    port = sim.port if via == "pty" else sim.url
    options = {"port": port, "profile": profile, "poll_s": 0.05, "timeout_s": 0.25}
    return build("board-1", options, ctx)


def power(state: str, previous: str | None) -> tuple[str, Any]:
    return ("board.power", BoardPower(state=state, previous=previous))  # type: ignore[arg-type]


def source(name: str, previous: str | None) -> tuple[str, Any]:
    return ("board.input", BoardInput(source=name, previous=previous))


async def polls(sim: SimulatedPanel, n: int) -> None:
    """Wait until the panel has received ``n`` more commands."""
    start = len(sim.received)
    await until(lambda: len(sim.received) >= start + n, f"{n} more polls")


async def test_changes_become_exactly_the_expected_events(
    panel: SimulatedPanel, ctx: DriverContext, profile: str, via: str
) -> None:
    driver = driver_for(ctx, panel, profile, via)
    async with running(driver) as out:
        await out.until_count(2, what="first observation")
        assert driver.state == DriverState.OK
        panel.set_input("hdmi2")
        await out.until_count(3, what="input change")
        panel.set_power("off")
        await out.until_count(4, what="power off")
        panel.set_input("hdmi3")  # not visible while the screen is off
        await polls(panel, 4)
        panel.set_power("on")
        await out.until_count(6, what="power on and the new input")
        await polls(panel, 6)  # steady polling adds nothing
    assert out.events == [
        power("on", "unknown"),
        source("hdmi1", None),
        source("hdmi2", "hdmi1"),
        power("off", "on"),
        power("on", "off"),
        source("hdmi3", "hdmi2"),
    ]
    assert ctx.counters.get("panel.malformed", 0) == 0


async def test_standby_silence_is_standby_not_an_error(
    panel: SimulatedPanel, ctx: DriverContext, profile: str, via: str
) -> None:
    driver = driver_for(ctx, panel, profile, via)
    async with running(driver) as out:
        await out.until_count(2, what="first observation")
        panel.set_power("standby")
        await out.until_count(3, what="standby")
        assert driver.state == DriverState.OK
        panel.set_power("on")  # a real panel wakes by touch or the power button
        await out.until_count(4, what="back on")
        await polls(panel, 4)
        assert driver.state == DriverState.OK
        assert driver.last_error is None
    assert out.events == [
        power("on", "unknown"),
        source("hdmi1", None),
        power("standby", "on"),
        power("on", "standby"),
    ]
    assert "panel.disconnected" not in ctx.counters


async def test_malformed_replies_are_counted_and_later_replies_processed(
    panel: SimulatedPanel, ctx: DriverContext, profile: str, via: str
) -> None:
    driver = driver_for(ctx, panel, profile, via)
    async with running(driver) as out:
        await out.until_count(2, what="first observation")
        panel.corrupt(2)
        await until(lambda: ctx.counters.get("panel.malformed") == 2, "two malformed replies")
        panel.set_input("hdmi2")
        await out.until_count(3, what="the change after them")
        assert driver.state == DriverState.OK
        assert driver.last_error is not None
        assert driver.last_error.startswith("skipped a malformed reply")
    assert out.events[-1] == source("hdmi2", "hdmi1")
    assert len(out.events) == 3  # a garbled reply is not a power change


async def test_unplug_and_replug_recovers_without_restart(
    panel: SimulatedPanel, ctx: DriverContext, profile: str, via: str
) -> None:
    driver = driver_for(ctx, panel, profile, via)
    async with running(driver) as out:
        await out.until_count(2, what="first observation")
        before = panel.pts_name
        panel.unplug()
        await out.until_state(DriverState.DISCONNECTED, "DISCONNECTED")
        assert driver.port in (driver.last_error or "")
        after = panel.replug()
        assert after != before
        await polls(panel, 1)
        await out.until_state(DriverState.OK, "OK after the re-plug")
        panel.set_input("hdmi3")
        await out.until_count(3, what="a change after the re-plug")
    assert out.events == [power("on", "unknown"), source("hdmi1", None), source("hdmi3", "hdmi1")]
    assert ctx.counters["panel.disconnected"] == 1


async def test_a_panel_that_never_answers_is_disconnected_until_it_does(
    tmp_path: Path, ctx: DriverContext, profile: str, via: str
) -> None:
    with PROFILES[profile](tmp_path / "ttyP", power="standby") as sim:
        driver = driver_for(ctx, sim, profile, via)
        async with running(driver) as out:
            await out.until_state(DriverState.DISCONNECTED, "DISCONNECTED")
            assert "no reply from the panel" in (driver.last_error or "")
            assert out.events == []
            sim.set_power("on")
            await out.until_count(2, what="events once it answers")
            assert driver.state == DriverState.OK
    assert out.events == [power("on", "unknown"), source("hdmi1", None)]


async def test_missing_port_at_start_then_plugged(tmp_path: Path, ctx: DriverContext) -> None:
    link = tmp_path / "ttyLATE"
    driver = build("board-2", {"port": str(link), "poll_s": 0.05, "timeout_s": 0.25}, ctx)
    async with running(driver) as out:
        await out.until_state(DriverState.DISCONNECTED, "DISCONNECTED")
        assert "no such device" in (driver.last_error or "")
        with SmartPanel(link, source="ops"):
            await out.until_count(2, what="events once plugged")
    assert out.events == [power("on", "unknown"), source("ops", None)]


async def test_probe(panel: SimulatedPanel, profile: str, via: str) -> None:
    port = panel.port if via == "pty" else panel.url
    result = await probe({"port": port, "profile": profile, "timeout_s": 0.5})
    assert result.status == "ok", result
    assert result.message.endswith(": power on, input hdmi1"), result
    panel.set_power("standby")
    result = await probe({"port": port, "profile": profile, "timeout_s": 0.2})
    assert result.status == "fail"
    assert "no reply" in result.message
    result = await probe({"port": "/nonexistent/tty", "profile": profile})
    assert result.status == "fail"
    assert "cannot open" in result.message
