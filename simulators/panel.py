"""Smart-board panels serving their control protocol on a pty and a loopback TCP port at once.

Written from the protocol descriptions, independently of the driver:

- :class:`SmartPanel` — SMART-style ASCII: ``get powerstate`` / ``get input`` / ``set …`` lines
  ended by CR (case and extra spaces ignored); replies ``powerstate=on`` (``ready`` when the
  screen is off), ``input=HDMI1``, or ``invalid cmd=<command>``, each followed by CR LF and a ``>``
  prompt. Only the power state is answered while the screen is off.
- :class:`MaxhubPanel` — MAXHUB-style frames ``A6 ID LEN OP CMD DATA SUM 0D`` (LEN counts
  OP+CMD+DATA, SUM is the byte sum of ID..DATA); ``G``et / ``S``et of ``P``ower (00 off, 01 on,
  02 standby) and ``I``nput (00 android, 01..03 hdmi1..3, 04 ops, 05 usbc, 06 vga, 07 dp);
  replies ``r`` with one data byte, refusals ``n`` with a reason (01 unknown command, 02 not in
  this power state, 03 bad checksum).

In ``standby`` both read and discard everything, silent like a real panel in low power.

    with SmartPanel(tmp_path / "ttyPANEL") as panel:
        panel.port                  # the pty's stable symlink
        panel.url                   # "tcp://127.0.0.1:PORT"
        panel.set_power("standby"); panel.set_input("hdmi2")
        panel.corrupt(2)            # the next two replies are malformed
        panel.unplug(); panel.replug()   # back under a new /dev/pts name
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Self

from simulators.pty import close_fds, open_pty, point_link

Respond = Callable[[bytes], bytes]
PowerState = Literal["on", "off", "standby"]


class DeviceEndpoint:
    """One simulated device reachable on a pty (stable symlink) and a 127.0.0.1 TCP port.

    Every stream (the pty, each TCP client) gets its own ``session()`` responder: bytes in,
    reply bytes out. One thread owns every descriptor; other threads ask it to plug or unplug.
    """

    def __init__(
        self,
        link: str | Path,
        session: Callable[[], Respond],
        *,
        tcp_port: int = 0,
        greeting: Callable[[], bytes] = bytes,
        name: str = "device",
    ) -> None:
        self.link = Path(link)
        self.tcp_port = tcp_port
        self.pts_name: str | None = None
        self._session = session
        self._greeting = greeting
        self._pty: tuple[int, int, Respond] | None = None
        self._last_pts: str | None = None
        self._listener: socket.socket | None = None
        self._clients: dict[socket.socket, Respond] = {}
        self._calls: queue.Queue[tuple[Callable[[], Any], queue.Queue[Any]]] = queue.Queue()
        self._wake_r, self._wake_w = os.pipe()
        self._stop = False
        self._thread = threading.Thread(target=self._serve, name=f"sim-{name}", daemon=True)
        self._thread.start()
        self.replug()

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.tcp_port}"

    def replug(self) -> str:
        """Plug in (again): a pty under a new pts name and the TCP port listening; the pts name."""
        return str(self._call(self._plug))

    def unplug(self) -> None:
        """The device goes away: the pty hangs up, TCP clients are closed, nothing listens."""
        self._call(self._unplug)

    def send(self, data: bytes) -> None:
        """Unsolicited bytes to every connected stream."""
        self._call(lambda: self._broadcast(data))

    def close(self) -> None:
        if not self._stop:
            self._call(self._unplug)
            self._stop = True
            os.write(self._wake_w, b"x")
            self._thread.join(5)
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _call(self, fn: Callable[[], Any]) -> Any:
        done: queue.Queue[Any] = queue.Queue(1)
        self._calls.put((fn, done))
        os.write(self._wake_w, b"x")
        result = done.get(timeout=5)
        if isinstance(result, BaseException):
            raise result
        return result

    # Everything below runs on the endpoint's thread.

    def _plug(self) -> str:
        self._unplug()
        master, slave, name = open_pty(avoid=self._last_pts)
        os.set_blocking(master, False)
        self._pty = (master, slave, self._session())
        self.pts_name = self._last_pts = name
        point_link(self.link, name)
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.tcp_port))
        listener.listen(8)
        listener.setblocking(False)
        self._listener = listener
        self.tcp_port = listener.getsockname()[1]
        self._write_pty(self._greeting())
        return self.pts_name

    def _unplug(self) -> None:
        if self._pty is not None:
            close_fds(self._pty[:2])
            self._pty = None
            self.pts_name = None
        self.link.unlink(missing_ok=True)
        for client in self._clients:
            client.close()
        self._clients.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _serve(self) -> None:
        while not self._stop:
            watched: list[Any] = [self._wake_r, *self._clients]
            if self._pty:
                watched.append(self._pty[0])
            if self._listener:
                watched.append(self._listener)
            ready, _, _ = select.select(watched, [], [], 1.0)
            for item in ready:
                if item == self._wake_r:
                    os.read(self._wake_r, 64)
                    self._run_calls()
                elif item is self._listener:
                    self._accept()
                elif self._pty and item == self._pty[0]:
                    self._from_pty()
                elif item in self._clients:
                    self._from_client(item)

    def _run_calls(self) -> None:
        while not self._calls.empty():
            fn, done = self._calls.get_nowait()
            try:
                done.put(fn())
            except Exception as exc:  # noqa: BLE001 - any error goes to the calling thread
                done.put(exc)

    def _accept(self) -> None:
        assert self._listener is not None
        with contextlib.suppress(BlockingIOError):
            client, _ = self._listener.accept()
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._clients[client] = self._session()
            with contextlib.suppress(OSError):
                client.sendall(self._greeting())

    def _from_pty(self) -> None:
        assert self._pty is not None
        try:
            data = os.read(self._pty[0], 4096)
        except (BlockingIOError, OSError):
            return
        self._write_pty(self._pty[2](data))

    def _write_pty(self, data: bytes) -> None:
        if data and self._pty is not None:
            with contextlib.suppress(OSError):
                os.write(self._pty[0], data)

    def _from_client(self, client: socket.socket) -> None:
        try:
            data = client.recv(4096)
        except OSError:
            data = b""
        if not data:
            del self._clients[client]
            client.close()
            return
        reply = self._clients[client](data)
        if reply:
            with contextlib.suppress(OSError):
                client.sendall(reply)

    def _broadcast(self, data: bytes) -> None:
        self._write_pty(data)
        for client in self._clients:
            with contextlib.suppress(OSError):
                client.sendall(data)


class EndpointDevice:
    """A simulated device served by a :class:`DeviceEndpoint`: its addresses, plug switches and
    the corrupt-reply fault. Subclasses set their state first, then call ``__init__`` (the
    endpoint starts serving at once), and implement ``_session``."""

    def __init__(
        self,
        link: str | Path,
        *,
        tcp_port: int = 0,
        greeting: Callable[[], bytes] = bytes,
        name: str = "device",
    ) -> None:
        self._corrupt = 0
        self._lock = threading.Lock()
        self.endpoint = DeviceEndpoint(
            link, self._session, tcp_port=tcp_port, greeting=greeting, name=name
        )

    @property
    def port(self) -> str:
        return str(self.endpoint.link)

    @property
    def url(self) -> str:
        return self.endpoint.url

    @property
    def pts_name(self) -> str | None:
        return self.endpoint.pts_name

    def corrupt(self, replies: int = 1) -> None:
        """Make the next ``replies`` replies malformed."""
        with self._lock:
            self._corrupt += replies

    def unplug(self) -> None:
        self.endpoint.unplug()

    def replug(self) -> str:
        return self.endpoint.replug()

    def close(self) -> None:
        self.endpoint.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take_corrupt(self) -> bool:
        """Whether this reply is to be malformed (using up one of :meth:`corrupt`'s)."""
        with self._lock:
            if self._corrupt:
                self._corrupt -= 1
                return True
            return False

    def _session(self) -> Respond:
        raise NotImplementedError


class SimulatedPanel(EndpointDevice):
    """State and fault switches shared by both panel protocols."""

    name = "panel"

    def __init__(
        self,
        link: str | Path,
        *,
        power: PowerState = "on",
        source: str = "hdmi1",
        tcp_port: int = 0,
    ) -> None:
        self.power: PowerState = power
        self.source = source
        #: Commands received, in order (SMART: the normalised line; MAXHUB: the frame).
        self.received: list[bytes] = []
        super().__init__(link, tcp_port=tcp_port, name=self.name)

    def set_power(self, state: PowerState) -> None:
        if state not in ("on", "off", "standby"):
            raise ValueError(f"power is on, off or standby, not {state!r}")
        self.power = state

    def set_input(self, source: str) -> None:
        self.source = source


class SmartPanel(SimulatedPanel):
    """A SMART-style panel: ASCII ``get``/``set`` commands, ``>`` prompts, silent in standby."""

    name = "smart-panel"
    INPUTS = ("hdmi1", "hdmi2", "hdmi3", "vga", "ops", "opscc", "android")

    def _session(self) -> Respond:
        buf = bytearray()

        def respond(data: bytes) -> bytes:
            out = bytearray()
            for byte in data:
                if byte in (0x0D, 0x0A):
                    if buf or byte == 0x0D:
                        out += self._answer(bytes(buf))
                    buf.clear()
                elif len(buf) < 256:
                    buf.append(byte)
            return bytes(out)

        return respond

    def _answer(self, raw: bytes) -> bytes:
        if self.power == "standby":
            return b""
        line = " ".join(raw.decode("latin-1").lower().replace("=", " = ").split())
        self.received.append(line.encode())
        if not line:
            return b">"
        if self._take_corrupt():
            return b"p\x00w\xfer#st@te%%\r\n>"
        if line == "get powerstate":
            return self._reply("powerstate", "on" if self.power == "on" else "ready")
        if line.startswith("set powerstate = "):
            wanted = line.rsplit(" ", 1)[-1]
            states = {"on": "on", "ready": "off", "standby": "standby", "powersave": "standby"}
            if wanted in states:
                self.power = states[wanted]  # type: ignore[assignment]
                return self._reply("powerstate", wanted)
        elif self.power != "on":
            pass  # every other command needs the screen on
        elif line == "get input":
            return self._reply("input", self.source.upper())
        elif line.startswith("set input = ") and line.rsplit(" ", 1)[-1] in self.INPUTS:
            self.source = line.rsplit(" ", 1)[-1]
            return self._reply("input", self.source.upper())
        # SMART's guide: the command is echoed as sent, "invalid cmd=set vol ume=65".
        return f"invalid cmd={raw.decode('latin-1').strip()}\r\n>".encode()

    @staticmethod
    def _reply(key: str, value: str) -> bytes:
        return f"{key}={value}\r\n>".encode()


# MAXHUB-style frame constants, as the panel's side of the wire.
START, END = 0xA6, 0x0D
GET, SET, REPLY, REFUSE = b"G"[0], b"S"[0], b"r"[0], b"n"[0]
POWER, INPUT = b"P"[0], b"I"[0]
POWER_CODES: dict[PowerState, int] = {"off": 0, "on": 1, "standby": 2}
POWER_BY_CODE: dict[int, PowerState] = {c: s for s, c in POWER_CODES.items()}
INPUT_CODES: dict[str, int] = {
    "android": 0,
    "hdmi1": 1,
    "hdmi2": 2,
    "hdmi3": 3,
    "ops": 4,
    "usbc": 5,
    "vga": 6,
    "dp": 7,
}


def frame(machine_id: int, op: int, cmd: int, data: bytes = b"") -> bytes:
    """One MAXHUB-style frame."""
    body = bytes([machine_id, 2 + len(data), op, cmd, *data])
    return bytes([START, *body, sum(body) % 256, END])


class MaxhubPanel(SimulatedPanel):
    """A MAXHUB-style panel: binary frames with a checksum, silent in standby."""

    name = "maxhub-panel"

    def __init__(self, link: str | Path, *, machine_id: int = 1, **kwargs: Any) -> None:
        self.machine_id = machine_id
        super().__init__(link, **kwargs)

    def set_input(self, source: str) -> None:
        if source not in INPUT_CODES:
            raise ValueError(f"a MAXHUB-style panel has inputs {sorted(INPUT_CODES)}")
        self.source = source

    def _session(self) -> Respond:
        buf = bytearray()

        def respond(data: bytes) -> bytes:
            buf.extend(data)
            out = bytearray()
            while True:
                at = buf.find(bytes([START]))
                if at < 0:
                    buf.clear()
                    break
                del buf[:at]
                if len(buf) < 3 or len(buf) < buf[2] + 5:
                    break
                size = buf[2] + 5
                whole = bytes(buf[:size])
                del buf[:size]
                out += self._answer(whole)
            return bytes(out)

        return respond

    def _answer(self, whole: bytes) -> bytes:
        if self.power == "standby":
            return b""
        self.received.append(whole)
        machine, op, cmd, data = whole[1], whole[3], whole[4], whole[5:-2]
        if machine not in (self.machine_id, 0xFF):
            return b""
        if whole[-1] != END or sum(whole[1:-2]) % 256 != whole[-2]:
            return frame(self.machine_id, REFUSE, cmd, b"\x03")
        if op == GET and cmd == POWER:
            reply = frame(self.machine_id, REPLY, POWER, bytes([POWER_CODES[self.power]]))
        elif op == SET and cmd == POWER and len(data) == 1 and data[0] in POWER_BY_CODE:
            self.power = POWER_BY_CODE[data[0]]
            reply = frame(self.machine_id, REPLY, POWER, data)
        elif cmd == INPUT and self.power != "on":
            reply = frame(self.machine_id, REFUSE, cmd, b"\x02")
        elif op == GET and cmd == INPUT:
            reply = frame(self.machine_id, REPLY, INPUT, bytes([INPUT_CODES[self.source]]))
        elif op == SET and cmd == INPUT and len(data) == 1 and data[0] in INPUT_CODES.values():
            self.source = next(s for s, c in INPUT_CODES.items() if c == data[0])
            reply = frame(self.machine_id, REPLY, INPUT, data)
        else:
            reply = frame(self.machine_id, REFUSE, cmd, b"\x01")
        if self._take_corrupt():
            return reply[:-2] + bytes([(reply[-2] + 1) % 256, END])  # a wrong checksum
        return reply
