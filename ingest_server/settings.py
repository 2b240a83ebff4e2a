"""Settings of one ingest server process, and the URLs it is given (parsed and masked)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qs, unquote, urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ingest_server.alerts.config import RulesConfig, RulesError
from ingest_server.alerts.config import load as load_rules
from ingest_server.web.tls import TlsError, TlsFiles
from schemas.uplink import DEFAULT_MAX_BYTES

if TYPE_CHECKING:
    from ingest_server.alerts.notify import NotifyConfig
    from ingest_server.ingest.webhook import Mapping

_PROTOCOLS: Final = {"5": 5, "3.1.1": 4, "311": 4}
_DEFAULT_PORTS: Final = {"mqtt": 1883, "mqtts": 8883}
_GROUP_RE: Final = re.compile(r"^[^/+#]+$")
#: Writer lanes at most: each is a PostgreSQL connection and a thread.
MAX_WRITERS: Final = 16


class SettingsError(ValueError):
    """A setting or URL is unusable; the message says which and why."""


@dataclass(frozen=True, slots=True)
class BrokerUrl:
    """``mqtt[s]://[user[:password]@]host[:port][?protocol=5|3.1.1][&ca=PATH]``."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    #: MQTT protocol level as on the wire: 5, or 4 for MQTT 3.1.1.
    protocol: int = 5
    #: CA bundle to verify the broker with (mqtts); the system's when absent.
    ca: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerUrl:
        parts = urlsplit(url)
        if parts.scheme not in _DEFAULT_PORTS:
            raise SettingsError(f"broker URL must start with mqtt:// or mqtts://, got {mask(url)}")
        try:
            port = parts.port or _DEFAULT_PORTS[parts.scheme]
        except ValueError:
            raise SettingsError(f"broker URL has an invalid port: {mask(url)}") from None
        if not parts.hostname:
            raise SettingsError(f"broker URL has no host: {mask(url)}")
        query = parse_qs(parts.query, keep_blank_values=True)
        unknown = set(query) - {"protocol", "ca"}
        if unknown:
            raise SettingsError(f"broker URL has unknown parameters {sorted(unknown)}")
        proto_text = query.get("protocol", ["5"])[-1]
        if proto_text not in _PROTOCOLS:
            raise SettingsError(f"broker URL protocol must be 5 or 3.1.1, got {proto_text!r}")
        return cls(
            host=parts.hostname,
            port=port,
            tls=parts.scheme == "mqtts",
            username=unquote(parts.username) if parts.username is not None else None,
            password=unquote(parts.password) if parts.password is not None else None,
            protocol=_PROTOCOLS[proto_text],
            ca=query.get("ca", [None])[-1],
        )

    def __str__(self) -> str:
        """The URL with the password masked: safe to log."""
        user = (
            f"{self.username}{':***' if self.password is not None else ''}@"
            if self.username
            else ""
        )
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = "?protocol=" + ("5" if self.protocol == 5 else "3.1.1")
        if self.ca:
            query += f"&ca={self.ca}"
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{host}:{self.port}{query}"


def mask(url: str) -> str:
    """A broker or libpq URL (or libpq key=value string) without its password."""
    parts = urlsplit(url)
    if parts.scheme.startswith("mqtt"):
        if parts.password is None:
            return url
        return url.replace(f":{parts.password}@", ":***@", 1)
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparseable database URL>"
    if "password" in params:
        params["password"] = "***"  # noqa: S105  # the mask, not a password
    return make_conninfo("", **params)


def check_public_url(value: str) -> str:
    """``--public-url``: ``http(s)://HOST[:PORT][/PREFIX]``, no credentials, query or fragment;
    the value without a trailing ``/``. Errors never repeat credentials."""
    form = "--public-url must be http(s)://HOST[:PORT][/PREFIX]"
    if len(value) > 512 or any(c.isspace() or not c.isprintable() for c in value):
        raise SettingsError(f"{form}: at most 512 printable characters, no spaces")
    parts = urlsplit(value)
    if parts.username is not None or parts.password is not None:
        raise SettingsError(f"{form}: without user:password@ (it is handed to every reader)")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(f"{form}, got {value!r}")
    if parts.query or parts.fragment:
        raise SettingsError(f"{form}: no ?query or #fragment, got {value!r}")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise SettingsError(f"{form}: bad port in {value!r}") from None
    return value.rstrip("/")


