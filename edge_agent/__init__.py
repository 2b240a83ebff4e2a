"""Edge agent: drivers, durable outbox, MQTT publisher, commands, config, technician CLI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("campus-edge")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
