"""A contactless card on a vsmartcard ``vpcd`` virtual reader, driven from tests.

vpcd (the PC/SC reader driver inside pcscd) listens on TCP; a card "lies on the reader" while
it is connected. Framing, written here independently of the driver: every message is a 2-byte
big-endian length then the payload. A 1-byte payload from vpcd is a control code (0 power off,
1 power on, 2 reset, 4 send the ATR); anything longer is a command APDU to answer. Only the ATR
request and APDUs get a reply.

The card answers the PC/SC part 3 GET DATA UID command ``FF CA 00 00 Le`` as a reader does:
``Le = 00`` gives the whole UID, a shorter Le gives ``6C xx`` (xx = the UID length), a longer
one the UID with ``62 82``. Tests can script other answers::

    card = VirtualCard(port)
    card.present(bytes.fromhex("04A1B2C3D4E5F6"))
    card.set_response(b"\\x63\\x00")          # the next GET UID fails
    card.remove(); card.close()

If vpcd drops the connection (pcscd restarted) while a card is presented, the card reconnects,
as a card left lying on the reader would be seen again.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections import deque

RID = bytes.fromhex("A000000306")
GET_UID_HEADER = bytes.fromhex("FFCA0000")

CTRL_OFF, CTRL_ON, CTRL_RESET, CTRL_ATR = 0, 1, 2, 4


def with_tck(atr_without_tck: bytes) -> bytes:
    """Append TCK: the XOR of every byte after TS."""
    tck = 0
    for b in atr_without_tck[1:]:
        tck ^= b
    return atr_without_tck + bytes([tck])


def storage_atr(standard: int, card_name: int) -> bytes:
    """The ATR a PC/SC part 3 reader builds for a contactless storage card."""
    aid = RID + bytes([standard]) + card_name.to_bytes(2, "big") + bytes(4)
    historical = bytes([0x80, 0x4F, len(aid)]) + aid
    return with_tck(bytes([0x3B, 0x80 | len(historical), 0x80, 0x01]) + historical)


def iso14443_4_atr(historical: bytes) -> bytes:
    """The ATR a PC/SC part 3 reader builds for an ISO 14443-4 card from its historical bytes."""
    if len(historical) > 15:
        raise ValueError("at most 15 historical bytes")
    return with_tck(bytes([0x3B, 0x80 | len(historical), 0x80, 0x01]) + historical)


ULTRALIGHT_ATR = storage_atr(0x03, 0x0003)  # ISO 14443 A part 3, MIFARE Ultralight
MIFARE_1K_ATR = storage_atr(0x03, 0x0001)
ICODE_SLI_ATR = storage_atr(0x0B, 0x0014)  # ISO 15693 part 3
FELICA_ATR = storage_atr(0x11, 0x003B)
DESFIRE_ATR = iso14443_4_atr(b"\x80")  # ATS historical bytes of a MIFARE DESFire
TYPE_B_ATR = iso14443_4_atr(bytes.fromhex("1C2D9411F7718500"))  # ATQB app data + protocol info


class VirtualCard:
    """One card slot: present a card (connect to vpcd), script its answers, take it away."""

    CONNECT_RETRY_S = 0.05

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.address = (host, port)
        #: Every APDU vpcd sent while a card was presented, in order.
        self.apdus: list[bytes] = []
        self._lock = threading.Lock()
        self._script: deque[bytes] = deque()
        self._uid = b""
        self._atr = b""
        self._present = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.powered = False

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def present(self, uid: bytes, atr: bytes = ULTRALIGHT_ATR, *, wait_s: float = 10.0) -> None:
        """Lay a card on the reader; wait up to ``wait_s`` for vpcd to take the connection.

        With ``wait_s=0`` it returns at once and keeps trying to connect in the background.
        """
        if not 1 <= len(uid) <= 20:
            raise ValueError("a UID is 1 to 20 bytes")
        self.remove()
        with self._lock:
            self._uid, self._atr = uid, atr
        self._present.set()
        self._thread = threading.Thread(target=self._serve, name="vpcd-card", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + wait_s
        while wait_s and not self.connected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"vpcd at {self.address} did not take the card")
            time.sleep(0.01)

    def remove(self) -> None:
        """Take the card off the reader (close the connection)."""
        self._present.clear()
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def set_response(self, *responses: bytes) -> None:
        """Answer the next GET UID commands with these response APDUs (data + SW), in order."""
        with self._lock:
            self._script.extend(responses)

    def close(self) -> None:
        self.remove()

    def __enter__(self) -> VirtualCard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve(self) -> None:
        while self._present.is_set():
            try:
                sock = socket.create_connection(self.address, timeout=1.0)
            except OSError:
                time.sleep(self.CONNECT_RETRY_S)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(None)
            self._sock = sock
            try:
                if self._present.is_set():  # removed while connecting
                    self._talk(sock)
            except OSError:
                pass
            finally:
                self._sock = None
                self.powered = False
                sock.close()

    def _talk(self, sock: socket.socket) -> None:
        while True:
            msg = self._recv(sock)
            if msg is None:
                return
            if len(msg) == 1:
                reply = self._control(msg[0])
            else:
                self.apdus.append(msg)
                reply = self._apdu(msg)
            if reply is not None:
                # One write for length and payload, so Nagle never holds the payload back.
                sock.sendall(struct.pack(">H", len(reply)) + reply)

    @staticmethod
    def _recv(sock: socket.socket) -> bytes | None:
        header = _recv_exact(sock, 2)
        if header is None:
            return None
        return _recv_exact(sock, struct.unpack(">H", header)[0])

    def _control(self, code: int) -> bytes | None:
        if code == CTRL_ATR:
            return self._atr
        if code in (CTRL_ON, CTRL_RESET):
            self.powered = True
        elif code == CTRL_OFF:
            self.powered = False
        return None

    def _apdu(self, apdu: bytes) -> bytes:
        if apdu[:4] != GET_UID_HEADER or len(apdu) != 5:
            return b"\x6d\x00"  # instruction not supported
        with self._lock:
            if self._script:
                return self._script.popleft()
            uid = self._uid
        le = apdu[4] or 256
        if le == len(uid) or apdu[4] == 0:
            return uid + b"\x90\x00"
        if le < len(uid):
            return bytes([0x6C, len(uid)])
        return uid + b"\x62\x82"  # end of data reached before Le bytes


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        with contextlib.suppress(AttributeError):  # TCP_QUICKACK is Linux-only
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)
