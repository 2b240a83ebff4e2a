"""API tokens on a real server: hashed at rest, scopes enforced, clear 401/403 bodies."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from ingest_server.server import IngestServer
from ingest_server.web.api import auth
from simulators.harness import wait_until
from tests.api_client import call

pytestmark = pytest.mark.integration


@pytest.fixture
def server(api_server: IngestServer) -> IngestServer:
    return api_server


def test_tokens_scopes_and_errors(server: IngestServer, db_url: str) -> None:
    base = server.http.url
    admin = server.settings.token_file.read_text().strip()
    assert admin.startswith("cet_")
    assert server.settings.token_file.stat().st_mode & 0o777 == 0o600

    assert call(base + "/healthz")[0] == 200  # the one open endpoint
    status, body = call(base + "/api/v1/tokens")
    assert status == 401
    assert "API token is required" in body["detail"]
    status, body = call(base + "/api/v1/tokens", "cet_" + "x" * 43)
    assert status == 401
    assert "not valid" in body["detail"]
    assert call(base + "/metrics")[0] == 401

    status, created = call(
        base + "/api/v1/tokens", admin, "POST", {"name": "platform", "scopes": ["read"]}
    )
    assert status == 201
    assert created["scopes"] == ["read"]
    reader = created["token"]
    status, body = call(base + "/api/v1/tokens", reader)
    assert status == 403
    assert "needs 'admin'" in body["detail"]
    status, text = call(base + "/metrics", reader)
    assert status == 200
    assert "campus_ingest" in text

    status, body = call(base + "/api/v1/tokens", admin, "POST", {"name": "x", "scopes": ["root"]})
    assert status == 422  # names the bad field
    assert body["detail"][0]["loc"][-2:] == ["scopes", 0]

    # at rest only digests: neither token appears in the table
    with psycopg.connect(db_url) as conn:
        stored = {bytes(r[0]) for r in conn.execute("SELECT token_sha256 FROM api_tokens")}
    assert stored == {hashlib.sha256(t.encode()).digest() for t in (admin, reader)}

    status, listed = call(base + "/api/v1/tokens", admin)
    assert status == 200
    assert {t["name"] for t in listed} == {"bootstrap (admin-token)", "platform"}
    assert all("token" not in t for t in listed)
    assert call(base + f"/api/v1/tokens/{created['id']}", admin, "DELETE")[0] == 204
    assert call(base + f"/api/v1/tokens/{created['id']}", admin, "DELETE")[0] == 404
    # revocation takes effect once the short cache entry ages out
    wait_until(
        lambda: call(base + "/metrics", reader)[0] == 401,
        auth.CACHE_S + 5,
        "the revoked token refused",
    )


def test_bootstrap_registers_a_provisioned_token(db_url: str, tmp_path: Path) -> None:
    path = tmp_path / "admin-token"
    path.write_text("cet_" + "p" * 43 + "\n")
    with psycopg.connect(db_url, autocommit=True) as conn:
        from ingest_server.storage.migrate import migrate

        migrate(conn)
        assert "registered" in (auth.bootstrap(conn, path) or "")
        assert auth.bootstrap(conn, path) is None  # idempotent
        (row,) = conn.execute("SELECT scopes FROM api_tokens").fetchall()
    assert row[0] == ["admin"]


def test_token_cli(db_url: str) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ingest_server", "token", "--db", db_url, *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    made = cli("create", "--name", "district-bi", "--scope", "read")
    assert made.returncode == 0, made.stderr
    token = made.stdout.split()[-1]
    assert token.startswith("cet_")
    listed = cli("list")
    assert "district-bi" in listed.stdout
    assert token not in listed.stdout
    assert cli("revoke", "1").returncode == 0
    again = cli("revoke", "1")
    assert again.returncode == 1
    assert "no active token" in again.stderr
