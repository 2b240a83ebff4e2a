"""Alerts (issue 19): rules on the committed stream and device state (``rules``, ``config``),
their lifecycle in ``alerts`` / ``alert_events`` (``store``), and the engine thread that runs
them (``engine``); see docs/alerts.md."""
