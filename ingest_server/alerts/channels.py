"""Where alert notifications go: webhooks (plain JSON, WeCom and DingTalk group robots) and e-mail.

A receiver is made from a URL (:func:`parse_receiver`); its ``send`` delivers one notification or
raises :class:`DeliveryError` saying whether trying again can help. Secrets ride in these URLs
(a robot's key or token, an SMTP password): only :func:`mask_url` forms of them are ever logged
or stored.

- ``https://host/path`` (or ``webhook+https://``): POST the notification as JSON; any 2xx is
  delivered.
- ``wecom+https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=KEY``: a WeCom (企业微信) group
  robot, ``msgtype`` markdown (``&msgtype=text`` for text); delivered when it answers
  ``errcode`` 0.
- ``dingtalk+https://oapi.dingtalk.com/robot/send?access_token=T[&secret=SEC…]``: a DingTalk
  (钉钉) group robot, markdown or text likewise; with ``secret`` each request is signed
  (``timestamp`` + HMAC-SHA256 ``sign``). ``msgtype`` and ``secret`` are ours: never sent.
- ``smtp://[user:pass@]host[:587]?from=A&to=B[,C]`` (STARTTLS required unless
  ``&starttls=off``, for a relay on loopback) or ``smtps://…:465`` (TLS from the start);
  ``&ca=PEM`` for a private CA.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import smtplib
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any, Final, Protocol
from urllib.parse import SplitResult, parse_qs, quote_plus, unquote, urlencode, urlsplit, urlunsplit

#: Seconds a receiver has to answer one notification (connect + send + reply).
DEFAULT_TIMEOUT_S: Final = 10.0
#: Most of a receiver's answer that is read (the vendors' answers are tens of bytes).
MAX_ANSWER_BYTES: Final = 64 * 1024
#: WeCom's documented content limits (bytes of UTF-8): text 2048, markdown 4096.
WECOM_LIMITS: Final = {"text": 2048, "markdown": 4096}
#: DingTalk's bodies stay far below its 20,000-byte limit at this size.
DINGTALK_LIMIT: Final = 4096
#: ``errcode`` values that mean "too many / busy, try later" (WeCom 45009 and -1; DingTalk
#: 130101 "send too fast"); any other non-zero code will not get better by retrying.
RETRYABLE_ERRCODES: Final = frozenset({-1, 45009, 130101})
_HTTP_RETRY: Final = frozenset({408, 425, 429})

SEVERITY_ZH: Final = {"info": "提示", "warning": "警告", "critical": "严重"}
TRANSITION_ZH: Final = {
    "opened": "新告警",
    "reopened": "告警复发",
    "acknowledged": "已确认",
    "resolved": "已解决",
}
#: WeCom markdown's three colours, by severity.
_WECOM_COLOUR: Final = {"info": "comment", "warning": "warning", "critical": "warning"}


class ReceiverError(ValueError):
    """A receiver URL is unusable; the message names it (masked) and says why."""


@dataclass(frozen=True, slots=True)
class DeliveryError(Exception):
    """A notification was not delivered: ``reason`` (safe to log and store), ``retry``."""

    reason: str
    retry: bool = True

    def __str__(self) -> str:
        return self.reason


class Receiver(Protocol):
    """Something that takes notifications."""

    @property
    def name(self) -> str:
        """Its name in routes and in ``alert_notifications.receiver``."""
        ...

    @property
    def label(self) -> str:
        """The receiver without its secrets, for logs."""
        ...

    def send(self, notification: Mapping[str, Any]) -> None:
        """Deliver one notification, or raise :class:`DeliveryError`."""
        ...


def mask_url(url: str) -> str:
    """``url`` with its password and every query value replaced by ``***``: safe to log."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparseable URL>"
    user = ""
    if parts.username is not None:
        user = f"{parts.username}{':***' if parts.password is not None else ''}@"
    query = "&".join(f"{k}=***" for k in parse_qs(parts.query, keep_blank_values=True))
    netloc = f"{user}{f'[{host}]' if ':' in host else host}{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


# ---- what a notification says ----


def _clean(value: object, limit: int = 500) -> str:
    """One line of at most ``limit`` characters, without control characters."""
    text = "" if value is None else str(value)
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def title(n: Mapping[str, Any]) -> str:
    """A short title; it carries "告警"/"alert" (DingTalk robots may be set to need a keyword)."""
    sev = str(n.get("severity", ""))
    return _clean(
        f"campus-edge 告警 alert [{SEVERITY_ZH.get(sev, sev)} {sev}] "
        f"{TRANSITION_ZH.get(str(n.get('transition')), '')} {n.get('transition')}: {n.get('rule')}",
        200,
    )


