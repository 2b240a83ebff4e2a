"""The hot path: MQTT session and codec, consumer threads, batches, COPY encoding, the writer."""
