"""Per-frame picture figures and their summary per report window: numpy only, no I/O.

Frames arrive here already grey (uint8) and downscaled (the driver does that with OpenCV).
Definitions, as the ``camera.health`` / ``camera.activity`` events carry them:

- **brightness**: the mean grey level (0-255) over the window's sampled frames.
- **black frame**: a sampled frame in which at most :data:`BLACK_BRIGHT_SHARE` of the pixels
  are brighter than ``black_threshold`` (so an on-screen clock does not hide a covered lens).
  A window's ``black_frame`` is true when at least half of its sampled frames are black.
- **frozen**: sampled frames keep differing from the first of their run by less than
  ``frozen_threshold`` (mean absolute grey difference) for longer than ``frozen_s``. A
  window's ``frozen`` is true if that held at any sample in it. Black frames break a run:
  black is reported as black, not also as frozen.
- **motion**: the share of pixels (0..1) whose grey level changed by more than
  ``motion_delta`` between consecutive sampled frames, after removing the change in mean
  level (lights, auto exposure). A window's ``motion`` is the mean over its pairs of
  consecutive non-black samples (0 when there is none).
- **people**: the highest count the people detector gave in the window; when it did not run
  in the window, its latest earlier count (0 before the first).
- **fps**: frames read from the source in the window / the window's length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

Grey = NDArray[np.uint8]

#: A black frame may still have this share of brighter pixels (an OSD clock, a status LED).
BLACK_BRIGHT_SHARE: Final = 0.02


@dataclass(frozen=True, slots=True)
class AnalysisSettings:
    black_threshold: int = 20
    frozen_threshold: float = 0.5
    frozen_s: float = 20.0
    motion_delta: int = 25


@dataclass(frozen=True, slots=True)
class WindowFigures:
    """What one report window amounts to."""

    seconds: float
    frames: int
    samples: int
    fps: float
    brightness: float
    black_frame: bool
    frozen: bool
    motion: float
    people: int


def brightness(grey: Grey) -> float:
    return float(grey.mean())


def is_black(grey: Grey, threshold: int) -> bool:
    bright = int(np.count_nonzero(grey > threshold))
    return bright <= BLACK_BRIGHT_SHARE * grey.size


def difference(a: Grey, b: Grey) -> float:
    """Mean absolute grey-level difference of two same-sized frames."""
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def motion(prev: Grey, cur: Grey, delta: int) -> float:
    """Share of pixels that changed by more than ``delta``, net of the change in mean level."""
    diff = cur.astype(np.int16) - prev.astype(np.int16)
    diff -= np.int16(round(float(diff.mean())))
    return int(np.count_nonzero(np.abs(diff) > delta)) / diff.size


class WindowAnalyzer:
    """Accumulates frames and samples into report windows; keeps frozen/motion state across them.

    Times are monotonic seconds supplied by the caller, so tests can drive it with fake clocks.
    """

    def __init__(self, settings: AnalysisSettings, start: float) -> None:
        self.settings = settings
        self._start = start
        self._prev: Grey | None = None
        self._ref: Grey | None = None
        self._ref_t = start
        self._people_latest = 0
        self._reset()

    def _reset(self) -> None:
        self._frames = 0
        self._samples = 0
        self._black = 0
        self._bright_sum = 0.0
        self._motion: list[float] = []
        self._frozen = False
        self._people_max: int | None = None

    def frame(self) -> None:
        """A frame was read from the source (sampled or not)."""
        self._frames += 1

    def sample(self, grey: Grey, t: float) -> None:
        """Analyse one sampled frame taken at ``t``."""
        s = self.settings
        self._samples += 1
        self._bright_sum += brightness(grey)
        if is_black(grey, s.black_threshold):
            self._black += 1
            self._prev = self._ref = None
            return
        if self._prev is not None and self._prev.shape == grey.shape:
            self._motion.append(motion(self._prev, grey, s.motion_delta))
        self._prev = grey
        if (
            self._ref is None
            or self._ref.shape != grey.shape
            or difference(self._ref, grey) >= s.frozen_threshold
        ):
            self._ref, self._ref_t = grey, t
        elif t - self._ref_t > s.frozen_s:
            self._frozen = True

    def people(self, count: int) -> None:
        """The people detector counted ``count`` in the latest sample."""
        self._people_latest = count
        self._people_max = count if self._people_max is None else max(self._people_max, count)

    def close(self, t: float) -> WindowFigures | None:
        """End the window at ``t`` and start the next; None when it had no sampled frame."""
        seconds = max(t - self._start, 1e-6)
        figures = None
        if self._samples:
            figures = WindowFigures(
                seconds=seconds,
                frames=self._frames,
                samples=self._samples,
                fps=self._frames / seconds,
                brightness=min(255.0, self._bright_sum / self._samples),
                black_frame=2 * self._black >= self._samples,
                frozen=self._frozen,
                motion=min(1.0, sum(self._motion) / len(self._motion)) if self._motion else 0.0,
                people=self._people_latest if self._people_max is None else self._people_max,
            )
        self._start = t
        self._reset()
        return figures
