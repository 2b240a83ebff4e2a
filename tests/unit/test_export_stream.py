"""The export's read-ahead (``export.stream_rows``): pages in order, a failing page raised after
the ones before it, and a client that goes away stops the fetching within the read-ahead."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from ingest_server.web.api import export


def _pages(n: int, fetched: list[int], fail_at: int | None = None) -> Iterator[bytes]:
    for i in range(n):
        if i == fail_at:
            raise RuntimeError(f"page {i} failed")
        fetched.append(i)
        yield f"p{i}\n".encode()


async def _read(gen: object, limit: int | None = None) -> list[bytes]:
    out: list[bytes] = []
    async for chunk in gen:  # type: ignore[attr-defined]
        out.append(chunk)
        if limit is not None and len(out) == limit:
            break
    return out


def test_the_header_then_every_page_in_order() -> None:
    fetched: list[int] = []
    got = asyncio.run(_read(export.stream_rows("a,b\n", _pages(7, fetched))))
    assert got == [b"a,b\n", *(f"p{i}\n".encode() for i in range(7))]
    assert asyncio.run(_read(export.stream_rows("", _pages(0, [])))) == []


def test_a_failing_page_is_raised_after_the_pages_before_it() -> None:
    got: list[bytes] = []

    async def read() -> None:
        async for chunk in export.stream_rows("", _pages(5, [], fail_at=3)):
            got.append(chunk)

    with pytest.raises(RuntimeError, match="page 3 failed"):
        asyncio.run(read())
    assert got == [b"p0\n", b"p1\n", b"p2\n"]


def test_a_stalled_client_holds_the_fetching_to_the_read_ahead_and_leaving_stops_it() -> None:
    fetched: list[int] = []
    held: list[int] = []

    async def read_two_stall_and_leave() -> None:
        gen = export.stream_rows("", _pages(1000, fetched))
        assert await _read(gen, limit=2) == [b"p0\n", b"p1\n"]
        # the client stops reading: whatever the fetching would do, it has had the time
        await asyncio.sleep(0.2)
        held.append(len(fetched))
        await gen.aclose()  # type: ignore[attr-defined]
        await asyncio.sleep(0.05)

    asyncio.run(read_two_stall_and_leave())
    # two sent, AHEAD waiting, one fetched and waiting to be put: nothing more, then or after
    assert held[0] <= 2 + export.AHEAD + 1
    assert len(fetched) == held[0]
