"""The configs we ship are the configs we test: deploy/ files load in the real programs."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from simulators.harness import free_port, port_open, shared_tmpdir, wait_until

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_shipped_mosquitto_conf_starts_and_never_drops_queued_messages() -> None:
    text = (ROOT / "deploy/mosquitto/mosquitto.conf").read_text()
    # The settings that keep queued QoS 1 messages from being dropped silently.
    for line in ("max_queued_messages 0", "max_queued_bytes 0", "persistence true"):
        assert re.search(rf"^{line}$", text, re.M), f"deploy config lacks '{line}'"

    work = shared_tmpdir("campus-deploy-")
    port = free_port()
    conf = re.sub(r"^listener \d+ .*$", f"listener {port} 127.0.0.1", text, flags=re.M)
    conf = re.sub(r"^persistence_location .*$", f"persistence_location {work}/", conf, flags=re.M)
    conf += f"\nuser {pwd.getpwuid(os.geteuid()).pw_name}\n"
    (work / "m.conf").write_text(conf)
    log = work / "log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(work / "m.conf")],
            stdout=out,
            stderr=out,
        )
    try:
        wait_until(lambda: port_open(port) or proc.poll() is not None, 10, "mosquitto to listen")
        assert proc.poll() is None, log.read_text()
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