def parse_http(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) → (host, port); port 0 picks a free one."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise SettingsError(f"--http must be HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the server is told; ``None`` URLs mean the embedded broker / database."""

    broker_url: str | None = None
    db_url: str | None = None
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    #: Fixed, so the broker keeps this server's session; unique per server when sharing.
    client_id: str = "campus-ingest"
    share_group: str | None = None
    batch_events: int = 5000
    batch_ms: int = 50
    #: Writer lanes: connections writing side by side, each device's rows always on the same
    #: one (ingest_server/ingest/lanes.py).
    writers: int = 2
    data_dir: Path = Path("campus-data")
    #: An admin API token: registered if given, created (when none exists) if not; see
    #: :func:`ingest_server.web.api.auth.bootstrap`. Default: ``data_dir / "admin-token"``.
    admin_token_file: Path | None = None
    #: Port of the embedded broker (when no broker URL is given); 0 picks a free one.
    embedded_broker_port: int = 1883
    max_bytes: int = DEFAULT_MAX_BYTES
    #: Bounds of the hand-over from the network thread to the writer.
    queue_messages: int = 20_000
    queue_bytes: int = 64 * 1024 * 1024
    #: Enrolment: the broker URL devices are told to use (default: this server's, sans user).
    enrol_broker_url: str | None = None
    #: CA certificate (PEM) handed to enrolled devices, to verify the broker with.
    ca_cert: Path | None = None
    #: The district's HMAC key for card UIDs (hex or raw bytes); enrolment is off without it.
    hash_key_file: Path | None = None
    #: Mosquitto password_file and acl_file kept in step with the registry (both or neither).
    mosquitto_passwd: Path | None = None
    mosquitto_acl: Path | None = None
    #: How Mosquitto is told to reload them: SIGHUP to this pid, or this command.
    mosquitto_pid_file: Path | None = None
    mosquitto_reload_cmd: str | None = None
    broker_auth_interval_s: float = 5.0
    #: The embedded broker admits loopback clients without credentials, to publish uplinks of
    #: devices outside the registry only (the demo's agents); never with enrolment on.
    embedded_allow_anonymous: bool = False
    #: /healthz answers 503 once queued work, a batch or an ack has not moved for this long.
    stuck_after_s: float = 30.0
    #: How often the rollout runner steps the open rollouts (it is also woken by the API).
    rollout_tick_s: float = 1.0
    #: PEM certificate chain and key: the HTTP API is served over TLS (both or neither).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Alert notifications: webhook URLs (plain, wecom+https://, dingtalk+https://), an SMTP
    #: URL and a routes file (see docs/alerts.md); no notifier without a receiver.
    alert_webhooks: tuple[str, ...] = ()
    alert_smtp: str | None = None
    alert_routes: Path | None = None
    #: The alert rules (TOML, docs/alerts.md); the built-in defaults without it.
    rules_file: Path | None = None
    #: Vendor webhook mapping files, or directories of them (``*.toml``, docs/webhooks.md).
    webhook_mappings: tuple[Path, ...] = ()
    #: The address agents and operators reach this server's HTTP side at
    #: (``https://HOST[:PORT][/PREFIX]``): the release listing's download URLs start with it.
    public_url: str | None = None

    def __post_init__(self) -> None:
        if self.batch_events < 1 or self.batch_ms < 0:
            raise SettingsError("--batch-events must be at least 1 and --batch-ms at least 0")
        if not 1 <= self.writers <= MAX_WRITERS:
            raise SettingsError(
                f"--writers must be between 1 and {MAX_WRITERS}, got {self.writers}"
            )
        if self.max_bytes < 1 or self.queue_messages < 1 or self.queue_bytes < self.max_bytes:
            raise SettingsError("queue bounds must hold at least one message of max_bytes")
        if not self.client_id or len(self.client_id) > 128:
            raise SettingsError("--client-id must be 1-128 characters")
        if self.share_group is not None:
            if not _GROUP_RE.match(self.share_group):
                raise SettingsError(f"--share-group {self.share_group!r} may not contain / + #")
            if self.broker_url is None or self.broker().protocol != 5:
                raise SettingsError("--share-group needs an MQTT 5 broker (?protocol=5)")
        if self.broker_url is not None:
            self.broker()
        if (self.mosquitto_passwd is None) != (self.mosquitto_acl is None):
            raise SettingsError("--mosquitto-passwd and --mosquitto-acl go together")
        if self.mosquitto_passwd is not None:
            b = self.broker() if self.broker_url is not None else None
            if b is None or not b.username or b.password is None:
                raise SettingsError(
                    "--mosquitto-passwd needs a broker URL with the server's user:password "
                    "(the server's own entry in the password file)"
                )
        if self.enrol_broker_url is not None:
            BrokerUrl.parse(self.enrol_broker_url)
        if self.embedded_allow_anonymous and self.hash_key_file is not None:
            raise SettingsError(
                "--embedded-anonymous cannot go with --hash-key-file: with enrolment on, the "
                "embedded broker admits enrolled devices only"
            )
        if self.embedded_allow_anonymous and self.broker_url is not None:
            raise SettingsError("--embedded-anonymous is for the embedded broker (no --broker)")
        if not 0.1 <= self.broker_auth_interval_s <= 3600:
            raise SettingsError("--broker-auth-interval must be between 0.1 and 3600 seconds")
        if not 0.1 <= self.stuck_after_s <= 86400:
            raise SettingsError("--stuck-after must be between 0.1 and 86400 seconds")
        if not 0.05 <= self.rollout_tick_s <= 60:
            raise SettingsError("rollout_tick_s must be between 0.05 and 60 seconds")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingsError("--tls-cert and --tls-key go together (give both or neither)")
        if self.rules_file is not None:
            self.rules()
        if self.public_url is not None:
            check_public_url(self.public_url)
        if (tls := self.tls()) is not None:
            try:
                tls.check()
            except TlsError as exc:
                raise SettingsError(str(exc)) from None
        self.notify_config()
        self.webhook_sources()

    def webhook_sources(self) -> dict[str, Mapping]:
        """The webhook sources by name, their files checked and secrets read (SettingsError
        naming file, line and field)."""
        from ingest_server.ingest.webhook import MappingFileError, load_mappings  # noqa: PLC0415

        try:
            return load_mappings(list(self.webhook_mappings))
        except MappingFileError as exc:
            raise SettingsError(f"--webhook-mapping: {exc}") from None

    def notify_config(self) -> NotifyConfig | None:
        """The alert receivers and routes, or None when no receiver is configured."""
        from ingest_server.alerts.notify import NotifyConfig, NotifyConfigError  # noqa: PLC0415

        try:
            return NotifyConfig.build(self.alert_webhooks, self.alert_smtp, self.alert_routes)
        except NotifyConfigError as exc:
            raise SettingsError(str(exc)) from None

    def rules(self) -> RulesConfig:
        """The alert rules: the file's, checked (SettingsError naming file, line and field)."""
        if self.rules_file is None:
            return RulesConfig()
        try:
            return load_rules(self.rules_file)
        except RulesError as exc:
            raise SettingsError(f"--rules: {exc}") from None

    def tls(self) -> TlsFiles | None:
        """The HTTP API's certificate and key, when it is served over TLS."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        return TlsFiles(self.tls_cert, self.tls_key)

    @property
    def token_file(self) -> Path:
        return self.admin_token_file or self.data_dir / "admin-token"

    def broker(self) -> BrokerUrl:
        if self.broker_url is None:
            raise SettingsError("no broker URL: the embedded broker is used")
        return BrokerUrl.parse(self.broker_url)
