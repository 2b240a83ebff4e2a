"""HTTP ingest's writer: uplink batches that came over HTTP (a device's own ``POST …/up``, a
mapped vendor webhook) written through the same batch and writer code as MQTT, on a connection
and thread of its own.

Why its own: an HTTP request must be answered only after its rows are committed, but must not
hold one of the API's pooled connections while PostgreSQL works, and must never take the MQTT
consumer's writer (HTTP ingest cannot starve MQTT ingest). Requests wait in a bounded queue
(full: the caller answers 503 with Retry-After at once); one thread writes one request per
transaction and resolves the request's future after commit.

    ingest = HttpIngest(db_url, metrics).start()
    future = ingest.submit(Job(messages=[inbound]))   # raises Busy when the queue is full
    result = future.result(timeout)                   # a WriteResult, after commit
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Final

import psycopg

from ingest_server.ingest.batch import Batch, EventRow, Inbound
from ingest_server.ingest.consumer import tell_listeners, write_batch
from ingest_server.ingest.writer import BatchWriter, WriteResult
from ingest_server.metrics import IngestMetrics
from ingest_server.storage.db import connect_session

log = logging.getLogger(__name__)

#: Requests waiting for the HTTP writer at most; one more is answered 503 at once.
QUEUE_MAX: Final = 64


class Busy(Exception):
    """The HTTP writer's queue is full: try again shortly."""


class Refused(Exception):
    """A job's ``build`` found the request cannot be written; ``detail`` says why (the caller
    answers it as the request's error, nothing was written)."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(str(detail))
        self.status = status
        self.detail = detail


@dataclass(slots=True)
class Job:
    """One request's messages, or a function building them on the writer's connection (a
    webhook assigns its seqs there, committed before its events are written)."""

    messages: list[Inbound] = field(default_factory=list)
    build: Callable[[psycopg.Connection[Any]], list[Inbound]] | None = None
    future: Future[WriteResult] = field(default_factory=Future)


class HttpIngest:
    """The HTTP writer thread, its queue and its database session."""

    DB_CONNECT_TIMEOUT_S: Final = 5

    def __init__(self, db_url: str, metrics: IngestMetrics, *, queue_max: int = QUEUE_MAX) -> None:
        self.db_url = db_url
        self.metrics = metrics
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_max)
        self._writer: BatchWriter | None = None
        self._thread = threading.Thread(target=self._run, name="http-ingest", daemon=True)
        #: Called after each commit with the stored rows (the live stream).
        self.on_commit: Callable[[Sequence[EventRow]], None] | None = None
        #: Called after each commit with the result and its time (the alert engine).
        self.listeners: list[Callable[[WriteResult, float], None]] = []

    def start(self) -> HttpIngest:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._disconnect()

    def submit(self, job: Job) -> Future[WriteResult]:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Busy(f"{self._queue.maxsize} HTTP ingest requests are waiting already") from None
        return job.future

    # -- writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                continue  # the request gave up waiting: the client retries, dedupe holds
            try:
                result = self._handle(job)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
                job.future.set_exception(exc)
                continue
            job.future.set_result(result)
            self._record(result)

    def _handle(self, job: Job) -> WriteResult:
        """Write the job; on a lost connection reconnect and try once more (a restarted
        database leaves a dead session behind), then give the error to the request."""
        for attempt in (1, 2):
            try:
                writer = self._connect()
                messages = job.build(writer.conn) if job.build is not None else job.messages
                batch = Batch()
                for msg in messages:
                    batch.add(msg)
                batch.seal()
                return write_batch(writer, batch)
            except psycopg.Error as exc:
                self._disconnect()
                if attempt == 2 or isinstance(exc, psycopg.DataError):
                    raise
                log.warning("HTTP ingest: database write failed (%s); reconnecting", exc)
        raise AssertionError("unreachable")

    def _connect(self) -> BatchWriter:
        if self._writer is None:
            conn = connect_session(
                self.db_url,
                application_name="campus-ingest-http",
                connect_timeout=self.DB_CONNECT_TIMEOUT_S,
                migrate_first=False,  # the consumer and the API bootstrap migrate
            )
            try:
                self._writer = BatchWriter(conn)
            except BaseException:
                conn.close()
                raise
        return self._writer

    def _disconnect(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(psycopg.Error):
                writer.conn.close()

    def _record(self, result: WriteResult) -> None:
        m = self.metrics
        m.events_received.inc(result.inserted + result.duplicates + result.quarantined)
        m.events_stored.inc(result.inserted)
        m.events_duplicate.inc(result.duplicates)
        for q in result.quarantine:
            m.quarantined.inc(reason=q.kind)
        tell_listeners(result, time.time(), self.on_commit, self.listeners)


__all__ = ["Busy", "HttpIngest", "Job", "Refused"]
