"""Recording-unit cameras through OpenCV → ``camera.health`` and ``camera.activity`` per window.

Driver type ``camera``. Options:

- ``source``: a video file, an ``http(s)://`` MJPEG URL, an ``rtsp://`` URL, or a device
  index such as ``"0"``. A file is played at its own frame rate, like a live camera.
- ``camera``: the name in events (the driver's name by default).
- ``sample_fps`` (2): frames analysed per second; the source is read at its own pace and the
  other frames only grabbed. ``report_s`` (10): the report window.
- ``people`` (true): HOG people detection, the costly part, run at most every
  ``people_every_s`` (5), counting detections whose SVM score reaches ``people_min_score``
  (1.0; OpenCV's own default of 0 sees people in chair backs and door frames).
- ``black_threshold`` (20), ``frozen_threshold`` (0.5), ``frozen_s`` (20), ``motion_delta``
  (25): see :mod:`device_drivers.codecs.camera_analysis` for what each figure means.
- ``loop`` (false): replay a file at its end (demos). ``open_timeout_s`` (10) and
  ``read_timeout_s`` (5) bound every blocking OpenCV call.

All OpenCV work happens in one capture thread per camera; only the figures reach the event
loop, never a frame. When the source is lost (a stream dies or stalls past the read timeout,
a file ends without ``loop``) the driver emits one ``camera.health`` with ``connected=false``,
goes DISCONNECTED and retries with jittered backoff through a new ``VideoCapture`` (a file
that ended is reopened only once it changes). Counters: ``camera.disconnected`` (per
outage), ``camera.open_failed`` (per attempt), ``camera.people_runs``,
``camera.bad_frame``, ``camera.empty_window``, ``camera.dropped``.

Needs the optional ``camera`` extra (OpenCV); without it the driver type is still known and
building one fails with a message saying what to install.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal
from urllib.parse import urlsplit, urlunsplit

import msgspec
from msgspec import Meta

from device_drivers.base import (
    DeviceLost,
    DriverContext,
    DriverError,
    DriverState,
    Emit,
    ProbeResult,
    convert_options,
    register_driver,
)
from schemas.events import CameraActivity, CameraHealth
from schemas.reading import Reading

try:  # the `camera` extra is optional: without it this module loads and explains what is missing
    import cv2
    import numpy as np

    from device_drivers.codecs.camera_analysis import (
        AnalysisSettings,
        Grey,
        WindowAnalyzer,
        WindowFigures,
        is_black,
    )
    from device_drivers.codecs.camera_analysis import brightness as grey_brightness

    OPENCV_MISSING: str | None = None
except ImportError as exc:
    OPENCV_MISSING = str(exc)

if TYPE_CHECKING:
    from cv2.typing import MatLike

log = logging.getLogger(__name__)

#: Width of the grey frames the figures are computed on.
ANALYSIS_WIDTH: Final = 160
#: Frames wider than this are shrunk before people detection (HOG cost grows with pixels).
PEOPLE_MAX_WIDTH: Final = 640
#: Failed grabs in a row that mean the source is gone rather than one frame was corrupt.
MAX_FAILED_GRABS: Final = 5
EXTRA_HINT: Final = "install the camera extra: pip install 'campus-edge[camera]'"


class CameraOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    source: str | int
    camera: Annotated[str, Meta(min_length=1, max_length=128)] | None = None
    sample_fps: Annotated[float, Meta(gt=0, le=30)] = 2.0
    report_s: Annotated[float, Meta(gt=0)] = 10.0
    people: bool = True
    people_every_s: Annotated[float, Meta(ge=0)] = 5.0
    people_min_score: float = 1.0
    black_threshold: Annotated[int, Meta(ge=0, le=254)] = 20
    frozen_threshold: Annotated[float, Meta(ge=0)] = 0.5
    frozen_s: Annotated[float, Meta(gt=0)] = 20.0
    motion_delta: Annotated[int, Meta(ge=1, le=254)] = 25
    loop: bool = False
    open_timeout_s: Annotated[float, Meta(gt=0)] = 10.0
    read_timeout_s: Annotated[float, Meta(gt=0)] = 5.0

    @property
    def kind(self) -> Literal["device", "url", "file"]:
        if isinstance(self.source, int) or self.source.strip().isdigit():
            return "device"
        return "url" if "://" in self.source else "file"

    def describe(self) -> str:
        """The source for messages, with any password in a URL hidden."""
        if self.kind == "device":
            return f"camera device {self.source}"
        if self.kind == "file":
            return f"video file {self.source}"
        parts = urlsplit(str(self.source))
        if parts.password is None:
            return str(self.source)
        host = parts.hostname or ""
        netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))

    def settings(self) -> AnalysisSettings:
        return AnalysisSettings(
            black_threshold=self.black_threshold,
            frozen_threshold=self.frozen_threshold,
            frozen_s=self.frozen_s,
            motion_delta=self.motion_delta,
        )


def parse_options(name: str, options: Mapping[str, Any]) -> CameraOptions:
    return convert_options(name, options, CameraOptions)


def require_opencv(name: str, *, people: bool) -> None:
    """Fail with a technician's message when OpenCV (or the HOG detector ``people`` needs) is
    missing."""
    if OPENCV_MISSING is not None:
        raise DriverError(f"driver {name!r} needs OpenCV ({OPENCV_MISSING}): {EXTRA_HINT}")
    if people and hog_type() is None:
        raise DriverError(
            f"driver {name!r}: OpenCV {cv2.__version__} has no HOG people detector (OpenCV 5 "
            "moved it to the contrib build): install opencv-python-headless<5 or "
            "opencv-contrib-python-headless, or set people = false"
        )


def hog_type() -> Any:
    """OpenCV's ``HOGDescriptor`` class, or None: OpenCV 5 moved it to the contrib build."""
    return vars(cv2).get("HOGDescriptor")


