"""What a remote config may set in driver tables: every refused form, with its message."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from device_drivers.base import BUILTIN_TYPES
from device_drivers.board_os import BoardOsOptions
from device_drivers.camera import CameraOptions
from device_drivers.em4100 import Em4100Options
from device_drivers.gate import GateOptions, ThermometerOptions
from device_drivers.library import LibraryOptions, PadOptions, ScannerOptions
from device_drivers.modbus_env import ModbusEnvOptions
from device_drivers.onvif import OnvifOptions
from device_drivers.panel import PanelOptions
from device_drivers.pcsc import PcscOptions
from device_drivers.recorder import RecorderOptions
from device_drivers.signage import SignageOptions
from device_drivers.synthetic import SyntheticOptions
from device_drivers.wiegand import WiegandOptions
from edge_agent.config import ConfigError, apply_remote, load_config
from edge_agent.remote_policy import POLICY, serial_port_problem

LOCAL = """
[device]
id = "gw-0101"
school_id = "s001"
kind = "gateway"
[mqtt]
url = "mqtt://127.0.0.1:1883"
[remote]
camera_sources = ["rtsp://cam-203.school.lan/stream1", 1]
modbus_hosts = ["Env-203.school.lan"]
screens = ["127.0.0.1:7010"]
[[drivers]]
type = "em4100"
name = "door"
port = "socket://127.0.0.1:7001"
[[drivers]]
type = "camera"
name = "cam"
source = "/srv/demo/classroom.mp4"
[[drivers]]
type = "board_os"
name = "board"
path = "/var/log/board/activity.log"
"""
URL_WHY = "a URL: serial ports set remotely are device nodes or usb:VID:PID[:SERIAL]"
NODE_WHY = "not a serial device node: a remote config may name /dev/tty…"


@pytest.fixture
def base(tmp_path: Path) -> Any:
    path = tmp_path / "agent.toml"
    path.write_text(LOCAL)
    return load_config(path)


def em4100(port: object, name: str = "door") -> dict[str, object]:
    return {"drivers": [{"type": "em4100", "name": name, "port": port}]}


@pytest.mark.parametrize(
    ("managed", "words"),
    [
        (
            em4100("spy:///dev/ttyUSB0?file=/tmp/x"),
            f"config.drivers[0] (door).port: 'spy:///dev/ttyUSB0?file=/tmp/x' may not be set "
            f"remotely: {URL_WHY}",
        ),
        (em4100("loop://"), URL_WHY),
        (em4100("socket://10.0.0.9:4001"), URL_WHY),
        (em4100("rfc2217://10.0.0.9:4001"), URL_WHY),
        (em4100("hwgrep://0403"), URL_WHY),
        (em4100("tcp://10.0.0.9:4001"), URL_WHY),
        (em4100("/etc/shadow"), f"'/etc/shadow' may not be set remotely: {NODE_WHY}"),
        (em4100("/dev/../etc/shadow"), NODE_WHY),
        (em4100("/dev/serial/by-id/.."), NODE_WHY),
        (em4100("/dev/shm/x"), NODE_WHY),
        (em4100("/dev/sda"), NODE_WHY),
        (em4100("relative/tty"), NODE_WHY),
        (em4100("COM3"), "'COM3' may not be set remotely: COM ports exist only on Windows"),
        (em4100("usb:xyz:1"), "'usb:xyz:1': VID and PID are hex numbers"),
        (em4100("usb:0403"), "'usb:0403' is not usb:VID:PID[:SERIAL]"),
        (
            {"drivers": [{"type": "wiegand", "name": "w", "port": "spy://x?file=/tmp/y"}]},
            f"config.drivers[0] (w).port: 'spy://x?file=/tmp/y' may not be set remotely: {URL_WHY}",
        ),
        (
            {"drivers": [{"type": "modbus_env", "name": "env", "port": "loop://"}]},
            f"config.drivers[0] (env).port: 'loop://' may not be set remotely: {URL_WHY}",
        ),
        (
            {"drivers": [{"type": "library_terminal", "name": "lib", "scanner": {"port": "x"}}]},
            f"config.drivers[0] (lib).scanner.port: 'x' may not be set remotely: {NODE_WHY}",
        ),
        (
            {"drivers": [{"type": "gate", "name": "g", "cards": [{"type": "wiegand", "port": "loop://"}]}]},
            f"config.drivers[0] (g).cards[0].port: 'loop://' may not be set remotely: {URL_WHY}",
        ),
        (
            {"drivers": [{"type": "camera", "name": "cam", "source": "rtsp://10.9.9.9/x"}]},
            "config.drivers[0] (cam).source: 'rtsp://10.9.9.9/x' may not be set remotely: not in "
            "[remote] camera_sources of the local config (nor a source it uses itself)",
        ),
        (
            {"drivers": [{"type": "camera", "name": "cam", "source": "/etc/passwd"}]},
            "(cam).source: '/etc/passwd' may not be set remotely: not in [remote] camera_sources",
        ),
        (
            {"drivers": [{"type": "camera", "name": "cam", "source": 0}]},
            "(cam).source: 0 may not be set remotely: not in [remote] camera_sources",
        ),
        (
            {"drivers": [{"type": "modbus_env", "name": "env", "host": "10.0.0.66"}]},
            "config.drivers[0] (env).host: '10.0.0.66' may not be set remotely: not in [remote] "
            "modbus_hosts of the local config",
        ),
        (
            {"drivers": [{"type": "gate", "name": "g", "cards": [{"type": "pcsc"}],
                          "thermometer": {"host": "evil.example"}}]},
            "config.drivers[0] (g).thermometer.host: 'evil.example' may not be set remotely: not "
            "in [remote] modbus_hosts",
        ),
        (
            {"drivers": [{"type": "signage", "name": "sign", "screen": "10.0.0.7:80"}]},
            "config.drivers[0] (sign).screen: '10.0.0.7:80' may not be set remotely: not in "
            "[remote] screens",
        ),
        (
            {"drivers": [{"type": "board_os", "name": "board", "path": "/etc/shadow"}]},
            "config.drivers[0] (board).path: '/etc/shadow' may not be set remotely: only the local "
            "config file may set it (a file path or a pattern)",
        ),
        (
            {"drivers": [{"type": "library_terminal", "name": "lib",
                          "scanner": {"port": "/dev/ttyACM0", "item_pattern": "(a+)+$"}}]},
            "config.drivers[0] (lib).scanner.item_pattern: '(a+)+$' may not be set remotely: only "
            "the local config file may set it",
        ),
        (
            {"drivers": [{"type": "panel", "name": "board", "port": "/dev/ttyUSB0",
                          "profile": "/tmp/evil.toml"}]},
            "config.drivers[0] (board).profile: '/tmp/evil.toml' may not be set remotely: a remote "
            "config may name only a shipped profile (",
        ),
        (
            {"drivers": [{"type": "synthetic", "name": "s", "log_file": "/tmp/x"}]},
            "config.drivers[0] (s).log_file: '/tmp/x' may not be set remotely: not an option a "
            "remote config may change for a synthetic driver",
        ),
        (
            {"drivers": [{"type": "vendor_plugin", "name": "p", "path": "/tmp/x"}]},
            "config.drivers[0] (p).path: '/tmp/x' may not be set remotely: driver type "
            "'vendor_plugin' has no remote-config policy",
        ),
        (
            {"drivers": [{"type": "gate", "name": "g", "cards": [
                {"type": "gate", "cards": [{"type": "gate", "cards": [
                    {"type": "gate", "cards": [{"type": "pcsc"}]}]}]}]}]},
            "config.drivers[0] (g).cards[0].cards[0].cards[0].cards: card readers nested more "
            "than 3 deep",
        ),
    ],
)  # fmt: skip
def test_each_refused_form_is_named_with_why(
    base: Any, managed: dict[str, Any], words: str
) -> None:
    with pytest.raises(ConfigError) as err:
        apply_remote(base, managed)
    assert words in str(err.value)
    assert str(err.value).startswith("config.drivers[0] (")


@pytest.mark.parametrize(
    "managed",
    [
        em4100("/dev/ttyUSB0"),
        em4100("/dev/ttyACM1"),
        em4100("/dev/ttyS0"),
        em4100("/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A10KZP3C-if00-port0"),
        em4100("/dev/serial/by-path/pci-0000:00:14.0-usb-0:2:1.0-port0"),
        em4100("usb:0403:6001"),
        em4100("usb:0403:6001:A10KZP3C"),
        # the local config's own port stays allowed, in its driver or another one
        em4100("socket://127.0.0.1:7001"),
        em4100("socket://127.0.0.1:7001", name="door2"),
        {"drivers": [{"type": "camera", "name": "cam", "source": "rtsp://cam-203.school.lan/stream1"}]},
        {"drivers": [{"type": "camera", "name": "cam", "source": 1}]},
        {"drivers": [{"type": "camera", "name": "cam2", "source": "/srv/demo/classroom.mp4"}]},
        {"drivers": [{"type": "camera", "name": "cam", "source": "/srv/demo/classroom.mp4",
                      "loop": True}]},
        {"drivers": [{"type": "modbus_env", "name": "env", "host": "env-203.school.lan",
                      "port": 502}]},
        {"drivers": [{"type": "modbus_env", "name": "env", "port": "/dev/ttyUSB1", "unit": 3}]},
        {"drivers": [{"type": "signage", "name": "sign", "screen": "127.0.0.1:7010"}]},
        # a file path passes only unchanged, as the local config gives it
        {"drivers": [{"type": "board_os", "name": "board", "path": "/var/log/board/activity.log",
                      "from_start": True}]},
        {"drivers": [{"type": "gate", "name": "g", "cards": [
            {"type": "em4100", "port": "/dev/ttyUSB2", "direction": "out"}]}]},
        {"drivers": [{"type": "synthetic", "name": "s", "event_type": "card.tap", "rate": 5}]},
        {"drivers": [{"type": "panel", "name": "board", "port": "/dev/ttyUSB0",
                      "profile": "maxhub-v6"}]},
        {"drivers": [{"type": "wiegand", "name": "w", "port": "/dev/ttyUSB0",
                      "format": "decimal", "bits": 34}]},
    ],
)  # fmt: skip
def test_safe_forms_and_the_local_configs_own_values_pass(
    base: Any, managed: dict[str, Any]
) -> None:
    new = apply_remote(base, managed)
    assert [d.name for d in new.drivers] == [t["name"] for t in managed["drivers"]]


def test_the_local_tables_pass_unchanged_whatever_they_hold(base: Any) -> None:
    local = [{"type": d.type, "name": d.name, **d.options} for d in base.drivers]
    assert apply_remote(base, {"drivers": local}).drivers == base.drivers


def test_the_local_file_itself_may_use_any_form(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(LOCAL + '[[drivers]]\ntype = "wiegand"\nname = "w"\nport = "loop://"\n')
    assert load_config(path).drivers[-1].options["port"] == "loop://"


def test_com_ports_only_on_windows() -> None:
    assert serial_port_problem("COM3", windows=True) is None
    assert serial_port_problem("COM3", windows=False) == "COM ports exist only on Windows"
    assert serial_port_problem("/etc/x", windows=True) is not None


# The options struct of every built-in driver type: a new option must be classified in POLICY
# (until it is, a remote config may only repeat its local value).
OPTIONS: dict[str, list[tuple[tuple[str, ...], type[msgspec.Struct]]]] = {
    "synthetic": [((), SyntheticOptions)],
    "em4100": [((), Em4100Options)],
    "wiegand": [((), WiegandOptions)],
    "panel": [((), PanelOptions)],
    "recorder": [((), RecorderOptions)],
    "board_os": [((), BoardOsOptions)],
    "camera": [((), CameraOptions)],
    "modbus_env": [((), ModbusEnvOptions)],
    "gate": [((), GateOptions), (("thermometer",), ThermometerOptions)],
    "pcsc": [((), PcscOptions)],
    "signage": [((), SignageOptions)],
    "library_terminal": [
        ((), LibraryOptions),
        (("scanner",), ScannerOptions),
        (("pad",), PadOptions),
    ],
    "onvif": [((), OnvifOptions)],
}


def test_every_option_of_every_builtin_driver_is_classified() -> None:
    assert set(POLICY) == set(BUILTIN_TYPES) == set(OPTIONS)
    for kind, structs in OPTIONS.items():
        for path, struct in structs:
            spec: Any = POLICY[kind]
            for key in path:
                spec = spec[key]
            fields = {f.encode_name for f in msgspec.structs.fields(struct)}
            assert set(spec) == fields, f"{kind} {'.'.join(path)}: classify {fields ^ set(spec)}"


def test_an_onvif_cameras_address_and_account_are_local_only(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        LOCAL + '[[drivers]]\ntype = "onvif"\nname = "gate-cam"\nhost = "10.1.2.3"\n'
        'username = "campus"\npassword = "pw-local"\n'
    )
    base = load_config(path)
    local = {"type": "onvif", "name": "gate-cam", "host": "10.1.2.3", "username": "campus",
             "password": "pw-local"}  # fmt: skip
    # plain options change remotely; the local address and account pass unchanged
    assert (
        apply_remote(base, {"drivers": [{**local, "report_s": 30}]}).drivers[0].options["report_s"]
        == 30
    )
    for key, value in (("host", "203.0.113.9"), ("port", 8080), ("password", "x"),
                       ("username", "root")):  # fmt: skip
        with pytest.raises(ConfigError) as err:
            apply_remote(base, {"drivers": [{**local, key: value}]})
        assert key in str(err.value)
        assert "pw-local" not in str(err.value)