def _where(n: Mapping[str, Any]) -> str:
    room = f" · 教室 room {n['room']}" if n.get("room") else ""
    return f"学校 school {n.get('school_id')}{room} · 设备 device {n.get('device_id')}"


def _who(n: Mapping[str, Any]) -> str:
    by = n.get("by_whom")
    return f" (by {by})" if by else ""


def message(n: Mapping[str, Any]) -> str:
    """The readable one-line message of a notification."""
    return _clean(
        f"{title(n)}{_who(n)} — {n.get('message')} — {_where(n)}; opened {n.get('opened_at')}",
        1000,
    )


def text_body(n: Mapping[str, Any]) -> str:
    """Plain text over several lines: e-mail and text robot messages."""
    lines = [
        title(n) + _who(n),
        _clean(n.get("message"), 1000),
        _where(n),
        f"状态 state: {n.get('state')} · 规则 rule: {n.get('rule')}"
        f" · 告警 alert #{n.get('alert_id')}",
        f"开始 opened: {n.get('opened_at')} · 时间 at: {n.get('at')}",
    ]
    if n.get("acknowledged_by"):
        lines.append(f"确认 acknowledged by {_clean(n['acknowledged_by'], 100)}")
    return "\n".join(lines)


def markdown_body(n: Mapping[str, Any], *, wecom: bool) -> str:
    """Markdown as the robots render it (WeCom's subset: headings, quotes, ``<font color>``)."""
    sev = str(n.get("severity", ""))
    sev_text = f"{SEVERITY_ZH.get(sev, sev)} {sev}"
    if wecom:
        sev_text = f'<font color="{_WECOM_COLOUR.get(sev, "comment")}">{sev_text}</font>'
    lines = [
        f"### {title(n)}",
        f"> 级别 severity: {sev_text}",
        f"> 状态 state: {n.get('state')}{_who(n)}",
        f"> {_where(n)}",
        f"> 开始 opened: {n.get('opened_at')}",
        "",
        _clean(n.get("message"), 1000),
    ]
    return "\n".join(lines)