def open_capture(opts: CameraOptions) -> cv2.VideoCapture:
    """A new ``VideoCapture`` with open/read timeouts, or :class:`DeviceLost`."""
    if opts.kind == "device":
        cap = cv2.VideoCapture(int(opts.source))
        cap.set(cv2.CAP_PROP_READ_TIMEOUT_MSEC, opts.read_timeout_s * 1000)
    else:
        if opts.kind == "file" and not os.path.isfile(str(opts.source)):
            raise DeviceLost(f"{opts.describe()} does not exist")
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, round(opts.open_timeout_s * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC, round(opts.read_timeout_s * 1000),
        ]  # fmt: skip
        cap = cv2.VideoCapture(str(opts.source), cv2.CAP_FFMPEG, params)
    if not cap.isOpened():
        cap.release()
        raise DeviceLost(f"cannot open {opts.describe()}")
    return cap


def to_grey(frame: MatLike) -> Grey:
    """The small grey frame the figures are computed on."""
    grey = frame if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
    h, w = grey.shape[:2]
    size = (ANALYSIS_WIDTH, max(1, round(h * ANALYSIS_WIDTH / w)))
    return np.asarray(cv2.resize(grey, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)


class PeopleDetector:
    """OpenCV's default HOG + linear SVM pedestrian detector (built in, no model to download)."""

    def __init__(self, min_score: float) -> None:
        self.min_score = min_score
        hog = hog_type()
        self._hog = hog()
        self._hog.setSVMDetector(np.asarray(hog.getDefaultPeopleDetector(), np.float32))

    def count(self, frame: MatLike) -> int:
        h, w = frame.shape[:2]
        if w > PEOPLE_MAX_WIDTH:
            size = (PEOPLE_MAX_WIDTH, round(h * PEOPLE_MAX_WIDTH / w))
            frame = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
        _, scores = self._hog.detectMultiScale(frame, winStride=(8, 8), padding=(8, 8), scale=1.05)
        return int(np.count_nonzero(np.ravel(scores) >= self.min_score))


@dataclass(frozen=True, slots=True)
class Opened:
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class Window:
    figures: WindowFigures | None
    at: datetime
    people_runs: int
    bad_frames: int


@dataclass(frozen=True, slots=True)
class Lost:
    reason: str
    ended: bool


Message = Opened | Window | Lost


class VideoSource:
    """A ``VideoCapture`` that plays a file at its frame rate, and replays it when looping."""

    def __init__(self, opts: CameraOptions, stop: threading.Event) -> None:
        self.opts = opts
        self._stop = stop
        self._cap = open_capture(opts)
        self._pace = opts.kind == "file"
        #: Frames that failed to decode (a corrupt JPEG makes one grab fail, the next works).
        self.skipped = 0
        self._restart()

    def _restart(self) -> None:
        self._frame_s = 1.0 / (self._cap.get(cv2.CAP_PROP_FPS) or 25.0)
        self._started, self._frames = time.monotonic(), 0
        #: When the last grabbed frame was taken: a file's frames keep exact media times.
        self.frame_time = self._started

    @property
    def size(self) -> tuple[int, int]:
        cap = self._cap
        return int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))

    def grab(self) -> bool:
        """Take the next frame without decoding it for us; False when the source gave none."""
        if self._pace:
            # A file has no pace of its own: hand frames out as a camera would send them.
            due = self._started + self._frames * self._frame_s
            if due > time.monotonic() and self._stop.wait(due - time.monotonic()):
                return False
        self._frames += 1
        for failed in range(MAX_FAILED_GRABS):
            if self._cap.grab():
                self.skipped += failed
                self._stamp()
                return True
            if self._stop.is_set():
                return False
        if not (self._pace and self.opts.loop):
            return False
        self._cap.release()
        self._cap = open_capture(self.opts)
        self._restart()
        self._frames = 1
        ok = self._cap.grab()
        self._stamp()
        return ok

    @property
    def end_time(self) -> float:
        """When the last frame's time on screen ended (a live source: when it arrived)."""
        return self.frame_time + (self._frame_s if self._pace else 0.0)

    def _stamp(self) -> None:
        if self._pace:
            self.frame_time = self._started + (self._frames - 1) * self._frame_s
        else:
            self.frame_time = time.monotonic()

    def retrieve(self) -> MatLike | None:
        ok, frame = self._cap.retrieve()
        return frame if ok else None

    def close(self) -> None:
        self._cap.release()


