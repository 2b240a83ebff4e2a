"""Ingest server: MQTT consumer → validated batches → PostgreSQL/TimescaleDB, HTTP API."""
