"""Hardware drivers: each reads one protocol and yields contract events. No MQTT, no storage."""
