-- The device listing's order, (school_id, device_id): a page (and its keyset cursor, or one
-- school's devices) is read off this index instead of sorting the whole registry per page.
CREATE INDEX IF NOT EXISTS devices_school_device_idx ON devices (school_id, device_id);
