"""``python -m ingest_server`` is ``ingest-server``."""

from ingest_server.cli import main

raise SystemExit(main())
