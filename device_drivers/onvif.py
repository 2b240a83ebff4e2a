"""ONVIF IP cameras: device management for identity and health, PullPoint events for motion,
tamper and video loss. No frame, no stream URI, no snapshot is ever asked for.

Driver type ``onvif`` (needs the ``onvif`` extra: ``onvif-zeep-async``). Options:

- ``host`` (required), ``port`` (80): the camera's ONVIF device service; **local config only**
  (a remote config document cannot point the agent at another address);
- ``username``, ``password``: the camera's ONVIF account; **local config only**, sent only
  as a WS-Security password digest, never logged nor reported;
- ``camera`` (the driver's name): the name in events;
- ``report_s`` (60): how often ``camera.health`` is sent while the camera answers (device
  management ``GetSystemDateAndTime``; the first one carries ``GetDeviceInformation``);
- ``pull_timeout_s`` (5), ``message_limit`` (32): the PullMessages long poll;
- ``subscription_s`` (300): the subscription's termination time, renewed at half of it;
- ``timeout_s`` (10): each request; ``retry_max_s`` (60): the reconnect backoff's ceiling.

Events: ``camera.event`` (``kind`` motion / tamper / video_loss, ``active`` true at the start
and false at the end, the camera's topic and source) for every change and for the state the
camera reports on subscribing; motion also as ``camera.activity`` (``motion`` 1.0 or 0.0: ONVIF
says only whether there is motion); ``camera.health`` with ``connected`` (false once when the
camera stops answering), ``model``, ``firmware`` and ``clock_offset_s``. ``fps`` and
``brightness`` are null (there is no picture here); ``black_frame`` is the video-loss state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from device_drivers.base import (
    DriverContext,
    DriverError,
    DriverState,
    DriverStatus,
    Emit,
    ProbeResult,
    convert_options,
    register_driver,
)
from device_drivers.codecs.onvif_events import CameraCondition, Ignored, decode, element_items
from schemas.events import CameraActivity, CameraEvent, CameraHealth
from schemas.reading import Reading

try:
    import zeep.exceptions
    from onvif import ONVIFCamera
    from onvif.exceptions import ONVIFError
except ImportError as exc:  # the agent lists the driver as unavailable, naming the extra
    raise ImportError(
        f"the onvif driver needs the 'onvif' extra (onvif-zeep-async): {exc}"
    ) from exc

log = logging.getLogger(__name__)


class OnvifOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    host: Annotated[str, Meta(min_length=1, max_length=253)]
    port: Annotated[int, Meta(ge=1, le=65535)] = 80
    username: Annotated[str, Meta(max_length=128)] = ""
    password: Annotated[str, Meta(max_length=256)] = ""
    camera: Annotated[str, Meta(min_length=1, max_length=128)] | None = None
    report_s: Annotated[float, Meta(ge=1, le=86400)] = 60.0
    pull_timeout_s: Annotated[int, Meta(ge=1, le=60)] = 5
    message_limit: Annotated[int, Meta(ge=1, le=1000)] = 32
    subscription_s: Annotated[int, Meta(ge=10, le=86400)] = 300
    timeout_s: Annotated[float, Meta(gt=0, le=120)] = 10.0
    retry_max_s: Annotated[float, Meta(ge=1, le=3600)] = 60.0

    def __repr__(self) -> str:  # never show the password
        return f"OnvifOptions(host={self.host!r}, port={self.port}, username={self.username!r})"


#: What a failed camera session raises: network, SOAP faults, the library's own errors.
_SESSION_ERRORS = (OSError, TimeoutError, ONVIFError, zeep.exceptions.Error, DriverError)


class OnvifCameraDriver(DriverStatus):
    counters = "onvif"
    BACKOFF_MIN_S = 1.0
    #: The ceiling of the reconnect backoff (``retry_max_s`` may lower it).
    BACKOFF_MAX_S = 3600.0

    def __init__(self, name: str, options: OnvifOptions, ctx: DriverContext) -> None:
        super().__init__(name, ctx)
        self.options = options
        self.camera = options.camera or name
        self.model: str | None = None
        self.firmware: str | None = None
        self.clock_offset_s: float | None = None
        self.video_loss = False
        self._said_disconnected = False

    async def run(self, emit: Emit) -> None:
        backoff = self.BACKOFF_MIN_S
        while True:
            started = time.monotonic()
            try:
                await self._session(emit)
            except asyncio.CancelledError:
                self.state = DriverState.STOPPED
                raise
            except _SESSION_ERRORS as exc:
                self.down(f"camera {self.options.host}:{self.options.port}: {_why(exc)}")
            except Exception as exc:
                self.down(f"camera {self.options.host}:{self.options.port}: {type(exc).__name__}")
                log.debug("%s: unexpected error", self.name, exc_info=True)
            if not self._said_disconnected:
                self._said_disconnected = True
                await emit(Reading("camera.health", self._health(connected=False)))
            if time.monotonic() - started > 30:
                backoff = self.BACKOFF_MIN_S  # it had worked for a while: a new outage
            try:
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))  # noqa: S311 - jitter
            except asyncio.CancelledError:
                self.state = DriverState.STOPPED
                raise
            backoff = min(backoff * 2, self.options.retry_max_s, self.BACKOFF_MAX_S)

    def _health(self, *, connected: bool) -> CameraHealth:
        return CameraHealth(
            camera=self.camera,
            fps=None,
            brightness=None,
            black_frame=self.video_loss,
            frozen=False,
            connected=connected,
            model=self.model,
            firmware=self.firmware,
            clock_offset_s=self.clock_offset_s,
        )

    async def _session(self, emit: Emit) -> None:
        o = self.options
        cam = ONVIFCamera(o.host, o.port, o.username or None, o.password or None, no_cache=True)
        try:
            async with asyncio.timeout(o.timeout_s * 3):
                await cam.update_xaddrs()
                device = await cam.create_devicemgmt_service()
                info = await device.GetDeviceInformation()
            self.model = _text(getattr(info, "Model", None))
            self.firmware = _text(getattr(info, "FirmwareVersion", None))
            await self._clock(device)
            sub, pull = await self._subscribe(cam)
            self.state = DriverState.OK
            self.last_error = None
            self._said_disconnected = False
            log.info("%s: ONVIF camera %s %s subscribed", self.name, self.model, o.host)
            await emit(Reading("camera.health", self._health(connected=True)))
            await self._pull_loop(cam, device, sub, pull, emit)
        finally:
            with contextlib.suppress(Exception):  # closing a dead session may fail too
                await cam.close()

    async def _clock(self, device: Any) -> None:
        async with asyncio.timeout(self.options.timeout_s):
            answer = await device.GetSystemDateAndTime()
        utc = getattr(answer, "UTCDateTime", None)
        if utc is None:
            self.clock_offset_s = None
            return
        d, t = utc.Date, utc.Time
        camera_now = datetime(d.Year, d.Month, d.Day, t.Hour, t.Minute, t.Second, tzinfo=UTC)
        self.clock_offset_s = round((camera_now - datetime.now(UTC)).total_seconds(), 1)

    async def _subscribe(self, cam: Any) -> tuple[Any, Any]:
        o = self.options
        async with asyncio.timeout(o.timeout_s):
            events = await cam.create_events_service()
            result = await events.CreatePullPointSubscription(
                {"InitialTerminationTime": f"PT{o.subscription_s}S"}
            )
            address = result.SubscriptionReference.Address._value_1
            # the library's pull-point and subscription-manager bindings use this address
            cam.xaddrs["http://www.onvif.org/ver10/events/wsdl/PullPointSubscription"] = address
            sub = await cam.create_subscription_service("PullPointSubscription")
            pull = await cam.create_pullpoint_service()
        self.count("subscribed")
        return sub, pull

    async def _pull_loop(self, cam: Any, device: Any, sub: Any, pull: Any, emit: Emit) -> None:
        o = self.options
        loop = asyncio.get_running_loop()
        next_report = loop.time() + o.report_s
        next_renew = loop.time() + o.subscription_s / 2
        while True:
            async with asyncio.timeout(o.pull_timeout_s + o.timeout_s):
                answer = await pull.PullMessages(
                    {"Timeout": f"PT{o.pull_timeout_s}S", "MessageLimit": o.message_limit}
                )
            for message in (getattr(answer, "NotificationMessage", None) or [])[: o.message_limit]:
                await self._notification(message, emit)
            now = loop.time()
            if now >= next_renew:
                async with asyncio.timeout(o.timeout_s):
                    await sub.Renew({"TerminationTime": f"PT{o.subscription_s}S"})
                next_renew = now + o.subscription_s / 2
            if now >= next_report:
                await self._clock(device)
                await emit(Reading("camera.health", self._health(connected=True)))
                next_report = now + o.report_s

    async def _notification(self, message: Any, emit: Emit) -> None:
        topic_el = getattr(message, "Topic", None)
        topic = _text(getattr(topic_el, "_value_1", None), 256)
        body = getattr(getattr(message, "Message", None), "_value_1", None)
        decoded = decode(topic, *_message_parts(body)) if body is not None else None
        if decoded is None or isinstance(decoded, Ignored):
            reason = decoded.reason if decoded is not None else "no message"
            self.count(f"ignored.{reason.replace(' ', '_')}")
            return
        await self._emit_condition(decoded, emit)

    async def _emit_condition(self, c: CameraCondition, emit: Emit) -> None:
        self.count(f"event.{c.kind}")
        await emit(
            Reading(
                "camera.event",
                CameraEvent(
                    camera=self.camera, kind=c.kind, active=c.active, topic=c.topic, source=c.source
                ),
            )
        )
        if c.kind == "motion":
            await emit(
                Reading(
                    "camera.activity",
                    CameraActivity(camera=self.camera, motion=1.0 if c.active else 0.0),
                )
            )
        elif c.kind == "video_loss" and c.active != self.video_loss:
            self.video_loss = c.active
            await emit(Reading("camera.health", self._health(connected=True)))


def _message_parts(body: Any) -> tuple[str | None, dict[str, str], dict[str, str]]:
    """A ``tt:Message`` as the client hands it over (a zeep object, as the library knows the
    ONVIF schema, or a raw XML element) → its operation, source items and data items."""
    if isinstance(getattr(body, "tag", None), str):  # raw XML
        operation = body.attrib.get("PropertyOperation")
        return operation, element_items(body, "Source"), element_items(body, "Data")

    def items(section: Any) -> dict[str, str]:
        found: dict[str, str] = {}
        for item in (getattr(section, "SimpleItem", None) or [])[:32]:
            name, value = getattr(item, "Name", None), getattr(item, "Value", None)
            if name is not None and value is not None:
                found[str(name)[:256]] = str(value)[:256]
        return found

    operation = getattr(body, "PropertyOperation", None)
    return (
        None if operation is None else str(operation),
        items(getattr(body, "Source", None)),
        items(getattr(body, "Data", None)),
    )


def _text(value: object, limit: int = 128) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text[:limit] or None


def _why(exc: BaseException) -> str:
    """A short reason; never the request (it would carry the password digest)."""
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def parse_options(name: str, options: Mapping[str, Any]) -> OnvifOptions:
    return convert_options(name, options, OnvifOptions)


def build(name: str, options: Mapping[str, Any], ctx: DriverContext) -> OnvifCameraDriver:
    return OnvifCameraDriver(name, parse_options(name, options), ctx)


register_driver("onvif")(build)


async def probe(options: Mapping[str, Any]) -> ProbeResult:
    """Ask the camera who it is over device management; say what came back."""
    try:
        o = parse_options("probe", options)
    except DriverError as exc:
        return ProbeResult.fail(str(exc))
    cam = ONVIFCamera(o.host, o.port, o.username or None, o.password or None, no_cache=True)
    try:
        async with asyncio.timeout(o.timeout_s * 2):
            await cam.update_xaddrs()
            device = await cam.create_devicemgmt_service()
            info = await device.GetDeviceInformation()
    except Exception as exc:  # noqa: BLE001 - a probe reports any failure as its verdict
        return ProbeResult.fail(f"ONVIF camera {o.host}:{o.port}: {_why(exc)}")
    finally:
        with contextlib.suppress(Exception):
            await cam.close()
    return ProbeResult.ok(
        f"ONVIF camera {o.host}:{o.port}: {_text(info.Manufacturer)} {_text(info.Model)}"
        f" firmware {_text(info.FirmwareVersion)}"
    )
