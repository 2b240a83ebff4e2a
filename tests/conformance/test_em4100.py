"""EM4100 cards through an RDM6300-style reader: the reader's frame and the card's 64-bit code.

Sources:
- [RDM] RDM6300 125 kHz reader module datasheet, "data format": STX 0x02, 10 ASCII hex data
  characters (version/customer byte + 32-bit card number), 2 ASCII hex checksum characters
  (XOR of the 5 data bytes), ETX 0x03.
- [HC] forum.hobbycomponents.com, "RDM630 / RDM6300 125KHz RFID reader" thread (viewtopic
  f=82): the published frame body ``100086F44426`` = data 10 00 86 F4 44, checksum 26, the
  number printed on the fob 0008844356. (The raw hex dump in the same post has "26" in place of
  "86" in its third byte, which its own checksum does not match; the decoded form is used.)
- [EM] EM Microelectronic EM4100 datasheet, "Memory array": 64 bits = 9 header ones, 10 rows
  of 4 data bits each followed by an even row parity bit, 4 even column parity bits, stop bit 0.
"""

from __future__ import annotations

from device_drivers.codecs.em4100 import Em4100Frame, Em4100Parser, FrameError
from simulators.em4100 import frame

# [HC] the published frame.
PUBLISHED = b"\x02100086F44426\x03"
DATA = bytes.fromhex("100086F444")


def test_published_frame_decodes() -> None:
    """[HC]/[RDM] data 10 00 86 F4 44, XOR checksum 0x26, card number 8844356."""
    (item,) = Em4100Parser().feed(PUBLISHED)
    assert item == Em4100Frame(DATA)
    assert item.version == 0x10
    assert item.card_number == 8844356


def test_simulator_produces_the_published_frame() -> None:
    """[HC] the simulator's reader frame for the same card, byte for byte."""
    assert frame(DATA) == PUBLISHED


def test_published_frame_with_another_checksum_is_refused() -> None:
    """[RDM] the checksum is the XOR of the 5 data bytes: 0x27 instead of 0x26 is bad."""
    bad = PUBLISHED[:11] + b"27" + PUBLISHED[13:]
    (item,) = Em4100Parser().feed(bad)
    assert isinstance(item, FrameError)
    assert item.reason == "bad_checksum"


def em4100_bits(data: bytes) -> str:
    """[EM] the card's 64-bit code, written here from the datasheet's memory array."""
    nibbles = [f"{n:04b}" for b in data for n in (b >> 4, b & 0xF)]
    rows = "".join(n + str(n.count("1") % 2) for n in nibbles)
    columns = "".join(str(sum(int(n[c]) for n in nibbles) % 2) for c in range(4))
    return "1" * 9 + rows + columns + "0"


def em4100_data(bits: str) -> bytes | None:
    """[EM] the 5 data bytes of a 64-bit code, or None when a header/parity/stop bit is wrong."""
    if len(bits) != 64 or bits[:9] != "1" * 9 or bits[-1] != "0":
        return None
    rows = [bits[9 + 5 * r : 14 + 5 * r] for r in range(10)]
    if any(row.count("1") % 2 for row in rows):
        return None
    columns = bits[59:63]
    if any((sum(int(row[c]) for row in rows) + int(columns[c])) % 2 for c in range(4)):
        return None
    return int("".join(row[:4] for row in rows), 2).to_bytes(5, "big")


def test_the_readers_frame_carries_the_cards_64_bit_code() -> None:
    """[EM]+[RDM] the card's code checks (row and column parity) and gives the frame's bytes."""
    bits = em4100_bits(DATA)
    assert len(bits) == 64
    assert em4100_data(bits) == DATA
    (item,) = Em4100Parser().feed(frame(em4100_data(bits) or b""))
    assert item == Em4100Frame(DATA)


def test_a_flipped_bit_in_the_64_bit_code_fails_its_parity() -> None:
    """[EM] one flipped data bit breaks its row parity (and its column parity)."""
    bits = em4100_bits(DATA)
    for i in range(9, 63):
        flipped = bits[:i] + ("0" if bits[i] == "1" else "1") + bits[i + 1 :]
        assert em4100_data(flipped) is None, i