class CaptureWorker:
    """One capture session in its own thread: opens the source, reads it until it is lost or
    :meth:`aclose` is called, and posts :class:`Opened`, :class:`Window` and :class:`Lost`.

    The queue is bounded; if the loop falls behind, the oldest message is dropped and counted.
    """

    QUEUE_ITEMS = 16

    def __init__(self, name: str, opts: CameraOptions, on_drop: Callable[[], None]) -> None:
        self.opts = opts
        self._on_drop = on_drop
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Message] = asyncio.Queue(self.QUEUE_ITEMS)
        self._stop = threading.Event()
        #: Per-window tallies, reported with each window (the thread's own, like the analyzer).
        self._runs = self._bad = 0
        self._thread = threading.Thread(target=self._run, name=f"camera-{name}", daemon=True)
        self._thread.start()

    async def next(self) -> Message:
        return await self._queue.get()

    async def aclose(self) -> None:
        """Stop the thread; it notices within one read (bounded by the read timeout)."""
        self._stop.set()
        limit = self.opts.open_timeout_s + self.opts.read_timeout_s + 1
        await asyncio.to_thread(self._thread.join, limit)
        if self._thread.is_alive():
            log.warning("%s: capture thread still busy after %.0f s", self._thread.name, limit)

    def _run(self) -> None:
        source = None
        try:
            source = VideoSource(self.opts, self._stop)
            self._read(source)
        except DeviceLost as exc:
            self._post(Lost(str(exc), ended=False))
        except Exception as exc:  # noqa: BLE001 - any other OpenCV failure also means the source is lost
            self._post(Lost(f"reading {self.opts.describe()} failed: {exc}", ended=False))
        finally:
            if source is not None:
                source.close()

    def _read(self, source: VideoSource) -> None:
        opts = self.opts
        if not source.grab():
            raise DeviceLost(f"{opts.describe()} opened but gave no picture")
        self._post(Opened(*source.size))
        detector = PeopleDetector(opts.people_min_score) if opts.people else None
        now = source.frame_time
        analyzer = WindowAnalyzer(opts.settings(), now)
        period = 1.0 / opts.sample_fps
        window_end, next_sample, next_people = now + opts.report_s, now, now
        while not self._stop.is_set():
            now = source.frame_time
            if now >= window_end - 1e-6:
                self._close_window(analyzer, now, source)
                window_end += opts.report_s
                if window_end <= now:  # the source stalled for more than a window
                    window_end = now + opts.report_s
            analyzer.frame()
            # Sample on the first frame close to the schedule; a late sample does not shift it.
            if now >= next_sample - 0.25 * period:
                next_sample += period
                if next_sample < now:
                    next_sample = now + period
                due = detector if now >= next_people else None
                if self._sample(source, analyzer, due, now) and due is not None:
                    next_people = now + opts.people_every_s
            if not source.grab():
                if self._stop.is_set():
                    return
                self._close_window(analyzer, source.end_time, source)
                if opts.kind == "file":
                    self._post(Lost(f"{opts.describe()} ended", ended=True))
                    return
                raise DeviceLost(f"{opts.describe()} stopped sending pictures")

    def _sample(
        self,
        source: VideoSource,
        analyzer: WindowAnalyzer,
        detector: PeopleDetector | None,
        now: float,
    ) -> bool:
        """Decode and analyse the grabbed frame; a frame OpenCV cannot use is counted, skipped."""
        frame = source.retrieve()
        if frame is None or frame.size == 0:
            self._bad += 1
            return False
        try:
            analyzer.sample(to_grey(frame), now)
            if detector is not None:
                analyzer.people(detector.count(frame))
                self._runs += 1
        except cv2.error:
            self._bad += 1
            return False
        return True

    def _close_window(self, analyzer: WindowAnalyzer, t: float, source: VideoSource) -> None:
        bad = self._bad + source.skipped
        self._post(Window(analyzer.close(t), _wall(), self._runs, bad))
        self._runs = self._bad = source.skipped = 0

    def _post(self, msg: Message) -> None:
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            self._loop.call_soon_threadsafe(self._offer, msg)

    def _offer(self, msg: Message) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self._on_drop()
        self._queue.put_nowait(msg)


