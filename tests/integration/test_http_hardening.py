"""The HTTP API's hardening on a real server: tokens in URLs refused but on the live stream,
security headers on the dashboard, the API and /docs, and /docs served without another host."""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest

from ingest_server.server import IngestServer
from ingest_server.web import api_docs
from ingest_server.web.headers import API_CSP, DASHBOARD_CSP
from ingest_server.web.http_protocol import MAX_HEAD_BYTES

pytestmark = pytest.mark.integration


@pytest.fixture
def server(api_server: IngestServer) -> IngestServer:
    return api_server


@pytest.fixture
def token(server: IngestServer) -> str:
    return server.settings.token_file.read_text().strip()


def get(
    server: IngestServer, path: str, headers: dict[str, str] | None = None, first_line: bool = False
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body (or only its first line, for a stream)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.http.port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.readline() if first_line else resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


QUERY_TOKENS = [  # (with a token in the URL, the same without)
    ("/api/v1/devices?access_token={t}", "/api/v1/devices"),
    ("/api/v1/devices?token={t}", "/api/v1/devices"),
    ("/metrics?access_token={t}", "/metrics"),
    ("/api/v1/tokens?limit=5&token={t}", "/api/v1/tokens?limit=5"),
    ("/api/v1/live?token={t}", "/api/v1/live"),
    ("/api/v1/live?access_token={t}&token={t}", "/api/v1/live"),
]


def test_tokens_in_the_query_string_are_refused(server: IngestServer, token: str) -> None:
    for path, clean in QUERY_TOKENS:
        # even alongside a valid header: the token has leaked into the URL already
        for headers in ({}, {"Authorization": f"Bearer {token}"}):
            status, hdrs, body = get(server, path.format(t=token), headers)
            assert status == 401, (path, body)
            assert b"not accepted in the query string" in body
            assert b"Authorization: Bearer" in body
            assert hdrs["www-authenticate"].startswith("Bearer")
        # the same request with the token in the header works
        status, _, _ = get(server, clean, {"Authorization": f"Bearer {token}"}, first_line=True)
        assert status == 200, clean


def test_the_live_stream_takes_access_token(server: IngestServer, token: str) -> None:
    status, hdrs, first = get(server, f"/api/v1/live?access_token={token}", first_line=True)
    assert status == 200
    assert hdrs["content-type"].startswith("text/event-stream")
    assert first == b": connected\n"
    # and only a valid one
    status, _, body = get(server, "/api/v1/live?access_token=cet_" + "x" * 43)
    assert status == 401
    assert b"not valid" in body


def test_security_headers(server: IngestServer, token: str) -> None:
    for path in ("/dashboard/", "/dashboard/app.mjs", "/dashboard/api.mjs"):
        status, hdrs, _ = get(server, path)
        assert status == 200, path
        assert hdrs["content-security-policy"] == DASHBOARD_CSP
        assert hdrs["x-frame-options"] == "DENY"
        assert hdrs["x-content-type-options"] == "nosniff"
        assert hdrs["referrer-policy"] == "no-referrer"
    policy = dict(d.strip().split(" ", 1) for d in DASHBOARD_CSP.split(";"))
    assert policy["default-src"] == "'self'"
    assert policy["script-src"] == "'self'"  # no inline script, no eval
    assert policy["frame-ancestors"] == "'none'"
    for path, auth in (("/api/v1/devices", True), ("/api/v1/devices", False), ("/healthz", False)):
        headers = {"Authorization": f"Bearer {token}"} if auth else {}
        status, hdrs, _ = get(server, path, headers)
        assert status in (200, 401, 503), path
        assert hdrs["content-security-policy"] == API_CSP
        assert "frame-ancestors 'none'" in API_CSP
        assert hdrs["x-content-type-options"] == "nosniff"
        assert hdrs["x-frame-options"] == "DENY"
    # the event stream gets them too (the middleware does not buffer it)
    status, hdrs, _ = get(
        server, "/api/v1/live", {"Authorization": f"Bearer {token}"}, first_line=True
    )
    assert status == 200
    assert hdrs["x-content-type-options"] == "nosniff"


def test_docs_load_only_same_origin_files(server: IngestServer) -> None:
    status, hdrs, body = get(server, "/docs")
    assert status == 200
    html = body.decode()
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    urls += re.findall(r"""url:\s*'([^']+)'""", html)
    assert len(urls) >= 4, urls  # the CSS, the icon, the bundle and the OpenAPI document
    base = server.http.url + "/docs"
    for url in urls:
        parts = urlsplit(urljoin(base, url))
        assert (parts.scheme, parts.netloc) == ("http", f"127.0.0.1:{server.http.port}"), url
        status, got, content = get(server, parts.path)
        assert status == 200, url
        assert content, url
        if parts.path.startswith(api_docs.ASSETS_PATH):
            assert got["content-type"].startswith(api_docs.ASSETS[Path(parts.path).name])
    assert not re.search(r"(?i)\b(?:https?:)?//(?!127\.0\.0\.1)", html)  # no other host at all
    # its policy: same-origin files, and the one inline start-up script by its hash
    csp = hdrs["content-security-policy"]
    assert "script-src 'self' 'sha256-" in csp
    assert "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    assert csp == api_docs.page_policy(body)
    # nothing of the package beyond the files the page uses
    assert get(server, api_docs.ASSETS_PATH + "/index.html")[0] == 404
    assert get(server, api_docs.ASSETS_PATH + "/..%2F__init__.py")[0] == 404


def _raw(server: IngestServer, data: bytes, chunk: int = 8192) -> bytes:
    """Send ``data`` in pieces (a client trickling a head) and read until the server closes."""
    with socket.create_connection(("127.0.0.1", server.http.port), timeout=10) as s:
        try:
            for i in range(0, len(data), chunk):
                s.sendall(data[i : i + chunk])
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused mid-way: the answer is already there to read
        got = b""
        with contextlib.suppress(ConnectionResetError):
            while piece := s.recv(65536):
                got += piece
        return got


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"GET /healthz?" + b"q" * (MAX_HEAD_BYTES + 1) + b" HTTP/1.1\r\n", id="url"),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\n"
            + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"v" * 1000) for i in range(80)),
            id="many-headers",
        ),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\nX-Big: " + b"v" * (4 * MAX_HEAD_BYTES) + b"\r\n",
            id="one-huge-header",
        ),
    ],
)
def test_a_request_head_over_the_bound_is_refused_431(server: IngestServer, head: bytes) -> None:
    """The parser (httptools) has no bound of its own: ours answers 431 and closes, before the
    head ends, and the server goes on serving everyone else."""
    answer = _raw(server, head)  # never finished: no blank line
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 431 Request Header Fields Too Large", answer[:200]
    assert b"connection: close" in rest.lower()
    assert f"over the limit of {MAX_HEAD_BYTES} bytes".encode() in rest
    assert get(server, "/healthz")[0] in (200, 503)  # answering: the server is unharmed


def test_a_head_just_under_the_bound_is_served(server: IngestServer) -> None:
    pad = "v" * (MAX_HEAD_BYTES - 2000)
    status, _, _ = get(server, "/healthz", {"X-Pad": pad})
    assert status in (200, 503)  # answered by /healthz (its status is the stack's health)
