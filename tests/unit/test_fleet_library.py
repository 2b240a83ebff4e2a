"""campus-sim's library terminals play the scripted lending desk, hashed like a real terminal."""

from __future__ import annotations

import hashlib

from schemas.events import LibraryLoan, LibraryReturn
from simulators.fleet.events import MAKERS, _desk, keyed_hasher
from simulators.lending_desk import LendingDesk

KEY = bytes(range(32))


def test_library_events_follow_the_desk_script() -> None:
    h = keyed_hasher(KEY)
    device = "s001-lib-1"
    loans = [MAKERS["library.loan"](i, device, h) for i in range(0, 40, 2)]
    returns = [MAKERS["library.return"](i, device, h) for i in range(1, 40, 2)]
    script = _desk(device)
    assert all(isinstance(e, LibraryLoan) for e in loans)
    assert all(isinstance(e, LibraryReturn) for e in returns)
    assert [e.item_id for e in loans] == [t.item_id for t in script["loan"][:20]]
    assert [e.item_id for e in returns] == [t.item_id for t in script["return"][:20]]
    seed = int.from_bytes(hashlib.blake2s(device.encode(), digest_size=4).digest(), "big")
    cards = {h(s.card) for s in LendingDesk(seed=seed).roster}
    assert {e.student_hash for e in loans} <= cards  # a real student's card, hashed
    assert all(e.student_hash is None for e in returns)  # returns need no card
    assert all(e.terminal == device for e in loans + returns)
    # another terminal has another morning
    other = [MAKERS["library.loan"](i, "s002-lib-1", h).item_id for i in range(0, 40, 2)]
    assert other != [e.item_id for e in loans]
