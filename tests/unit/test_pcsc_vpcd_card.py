"""The virtual card's side of the vpcd protocol, against a stand-in for vpcd on loopback."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest

from simulators.vpcd_card import FELICA_ATR, ULTRALIGHT_ATR, VirtualCard, storage_atr

UID = bytes.fromhex("04A1B2C3D4E5F6")


class FakeVpcd:
    """The reader end: listens, accepts the card, sends framed control codes and APDUs."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(5)
        self.port = int(self.server.getsockname()[1])
        self.conn: socket.socket | None = None

    def accept(self) -> None:
        self.conn, _ = self.server.accept()
        self.conn.settimeout(5)

    def send(self, payload: bytes) -> None:
        assert self.conn is not None
        self.conn.sendall(struct.pack(">H", len(payload)) + payload)

    def ask(self, payload: bytes) -> bytes:
        self.send(payload)
        assert self.conn is not None
        (n,) = struct.unpack(">H", self._exact(2))
        return self._exact(n)

    def _exact(self, n: int) -> bytes:
        assert self.conn is not None
        buf = b""
        while len(buf) < n:
            chunk = self.conn.recv(n - len(buf))
            assert chunk, "the card hung up"
            buf += chunk
        return buf

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.server.close()


@pytest.fixture
def vpcd() -> Iterator[FakeVpcd]:
    fake = FakeVpcd()
    try:
        yield fake
    finally:
        fake.close()


def test_atr_power_and_get_uid(vpcd: FakeVpcd) -> None:
    with VirtualCard(vpcd.port) as card:
        card.present(UID, FELICA_ATR, wait_s=0)
        vpcd.accept()
        assert vpcd.ask(b"\x04") == FELICA_ATR
        vpcd.send(b"\x01")  # power on: no answer expected
        assert vpcd.ask(bytes.fromhex("FFCA000000")) == UID + b"\x90\x00"
        assert vpcd.ask(bytes.fromhex("FFCA000004")) == b"\x6c\x07"
        assert vpcd.ask(bytes.fromhex("FFCA000007")) == UID + b"\x90\x00"
        assert vpcd.ask(bytes.fromhex("FFCA000009")) == UID + b"\x62\x82"
        assert vpcd.ask(bytes.fromhex("00A4040000")) == b"\x6d\x00"
        assert card.powered
        card.set_response(b"\x63\x00", b"\x6a\x81")
        assert vpcd.ask(bytes.fromhex("FFCA000000")) == b"\x63\x00"
        assert vpcd.ask(bytes.fromhex("FFCA000000")) == b"\x6a\x81"
        assert vpcd.ask(bytes.fromhex("FFCA000000")) == UID + b"\x90\x00"
        assert len(card.apdus) == 8


def test_remove_hangs_up(vpcd: FakeVpcd) -> None:
    card = VirtualCard(vpcd.port)
    card.present(UID, wait_s=0)
    vpcd.accept()
    assert vpcd.ask(b"\x04") == ULTRALIGHT_ATR
    card.remove()
    assert vpcd.conn is not None
    assert vpcd.conn.recv(1) == b""
    assert not card.connected


def test_storage_atr_layout() -> None:
    assert storage_atr(0x03, 0x0003).hex().upper() == "3B8F8001804F0CA0000003060300030000000068"
    assert storage_atr(0x03, 0x0001)[-1] == 0x6A


def test_uid_length_checked() -> None:
    with pytest.raises(ValueError, match="UID"):
        VirtualCard(1).present(b"")
