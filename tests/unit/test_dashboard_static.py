"""The dashboard's files as the ingest server serves them (uvicorn on 127.0.0.1), and its two
dictionaries."""

from __future__ import annotations

import http.client
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ingest_server.ingest.consumer import Health
from ingest_server.metrics import IngestMetrics
from ingest_server.web.app import HttpServer, create_app
from ingest_server.web.dashboard import STATIC_DIR, vendor_dir
from simulators.harness import wait_until


class _Healthy:
    def health(self) -> Health:
        return Health(mqtt_connected=True, db_ok=True, queued=0, last_commit_age_s=0.0)


@contextmanager
def _server() -> Iterator[HttpServer]:
    srv = HttpServer(create_app(_Healthy(), IngestMetrics()), "127.0.0.1", 0)
    srv.start()
    try:
        wait_until(lambda: _get(srv, "/healthz")[0] == 200, 10, "the HTTP server")
        yield srv
    finally:
        srv.stop()


def _get(srv: HttpServer, path: str) -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read().decode()
    except OSError:
        return 0, {}, ""
    finally:
        conn.close()


def test_pages_need_no_token_and_slashless_redirects() -> None:
    with _server() as srv:
        status, _, body = _get(srv, "/dashboard/")
        assert status == 200
        assert '<main id="view"' in body
        status, headers, _ = _get(srv, "/dashboard/app.mjs")
        assert status == 200
        assert headers["content-type"].startswith("text/javascript")
        status, headers, _ = _get(srv, "/dashboard")
        assert status in (307, 308)
        assert headers["location"].endswith("/dashboard/")


def test_chart_library_served_when_installed_and_absent_otherwise(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "echarts.esm.min.mjs").write_text("export const init = () => {};\n")
    monkeypatch.setenv("CAMPUS_DASHBOARD_VENDOR", str(tmp_path))
    assert vendor_dir() == tmp_path
    with _server() as srv:
        assert _get(srv, "/dashboard/vendor/echarts.esm.min.mjs")[0] == 200
    monkeypatch.setenv("CAMPUS_DASHBOARD_VENDOR", str(tmp_path / "nowhere"))
    assert vendor_dir() is None
    with _server() as srv:
        # the page's dynamic import then fails and charts.mjs says charts are unavailable
        assert _get(srv, "/dashboard/vendor/echarts.esm.min.mjs")[0] == 404
    assert "charts.unavailable" in (STATIC_DIR / "charts.mjs").read_text()


def test_both_languages_have_every_key_the_code_uses() -> None:
    source = (STATIC_DIR / "i18n.mjs").read_text(encoding="utf-8")
    en_part, zh_part = source.split("  zh: {", 1)
    en = set(re.findall(r'^\s+"([a-z0-9_.]+)":', en_part, re.M))
    zh = set(re.findall(r'^\s+"([a-z0-9_.]+)":', zh_part.split("\n  },", 1)[0], re.M))
    assert en == zh
    assert len(en) > 50
    code = "".join(
        (STATIC_DIR / name).read_text(encoding="utf-8")
        for name in ("app.mjs", "alerts.mjs", "charts.mjs", "index.html")
    )
    used = set(re.findall(r'(?:\bt\(|data-i18n=)"([a-z0-9_]+\.[a-z0-9_.]+)"', code))
    assert used
    assert used <= en, sorted(used - en)
