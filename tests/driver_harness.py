"""Running a driver's ``run(emit)`` in an integration test: collect, wait with deadlines, stop."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

import pytest

from device_drivers.base import Driver, DriverContext, DriverState, UidHasher
from schemas.events import CardTap
from schemas.reading import Reading

KEY = b"district-test-key-0123456789abcdef"
HASHER = UidHasher(KEY)

T = TypeVar("T")


def make_ctx(device_id: str, *, send_raw: bool = False) -> DriverContext:
    """A context hashing with the test key."""
    return DriverContext(device_id, UidHasher(KEY, send_raw=send_raw))


def ctx_fixture(device_id: str) -> Any:
    """A ``ctx`` fixture for a module: ``ctx = ctx_fixture("cr-0101")``."""

    @pytest.fixture(name="ctx")
    def ctx() -> DriverContext:
        return make_ctx(device_id)

    return ctx


def fast_backoff(*classes: type, **extra: float) -> Any:
    """An autouse fixture reconnecting within tenths of a second, so unplug tests stay short.

    ``extra`` sets further class attributes on the first class (e.g. ``PRESENCE_CHECK_S``).
    """

    @pytest.fixture(autouse=True, name="fast_backoff")
    def fast(monkeypatch: pytest.MonkeyPatch) -> None:
        for cls in classes:
            monkeypatch.setattr(cls, "BACKOFF_MIN_S", 0.05)
            monkeypatch.setattr(cls, "BACKOFF_MAX_S", 0.2)
        for attr, value in extra.items():
            monkeypatch.setattr(classes[0], attr, value)

    return fast


async def until(pred: Callable[[], object], what: str, within: float = 5.0) -> None:
    """Poll ``pred`` until it is true; TimeoutError naming ``what`` after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not pred():
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


class RunningDriver:
    """``driver.run(self)`` as a task for the ``async with`` block, collecting its readings.

    On entry it waits for ``ready`` (a state, or any predicate); on a clean exit it checks the
    driver is STOPPED (unless ``check_stopped`` is false) and that no thread was left behind
    whose name starts with ``threads`` (a str) or for whose name ``threads(name)`` is true.
    """

    def __init__(
        self,
        driver: Driver,
        *,
        ready: DriverState | Callable[[], object] | None = None,
        what: str = "the driver to come up",
        threads: str | Callable[[str], bool] | None = None,
        check_stopped: bool = True,
        within: float = 5.0,
    ) -> None:
        self.driver = driver
        self.readings: list[Reading] = []
        self._ready = ready
        self._what = what
        if isinstance(threads, str):
            prefix = threads
            threads = lambda name: name.startswith(prefix)  # noqa: E731
        self._threads = threads
        self._check_stopped = check_stopped
        self._within = within
        self._task: asyncio.Task[None] | None = None

    async def __call__(self, reading: Reading) -> None:
        self.readings.append(reading)

    @property
    def data(self) -> list[Any]:
        return [r.data for r in self.readings]

    @property
    def events(self) -> list[tuple[str, Any]]:
        return [(r.type, r.data) for r in self.readings]

    @property
    def taps(self) -> list[CardTap]:
        return self.of_type(CardTap)

    def of(self, kind: str) -> list[Any]:
        """The data of the readings whose type is ``kind`` (e.g. ``"card.tap"``)."""
        return [r.data for r in self.readings if r.type == kind]

    def of_type(self, cls: type[T]) -> list[T]:
        return [r.data for r in self.readings if isinstance(r.data, cls)]

    async def until_state(self, state: DriverState, what: str | None = None) -> None:
        await until(lambda: self.driver.state == state, what or state.name, self._within)

    async def until_count(self, n: int, cls: type | None = None, what: str = "") -> None:
        """Wait until exactly ``n`` readings (of data class ``cls``, if given) were emitted."""
        count = (lambda: len(self.of_type(cls))) if cls else (lambda: len(self.readings))
        await until(lambda: count() == n, what or f"{n} reading(s)", self._within)

    async def __aenter__(self) -> RunningDriver:
        self._task = asyncio.create_task(self.driver.run(self), name=f"driver-{self.driver.name}")
        if self._ready is not None:
            ready = self._ready
            pred = (lambda: self.driver.state == ready) if isinstance(ready, DriverState) else ready
            try:
                await until(pred, self._what, self._within)
            except BaseException:
                await self._stop()
                raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stop()
        if exc_type is not None:
            return
        if self._check_stopped:
            assert self.driver.state == DriverState.STOPPED
        if self._threads is not None:
            left = self._threads
            assert not [t for t in threading.enumerate() if left(t.name)]

    async def _stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
