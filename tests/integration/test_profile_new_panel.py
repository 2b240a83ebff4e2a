"""A panel model the code has never seen, added by a profile file alone.

The "Acme IFP-9" below is invented for this test: its own binary frames (start 55 AA, a
device id, command, one value byte, CRC-16/MODBUS, end 0D) written only here, in a profile
file in tmp and in a small responder on a real pty. A real ``edge-agent run`` process loads the
profile by path and its ``board.power`` / ``board.input`` events must reach a real Mosquitto.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path

import msgspec
import pytest

from device_drivers.codecs.profile import checksum
from device_drivers.panel import probe
from simulators.harness import Mosquitto, wait_until
from tests.agent_helpers import Collector

pytestmark = pytest.mark.integration

SCHOOL, DEVICE = "s001", "env-0101"  # the Collector's topics

PROFILE = """\
[profile]
name = "acme-ifp9"
description = "Acme IFP-9 (a test-only model)"
source = "tests/integration/test_profile_new_panel.py"

[transport]
baudrate = 38400

[binary]
start = "55 AA"
end = "0D"
size = 8
checksum = { kind = "crc16-modbus", start = 2 }
address = 2

[variables]
id = 5

[polling]
every_s = 0.1
timeout_s = 0.5

[commands]
power = { hex = "55 AA {id} 10 00" }
input = { hex = "55 AA {id} 20 00" }

[[poll]]
command = "power"
expect = "board.power"

[[poll]]
command = "input"
expect = "board.input"
when = { "board.power" = "on" }

[[replies]]
match = { 3 = "90" }
value = { offset = 4 }
event = "board.power"
field = "state"
map = { "00" = "off", "01" = "on", "02" = "standby" }

[[replies]]
match = { 3 = "A0" }
value = { offset = 4 }
event = "board.input"
field = "source"
map = { "11" = "hdmi1", "12" = "hdmi2", "30" = "ops" }
"""


def frame(device: int, command: int, value: int) -> bytes:
    body = bytes([0x55, 0xAA, device, command, value])
    return body + checksum("crc16-modbus", body[2:]) + b"\x0d"


class AcmePanel:
    """The panel's end of a pty: answers 10 (power?) and 20 (input?) queries for id 5."""

    def __init__(self, link: Path) -> None:
        self.master, self.slave = os.openpty()
        os.set_blocking(self.master, False)
        link.symlink_to(os.ttyname(self.slave))
        self.power, self.source = 0x01, 0x11
        self.queries = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        buf = bytearray()
        while not self._stop.is_set():
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if not ready:
                continue
            try:
                buf += os.read(self.master, 256)
            except BlockingIOError:
                continue
            except OSError:
                return
            while (at := buf.find(b"\x55\xaa")) >= 0 and len(buf) >= at + 8:
                query = bytes(buf[at : at + 8])
                del buf[: at + 8]
                if query != frame(5, query[3], 0):
                    continue  # not a well-formed query for us: a real panel stays silent
                self.queries += 1
                if query[3] == 0x10:
                    os.write(self.master, frame(5, 0x90, self.power))
                elif query[3] == 0x20:
                    os.write(self.master, frame(5, 0xA0, self.source))
            del buf[:-1024]  # bounded, whatever arrives

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        os.close(self.master)
        os.close(self.slave)


def test_a_new_panel_model_by_profile_file_alone_reports_through_a_real_agent(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    profile = tmp_path / "acme-ifp9.toml"
    profile.write_text(PROFILE)
    panel = AcmePanel(tmp_path / "ttyACME")
    (tmp_path / "district.key").write_bytes(b"k" * 32)
    config = tmp_path / "agent.toml"
    config.write_text(f"""
[device]
id = "{DEVICE}"
school_id = "{SCHOOL}"
kind = "smart_board"
[outbox]
path = "outbox.db"
[mqtt]
url = "{mosquitto.url}"
[privacy]
hash_key_file = "district.key"
[health]
interval_s = 0
[[drivers]]
type = "panel"
name = "acme-panel"
port = "{tmp_path / "ttyACME"}"
profile = "{profile}"
""")
    collector = Collector(mosquitto)
    log = tmp_path / "agent.log"
    with log.open("ab") as out:
        agent = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
            stdout=out,
            stderr=out,
        )
    try:

        def events() -> list[tuple[str, dict[str, object]]]:
            return [
                (e.type, msgspec.to_builtins(e.data))
                for b in list(collector.batches)
                for e in b.events
                if e.type.startswith("board.")
            ]

        def why() -> str:
            return f"events {events()}; agent log:\n{log.read_text()[-2000:]}"

        wait_until(lambda: len(events()) >= 2, 20, f"power and input ({why()})")
        panel.source = 0x30
        wait_until(lambda: len(events()) >= 3, 20, f"the input change ({why()})")
        panel.power = 0x00
        wait_until(lambda: len(events()) >= 4, 20, f"power off ({why()})")
        assert events() == [
            ("board.power", {"state": "on", "previous": "unknown"}),
            ("board.input", {"source": "hdmi1", "previous": None}),
            ("board.input", {"source": "ops", "previous": "hdmi1"}),
            ("board.power", {"state": "off", "previous": "on"}),
        ]
        assert panel.queries >= 4
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(15)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(5)
        collector.close()
        panel.close()


async def test_doctor_probe_shows_each_query_reply_and_event(tmp_path: Path) -> None:
    profile = tmp_path / "acme-ifp9.toml"
    profile.write_text(PROFILE)
    panel = AcmePanel(tmp_path / "ttyACME")
    try:
        result = await probe({"port": str(tmp_path / "ttyACME"), "profile": str(profile)})
    finally:
        panel.close()
    assert result.status == "ok", result
    sent = frame(5, 0x10, 0)[:5].hex(" ").upper()
    got = frame(5, 0x90, 1).hex(" ").upper()
    assert f"power {sent}" in result.message, result
    assert f"{got} = board.power {{state: 'on'}}" in result.message, result
    assert result.message.endswith(": power on, input hdmi1"), result
