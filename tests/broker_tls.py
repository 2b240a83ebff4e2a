"""Fixtures for a TLS Mosquitto with password file and ACLs: ``tls_files`` (a test CA and
certificates) and ``tls_mosquitto`` (the broker, its server user and the database)."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from ingest_server.storage.migrate import migrate_url
from simulators.harness import free_port, port_open, shared_tmpdir, wait_until


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    out = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "server.pem", "key": tmp_path / "key.pem"}
    ca.cert_pem.write_to_path(str(out["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(out["cert"]))
    cert.private_key_pem.write_to_path(str(out["key"]))
    key = tmp_path / "hash-key"
    key.write_text("ab" * 32 + "\n")
    out["hash_key"] = key
    return out


@pytest.fixture
def tls_mosquitto(tls_files: dict[str, Path], db_url: str) -> Iterator[dict[str, Any]]:
    """deploy/mosquitto/mosquitto-tls.conf with paths and port of this test, its auth files
    first written by ``ingest-server broker-auth write`` (the server user only)."""
    work = shared_tmpdir("campus-tls-")
    port = free_port()
    auth = {
        "passwd": work / "passwd",
        "acl": work / "acl",
        "pid": work / "mosquitto.pid",
        "server_pw": work / "server-pw",
    }
    auth["server_pw"].write_text("ingest-secret\n")
    migrate_url(db_url)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ingest_server",
            "broker-auth",
            "write",
            "--db",
            db_url,
            "--passwd",
            str(auth["passwd"]),
            "--acl",
            str(auth["acl"]),
            "--server-user",
            "ingest",
            "--server-password-file",
            str(auth["server_pw"]),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "ingest-secret" not in auth["passwd"].read_text()

    conf = (ROOT / "deploy/mosquitto/mosquitto-tls.conf").read_text()
    subs = {
        r"^listener 8883$": f"listener {port} 127.0.0.1",
        r"^certfile .*$": f"certfile {tls_files['cert']}",
        r"^keyfile .*$": f"keyfile {tls_files['key']}",
        r"^cafile .*$": f"cafile {tls_files['ca']}",
        r"^password_file .*$": f"password_file {auth['passwd']}",
        r"^acl_file .*$": f"acl_file {auth['acl']}",
        r"^persistence_location .*$": f"persistence_location {work}/",
    }
    for pattern, repl in subs.items():
        conf, n = re.subn(pattern, repl, conf, flags=re.M)
        assert n == 1, f"shipped TLS config lacks {pattern}"
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
        wait_until(lambda: port_open(port) or proc.poll() is not None, 10, "mosquitto")
        assert proc.poll() is None, log.read_text()
        auth["pid"].write_text(f"{proc.pid}\n")
        yield {"port": port, "log": log, **auth}
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


ROOT = Path(__file__).resolve().parents[1]
