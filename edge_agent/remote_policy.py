"""What a remote ``config`` document may set in the driver tables, and what only the local file may.

Whoever can publish a device's retained ``config`` (the ingest server, or anyone holding its
broker credentials) must not be able to make the agent open files, URLs or network addresses
of their choosing. So every option of every built-in driver type is classified in
:data:`POLICY`:

- plain values (numbers, flags, names, timetables): the driver validates them;
- a serial port: only a device node (``/dev/tty…``, ``/dev/serial/by-id/…``,
  ``/dev/serial/by-path/…``, ``/dev/rfcomm…``; ``COMn`` or ``\\\\.\\COMn`` on Windows) or
  ``usb:VID:PID[:SERIAL]``, never a pyserial URL handler (``spy://``, ``socket://``,
  ``loop://``, ``rfc2217://``, ``hwgrep://``), ``tcp://`` or any other path;
- a camera source, a Modbus TCP host, a signage screen address: only a value on the local
  config's ``[remote]`` allow-list or one the local config itself uses for that kind;
- local only (file paths, regular expressions): never changed remotely.

An option that is not classified, and every option of a driver type without a policy, may be
sent only with the value the local config gives it (same driver name, same place); a table
identical to the local one always passes. The local config file itself may use any form.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, TypeAlias

from device_drivers.codecs import profile
from device_drivers.plumbing.transport import UsbId

#: Sections of the agent's config file that only the local file sets: a remote ``config``
#: document naming one is refused whole (``ManagedConfig`` has no field for them). ``update``
#: holds the release public key: whoever could set it remotely could sign their own agent.
LOCAL_ONLY_SECTIONS: Final = frozenset({"device", "mqtt", "privacy", "clock", "remote", "update"})


class RemoteRefused(ValueError):
    """A remote document sets something only the local config may; the message names the key."""


class Field(StrEnum):
    PLAIN = "plain"
    SERIAL_PORT = "serial port"
    #: Modbus ``port``: a TCP port number with ``host``, a serial port without.
    MODBUS_PORT = "modbus port"
    CAMERA_SOURCE = "camera source"
    MODBUS_HOST = "modbus host"
    SCREEN = "screen"
    LOCAL_ONLY = "local only"
    #: A device profile: remotely only the name of one shipped with the agent, never a file.
    PROFILE = "profile"
    #: A list of inner card-reader driver tables (gate, signage, library terminal).
    CARDS = "cards"


Spec: TypeAlias = Mapping[str, "Field | Spec"]

_P: Final = Field.PLAIN
_ENDPOINT: Final[Spec] = {
    "host": Field.MODBUS_HOST,
    "port": Field.MODBUS_PORT,
    **dict.fromkeys(
        ("unit", "baudrate", "parity", "bytesize", "stopbits", "timeout_s", "retries"), _P
    ),
}

#: Every option of every built-in driver type, classified (see the module docstring).
POLICY: Final[Mapping[str, Spec]] = {
    "synthetic": dict.fromkeys(("event_type", "rate", "count"), _P),
    "em4100": {"port": Field.SERIAL_PORT, **dict.fromkeys(("baudrate", "reader", "hold_ms"), _P)},
    "wiegand": {
        "port": Field.SERIAL_PORT,
        **dict.fromkeys(("baudrate", "debounce_s", "format", "bits"), _P),
    },
    "panel": {
        "port": Field.SERIAL_PORT,
        "profile": Field.PROFILE,
        **dict.fromkeys(("baudrate", "poll_s", "timeout_s", "machine_id"), _P),
    },
    "recorder": {
        "port": Field.SERIAL_PORT,
        **dict.fromkeys(("baudrate", "poll_s", "timeout_s", "report_s"), _P),
    },
    # the file (or FIFO) the board's OS writes its activity to
    "board_os": {"path": Field.LOCAL_ONLY, "from_start": _P},
    "camera": {
        "source": Field.CAMERA_SOURCE,
        **dict.fromkeys(
            (
                "camera",
                "sample_fps",
                "report_s",
                "people",
                "people_every_s",
                "people_min_score",
                "black_threshold",
                "frozen_threshold",
                "frozen_s",
                "motion_delta",
                "loop",
                "open_timeout_s",
                "read_timeout_s",
            ),
            _P,
        ),
    },
    "modbus_env": {**_ENDPOINT, "poll_s": _P, "registers": _P},
    # an ONVIF camera: where it is and its account only from the local file (a remote document
    # could otherwise point the agent, with the camera's password, at an address of its own)
    "onvif": {
        **dict.fromkeys(("host", "port", "username", "password"), Field.LOCAL_ONLY),
        **dict.fromkeys(
            (
                "camera",
                "report_s",
                "pull_timeout_s",
                "message_limit",
                "subscription_s",
                "timeout_s",
                "retry_max_s",
            ),
            _P,
        ),
    },
    "gate": {
        "cards": Field.CARDS,
        "thermometer": {
            **_ENDPOINT,
            **dict.fromkeys(("address", "table", "type", "word_order", "scale"), _P),
        },
        **dict.fromkeys(("fever_c", "on_missing_temperature"), _P),
    },
    "pcsc": dict.fromkeys(("reader", "reader_name", "poll_ms"), _P),
    "signage": {
        "cards": Field.CARDS,
        "screen": Field.SCREEN,
        **dict.fromkeys(
            ("class_id", "timezone", "grace_min", "early_min", "periods", "ack_timeout_s"), _P
        ),
    },
    "library_terminal": {
        "cards": Field.CARDS,
        "scanner": {
            "port": Field.SERIAL_PORT,
            # a regular expression run on every scan: a hostile one could backtrack for ages
            "item_pattern": Field.LOCAL_ONLY,
            **dict.fromkeys(("baudrate", "suffix"), _P),
        },
        "pad": dict.fromkeys(("reader", "poll_ms", "block_size", "blocks", "blocks_per_read"), _P),
        **dict.fromkeys(("terminal", "session_s", "max_items"), _P),
    },
}
#: Keys of an inner card table besides its driver's options.
_CARD_KEYS: Final = {"type": _P, "name": _P, "direction": _P}
#: Cards inside cards inside ... at most this deep.
MAX_DEPTH: Final = 3
_SERIAL_NODE: Final = re.compile(
    r"/dev/(tty[A-Za-z0-9_.-]*|serial/by-(id|path)/[^/]+|rfcomm[0-9]+)"
)
#: A Windows COM port: ``COM3``, or the device-namespace form ``\\.\COM10`` (pyserial adds
#: that prefix itself above COM8, so both forms name the same port).
_COM_PORT: Final = re.compile(r"(\\\\\.\\)?COM[1-9][0-9]{0,2}", re.IGNORECASE)
_MISSING: Final = object()


@dataclass(frozen=True, slots=True)
class RemoteAllowList:
    """The local config's ``[remote]`` section: what remote documents may point drivers at."""

    camera_sources: frozenset[str] = frozenset()
    modbus_hosts: frozenset[str] = frozenset()
    screens: frozenset[str] = frozenset()


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def serial_port_problem(port: str, *, windows: bool = sys.platform == "win32") -> str | None:
    """Why ``port`` may not be set remotely, or None when it is a device node or a USB id."""
    if port.startswith("usb:"):
        try:
            UsbId.parse(port)
        except ValueError as exc:
            return str(exc)
        return None
    if windows and _COM_PORT.fullmatch(port):
        return None
    if "://" in port:
        return (
            "a URL: serial ports set remotely are device nodes or usb:VID:PID[:SERIAL]; "
            "pyserial URL handlers (spy://, socket://, loop://, rfc2217://, hwgrep://) and "
            "tcp:// only in the local config file"
        )
    if _COM_PORT.fullmatch(port):
        return "COM ports exist only on Windows"
    if windows:  # no /dev there: a /dev/… path would be a file on the system drive
        return "not a serial port: a remote config may name COM1…COM999 or usb:VID:PID[:SERIAL]"
    if not _SERIAL_NODE.fullmatch(port) or "/../" in port or port.endswith("/.."):
        return (
            "not a serial device node: a remote config may name /dev/tty…, /dev/serial/by-id/…, "
            "/dev/serial/by-path/…, /dev/rfcomm… or usb:VID:PID[:SERIAL]"
        )
    return None


