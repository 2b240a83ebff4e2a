"""The HTTP API over TLS: a real uvicorn with a certificate made at run time (trustme), verified
against the test CA; plain HTTP refused on that port; bad certificate files stop the start."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from ingest_server import cli
from ingest_server.ingest.consumer import Health
from ingest_server.metrics import IngestMetrics
from ingest_server.settings import Settings, SettingsError
from ingest_server.web.app import HttpServer, create_app
from ingest_server.web.tls import TlsFiles
from simulators.harness import Mosquitto, wait_until
from simulators.harness_pipeline import IngestServer

pytestmark = pytest.mark.integration


class _Healthy:
    def health(self) -> Health:
        return Health(mqtt_connected=True, db_ok=True, queued=0, last_commit_age_s=0.0)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    d = tmp_path_factory.mktemp("tls")
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.cert_chain_pems[0].write_to_path(str(d / "server.crt"))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(d / "server.crt"), append=True)
    cert.private_key_pem.write_to_path(str(d / "server.key"))
    os.chmod(d / "server.key", 0o600)
    return TlsFiles(d / "server.crt", d / "server.key")


def _client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()  # verifies the chain and the host name
    ca.configure_trust(ctx)
    return ctx


def _https_get(port: int, ctx: ssl.SSLContext, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=ctx)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.fixture
def server(files: TlsFiles, ca: trustme.CA) -> Iterator[HttpServer]:
    srv = HttpServer(create_app(_Healthy(), IngestMetrics()), "127.0.0.1", 0, files)
    srv.start()
    ctx = _client_context(ca)

    def up() -> bool:
        try:
            return _https_get(srv.port, ctx, "/healthz")[0] == 200
        except OSError:
            return False

    try:
        wait_until(up, 10, "the HTTPS server")
        yield srv
    finally:
        srv.stop()


def test_healthz_over_https_verified_against_the_test_ca(
    server: HttpServer, ca: trustme.CA
) -> None:
    assert server.url.startswith("https://127.0.0.1:")
    ctx = _client_context(ca)
    status, body = _https_get(server.port, ctx, "/healthz")
    assert status == 200
    assert json.loads(body)["status"] == "ok"
    # the whole app is on TLS: the dashboard and the docs too
    assert _https_get(server.port, ctx, "/dashboard/")[0] == 200
    assert _https_get(server.port, ctx, "/docs")[0] == 200
    # a client that does not trust the CA is refused by its own verification
    with pytest.raises(ssl.SSLCertVerificationError):
        _https_get(server.port, ssl.create_default_context(), "/healthz")


def test_plain_http_on_the_tls_port_gets_no_http_answer(server: HttpServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", "/healthz")
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            conn.getresponse().read()
    finally:
        conn.close()


def test_tls_below_1_2_is_refused(server: HttpServer, ca: trustme.CA) -> None:
    # Set by us, not left to the system's OpenSSL configuration (Debian's refuses 1.1 anyway).
    served = server._server.config.ssl
    assert served is not None
    assert served.minimum_version == ssl.TLSVersion.TLSv1_2
    ctx = _client_context(ca)
    with warnings.catch_warnings():  # TLS 1.1 is deprecated: that is the point here
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # so the client would offer it if the server took it
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _https_get(server.port, ctx, "/healthz")
    # and TLS 1.2 alone is enough
    ctx12 = _client_context(ca)
    ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
    assert _https_get(server.port, ctx12, "/healthz")[0] == 200


def test_bad_certificate_files_are_named(files: TlsFiles, ca: trustme.CA, tmp_path: Path) -> None:
    def error(**kw: Path | None) -> str:
        with pytest.raises(SettingsError) as info:
            Settings(**kw)  # type: ignore[arg-type]
        return str(info.value)

    assert "go together" in error(tls_cert=files.cert)
    assert "go together" in error(tls_key=files.key)
    missing = tmp_path / "nope.crt"
    assert f"--tls-cert {missing}: cannot read it" in error(tls_cert=missing, tls_key=files.key)
    assert "--tls-key" in error(tls_cert=files.cert, tls_key=tmp_path / "nope.key")
    other = tmp_path / "other.key"
    ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(other))
    msg = error(tls_cert=files.cert, tls_key=other)
    assert f"--tls-key {other} is not the key of the certificate in --tls-cert {files.cert}" == msg
    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(files.key.read_bytes(), None)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    # refused with a message, not a passphrase prompt on the terminal
    assert "the key is encrypted" in error(tls_cert=files.cert, tls_key=encrypted)
    assert "no PEM certificate" in error(tls_cert=files.key, tls_key=files.key)
    assert "no PEM private key" in error(tls_cert=files.cert, tls_key=files.cert)
    # the happy pair passes
    assert Settings(tls_cert=files.cert, tls_key=files.key).tls() == files


def test_cli_refuses_a_mismatched_pair_before_starting(
    files: TlsFiles, ca: trustme.CA, tmp_path: Path
) -> None:
    other = tmp_path / "other.key"
    ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(other))
    env = {**os.environ, cli.TLS_CERT_ENV: str(files.cert), cli.TLS_KEY_ENV: str(other)}
    done = subprocess.run(
        [sys.executable, "-m", "ingest_server", "run", "--data-dir", str(tmp_path / "d")],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "is not the key of the certificate" in done.stderr
    assert not (tmp_path / "d").exists()  # nothing was started


def test_ingest_server_process_serves_https(
    files: TlsFiles, ca: trustme.CA, mosquitto: Mosquitto, db_url: str, tmp_path: Path
) -> None:
    """``ingest-server run --tls-cert --tls-key`` end to end: a real process, broker, database."""
    proc = IngestServer(
        tmp_path, mosquitto.url, db_url, "--tls-cert", str(files.cert), "--tls-key", str(files.key)
    )
    proc.start()
    ctx = _client_context(ca)

    def healthy() -> bool:
        if not proc.running:
            raise RuntimeError(f"ingest server exited:\n{proc.tail()}")
        try:
            return _https_get(proc.http_port, ctx, "/healthz")[0] == 200
        except OSError:
            return False

    try:
        wait_until(healthy, 60, "ingest-server /healthz over https")
        status, body = _https_get(proc.http_port, ctx, "/healthz")
        assert (status, json.loads(body)["db"]) == (200, "ok")
        assert "https://127.0.0.1:" in proc.text()  # it says where it listens
    finally:
        proc.terminate()
