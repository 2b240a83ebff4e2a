"""A simulated ONVIF IP camera: SOAP 1.2 over HTTP on 127.0.0.1, no frames.

Written from the ONVIF Core and Device Management / Event Service specifications (the message
shapes of ``devicemgmt.wsdl``, ``event.wsdl``, ``onvif.xsd`` and OASIS WS-BaseNotification),
independently of the driver. It answers:

- device management: ``GetSystemDateAndTime`` (without credentials, as the spec allows),
  ``GetDeviceInformation``, ``GetServices``, ``GetCapabilities``;
- events: ``CreatePullPointSubscription`` → a subscription address of its own, on which
  ``PullMessages`` (long-polled up to its ``Timeout``, at most ``MessageLimit`` messages),
  ``Renew`` and ``Unsubscribe`` work; a subscription past its termination time is gone (a
  ``wsrf-rw:ResourceUnknownFault``-style fault).

Every request but ``GetSystemDateAndTime`` must carry a WS-Security UsernameToken with the
password digest (``Base64(SHA-1(nonce + created + password))``); otherwise a ``NotAuthorized``
SOAP fault. Tests raise events with :meth:`OnvifCamera.raise_event` (motion, tamper, video loss
in the topics real cameras use) and read what happened from the counters.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import re
import threading
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Final, Self
from xml.sax.saxutils import escape, quoteattr

SOAP: Final = "http://www.w3.org/2003/05/soap-envelope"
WSSE: Final = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
WSU: Final = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"
TDS: Final = "http://www.onvif.org/ver10/device/wsdl"
TEV: Final = "http://www.onvif.org/ver10/events/wsdl"
TT: Final = "http://www.onvif.org/ver10/schema"
WSNT: Final = "http://docs.oasis-open.org/wsn/b-2"
WSA: Final = "http://www.w3.org/2005/08/addressing"
TNS1: Final = "http://www.onvif.org/ver10/topics"
CONCRETE_SET: Final = "http://www.onvif.org/ver10/tev/topicExpression/ConcreteSet"

#: The largest request body read; a real camera's SOAP requests are a few kB.
MAX_BODY: Final = 64 * 1024
#: Pending notifications kept per subscription (the oldest are dropped past this).
MAX_QUEUE: Final = 1000

#: kind → (topic, data item name, source item name) as common cameras send them.
TOPICS: Final[dict[str, tuple[str, str, str]]] = {
    "motion": (
        "tns1:RuleEngine/CellMotionDetector/Motion",
        "IsMotion",
        "VideoSourceConfigurationToken",
    ),
    "motion_alarm": ("tns1:VideoSource/MotionAlarm", "State", "Source"),
    "tamper": (
        "tns1:RuleEngine/TamperDetector/Tamper",
        "IsTamper",
        "VideoSourceConfigurationToken",
    ),
    "scene_change": ("tns1:VideoSource/GlobalSceneChange/ImagingService", "State", "Source"),
    "video_loss": ("tns1:VideoSource/SignalLoss", "State", "Source"),
    "storage": ("tns1:Device/HardwareFailure/StorageFailure", "Failed", "Token"),
}


@dataclass
class _Subscription:
    sid: int
    expires: datetime
    queue: deque[str] = field(default_factory=lambda: deque(maxlen=MAX_QUEUE))


@dataclass
class Counters:
    subscriptions: int = 0
    pulls: int = 0
    messages_sent: int = 0
    auth_failures: int = 0
    device_info: int = 0
    #: Every operation's name, in order (bounded).
    operations: deque[str] = field(default_factory=lambda: deque(maxlen=500))


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


_DURATION = re.compile(r"^PT(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?$")


def _duration(text: str | None, default: float) -> float:
    """An ``xs:duration`` of the form PTnHnMnS in seconds (the forms cameras are sent)."""
    m = _DURATION.match((text or "").strip())
    if not m or not any(m.groups()):
        return default
    h, mi, s = m.groups()
    return int(h or 0) * 3600 + int(mi or 0) * 60 + float(s or 0)


class OnvifCamera:
    """One camera; ``with OnvifCamera(...) as cam:`` serves it on ``cam.port``."""

    def __init__(
        self,
        *,
        username: str = "admin",
        password: str = "secret",  # noqa: S107 - a simulator's test account
        manufacturer: str = "CampusCam",
        model: str = "CC-2040",
        firmware: str = "5.7.3",
        serial: str = "CC2040-0001",
    ) -> None:
        self.username = username
        self.password = password
        self.info = (manufacturer, model, firmware, serial)
        self.counters = Counters()
        self._subs: dict[int, _Subscription] = {}
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        #: Current state per (kind, source): what a new subscription is told as "Initialized".
        self._state: dict[tuple[str, str], bool] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        with self._cond:
            self._subs.clear()
            self._cond.notify_all()
        self._server.shutdown()
        self._server.server_close()

    # -- what tests do ---------------------------------------------------------------------

    def raise_event(self, kind: str, active: bool, *, source: str = "VideoSource_1") -> None:
        """The camera detects (or stops detecting) ``kind`` (a key of :data:`TOPICS`)."""
        with self._cond:
            self._state[(kind, source)] = active
            message = self._notification(kind, active, source, "Changed")
            for sub in self._subs.values():
                sub.queue.append(message)
            self._cond.notify_all()

    def subscriptions(self) -> int:
        with self._cond:
            return len(self._subs)

    # -- SOAP ------------------------------------------------------------------------------

    def _notification(self, kind: str, active: bool, source: str, operation: str) -> str:
        topic, data_name, source_name = TOPICS[kind]
        value = "true" if active else "false"
        return (
            f"<wsnt:NotificationMessage>"
            f'<wsnt:Topic Dialect="{CONCRETE_SET}">{escape(topic)}</wsnt:Topic>'
            f"<wsnt:Message>"
            f'<tt:Message UtcTime="{_iso(_now())}" PropertyOperation="{operation}">'
            f"<tt:Source><tt:SimpleItem Name={quoteattr(source_name)} Value={quoteattr(source)}/>"
            f"</tt:Source>"
            f'<tt:Data><tt:SimpleItem Name={quoteattr(data_name)} Value="{value}"/></tt:Data>'
            f"</tt:Message></wsnt:Message></wsnt:NotificationMessage>"
        )

    def _authorised(self, header: ET.Element | None) -> bool:
        token = None if header is None else header.find(f".//{{{WSSE}}}UsernameToken")
        if token is None:
            return False
        user = token.findtext(f"{{{WSSE}}}Username")
        digest = token.findtext(f"{{{WSSE}}}Password")
        nonce = token.findtext(f"{{{WSSE}}}Nonce")
        created = token.findtext(f"{{{WSU}}}Created")
        if not (user and digest and nonce and created) or user != self.username:
            return False
        try:
            raw_nonce = base64.b64decode(nonce)
        except ValueError:
            return False
        # SHA-1 is what WS-Security's UsernameToken PasswordDigest is defined with
        secret = raw_nonce + created.encode() + self.password.encode()
        expected = hashlib.sha1(secret).digest()  # noqa: S324
        return base64.b64encode(expected).decode() == digest.strip()

    def handle(self, path: str, body: bytes) -> tuple[int, str]:
        """One SOAP request → (HTTP status, envelope)."""
        try:
            # the driver under test on loopback, at most MAX_BODY bytes
            root = ET.fromstring(body)  # noqa: S314
        except ET.ParseError as exc:
            return 400, _fault("env:Sender", "ter:WellFormed", f"not XML: {exc}")
        soap_body = root.find(f"{{{SOAP}}}Body")
        if soap_body is None or len(soap_body) == 0:
            return 400, _fault("env:Sender", "ter:WellFormed", "no SOAP 1.2 Body")
        request = soap_body[0]
        op = request.tag.rsplit("}", 1)[-1]
        self.counters.operations.append(op)
        if op == "GetSystemDateAndTime":
            return 200, _envelope(self._date_and_time())
        if not self._authorised(root.find(f"{{{SOAP}}}Header")):
            self.counters.auth_failures += 1
            return 400, _fault("env:Sender", "ter:NotAuthorized", "Sender not Authorized")
        if path.startswith("/onvif/subscription/"):
            return self._subscription_op(path, op, request)
        answer: Callable[[], str] | None = {
            "GetDeviceInformation": self._device_information,
            "GetServices": self._services,
            "GetCapabilities": self._capabilities,
            "CreatePullPointSubscription": lambda: self._subscribe(request),
        }.get(op)
        if answer is None:
            return 400, _fault("env:Receiver", "ter:ActionNotSupported", f"{op} not supported")
        return 200, _envelope(answer())

    def _date_and_time(self) -> str:
        t = _now()
        return (
            f'<tds:GetSystemDateAndTimeResponse xmlns:tds="{TDS}" xmlns:tt="{TT}">'
            "<tds:SystemDateAndTime><tt:DateTimeType>NTP</tt:DateTimeType>"
            "<tt:DaylightSavings>false</tt:DaylightSavings>"
            "<tt:TimeZone><tt:TZ>CST-8</tt:TZ></tt:TimeZone><tt:UTCDateTime>"
            f"<tt:Time><tt:Hour>{t.hour}</tt:Hour><tt:Minute>{t.minute}</tt:Minute>"
            f"<tt:Second>{t.second}</tt:Second></tt:Time>"
            f"<tt:Date><tt:Year>{t.year}</tt:Year><tt:Month>{t.month}</tt:Month>"
            f"<tt:Day>{t.day}</tt:Day></tt:Date>"
            "</tt:UTCDateTime></tds:SystemDateAndTime></tds:GetSystemDateAndTimeResponse>"
        )

    def _device_information(self) -> str:
        self.counters.device_info += 1
        manufacturer, model, firmware, serial = (escape(v) for v in self.info)
        return (
            f'<tds:GetDeviceInformationResponse xmlns:tds="{TDS}">'
            f"<tds:Manufacturer>{manufacturer}</tds:Manufacturer><tds:Model>{model}</tds:Model>"
            f"<tds:FirmwareVersion>{firmware}</tds:FirmwareVersion>"
            f"<tds:SerialNumber>{serial}</tds:SerialNumber>"
            "<tds:HardwareId>1.0</tds:HardwareId></tds:GetDeviceInformationResponse>"
        )

    def _services(self) -> str:
        def service(ns: str, path: str) -> str:
            return (
                f"<tds:Service><tds:Namespace>{ns}</tds:Namespace>"
                f"<tds:XAddr>{self.base}{path}</tds:XAddr>"
                "<tds:Version><tt:Major>2</tt:Major><tt:Minor>60</tt:Minor></tds:Version>"
                "</tds:Service>"
            )

        return (
            f'<tds:GetServicesResponse xmlns:tds="{TDS}" xmlns:tt="{TT}">'
            f"{service(TDS, '/onvif/device_service')}{service(TEV, '/onvif/events_service')}"
            "</tds:GetServicesResponse>"
        )

    def _capabilities(self) -> str:
        return (
            f'<tds:GetCapabilitiesResponse xmlns:tds="{TDS}" xmlns:tt="{TT}"><tds:Capabilities>'
            f"<tt:Device><tt:XAddr>{self.base}/onvif/device_service</tt:XAddr></tt:Device>"
            f"<tt:Events><tt:XAddr>{self.base}/onvif/events_service</tt:XAddr>"
            "<tt:WSSubscriptionPolicySupport>false</tt:WSSubscriptionPolicySupport>"
            "<tt:WSPullPointSupport>true</tt:WSPullPointSupport>"
            "<tt:WSPausableSubscriptionManagerInterfaceSupport>false"
            "</tt:WSPausableSubscriptionManagerInterfaceSupport></tt:Events>"
            "</tds:Capabilities></tds:GetCapabilitiesResponse>"
        )

    def _subscribe(self, request: ET.Element) -> str:
        seconds = _duration(request.findtext(f"{{{TEV}}}InitialTerminationTime"), 60.0)
        now = _now()
        with self._cond:
            sub = _Subscription(next(self._ids), now + timedelta(seconds=min(seconds, 3600)))
            # a new subscription first hears the current state of every property
            for (kind, source), active in self._state.items():
                sub.queue.append(self._notification(kind, active, source, "Initialized"))
            self._subs[sub.sid] = sub
            self.counters.subscriptions += 1
        return (
            f'<tev:CreatePullPointSubscriptionResponse xmlns:tev="{TEV}" xmlns:wsa="{WSA}"'
            f' xmlns:wsnt="{WSNT}"><tev:SubscriptionReference>'
            f"<wsa:Address>{self.base}/onvif/subscription/{sub.sid}</wsa:Address>"
            f"</tev:SubscriptionReference><wsnt:CurrentTime>{_iso(now)}</wsnt:CurrentTime>"
            f"<wsnt:TerminationTime>{_iso(sub.expires)}</wsnt:TerminationTime>"
            "</tev:CreatePullPointSubscriptionResponse>"
        )

    def _subscription_op(self, path: str, op: str, request: ET.Element) -> tuple[int, str]:
        sid_text = path.rsplit("/", 1)[-1]
        with self._cond:
            sub = self._subs.get(int(sid_text)) if sid_text.isdigit() else None
            if sub is not None and sub.expires <= _now():
                del self._subs[sub.sid]
                sub = None
        if sub is None:
            return 400, _fault("env:Receiver", "ter:InvalidArgVal", "no such subscription")
        if op == "PullMessages":
            return 200, _envelope(self._pull(sub, request))
        if op == "Renew":
            seconds = _duration(request.findtext(f"{{{WSNT}}}TerminationTime"), 60.0)
            with self._cond:
                sub.expires = _now() + timedelta(seconds=min(seconds, 3600))
            return 200, _envelope(
                f'<wsnt:RenewResponse xmlns:wsnt="{WSNT}">'
                f"<wsnt:TerminationTime>{_iso(sub.expires)}</wsnt:TerminationTime>"
                f"<wsnt:CurrentTime>{_iso(_now())}</wsnt:CurrentTime></wsnt:RenewResponse>"
            )
        if op == "Unsubscribe":
            with self._cond:
                self._subs.pop(sub.sid, None)
            return 200, _envelope(f'<wsnt:UnsubscribeResponse xmlns:wsnt="{WSNT}"/>')
        return 400, _fault("env:Receiver", "ter:ActionNotSupported", f"{op} not supported")

    def _pull(self, sub: _Subscription, request: ET.Element) -> str:
        # a long poll, bounded: the camera answers at the latest after Timeout (≤ 60 s here)
        wait = min(_duration(request.findtext(f"{{{TEV}}}Timeout"), 5.0), 60.0)
        limit_text = request.findtext(f"{{{TEV}}}MessageLimit") or "100"
        limit = max(1, min(int(limit_text) if limit_text.isdigit() else 100, 1000))
        with self._cond:
            self._cond.wait_for(lambda: bool(sub.queue) or sub.sid not in self._subs, wait)
            messages = [sub.queue.popleft() for _ in range(min(limit, len(sub.queue)))]
            self.counters.pulls += 1
            self.counters.messages_sent += len(messages)
        now = _now()
        return (
            f'<tev:PullMessagesResponse xmlns:tev="{TEV}" xmlns:wsnt="{WSNT}" xmlns:tt="{TT}"'
            f' xmlns:tns1="{TNS1}">'
            f"<tev:CurrentTime>{_iso(now)}</tev:CurrentTime>"
            f"<tev:TerminationTime>{_iso(sub.expires)}</tev:TerminationTime>"
            f"{''.join(messages)}</tev:PullMessagesResponse>"
        )

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        camera = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    self.send_error(413)
                    return
                status, text = camera.handle(self.path, self.rfile.read(length))
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/soap+xml; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass  # quiet: tests read the counters

        return Handler


def _envelope(body: str) -> str:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><env:Envelope xmlns:env="{SOAP}">'
        f"<env:Body>{body}</env:Body></env:Envelope>"
    )


def _fault(code: str, subcode: str, reason: str) -> str:
    return _envelope(
        f'<env:Fault xmlns:ter="http://www.onvif.org/ver10/error"><env:Code>'
        f"<env:Value>{code}</env:Value><env:Subcode><env:Value>{subcode}</env:Value>"
        f'</env:Subcode></env:Code><env:Reason><env:Text xml:lang="en">{escape(reason)}'
        "</env:Text></env:Reason></env:Fault>"
    )
