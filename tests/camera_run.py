"""A camera driver run on a file or stream, collecting what it reports (the camera tests import it
after their own check that OpenCV is installed)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from device_drivers import camera
from device_drivers.base import DriverContext, DriverState, Reading, UidHasher
from schemas.events import CameraActivity, CameraHealth


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
