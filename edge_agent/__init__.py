"""Edge agent: drivers → durable outbox → MQTT publisher, plus commands, config and the technician CLI."""
