"""Release signatures, the update's refusals before install, the outbox schema version, and
the ``[update]`` section being local only."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from edge_agent.commands import Rejected
from edge_agent.config import ConfigError, apply_remote, load_config
from edge_agent.outbox import SCHEMA_VERSION, Outbox, OutboxError
from edge_agent.remote_policy import LOCAL_ONLY_SECTIONS
from edge_agent.update import Layout, UpdateFailed, check_release, check_url
from schemas.release import (
    ReleaseError,
    UpdateArgs,
    keygen,
    load_public_key,
    main,
    sign,
    verify,
    wheel_version,
)


@pytest.fixture
def release(tmp_path: Path) -> tuple[Path, bytes, Path]:
    key = tmp_path / "release.key"
    pub = keygen(key)
    wheel = tmp_path / "campus_edge-1.2.3-py3-none-any.whl"
    wheel.write_bytes(b"PK not really a wheel, but signed bytes all the same")
    return key, load_public_key(pub), wheel


def _args(wheel: Path, key: Path, **over: str) -> UpdateArgs:
    fields = {
        "version": "1.2.3",
        "url": "https://ingest.example/w",
        "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
        "signature": sign(key, wheel),
        **over,
    }
    return UpdateArgs(**fields)


def test_a_signed_release_verifies_and_a_changed_one_does_not(
    release: tuple[Path, bytes, Path],
) -> None:
    key, pub, wheel = release
    args = _args(wheel, key)
    check_release(wheel.read_bytes(), args, pub)
    with pytest.raises(UpdateFailed, match="sha256 is"):
        check_release(wheel.read_bytes() + b"x", args, pub)
    # the signature binds the version: the same wheel cannot pass as another version
    with pytest.raises(ReleaseError, match=r"does not match version 9\.9\.9"):
        verify(pub, "9.9.9", args.sha256, args.signature)


def test_a_signature_by_another_key_is_refused(
    release: tuple[Path, bytes, Path], tmp_path: Path
) -> None:
    _, pub, wheel = release
    rogue = tmp_path / "rogue.key"
    keygen(rogue)
    with pytest.raises(UpdateFailed, match="refused: the signature does not match"):
        check_release(wheel.read_bytes(), _args(wheel, rogue), pub)


def test_keygen_never_overwrites_and_keeps_the_private_key_private(tmp_path: Path) -> None:
    key = tmp_path / "k"
    keygen(key)
    assert key.stat().st_mode & 0o077 == 0
    with pytest.raises(ReleaseError, match="not overwriting"):
        keygen(key)


def test_campus_release_signs_and_verifies(
    release: tuple[Path, bytes, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, _, wheel = release
    assert main(["sign", "--key", str(key), str(wheel)]) == 0
    assert main(["verify", "--pubkey", str(key) + ".pub", str(wheel)]) == 0
    assert "signature good" in capsys.readouterr().out
    wheel.write_bytes(wheel.read_bytes() + b"!")
    assert main(["verify", "--pubkey", str(key) + ".pub", str(wheel)]) == 1
    assert "does not match" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "version"),
    [("campus_edge-0.2.0-py3-none-any.whl", "0.2.0"), ("x-1.0rc1-py3-none-any.whl", "1.0rc1")],
)
def test_wheel_version(name: str, version: str) -> None:
    assert wheel_version(name) == version


@pytest.mark.parametrize("name", ["../x-1-py3-none-any.whl", "x.whl", "x-../1-a-b-c.whl"])
def test_wheel_version_refuses_other_names(name: str) -> None:
    with pytest.raises(ReleaseError):
        wheel_version(name)


@pytest.mark.parametrize(
    ("url", "insecure", "ok"),
    [
        ("https://ingest.example/w", False, True),
        ("http://127.0.0.1:8080/w", False, True),
        ("http://[::1]/w", False, True),
        ("http://ingest.example/w", False, False),
        ("http://ingest.example/w", True, True),
        ("file:///etc/passwd", True, False),
        ("ftp://ingest.example/w", True, False),
    ],
)
def test_download_urls(url: str, insecure: bool, ok: bool) -> None:
    if ok:
        check_url(url, insecure_http=insecure)
    else:
        with pytest.raises(Rejected):
            check_url(url, insecure_http=insecure)


def test_version_is_a_plain_directory_name() -> None:
    import msgspec

    for bad in ("../evil", "a/b", "", "x" * 70, "/abs"):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(
                {"version": bad, "url": "https://x/y", "sha256": "0" * 64,
                 "signature": "A" * 86 + "=="},
                UpdateArgs,
            )  # fmt: skip


def test_pointer_switches_atomically_and_back(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    assert layout.current_version() is None
    layout.point("1.2.3")
    assert layout.current_version() == "1.2.3"
    assert (tmp_path / "current").is_symlink()
    layout.point(None)
    assert layout.current_version() is None


def test_a_pointer_to_a_version_with_a_final_newline_points_nowhere(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    (tmp_path / "envs" / "1.2.3\n").mkdir(parents=True)
    (tmp_path / "current").symlink_to(Path("envs") / "1.2.3\n")
    assert layout.current_version() is None
    # a pointer file's own line end is its text's, not the version's (Windows without symlinks)
    (tmp_path / "current").unlink()
    (tmp_path / "current").write_text("envs/1.2.3\n")
    assert layout.current_version() == "1.2.3"


def test_outbox_schema_is_versioned_and_a_newer_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        box.append_many([])
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.execute("INSERT INTO events (ts, type, data, synced, created_at) VALUES ('t','x',x'',0,0)")
    db.commit()
    db.close()
    with pytest.raises(OutboxError, match="newer than this agent's"):
        Outbox(path)
    with pytest.raises(OutboxError, match="newer than this agent's"):
        Outbox(path, readonly=True)
    db = sqlite3.connect(path)  # untouched: the newer agent's row and version are still there
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    assert db.execute("SELECT count(*) FROM events").fetchone()[0] == 1
    db.close()


def test_an_outbox_from_before_versioning_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT NOT NULL, "
        "type TEXT NOT NULL, data BLOB NOT NULL, synced INTEGER NOT NULL, created_at REAL NOT NULL)"
    )
    db.execute("INSERT INTO events (ts, type, data, synced, created_at) VALUES ('t','x',x'',0,0)")
    db.commit()
    db.close()
    with Outbox(path) as box:
        assert box.stats().depth == 1
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def test_update_section_is_local_only(tmp_path: Path, release: tuple[Path, bytes, Path]) -> None:
    key, pub, _ = release
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        '[device]\nid = "d1"\nschool_id = "s1"\nkind = "gateway"\n'
        '[mqtt]\nurl = "mqtt://127.0.0.1"\n'
        f'[update]\npublic_key_file = "{key}.pub"\n'
    )
    config = load_config(cfg)
    assert config.update.public_key == pub
    assert "update" in LOCAL_ONLY_SECTIONS
    with pytest.raises(ConfigError, match="update: may not be set remotely"):
        apply_remote(config, {"update": {"public_key_file": "/tmp/mine.pub"}})
    cfg.write_text(cfg.read_text().replace(f"{key}.pub", str(key)))  # a private key: refused
    with pytest.raises(ConfigError, match=r"update\.public_key_file"):
        load_config(cfg)
