-- The alert engine's offline check (ingest_server/alerts/): devices whose last event is older
-- than a few minutes, found on an index instead of by reading the whole registry every tick.
CREATE INDEX IF NOT EXISTS devices_last_seen_idx ON devices (last_seen);
