"""The library terminal through its real stacks: a 125 kHz card reader and a barcode scanner on
ptys, book tags on vpcd slots under a real pcscd, and a morning of lending through Mosquitto
into PostgreSQL.

The pad is vpcd's two reader slots: PC/SC offers one card per slot, so "several books on the
pad" is several slots read in the same session.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest

from device_drivers.base import DriverContext, DriverState, UidHasher
from device_drivers.em4100 import Em4100Reader
from device_drivers.library import LibraryTerminal, build
from device_drivers.pcsc import ReaderWatcher
from device_drivers.plumbing.link import LinkedDriver
from edge_agent.agent import Agent
from edge_agent.config import load_config
from schemas.events import LibraryLoan, LibraryReturn
from simulators.barcode_scanner import BarcodeScannerSim, ean13, wrong_check_digit
from simulators.em4100 import Em4100Simulator
from simulators.harness import Mosquitto, wait_until
from simulators.harness_pipeline import HASH_KEY_HEX, IngestServer, assert_exactly_once
from simulators.lending_desk import Book, LendingDesk, play
from simulators.library_tags import BookTag, book_block, iso28560_2_block, memory_of
from simulators.pcscd import Pcscd
from tests.driver_harness import HASHER, RunningDriver, ctx_fixture, fast_backoff, until

# The PC/SC tests' private pcscd (module scope) and their reader-state helper.
from tests.pcsc import reader_empty

pytestmark = pytest.mark.integration

fast = fast_backoff(Em4100Reader, LinkedDriver, ReaderWatcher)
ctx = ctx_fixture("lib-0101")

CARD = bytes.fromhex("1A00C0FFEE")
TAG_UID = bytes.fromhex("E004015012345678")


@pytest.fixture
def rdm(tmp_path: Path) -> Iterator[Em4100Simulator]:
    with Em4100Simulator(tmp_path / "ttyCARD") as sim:
        yield sim


@pytest.fixture
def scanner(tmp_path: Path) -> Iterator[BarcodeScannerSim]:
    with BarcodeScannerSim(tmp_path / "ttySCAN", suffix="crlf") as sim:
        yield sim


@pytest.fixture
def pad(pcscd: Pcscd) -> Iterator[tuple[BookTag, BookTag]]:
    with BookTag(pcscd.port) as first, BookTag(pcscd.port + 1) as second:
        yield first, second
    for reader in pcscd.readers:
        wait_until(lambda r=reader: reader_empty(r), 10, f"{reader} to be empty")


def options(rdm: Em4100Simulator, **parts: Any) -> dict[str, Any]:
    return {
        "cards": [{"type": "em4100", "port": str(rdm.link), "hold_ms": 0, "name": "lib-card"}],
        "terminal": "lib-0101",
        "session_s": 30,
        **parts,
    }


def running(terminal: LibraryTerminal) -> RunningDriver:
    return RunningDriver(terminal, ready=DriverState.OK, what="the terminal's parts to come up")


async def handled(terminal: LibraryTerminal, n: int) -> None:
    await until(lambda: terminal.handled >= n, f"{n} inputs handled (at {terminal.handled})")


async def test_scans_join_the_session_and_bad_scans_never_become_loans(
    ctx: DriverContext, rdm: Em4100Simulator, scanner: BarcodeScannerSim
) -> None:
    scan = {"port": str(scanner.link), "suffix": "crlf", "item_pattern": r"T\d{7}"}
    terminal = build("lib-0101", options(rdm, scanner=scan), ctx)
    isbn = ean13("978702000220")
    async with running(terminal) as out:
        scanner.scan("T0000001")  # before any card: a return
        await handled(terminal, 1)
        rdm.present(CARD)
        await handled(terminal, 2)
        for code in ("T0000002", isbn, wrong_check_digit(isbn), "T0000002", "HELLO"):
            scanner.scan(code)
        scanner.send_raw(b"\x00\x1b\xfe\r\n")
        await handled(terminal, 8)
    (ret,) = out.of_type(LibraryReturn)
    assert ret == LibraryReturn(
        student_hash=None, item_id="T0000001", source="barcode", terminal="lib-0101"
    )
    loans = out.of_type(LibraryLoan)
    assert [(x.item_id, x.student_hash) for x in loans] == [
        ("T0000002", HASHER.hash(CARD)),
        (isbn, HASHER.hash(CARD)),
    ]
    assert loans[0].session_id == loans[1].session_id
    assert loans[0].session_id is not None
    errors = [m.text for m in terminal.messages if m.level == "error"]
    assert len(errors) == 3, errors
    assert "wrong check digit" in errors[0]
    assert "HELLO" in errors[1]
    assert "characters no barcode has" in errors[2]
    assert ctx.counters["library.scan_bad_check_digit"] == 1
    assert ctx.counters["library.scan_unknown_code"] == 1
    assert ctx.counters["library.scan_unreadable"] == 1
    assert ctx.counters["library.repeat"] == 1


async def test_scanner_replugged_keeps_lending(
    ctx: DriverContext, rdm: Em4100Simulator, scanner: BarcodeScannerSim
) -> None:
    terminal = build("lib-0101", options(rdm, scanner={"port": str(scanner.link)}), ctx)
    async with running(terminal) as out:
        scanner.unplug()
        await out.until_state(DriverState.DISCONNECTED)
        scanner.replug()
        await out.until_state(DriverState.OK, "OK after the re-plug")
        scanner.suffix = b"\r"
        scanner.scan(ean13("978730001234"))
        await out.until_count(1, LibraryReturn)
    assert ctx.counters["barcode.disconnected"] == 1


async def test_books_on_the_pad_and_bad_tags(
    ctx: DriverContext,
    rdm: Em4100Simulator,
    pad: tuple[BookTag, BookTag],
    pcscd: Pcscd,
) -> None:
    first, second = pad
    terminal = build("lib-0101", options(rdm, pad={"reader": pcscd.label, "poll_ms": 100}), ctx)
    readers = pcscd.readers

    def lift_all() -> None:
        first.lift()
        second.lift()
        for r in readers:
            wait_until(lambda r=r: reader_empty(r), 10, f"{r} to be empty")

    async with running(terminal) as out:
        rdm.present(CARD)
        await handled(terminal, 1)
        # two books laid together, one per slot: one session, two loans
        await asyncio.to_thread(first.lay, TAG_UID, memory_of(book_block("T0000010")))
        await asyncio.to_thread(second.lay, TAG_UID[::-1], memory_of(book_block("T0000011")))
        await handled(terminal, 3)
        await asyncio.to_thread(lift_all)
        # the same book laid again in the session: counted once
        await asyncio.to_thread(first.lay, TAG_UID, memory_of(book_block("T0000010")))
        await handled(terminal, 4)
        # bad tags on both slots at once
        bad_crc = memory_of(book_block("T0000012", corrupt_crc=True))
        await asyncio.to_thread(lift_all)
        await asyncio.to_thread(first.lay, TAG_UID, bad_crc)
        await asyncio.to_thread(second.lay, TAG_UID[::-1], memory_of(iso28560_2_block("T13")))
        await handled(terminal, 6)
        await asyncio.to_thread(lift_all)
        # lifted while being read (after GET UID and one READ BINARY)
        lifted = memory_of(book_block("T0000014"))
        await asyncio.to_thread(first.lay, TAG_UID, lifted, lift_after_apdus=1, wait_s=0)
        await handled(terminal, 7)
        await asyncio.to_thread(lift_all)
    loans = out.of_type(LibraryLoan)
    assert sorted(x.item_id for x in loans) == ["T0000010", "T0000011"]
    assert {(x.source, x.student_hash) for x in loans} == {("rfid", HASHER.hash(CARD))}
    assert len({x.session_id for x in loans}) == 1
    assert out.of_type(LibraryReturn) == []
    errors = [m.text for m in terminal.messages if m.level == "error"]
    assert any("damaged" in e for e in errors), errors
    assert any("unknown tag data model" in e for e in errors), errors
    assert any("lifted off the pad" in e for e in errors), errors
    assert ctx.counters["library.tag_bad_crc"] == 1
    assert ctx.counters["library.tag_unknown_model"] == 1
    assert ctx.counters["library.tag_removed"] == 1
    assert ctx.counters["library.repeat"] == 1


# -- a morning through the whole pipeline ----------------------------------------------------------


class Desk:
    """The lending desk's hardware: the card reader and scanner ptys, the pad's two slots."""

    def __init__(self, rdm: Em4100Simulator, scanner: BarcodeScannerSim, pcscd: Pcscd) -> None:
        self.rdm, self.scanner, self.readers = rdm, scanner, pcscd.readers
        self.slots = (BookTag(pcscd.port), BookTag(pcscd.port + 1))

    def tap(self, card: bytes) -> None:
        self.rdm.present(card)

    def scan(self, item_id: str) -> None:
        self.scanner.scan(item_id)

    def lay(self, books: Sequence[Book]) -> None:
        for slot, book in zip(self.slots, books, strict=False):
            slot.lay(book.tag_uid, memory_of(book_block(book.item_id)))

    def lift(self) -> None:
        for slot in self.slots:
            slot.lift()
        for r in self.readers:
            wait_until(lambda r=r: reader_empty(r), 10, f"{r} to be empty")

    def close(self) -> None:
        self.lift()


def stored_library_events(db_url: str) -> list[tuple[str, dict[str, Any]]]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT type, data FROM events WHERE device_id = 'lib-0101' ORDER BY seq"
        ).fetchall()
    return [(str(t), dict(d)) for t, d in rows]


async def test_a_morning_of_lending_is_stored_exactly_once(
    *,
    tmp_path: Path,
    mosquitto: Mosquitto,
    db_url: str,
    rdm: Em4100Simulator,
    scanner: BarcodeScannerSim,
    pcscd: Pcscd,
) -> None:
    morning = LendingDesk(seed=2026).morning(transactions=200, rfid_share=0.08)
    (tmp_path / "district.key").write_text(HASH_KEY_HEX)
    (tmp_path / "agent.toml").write_text(f"""
