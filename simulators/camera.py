"""A classroom camera: video files with known segments, and live MJPEG-over-HTTP / RTSP cameras.

Segments (what the camera sees; the picture is drawn here, independently of the driver):

- ``normal``: a static classroom with lighting flicker and one small object drifting.
- ``black``: all-zero frames (lens covered, encoder lost its sensor).
- ``frozen``: the last ``normal``-style picture repeated unchanged.
- ``motion``: large balls crossing the picture quickly.
- ``people``: :data:`PEOPLE_IN_SEGMENT` standing figures (soft-edged silhouettes of adult
  proportions, ~130 px tall at 320x240) walking slowly; OpenCV's default HOG people
  detector finds each of them at 320x240.

    make_test_video(tmp_path / "cam.avi", [("normal", 2), ("black", 2)], fps=10)
    with MjpegCamera([("motion", 2)], fps=10) as cam:   # serves cam.url until stopped
        cam.stop(); cam.start()                          # drops off the network and returns
    MjpegCamera(frames=read_video("lesson.mp4")[0])     # or serves a recorded file live
    with RtspCamera(fps=10) as cam: ...                  # rtsp:// through GStreamer, if installed
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Final, Literal

import cv2
import numpy as np
from cv2.typing import MatLike

Kind = Literal["normal", "black", "frozen", "motion", "people"]
Segment = tuple[Kind, float]
Frame = MatLike

KINDS: Final = ("normal", "black", "frozen", "motion", "people")
PEOPLE_IN_SEGMENT: Final = 2
_FOURCC: Final = {".mp4": "mp4v", ".avi": "MJPG"}
_BOUNDARY: Final = b"campusframe"


class Scene:
    """Draws the frames of each segment kind at one size and frame rate."""

    def __init__(self, size: tuple[int, int] = (320, 240), fps: float = 10.0) -> None:
        self.width, self.height = size
        self.fps = fps
        self.background = self._classroom()
        self._last_live: Frame = self.background

    def frames(self, segments: Iterable[Segment]) -> Iterator[Frame]:
        """Every frame of the segments, in order; a ``frozen`` one repeats the picture before it."""
        for kind, seconds in segments:
            if kind not in KINDS:
                raise ValueError(f"unknown segment kind {kind!r} (known: {', '.join(KINDS)})")
            frozen = self._last_live.copy()
            for i in range(round(seconds * self.fps)):
                t = i / self.fps
                if kind == "black":
                    yield np.zeros((self.height, self.width, 3), np.uint8)
                    continue
                if kind == "frozen":
                    yield frozen
                    continue
                frame = self._live(kind, t)
                self._last_live = frame
                yield frame

    def _live(self, kind: Kind, t: float) -> Frame:
        # Lighting flicker (mains lights, auto exposure) keeps a live picture from being frozen.
        flicker = round(4 * math.sin(2 * math.pi * t / 1.3))
        frame = cv2.add(self.background, np.full_like(self.background, 4 + flicker))
        w, h = self.width, self.height
        drift = int(w * 0.1 + (w * 0.05) * t) % w
        cv2.circle(frame, (drift, h // 8), max(3, h // 40), (30, 90, 200), -1)
        if kind == "motion":
            # Balls rolling along one row: nothing stacks up into a person-like shape.
            for k in range(4):
                speed = w * (0.5 + 0.15 * k)
                x = int(abs((t * speed + k * w / 4) % (2 * w) - w))
                cv2.circle(frame, (x, h // 2), h // 8, (20 + 50 * k, 20, 60), -1)
        elif kind == "people":
            tall = round(h * 0.55)
            for k in range(PEOPLE_IN_SEGMENT):
                cx = round(w * (0.2 + 0.55 * k) + 6 * t)
                _figure(frame, cx, (h - tall) // 2 + 4 * k, tall)
            frame = cv2.GaussianBlur(frame, (3, 3), 0)
        return frame

    def _classroom(self) -> Frame:
        w, h = self.width, self.height
        wall = np.linspace(185, 150, h, dtype=np.float32)[:, None, None]
        img = np.broadcast_to(wall, (h, w, 3)).astype(np.uint8).copy()
        cv2.rectangle(img, (0, int(h * 0.78)), (w, h), (110, 115, 120), -1)  # floor
        cv2.rectangle(
            img, (int(w * 0.3), int(h * 0.08)), (int(w * 0.7), int(h * 0.3)), (50, 70, 50), -1
        )  # blackboard
        for k in range(4):  # desk fronts along the floor line
            x = int(w * (0.05 + 0.24 * k))
            cv2.rectangle(img, (x, int(h * 0.82)), (x + w // 6, int(h * 0.95)), (60, 90, 130), -1)
        return img


def _figure(img: Frame, cx: int, top: int, height: int) -> None:
    """A dark standing adult: head, neck, torso, arms, legs (8 head-heights tall)."""
    u, ink = height / 8.0, (40, 40, 40)

    def poly(*pts: tuple[float, float]) -> None:
        cv2.fillPoly(
            img,
            [np.array([(round(cx + x * u), round(top + y * u)) for x, y in pts], np.int32)],
            ink,
        )

    cv2.ellipse(
        img, (cx, round(top + u * 0.5)), (round(u * 0.38), round(u * 0.5)), 0, 0, 360, ink, -1
    )
    poly((-0.15, 1.0), (0.15, 1.0), (0.15, 1.3), (-0.15, 1.3))
    poly((-0.95, 1.3), (0.95, 1.3), (0.7, 4.1), (-0.7, 4.1))
    for s in (-1, 1):
        poly((s * 0.8, 1.35), (s * 1.15, 1.5), (s * 1.2, 4.0), (s * 0.9, 4.0))
        poly((s * 0.05, 4.0), (s * 0.7, 4.0), (s * 0.6, 7.9), (s * 0.15, 7.9))


def make_test_video(
    path: str | Path,
    segments: Sequence[Segment],
    fps: float = 10.0,
    size: tuple[int, int] = (320, 240),
) -> list[tuple[Kind, float, float]]:
    """Write the segments to ``path`` (.mp4 as mp4v, .avi as MJPG); return (kind, start, end)s."""
    path = Path(path)
    fourcc = _FOURCC.get(path.suffix.lower())
    if fourcc is None:
        raise ValueError(f"write .mp4 or .avi, not {path.suffix!r}")
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*fourcc), fps, size)
    if not writer.isOpened():
        raise OSError(f"OpenCV cannot write {fourcc} to {path}")
    try:
        for frame in Scene(size, fps).frames(segments):
            writer.write(frame)
    finally:
        writer.release()
    timeline, start = [], 0.0
    for kind, seconds in segments:
        end = start + round(seconds * fps) / fps
        timeline.append((kind, start, end))
        start = end
    return timeline


def read_video(path: str | Path) -> tuple[list[Frame], float]:
    """A video file's frames and frame rate (for serving a recorded file live)."""
    cap = cv2.VideoCapture(str(path))
    try:
        fps = cap.get(cv2.CAP_PROP_FPS) or 10.0
        frames = []
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(frame)
    finally:
        cap.release()
    if not frames:
        raise OSError(f"no frames in {path}")
    return frames, fps


