"""Alert receivers on 127.0.0.1 for the notification tests: ``Hook`` (an http.server answering
like a webhook, WeCom or DingTalk) and ``SmtpSink`` (aiosmtpd requiring STARTTLS, its
certificate from a trustme CA). Shared by test_alert_notify.py and test_alerts.py."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default as default_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import pytest

from simulators.harness import free_port

#: A request body is read only up to this (the notifier's are a few KiB).
MAX_BODY = 1 << 20


@dataclass
class Hook:
    """A receiver on 127.0.0.1: records each request; answers ``status`` with ``answer``.

    ``stop()`` then ``start()`` takes it down and back on the same port: while it is down,
    connections are refused."""

    port: int = field(default_factory=free_port)
    status: int = 200
    answer: dict[str, Any] | None = None
    #: answer these (status, body) first, one per request
    script: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def bodies(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r["body"] for r in self.requests if r["status"] == 200]

    def start(self) -> Hook:
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(min(int(self.headers["Content-Length"]), MAX_BODY))
                with hook._lock:
                    status, answer = (
                        hook.script.pop(0) if hook.script else (hook.status, hook.answer)
                    )
                    hook.requests.append(
                        {
                            "path": self.path,
                            "query": parse_qs(urlsplit(self.path).query),
                            "headers": dict(self.headers),
                            "body": json.loads(raw),
                            "status": status if not answer or answer.get("errcode", 0) == 0 else 0,
                        }
                    )
                out = json.dumps(answer or {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *_args: object) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@pytest.fixture
def hooks() -> Iterator[list[Hook]]:
    """Hooks a test made: stopped at its end."""
    made: list[Hook] = []
    yield made
    for h in made:
        h.stop()


class SmtpSink:
    """aiosmtpd on 127.0.0.1 requiring STARTTLS; keeps each message's envelope and content."""

    def __init__(self, tmp_path: Path) -> None:
        controller_mod = pytest.importorskip("aiosmtpd.controller")
        trustme = pytest.importorskip("trustme")
        self.received: list[tuple[str, list[str], bytes]] = []
        self._lock = threading.Lock()
        sink = self

        class Handler:
            async def handle_DATA(self, _server: object, _session: object, envelope: Any) -> str:
                with sink._lock:
                    sink.received.append(
                        (envelope.mail_from, list(envelope.rcpt_tos), envelope.content)
                    )
                return "250 OK"

        ca = trustme.CA()
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
        self.ca_file = tmp_path / "smtp-ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        self.port = free_port()
        self._controller = controller_mod.Controller(
            Handler(),
            hostname="127.0.0.1",
            port=self.port,
            tls_context=server_ctx,
            require_starttls=True,
        )

    def url(self, sender: str, *recipients: str) -> str:
        """The ``smtp://`` receiver URL for the notifier: STARTTLS, trusting the sink's CA."""
        return (
            f"smtp://127.0.0.1:{self.port}?from={sender}&to={','.join(recipients)}"
            f"&ca={self.ca_file}"
        )

    def messages(self) -> list[EmailMessage]:
        with self._lock:
            raws = [raw for _, _, raw in self.received]
        return [cast(EmailMessage, message_from_bytes(r, policy=default_policy)) for r in raws]

    def start(self) -> SmtpSink:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()


@pytest.fixture
def smtp_sink(tmp_path: Path) -> Iterator[SmtpSink]:
    """A running ``SmtpSink`` for the test."""
    sink = SmtpSink(tmp_path).start()
    try:
        yield sink
    finally:
        sink.stop()
