"""Security headers on every HTTP response: a strict Content-Security-Policy for the dashboard,
``default-src 'none'`` for the API (JSON is never a page), no framing, no sniffing, no referrer.

A pure ASGI middleware (no body buffering), so the live stream's server-sent events pass
through untouched. A header a route set itself (``/docs`` sets its own policy) is kept.
"""

from __future__ import annotations

from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: The dashboard: its own scripts, styles and API only; nothing inline, nothing framed.
DASHBOARD_CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
#: Everything else (JSON, CSV, event streams): nothing in it may load or run anything.
API_CSP: Final = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'"

_COMMON: Final = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)


def _policy(path: str) -> bytes:
    if path == "/dashboard" or path.startswith("/dashboard/"):
        return DASHBOARD_CSP.encode()
    return API_CSP.encode()


class SecurityHeaders:
    """Adds the headers above to each HTTP response that does not already carry them."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = _policy(scope["path"])

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers: list[tuple[bytes, bytes]] = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers.extend(h for h in _COMMON if h[0] not in present)
                if b"content-security-policy" not in present:
                    headers.append((b"content-security-policy", policy))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
