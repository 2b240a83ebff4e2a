"""The EM4100 / RDM6300 frame parser and the tap debouncer, bytes and clocks only."""

from __future__ import annotations

from functools import reduce
from itertools import pairwise
from operator import xor

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_drivers.codecs.em4100 import MAX_NOISE, Debouncer, Em4100Frame, Em4100Parser, FrameError

# Worked by hand: 62 ^ E3 ^ 08 ^ 6C ^ ED = 08.
VECTOR = b"\x0262E3086CED08\x03"
VECTOR_UID = bytes.fromhex("62E3086CED")


def encode(uid: bytes) -> bytes:
    return b"\x02" + f"{uid.hex().upper()}{reduce(xor, uid):02X}".encode() + b"\x03"


def feed_all(data: bytes, *chunks: int) -> list[Em4100Frame | FrameError]:
    """Feed ``data`` split at the given offsets."""
    parser = Em4100Parser()
    cuts = [0, *chunks, len(data)]
    return [item for a, b in pairwise(cuts) for item in parser.feed(data[a:b])]


def test_good_frame() -> None:
    [frame] = Em4100Parser().feed(VECTOR)
    assert frame == Em4100Frame(VECTOR_UID)
    assert isinstance(frame, Em4100Frame)
    assert (frame.version, frame.card_number) == (0x62, 0xE3086CED)


def test_lower_case_hex_is_accepted() -> None:
    assert Em4100Parser().feed(VECTOR.lower()) == [Em4100Frame(VECTOR_UID)]


def test_back_to_back_frames() -> None:
    uids = [bytes([i, 0, 0, 0, i]) for i in range(5)]
    assert Em4100Parser().feed(b"".join(map(encode, uids))) == [Em4100Frame(u) for u in uids]


def test_wrong_checksum_is_an_error_and_the_next_frame_reads() -> None:
    bad = VECTOR.replace(b"08\x03", b"09\x03")
    assert Em4100Parser().feed(bad + VECTOR) == [
        FrameError("bad_checksum", bad),
        Em4100Frame(VECTOR_UID),
    ]


@pytest.mark.parametrize("cut", range(1, len(VECTOR)))
def test_split_anywhere(cut: int) -> None:
    assert feed_all(VECTOR + VECTOR, cut, cut + 3) == [Em4100Frame(VECTOR_UID)] * 2


def test_byte_by_byte() -> None:
    data = b"noise" + VECTOR + b"\x02AB\x03" + VECTOR
    assert feed_all(data, *range(1, len(data))) == Em4100Parser().feed(data)


@pytest.mark.parametrize(
    ("junk", "reason"),
    [
        (b"\xff\x00hello\x03", "garbage"),
        (b"\x0262E3\x03", "short"),  # ETX too early
        (b"\x0262E3", "short"),  # a new STX too early
        (b"\x0262E3086CED0800\x03", "overlong"),  # no ETX after 12 digits
        (b"\x0262E3086CEDZZ\x03", "bad_hex"),
        (b"\x02 2E3086CED08\x03", "bad_hex"),
    ],
)
def test_resync_after_bad_input(junk: bytes, reason: str) -> None:
    assert Em4100Parser().feed(VECTOR + junk + VECTOR) == [
        Em4100Frame(VECTOR_UID),
        FrameError(reason, junk),  # type: ignore[arg-type]
        Em4100Frame(VECTOR_UID),
    ]


def test_noise_is_reported_in_bounded_pieces() -> None:
    out = Em4100Parser().feed(b"\xaa" * 1000 + VECTOR)
    errors = [e for e in out if isinstance(e, FrameError)]
    assert {e.reason for e in errors} == {"garbage"}
    assert all(len(e.raw) <= MAX_NOISE for e in errors)
    assert sum(len(e.raw) for e in errors) == 1000
    assert out[-1] == Em4100Frame(VECTOR_UID)


def test_endless_frame_body_is_bounded() -> None:
    out = Em4100Parser().feed(b"\x02" + b"1" * 500 + VECTOR)
    assert all(isinstance(e, FrameError) and len(e.raw) <= MAX_NOISE for e in out[:-1])
    assert out[-1] == Em4100Frame(VECTOR_UID)


@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=20))
def test_any_bytes_any_chunking_never_raises_and_agrees(data: bytes, cuts: list[int]) -> None:
    whole = Em4100Parser().feed(data)
    assert feed_all(data, *sorted(c for c in cuts if c <= len(data))) == whole
    assert all(len(i.raw) <= MAX_NOISE for i in whole if isinstance(i, FrameError))


@given(
    st.lists(
        st.tuples(
            st.binary(min_size=5, max_size=5),
            st.binary(max_size=40).map(
                lambda b: b.replace(b"\x02", b"")  # noise without STX cannot start a frame
            ),
        ),
        max_size=30,
    )
)
def test_every_valid_frame_survives_noise_between_frames(cards: list[tuple[bytes, bytes]]) -> None:
    data = b"".join(noise + encode(uid) for uid, noise in cards)
    frames = [i for i in Em4100Parser().feed(data) if isinstance(i, Em4100Frame)]
    assert frames == [Em4100Frame(uid) for uid, _ in cards]


# --- debouncing ------------------------------------------------------------------------------


def test_a_held_card_is_one_tap() -> None:
    d = Debouncer(hold_s=0.3)
    seen = [d.accept(b"A", t * 0.05) for t in range(200)]  # 10 s in the field
    assert seen == [True] + [False] * 199


def test_card_again_after_absence_longer_than_hold() -> None:
    d = Debouncer(hold_s=0.3)
    assert d.accept(b"A", 0.0)
    assert not d.accept(b"A", 0.25)
    assert not d.accept(b"A", 0.5)  # 0.25 s absent: still the same presence
    assert d.accept(b"A", 0.81)


def test_other_cards_are_independent() -> None:
    d = Debouncer(hold_s=1.0)
    assert [d.accept(uid, 0.1 * i) for i, uid in enumerate([b"A", b"B", b"A", b"C"])] == [
        True,
        True,
        False,
        True,
    ]


def test_memory_is_bounded() -> None:
    d = Debouncer(hold_s=10_000.0)
    for i in range(Debouncer.MAX_CARDS + 1):
        assert d.accept(i.to_bytes(5, "big"), float(i))
    # the oldest card was forgotten, so it counts as new; the newest is still held
    assert d.accept((0).to_bytes(5, "big"), 1000.0)
    assert not d.accept(Debouncer.MAX_CARDS.to_bytes(5, "big"), 1000.0)
