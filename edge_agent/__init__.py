"""Edge agent: drivers, durable outbox, MQTT publisher, commands, config, technician CLI."""