def _norm(kind: Field, value: object) -> str:
    text = str(value)
    return text.lower() if kind is Field.MODBUS_HOST else text


def _collect(
    spec: Spec | None, table: Mapping[str, Any], out: dict[Field, set[str]], depth: int = 0
) -> None:
    if spec is None or depth > MAX_DEPTH:
        return
    for key, value in table.items():
        kind = spec.get(key)
        if isinstance(kind, Mapping):
            if isinstance(value, Mapping):
                _collect(kind, value, out, depth)
        elif kind is Field.CARDS:
            for entry in value if isinstance(value, list) else ():
                if isinstance(entry, Mapping):
                    _collect(POLICY.get(str(entry.get("type"))), entry, out, depth + 1)
        elif kind is not None and kind is not Field.PLAIN and value is not None:
            out.setdefault(kind, set()).add(_norm(kind, value))


def check_drivers(
    tables: Sequence[Mapping[str, Any]],
    local: Sequence[Mapping[str, Any]],
    allow: RemoteAllowList,
) -> None:
    """Raise :class:`RemoteRefused` when a remote ``drivers`` list sets what it may not.

    ``local`` are the local config file's driver tables; the message starts with the key,
    e.g. ``drivers[1] (rec).port: ...``.
    """
    found: dict[Field, set[str]] = {}
    for table in local:
        _collect(POLICY.get(str(table.get("type"))), table, found)
    walk = _Walk(allow, {k: frozenset(v) for k, v in found.items()})
    local_by_name = {str(t.get("name", t.get("type"))): t for t in local}
    for i, table in enumerate(tables):
        name = table.get("name", table.get("type"))
        mine = local_by_name.get(str(name))
        if mine == table:
            continue  # exactly what the technician wrote
        if mine is not None and mine.get("type") != table.get("type"):
            mine = None
        walk.table(f"drivers[{i}] ({name})", table, mine, depth=0)


