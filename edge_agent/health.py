"""The agent's own health, reported as an ``agent.health`` event every interval.

The events go through the agent's normal ``emit`` path, so each gets a seq and is as durable as
any driver's reading. CPU and memory come from the standard library (no psutil on the device).
The clock offset comes from a :class:`~edge_agent.clock.ClockWatch` the reporter runs beside
its own loop, when ``[clock] reference`` is set; without one it is null.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from device_drivers.base import Driver, Emit
from edge_agent.clock import ClockWatch
from edge_agent.outbox import AsyncOutbox
from schemas.events import AgentHealth
from schemas.reading import Reading

_STATM: Final = Path("/proc/self/statm")
_MIB: Final = 1024 * 1024
#: A driver's last_error is cut to this many characters in a health event.
MAX_ERROR_CHARS: Final = 200


def rss_mb() -> float:
    """This process's resident memory in MiB (its working set on Windows)."""
    if sys.platform == "win32":
        return _win_working_set() / _MIB
    else:  # noqa: RET505 - the else keeps mypy --platform win32 from calling this unreachable
        import resource  # noqa: PLC0415 - POSIX only: kept off Windows' import path

        try:
            pages = int(_STATM.read_text().split()[1])
            return float(pages * os.sysconf("SC_PAGE_SIZE") / _MIB)
        except (OSError, ValueError, IndexError):
            # No /proc: the peak RSS is the best the standard library offers (KiB; bytes on
            # macOS).
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return float(peak / (_MIB if sys.platform == "darwin" else 1024))


if sys.platform == "win32":  # defined only there: ctypes.WinDLL exists only there

    def _win_working_set() -> int:
        """Bytes in this process's working set (psapi's PROCESS_MEMORY_COUNTERS); 0 if unknown."""
        import ctypes  # noqa: PLC0415 - only Windows needs it
        from ctypes import wintypes  # noqa: PLC0415

        class Counters(ctypes.Structure):
            _fields_ = [
                ("cb", wintypes.DWORD),
                ("PageFaultCount", wintypes.DWORD),
                ("PeakWorkingSetSize", ctypes.c_size_t),
                ("WorkingSetSize", ctypes.c_size_t),
                ("QuotaPeakPagedPoolUsage", ctypes.c_size_t),
                ("QuotaPagedPoolUsage", ctypes.c_size_t),
                ("QuotaPeakNonPagedPoolUsage", ctypes.c_size_t),
                ("QuotaNonPagedPoolUsage", ctypes.c_size_t),
                ("PagefileUsage", ctypes.c_size_t),
                ("PeakPagefileUsage", ctypes.c_size_t),
            ]

        try:
            kernel32 = ctypes.WinDLL("kernel32")
            kernel32.GetCurrentProcess.restype = wintypes.HANDLE
            query = kernel32.K32GetProcessMemoryInfo  # kernel32 has it since Windows 7
            query.argtypes = [wintypes.HANDLE, ctypes.c_void_p, wintypes.DWORD]
            query.restype = wintypes.BOOL
            counters = Counters()
            counters.cb = ctypes.sizeof(Counters)
            if not query(kernel32.GetCurrentProcess(), ctypes.byref(counters), counters.cb):
                return 0
        except (OSError, AttributeError):
            return 0
        return int(counters.WorkingSetSize)


def driver_summary(drivers: Sequence[Driver]) -> dict[str, str]:
    """``{name: "state"}`` or ``{name: "state: last_error"}`` for each driver."""
    out: dict[str, str] = {}
    for d in drivers:
        text = d.state.value
        if d.last_error:
            text += f": {d.last_error[:MAX_ERROR_CHARS]}"
        out[d.name] = text
    return out


class HealthReporter:
    """Emits ``agent.health`` every ``interval_s``; the first one interval after ``run`` starts."""

    def __init__(
        self,
        interval_s: float,
        emit: Emit,
        outbox: AsyncOutbox,
        drivers: Sequence[Driver] | Callable[[], Sequence[Driver]],
        clock: ClockWatch | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.interval_s = interval_s
        self._emit = emit
        self._outbox = outbox
        self._drivers = drivers
        self.clock = clock
        self._wall = time.monotonic()
        self._cpu = time.process_time()

    def _cpu_pct(self) -> float:
        """This process's CPU use since the previous call, in % of one core."""
        wall, cpu = time.monotonic(), time.process_time()
        elapsed, used = wall - self._wall, cpu - self._cpu
        self._wall, self._cpu = wall, cpu
        return max(0.0, 100.0 * used / elapsed) if elapsed > 0 else 0.0

    async def sample(self) -> AgentHealth:
        stats = await self._outbox.stats()
        return AgentHealth(
            cpu_pct=round(self._cpu_pct(), 2),
            rss_mb=round(rss_mb(), 2),
            outbox_depth=stats.depth,
            oldest_unsent_s=round(stats.oldest_age_s or 0.0, 3),
            # The last good measurement, however old: a clock drifts slowly, and a failing
            # reference is logged by the watch.
            clock_offset_s=None if self.clock is None else self.clock.offset_s,
            drivers=driver_summary(self._drivers() if callable(self._drivers) else self._drivers),
        )

    async def run(self) -> None:
        if self.clock is None:
            await self._report()
            return
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.clock.run(), name="clock")
            await self._report()

    async def _report(self) -> None:
        loop = asyncio.get_running_loop()
        self._wall, self._cpu = time.monotonic(), time.process_time()
        due = loop.time()
        while True:
            # Scheduled against a fixed timeline, so a slow outbox does not make reports drift.
            due = max(due + self.interval_s, loop.time())
            await asyncio.sleep(due - loop.time())
            await self._emit(Reading("agent.health", await self.sample()))
