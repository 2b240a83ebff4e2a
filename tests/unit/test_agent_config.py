"""The agent's config file: defaults, resolution, and an error naming the key for each mistake."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edge_agent.cli import main
from edge_agent.config import ConfigError, apply_remote, load_config
from edge_agent.outbox import Outbox
from schemas.events import BoardPower, DeviceKind
from schemas.reading import Reading
from tests.agent_helpers import MINIMAL

ROOT = Path(__file__).resolve().parents[2]
KEY_HEX = "00112233445566778899aabbccddeeff"


def write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_minimal_config_takes_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.device.kind is DeviceKind.CARD_READER
    assert cfg.outbox_path == Path("/var/lib/campus-edge/outbox.db")
    b = cfg.broker
    assert (b.host, b.port, b.tls, b.protocol) == ("127.0.0.1", 1883, False, "5")
    assert (b.client_id, b.keepalive_s, b.username, b.password) == ("agent-cr-0101", 30, None, None)
    p = cfg.publish
    assert (p.max_batch_events, p.max_batch_bytes, p.inflight, p.linger_ms) == (500, 65536, 8, 20)
    assert p.replay_rate == 5000
    assert cfg.hash_key is None
    assert not cfg.send_raw_uid
    assert cfg.drivers == ()


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not really a certificate")
    (tmp_path / "mqtt.pw").write_text("pw-from-file\n")
    text = MINIMAL.replace("mqtt://127.0.0.1:1883", "mqtts://broker.example:8884")
    text += 'ca_file = "ca.pem"\npassword_file = "mqtt.pw"\nusername = "cr-0101"\n'
    text += '[outbox]\npath = "data/outbox.db"\n'
    cfg = load_config(write(tmp_path, text))
    assert cfg.outbox_path == tmp_path / "data/outbox.db"
    assert cfg.broker.ca_file == tmp_path / "ca.pem"
    assert (cfg.broker.host, cfg.broker.port, cfg.broker.tls) == ("broker.example", 8884, True)
    assert (cfg.broker.username, cfg.broker.password) == ("cr-0101", "pw-from-file")


def test_the_url_may_name_the_protocol(tmp_path: Path) -> None:
    text = MINIMAL.replace(":1883", ":1883?protocol=3.1.1")
    assert load_config(write(tmp_path, text)).broker.protocol == "3.1.1"
    text += 'protocol = "3.1.1"\n'  # saying it twice, the same way, is fine
    assert load_config(write(tmp_path, text)).broker.protocol == "3.1.1"


def test_credentials_in_the_url(tmp_path: Path) -> None:
    text = MINIMAL.replace("mqtt://", "mqtts://dev%40x:p%3Ass@").replace(":1883", "")
    cfg = load_config(write(tmp_path, text))
    assert (cfg.broker.username, cfg.broker.password, cfg.broker.port) == ("dev@x", "p:ss", 8883)


def test_drivers_keep_their_own_options(tmp_path: Path) -> None:
    text = MINIMAL + '[[drivers]]\ntype = "synthetic"\nname = "gen"\nrate = 5\n'
    text += '[[drivers]]\ntype = "synthetic"\n'
    cfg = load_config(write(tmp_path, text))
    assert [(d.type, d.name, dict(d.options)) for d in cfg.drivers] == [
        ("synthetic", "gen", {"rate": 5}),
        ("synthetic", "synthetic", {}),
    ]


@pytest.mark.parametrize(
    ("key_text", "key"),
    [
        (KEY_HEX + "\n", bytes.fromhex(KEY_HEX)),
        ("a raw key of more than sixteen bytes", b"a raw key of more than sixteen bytes"),
    ],
)
def test_hash_key_file_holds_hex_or_raw_bytes(tmp_path: Path, key_text: str, key: bytes) -> None:
    (tmp_path / "district.key").write_text(key_text)
    cfg = load_config(write(tmp_path, MINIMAL + '[privacy]\nhash_key_file = "district.key"\n'))
    assert cfg.hash_key == key


def test_secrets_never_show_in_repr(tmp_path: Path) -> None:
    text = MINIMAL.replace("mqtt://", "mqtt://user:url-secret@")
    text += f'[privacy]\nhash_key_hex = "{KEY_HEX}"\n'
    cfg = load_config(write(tmp_path, text))
    assert cfg.broker.password == "url-secret"
    for shown in (repr(cfg), str(cfg), repr(cfg.broker)):
        assert "url-secret" not in shown
        assert KEY_HEX not in shown
        assert "\\x00" not in shown


def test_a_literal_password_never_shows_in_repr(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL + 'password = "literal-secret"\n'))
    assert "literal-secret" not in repr(cfg)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("cr-0101", "CR 0101"), "device.id: expected `str` matching regex"),
        (('school_id = "s001"', 'school_id = ""'), "device.school_id: expected `str` matching"),
        (("card_reader", "toaster"), "device.kind: invalid enum value 'toaster' (expected one of"),
        (('kind = "card_reader"\n', ""), "device.kind: required but missing"),
        (('id = "cr-0101"', 'id = "cr-0101"\ncolour = "red"'), "device.colour: unknown key"),
        (("mqtt://127", "http://127"), "mqtt.url: expected mqtt://HOST[:PORT] or mqtts://"),
        (("1883", "18x3"), "mqtt.url: the port is not a number"),
        (("1883", "1883/extra"), "mqtt.url: expected mqtt://HOST[:PORT][?protocol=5|3.1.1]"),
        (("1883", "1883?qos=2"), "mqtt.url: expected mqtt://HOST[:PORT][?protocol=5|3.1.1]"),
        (("1883", "1883?protocol=4"), "mqtt.protocol: expected one of"),
        (('1883"', '1883?protocol=5"\nprotocol = "3.1.1"'), "mqtt.protocol: expected one of"),
        (('[mqtt]\nurl = "mqtt://127.0.0.1:1883"', "[mqtt]"), "mqtt.url: required but missing"),
        (('1883"', '1883"\nprotocol = "4"'), "mqtt.protocol: invalid enum value '4'"),
        (('1883"', '1883"\nprotocol = 5'), "mqtt.protocol: expected `str | null`, got `int`"),
        (('1883"', '1883"\nkeepalive_s = 0'), "mqtt.keepalive_s: expected `int` >= 5"),
        (('1883"', '1883"\nca_file = "ca.pem"'), "mqtt.ca_file: only used with an mqtts://"),
        (('1883"', '1883"\npassword_file = "none"'), "mqtt.password_file: cannot read"),
        (("mqtt://", "mqtt://u:p@"), None),  # valid: the sanity case of this table
        (('1883"', '1883"\n[publish]\ninflight = 0'), "publish.inflight: expected `int` >= 1"),
        (
            ('1883"', '1883"\n[publish]\nmax_batch_bytes = 1000000'),
            "publish.max_batch_bytes: expected `int` <= 262144",
        ),
        (('1883"', '1883"\n[publish]\nlinger_ms = "20"'), "publish.linger_ms: expected `int`"),
        (('1883"', '1883"\n[publish]\nreplay_rate = -1'), "publish.replay_rate: expected `int`"),
        (
            ('1883"', '1883"\n[publish]\nbackoff_initial_s = 5\nbackoff_max_s = 1'),
            "publish.backoff_max_s: must not be below publish.backoff_initial_s",
        ),
        (('1883"', '1883"\n[publish]\nlinger = 1'), "publish.linger: unknown key"),
        (('1883"', '1883"\n[privacy]\nhash_key_hex = "zz"'), "privacy.hash_key_hex: expected hex"),
        (('1883"', '1883"\n[privacy]\nhash_key_hex = "0011"'), "privacy.hash_key_hex: the key"),
        (('1883"', '1883"\n[privacy]\nhash_key_file = "nope"'), "privacy.hash_key_file: cannot"),
        (('1883"', '1883"\n[privacy]\nsend_raw_uid = "yes"'), "privacy.send_raw_uid: expected"),
        (('1883"', '1883"\n[[drivers]]\nname = "x"'), "drivers[0].type: required"),
        (('1883"', '1883"\n[[drivers]]\ntype = "a"\nname = 3'), "drivers[0].name: expected a"),
        (
            ('1883"', '1883"\n[[drivers]]\ntype = "a"\n[[drivers]]\ntype = "a"'),
            "drivers[1].name: 'a' is used by another driver",
        ),
        (('1883"', '1883"\n[mqttt]\nx = 1'), "mqttt: unknown key (known here: device, mqtt,"),
        (("[device]", "[device"), "not valid TOML: "),
    ],
)
def test_each_mistake_is_named(
    tmp_path: Path, change: tuple[str, str], expected: str | None
) -> None:
    old, new = change
    assert old in MINIMAL
    path = write(tmp_path, MINIMAL.replace(old, new, 1))
    if expected is None:
        load_config(path)
        return
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "\n" not in message


def test_password_given_twice_is_refused(tmp_path: Path) -> None:
    text = MINIMAL.replace("mqtt://", "mqtt://u:one@") + 'password = "two"\n'
    with pytest.raises(ConfigError, match=r"mqtt\.password: give the password once") as err:
        load_config(write(tmp_path, text))
    assert "one" not in str(err.value).replace("once", "")


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "absent.toml")


def test_shipped_examples_load(tmp_path: Path) -> None:
    examples = sorted((ROOT / "deploy/examples").glob("*.toml"))
    assert any(p.name == "agent-synthetic.toml" for p in examples)
    (tmp_path / "district.key").write_text(KEY_HEX)
    for example in examples:
        copy = tmp_path / example.name
        shutil.copy(example, copy)
        cfg = load_config(copy)
        assert cfg.drivers, example.name
        assert cfg.outbox_path.parent == tmp_path


def test_cli_refuses_a_bad_config_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, MINIMAL.replace("card_reader", "toaster"))
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"edge-agent: {path}: device.kind: invalid enum value 'toaster'")


def test_cli_refuses_bad_driver_options_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = MINIMAL + '[outbox]\npath = "o.db"\n[[drivers]]\ntype = "synthetic"\nrate = "x"\n'
    assert main(["run", "--config", str(write(tmp_path, text))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "drivers[0] (synthetic): driver 'synthetic': Expected `float`, got `str`" in err


def test_cli_status_reads_the_outbox(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, MINIMAL + '[outbox]\npath = "o.db"\n')
    assert main(["status", "--config", str(path)]) == 1
    assert "no outbox at" in capsys.readouterr().err
    with Outbox(tmp_path / "o.db") as ob:
        ob.next_boot()
        ob.append_many([Reading("board.power", BoardPower(state="on"))] * 3)
        ob.delete([1])
    assert main(["status", "--config", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["oldest_unsent_s"] >= 0
    assert doc | {"oldest_unsent_s": 0} == {
        "device_id": "cr-0101",
        "outbox": str(tmp_path / "o.db"),
        "depth": 2,
        "oldest_unsent_s": 0,
        "highest_seq": 3,
        "boot": 1,
        "dropped": {},
        "config_version": None,
        "clock_offset_s": None,
    }
    assert main(["status", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "unsent events   2" in out
    assert "clock offset    - (no [clock] reference in the config)" in out
    assert "highest seq     3" in out


@pytest.mark.parametrize(
    ("managed", "words"),
    [
        (
            {"mqtt": {"url": "mqtt://x"}},
            "config.mqtt: may not be set remotely, only in the local config file (a remote config "
            "may set here: drivers, publish, health, outbox)",
        ),
        ({"privacy": {}}, "config.privacy: may not be set remotely"),
        ({"remote": {"camera_sources": ["rtsp://x"]}}, "config.remote: may not be set remotely"),
        ({"clock": {"reference": "ntp://x"}}, "config.clock: may not be set remotely"),
        ({"colour": 1}, "config.colour: unknown key (known here: drivers, publish"),
        ({"publish": {"inflight": 0}}, "config.publish.inflight: expected `int` >= 1"),
        (
            {"outbox": {"path": "/tmp/x"}},
            "config.outbox.path: may not be set remotely, only in the local config file (a "
            "remote config may set here: max_bytes, max_events)",
        ),
        ({"outbox": {"max_events": 1}}, "config.outbox.max_events: expected `int` >= 10"),
        ({"drivers": [{"name": "x"}]}, "config.drivers[0].type: required"),
        ({"drivers": {}}, "config.drivers: expected `array | null`, got `object`"),
        (
            {"publish": {"backoff_initial_s": 2, "backoff_max_s": 1}},
            "config.publish.backoff_max_s: must not be below",
        ),
    ],
)
def test_remote_sections_are_checked_like_the_file(
    tmp_path: Path, managed: dict[str, object], words: str
) -> None:
    base = load_config(write(tmp_path, MINIMAL))
    with pytest.raises(ConfigError) as err:
        apply_remote(base, managed)
    assert str(err.value).startswith(words)


def test_remote_sections_replace_only_what_they_name(tmp_path: Path) -> None:
    text = MINIMAL + '[outbox]\nmax_bytes = 100000\n[[drivers]]\ntype = "synthetic"\nname = "a"\n'
    base = load_config(write(tmp_path, text))
    new = apply_remote(base, {"health": {"interval_s": 5}, "outbox": {"max_events": 50}})
    assert new.drivers == base.drivers
    assert new.broker == base.broker
    assert new.health.interval_s == 5
    assert (new.outbox_quota.max_events, new.outbox_quota.max_bytes) == (50, None)
    assert apply_remote(base, {"drivers": []}).drivers == ()
