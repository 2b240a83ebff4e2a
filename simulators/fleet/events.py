"""Event data per type for simulated devices, and the hook other simulators register kinds with.

A maker gets the device's running event number, the device id and a keyed UID hasher, and
returns the event's ``data`` struct. Identifiers are hashed here, as on a real device.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Callable
from typing import Final, Literal

import msgspec

from schemas.events import (
    AccessPass,
    AgentHealth,
    AttendanceCheckin,
    BoardApp,
    BoardInput,
    BoardPower,
    BoardTouch,
    CameraActivity,
    CameraHealth,
    CardTap,
    EnvReading,
    LibraryLoan,
    LibraryReturn,
    RecorderStatus,
    SignageNoticeShown,
)
from simulators.lending_desk import LendingDesk, Transaction

Hasher = Callable[[bytes], str]
Maker = Callable[[int, str, Hasher], msgspec.Struct]
_POWER: Final[tuple[Literal["on", "standby", "off"], ...]] = ("on", "standby", "off")
_INPUTS: Final = ("hdmi1", "hdmi2", "ops", "usb-c")


def keyed_hasher(key: bytes) -> Hasher:
    """HMAC-SHA256 of a UID with the district key: how a UID leaves a device."""
    return lambda uid: hmac.new(key, uid, hashlib.sha256).hexdigest()


def _uid(i: int, device: str) -> bytes:
    return hashlib.blake2s(f"{device}/{i % 400}".encode(), digest_size=4).digest()


MAKERS: Final[dict[str, Maker]] = {
    "card.tap": lambda i, d, h: CardTap(uid_hash=h(_uid(i, d)), tech="iso14443a", reader=d),
    "attendance.checkin": lambda i, d, h: AttendanceCheckin(
        uid_hash=h(_uid(i, d)), reader=d, period="p1", status="late" if i % 17 == 0 else "on_time"
    ),
    "signage.notice_shown": lambda i, _d, _h: SignageNoticeShown(notice_id=f"n{i % 9}"),
    "board.power": lambda i, _d, _h: BoardPower(state=_POWER[i % 3], previous=_POWER[(i - 1) % 3]),
    "board.app": lambda i, _d, _h: BoardApp(app=f"app-{i % 7}"),
    "board.input": lambda i, _d, _h: BoardInput(source=_INPUTS[i % 4]),
    "board.touch": lambda i, _d, _h: BoardTouch(touches=i % 50, window_s=60.0),
    "recorder.status": lambda i, d, _h: RecorderStatus(
        state="record", free_space_mb=float(100_000 - i % 1000), recorder=d
    ),
    "camera.activity": lambda i, d, _h: CameraActivity(
        camera=d, motion=(i % 100) / 100, people=i % 40
    ),
    "camera.health": lambda i, d, _h: CameraHealth(
        camera=d, fps=25.0, brightness=float(90 + i % 60), black_frame=False, frozen=False
    ),
    "env.reading": lambda i, d, _h: EnvReading(
        sensor=d,
        temperature_c=round(18 + (i % 100) / 10, 1),
        humidity_pct=float(40 + i % 30),
        co2_ppm=float(400 + (i * 7) % 1600),
    ),
    "access.pass": lambda i, d, h: AccessPass(
        uid_hash=h(_uid(i, d)), gate=d, direction="in" if i % 3 else "out", result="granted"
    ),
    "agent.health": lambda i, _d, _h: AgentHealth(
        cpu_pct=float(2 + i % 5), rss_mb=48.0, outbox_depth=0, oldest_unsent_s=0.0
    ),
    "library.loan": lambda i, d, h: _desk_event(i, d, h, "loan"),
    "library.return": lambda i, d, h: _desk_event(i, d, h, "return"),
}


@functools.cache
def _desk(device: str) -> dict[str, tuple[Transaction, ...]]:
    """This terminal's scripted morning (simulators/lending_desk.py), loans and returns apart."""
    seed = int.from_bytes(hashlib.blake2s(device.encode(), digest_size=4).digest(), "big")
    expected = LendingDesk(seed=seed).morning(400).expected
    return {k: tuple(t for t in expected if t.kind == k) for k in ("loan", "return")}


def _desk_event(
    i: int, device: str, h: Hasher, kind: Literal["loan", "return"]
) -> LibraryLoan | LibraryReturn:
    """The lending desk's next loan or return at this terminal, as the terminal reports it."""
    script = _desk(device)[kind]
    t = script[(i // 2) % len(script)]
    student = None if t.student is None else h(t.student.card)
    struct = LibraryLoan if kind == "loan" else LibraryReturn
    return struct(student_hash=student, item_id=t.item_id, source=t.source, terminal=device)


def register_maker(event_type: str, maker: Maker, *, replace: bool = False) -> None:
    """Let another simulator (the lending desk, say) supply data for an event type."""
    if event_type in MAKERS and not replace:
        raise ValueError(f"a maker for {event_type!r} is already registered (pass replace=True)")
    MAKERS[event_type] = maker
