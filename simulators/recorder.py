"""An Extron SMP-style recording unit answering SIS commands on a pty and a loopback TCP port.

The unit's side of SIS, written independently of the driver (ESC = 0x1B; replies end CR LF):

- ``ESC Y RCDR CR`` → ``0`` / ``1`` / ``2`` (stop / record / pause);
  ``ESC Y<n> RCDR CR`` → ``RcdrY<n>`` and the unit changes state (or the error code set by
  :meth:`SmpRecorder.refuse_recording`, e.g. ``E14`` when no storage is attached);
- ``I`` → ``ChA1*ChB3*<state>*<destination>*<free KB>*<elapsed>*<remaining>``;
- ``ESC <n>CV CR`` → ``Vrb<n>``; ``Q`` → firmware version; anything else → ``E10``.

Simple commands are optional digits and one letter, sent without a terminator; ESC commands
end with CR. A new TCP connection and every (re)plug of the pty start with the copyright banner
and date, as a unit does after power-up.

    with SmpRecorder(tmp_path / "ttySMP", free_mb=4096) as rec:
        rec.set_state("record"); rec.set_free_mb(4000)
        rec.corrupt(1); rec.mute(True)          # a malformed reply; no replies at all
        rec.unplug(); rec.replug()
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from simulators.panel import EndpointDevice, Respond

RecState = Literal["stop", "record", "pause"]
CODES: dict[RecState, str] = {"stop": "0", "record": "1", "pause": "2"}
BANNER = (
    b"(c) Copyright 2024, Extron Electronics SMP 351, V3.02, 60-1324-01\r\n"
    b"Tue, 05 Nov 2024 09:00:00\r\n"
)


class SmpRecorder(EndpointDevice):
    """The device end of an SMP-style recorder's SIS control port."""

    def __init__(
        self,
        link: str | Path,
        *,
        state: RecState = "stop",
        free_mb: float = 100_000.0,
        destination: str = "internal",
        tcp_port: int = 0,
    ) -> None:
        self.state: RecState = state
        self.free_kb = round(free_mb * 1024)
        self.destination = destination
        self.verbose = 0
        self.received: list[bytes] = []
        self._muted = False
        self._refusal: str | None = None
        super().__init__(link, tcp_port=tcp_port, greeting=lambda: BANNER, name="smp")

    def set_state(self, state: RecState) -> None:
        if state not in CODES:
            raise ValueError(f"state is stop, record or pause, not {state!r}")
        self.state = state

    def set_free_mb(self, free_mb: float) -> None:
        self.free_kb = round(free_mb * 1024)

    def refuse_recording(self, code: str | None = "E14") -> None:
        """Answer record commands with ``code`` (None: obey them again)."""
        self._refusal = code

    def mute(self, muted: bool = True) -> None:
        """Stop (or resume) answering, like a unit whose control port hangs."""
        self._muted = muted

    def _session(self) -> Respond:
        buf = bytearray()
        escaped = False

        def respond(data: bytes) -> bytes:
            nonlocal escaped
            out = bytearray()
            for byte in data:
                if byte == 0x1B:
                    buf.clear()
                    escaped = True
                elif escaped and byte in (0x0D, 0x0A):
                    out += self._answer(b"\x1b" + bytes(buf))
                    buf.clear()
                    escaped = False
                elif escaped:
                    buf.append(byte)
                elif byte in (0x0D, 0x0A):
                    buf.clear()
                elif chr(byte).isalpha():
                    out += self._answer(bytes(buf) + bytes([byte]))
                    buf.clear()
                else:
                    buf.append(byte)
                if len(buf) > 128:
                    buf.clear()
                    escaped = False
            return bytes(out)

        return respond

    def _answer(self, command: bytes) -> bytes:
        if self._muted:
            return b""
        self.received.append(command)
        reply = b"#Rc?\x01dr*?" if self._take_corrupt() else self._reply(command)
        return reply + b"\r\n"

    def _reply(self, command: bytes) -> bytes:
        text = command.decode("latin-1")
        if text.upper() == "\x1bYRCDR":
            return CODES[self.state].encode()
        if m := re.fullmatch(r"\x1bY([012])RCDR", text, re.IGNORECASE):
            if self._refusal is not None:
                return self._refusal.encode()
            self.state = next(s for s, c in CODES.items() if c == m[1])
            return f"RcdrY{m[1]}".encode()
        if m := re.fullmatch(r"\x1b([0-3])CV", text, re.IGNORECASE):
            self.verbose = int(m[1])
            return f"Vrb{m[1]}".encode()
        if text.upper() == "I":
            elapsed = "00:12:34" if self.state != "stop" else "00:00:00"
            remaining = "99:59:59" if self.state != "stop" else "00:00:00"
            return (
                f"ChA1*ChB3*{CODES[self.state]}*{self.destination}*{self.free_kb}"
                f"*{elapsed}*{remaining}"
            ).encode()
        if text.upper() == "Q":
            return b"3.02"
        return b"E10"
