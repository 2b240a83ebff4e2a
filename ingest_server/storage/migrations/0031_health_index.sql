-- Each device's latest agent.health, which the device listing joins for every device shown:
-- a partial index holds only the health rows, so a device that never reports health costs
-- one empty probe instead of a walk back through its taps. (A few rows per device per hour.)
CREATE INDEX IF NOT EXISTS events_health_idx ON events (device_id, seq) WHERE type = 'agent.health';
