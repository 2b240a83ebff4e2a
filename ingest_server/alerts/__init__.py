"""Alerts: the rule engine, the alerts API and the notifications of issue 19."""
