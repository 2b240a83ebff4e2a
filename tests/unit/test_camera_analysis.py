"""The per-frame camera figures and their window summary, on synthetic numpy frames."""

from __future__ import annotations

import pytest

pytest.importorskip("cv2", reason="the camera extra (OpenCV) is not installed")

import msgspec
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from device_drivers.codecs.camera_analysis import (
    AnalysisSettings,
    WindowAnalyzer,
    WindowFigures,
    brightness,
    difference,
    is_black,
    motion,
)
from schemas.events import CameraActivity, CameraHealth

H, W = 120, 160


def flat(level: int) -> np.ndarray:
    return np.full((H, W), level, np.uint8)


def scene(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(60, 200, (H, W), dtype=np.uint8)


def test_brightness_is_the_mean_grey_level() -> None:
    assert brightness(flat(0)) == 0.0
    assert brightness(flat(255)) == 255.0
    half = flat(0)
    half[:, : W // 2] = 200
    assert brightness(half) == pytest.approx(100.0)


def test_black_tolerates_a_small_bright_overlay_but_not_a_picture() -> None:
    assert is_black(flat(0), 20)
    assert is_black(flat(20), 20)
    assert not is_black(flat(21), 20)
    osd = flat(0)
    osd[:3, :50] = 255  # an on-screen clock: under 1% of the pixels
    assert is_black(osd, 20)
    lamp = flat(0)
    lamp[:10, :50] = 255  # 2.6% of the pixels: something is visible
    assert not is_black(lamp, 20)
    assert not is_black(scene(), 20)


def test_difference_is_mean_absolute_grey_change() -> None:
    a = scene()
    assert difference(a, a) == 0.0
    assert difference(flat(10), flat(15)) == 5.0
    assert difference(flat(15), flat(10)) == 5.0


def test_motion_counts_changed_pixels_and_ignores_a_lighting_change() -> None:
    a = scene()
    assert motion(a, a, 25) == 0.0
    brighter = (a.astype(np.int16) + 40).clip(0, 255).astype(np.uint8)
    assert motion(a, brighter, 25) == pytest.approx(0.0, abs=0.01)
    moved = a.copy()
    moved[: H // 2, : W // 5] = 0  # a tenth of the picture changes a lot
    assert motion(a, moved, 25) == pytest.approx(0.1, abs=0.01)
    assert motion(flat(0), flat(255), 25) == 0.0  # uniform change = lighting, not motion


def feed(an: WindowAnalyzer, frames: list[np.ndarray], t0: float, step: float) -> float:
    t = t0
    for f in frames:
        an.frame()
        an.sample(f, t)
        t += step
    return t


def closed(an: WindowAnalyzer, t: float) -> WindowFigures:
    figures = an.close(t)
    assert figures is not None
    return figures


def test_black_frame_is_set_when_at_least_half_the_samples_are_black() -> None:
    an = WindowAnalyzer(AnalysisSettings(), start=0.0)
    feed(an, [flat(0), flat(0), scene(), scene(1)], 0.0, 0.5)
    half = closed(an, 2.0)
    feed(an, [flat(0), scene(), scene(1)], 2.0, 0.5)
    third = closed(an, 4.0)
    assert half.black_frame
    assert not third.black_frame


def test_frozen_needs_nearly_identical_samples_for_longer_than_frozen_s() -> None:
    an = WindowAnalyzer(AnalysisSettings(frozen_s=1.0, frozen_threshold=0.5), start=0.0)
    still = scene()
    jitter = still.copy()
    jitter[0, :20] ^= 1  # far below the threshold: still frozen
    feed(an, [still, jitter, still], 0.0, 0.5)  # run lasts 1.0 s: not longer than frozen_s
    first = closed(an, 1.5)
    feed(an, [still, still], 1.5, 0.5)  # 2.0 s
    second = closed(an, 2.5)
    feed(an, [scene(1), scene(2)], 2.5, 0.5)  # the picture moves again
    third = closed(an, 3.5)
    assert not first.frozen
    assert second.frozen
    assert not third.frozen


def test_black_frames_break_a_frozen_run_and_are_not_frozen() -> None:
    an = WindowAnalyzer(AnalysisSettings(frozen_s=1.0), start=0.0)
    still = scene()
    feed(an, [still, still, flat(0), still, still], 0.0, 0.5)
    figures = closed(an, 2.5)
    feed(an, [flat(0)] * 6, 2.5, 0.5)
    black = closed(an, 5.5)
    assert not figures.frozen
    assert black.black_frame
    assert not black.frozen


def test_motion_is_the_mean_over_consecutive_non_black_pairs() -> None:
    an = WindowAnalyzer(AnalysisSettings(), start=0.0)
    a = scene()
    b = a.copy()
    b[: H // 2, : W // 5] = 0  # 10% changed
    feed(an, [a, b, a, flat(0), a], 0.0, 0.5)  # pairs a-b, b-a; the black one is skipped
    figures = closed(an, 2.5)
    assert figures.motion == pytest.approx(0.1, abs=0.01)
    feed(an, [flat(0), flat(0)], 2.5, 0.5)
    none = closed(an, 3.5)
    assert none.motion == 0.0


def test_people_is_the_window_maximum_or_the_latest_count() -> None:
    an = WindowAnalyzer(AnalysisSettings(), start=0.0)
    feed(an, [scene()], 0.0, 0.5)
    an.people(1)
    an.people(3)
    an.people(2)
    first = closed(an, 1.0)
    feed(an, [scene()], 1.0, 0.5)  # the detector did not run: carry its latest count
    second = closed(an, 2.0)
    assert first.people == 3
    assert second.people == 2


def test_fps_counts_every_frame_and_an_empty_window_gives_nothing() -> None:
    an = WindowAnalyzer(AnalysisSettings(), start=10.0)
    for _ in range(25):
        an.frame()
    an.sample(scene(), 10.5)
    figures = closed(an, 11.0)
    assert (figures.frames, figures.samples, figures.fps) == (25, 1, pytest.approx(25.0))
    an.frame()
    assert an.close(12.0) is None  # frames but no sample: nothing to report


grey_frames = arrays(
    np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 12)), elements=st.integers(0, 255)
)


@settings(max_examples=200, deadline=None)
@given(st.lists(grey_frames, min_size=1, max_size=8), st.floats(0.01, 5.0))
def test_any_frames_give_figures_the_contract_accepts(
    frames: list[np.ndarray], step: float
) -> None:
    an = WindowAnalyzer(AnalysisSettings(frozen_s=0.05), start=0.0)
    end = feed(an, frames, 0.0, step)
    an.people(len(frames))
    f = closed(an, end)
    msgspec.convert(
        {"camera": "c", "fps": f.fps, "brightness": f.brightness, "black_frame": f.black_frame,
         "frozen": f.frozen},
        CameraHealth,
    )  # fmt: skip
    msgspec.convert({"camera": "c", "motion": f.motion, "people": f.people}, CameraActivity)
