"""PC/SC part 3 GET DATA (card UID): the command, and the status words it can answer with.

Source: [P3] PC/SC Workgroup, "Interoperability Specification for ICCs and Personal Computer
Systems, Part 3. Supplemental Document" (rev. 2.02.xx), 3.2.2.1.3 "Get Data": command
``FF CA 00 00 Le`` (P1 = 00: UID; Le = 00: the full length); responses ``UID 90 00`` success,
``62 82`` end of data reached before Le bytes, ``6C XX`` wrong length (XX = the exact length),
``63 00`` no information given, ``6A 81`` function not supported.
"""

from __future__ import annotations

from device_drivers.codecs.pcsc import (
    UidFailure,
    UidRead,
    WrongLength,
    get_uid_command,
    parse_uid_response,
    read_uid,
)
from simulators.vpcd_card import VirtualCard

UID7 = bytes.fromhex("04A1B2C3D4E580")


def test_get_data_command_bytes() -> None:
    """[P3] GET DATA UID with Le = 00 is FF CA 00 00 00."""
    assert get_uid_command() == bytes.fromhex("FFCA000000")
    assert get_uid_command(7) == bytes.fromhex("FFCA000007")


def test_status_words_the_driver_reads() -> None:
    """[P3] 9000 success, 6C XX wrong length, 6300 and 6A81 failures named."""
    assert parse_uid_response(UID7 + b"\x90\x00") == UidRead(UID7)
    assert parse_uid_response(b"\x6c\x07") == WrongLength(7)
    failed = parse_uid_response(b"\x6a\x81")
    assert isinstance(failed, UidFailure)
    assert failed.kind == "failed"
    assert "function not supported" in failed.reason
    assert isinstance(parse_uid_response(b"\x63\x00"), UidFailure)


def test_wrong_length_is_asked_again_with_the_exact_le() -> None:
    """[P3] 6C XX: the command is re-issued with Le = XX."""
    sent: list[bytes] = []
    answers = iter([b"\x6c\x07", UID7 + b"\x90\x00"])

    def transmit(apdu: bytes) -> bytes:
        sent.append(apdu)
        return next(answers)

    assert read_uid(transmit) == UidRead(UID7, retried=True)
    assert sent == [bytes.fromhex("FFCA000000"), bytes.fromhex("FFCA000007")]


def card_answers(uid: bytes, apdu: bytes) -> bytes:
    """The simulated card's answer (its APDU handler, without the vpcd socket)."""
    card = VirtualCard(0)
    card._uid = uid
    return card._apdu(apdu)


def test_simulated_card_answers_as_the_document_says() -> None:
    """[P3] Le 00 -> UID 9000; Le = len -> UID 9000; Le short -> 6C len; Le long -> UID 6282."""
    assert card_answers(UID7, bytes.fromhex("FFCA000000")) == UID7 + b"\x90\x00"
    assert card_answers(UID7, bytes.fromhex("FFCA000007")) == UID7 + b"\x90\x00"
    assert card_answers(UID7, bytes.fromhex("FFCA000004")) == b"\x6c\x07"
    assert card_answers(UID7, bytes.fromhex("FFCA00000A")) == UID7 + b"\x62\x82"
