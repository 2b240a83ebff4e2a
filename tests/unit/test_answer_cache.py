"""The rollup answer cache's own rules: an answer only under its validator, least recently used
out first, never past its bound; ``If-None-Match`` read as RFC 9110 has it."""

from __future__ import annotations

import pytest

from ingest_server.web.api.answer_cache import AnswerCache, etag, matches

V1 = (16384, 1, "700")
V2 = (16384, 2, "700")


def test_an_answer_is_served_only_under_the_validator_it_was_rendered_under() -> None:
    cache = AnswerCache()
    cache.put("k", V1, b"one")
    assert cache.get("k", V1) == b"one"
    assert cache.get("k", V2) is None
    assert cache.get("k", V1) is None  # the stale one was dropped, not kept beside
    assert (len(cache), cache.size) == (0, 0)


def test_least_recently_used_goes_first_and_the_bound_holds() -> None:
    cache = AnswerCache(max_bytes=10)
    cache.put("a", V1, b"aaaa")
    cache.put("b", V1, b"bbbb")
    assert cache.get("a", V1) == b"aaaa"  # a is now the more recent
    cache.put("c", V1, b"cccc")
    assert cache.get("b", V1) is None
    assert (cache.get("a", V1), cache.get("c", V1)) == (b"aaaa", b"cccc")
    assert cache.size == 8
    cache.put("a", V2, b"aaaaaa")  # replacing counts the new size only
    assert (cache.size, len(cache)) == (10, 2)


def test_an_answer_larger_than_the_bound_is_not_kept() -> None:
    cache = AnswerCache(max_bytes=4)
    cache.put("a", V1, b"aaa")
    cache.put("big", V1, b"x" * 5)
    assert cache.get("big", V1) is None
    assert cache.get("a", V1) == b"aaa"


def test_tags_differ_by_key_and_validator_and_are_stable() -> None:
    tag = etag(("card_taps", None), V1)
    assert tag == etag(("card_taps", None), V1)
    assert tag.startswith('"')
    assert tag.endswith('"')
    assert len({tag, etag(("card_taps", ("s001",)), V1), etag(("card_taps", None), V2)}) == 3


@pytest.mark.parametrize(
    ("header", "hit"),
    [
        (None, False),
        ("", False),
        ('"abc"', True),
        ('W/"abc"', True),  # weak comparison, as If-None-Match uses
        ('"x", "abc"', True),
        ("*", True),
        ('"abcd"', False),
        ("abc", False),  # unquoted: not the tag
    ],
)
def test_if_none_match(header: str | None, hit: bool) -> None:
    assert matches(header, '"abc"') is hit
