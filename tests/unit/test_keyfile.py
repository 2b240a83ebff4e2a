"""The district hash key's file: hex digits, or raw bytes taken exactly as written."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.config import ConfigError, load_config
from schemas.keyfile import key_from_file


def test_hex_with_a_newline() -> None:
    assert key_from_file(b"ab" * 32 + b"\n") == bytes([0xAB]) * 32
    assert key_from_file(b"  " + b"0F1e" * 8 + b"\r\n") == bytes.fromhex("0f1e" * 8)


def test_raw_bytes_are_not_stripped() -> None:
    raw = b" \x00key-with-whitespace-ends\x0b\n"
    assert key_from_file(raw) == raw


@given(st.binary(min_size=16, max_size=64))
def test_any_raw_key_round_trips_unless_it_reads_as_hex(raw: bytes) -> None:
    text = raw.strip()
    looks_hex = len(text) % 2 == 0 and all(chr(c) in "0123456789abcdefABCDEF" for c in text)
    if text and looks_hex:
        assert key_from_file(raw) == bytes.fromhex(text.decode())
    else:
        assert key_from_file(raw) == raw


def test_the_agent_reads_a_raw_key_whole(tmp_path: Path) -> None:
    key = b"\x20" + bytes(range(1, 31)) + b"\x0b"  # ends that .strip() would eat
    (tmp_path / "hash.key").write_bytes(key)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        '[device]\nid = "cr-0101"\nschool_id = "s001"\nkind = "card_reader"\n'
        '[mqtt]\nurl = "mqtt://127.0.0.1:1883"\n[privacy]\nhash_key_file = "hash.key"\n'
    )
    assert load_config(cfg).hash_key == key


def test_the_agent_refuses_an_empty_key_file(tmp_path: Path) -> None:
    (tmp_path / "hash.key").write_bytes(b"")
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        '[device]\nid = "cr-0101"\nschool_id = "s001"\nkind = "card_reader"\n'
        '[mqtt]\nurl = "mqtt://127.0.0.1:1883"\n[privacy]\nhash_key_file = "hash.key"\n'
    )
    with pytest.raises(ConfigError, match="empty"):
        load_config(cfg)
