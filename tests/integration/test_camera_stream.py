"""The camera driver on live cameras (MJPEG over HTTP, RTSP): reading, dropping off, stalling."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("cv2", reason="the camera extra (OpenCV) is not installed")

from device_drivers import camera
from device_drivers.base import DriverState, ProbeResult
from simulators.camera import MjpegCamera, RtspCamera, make_test_video, read_video
from tests.camera_run import running

pytestmark = pytest.mark.integration

LIVE = {"report_s": 0.5, "sample_fps": 5, "people": False, "open_timeout_s": 2, "read_timeout_s": 1}


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(camera.Camera, "BACKOFF_MIN_S", 0.1)
    monkeypatch.setattr(camera.Camera, "BACKOFF_MAX_S", 0.4)


async def test_mjpeg_over_http_is_read_through_videocapture() -> None:
    with MjpegCamera([("motion", 2.0)], fps=10) as cam:
        async with running({"source": cam.url, **LIVE}) as run:
            await run.until(lambda: len(run.health()) >= 4, 15, "four windows")
            assert run.driver.state is DriverState.OK
        assert cam.connections == 1
    windows = run.windows()[1:]  # the first one starts mid-stream
    assert all(h.connected and not h.black_frame and not h.frozen for h, _ in windows)
    assert all(6 <= h.fps <= 14 for h, _ in windows), windows
    assert all(a.motion > 0.03 for _, a in windows), windows


async def test_corrupt_pictures_are_counted_and_skipped_without_dropping_the_stream() -> None:
    with MjpegCamera([("motion", 2.0)], fps=10, corrupt_every=4) as cam:
        async with running({"source": cam.url, **LIVE}) as run:
            await run.until(lambda: len(run.health()) >= 4, 15, "four windows")
            assert run.driver.state is DriverState.OK
        assert cam.connections == 1
    assert all(h.connected for h in run.health())
    assert all(a.motion > 0.03 for _, a in run.windows())
    assert run.ctx.counters["camera.bad_frame"] >= 3
    assert run.driver.last_error is not None
    assert "could not decode" in run.driver.last_error


async def test_camera_dropping_off_the_network_and_returning() -> None:
    cam = MjpegCamera([("normal", 2.0)], fps=10)
    cam.start()
    try:
        async with running({"source": cam.url, **LIVE}) as run:
            await run.until(run.health, 10, "the first window")
            cam.stop()
            await run.until(
                lambda: run.ctx.counters.get("camera.open_failed", 0) >= 2, 10, "retries"
            )
            assert run.driver.state is DriverState.DISCONNECTED
            assert [h.connected for h in run.health()].count(False) == 1
            assert not run.health()[-1].connected
            seen = len(run.health())
            cam.start()
            await run.until(lambda: len(run.health()) > seen, 10, "a window after the return")
            assert run.health()[-1].connected
            assert run.driver.state is DriverState.OK
            assert [h.connected for h in run.health()].count(False) == 1
            assert run.ctx.counters["camera.disconnected"] == 1
        assert cam.connections >= 2  # a new VideoCapture after the return
    finally:
        cam.stop()


async def test_a_stalled_stream_hits_the_read_timeout_and_recovers() -> None:
    with MjpegCamera([("normal", 2.0)], fps=10) as cam:
        async with running({"source": cam.url, **LIVE}) as run:
            await run.until(run.health, 10, "the first window")
            cam.hang()
            await run.until(lambda: not run.health()[-1].connected, 10, "the read timeout")
            assert run.driver.last_error is not None
            assert "stopped sending pictures" in run.driver.last_error
            cam.stop()
            cam.start()
            await run.until(lambda: run.health()[-1].connected, 10, "the stream's return")
            assert run.driver.state is DriverState.OK


async def test_probe_on_a_stream_and_on_a_camera_that_is_away(tmp_path: Path) -> None:
    make_test_video(tmp_path / "lesson.mp4", [("normal", 0.5)], fps=10, size=(640, 480))
    frames, fps = read_video(tmp_path / "lesson.mp4")
    with MjpegCamera(fps=fps, frames=frames) as cam:
        result = await camera.probe({"source": cam.url, "open_timeout_s": 2})
        assert result.status == "ok"
        assert result.message.startswith(f"{cam.url}: OK, 640x480")
    result = await camera.probe({"source": cam.url, "open_timeout_s": 2})
    assert result == ProbeResult.fail(f"cannot open {cam.url}")


@pytest.fixture
def rtsp_camera() -> Iterator[RtspCamera]:
    if (why := RtspCamera.missing()) is not None:
        pytest.skip(why)
    cam = RtspCamera(fps=10)
    cam.start()
    try:
        yield cam
    finally:
        cam.stop()


async def test_rtsp_camera_is_read_and_recovered_after_a_restart(rtsp_camera: RtspCamera) -> None:
    cam = rtsp_camera
    async with running({"source": cam.url, **LIVE, "open_timeout_s": 5}) as run:
        await run.until(lambda: len(run.health()) >= 3, 15, "three windows")
        cam.stop()
        await run.until(lambda: not run.health()[-1].connected, 10, "the read timeout")
        seen = len(run.health())
        cam.start()
        await run.until(lambda: len(run.health()) > seen, 15, "a window after the restart")
        assert run.driver.state is DriverState.OK
    windows = run.windows()[1:3]  # the first one also holds what buffered while opening
    assert all(6 <= h.fps <= 14 for h, _ in windows), windows
    assert all(a.motion > 0 and not h.black_frame for h, a in windows), windows
    assert [h.connected for h in run.health()].count(False) == 1
