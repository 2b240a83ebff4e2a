"""The ingest server process: (embedded broker and database,) consumer and HTTP together.

with IngestServer(Settings(broker_url=..., db_url=...)) as server:
    server.http.url, server.consumer.health()
run_server(settings)        # the same, until SIGTERM or SIGINT
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Self

import psycopg

from ingest_server import logbound
from ingest_server.alerts.engine import AlertEngine
from ingest_server.control import broker_auth
from ingest_server.control.enrolment import Offer
from ingest_server.control.plane import ControlPlane
from ingest_server.control.rollouts import RolloutRunner
from ingest_server.ingest.consumer import Consumer
from ingest_server.ingest.http import HttpIngest
from ingest_server.metrics import IngestMetrics
from ingest_server.settings import BrokerUrl, Settings, SettingsError, mask
from ingest_server.storage.maintenance import StorageMaintenance
from ingest_server.storage.migrate import migrate
from ingest_server.web.api import auth
from ingest_server.web.api.enrol import EnrolmentState
from ingest_server.web.api.ingest import IngestState
from ingest_server.web.app import HttpServer, create_app
from schemas.keyfile import key_from_file

if TYPE_CHECKING:
    from ingest_server.alerts.notify import Notifier

log = logging.getLogger(__name__)


class IngestServer:
    """Starts everything in :meth:`start`, stops it in reverse order in :meth:`stop`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = IngestMetrics()
        self._consumer: Consumer | None = None
        self._http: HttpServer | None = None
        self._control: ControlPlane | None = None
        self.rollouts: RolloutRunner | None = None
        self.alerts: AlertEngine | None = None
        self.storage: StorageMaintenance | None = None
        self._stack = contextlib.ExitStack()
        #: The embedded broker's credentials and topic rules, kept current from the registry.
        self.broker_rules: broker_auth.RulesHolder | None = None
        self.broker_auth: broker_auth.BrokerAuthRefresher | None = None
        self.notifier: Notifier | None = None

    @property
    def consumer(self) -> Consumer:
        if self._consumer is None:
            raise RuntimeError("the ingest server is not running")
        return self._consumer

    @property
    def control(self) -> ControlPlane:
        if self._control is None:
            raise RuntimeError("the ingest server is not running")
        return self._control

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
            self._start_broker_auth(db_url, BrokerUrl.parse(broker_url))
            offer, missing = self._offer(BrokerUrl.parse(broker_url))
            refresher = self.broker_auth
            app.state.enrolment = EnrolmentState(
                offer, missing, on_enrolled=refresher.kick if refresher else None
            )
            consumer.on_commit = app.state.live.publish
            engine = AlertEngine(s.rules(), db_url, self.metrics, app.state.live.publish_alert)
            consumer.listeners.append(engine.submit)
            app.state.alerts = engine
            # HTTP ingest: its own writer thread and connection, beside the MQTT consumer's
            http_ingest = HttpIngest(db_url, self.metrics)
            http_ingest.on_commit = app.state.live.publish
            http_ingest.listeners.append(engine.submit)
            app.state.http_ingest = IngestState(http_ingest, s.webhook_sources())
            app.state.public_url = s.public_url
            http = HttpServer(app, s.http_host, s.http_port, s.tls())
            consumer.start()
            self._stack.callback(consumer.stop)
            self._consumer = consumer
            engine.start()
            self._stack.callback(engine.stop)
            http_ingest.start()
            self._stack.callback(http_ingest.stop)
            self.alerts = engine
            control = ControlPlane(s, BrokerUrl.parse(broker_url), db_url, self.metrics)
            app.state.control = control
            control.start()
            self._stack.callback(control.stop)
            self._control = control
            # Staged rollouts: issue batches into commands/device_config, read their acks back.
            runner = RolloutRunner(
                db_url,
                wake_control=control.wake,
                tick_s=s.rollout_tick_s,
                stuck_after_s=s.stuck_after_s,
            )
            app.state.rollouts = runner
            runner.start()
            self._stack.callback(runner.stop)
            self.rollouts = runner
            # Partitions ahead, retention, rollups; skips a pass until the consumer has migrated.
            self.storage = StorageMaintenance(db_url, metrics=self.metrics)
            self.storage.start()
            self._stack.callback(self.storage.stop)
            self._start_notifier(db_url)
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
        self._control = None
        self._stack.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start_notifier(self, db_url: str) -> None:
        """Alert notifications, when a receiver is configured (leader only, own thread)."""
        config = self.settings.notify_config()
        if config is None:
            return
        from ingest_server.alerts.notify import Notifier  # noqa: PLC0415

        self.notifier = Notifier(config, db_url, self.metrics).start()
        self._stack.callback(self.notifier.stop)

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
        from ingest_server.embedded.broker import EmbeddedBroker  # noqa: PLC0415  # optional deps

        # The server logs in to its own broker as a user only it knows; devices as themselves.
        user, password = "campus-ingest-server", secrets.token_urlsafe(24)
        self.broker_rules = broker_auth.RulesHolder(
            broker_auth.BrokerRules({}, user, broker_auth.hash_password(password))
        )
        s = self.settings
        if s.embedded_allow_anonymous:
            log.warning(
                "EMBEDDED BROKER ADMITS ANONYMOUS CLIENTS (--embedded-anonymous, demo only): any "
                "local program may publish uplinks as a device outside the registry"
            )
        broker = EmbeddedBroker(
            port=s.embedded_broker_port,
            rules=self.broker_rules,
            allow_anonymous=s.embedded_allow_anonymous,
            # the consumer's and the control plane's sessions: nobody else may take them over
            reserved_client_ids=(s.client_id, f"{s.client_id}-control"),
        ).start_in_thread()
        self._stack.callback(broker.stop)
        return broker.url.replace("mqtt://", f"mqtt://{user}:{password}@", 1)

    def _start_broker_auth(self, db_url: str, broker: BrokerUrl) -> None:
        """Keep Mosquitto's files and/or the embedded broker's rules in step with the registry."""
        s = self.settings
        targets = None
        if s.mosquitto_passwd is not None and s.mosquitto_acl is not None:
            targets = broker_auth.FileTargets(
                s.mosquitto_passwd, s.mosquitto_acl, s.mosquitto_pid_file, s.mosquitto_reload_cmd
            )
        if targets is None and self.broker_rules is None:
            return
        refresher = broker_auth.BrokerAuthRefresher(
            db_url,
            server_user=broker.username,
            server_password=broker.password,
            targets=targets,
            holder=self.broker_rules,
            interval=s.broker_auth_interval_s,
        ).start()
        self._stack.callback(refresher.stop)
        self.broker_auth = refresher

    def _offer(self, broker: BrokerUrl) -> tuple[Offer | None, str]:
        """What enrolment hands devices, or why enrolment is off."""
        s = self.settings
        if s.hash_key_file is None:
            return None, "no district hash key is configured (--hash-key-file)"
        try:
            key = key_from_file(s.hash_key_file.read_bytes())
            ca_file = s.ca_cert
            if ca_file is None and s.enrol_broker_url is None and broker.ca:
                # devices are sent to the server's own broker: the CA it trusts is theirs too
                ca_file = Path(broker.ca)
            ca = ca_file.read_text(encoding="ascii") if ca_file else None
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(f"enrolment: cannot read {exc}") from None
        if len(key) < 16:
            raise SettingsError(f"--hash-key-file {s.hash_key_file}: the key must be >= 16 bytes")
        url = s.enrol_broker_url
        if url is None:
            host = f"[{broker.host}]" if ":" in broker.host else broker.host
            url = f"{'mqtts' if broker.tls else 'mqtt'}://{host}:{broker.port}"
            url += "?protocol=3.1.1" if broker.protocol == 4 else ""
        return Offer(mqtt_url=url, hash_key_hex=key.hex(), ca_cert_pem=ca), ""

    def _embedded_database(self) -> str:
        from ingest_server.embedded.postgres import EmbeddedPostgres  # noqa: PLC0415  # optional deps

        pg = EmbeddedPostgres(self.settings.data_dir)
        pg.start()
        self._stack.callback(pg.stop)
        return pg.url


#: The interpreter's thread switch interval for a running server. The writer thread comes
#: back from each PostgreSQL round trip wanting the GIL while the decoder thread holds it; at
#: Python's default 5 ms it waits up to that long, several times per batch, and the decoding
#: and the database's work end up taking turns instead of overlapping. Measured with
#: ``python -m bench ingest_e2e --type card.tap --rounds 3`` on 2 cores: 35-39k ev/s at 5 ms,
#: 49-53k at 0.5 ms (pipeline cores in use 1.19 → 1.46).
SWITCH_INTERVAL_S = 0.0005


def run_server(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT; the batch in progress is finished or left unacknowledged."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    logbound.install()  # no log line of tens of MB, whatever a device sends
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
