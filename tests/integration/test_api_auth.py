"""API tokens on a real server: hashed at rest, scopes enforced, clear 401/403 bodies."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

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
    assert "role 'reader'" in body["detail"]
    assert "needs 'tokens'" in body["detail"]
    # /metrics counts the whole district: a reader is refused, the data platform is not
    status, body = call(base + "/metrics", reader)
    assert status == 403
    assert "needs 'metrics'" in body["detail"]
    status, made = call(base + "/api/v1/tokens", admin, "POST", {"name": "bi", "role": "service"})
    assert (status, made["role"], made["schools"], made["scopes"]) == (
        201,
        "service",
        None,
        ["read"],
    )
    service = made["token"]
    status, text = call(base + "/metrics", service)
    assert status == 200
    assert "campus_ingest" in text

    status, body = call(base + "/api/v1/tokens", admin, "POST", {"name": "x", "scopes": ["root"]})
    assert status == 422  # names the bad field
    assert body["detail"][0]["loc"][-2:] == ["scopes", 0]

    # at rest only digests: neither token appears in the table
    with psycopg.connect(db_url) as conn:
        stored = {bytes(r[0]) for r in conn.execute("SELECT token_sha256 FROM api_tokens")}
    assert stored == {hashlib.sha256(t.encode()).digest() for t in (admin, reader, service)}

    status, listed = call(base + "/api/v1/tokens", admin)
    assert status == 200
    assert {t["name"] for t in listed} == {"bootstrap (admin-token)", "platform", "bi"}
    assert {t["name"]: t["role"] for t in listed}["platform"] == "reader"
    assert all("token" not in t for t in listed)
    assert call(base + f"/api/v1/tokens/{created['id']}", admin, "DELETE")[0] == 204
    assert call(base + f"/api/v1/tokens/{created['id']}", admin, "DELETE")[0] == 404
    # revocation takes effect once the short cache entry ages out
    wait_until(
        lambda: call(base + "/api/v1/meta", reader)[0] == 401,
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
        (row,) = conn.execute("SELECT scopes, role, schools FROM api_tokens").fetchall()
    assert row == (["admin"], "district_admin", None)


def test_a_new_admin_token_file_appears_whole(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever waits for the bootstrap's token file reads a whole token, never an empty file
    (seen: a test read it between the file's creation and its write, and got 401s for 30 s)."""
    path = tmp_path / "secrets" / "admin-token"
    seen_while_writing: list[bool] = []
    fsync = os.fsync

    def watching_fsync(fd: int) -> None:
        seen_while_writing.append(path.exists())
        fsync(fd)

    monkeypatch.setattr(os, "fsync", watching_fsync)
    with psycopg.connect(db_url, autocommit=True) as conn:
        from ingest_server.storage.migrate import migrate

        migrate(conn)
        assert "created one" in (auth.bootstrap(conn, path) or "")
    assert seen_while_writing == [False]  # written beside it, then linked into place
    token = path.read_text()
    assert token.startswith(auth.PREFIX)
    assert token.endswith("\n")
    assert len(token) > 40
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["admin-token"]  # nothing staged left


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


def test_token_cli_roles_and_schools(db_url: str) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ingest_server", "token", "--db", db_url, *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    made = cli("create", "--name", "tech-s001", "--role", "school_admin", "--school", "s001")
    assert made.returncode == 0, made.stderr
    assert "school_admin, s001" in made.stdout
    bad = cli("create", "--name", "x", "--role", "school_admin")
    assert bad.returncode == 1
    assert "needs its schools" in bad.stderr
    bad = cli("create", "--name", "x", "--role", "service", "--school", "s001")
    assert bad.returncode == 1
    assert "covers every school" in bad.stderr
    both = cli("create", "--name", "x", "--role", "reader", "--scope", "read")
    assert both.returncode == 2  # argparse: one of --role / --scope
    assert cli("create", "--name", "old", "--scope", "admin").returncode == 0
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT name, role, schools FROM api_tokens ORDER BY id").fetchall()
    assert rows == [("tech-s001", "school_admin", ["s001"]), ("old", "district_admin", None)]
    listed = cli("list").stdout
    assert "school_admin" in listed
    assert "s001" in listed
    assert "all schools" in listed


def test_migration_0040_gives_old_tokens_their_roles(db_url: str) -> None:
    """Tokens made before 0040 (scopes only) become district_admin / reader of all schools;
    a row still inserted the old way gets its role from its scopes."""
    from ingest_server.storage.migrate import migrate

    with psycopg.connect(db_url, autocommit=True) as conn:
        migrate(conn)
        # back to the state before 0040, with two old tokens in it
        conn.execute("DROP TRIGGER api_tokens_role ON api_tokens")
        conn.execute("ALTER TABLE api_tokens DROP CONSTRAINT api_tokens_role_check")
        conn.execute("ALTER TABLE api_tokens DROP COLUMN role, DROP COLUMN schools")
        conn.execute("DELETE FROM schema_migrations WHERE version = 40")
        conn.execute(
            "INSERT INTO api_tokens (name, token_sha256, scopes) VALUES"
            " ('old-admin', '\\x01', '{admin}'), ('old-read', '\\x02', '{read}'),"
            " ('old-both', '\\x03', '{read,admin}')"
        )
        assert 40 in migrate(conn)
        rows = conn.execute("SELECT name, role, schools FROM api_tokens ORDER BY id").fetchall()
        assert rows == [
            ("old-admin", "district_admin", None),
            ("old-read", "reader", None),
            ("old-both", "district_admin", None),
        ]
        conn.execute(
            "INSERT INTO api_tokens (name, token_sha256, scopes)"
            " VALUES ('legacy', '\\x04', '{read}')"
        )
        row = conn.execute("SELECT role FROM api_tokens WHERE name = 'legacy'").fetchone()
        assert row == ("reader",)
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(
                "INSERT INTO api_tokens (name, token_sha256, role) VALUES ('x', '\\x05',"
                " 'school_admin')"
            )


def test_a_cached_token_needs_no_lookup_and_revocation_still_holds(db_url: str) -> None:
    """The guard answers a token checked lately from the cache (no database, so on the event
    loop); a miss says so instead of querying, and a revoked token is refused once its entry
    is ``CACHE_S`` old."""
    from ingest_server.storage.migrate import migrate

    with psycopg.connect(db_url, autocommit=True) as conn:
        migrate(conn)
        token_id, token = auth.create_token(conn, "cache-test", "reader")
    lookups = 0

    def connect() -> psycopg.Connection[Any]:
        nonlocal lookups
        lookups += 1
        return psycopg.connect(db_url, autocommit=True)

    checker = auth.TokenChecker(connect)
    with pytest.raises(auth.NotCached):
        checker.check(token, "127.0.0.1", cached_only=True)
    assert lookups == 0
    found = checker.check(token, "127.0.0.1")
    assert found is not None
    assert found.id == token_id
    assert lookups == 1
    assert checker.check(token, "127.0.0.1", cached_only=True) == found
    assert lookups == 1
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert auth.revoke_token(conn, token_id)

    def expired() -> bool:
        try:
            checker.check(token, "127.0.0.1", cached_only=True)
        except auth.NotCached:
            return True
        return False

    wait_until(expired, auth.CACHE_S + 5, "the cache entry aged out")
    assert checker.check(token, "127.0.0.1") is None  # revoked: the lookup refuses it
