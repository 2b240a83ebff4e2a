"""Device profiles: a TOML file describes a serial/TCP control protocol; this module runs it.

Sans-I/O: :func:`load_profile` reads and checks a profile, :class:`ProfileCodec` turns its
commands into bytes and a device's bytes into :class:`Observed` values (an event type, a data
field and the mapped value), :class:`Refused` and :class:`Rejected` items. Drivers do the I/O.
The format is documented in docs/profiles.md; shipped profiles are in ``profiles/*.toml``.

A bad profile raises :class:`ProfileError` naming the file, the line and the field. TOML syntax
errors carry their line from :mod:`tomllib`; schema errors name a path (``replies[1].event``)
whose line is found again in the text, since neither tomllib nor msgspec keeps positions.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta

from device_drivers.codecs.lines import LineSplitter, Overlong
from schemas.events import REGISTRY

SHIPPED_DIR: Final = Path(__file__).parent / "profiles"
MAX_FILE_BYTES: Final = 64 * 1024
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_VAR = re.compile(r"\{([a-z_][a-z0-9_]*)\}")
_HEX_TOKEN = re.compile(r"[0-9A-Fa-f]{2}")

Short = Annotated[str, Meta(max_length=256)]
Offset = Annotated[int, Meta(ge=-256, le=255)]


# --- the file's schema ---------------------------------------------------------------------------


class Info(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    name: Annotated[str, Meta(min_length=1, max_length=64)]
    description: Annotated[str, Meta(max_length=2000)] = ""
    #: Where the protocol comes from: a vendor document, or "own" for a format of ours.
    source: Annotated[str, Meta(max_length=2000)] = ""
    driver: Literal["panel", "recorder"] = "panel"


class TransportSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    baudrate: Annotated[int, Meta(gt=0, le=4_000_000)] = 9600
    #: The device's own TCP control port, if it has one (documentation; the port spec decides).
    tcp_port: Annotated[int, Meta(ge=1, le=65535)] | None = None


class TextFraming(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    #: Appended to every command.
    terminator: Short = "\r"
    #: Characters stripped from both ends of a reply line (prompts, spaces).
    strip: Short = " \t"
    lowercase: bool = False
    max_line: Annotated[int, Meta(ge=8, le=4096)] = 128


class Checksum(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    kind: Literal["sum8", "xor8", "crc16-modbus"]
    #: First byte covered (frame offset); the checksum covers up to the byte before itself.
    start: Annotated[int, Meta(ge=0, le=255)] = 0


class LengthByte(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    offset: Annotated[int, Meta(ge=0, le=255)]
    #: Frame size = the byte's value + adds.
    adds: Annotated[int, Meta(ge=0, le=255)] = 0


class BinaryFraming(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    start: Annotated[str, Meta(min_length=2, max_length=16)]
    end: Annotated[str, Meta(max_length=16)] = ""
    size: Annotated[int, Meta(ge=2, le=256)] | None = None
    length: LengthByte | None = None
    checksum: Checksum | None = None
    #: Offset of the device-address byte: frames carrying another address are rejected.
    address: Annotated[int, Meta(ge=0, le=255)] | None = None
    max_frame: Annotated[int, Meta(ge=2, le=256)] = 64


class Command(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    text: Short | None = None
    hex: Short | None = None


class Poll(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    command: Short
    #: The event type whose reply ends the wait for this query.
    expect: Short
    #: Ask only while the last value seen for these event types equals this.
    when: dict[str, str] = {}


class Polling(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    every_s: Annotated[float, Meta(gt=0, le=3600)] = 2.0
    timeout_s: Annotated[float, Meta(gt=0, le=60)] = 1.0


class Field(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    offset: Offset
    size: Annotated[int, Meta(ge=1, le=16)] = 1
    #: How the bytes become the value looked up in ``map``: "hex" ("0A"), "int", "ascii".
    format: Literal["hex", "int", "ascii"] = "hex"


class Reply(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    event: Short
    field: Short
    #: Text: a regex matched against the whole (stripped) line; group "value" or 1 is the value.
    regex: Short | None = None
    #: Binary: fixed bytes at frame offsets, {"3" = "72"}; the frame must carry all of them.
    match: dict[str, str] = {}
    value: Field | None = None
    map: dict[str, str] = {}
    #: For values not in ``map``: a template with {value}; without it they are rejected.
    other: Short | None = None


class Refusal(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    regex: Short | None = None
    match: dict[str, str] = {}
    value: Field | None = None
    map: dict[str, str] = {}
    detail: Short = "refused"


class ProfileFile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    profile: Info
    transport: TransportSpec = TransportSpec()
    text: TextFraming | None = None
    binary: BinaryFraming | None = None
    variables: dict[str, Annotated[int, Meta(ge=0, le=0xFFFF)]] = {}
    commands: Annotated[dict[str, Command], Meta(max_length=32)]
    polling: Polling = Polling()
    poll: Annotated[list[Poll], Meta(min_length=1, max_length=16)]
    replies: Annotated[list[Reply], Meta(min_length=1, max_length=64)]
    refusals: Annotated[list[Refusal], Meta(max_length=32)] = []
    #: Text: lines matching one of these are skipped silently (banners, other settings).
    ignore: Annotated[list[Short], Meta(max_length=32)] = []


# --- errors and their lines ---------------------------------------------------------------------


class ProfileError(ValueError):
    """A profile that cannot be used; the message names file, line and field."""

    def __init__(self, file: str, line: int | None, field: str, problem: str) -> None:
        self.file, self.line, self.field, self.problem = file, line, field, problem
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {field}: {problem}" if field else f"{where}: {problem}")


Path_ = tuple[str | int, ...]
_HEADER = re.compile(r"\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"""\s*("[^"]*"|'[^']*'|[A-Za-z0-9_-]+)\s*=""")