def _wall() -> datetime:
    return datetime.now(UTC).astimezone()


def _file_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


class Camera:
    """One camera read through OpenCV; emits derived figures, never pictures."""

    BACKOFF_MIN_S = 1.0
    BACKOFF_MAX_S = 30.0

    def __init__(self, name: str, options: CameraOptions, ctx: DriverContext) -> None:
        self.name = name
        self.state = DriverState.STARTING
        self.last_error: str | None = None
        self.options = options
        self.camera = options.camera or name
        self._ctx = ctx
        self._down_reported = False
        self._ended_file: tuple[int, int] | None = None

    async def run(self, emit: Emit) -> None:
        backoff = self.BACKOFF_MIN_S
        try:
            while True:
                if self._ended_file is None or self._file_changed():
                    self._ended_file = None
                    if await self._session(emit):
                        backoff = self.BACKOFF_MIN_S
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))  # noqa: S311 - jitter
                backoff = min(backoff * 2, self.BACKOFF_MAX_S)
        finally:
            self.state = DriverState.STOPPED

    async def _session(self, emit: Emit) -> bool:
        """Read through one new ``VideoCapture`` until the source is lost; True if it opened."""
        opened = False
        worker = CaptureWorker(self.name, self.options, lambda: self._ctx.count("camera.dropped"))
        try:
            while True:
                msg = await worker.next()
                if isinstance(msg, Opened):
                    opened, self._down_reported = True, False
                    self.state = DriverState.OK
                    log.info(
                        "%s: reading %s (%dx%d)",
                        self.name,
                        self.options.describe(),
                        msg.width,
                        msg.height,
                    )
                elif isinstance(msg, Window):
                    await self._report(msg, emit)
                else:
                    if msg.ended:
                        self._ended_file = _file_identity(str(self.options.source))
                    if not opened:
                        self._ctx.count("camera.open_failed")
                    await self._down(msg.reason, emit)
                    return opened
        finally:
            await worker.aclose()

    async def _report(self, msg: Window, emit: Emit) -> None:
        if msg.people_runs:
            self._ctx.count("camera.people_runs", msg.people_runs)
        if msg.bad_frames:
            self._ctx.count("camera.bad_frame", msg.bad_frames)
            self.last_error = f"skipped {msg.bad_frames} frame(s) OpenCV could not decode"
            log.warning("%s: %s", self.name, self.last_error)
        f = msg.figures
        if f is None:
            self._ctx.count("camera.empty_window")
            return
        health = CameraHealth(
            camera=self.camera,
            fps=round(f.fps, 2),
            brightness=round(f.brightness, 1),
            black_frame=f.black_frame,
            frozen=f.frozen,
            connected=True,
        )
        activity = CameraActivity(camera=self.camera, motion=round(f.motion, 4), people=f.people)
        await emit(Reading("camera.health", health, ts=msg.at))
        await emit(Reading("camera.activity", activity, ts=msg.at))

    async def _down(self, message: str, emit: Emit) -> None:
        if message != self.last_error or not self._down_reported:
            log.warning("%s: %s", self.name, message)
        self.state = DriverState.DISCONNECTED
        self.last_error = message
        if self._down_reported:
            return
        self._down_reported = True
        self._ctx.count("camera.disconnected")
        lost = CameraHealth(
            camera=self.camera, fps=0.0, brightness=0.0, black_frame=False, frozen=False,
            connected=False,
        )  # fmt: skip
        await emit(Reading("camera.health", lost))

    def _file_changed(self) -> bool:
        ident = _file_identity(str(self.options.source))
        return ident is not None and ident != self._ended_file


