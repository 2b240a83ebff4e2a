"""``edge-agent doctor`` as a technician runs it: the real CLI, a real Mosquitto, a real pty."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from simulators.em4100 import Em4100Simulator
from simulators.harness import Mosquitto, free_port, port_open, shared_tmpdir, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

EDGE_AGENT = Path(sys.executable).parent / "edge-agent"


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = shared_tmpdir("campus-doctor-")
    (d / "district.key").write_text("00112233445566778899aabbccddeeff\n")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def reader(workdir: Path) -> Iterator[Em4100Simulator]:
    with Em4100Simulator(workdir / "ttyRFID") as sim:
        yield sim


@pytest.fixture
def healthz() -> Iterator[str]:
    """A stand-in ingest server: /healthz answers 200 with the usual ``Date`` header."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="healthz", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/healthz"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def write_config(workdir: Path, broker_url: str, drivers: str) -> Path:
    config = workdir / "agent.toml"
    config.write_text(
        f"""
[device]
id = "cr-0101"
school_id = "s001"
kind = "card_reader"
[outbox]
path = "outbox.db"
[mqtt]
url = "{broker_url}"
protocol = "5"
[privacy]
hash_key_file = "district.key"
{drivers}
"""
    )
    return config


def em4100(port: Path, extra: str = "") -> str:
    return f'[[drivers]]\ntype = "em4100"\nname = "door-1"\nport = "{port}"\n{extra}'


def doctor(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EDGE_AGENT), "doctor", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=45,
        check=False,
    )


def line(out: str, check: str) -> tuple[str, str]:
    """The status and message of one check in the text output."""
    found = re.search(rf"^(OK|WARN|FAIL)\s+{re.escape(check)}\s+(.*)$", out, re.MULTILINE)
    assert found, f"no {check!r} line in:\n{out}"
    return found.group(1), found.group(2)


def test_healthy_gateway_passes(
    workdir: Path, mosquitto: Mosquitto, reader: Em4100Simulator, healthz: str
) -> None:
    config = write_config(workdir, mosquitto.url, em4100(reader.link))
    result = doctor(config, "--server", healthz)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert line(out, "config")[0] == "OK"
    assert line(out, "broker.tcp")[0] == "OK"
    assert line(out, "broker.mqtt") == (
        "OK",
        f"MQTT 5 login anonymously accepted by mqtt://127.0.0.1:{mosquitto.port}",
    )
    assert line(out, "clock")[0] == "OK"
    assert line(out, "outbox.dir")[0] == "OK"
    status, serial = line(out, "hardware.serial")
    assert status == "OK"
    assert str(reader.link) in serial
    assert reader.pts_name is not None
    assert reader.pts_name in serial
    status, verdict = line(out, "driver door-1")
    assert status == "OK"
    assert str(reader.link) in verdict
    assert "FAIL" not in out


def test_broker_down_and_reader_unplugged_fail_plainly(
    workdir: Path, mosquitto: Mosquitto, reader: Em4100Simulator
) -> None:
    config = write_config(workdir, mosquitto.url, em4100(reader.link))
    mosquitto.stop()
    reader.unplug()
    result = doctor(config)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    status, message = line(out, "broker.tcp")
    assert status == "FAIL"
    assert f"cannot reach the broker at 127.0.0.1:{mosquitto.port}: connection refused" in message
    assert "is the broker running" in message
    assert "broker.mqtt" not in out  # no login is tried without a connection
    status, message = line(out, "driver door-1")
    assert status == "FAIL"
    assert "cannot open the reader" in message
    assert "plugged in" in message
    status, message = line(out, "hardware.serial")
    assert status == "WARN"
    assert f"configured but not present: {reader.link} (door-1)" in message
    assert "clock" in out
    assert "not checked (give --server URL" in line(out, "clock")[1]


def test_bad_driver_option_names_the_option(
    workdir: Path, mosquitto: Mosquitto, reader: Em4100Simulator
) -> None:
    config = write_config(workdir, mosquitto.url, em4100(reader.link, 'baudrate = "fast"\n'))
    result = doctor(config)
    assert result.returncode == 1, result.stdout + result.stderr
    status, message = line(result.stdout, "driver door-1")
    assert status == "FAIL"
    assert "baudrate" in message
    assert "fix [[drivers]] 'door-1'" in message
    assert line(result.stdout, "broker.mqtt")[0] == "OK"


def test_json_output_parses(workdir: Path, mosquitto: Mosquitto) -> None:
    gen = '[[drivers]]\ntype = "synthetic"\nname = "gen"\nevent_type = "env.reading"\n'
    config = write_config(workdir, mosquitto.url, gen)
    result = doctor(config, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    checks = json.loads(result.stdout)
    assert isinstance(checks, list)
    assert all(set(c) == {"check", "status", "message"} for c in checks)
    assert all(c["status"] in {"OK", "WARN", "FAIL"} for c in checks)
    by_name = {c["check"]: c for c in checks}
    assert by_name["broker.mqtt"]["status"] == "OK"
    assert by_name["driver gen"]["status"] == "OK"
    assert {"config", "clock", "outbox.disk", "hardware.pcsc", "hardware.cameras"} <= set(by_name)


def test_unusable_config_exits_2(workdir: Path) -> None:
    config = workdir / "agent.toml"
    config.write_text('[device]\nid = "cr-0101"\n')
    result = doctor(config, "--json")
    assert result.returncode == 2
    [check] = json.loads(result.stdout)
    assert check["check"] == "config"
    assert check["status"] == "FAIL"
    assert "required but missing" in check["message"]


def make_certs(d: Path, days: int) -> None:
    """A test CA and a broker certificate for 127.0.0.1 that expires in ``days``."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "365",
        "-subj",
        "/CN=campus-test-ca",
    )
    openssl(
        "req",
        *ec,
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
        "-addext",
        "subjectAltName=IP:127.0.0.1",
    )
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        str(days),
        "-copy_extensions",
        "copy",
        "-out",
        "server.pem",
    )


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_certificate_expiring_soon_warns(workdir: Path) -> None:
    make_certs(workdir, days=10)
    tls_port = free_port()
    broker = Mosquitto(
        workdir,
        extra_conf=f"listener {tls_port} 127.0.0.1\ncafile {workdir}/ca.pem\n"
        f"certfile {workdir}/server.pem\nkeyfile {workdir}/server.key\n",
    )
    broker.start()
    try:
        wait_until(lambda: port_open(tls_port), 10, "the TLS listener")
        config = write_config(workdir, f"mqtts://127.0.0.1:{tls_port}", "")
        text = config.read_text().replace('protocol = "5"', 'protocol = "5"\nca_file = "ca.pem"')
        config.write_text(text)
        result = doctor(config)
        assert result.returncode == 0, result.stdout + result.stderr
        status, message = line(result.stdout, "broker.tls")
        assert status == "WARN"
        assert "certificate valid against mqtt.ca_file" in message
        assert "(in 10 days)" in message or "(in 9 days)" in message
        assert line(result.stdout, "broker.mqtt")[0] == "OK"

        (workdir / "ca.pem").write_text((workdir / "server.pem").read_text())  # the wrong CA
        result = doctor(config)
        assert result.returncode == 1
        status, message = line(result.stdout, "broker.tls")
        assert status == "FAIL"
        assert "did not validate against mqtt.ca_file" in message
    finally:
        broker.kill()
