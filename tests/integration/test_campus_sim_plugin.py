"""The pytest plugin, as QA would use it: a throwaway project with only a test file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QA_TEST = """
import pytest

@pytest.mark.chaos
def test_env_sensor_survives_a_broker_kill(campus_device, campus_broker):
    report = campus_device("env_sensor", events_per_hour=7200, seconds=3)
    assert report.devices == 1
    assert report.generated >= 3
    assert report.lost == 0 and report.duplicates_stored == 0

def test_fixture_names_are_prefixed(campus_db_url, campus_ingest):
    assert campus_db_url.startswith("postgresql://")
    assert campus_ingest.healthy()
"""


def test_plugin_installs_and_runs_in_another_project(tmp_path: Path) -> None:
    (tmp_path / "test_qa.py").write_text(QA_TEST)
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = --strict-markers\n")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "2 passed" in done.stdout
