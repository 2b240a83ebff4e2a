"""The signage driver: check-ins from a Wiegand reader on a pty, notices on the simulated screen."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from device_drivers.base import DriverContext, DriverError, DriverState, UidHasher
from device_drivers.codecs.signage import WEEKDAYS
from device_drivers.signage import ClassSignage, ScreenLink, build, probe
from device_drivers.wiegand import WiegandReader
from schemas.events import AttendanceCheckin, SignageNoticeShown
from simulators.signage import Notice, SignageScreen
from simulators.wiegand import WiegandConverter
from tests.driver_harness import KEY, RunningDriver, ctx_fixture, fast_backoff, until

pytestmark = pytest.mark.integration


def running(signage: ClassSignage) -> RunningDriver:
    return RunningDriver(signage, ready=DriverState.OK, what="the signage to come up")


fast = fast_backoff(WiegandReader, ScreenLink)
ctx = ctx_fixture("cs-0101")


@pytest.fixture
def card(tmp_path: Path) -> Iterator[WiegandConverter]:
    with WiegandConverter(tmp_path / "ttyCARD") as conv:
        yield conv


def midday_zone() -> tuple[str, datetime]:
    """A fixed-offset zone where it is around noon now, so test periods never cross midnight."""
    offset = 12 - datetime.now(UTC).hour
    name = f"Etc/GMT{-offset:+d}"  # POSIX sign: Etc/GMT-8 is UTC+8
    return name, datetime.now(ZoneInfo(name))


def hhmm(t: datetime) -> str:
    return t.strftime("%H:%M")


@pytest.mark.parametrize(
    ("starts_ago", "status", "period"),
    [
        (timedelta(minutes=2), "on_time", "p-now"),
        (timedelta(minutes=20), "late", "p-now"),
        (timedelta(hours=-2), "outside_period", None),
    ],
)
async def test_checkin_status(
    ctx: DriverContext,
    card: WiegandConverter,
    starts_ago: timedelta,
    status: str,
    period: str | None,
) -> None:
    zone, now = midday_zone()
    start = now - starts_ago
    options = {
        "cards": [{"type": "wiegand", "port": str(card.link), "name": "cs-door"}],
        "class_id": "c0101",
        "timezone": zone,
        "grace_min": 5,
        "periods": [
            {
                "name": "p-now",
                "start": hhmm(start),
                "end": hhmm(start + timedelta(minutes=40)),
                "days": [WEEKDAYS[now.weekday()]],
            }
        ],
    }
    async with running(build("cs-0101", options, ctx)) as out:
        uid = card.present(0x1234, facility=0x56)
        await until(lambda: out.of("attendance.checkin"), "a check-in")
    assert out.of("attendance.checkin") == [
        AttendanceCheckin(
            uid_hash=UidHasher(KEY).hash(uid),
            reader="cs-door",
            class_id="c0101",
            period=period,
            status=status,  # type: ignore[arg-type]
        )
    ]
    assert out.of("card.tap") == []


@pytest.fixture
async def screen() -> AsyncIterator[SignageScreen]:
    async with SignageScreen() as s:
        yield s


def with_screen(ctx: DriverContext, screen: SignageScreen, **options: Any) -> ClassSignage:
    return build(
        "cs-0101", {"screen": f"127.0.0.1:{screen.port}", "ack_timeout_s": 0.5, **options}, ctx
    )


async def test_show_notice_reaches_the_screen_then_the_event(
    ctx: DriverContext, screen: SignageScreen
) -> None:
    signage = with_screen(ctx, screen)
    async with running(signage) as out:
        await signage.show_notice("n-42", "停水通知", "明天 8:00-12:00 停水", 0.3, cmd_id="cmd-7")
        assert screen.showing == Notice("n-42", "停水通知", "明天 8:00-12:00 停水", 0.3)
        assert out.of("signage.notice_shown") == [
            SignageNoticeShown(notice_id="n-42", title="停水通知", cmd_id="cmd-7", duration_s=0.3)
        ]
        await until(lambda: screen.showing is None, "the notice to time out on screen")
    assert screen.history == [Notice("n-42", "停水通知", "明天 8:00-12:00 停水", 0.3)]


async def test_unconfirmed_or_refused_notice_emits_nothing(
    ctx: DriverContext, screen: SignageScreen
) -> None:
    signage = with_screen(ctx, screen)
    async with running(signage) as out:
        screen.confirm = False
        with pytest.raises(DriverError, match="did not confirm"):
            await signage.show_notice("n-1", "t", "b", 10.0)
        screen.confirm = True
        screen.reject_next = "display off"
        with pytest.raises(DriverError, match="display off"):
            await signage.show_notice("n-2", "t", "b", 10.0)
        assert out.of("signage.notice_shown") == []
        await signage.show_notice("n-3", "t", "b", None)
        assert [n.notice_id for n in out.of("signage.notice_shown")] == ["n-3"]


async def test_screen_restart_is_survived(ctx: DriverContext, screen: SignageScreen) -> None:
    signage = with_screen(ctx, screen)
    async with running(signage) as out:
        await screen.stop()
        await out.until_state(DriverState.DISCONNECTED, "DISCONNECTED")
        with pytest.raises(DriverError, match="not connected"):
            await signage.show_notice("n-1", "t", "b", 5.0)
        await screen.start()
        await out.until_state(DriverState.OK, "OK after the restart")
        await signage.show_notice("n-2", "t", "b", 5.0)
        assert screen.showing is not None
        assert screen.showing.id == "n-2"
        assert len(out.of("signage.notice_shown")) == 1


async def test_probe(screen: SignageScreen) -> None:
    result = await probe(
        {
            "screen": f"127.0.0.1:{screen.port}",
            "periods": [{"name": "p1", "start": "08:00", "end": "08:45"}],
        }
    )
    assert result.status == "ok"
    assert result.message.startswith("1 period(s); now: ")
    assert result.message.endswith("accepts connections")
    port = screen.port
    await screen.stop()
    result = await probe({"screen": f"127.0.0.1:{port}"})
    assert result.status == "fail"
    assert "unreachable" in result.message