def key_lines(text: str) -> dict[Path_, int]:
    """Every table and key path in a TOML text → its 1-based line (the first one)."""
    found: dict[Path_, int] = {}
    arrays: dict[tuple[str, ...], int] = {}
    table: Path_ = ()
    for number, line in enumerate(text.splitlines(), 1):
        if m := _HEADER.match(line):
            names = tuple(n.strip().strip("\"'") for n in m[2].split("."))
            if m[1] == "[[":
                index = arrays.get(names, -1) + 1
                arrays[names] = index
                table = (*names, index)
            else:
                table = names
            found.setdefault(table, number)
        elif m := _KEY.match(line):
            found.setdefault((*table, m[1].strip("\"'")), number)
    return found


def line_of(text: str, path: Path_) -> int | None:
    """The line of ``path``, or of its nearest enclosing key or table."""
    lines = key_lines(text)
    for n in range(len(path), 0, -1):
        if path[:n] in lines:
            return lines[path[:n]]
    return None


def dotted(path: Path_) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


_MSGSPEC_PATH = re.compile(r" - at `\$(.*)`$")
_UNKNOWN = re.compile(r"unknown field `([^`]+)`")


def _msgspec_path(message: str) -> tuple[Path_, str]:
    path: list[str | int] = []
    problem = message
    if m := _MSGSPEC_PATH.search(message):
        problem = message[: m.start()]
        for part in re.findall(r"\.([^.\[]+)|\[(\d+)\]", m[1]):
            path.append(part[0] if part[0] else int(part[1]))
    if m := _UNKNOWN.search(problem):
        path.append(m[1])
    return tuple(path), problem


class _Bad(Exception):
    def __init__(self, path: Path_, problem: str) -> None:
        self.path, self.problem = path, problem


# --- loading -------------------------------------------------------------------------------------


def shipped() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.toml"))


def resolve(spec: str, base: Path | None = None) -> Path:
    """A profile spec → its file: a shipped name (``smart``) or a path to a local ``.toml``."""
    if _NAME.fullmatch(spec):
        path = SHIPPED_DIR / f"{spec}.toml"
        if not path.is_file():
            raise ProfileError(spec, None, "", f"no shipped profile of that name ({shipped()})")
        return path
    path = Path(spec).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    return path


