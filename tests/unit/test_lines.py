"""The shared line splitter: chunking never changes the lines, overlong lines are bounded."""

from __future__ import annotations

from device_drivers.codecs.lines import LineSplitter, Overlong


def test_lines_split_on_cr_and_lf_and_blank_lines_vanish() -> None:
    splitter = LineSplitter(16)
    assert splitter.feed(b"one\r\ntwo\r\r\nthr") == [b"one", b"two"]
    assert splitter.feed(b"ee\n") == [b"three"]


def test_byte_by_byte_feeding_gives_the_same_lines() -> None:
    data = b"a=1\r\n>b=2\r" + b"x" * 20 + b"\nc\n"
    whole = LineSplitter(8).feed(data)
    split = LineSplitter(8)
    pieces = [item for i in range(len(data)) for item in split.feed(data[i : i + 1])]
    assert pieces == whole == [b"a=1", b">b=2", Overlong(b"x" * 9), b"c"]


def test_an_overlong_line_is_reported_once_and_skipped_to_its_end() -> None:
    splitter = LineSplitter(4)
    assert splitter.feed(b"abcdefghij") == [Overlong(b"abcde")]
    assert splitter.feed(b"klmnop") == []
    assert splitter.feed(b"\nok\n") == [b"ok"]
