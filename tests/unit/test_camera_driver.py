"""Camera driver options, registration and the missing-OpenCV path (no video I/O here)."""

from __future__ import annotations

import pytest

pytest.importorskip("cv2", reason="the camera extra (OpenCV) is not installed")

import cv2

from device_drivers import camera
from device_drivers.base import (
    DRIVERS,
    DriverContext,
    DriverError,
    DriverState,
    ProbeResult,
    UidHasher,
)


@pytest.fixture
def ctx() -> DriverContext:
    return DriverContext("ru-0101", UidHasher(bytes(16)))


def test_registered_with_defaults(ctx: DriverContext) -> None:
    opts = camera.parse_options("front", {"source": "rtsp://10.0.0.5/live"})
    assert (opts.sample_fps, opts.report_s, opts.people, opts.people_every_s) == (2, 10, True, 5)
    assert (opts.black_threshold, opts.frozen_threshold, opts.frozen_s) == (20, 0.5, 20)
    assert not opts.loop
    options = {"type": "camera", "source": "rtsp://10.0.0.5/live", "people": False}
    drv = DRIVERS["camera"]("front", options, ctx)
    assert isinstance(drv, camera.Camera)
    assert drv.state is DriverState.STARTING
    assert drv.camera == "front"


@pytest.mark.parametrize(
    ("source", "kind"),
    [(0, "device"), ("1", "device"), ("rtsp://cam/live", "url"),
     ("https://cam/video.mjpg", "url"), ("/srv/video/room.mp4", "file"), ("room 3.avi", "file")],
)  # fmt: skip
def test_source_kinds(source: str | int, kind: str) -> None:
    assert camera.parse_options("c", {"source": source}).kind == kind


def test_passwords_never_appear_in_messages() -> None:
    opts = camera.parse_options("c", {"source": "rtsp://admin:s3cret@10.0.0.5:554/h264"})
    assert opts.describe() == "rtsp://admin:***@10.0.0.5:554/h264"
    assert "s3cret" not in opts.describe()


@pytest.mark.parametrize(
    "options",
    [{}, {"source": "x.mp4", "sample_fps": 0}, {"source": "x.mp4", "black_threshold": 300},
     {"source": "x.mp4", "frames_to_cloud": True}],
)  # fmt: skip
def test_bad_options_are_a_driver_error_naming_the_driver(
    options: dict[str, object], ctx: DriverContext
) -> None:
    with pytest.raises(DriverError, match="'door-cam'"):
        camera.build("door-cam", options, ctx)


def test_without_opencv_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, ctx: DriverContext
) -> None:
    monkeypatch.setattr(camera, "OPENCV_MISSING", "No module named 'cv2'")
    with pytest.raises(DriverError, match=r"campus-edge\[camera\]"):
        camera.build("front", {"source": "0"}, ctx)


def test_without_hog_people_counting_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, ctx: DriverContext
) -> None:
    monkeypatch.delattr(cv2, "HOGDescriptor", raising=False)
    with pytest.raises(DriverError, match="people = false"):
        camera.build("front", {"source": "0"}, ctx)
    assert camera.build("front", {"source": "0", "people": False}, ctx).options.people is False


async def test_probe_reports_configuration_and_missing_sources() -> None:
    result = await camera.probe({"sample_fps": 1})
    assert result.status == "fail"
    assert result.message.startswith("configuration problem")
    result = await camera.probe({"source": "/nonexistent/room.mp4"})
    assert result == ProbeResult.fail("video file /nonexistent/room.mp4 does not exist")