@dataclass(frozen=True, slots=True)
class _Walk:
    allow: RemoteAllowList
    #: Values of each sensitive kind the local config itself uses (always allowed).
    known: Mapping[Field, frozenset[str]]

    def table(
        self, where: str, table: Mapping[str, Any], mine: Mapping[str, Any] | None, *, depth: int
    ) -> None:
        kind = table.get("type")
        spec = POLICY.get(kind) if isinstance(kind, str) else None
        for key, value in table.items():
            if key in ("type", "name") or (depth > 0 and key in _CARD_KEYS):
                continue
            theirs = _MISSING if mine is None else mine.get(key, _MISSING)
            if value != theirs:  # the local config's own value, in the same place, passes
                field = spec.get(key) if spec is not None else None
                self.value(f"{where}.{key}", value, theirs, field, kind=kind, depth=depth)

    def value(
        self, where: str, value: Any, theirs: Any, field: Field | Spec | None, *, kind: object,
        depth: int,
    ) -> None:  # fmt: skip
        def refuse(why: str) -> RemoteRefused:
            return RemoteRefused(f"{where}: {_show(value)} may not be set remotely: {why}")

        if field is None:
            if not isinstance(kind, str) or kind not in POLICY:
                raise refuse(
                    f"driver type {kind!r} has no remote-config policy, so its options may only "
                    "repeat the local config file's values"
                )
            raise refuse(f"not an option a remote config may change for a {kind} driver")
        if isinstance(field, Mapping):
            if isinstance(value, Mapping):  # else the driver refuses it with its own message
                mine = theirs if isinstance(theirs, Mapping) else {}
                for key, inner in value.items():
                    there = mine.get(key, _MISSING)
                    if inner != there:
                        self.value(
                            f"{where}.{key}", inner, there, field.get(key), kind=kind, depth=depth
                        )
            return
        if field is Field.PLAIN or value is None:
            return
        if field is Field.LOCAL_ONLY:
            raise refuse("only the local config file may set it (a file path or a pattern)")
        if field is Field.CARDS:
            self.cards(where, value, theirs, depth=depth)
            return
        if field is Field.PROFILE:
            if str(value) not in (names := profile.shipped()):
                raise refuse(
                    f"a remote config may name only a shipped profile ({', '.join(names)});"
                    " a profile file is set in the local config file"
                )
            return
        if _norm(field, value) in self.known.get(field, frozenset()):
            return  # the local config uses it for this kind of option
        if field is Field.SERIAL_PORT or (field is Field.MODBUS_PORT and isinstance(value, str)):
            if (why := serial_port_problem(str(value))) is not None:
                raise refuse(why)
        elif field is Field.CAMERA_SOURCE and str(value) not in self.allow.camera_sources:
            raise refuse(
                "not in [remote] camera_sources of the local config (nor a source it uses itself)"
            )
        elif field is Field.MODBUS_HOST and str(value).lower() not in self.allow.modbus_hosts:
            raise refuse("not in [remote] modbus_hosts of the local config (nor a host it uses)")
        elif field is Field.SCREEN and str(value) not in self.allow.screens:
            raise refuse("not in [remote] screens of the local config (nor a screen it uses)")

    def cards(self, where: str, value: Any, theirs: Any, *, depth: int) -> None:
        if not isinstance(value, list):
            return  # the driver refuses it with its own message
        if depth + 1 > MAX_DEPTH:
            raise RemoteRefused(f"{where}: card readers nested more than {MAX_DEPTH} deep")
        mine = theirs if isinstance(theirs, list) else []
        for j, entry in enumerate(value):
            if not isinstance(entry, Mapping):
                continue
            local = mine[j] if j < len(mine) and isinstance(mine[j], Mapping) else None
            if local is not None and local.get("type") != entry.get("type"):
                local = None
            if entry != local:
                self.table(f"{where}[{j}]", entry, local, depth=depth + 1)
