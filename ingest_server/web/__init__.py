"""The HTTP side: the app, API routers, live stream, dashboard, docs, TLS and headers."""
