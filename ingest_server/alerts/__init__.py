"""Alerts (issue 19): rules on the committed stream and device state (``rules``, ``config``),
their lifecycle in ``alerts`` / ``alert_events`` (``store``), the engine thread that runs them
(``engine``), and the notifier that tells people (``notify``, ``channels``); see docs/alerts.md."""
