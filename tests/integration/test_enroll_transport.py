"""``edge-agent enroll`` sends its code and receives secrets only over TLS, or to this machine."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import trustme

from edge_agent.cli import main
from edge_agent.enroll import EnrollError, check_server
from tests.agent_server import KEY_HEX, _Enrolment

pytestmark = pytest.mark.integration
ANSWER = {
    "device_id": "cr-0101",
    "school_id": "s001",
    "mqtt_url": "mqtt://127.0.0.1:1883",
    "mqtt_username": "cr-0101",
    "mqtt_password": "pw-" + "x" * 29,
    "hash_key_hex": KEY_HEX,
}


def _outward_address() -> str:
    """This machine's address on its default route (no packet is sent), or skip."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.123", 9))
        except OSError:
            pytest.skip("no network interface besides loopback here")
        address = str(s.getsockname()[0])
    if address.startswith("127."):
        pytest.skip("no network interface besides loopback here")
    return address


@contextmanager
def serving(
    host: str, context: ssl.SSLContext | None = None
) -> Iterator[tuple[type[_Enrolment], int]]:
    handler: type[_Enrolment] = type("Handler", (_Enrolment,), {"answers": [], "requests": []})
    httpd = ThreadingHTTPServer((host, 0), handler)
    if context is not None:
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield handler, httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def enroll_args(url: str, config: Path, *extra: str) -> list[str]:
    return ["enroll", "--server", url, "--code", "ABCD", "--config", str(config), *extra]


def test_http_to_another_machine_is_refused_without_contacting_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = _outward_address()
    with serving(host) as (handler, port):
        handler.answers.append((201, ANSWER))
        url = f"http://{host}:{port}"
        config = tmp_path / "agent.toml"
        assert main(enroll_args(url, config)) == 1
        err = capsys.readouterr().err
        assert "refusing plain http:// to another machine" in err
        assert "MQTT password and the district hashing key" in err
        assert "--insecure" in err
        assert handler.requests == []  # nothing was sent: not the code, not a connection
        assert not config.exists()

        assert main(enroll_args(url, config, "--insecure")) == 0  # the same server, on request
        assert [r["code"] for r in handler.requests] == ["ABCD"]
        assert config.exists()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_http_to_loopback_is_allowed(tmp_path: Path, host: str) -> None:
    with serving("127.0.0.1") as (handler, port):
        handler.answers.append((201, ANSWER))
        url = f"http://{host}:{port}/"
        assert main(enroll_args(url, tmp_path / "agent.toml")) == 0
        assert len(handler.requests) == 1


def test_https_verifies_the_server_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca_file = tmp_path / "district-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    config = tmp_path / "agent.toml"
    with serving("127.0.0.1", context) as (handler, port):
        handler.answers.append((201, ANSWER))
        url = f"https://127.0.0.1:{port}"
        assert main(enroll_args(url, config)) == 1  # a private CA the system does not trust
        err = capsys.readouterr().err
        assert "CERTIFICATE_VERIFY_FAILED" in err
        assert "pass its certificate with --ca FILE" in err
        assert not config.exists()

        assert main(enroll_args(url, config, "--ca", str(ca_file))) == 0
        assert len(handler.requests) == 1
        assert config.exists()

    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    with serving("127.0.0.1", context) as (handler, port):
        handler.answers.append((201, ANSWER))
        url = f"https://127.0.0.1:{port}"
        args = enroll_args(url, tmp_path / "b.toml", "--ca", str(other))
        assert main(args) == 1  # signed by another CA than the one given
        assert "CERTIFICATE_VERIFY_FAILED" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("server", "words"),
    [
        ("http://192.0.2.10:8080", "refusing plain http:// to another machine"),
        ("http://ingest.district.lan", "refusing plain http:// to another machine"),
        ("http://127.0.0.1.evil.example", "refusing plain http:// to another machine"),
        ("ftp://ingest", "expected an https:// URL"),
        ("ingest:8080", "expected an https:// URL"),
        ("https://user:pw@ingest", "expected https://HOST[:PORT][/PATH]"),
    ],
)
def test_server_urls_that_are_refused(server: str, words: str) -> None:
    with pytest.raises(EnrollError, match=words.replace("[", r"\[").replace("]", r"\]")):
        check_server(server)


def test_server_urls_that_pass() -> None:
    assert check_server("https://ingest:8080/") == "https://ingest:8080/api/v1/enrol"
    assert check_server("http://[::1]:8080").endswith("/api/v1/enrol")
    assert check_server("http://127.3.0.1:8080").endswith("/api/v1/enrol")
    assert check_server("http://ingest:8080", insecure=True).endswith("/api/v1/enrol")
    with pytest.raises(EnrollError, match="--ca: only used with an https:// server"):
        check_server("http://127.0.0.1:8080", ca_file=Path("ca.pem"))
