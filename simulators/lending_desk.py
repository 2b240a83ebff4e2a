"""A scripted school library desk: students, books, and a morning of loans and returns.

Deterministic from a seed, so a fleet runner and a test replay the same morning. The desk
only decides *what happens*; a :class:`DeskIO` (the caller's simulated hardware: a card
reader, a barcode scanner, an RFID pad) makes it happen::

    desk = LendingDesk(seed=7, students=40, books=300)
    morning = desk.morning(transactions=200, rfid_share=0.1)
    play(morning, io, settle=lambda inputs: wait_for_terminal(inputs))
    morning.expected            # one Transaction per event the terminal must emit

A visit is a student tapping their card, borrowing 1-3 books and tapping again to finish,
or someone dropping 1-3 books on the returns side without a card. Only books out on loan are
returned, only books on the shelf are borrowed. Each book is scanned (its library barcode) or
laid on the pad (its ISO 28560-3 tag); books laid together go on the pad at once, up to
``pad_slots``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

Via = Literal["barcode", "rfid"]


@dataclass(frozen=True, slots=True)
class Student:
    name: str
    card: bytes  # the 5 bytes of a 125 kHz campus card


@dataclass(frozen=True, slots=True)
class Book:
    item_id: str  # printed on the barcode and programmed into the tag
    tag_uid: bytes  # the ISO 15693 tag's 8-byte UID


@dataclass(frozen=True, slots=True)
class Visit:
    student: Student | None  # None: a return without a card
    books: tuple[tuple[Book, Via], ...]


@dataclass(frozen=True, slots=True)
class Transaction:
    kind: Literal["loan", "return"]
    student: Student | None
    item_id: str
    source: Via


@dataclass(frozen=True, slots=True)
class Morning:
    visits: tuple[Visit, ...]
    expected: tuple[Transaction, ...]

    @property
    def inputs(self) -> int:
        """Taps, scans and tags the terminal will see."""
        return sum(2 * (v.student is not None) + len(v.books) for v in self.visits)


class DeskIO(Protocol):
    """The simulated hardware at the desk (blocking calls)."""

    def tap(self, card: bytes) -> None: ...

    def scan(self, item_id: str) -> None: ...

    def lay(self, books: Sequence[Book]) -> None:
        """Lay these books on the pad together (one per slot)."""
        ...

    def lift(self) -> None:
        """Take every book off the pad."""
        ...


@dataclass(slots=True)
class LendingDesk:
    seed: int = 0
    students: int = 40
    books: int = 300
    pad_slots: int = 2
    roster: list[Student] = field(init=False)
    shelf: list[Book] = field(init=False)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)  # noqa: S311 - a simulation, not secrets
        cards = rng.sample(range(1, 2**32), self.students)
        self.roster = [
            Student(f"student-{i:03d}", bytes([0x1A]) + c.to_bytes(4, "big"))
            for i, c in enumerate(cards)
        ]
        self.shelf = [
            Book(f"T{1000000 + i:07d}", bytes.fromhex("E0040150") + rng.randbytes(4))
            for i in range(self.books)
        ]

    def morning(self, transactions: int = 200, rfid_share: float = 0.1) -> Morning:
        """Visits adding up to exactly ``transactions`` loans and returns."""
        rng = random.Random(f"{self.seed}:morning")  # noqa: S311
        on_shelf = list(self.shelf)
        on_loan: list[Book] = []
        visits: list[Visit] = []
        expected: list[Transaction] = []
        while len(expected) < transactions:
            n = min(rng.randint(1, 3), transactions - len(expected))
            returning = bool(on_loan) and rng.random() < 0.35
            source = on_loan if returning or not on_shelf else on_shelf
            picked = rng.sample(source, min(n, len(source)))
            for book in picked:
                source.remove(book)
                (on_shelf if returning else on_loan).append(book)
            student = None if returning else rng.choice(self.roster)
            vias: list[Via] = ["rfid" if rng.random() < rfid_share else "barcode" for _ in picked]
            books = tuple(zip(picked, vias, strict=True))
            visits.append(Visit(student, books))
            kind: Literal["loan", "return"] = "return" if returning else "loan"
            expected += [Transaction(kind, student, b.item_id, via) for b, via in books]
        return Morning(tuple(visits), tuple(expected))


def play(
    morning: Morning,
    io: DeskIO,
    settle: Callable[[int], None] = lambda inputs: None,
    *,
    pad_slots: int = 2,
) -> None:
    """Act the morning out on ``io``; ``settle(n)`` is called once the terminal should have seen
    ``n`` inputs (a desk waits for the beep before the next step)."""
    seen = 0
    for visit in morning.visits:
        if visit.student is not None:
            io.tap(visit.student.card)
            seen += 1
            settle(seen)
        for book, via in visit.books:
            if via == "barcode":
                io.scan(book.item_id)
                seen += 1
                settle(seen)
        tagged = [b for b, via in visit.books if via == "rfid"]
        for i in range(0, len(tagged), pad_slots):
            group = tagged[i : i + pad_slots]
            io.lay(group)
            seen += len(group)
            settle(seen)
            io.lift()
        if visit.student is not None:  # tap again to finish, so the next returns stay returns
            io.tap(visit.student.card)
            seen += 1
            settle(seen)
