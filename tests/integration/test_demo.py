"""The newcomer's path: README command 1 shows events from every simulated device quickly."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from simulators.harness import shared_tmpdir

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_shows_events_from_every_device_within_a_minute() -> None:
    work = shared_tmpdir("campus-demo-")
    try:
        out = subprocess.run(
            [
                str(Path(sys.executable).parent / "ingest-server"),
                "demo",
                "--data-dir",
                str(work),
                "--broker-port",
                "0",
                "--http",
                "127.0.0.1:0",  # any free port: the demo picks one and says which
                "--duration",
                "40",
                "--interval",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=150,
            check=False,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        shown = re.search(r"HTTP +http://127\.0\.0\.1:(\d+)/healthz", out.stdout)
        assert shown is not None, out.stdout[:2000]
        assert int(shown.group(1)) > 0
        last = out.stdout.rsplit("device ", 1)[-1]
        for device, event_type in [
            ("cr-0101", "card.tap"),
            ("cs-0101", "attendance.checkin"),
            ("sb-0101", "board.power"),
            ("env-0101", "env.reading"),
        ]:
            match = re.search(
                rf"^{device}\s+\S+\s+online\s+(\d+)\s+.*{re.escape(event_type)}=", last, re.M
            )
            assert match, f"{device} shows no {event_type} in:\n{last}"
            assert int(match.group(1)) > 0
        assert "quarantined: 0" in last
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_demo_refuses_a_malformed_http_address() -> None:
    out = subprocess.run(
        [str(Path(sys.executable).parent / "ingest-server"), "demo", "--http", "8080"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert "--http: expected HOST:PORT, e.g. 127.0.0.1:8080, got '8080'" in out.stderr
