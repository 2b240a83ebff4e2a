"""The camera driver on video files written at test time: each report window flags exactly the
segment it covers. Files are played at their frame rate and windows follow the files' own frame
times, so a window's content is exact even on a busy machine."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("cv2", reason="the camera extra (OpenCV) is not installed")

import cv2

from device_drivers import camera
from device_drivers.base import DriverContext, DriverState, UidHasher
from schemas.events import CameraActivity, CameraHealth
from schemas.reading import Reading
from simulators.camera import PEOPLE_IN_SEGMENT, make_test_video

pytestmark = pytest.mark.integration

REPORT_S = 0.5


@dataclass
class Run:
    driver: camera.Camera
    ctx: DriverContext
    task: asyncio.Task[None] | None = None
    readings: list[Reading] = field(default_factory=list)

    async def emit(self, reading: Reading) -> None:
        self.readings.append(reading)

    def health(self) -> list[CameraHealth]:
        return [r.data for r in self.readings if isinstance(r.data, CameraHealth)]

    def windows(self) -> list[tuple[CameraHealth, CameraActivity]]:
        """(health, activity) per report window, in order; disconnection events left out."""
        health = [h for h in self.health() if h.connected]
        activity = [r.data for r in self.readings if isinstance(r.data, CameraActivity)]
        assert len(health) == len(activity)
        return list(zip(health, activity, strict=True))

    async def until(self, pred: Callable[[], object], limit_s: float, what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        while not pred():
            assert self.task is not None
            if self.task.done():
                self.task.result()
                raise AssertionError(f"driver stopped while waiting for {what}")
            if loop.time() > deadline:
                raise TimeoutError(f"timed out after {limit_s:.0f}s waiting for {what}")
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running(options: dict[str, Any]) -> AsyncIterator[Run]:
    ctx = DriverContext("ru-0101", UidHasher(bytes(16)))
    run = Run(camera.build("room-101", options, ctx), ctx)
    run.task = asyncio.create_task(run.driver.run(run.emit), name="camera-driver")
    try:
        yield run
    finally:
        run.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run.task
    assert run.driver.state is DriverState.STOPPED
    assert not [t.name for t in threading.enumerate() if t.name.startswith("camera-")]


def expected_kinds(timeline: list[tuple[str, float, float]]) -> list[str]:
    """The segment each report window lies in (segments are whole windows long)."""
    end = timeline[-1][2]
    mids = [(k + 0.5) * REPORT_S for k in range(round(end / REPORT_S))]
    return [next(kind for kind, a, b in timeline if a <= t < b) for t in mids]


async def play_to_end(options: dict[str, Any]) -> Run:
    async with running(options) as run:
        await run.until(lambda: any(not h.connected for h in run.health()), 30, "the file's end")
        assert run.driver.state is DriverState.DISCONNECTED
        assert run.driver.last_error is not None
        assert "ended" in run.driver.last_error
    return run


async def test_windows_flag_black_frozen_and_motion(tmp_path: Path) -> None:
    timeline = make_test_video(
        tmp_path / "room.avi",
        [("normal", 1.0), ("black", 1.0), ("frozen", 2.0), ("motion", 1.0)],
        fps=10,
    )
    run = await play_to_end(
        {"source": str(tmp_path / "room.avi"), "report_s": REPORT_S, "sample_fps": 10,
         "frozen_s": 0.5, "people": False}
    )  # fmt: skip
    kinds = expected_kinds(timeline)
    windows = run.windows()
    assert len(windows) == len(kinds) == 10
    frozen_seen = 0
    for k, (kind, (health, act)) in enumerate(zip(kinds, windows, strict=True)):
        where = f"window {k} ({kind}): {health}, {act}"
        assert health.fps == pytest.approx(10.0, abs=0.01), where
        assert health.black_frame == (kind == "black"), where
        assert act.people == 0, where
        if kind == "black":
            assert health.brightness < 5, where
            assert act.motion == 0.0, where
        else:
            assert 100 < health.brightness < 200, where
        # frozen_s = 0.5: a freeze is flagged from its second window on.
        if kind == "frozen":
            assert health.frozen == (frozen_seen > 0), where
            frozen_seen += 1
        else:
            assert not health.frozen, where
        if kind == "motion":
            assert act.motion > 0.05, where
        else:
            assert act.motion < 0.02, where
    assert [h.connected for h in run.health()].count(False) == 1
    assert run.ctx.counters["camera.disconnected"] == 1
    assert "camera.people_runs" not in run.ctx.counters


@pytest.mark.skipif(not hasattr(cv2, "HOGDescriptor"), reason="this OpenCV build has no HOG")
async def test_people_are_counted_at_the_configured_cadence(tmp_path: Path) -> None:
    timeline = make_test_video(
        tmp_path / "people.avi", [("normal", 0.5), ("people", 1.5), ("black", 0.5)], fps=10
    )
    run = await play_to_end(
        {"source": str(tmp_path / "people.avi"), "report_s": REPORT_S, "sample_fps": 2,
         "people_every_s": 0.5}
    )  # fmt: skip
    want = [PEOPLE_IN_SEGMENT if k == "people" else 0 for k in expected_kinds(timeline)]
    assert [a.people for _, a in run.windows()] == want
    # One detector run every 0.5 s of a 2.5 s file, each on a sampled frame.
    assert run.ctx.counters["camera.people_runs"] == 5


async def test_mp4v_file_black_then_frozen(tmp_path: Path) -> None:
    timeline = make_test_video(
        tmp_path / "room.mp4", [("black", 1.0), ("frozen", 1.5), ("motion", 0.5)], fps=10
    )
    run = await play_to_end(
        {"source": str(tmp_path / "room.mp4"), "report_s": REPORT_S, "sample_fps": 5,
         "frozen_s": 0.5, "people": False}
    )  # fmt: skip
    got = [(h.black_frame, h.frozen, a.motion > 0.05) for h, a in run.windows()]
    want = {"black": (True, False, False), "frozen": (False, True, False)}
    want["motion"] = (False, False, True)
    expected = [want[k] for k in expected_kinds(timeline)]
    expected[2] = (False, False, False)  # the freeze's first window: not yet longer than 0.5 s
    assert got == expected


async def test_looping_file_plays_on_without_disconnecting(tmp_path: Path) -> None:
    make_test_video(tmp_path / "loop.avi", [("motion", 0.6)], fps=10)
    opts = {"source": str(tmp_path / "loop.avi"), "report_s": REPORT_S, "loop": True}
    async with running({**opts, "people": False, "sample_fps": 4}) as run:
        await run.until(lambda: len(run.health()) >= 4, 10, "four windows over two loops")
        assert all(h.connected for h in run.health())
        assert all(h.fps == pytest.approx(10.0, abs=0.5) for h in run.health())
        assert run.driver.state is DriverState.OK


async def test_a_missing_file_is_reported_once_and_picked_up_when_it_appears(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(camera.Camera, "BACKOFF_MIN_S", 0.05)
    monkeypatch.setattr(camera.Camera, "BACKOFF_MAX_S", 0.1)
    path = tmp_path / "later.avi"
    async with running({"source": str(path), "report_s": REPORT_S, "people": False}) as run:
        await run.until(lambda: run.ctx.counters.get("camera.open_failed", 0) >= 3, 10, "retries")
        assert [h.connected for h in run.health()] == [False]
        assert run.driver.state is DriverState.DISCONNECTED
        make_test_video(tmp_path / "tmp.avi", [("normal", 1.0)], fps=10)
        (tmp_path / "tmp.avi").rename(path)
        await run.until(lambda: any(h.connected for h in run.health()), 10, "the new file")
        assert run.driver.state is DriverState.OK


async def test_probe_reads_one_picture(tmp_path: Path) -> None:
    video = tmp_path / "p.avi"
    make_test_video(video, [("black", 0.5)], fps=10, size=(320, 240))
    result = await camera.probe({"source": str(video)})
    assert result.status == "warn"  # black, though it answered
    assert result.message.startswith(f"video file {video}: OK, 320x240, nominal 10 fps")
    assert result.message.endswith("the picture is black")