[device]
id = "lib-0101"
school_id = "s001"
kind = "library_terminal"
[outbox]
path = "outbox.db"
[mqtt]
url = "mqtt://{mosquitto.host}:{mosquitto.port}"
[health]
interval_s = 0
[privacy]
hash_key_file = "district.key"
[[drivers]]
type = "library_terminal"
name = "lib-0101"
session_s = 60
[drivers.scanner]
port = "{scanner.link}"
suffix = "crlf"
item_pattern = 'T\\d{{7}}'
[drivers.pad]
reader = "{pcscd.label}"
poll_ms = 100
[[drivers.cards]]
type = "em4100"
port = "{rdm.link}"
hold_ms = 0
""")
    server = IngestServer(tmp_path, mosquitto.url, db_url)
    server.start()
    desk = Desk(rdm, scanner, pcscd)
    try:
        await asyncio.to_thread(server.wait_healthy)
        async with Agent(load_config(tmp_path / "agent.toml")) as agent:
            (slot,) = agent._slots
            terminal = slot.driver
            assert isinstance(terminal, LibraryTerminal)
            await until(lambda: terminal.state == DriverState.OK, "the terminal", within=10)

            def settle(n: int) -> None:
                wait_until(lambda: terminal.handled >= n, 10, f"input {n} at the terminal")

            await asyncio.to_thread(play, morning, desk, settle)
            try:
                await asyncio.to_thread(
                    wait_until,
                    lambda: len(stored_library_events(db_url)) >= len(morning.expected),
                    20,
                    "the morning in PostgreSQL",
                )
            except TimeoutError as exc:
                n = len(stored_library_events(db_url))
                raise AssertionError(
                    f"{exc}: {n} stored; terminal counters {agent.status()}; {server.tail()}"
                ) from None
        assert_exactly_once(db_url, {"lib-0101": len(morning.expected)})
    finally:
        desk.close()
        server.terminate()
    got = stored_library_events(db_url)
    district = UidHasher(bytes.fromhex(HASH_KEY_HEX))
    want = [
        (
            f"library.{t.kind}",
            t.item_id,
            t.source,
            None if t.student is None else district.hash(t.student.card),
        )
        for t in morning.expected
    ]
    assert sorted((k, d["item_id"], d["source"], d["student_hash"]) for k, d in got) == sorted(want)
    loan_visits = sum(v.student is not None for v in morning.visits)
    assert len({d["session_id"] for k, d in got if k == "library.loan"}) == loan_visits