class MjpegCamera:
    """An IP camera serving ``multipart/x-mixed-replace`` JPEGs on 127.0.0.1, looping its frames.

    Every client sees the same live picture: frame ``int(elapsed * fps) % n``. :meth:`stop`
    closes the listener and every connection (the camera drops off the network); :meth:`start`
    serves again on the same port. :meth:`hang` keeps connections open but sends nothing.
    ``corrupt_every=n`` replaces every n-th picture with bytes that are not a JPEG.
    """

    def __init__(
        self,
        segments: Sequence[Segment] = (("normal", 2.0),),
        fps: float = 10.0,
        size: tuple[int, int] = (320, 240),
        *,
        frames: Sequence[Frame] | None = None,
        quality: int = 80,
        corrupt_every: int = 0,
    ) -> None:
        self.fps = fps
        pictures = list(frames) if frames is not None else list(Scene(size, fps).frames(segments))
        if not pictures:
            raise ValueError("a camera needs at least one frame")
        params = [cv2.IMWRITE_JPEG_QUALITY, quality]
        self._jpegs = [cv2.imencode(".jpg", f, params)[1].tobytes() for f in pictures]
        if corrupt_every:  # a flaky encoder or link: some parts are not JPEGs at all
            for i in range(corrupt_every - 1, len(self._jpegs), corrupt_every):
                self._jpegs[i] = b"\xff\xd8 garbage from a flaky encoder"
        self.port = 0
        #: Connections accepted so far: a new one after a drop means the client reconnected.
        self.connections = 0
        self._listener: socket.socket | None = None
        self._clients: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._running = threading.Event()
        self._hung = threading.Event()
        self._epoch = time.monotonic()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/video.mjpg"

    def start(self) -> None:
        """Listen (on the same port as before after a :meth:`stop`) and serve."""
        if self._running.is_set():
            return
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(8)
        sock.settimeout(0.1)
        self.port = sock.getsockname()[1]
        self._listener = sock
        self._hung.clear()
        self._running.set()
        self._spawn(self._accept, "mjpeg-accept")

    def stop(self) -> None:
        """Close the listener and every connection: the camera is gone from the network."""
        self._running.clear()
        with self._lock:
            clients, self._clients = self._clients, set()
        for conn in clients:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        with self._lock:
            threads, self._threads = self._threads, []
        for thread in threads:
            thread.join(5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def hang(self) -> None:
        """Stop sending frames but keep every connection open (a stalled stream)."""
        self._hung.set()

    def __enter__(self) -> MjpegCamera:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        assert self._listener is not None
        listener = self._listener
        while self._running.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                if not self._running.is_set():
                    conn.close()
                    return
                self._clients.add(conn)
                self.connections += 1
            self._spawn(self._serve, "mjpeg-client", conn)

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(2.0)
            request = b""
            while b"\r\n\r\n" not in request and len(request) < 8192:
                chunk = conn.recv(1024)
                if not chunk:
                    return
                request += chunk
            conn.sendall(
                b"HTTP/1.0 200 OK\r\nServer: campus-sim-camera\r\nCache-Control: no-cache\r\n"
                b"Content-Type: multipart/x-mixed-replace;boundary=" + _BOUNDARY + b"\r\n\r\n"
            )
            period = 1.0 / self.fps
            while self._running.is_set():
                if self._hung.is_set():
                    time.sleep(0.05)
                    continue
                now = time.monotonic() - self._epoch
                jpeg = self._jpegs[int(now * self.fps) % len(self._jpegs)]
                conn.sendall(
                    b"--"
                    + _BOUNDARY
                    + b"\r\nContent-Type: image/jpeg\r\n"
                    + f"Content-Length: {len(jpeg)}\r\n\r\n".encode()
                    + jpeg
                    + b"\r\n"
                )
                time.sleep(max(0.0, period - (time.monotonic() - self._epoch - now)))
        except OSError:
            pass  # the client went away, or stop() closed the connection
        finally:
            with self._lock:
                self._clients.discard(conn)
            conn.close()


#: The interpreter with PyGObject and GStreamer's RTSP server bindings (Debian's, not a venv).
SYSTEM_PYTHON: Final = os.environ.get("CAMPUS_GI_PYTHON", "/usr/bin/python3")
_RTSP_SERVER: Final = """
import sys, gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer
Gst.init(None)
server = GstRtspServer.RTSPServer()
server.set_address("127.0.0.1")
server.set_service(sys.argv[1])
factory = GstRtspServer.RTSPMediaFactory()
factory.set_launch(sys.argv[2])
factory.set_shared(True)
server.get_mount_points().add_factory("/cam", factory)
if not server.attach(None):
    sys.exit("cannot listen on port " + sys.argv[1])
GLib.MainLoop().run()
"""


class RtspCamera:
    """An RTSP camera at ``rtsp://127.0.0.1:PORT/cam``: GStreamer's rtsp-server in a child
    process serving a live test picture (a ball bouncing over grey) as RTP/JPEG.

    Needs the system Python with PyGObject and apt ``gir1.2-gst-rtsp-server-1.0
    gstreamer1.0-plugins-good`` (:meth:`missing` says what is absent). :meth:`stop` kills the
    server (the camera is gone); :meth:`start` serves again on the same port.
    """

    def __init__(self, fps: int = 10, size: tuple[int, int] = (320, 240)) -> None:
        w, h = size
        self.launch = (
            "( videotestsrc is-live=true pattern=ball background-color=0xff707070"
            f" ! video/x-raw,format=I420,width={w},height={h},framerate={fps}/1"
            " ! jpegenc ! rtpjpegpay name=pay0 pt=26 )"
        )
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port: int = sock.getsockname()[1]
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/cam"

    @staticmethod
    def missing() -> str | None:
        """Why an RTSP camera cannot run here, or None when it can."""
        probe = (
            "import gi; gi.require_version('GstRtspServer', '1.0'); gi.require_version('Gst', "
            "'1.0'); from gi.repository import Gst, GstRtspServer; Gst.init(None); "
            "missing = [e for e in ('videotestsrc', 'jpegenc', 'rtpjpegpay') "
            "if Gst.ElementFactory.find(e) is None]; assert not missing, missing"
        )
        try:
            subprocess.run(
                [SYSTEM_PYTHON, "-c", probe], check=True, capture_output=True, timeout=20
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return (
                f"{SYSTEM_PYTHON} cannot run GStreamer's RTSP server ({exc}): apt-get install "
                "python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good"
            )
        return None

    def start(self, timeout: float = 10.0) -> None:
        if self._proc is not None:
            return
        self._proc = subprocess.Popen(
            [SYSTEM_PYTHON, "-c", _RTSP_SERVER, str(self.port), self.launch],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not _listening(self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the RTSP server did not start on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        self._proc = None

    def __enter__(self) -> RtspCamera:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True
    return False
