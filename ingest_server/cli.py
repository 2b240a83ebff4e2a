"""``ingest-server run`` and ``ingest-server migrate``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path

import psycopg

from ingest_server import logbound
from ingest_server.settings import Settings, SettingsError, mask, parse_http

BROKER_ENV = "CAMPUS_BROKER_URL"
DB_ENV = "CAMPUS_DB_URL"
TLS_CERT_ENV = "CAMPUS_TLS_CERT"
TLS_KEY_ENV = "CAMPUS_TLS_KEY"
WEBHOOK_ENV = "CAMPUS_ALERT_WEBHOOK"
SMTP_ENV = "CAMPUS_ALERT_SMTP"
PUBLIC_URL_ENV = "CAMPUS_PUBLIC_URL"
_DEFAULTS = Settings()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ingest-server", description="campus-edge ingest server: MQTT to PostgreSQL"
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="consume MQTT, write PostgreSQL, serve /healthz and /metrics")
    run.add_argument(
        "--broker",
        metavar="URL",
        help=f"mqtt[s]://[user:pass@]host:port[?protocol=5|3.1.1] (default ${BROKER_ENV}; "
        "without either, an embedded broker)",
    )
    run.add_argument(
        "--db",
        metavar="URL",
        help=f"libpq URL (default ${DB_ENV}; without either, an embedded PostgreSQL)",
    )
    run.add_argument("--http", metavar="HOST:PORT", default="127.0.0.1:8080", type=parse_http)
    run.add_argument(
        "--tls-cert",
        metavar="FILE",
        type=Path,
        help=f"serve the HTTP API over TLS (1.2+) with this PEM certificate chain, server "
        f"certificate first (default ${TLS_CERT_ENV}); needs --tls-key",
    )
    run.add_argument(
        "--tls-key",
        metavar="FILE",
        type=Path,
        help=f"the certificate's unencrypted PEM private key (default ${TLS_KEY_ENV})",
    )
    run.add_argument("--client-id", metavar="ID", default=_DEFAULTS.client_id)
    run.add_argument("--share-group", metavar="G", help="consume $share/G/... (MQTT 5 only)")
    run.add_argument("--batch-events", metavar="N", type=int, default=_DEFAULTS.batch_events)
    run.add_argument("--batch-ms", metavar="T", type=int, default=_DEFAULTS.batch_ms)
    run.add_argument(
        "--writers",
        metavar="N",
        type=int,
        default=_DEFAULTS.writers,
        help="database connections writing batches side by side, each device always on the "
        "same one (default %(default)s; one per core PostgreSQL may use)",
    )
    run.add_argument("--max-bytes", metavar="N", type=int, default=_DEFAULTS.max_bytes)
    run.add_argument(
        "--data-dir", metavar="DIR", type=Path, default=_DEFAULTS.data_dir, help="embedded mode"
    )
    run.add_argument(
        "--admin-token-file",
        metavar="FILE",
        type=Path,
        help="admin API token: registered if the file exists, else created there when the "
        "database has none (default DATA_DIR/admin-token)",
    )
    run.add_argument(
        "--stuck-after",
        metavar="S",
        type=float,
        default=_DEFAULTS.stuck_after_s,
        help="/healthz answers 503 when queued messages, the batch being written, an ack or "
        "pending commands have not moved for S seconds (default %(default)s)",
    )
    run.add_argument(
        "--rules",
        metavar="FILE",
        type=Path,
        help="alert rules (TOML, see docs/alerts.md); the built-in defaults without it",
    )
    run.add_argument(
        "--webhook-mapping",
        metavar="FILE",
        type=Path,
        action="append",
        default=[],
        help="a vendor webhook's mapping file, or a directory of them (*.toml); repeatable. "
        "Enables POST /api/v1/ingest/webhooks/{source} (docs/webhooks.md)",
    )
    run.add_argument(
        "--public-url",
        metavar="URL",
        help="https://HOST[:PORT][/PREFIX] agents and operators reach this server at: "
        "GET /api/v1/releases gives download URLs under it, so its update_args go into a "
        f"rollout as they are (default ${PUBLIC_URL_ENV}; without either, the address each "
        "request came to)",
    )
    run.add_argument(
        "--embedded-broker-port",
        metavar="PORT",
        type=int,
        default=_DEFAULTS.embedded_broker_port,
        help="embedded mode (0: any free port)",
    )

    _enrolment_args(run)
    _alert_args(run)

    demo = sub.add_parser(
        "demo",
        help="the embedded default with a small simulated school, showing live counts",
        add_help=False,
    )
    demo.add_argument("options", nargs="*", help="see ingest-server demo --help")

    tok = sub.add_parser("token", help="create, list or revoke API tokens")
    tok.add_argument("--db", metavar="URL", help=f"libpq URL (default ${DB_ENV})")
    tok_sub = tok.add_subparsers(dest="action", required=True)
    create = tok_sub.add_parser("create", help="create a token and print it (shown only once)")
    create.add_argument("--name", required=True, help="who or what uses it")
    who = create.add_mutually_exclusive_group(required=True)
    who.add_argument(
        "--role",
        choices=["district_admin", "school_admin", "reader", "service"],
        help="what the token may do (docs/api.md, Roles)",
    )
    who.add_argument(
        "--scope",
        action="append",
        choices=["read", "admin"],
        dest="scopes",
        help="deprecated alias: read = --role reader, admin = --role district_admin",
    )
    create.add_argument(
        "--school",
        action="append",
        dest="schools",
        metavar="S",
        help="limit the token to school S (repeatable; required for school_admin)",
    )
    tok_sub.add_parser("list", help="list tokens (never the tokens themselves)")
    revoke = tok_sub.add_parser("revoke", help="revoke a token by id")
    revoke.add_argument("id", type=int)

    mig = sub.add_parser("migrate", help="apply pending database migrations and exit")
    mig.add_argument("--db", metavar="URL", help=f"libpq URL (default ${DB_ENV})")

    rel = sub.add_parser("release", help="add or list signed agent releases (update_agent)")
    rel.add_argument("--db", metavar="URL", help=f"libpq URL (default ${DB_ENV})")
    rel_sub = rel.add_subparsers(dest="action", required=True)
    rel_add = rel_sub.add_parser(
        "add",
        help="store a wheel signed offline with `campus-release sign` (checked before storing)",
    )
    rel_add.add_argument("--wheel", type=Path, required=True, metavar="FILE")
    rel_add.add_argument(
        "--signature", type=Path, metavar="FILE", help="the detached signature (default FILE.sig)"
    )
    rel_add.add_argument(
        "--release-pubkey",
        type=Path,
        required=True,
        metavar="FILE",
        help="the district's release public key (PEM); the private key stays offline",
    )
    rel_add.add_argument("--db", metavar="URL", dest="db_sub", help=argparse.SUPPRESS)
    rel_list = rel_sub.add_parser("list", help="list stored releases")
    rel_list.add_argument("--db", metavar="URL", dest="db_sub", help=argparse.SUPPRESS)

    codes = sub.add_parser("enrol-code", help="create or list device enrolment codes")
    codes.add_argument("--db", metavar="URL", help=f"libpq URL (default ${DB_ENV})")
    codes_sub = codes.add_subparsers(dest="action", required=True)
    code = codes_sub.add_parser("create", help="create a single-use code and print it")
    code.add_argument("--school", required=True, metavar="S")
    code.add_argument("--room", metavar="R")
    code.add_argument("--kind", metavar="K")
    code.add_argument("--replaces", metavar="DEVICE", help="device_id the new device takes over")
    code.add_argument("--ttl", default="24h", help="validity: 90s, 30m, 24h, 7d (max 30d)")
    code.add_argument("--db", metavar="URL", dest="db_sub", help=argparse.SUPPRESS)
    listing = codes_sub.add_parser("list", help="list codes (never the codes themselves)")
    listing.add_argument("--db", metavar="URL", dest="db_sub", help=argparse.SUPPRESS)

    ba = sub.add_parser("broker-auth", help="write Mosquitto's password and ACL files once")
    ba_sub = ba.add_subparsers(dest="action", required=True)
    write = ba_sub.add_parser("write", help="from the device registry; reload if they changed")
    write.add_argument("--db", metavar="URL", help=f"libpq URL (default ${DB_ENV})")
    write.add_argument("--passwd", metavar="FILE", type=Path, required=True)
    write.add_argument("--acl", metavar="FILE", type=Path, required=True)
    write.add_argument("--server-user", metavar="NAME", help="the ingest server's MQTT user")
    write.add_argument(
        "--server-password-file", metavar="FILE", type=Path, help="that user's password"
    )
    write.add_argument("--pid-file", metavar="FILE", type=Path, help="SIGHUP this pid after")
    write.add_argument("--reload-cmd", metavar="CMD", help="or run this command after")
    return parser


def _enrolment_args(run: argparse.ArgumentParser) -> None:
    g = run.add_argument_group("enrolment and broker security")
    g.add_argument(
        "--enrol-broker-url",
        metavar="URL",
        help="the broker URL enrolled devices are given, e.g. mqtts://broker.district:8883 "
        "(default: the server's own, without its user)",
    )
    g.add_argument("--ca-cert", metavar="FILE", type=Path, help="CA (PEM) handed to devices")
    g.add_argument(
        "--hash-key-file",
        metavar="FILE",
        type=Path,
        help="the district's card-UID HMAC key (hex or raw); enrolment is off without it",
    )
    g.add_argument("--mosquitto-passwd", metavar="FILE", type=Path, help="password_file to keep")
    g.add_argument("--mosquitto-acl", metavar="FILE", type=Path, help="acl_file to keep")
    g.add_argument("--mosquitto-pid-file", metavar="FILE", type=Path, help="SIGHUP on change")
    g.add_argument("--mosquitto-reload-cmd", metavar="CMD", help="or run this on change")
    g.add_argument(
        "--broker-auth-interval", metavar="S", type=float, default=_DEFAULTS.broker_auth_interval_s
    )
    anon = g.add_mutually_exclusive_group()
    anon.add_argument(
        "--embedded-anonymous",
        action="store_true",
        help="demo only: the embedded broker also admits clients without credentials, to "
        "publish uplinks of devices outside the registry (nothing to read); not with "
        "--hash-key-file",
    )
    anon.add_argument(
        "--no-embedded-anonymous",
        action="store_true",
        help="the default: the embedded broker admits only enrolled devices (and this server)",
    )


def _alert_args(run: argparse.ArgumentParser) -> None:
    g = run.add_argument_group("alert notifications (docs/alerts.md)")
    g.add_argument(
        "--alert-webhook",
        metavar="URL",
        action="append",
        default=[],
        help="send alert notifications here (repeatable): https://… (JSON), "
        "wecom+https://qyapi.weixin.qq.com/…?key=K, "
        "dingtalk+https://oapi.dingtalk.com/robot/send?access_token=T[&secret=SEC…] "
        f"(default ${WEBHOOK_ENV}, comma- or space-separated)",
    )
    g.add_argument(
        "--smtp",
        metavar="URL",
        help="e-mail alert notifications: smtp[s]://user:pass@host:port?from=A&to=B[,C] "
        f"(STARTTLS required on smtp://; default ${SMTP_ENV}, which keeps the password out of ps)",
    )
    g.add_argument(
        "--alert-routes",
        metavar="FILE",
        type=Path,
        help="TOML: receivers by name, routes per school and severity, quiet hours "
        "(without it every receiver gets every notification)",
    )


def _webhooks(given: list[str]) -> tuple[str, ...]:
    if given:
        return tuple(given)
    return tuple(os.environ.get(WEBHOOK_ENV, "").replace(",", " ").split())


#: Subcommands provided by packages above the server (the demo lives with the simulators, which
#: import the server; the server never imports them), registered under this entry-point group.
COMMANDS_GROUP = "campus_edge.ingest_server_commands"


def _command_from_entry_point(name: str, argv: list[str]) -> int:
    found = entry_points(group=COMMANDS_GROUP, name=name)
    if not found:
        print(
            f"ingest-server {name}: not installed (no {name!r} in entry points {COMMANDS_GROUP}); "
            "reinstall campus-edge, e.g. pip install -e '.[server,agent,modbus]'",
            file=sys.stderr,
        )
        return 2
    command: Callable[[list[str]], int] = next(iter(found)).load()
    return command(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # the demo parses its own options
        return _command_from_entry_point("demo", argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logbound.install()
    db_url = args.db or os.environ.get(DB_ENV) or None

    if args.command == "migrate":
        from ingest_server.storage.migrate import migrate_url  # noqa: PLC0415

        if db_url is None:
            parser.error(f"migrate needs --db URL or ${DB_ENV}")
        try:
            applied = migrate_url(db_url)
        except psycopg.Error as exc:
            print(f"ingest-server: cannot migrate {mask(db_url)}: {exc}", file=sys.stderr)
            return 1
        print(f"applied {applied}" if applied else "database schema up to date")
        return 0

    if args.command == "token":
        if db_url is None:
            parser.error(f"token needs --db URL or ${DB_ENV}")
        return _token(args, db_url)

    if args.command == "release":
        db_url = getattr(args, "db_sub", None) or db_url
        if db_url is None:
            parser.error(f"release needs --db URL or ${DB_ENV}")
        return _release(args, db_url)

    if args.command in ("enrol-code", "broker-auth"):
        db_url = getattr(args, "db_sub", None) or db_url
        if db_url is None:
            parser.error(f"{args.command} needs --db URL or ${DB_ENV}")
        return (
            _enrol_code(args, db_url)
            if args.command == "enrol-code"
            else _broker_auth(args, db_url)
        )

    from ingest_server.server import run_server  # noqa: PLC0415

    host, port = args.http
    try:
        settings = Settings(
            broker_url=args.broker or os.environ.get(BROKER_ENV) or None,
            db_url=db_url,
            http_host=host,
            http_port=port,
            client_id=args.client_id,
            share_group=args.share_group,
            batch_events=args.batch_events,
            batch_ms=args.batch_ms,
            writers=args.writers,
            max_bytes=args.max_bytes,
            data_dir=args.data_dir,
            embedded_broker_port=args.embedded_broker_port,
            admin_token_file=args.admin_token_file,
            enrol_broker_url=args.enrol_broker_url,
            ca_cert=args.ca_cert,
            hash_key_file=args.hash_key_file,
            mosquitto_passwd=args.mosquitto_passwd,
            mosquitto_acl=args.mosquitto_acl,
            mosquitto_pid_file=args.mosquitto_pid_file,
            mosquitto_reload_cmd=args.mosquitto_reload_cmd,
            broker_auth_interval_s=args.broker_auth_interval,
            embedded_allow_anonymous=args.embedded_anonymous,
            stuck_after_s=args.stuck_after,
            tls_cert=_path_or_env(args.tls_cert, TLS_CERT_ENV),
            tls_key=_path_or_env(args.tls_key, TLS_KEY_ENV),
            alert_webhooks=_webhooks(args.alert_webhook),
            alert_smtp=args.smtp or os.environ.get(SMTP_ENV) or None,
            alert_routes=args.alert_routes,
            rules_file=args.rules,
            webhook_mappings=tuple(args.webhook_mapping),
            public_url=args.public_url or os.environ.get(PUBLIC_URL_ENV) or None,
        )
    except SettingsError as exc:
        parser.error(str(exc))
    run_server(settings)
    return 0


def _path_or_env(given: Path | None, env: str) -> Path | None:
    value = os.environ.get(env)
    return given if given is not None else Path(value) if value else None


def _release(args: argparse.Namespace, db_url: str) -> int:
    from ingest_server.control import releases  # noqa: PLC0415
    from ingest_server.storage.migrate import migrate  # noqa: PLC0415
    from schemas.release import ReleaseError  # noqa: PLC0415

    try:
        with psycopg.connect(db_url, autocommit=True) as conn:
            migrate(conn)
            if args.action == "list":
                for r in releases.list_releases(conn):
                    print(f"{r.version}\t{r.size}\t{r.sha256}\t{r.created_at.isoformat()}")
                return 0
            sig_file = args.signature or args.wheel.with_name(args.wheel.name + ".sig")
            try:
                signature = sig_file.read_text()[:1024]
            except OSError as exc:
                print(f"ingest-server release: {sig_file}: {exc.strerror}", file=sys.stderr)
                return 1
            r = releases.add_release(conn, args.wheel, signature, args.release_pubkey, "cli")
    except ReleaseError as exc:
        print(f"ingest-server release: {exc}", file=sys.stderr)
        return 1
    except psycopg.Error as exc:
        print(f"ingest-server: database {mask(db_url)}: {exc}", file=sys.stderr)
        return 1
    print(f"release {r.version} added: {r.size} bytes, sha256 {r.sha256}, signature good")
    return 0


def _token(args: argparse.Namespace, db_url: str) -> int:
    from ingest_server.storage.migrate import migrate  # noqa: PLC0415
    from ingest_server.web.api import auth  # noqa: PLC0415

    try:
        with psycopg.connect(db_url, autocommit=True) as conn:
            migrate(conn)
            if args.action == "create":
                role = args.role or auth.role_of_scopes(args.scopes)
                token_id, token = auth.create_token(conn, args.name, role, args.schools)
                where = ", ".join(sorted(set(args.schools))) if args.schools else "all schools"
                print(f"token {token_id} ({args.name}, {role}, {where}):")
                print(token)
            elif args.action == "list":
                for t in auth.list_tokens(conn):
                    state = f"revoked {t.revoked_at:%Y-%m-%d}" if t.revoked_at else "active"
                    used = f"{t.last_used_at:%Y-%m-%d %H:%M}" if t.last_used_at else "never"
                    where = ",".join(t.schools) if t.schools else "all schools"
                    print(
                        f"{t.id:>5}  {t.name:<30} {t.role:<14} {state:<18} used {used:<16}  {where}"
                    )
            elif not auth.revoke_token(conn, args.id):
                print(f"ingest-server: no active token with id {args.id}", file=sys.stderr)
                return 1
            else:
                print(f"token {args.id} revoked")
    except (psycopg.Error, ValueError) as exc:
        print(f"ingest-server: {exc}", file=sys.stderr)
        return 1
    return 0


def _enrol_code(args: argparse.Namespace, db_url: str) -> int:
    from ingest_server.control import enrolment  # noqa: PLC0415
    from ingest_server.storage.migrate import migrate  # noqa: PLC0415

    try:
        with psycopg.connect(db_url, autocommit=True) as conn:
            migrate(conn)
            if args.action == "create":
                code, expires = enrolment.create_code(
                    conn,
                    args.school,
                    room=args.room,
                    kind=args.kind,
                    replaces=args.replaces,
                    ttl_s=enrolment.parse_ttl(args.ttl),
                )
                print(
                    f"enrolment code for school {args.school}"
                    f" (valid until {expires:%Y-%m-%d %H:%M %Z}):"
                )
                print(code)
            else:
                for c in enrolment.list_codes(conn):
                    state = (
                        f"used by {c.device_id}"
                        if c.used_at
                        else f"expires {c.expires_at:%Y-%m-%d %H:%M}"
                    )
                    print(
                        f"{c.id:>5}  {c.school_id:<16} {c.room or '-':<8}"
                        f" {c.kind or '-':<16} {state}"
                    )
    except enrolment.EnrolmentError as exc:
        print(f"ingest-server: {exc.detail}", file=sys.stderr)
        return 1
    except (psycopg.Error, ValueError) as exc:
        print(f"ingest-server: {exc}", file=sys.stderr)
        return 1
    return 0


def _broker_auth(args: argparse.Namespace, db_url: str) -> int:
    from ingest_server.control import broker_auth as ba  # noqa: PLC0415

    password = None
    try:
        if args.server_password_file is not None:
            password = args.server_password_file.read_text(encoding="utf-8").strip()
        if (args.server_user is None) != (password is None):
            print(
                "ingest-server: --server-user and --server-password-file go together",
                file=sys.stderr,
            )
            return 2
        with psycopg.connect(db_url, autocommit=True) as conn:
            server_hash = None
            if args.server_user is not None and password is not None:
                server_hash = ba.server_hash_for(args.passwd, args.server_user, password)
            rules = ba.load_rules(conn, args.server_user, server_hash)
        done = ba.write_files(
            rules, ba.FileTargets(args.passwd, args.acl, args.pid_file, args.reload_cmd)
        )
    except (psycopg.Error, OSError, ba.BrokerAuthError) as exc:
        print(f"ingest-server: {exc}", file=sys.stderr)
        return 1
    print(done or f"{args.passwd} and {args.acl} are up to date ({len(rules.devices)} devices)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