@register_driver("camera")
def build(name: str, options: Mapping[str, Any], ctx: DriverContext) -> Camera:
    opts = parse_options(name, options)
    require_opencv(name, people=opts.people)
    return Camera(name, opts, ctx)


def _probe(opts: CameraOptions) -> ProbeResult:
    try:
        cap = open_capture(opts)
    except DeviceLost as exc:
        return ProbeResult.fail(str(exc))
    try:
        ok, frame = cap.read()
        if not ok:
            return ProbeResult.fail(
                f"{opts.describe()} opened but gave no picture within {opts.read_timeout_s:.0f} s"
            )
        grey = to_grey(frame)
        h, w = frame.shape[:2]
        rate = cap.get(cv2.CAP_PROP_FPS)
    finally:
        cap.release()
    dark = is_black(grey, opts.black_threshold)
    black = " — the picture is black" if dark else ""
    nominal = f", nominal {rate:.0f} fps" if rate else ""
    verdict = (
        f"{opts.describe()}: OK, {w}x{h}{nominal}, brightness {grey_brightness(grey):.0f}{black}"
    )
    # A black picture may be a covered lens or a dark room: a camera that answers, oddly.
    return ProbeResult.warn(verdict) if dark else ProbeResult.ok(verdict)


async def probe(options: Mapping[str, Any]) -> ProbeResult:
    """Open the source, read one picture and say what it looks like, for ``edge-agent doctor``."""
    try:
        opts = parse_options("probe", options)
        require_opencv("probe", people=False)
    except DriverError as exc:
        return ProbeResult.fail(f"configuration problem: {exc}")
    return await asyncio.to_thread(_probe, opts)
