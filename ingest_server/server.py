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

from ingest_server.consumer import Consumer
from ingest_server.http import HttpServer, create_app
from ingest_server.metrics import IngestMetrics
from ingest_server.settings import BrokerUrl, Settings, mask
from ingest_server.storage import StorageMaintenance

log = logging.getLogger(__name__)


class IngestServer:
    """Starts everything in :meth:`start`, stops it in reverse order in :meth:`stop`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = IngestMetrics()
        self._consumer: Consumer | None = None
        self._http: HttpServer | None = None
        self.storage: StorageMaintenance | None = None
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
            http = HttpServer(create_app(consumer, self.metrics), s.http_host, s.http_port)
            consumer.start()
            self._stack.callback(consumer.stop)
            self._consumer = consumer
            # Partitions ahead, retention, rollups; skips a pass until the consumer has migrated.
            self.storage = StorageMaintenance(db_url)
            self.storage.start()
            self._stack.callback(self.storage.stop)
            http.start()
            self._stack.callback(http.stop)
            self._http = http
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
