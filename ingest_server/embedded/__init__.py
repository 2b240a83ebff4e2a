"""The embedded default mode: an in-process MQTT broker (:mod:`.broker`) and a private
PostgreSQL (:mod:`.postgres`), so one machine runs the whole pipeline with nothing installed."""


class EmbeddedError(RuntimeError):
    """The embedded broker or database could not be started."""


__all__ = ["EmbeddedError"]
