"""An RDM6300-style 125 kHz reader on a pty: EM4100 cards become 14-byte STX…ETX frames.

Framing (the reader's, written here independently of the driver): STX 0x02, the card's 5
bytes as 10 upper-case hex digits, their XOR as 2 hex digits, ETX 0x03. A real reader repeats
the frame about every 50 ms while the card stays in the field.

    with Em4100Simulator(tmp_path / "ttyRFID") as rdm:
        rdm.present(bytes.fromhex("0A1B2C3D4E"), repeats=5)    # a card held for ~250 ms
        rdm.send_raw(b"\\x02ZZ\\x03")                            # line noise
        rdm.unplug(); rdm.replug()                              # back under another /dev/pts name
        rdm.start_random(rate_hz=2.0)                           # demo: random cards until close()
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from simulators.pty import close_fds, open_pty, point_link


def frame(card: bytes, *, bad_checksum: bool = False, lowercase: bool = False) -> bytes:
    """The reader's frame for a 5-byte card (version/customer byte + 32-bit number)."""
    if len(card) != 5:
        raise ValueError(f"an EM4100 card has 5 bytes, not {len(card)}")
    check = 0
    for b in card:
        check ^= b
    if bad_checksum:
        check ^= 0x5A
    digits = f"{card.hex()}{check:02x}"
    return b"\x02" + (digits if lowercase else digits.upper()).encode("ascii") + b"\x03"


class Em4100Simulator:
    """The device end of a serial EM4100 reader; the driver opens ``link``.

    Writes never block: with nobody reading and the pty buffer full, bytes are dropped (as a
    real UART would) and counted in ``dropped``.
    """

    def __init__(self, link: str | Path) -> None:
        self.link = Path(link)
        self.pts_name: str | None = None
        self.dropped = 0
        self._fds: tuple[int, int] | None = None
        self._previous: str | None = None
        self._lock = threading.Lock()
        self._demo: threading.Thread | None = None
        self._demo_stop = threading.Event()
        self.replug()

    def present(
        self, card: bytes, repeats: int = 1, interval_s: float = 0.05, **frame_opts: bool
    ) -> bytes:
        """Hold ``card`` in the field for ``repeats`` frames; return the 5 bytes the reader read."""
        data = frame(card, **frame_opts)
        for i in range(repeats):
            if i:
                time.sleep(interval_s)  # the reader's repeat period, not synchronisation
            self.send_raw(data)
        return bytes(card)

    def send_raw(self, data: bytes) -> None:
        with self._lock:
            if self._fds is None:
                raise RuntimeError("the reader is unplugged")
            try:
                written = os.write(self._fds[0], data)
            except BlockingIOError:
                written = 0
            self.dropped += len(data) - written

    def unplug(self) -> None:
        """Close the pty: reads on the device side fail, and ``link`` dangles."""
        with self._lock:
            if self._fds is not None:
                close_fds(self._fds)
            self._fds = None
            self.pts_name = None

    def replug(self) -> str:
        """Plug in (again) on a new pty whose /dev/pts name differs from the last; return it."""
        self.unplug()
        master, slave, name = open_pty(avoid=self._previous)
        os.set_blocking(master, False)
        point_link(self.link, name)
        with self._lock:
            self._fds = (master, slave)
            self.pts_name = self._previous = name
        return name

    def start_random(
        self,
        rate_hz: float = 1.0,
        *,
        cards: Sequence[bytes] = (),
        max_repeats: int = 8,
        seed: int | None = None,
    ) -> None:
        """Present random cards (or ones from ``cards``) about ``rate_hz`` times a second."""
        if self._demo is not None:
            raise RuntimeError("random presentation is already running")
        rng = random.Random(seed)  # noqa: S311 - simulated cards, not secrets
        self._demo_stop.clear()

        def loop() -> None:
            while not self._demo_stop.wait(1.0 / rate_hz):
                card = rng.choice(cards) if cards else rng.randbytes(5)
                with contextlib.suppress(RuntimeError):  # unplugged: the card goes unseen
                    self.present(card, repeats=rng.randint(1, max_repeats))

        self._demo = threading.Thread(target=loop, name="em4100-sim", daemon=True)
        self._demo.start()

    def stop_random(self) -> None:
        self._demo_stop.set()
        if self._demo is not None:
            self._demo.join(5)
            self._demo = None

    def close(self) -> None:
        self.stop_random()
        self.unplug()
        self.link.unlink(missing_ok=True)

    def __enter__(self) -> Em4100Simulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