def _fit(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` bytes of UTF-8 without splitting a character."""
    raw = text.encode()
    if len(raw) <= limit:
        return text
    return raw[: limit - 3].decode(errors="ignore") + "…"


# ---- HTTP ----


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A receiver that redirects is misconfigured: a POST is never replayed elsewhere."""

    def redirect_request(self, *_args: Any, **_kwargs: Any) -> None:
        return None


_OPENER: Final = urllib.request.build_opener(_NoRedirect)


def _post_json(
    url: str, body: Mapping[str, Any], timeout: float, headers: Mapping[str, str]
) -> bytes:
    data = json.dumps(body, ensure_ascii=False).encode()
    req = urllib.request.Request(  # noqa: S310  # the scheme is checked to be http(s) at parse
        url,
        data=data,
        method="POST",
        headers={"Content-Type": "application/json; charset=utf-8", **headers},
    )
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return bytes(resp.read(MAX_ANSWER_BYTES))
    except urllib.error.HTTPError as exc:
        code = exc.code
        exc.close()
        retry = code >= 500 or code in _HTTP_RETRY
        raise DeliveryError(f"HTTP {code}", retry=retry) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DeliveryError(f"cannot reach the receiver: {_clean(reason, 200)}") from None


def _check_errcode(answer: bytes) -> None:
    """The robots answer HTTP 200 with ``{"errcode": 0, "errmsg": "ok"}`` when delivered."""
    try:
        parsed = json.loads(answer)
        code = int(parsed["errcode"])
    except (ValueError, TypeError, KeyError):
        raise DeliveryError(f"unexpected answer {_clean(answer[:200], 200)!r}") from None
    if code != 0:
        errmsg = _clean(parsed.get("errmsg"), 200)
        raise DeliveryError(f"errcode {code}: {errmsg}", retry=code in RETRYABLE_ERRCODES)


def _http_parts(url: str, scheme: str) -> SplitResult:
    parts = urlsplit(url)
    if parts.scheme != scheme or not parts.hostname:
        raise ReceiverError(f"alert receiver {mask_url(url)}: needs an http(s)://host/… URL")
    try:
        _ = parts.port
    except ValueError:
        raise ReceiverError(f"alert receiver {mask_url(url)}: invalid port") from None
    return parts


@dataclass(frozen=True, slots=True)
class WebhookReceiver:
    """POST the notification as JSON (UTF-8); any 2xx is delivered."""

    name: str
    url: str = field(repr=False)  # holds the key or token
    timeout: float = DEFAULT_TIMEOUT_S

    @property
    def label(self) -> str:
        return f"webhook {mask_url(self.url)}"

    def send(self, notification: Mapping[str, Any]) -> None:
        body = {**notification, "message": message(notification)}
        headers = {"X-Campus-Notification-Id": str(notification.get("notification_id", ""))}
        _post_json(self.url, body, self.timeout, headers)


@dataclass(frozen=True, slots=True)
class WeComReceiver:
    """A WeCom (企业微信) group robot: ``{"msgtype": "markdown", "markdown": {"content"}}``."""

    name: str
    url: str = field(repr=False)  # holds the key or token
    msgtype: str = "markdown"
    timeout: float = DEFAULT_TIMEOUT_S

    @property
    def label(self) -> str:
        return f"wecom {mask_url(self.url)}"

    def body(self, n: Mapping[str, Any]) -> dict[str, Any]:
        text = text_body(n) if self.msgtype == "text" else markdown_body(n, wecom=True)
        return {
            "msgtype": self.msgtype,
            self.msgtype: {"content": _fit(text, WECOM_LIMITS[self.msgtype])},
        }

    def send(self, notification: Mapping[str, Any]) -> None:
        _check_errcode(_post_json(self.url, self.body(notification), self.timeout, {}))


@dataclass(frozen=True, slots=True)
class DingTalkReceiver:
    """A DingTalk (钉钉) group robot; signed when it has a ``secret`` (加签)."""

    name: str
    url: str = field(repr=False)  # holds the key or token
    msgtype: str = "markdown"
    secret: str | None = field(default=None, repr=False)
    timeout: float = DEFAULT_TIMEOUT_S

    @property
    def label(self) -> str:
        return f"dingtalk {mask_url(self.url)}{' (signed)' if self.secret else ''}"

    def body(self, n: Mapping[str, Any]) -> dict[str, Any]:
        if self.msgtype == "text":
            return {"msgtype": "text", "text": {"content": _fit(text_body(n), DINGTALK_LIMIT)}}
        return {
            "msgtype": "markdown",
            "markdown": {
                "title": title(n),
                "text": _fit(markdown_body(n, wecom=False), DINGTALK_LIMIT),
            },
        }

    def signed_url(self, now_ms: int | None = None) -> str:
        """The URL with ``timestamp`` and ``sign`` (HMAC-SHA256 of "timestamp\\nsecret",
        base64, URL-encoded) when there is a secret."""
        if not self.secret:
            return self.url
        stamp = str(now_ms if now_ms is not None else round(time.time() * 1000))
        digest = hmac.new(self.secret.encode(), f"{stamp}\n{self.secret}".encode(), hashlib.sha256)
        sign = quote_plus(base64.b64encode(digest.digest()))
        return f"{self.url}{'&' if '?' in self.url else '?'}timestamp={stamp}&sign={sign}"

    def send(self, notification: Mapping[str, Any]) -> None:
        _check_errcode(_post_json(self.signed_url(), self.body(notification), self.timeout, {}))


@dataclass(frozen=True, slots=True)
class SmtpReceiver:
    """E-mail over SMTP: STARTTLS (required unless ``starttls=off``) or implicit TLS."""

    name: str
    host: str
    port: int
    sender: str
    recipients: tuple[str, ...]
    implicit_tls: bool = False
    starttls: bool = True
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca: str | None = None
    timeout: float = DEFAULT_TIMEOUT_S

    @property
    def label(self) -> str:
        scheme = "smtps" if self.implicit_tls else "smtp"
        user = f"{self.username}:***@" if self.username else ""
        return f"{scheme}://{user}{self.host}:{self.port} to {len(self.recipients)} recipient(s)"

    def email(self, n: Mapping[str, Any]) -> EmailMessage:
        msg = EmailMessage()
        msg["Subject"] = title(n)
        msg["From"] = self.sender
        msg["To"] = ", ".join(self.recipients)
        msg["Message-ID"] = make_msgid(f"alert{n.get('alert_id')}.n{n.get('notification_id')}")
        msg.set_content(text_body(n) + "\n", charset="utf-8")
        return msg

    def send(self, notification: Mapping[str, Any]) -> None:
        context = ssl.create_default_context(cafile=self.ca)
        try:
            if self.implicit_tls:
                client: smtplib.SMTP = smtplib.SMTP_SSL(
                    self.host, self.port, timeout=self.timeout, context=context
                )
            else:
                client = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
            with client:
                if not self.implicit_tls and self.starttls:
                    client.starttls(context=context)
                if self.username is not None:
                    client.login(self.username, self.password or "")
                client.send_message(self.email(notification))
        except smtplib.SMTPAuthenticationError as exc:
            raise DeliveryError(f"SMTP login refused ({exc.smtp_code})", retry=False) from None
        except smtplib.SMTPNotSupportedError:
            raise DeliveryError("the SMTP server offers no STARTTLS", retry=False) from None
        except smtplib.SMTPResponseException as exc:
            # 4xx: try later; 5xx: the server will not take it
            raise DeliveryError(
                f"SMTP {exc.smtp_code}: {_clean(exc.smtp_error, 200)}", retry=exc.smtp_code < 500
            ) from None
        except smtplib.SMTPRecipientsRefused as exc:
            raise DeliveryError(
                f"SMTP refused {len(exc.recipients)} recipient(s)", retry=False
            ) from None
        except (smtplib.SMTPException, OSError) as exc:
            raise DeliveryError(f"SMTP: {_clean(exc, 200)}") from None


# ---- parsing ----


def _query(parts: SplitResult, allowed: set[str], url: str) -> dict[str, str]:
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = set(query) - allowed
    if unknown and allowed:
        raise ReceiverError(f"alert receiver {mask_url(url)}: unknown parameters {sorted(unknown)}")
    return {k: v[-1] for k, v in query.items()}


def _robot(name: str, url: str, kind: str, timeout: float) -> WeComReceiver | DingTalkReceiver:
    inner = url.split("+", 1)[1]
    parts = urlsplit(inner)
    if parts.scheme not in ("http", "https"):
        raise ReceiverError(f"alert receiver {mask_url(url)}: {kind}+https://… expected")
    _http_parts(inner, parts.scheme)
    query = parse_qs(parts.query, keep_blank_values=True)
    msgtype = query.pop("msgtype", ["markdown"])[-1]
    if msgtype not in ("markdown", "text"):
        raise ReceiverError(f"alert receiver {mask_url(url)}: msgtype must be markdown or text")
    secret = query.pop("secret", [None])[-1]
    if secret is not None and kind == "wecom":
        raise ReceiverError(f"alert receiver {mask_url(url)}: WeCom robots are not signed")
    target = urlunsplit(parts._replace(query=urlencode(query, doseq=True), fragment=""))
    if kind == "wecom":
        return WeComReceiver(name, target, msgtype, timeout)
    return DingTalkReceiver(name, target, msgtype, secret or None, timeout)


def _smtp(name: str, url: str, timeout: float) -> SmtpReceiver:
    parts = urlsplit(url)
    implicit = parts.scheme == "smtps"
    if not parts.hostname:
        raise ReceiverError(f"alert receiver {mask_url(url)}: no host")
    try:
        port = parts.port or (465 if implicit else 587)
    except ValueError:
        raise ReceiverError(f"alert receiver {mask_url(url)}: invalid port") from None
    q = _query(parts, {"from", "to", "starttls", "ca"}, url)
    recipients = tuple(a.strip() for a in q.get("to", "").split(",") if a.strip())
    if not q.get("from") or not recipients:
        raise ReceiverError(f"alert receiver {mask_url(url)}: needs ?from=ADDRESS&to=ADDRESS[,…]")
    starttls = q.get("starttls", "required")
    if starttls not in ("required", "off"):
        raise ReceiverError(f"alert receiver {mask_url(url)}: starttls must be required or off")
    if starttls == "off" and not implicit and parts.password is not None:
        raise ReceiverError(
            f"alert receiver {mask_url(url)}: a password is never sent without TLS "
            "(starttls=off is for a relay without login)"
        )
    return SmtpReceiver(
        name=name,
        host=parts.hostname,
        port=port,
        sender=q["from"],
        recipients=recipients,
        implicit_tls=implicit,
        starttls=starttls == "required",
        username=unquote(parts.username) if parts.username is not None else None,
        password=unquote(parts.password) if parts.password is not None else None,
        ca=q.get("ca"),
        timeout=timeout,
    )


def parse_receiver(name: str, url: str, timeout: float = DEFAULT_TIMEOUT_S) -> Receiver:
    """The receiver a URL names; :class:`ReceiverError` (URL masked) when it is unusable."""
    url = url.strip()
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("wecom+https", "wecom+http"):
        return _robot(name, url, "wecom", timeout)
    if scheme in ("dingtalk+https", "dingtalk+http"):
        return _robot(name, url, "dingtalk", timeout)
    if scheme in ("smtp", "smtps"):
        return _smtp(name, url, timeout)
    if scheme in ("webhook+https", "webhook+http"):
        url = url.split("+", 1)[1]
        scheme = scheme.split("+", 1)[1]
    if scheme in ("http", "https"):
        _http_parts(url, scheme)
        return WebhookReceiver(name, url, timeout)
    raise ReceiverError(
        f"alert receiver {mask_url(url)}: use http(s)://, wecom+https://, dingtalk+https://, "
        "smtp:// or smtps://"
    )
