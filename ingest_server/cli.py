"""``ingest-server run`` and ``ingest-server migrate``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import psycopg

from ingest_server.settings import Settings, SettingsError, mask, parse_http

BROKER_ENV = "CAMPUS_BROKER_URL"
DB_ENV = "CAMPUS_DB_URL"
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
    run.add_argument("--client-id", metavar="ID", default=_DEFAULTS.client_id)
    run.add_argument("--share-group", metavar="G", help="consume $share/G/... (MQTT 5 only)")
    run.add_argument("--batch-events", metavar="N", type=int, default=_DEFAULTS.batch_events)
    run.add_argument("--batch-ms", metavar="T", type=int, default=_DEFAULTS.batch_ms)
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
        "--embedded-broker-port",
        metavar="PORT",
        type=int,
        default=_DEFAULTS.embedded_broker_port,
        help="embedded mode (0: any free port)",
    )

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
    create.add_argument(
        "--scope", action="append", choices=["read", "admin"], required=True, dest="scopes"
    )
    tok_sub.add_parser("list", help="list tokens (never the tokens themselves)")
    revoke = tok_sub.add_parser("revoke", help="revoke a token by id")
    revoke.add_argument("id", type=int)

    mig = sub.add_parser("migrate", help="apply pending database migrations and exit")
    mig.add_argument("--db", metavar="URL", help=f"libpq URL (default ${DB_ENV})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # the demo parses its own options
        from simulators.demo import main as demo_main  # noqa: PLC0415  # simulators are optional

        return demo_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    db_url = args.db or os.environ.get(DB_ENV) or None

    if args.command == "migrate":
        from ingest_server.migrate import migrate_url  # noqa: PLC0415

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
            max_bytes=args.max_bytes,
            data_dir=args.data_dir,
            embedded_broker_port=args.embedded_broker_port,
            admin_token_file=args.admin_token_file,
        )
    except SettingsError as exc:
        parser.error(str(exc))
    run_server(settings)
    return 0


def _token(args: argparse.Namespace, db_url: str) -> int:
    from ingest_server.api import auth  # noqa: PLC0415
    from ingest_server.migrate import migrate  # noqa: PLC0415

    try:
        with psycopg.connect(db_url, autocommit=True) as conn:
            migrate(conn)
            if args.action == "create":
                token_id, token = auth.create_token(conn, args.name, args.scopes)
                print(f"token {token_id} ({args.name}, {', '.join(sorted(set(args.scopes)))}):")
                print(token)
            elif args.action == "list":
                for t in auth.list_tokens(conn):
                    state = f"revoked {t.revoked_at:%Y-%m-%d}" if t.revoked_at else "active"
                    used = f"{t.last_used_at:%Y-%m-%d %H:%M}" if t.last_used_at else "never"
                    print(
                        f"{t.id:>5}  {t.name:<30} {','.join(t.scopes):<11} {state:<18} used {used}"
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


if __name__ == "__main__":
    raise SystemExit(main())
