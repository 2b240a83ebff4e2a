"""The ingest server process: (embedded broker and database,) consumer and HTTP together.

with IngestServer(Settings(broker_url=..., db_url=...)) as server:
    server.http.url, server.consumer.health()
run_server(settings)        # the same, until SIGTERM or SIGINT
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from types import FrameType
from typing import Self

import psycopg

from ingest_server.api import auth
from ingest_server.consumer import Consumer
from ingest_server.http import HttpServer, create_app
from ingest_server.metrics import IngestMetrics
from ingest_server.migrate import migrate
from ingest_server.settings import BrokerUrl, Settings, mask

log = logging.getLogger(__name__)


class IngestServer:
    """Starts everything in :meth:`start`, stops it in reverse order in :meth:`stop`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = IngestMetrics()
        self._consumer: Consumer | None = None
        self._http: HttpServer | None = None
        self._stack = contextlib.ExitStack()

    @property
    def consumer(self) -> Consumer:
        if self._consumer is None:
            raise RuntimeError("the ingest server is not running")
        return self._consumer

    @property
    def http(self) -> HttpServer:
        if self._http is None:
            raise RuntimeError("the ingest server is not running")
        return self._http

    def start(self) -> Self:
        s = self.settings
        try:
            broker_url = s.broker_url or self._embedded_broker()
            db_url = s.db_url or self._embedded_database()
            log.info("broker %s, database %s", mask(broker_url), mask(db_url))
            consumer = Consumer(s, BrokerUrl.parse(broker_url), db_url, self.metrics)
            app = create_app(consumer, self.metrics, db_url, s.token_file)
            self._stack.callback(app.state.pool.close)
            consumer.on_commit = app.state.live.publish
            http = HttpServer(app, s.http_host, s.http_port)
            consumer.start()
            self._stack.callback(consumer.stop)
            self._consumer = consumer
            http.start()
            self._stack.callback(http.stop)
            self._stack.callback(app.state.live.close)  # live streams end first, or stop waits
            self._http = http
            self._start_bootstrap(db_url)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self._consumer = self._http = None
        self._stack.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start_bootstrap(self, db_url: str) -> None:
        """Once the database answers: migrate, and make sure an admin API token exists."""
        stop = threading.Event()

        def run() -> None:
            while not stop.is_set():
                try:
                    with psycopg.connect(db_url, autocommit=True, connect_timeout=5) as conn:
                        migrate(conn)
                        if done := auth.bootstrap(conn, self.settings.token_file):
                            log.warning("API: %s", done)
                    return
                except (psycopg.Error, OSError) as exc:
                    log.debug("API bootstrap waits for the database: %s", exc)
                    stop.wait(1.0)

        thread = threading.Thread(target=run, name="api-bootstrap", daemon=True)
        thread.start()
        self._stack.callback(thread.join, 10)
        self._stack.callback(stop.set)

    def _embedded_broker(self) -> str:
        from ingest_server.embedded import EmbeddedBroker  # noqa: PLC0415  # optional deps

        broker = EmbeddedBroker(port=self.settings.embedded_broker_port).start_in_thread()
        self._stack.callback(broker.stop)
        return broker.url

    def _embedded_database(self) -> str:
        from ingest_server.embedded import EmbeddedPostgres  # noqa: PLC0415  # optional deps

        pg = EmbeddedPostgres(self.settings.data_dir)
        pg.start()
        self._stack.callback(pg.stop)
        return pg.url


def run_server(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT; the batch in progress is finished or left unacknowledged."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with IngestServer(settings) as server:
            log.info("ingest server running; HTTP on %s", server.http.url)
            stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("ingest server stopped")
