"""ISO 15693 book tags holding ISO 28560-3 data, served by a vpcd virtual reader slot.

Written independently of the driver's codec. The 32-byte basic block: byte 0 version 1 (high
nibble) and type of usage (low nibble), byte 1 parts in the item, byte 2 part number, bytes
3-18 the item id (ASCII, NUL padded), bytes 19-20 the CRC, low byte first, bytes 21-22 the
owner library's country code and 23-31 its library identifier (the ISIL split at its hyphen,
NUL padded). The CRC is CRC-16/CCITT (init FFFF, poly 1021) of the other 30 bytes followed by
two zero bytes, as the Danish data model's reference CRC computes it; the published block
``1101013131323233333434…513E4445373035…`` (item "11223344", owner DE-705) carries 3E51, and
tests/conformance checks this encoder produces exactly those bytes.

A :class:`BookTag` answers like an HF reader does for an ICODE-style tag: GET DATA
``FF CA 00 00 00`` gives the UID, READ BINARY ``FF B0 00 block Le`` gives memory (4-byte
blocks; past the end: ``6B 00``). Faults for tests::

    tag = BookTag(pcscd.port)
    tag.lay(uid, book_block("T0000123"))
    tag.lay(uid, book_block("T0000123", corrupt_crc=True))
    tag.lay(uid, memory, lift_after_apdus=2)    # lifted off the pad mid-read
"""

from __future__ import annotations

import contextlib
import socket
import threading

from simulators.vpcd_card import ICODE_SLI_ATR, VirtualCard

BLOCK_SIZE = 4
READ_BINARY = bytes.fromhex("FFB000")


def crc_ccitt(data: bytes) -> int:
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def book_block(
    item_id: str,
    *,
    owner: str = "CN-SCH001",
    usage: int = 1,
    parts: int = 1,
    part: int = 1,
    version: int = 1,
    corrupt_crc: bool = False,
) -> bytes:
    """The 32-byte ISO 28560-3 basic block a library programs into a book's tag."""
    ident = item_id.encode("ascii")
    country, _, library = owner.partition("-")
    if not 1 <= len(ident) <= 16:
        raise ValueError("the item id is 1-16 characters")
    if len(country) != 2 or len(library) > 9:
        raise ValueError("the owner ISIL is CC-library: a 2-letter country, at most 9 after it")
    head = bytes([(version << 4) | usage, parts, part]) + ident.ljust(16, b"\0")
    tail = country.encode("ascii") + library.encode("ascii").ljust(9, b"\0")
    # Two zero bytes stand where the CRC would sit at the end of the 32-byte block.
    crc = crc_ccitt(head + tail + b"\0\0") ^ (0x5A5A if corrupt_crc else 0)
    return head + crc.to_bytes(2, "little") + tail


def iso28560_2_block(item_id: str) -> bytes:
    """A tag in the object-identifier model (ISO 28560-2): DSFID-style first byte 0x06."""
    body = item_id.encode("ascii")
    return (bytes([0x06, 0x01, len(body)]) + body).ljust(32, b"\0")


def memory_of(block: bytes, blocks: int = 28) -> bytes:
    """Tag user memory (ICODE SLIX: 28 blocks of 4 bytes) starting with ``block``."""
    return block.ljust(blocks * BLOCK_SIZE, b"\0")


class BookTag(VirtualCard):
    """One ISO 15693 tag on one slot of the pad."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        super().__init__(port, host)
        self._memory = b""
        self._lift_after: int | None = None
        self._mem_lock = threading.Lock()

    def lay(
        self,
        uid: bytes,
        memory: bytes,
        *,
        lift_after_apdus: int | None = None,
        wait_s: float = 10.0,
    ) -> None:
        """Lay the book on the slot; optionally vanish while the ``n``-th APDU is asked."""
        with self._mem_lock:
            self._memory = memory
            self._lift_after = lift_after_apdus
        self.apdus.clear()
        self.present(uid, ICODE_SLI_ATR, wait_s=wait_s)

    def lift(self) -> None:
        self.remove()

    def _apdu(self, apdu: bytes) -> bytes:
        with self._mem_lock:
            lift = self._lift_after is not None and len(self.apdus) >= self._lift_after
        if lift:
            self._vanish()
        if apdu[:3] == READ_BINARY and len(apdu) == 5:
            start = apdu[3] * BLOCK_SIZE
            length = apdu[4] or 256
            with self._mem_lock:
                if start + length > len(self._memory):
                    return b"\x6b\x00"  # wrong parameters: past the end of memory
                return self._memory[start : start + length] + b"\x90\x00"
        return super()._apdu(apdu)

    def _vanish(self) -> None:
        """Leave the field mid-command: no answer, the connection closes, no reconnect."""
        self._present.clear()
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        raise OSError("tag lifted")