def load_profile(spec: str, base: Path | None = None) -> Profile:
    """Read and check a profile (shipped name or path); :class:`ProfileError` says what is wrong."""
    path = resolve(spec, base)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ProfileError(str(path), None, "", f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ProfileError(str(path), None, "", f"larger than {MAX_FILE_BYTES} bytes")
    return parse_profile(raw, str(path))


def parse_profile(raw: bytes, file: str = "<profile>") -> Profile:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProfileError(file, None, "", f"not UTF-8 text (byte {exc.start})") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        problem = re.sub(r"\s*\(at line .*\)$", "", str(exc))
        raise ProfileError(file, int(m[1]) if m else None, "", f"TOML: {problem}") from None
    try:
        spec = msgspec.convert(doc, ProfileFile)
        return Profile(spec)
    except msgspec.ValidationError as exc:
        path, problem = _msgspec_path(str(exc))
        raise ProfileError(file, line_of(text, path), dotted(path), problem) from None
    except _Bad as exc:
        raise ProfileError(file, line_of(text, exc.path), dotted(exc.path), exc.problem) from None


# --- checked, compiled profile ------------------------------------------------------------------


def parse_hex(text: str, variables: Mapping[str, int], path: Path_) -> bytes:
    """``"A6 {id} 02"`` → bytes; variables are one byte each."""
    out = bytearray()
    for token in text.replace(",", " ").split():
        if m := _VAR.fullmatch(token):
            if m[1] not in variables:
                raise _Bad(path, f"unknown variable {{{m[1]}}} (have {sorted(variables)})")
            value = variables[m[1]]
            if not 0 <= value <= 0xFF:
                raise _Bad(path, f"variable {{{m[1]}}} = {value} does not fit one byte")
            out.append(value)
        elif _HEX_TOKEN.fullmatch(token.removeprefix("0x").removeprefix("0X")):
            out.append(int(token.removeprefix("0x").removeprefix("0X"), 16))
        else:
            raise _Bad(path, f"{token!r} is not a hex byte (write bytes as 'A6 01 0D')")
    return bytes(out)


def checksum(kind: str, data: bytes) -> bytes:
    if kind == "sum8":
        return bytes([sum(data) & 0xFF])
    if kind == "xor8":
        x = 0
        for b in data:
            x ^= b
        return bytes([x])
    crc = 0xFFFF  # CRC-16/MODBUS: poly 0xA001 reflected, init 0xFFFF, sent low byte first
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc.to_bytes(2, "little")


def checksum_size(kind: str) -> int:
    return 2 if kind == "crc16-modbus" else 1


@dataclass(frozen=True, slots=True)
class Observed:
    """A reply mapped to an event field: ``board.power`` ``state`` = ``"on"``."""

    event: str
    field: str
    value: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class Refused:
    detail: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: str
    raw: bytes


Item = Observed | Refused | Rejected


@dataclass(frozen=True, slots=True)
class _Rule:
    event: str
    field: str
    regex: re.Pattern[str] | None
    match: tuple[tuple[int, bytes], ...]
    value: Field | None
    map: Mapping[str, str]
    other: str | None


class Profile:
    """A checked profile; :meth:`codec` makes a parser for one connection."""

    def __init__(self, spec: ProfileFile, variables: Mapping[str, int] | None = None) -> None:
        self.spec = spec
        self.name = spec.profile.name
        self.variables = {**spec.variables, **(variables or {})}
        self.start = self.end = b""
        self.mode: Literal["text", "binary"] = self._mode()
        self.commands = {name: self._command(name, c) for name, c in spec.commands.items()}
        for i, p in enumerate(spec.poll):
            if p.command not in self.commands:
                raise _Bad(("poll", i, "command"), f"no command {p.command!r} in [commands]")
            self._check_event(("poll", i, "expect"), p.expect, None)
            for event in p.when:
                self._check_event(("poll", i, "when", event), event, None)
        self.replies = [self._reply(i, r) for i, r in enumerate(spec.replies)]
        self.refusals = [self._refusal(i, r) for i, r in enumerate(spec.refusals)]
        self.ignore = [
            self._regex(("ignore", i), r, groups=False) for i, r in enumerate(spec.ignore)
        ]

    def with_variables(self, variables: Mapping[str, int]) -> Profile:
        unknown = set(variables) - set(self.spec.variables)
        if unknown:
            raise ProfileError(self.name, None, "variables", f"not in the profile: {unknown}")
        try:
            return Profile(self.spec, variables)
        except _Bad as exc:
            raise ProfileError(self.name, None, dotted(exc.path), exc.problem) from None

    def codec(self) -> ProfileCodec:
        return ProfileCodec(self)

    def query(self, command: str) -> bytes:
        return self.commands[command]

    # -- checks ------------------------------------------------------------------------------

    def _mode(self) -> Literal["text", "binary"]:
        s = self.spec
        if (s.text is None) == (s.binary is None):
            raise _Bad(("profile",), "give exactly one of [text] or [binary]")
        if s.binary is None:
            return "text"
        b = s.binary
        self.start = parse_hex(b.start, self.spec.variables, ("binary", "start"))
        self.end = parse_hex(b.end, self.spec.variables, ("binary", "end"))
        if not self.start:
            raise _Bad(("binary", "start"), "the start bytes are empty")
        if b.size is None and b.length is None and not self.end:
            raise _Bad(("binary",), "frames need a fixed size, a length byte or end bytes")
        if b.size is not None and b.size > b.max_frame:
            raise _Bad(("binary", "size"), f"larger than max_frame ({b.max_frame})")
        return "binary"

    def _command(self, name: str, c: Command) -> bytes:
        path: Path_ = ("commands", name)
        if self.mode == "text":
            if c.text is None or c.hex is not None:
                raise _Bad(path, 'a text profile\'s command has text = "..." (and no hex)')
            assert self.spec.text is not None
            body = _VAR.sub(lambda m: self._var(path, m[1]), c.text)
            return (body + self.spec.text.terminator).encode("latin-1")
        if c.hex is None or c.text is not None:
            raise _Bad(path, 'a binary profile\'s command has hex = ".." (and no text)')
        frame = parse_hex(c.hex, self.variables, (*path, "hex"))
        if not frame.startswith(self.start):
            raise _Bad((*path, "hex"), f"does not begin with the start bytes {self.start.hex()}")
        b = self.spec.binary
        assert b is not None
        if b.checksum is not None:
            frame += checksum(b.checksum.kind, frame[b.checksum.start :])
        return frame + self.end

    def _var(self, path: Path_, name: str) -> str:
        if name not in self.variables:
            raise _Bad(path, f"unknown variable {{{name}}}")
        return str(self.variables[name])

    def _check_event(self, path: Path_, event: str, field: str | None) -> None:
        if event not in REGISTRY:
            raise _Bad(path, f"unknown event type {event!r}")
        if field is not None:
            fields = msgspec.structs.fields(REGISTRY[event].data)
            if field not in {f.name for f in fields}:
                names = sorted(f.name for f in fields)
                raise _Bad(path, f"{event} has no field {field!r} (fields: {names})")

    def _check_value(self, path: Path_, event: str, field: str, value: str) -> None:
        try:
            msgspec.convert({field: value}, REGISTRY[event].data)
        except msgspec.ValidationError as exc:
            if f"$.{field}`" in str(exc):
                raise _Bad(path, f"{value!r} is not a valid {event} {field}: {exc}") from None

    def _regex(self, path: Path_, text: str, *, groups: bool = True) -> re.Pattern[str]:
        try:
            pattern = re.compile(text)
        except re.error as exc:
            raise _Bad(path, f"bad regex: {exc}") from None
        if groups and not pattern.groups:
            raise _Bad(path, "the regex needs a group for the value: (?P<value>...)")
        return pattern

    def _matcher(
        self,
        path: Path_,
        regex: str | None,
        match: Mapping[str, str],
        value: Field | None,
        *,
        groups: bool = True,
    ) -> tuple[re.Pattern[str] | None, tuple[tuple[int, bytes], ...]]:
        if self.mode == "text":
            if regex is None or match or value is not None:
                raise _Bad(path, "a text profile matches replies with regex = '...'")
            return self._regex((*path, "regex"), regex, groups=groups), ()
        if regex is not None or not match:
            raise _Bad(path, 'a binary profile matches replies with match = { offset = "hex" }')
        fixed = []
        for offset, hexbytes in match.items():
            try:
                at = int(offset)
            except ValueError:
                raise _Bad((*path, "match", offset), "offsets are numbers") from None
            fixed.append((at, parse_hex(hexbytes, self.variables, (*path, "match", offset))))
        return None, tuple(fixed)

    def _reply(self, i: int, r: Reply) -> _Rule:
        path: Path_ = ("replies", i)
        self._check_event((*path, "event"), r.event, None)
        self._check_event((*path, "field"), r.event, r.field)
        regex, match = self._matcher(path, r.regex, r.match, r.value)
        if self.mode == "binary" and r.value is None:
            raise _Bad(path, "a binary reply needs value = { offset = N }")
        for key, mapped in r.map.items():
            self._check_value((*path, "map", key), r.event, r.field, mapped)
        return _Rule(r.event, r.field, regex, match, r.value, r.map, r.other)

    def _refusal(self, i: int, r: Refusal) -> _Rule:
        regex, match = self._matcher(("refusals", i), r.regex, r.match, None, groups=False)
        return _Rule("", "", regex, match, r.value, r.map, r.detail)


# --- the parser ----------------------------------------------------------------------------------


class ProfileCodec:
    """Sans-I/O: a device's bytes in, :data:`Item` values out, for one profile."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self._buf = bytearray()
        self._resyncing = False
        text = profile.spec.text
        self._lines = LineSplitter(text.max_line) if text is not None else None
        self.feed: Callable[[bytes], list[Item]] = (
            self._feed_text if text is not None else self._feed_binary
        )

    # -- text --------------------------------------------------------------------------------

    def _feed_text(self, data: bytes) -> list[Item]:
        assert self._lines is not None
        out: list[Item] = []
        for line in self._lines.feed(data):
            if isinstance(line, Overlong):
                out.append(Rejected("overlong", line.raw))
            elif (item := self._line(line)) is not None:
                out.append(item)
        return out

    def _line(self, raw: bytes) -> Item | None:
        spec = self.profile.spec.text
        assert spec is not None
        try:
            line = raw.decode("ascii").strip(spec.strip)
        except UnicodeDecodeError:
            return Rejected("garbage", raw)
        if not line:
            return None
        if spec.lowercase:
            line = line.lower()
        for rule in self.profile.replies:
            assert rule.regex is not None
            if m := rule.regex.fullmatch(line):
                value = m["value"] if "value" in rule.regex.groupindex else m[1]
                return self._observed(rule, value or "", raw)
        for rule in self.profile.refusals:
            assert rule.regex is not None
            if rule.regex.fullmatch(line):
                return Refused(line, raw)
        if any(p.fullmatch(line) for p in self.profile.ignore):
            return None
        return Rejected("garbage", raw)

    def _observed(self, rule: _Rule, value: str, raw: bytes) -> Item:
        mapped = rule.map.get(value)
        if mapped is None and rule.other is not None:
            mapped = rule.other.replace("{value}", value)
        if mapped is None:
            return Rejected("bad_value", raw)
        try:  # "other" templates and regex captures are checked against the event's schema
            msgspec.convert({rule.field: mapped}, REGISTRY[rule.event].data)
        except msgspec.ValidationError as exc:
            if f"$.{rule.field}`" in str(exc):
                return Rejected("bad_value", raw)
        return Observed(rule.event, rule.field, mapped, raw)

    # -- binary ------------------------------------------------------------------------------

    def _frame_size(self) -> int | Rejected | None:
        """The size of the frame at the buffer's start; None: more bytes needed."""
        b = self.profile.spec.binary
        assert b is not None
        buf = self._buf
        if b.size is not None:
            return b.size
        if b.length is not None:
            if len(buf) <= b.length.offset:
                return None
            size = buf[b.length.offset] + b.length.adds
            if not b.length.offset < size <= b.max_frame:
                return Rejected("bad_length", bytes(buf[: b.length.offset + 1]))
            return size
        end = self.profile.end
        at = buf.find(end, len(self.profile.start))
        if at < 0:
            return Rejected("overlong", bytes(buf)) if len(buf) > b.max_frame else None
        return at + len(end)

    def _feed_binary(self, data: bytes) -> list[Item]:
        self._buf += data
        out: list[Item] = []
        buf, start = self._buf, self.profile.start
        while buf:
            at = buf.find(start)
            if at != 0:
                keep = len(start) - 1 if at < 0 else 0  # a start split across reads
                cut = len(buf) - keep if at < 0 else at
                if cut > 0:
                    junk = bytes(buf[:cut])
                    del buf[:cut]
                    if not self._resyncing:
                        out.append(Rejected("junk", junk))
                    self._resyncing = True
                if at < 0:
                    break
            size = self._frame_size()
            if size is None:
                break
            if isinstance(size, Rejected):
                out.append(self._reject(size))
                continue
            if len(buf) < size:
                break
            frame = bytes(buf[:size])
            if problem := self._check(frame):
                out.append(self._reject(Rejected(problem, frame)))
                continue
            del buf[:size]
            self._resyncing = False
            out.append(self._decode(frame))
        return out

    def _reject(self, item: Rejected) -> Rejected:
        del self._buf[:1]  # resync on the next start byte
        self._resyncing = True
        return item

    def _check(self, frame: bytes) -> str | None:
        b = self.profile.spec.binary
        assert b is not None
        end = self.profile.end
        if end and not frame.endswith(end):
            return "bad_end"
        if b.checksum is not None:
            n = checksum_size(b.checksum.kind)
            at = len(frame) - len(end) - n
            if (
                at < b.checksum.start
                or checksum(b.checksum.kind, frame[b.checksum.start : at]) != (frame[at : at + n])
            ):
                return "bad_checksum"
        return None

    def _decode(self, frame: bytes) -> Item:
        b = self.profile.spec.binary
        assert b is not None
        own = self.profile.variables.get("id")
        at = b.address
        if at is not None and own is not None and at < len(frame) and frame[at] != own:
            return Rejected("wrong_id", frame)
        for rule in self.profile.replies:
            if _matches(frame, rule.match):
                assert rule.value is not None
                value = _field(frame, rule.value)
                return (
                    Rejected("bad_value", frame)
                    if value is None
                    else (self._observed(rule, value, frame))
                )
        for rule in self.profile.refusals:
            if _matches(frame, rule.match):
                why = _field(frame, rule.value) if rule.value is not None else None
                detail = rule.map.get(why or "", rule.other or "refused")
                if why is not None and why not in rule.map:
                    detail = f"{detail} ({why})"
                return Refused(detail, frame)
        return Rejected("bad_value", frame)


def _matches(frame: bytes, fixed: tuple[tuple[int, bytes], ...]) -> bool:
    for offset, want in fixed:
        at = offset if offset >= 0 else len(frame) + offset
        if at < 0 or frame[at : at + len(want)] != want:
            return False
    return True


def _field(frame: bytes, f: Field) -> str | None:
    at = f.offset if f.offset >= 0 else len(frame) + f.offset
    raw = frame[at : at + f.size]
    if at < 0 or len(raw) != f.size:
        return None
    if f.format == "hex":
        return raw.hex().upper()
    if f.format == "int":
        return str(int.from_bytes(raw, "big"))
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        return None
