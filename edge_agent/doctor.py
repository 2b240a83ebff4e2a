"""``edge-agent doctor``: a technician's check-up of one gateway, one line per check.

Each check says OK, WARN or FAIL in plain language and, for every problem, what to do about it.
It covers the config, the broker (TCP, TLS certificate, MQTT login), the clock (against
``--server`` or the config's clock reference, measured as the agent does), the outbox and its
disk, the hardware this machine can see, and each configured driver (built, then probed once
with its module's ``probe(options)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import shutil
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

import aiomqtt
from paho.mqtt.reasoncodes import ReasonCode
from serial.tools import list_ports

from device_drivers import base as drivers
from device_drivers.base import DriverContext, DriverError, ProbeResult, UidHasher
from edge_agent.clock import ClockError, measure
from edge_agent.config import AgentConfig, Broker, ConfigError, DriverConfig, load_config
from edge_agent.outbox import Outbox, OutboxError
from edge_agent.portable import PCSC_SERVICE, PCSC_START_HINT, try_lock, unlock

CONNECT_TIMEOUT_S: Final = 5.0
MQTT_TIMEOUT_S: Final = 8.0
HTTP_TIMEOUT_S: Final = 5.0
PROBE_TIMEOUT_S: Final = 10.0
CERT_WARN_DAYS: Final = 30
CLOCK_WARN_S: Final = 2.0
CLOCK_FAIL_S: Final = 60.0
DISK_WARN_BYTES: Final = 500 * 2**20
DISK_FAIL_BYTES: Final = 50 * 2**20
#: An unsent event older than this means the uplink has been down a while.
BACKLOG_WARN_S: Final = 3600.0

#: Import name of a missing package → the campus-edge extra that installs it.
_EXTRAS: Final = {
    "smartcard": "smartcard",
    "cv2": "camera",
    "numpy": "camera",
    "pymodbus": "modbus",
    "serial": "agent",
    "aiomqtt": "agent",
    "paho": "agent",
}
_MQTT_LOGIN_REFUSED: Final = {4, 5, 134, 135, 140}
_MQTT_BAD_PROTOCOL: Final = {1, 132}


class Status(StrEnum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True, slots=True)
class Check:
    check: str
    status: Status
    message: str


def _ok(check: str, message: str) -> Check:
    return Check(check, Status.OK, message)


def _warn(check: str, message: str) -> Check:
    return Check(check, Status.WARN, message)


def _fail(check: str, message: str) -> Check:
    return Check(check, Status.FAIL, message)


def _why(exc: OSError) -> str:
    """An OS error as a short lower-case phrase ("connection refused")."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if exc.errno and exc.errno > 0:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


# --- broker ---------------------------------------------------------------------------------


async def check_broker(b: Broker) -> list[Check]:
    """TCP, then (for mqtts) the TLS certificate, then an MQTT login; stop at the first FAIL."""
    where = f"{b.host}:{b.port}"
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(b.host, b.port), CONNECT_TIMEOUT_S
        )
    except TimeoutError:
        return [
            _fail(
                "broker.tcp",
                f"no answer from the broker at {where} within {CONNECT_TIMEOUT_S:g} s — is the "
                "address right, or is a firewall dropping the packets?",
            )
        ]
    except socket.gaierror as exc:
        return [
            _fail(
                "broker.tcp",
                f"cannot resolve the broker's host name {b.host!r}: {exc.strerror} — check "
                "mqtt.url and this machine's DNS settings",
            )
        ]
    except OSError as exc:
        return [
            _fail(
                "broker.tcp",
                f"cannot reach the broker at {where}: {_why(exc)} — is the broker running, is "
                "the port right, is a firewall in the way?",
            )
        ]
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    checks = [_ok("broker.tcp", f"{where} accepts TCP connections")]
    tls: ssl.SSLContext | None = None
    if b.tls:
        tls = _tls_context(b)
        checks.append(await asyncio.to_thread(inspect_tls, b, tls))
        if checks[-1].status is Status.FAIL:
            return checks
    checks.append(await _mqtt_login(b, tls))
    return checks


def _tls_context(b: Broker) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(b.ca_file) if b.ca_file else None)


def inspect_tls(b: Broker, ctx: ssl.SSLContext) -> Check:
    """Handshake as the agent would and read the server certificate's expiry date."""
    trust = f"mqtt.ca_file {b.ca_file}" if b.ca_file else "the system's CA certificates"
    where = f"{b.host}:{b.port}"
    try:
        with (
            socket.create_connection((b.host, b.port), timeout=CONNECT_TIMEOUT_S) as raw,
            ctx.wrap_socket(raw, server_hostname=b.host) as conn,
        ):
            cert = conn.getpeercert()
    except ssl.SSLCertVerificationError as exc:
        return _fail(
            "broker.tls",
            f"the broker's certificate at {where} did not validate against {trust}: "
            f"{exc.verify_message} — is that the CA which signed the broker's certificate, "
            f"does the certificate name {b.host}, and is this machine's clock right?",
        )
    except ssl.SSLError as exc:
        return _fail(
            "broker.tls",
            f"the TLS handshake with {where} failed: {exc.reason or exc} — is this port a TLS "
            "listener (mqtts:// is usually port 8883)?",
        )
    except OSError as exc:
        return _fail("broker.tls", f"the TLS connection to {where} failed: {_why(exc)} — try again")
    not_after = ssl.cert_time_to_seconds(str((cert or {}).get("notAfter", "")))
    days = (not_after - time.time()) / 86400
    expires = datetime.fromtimestamp(not_after, UTC).date().isoformat()
    if days < CERT_WARN_DAYS:
        return _warn(
            "broker.tls",
            f"certificate valid against {trust}, but it expires on {expires} (in {days:.0f} "
            "days) — have the broker's certificate renewed",
        )
    return _ok("broker.tls", f"certificate valid against {trust}; expires {expires}")


async def _mqtt_login(b: Broker, tls: ssl.SSLContext | None) -> Check:
    v5 = b.protocol == "5"
    who = f"as {b.username!r}" if b.username else "anonymously"
    client = aiomqtt.Client(
        b.host,
        b.port,
        username=b.username,
        password=b.password,
        # Never the agent's own client id: the broker would drop a running agent for us.
        identifier=f"{b.client_id}-doctor-{os.getpid()}",
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        clean_session=None if v5 else True,
        keepalive=b.keepalive_s,
        timeout=MQTT_TIMEOUT_S,
        tls_context=tls,
    )
    try:
        async with client:
            pass
    except aiomqtt.MqttCodeError as exc:
        rc = exc.rc.value if isinstance(exc.rc, ReasonCode) else exc.rc
        reason = str(exc.rc) if isinstance(exc.rc, ReasonCode) else str(exc)
        if rc in _MQTT_LOGIN_REFUSED:
            return _fail(
                "broker.mqtt",
                f"the broker at {b.address} refused the login {who}: {reason} — check "
                "mqtt.username and the password (mqtt.password or mqtt.password_file), and the "
                "broker's ACL for this device",
            )
        if rc in _MQTT_BAD_PROTOCOL:
            return _fail(
                "broker.mqtt",
                f"the broker at {b.address} does not accept MQTT {b.protocol}: {reason} — set "
                f'mqtt.protocol = "{"3.1.1" if v5 else "5"}"',
            )
        return _fail(
            "broker.mqtt",
            f"the broker at {b.address} refused the connection: {reason} — see the broker's log",
        )
    except aiomqtt.MqttError as exc:
        hint = ' (a broker that speaks only MQTT 3.1.1 ignores MQTT 5: try protocol = "3.1.1")'
        return _fail(
            "broker.mqtt",
            f"no MQTT answer from {b.address}: {exc} — is that port an MQTT listener?"
            + (hint if v5 else ""),
        )
    return _ok("broker.mqtt", f"MQTT {b.protocol} login {who} accepted by {b.address}")


# --- clock ----------------------------------------------------------------------------------


async def check_clock(server: str | None, reference: str = "") -> Check:
    """Measure this machine's clock against ``--server`` (else the config's clock.reference),
    as the agent does for ``agent.health``: a /healthz ``time``, a ``Date`` header or SNTP."""
    url = server or reference
    if not url:
        return _ok(
            "clock",
            "not checked (give --server URL, e.g. the ingest server's /healthz, or set "
            "[clock] reference in the config)",
        )
    if server and not server.startswith(("http://", "https://", "ntp://")):
        return _fail("clock", f"--server {server!r}: expected an http:// or https:// URL")
    try:
        sample = await measure(url, HTTP_TIMEOUT_S)
    except ClockError as exc:
        return _fail(
            "clock",
            f"cannot compare clocks: {exc} — is the URL right and the ingest server up?",
        )
    skew = sample.offset_s
    said = f"this machine's clock is {abs(skew):.1f} s {'ahead of' if skew > 0 else 'behind'}"
    fix = " — enable time sync (NTP / systemd-timesyncd) on this machine"
    if sample.source == "date":
        said += " (to the second: the reply had only a Date header)"
    if abs(skew) > CLOCK_FAIL_S:
        return _fail("clock", f"{said} {url}{fix}: event times will be wrong")
    if abs(skew) > CLOCK_WARN_S:
        return _warn("clock", f"{said} {url}{fix}")
    return _ok("clock", f"within {CLOCK_WARN_S:g} s of {url} ({said})")


# --- outbox ---------------------------------------------------------------------------------


def check_outbox(path: Path) -> list[Check]:
    """Directory writable, disk space, and the queue of unsent events."""
    directory = path.parent
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    checks: list[Check] = []
    if existing != directory:
        if os.access(existing, os.W_OK | os.X_OK):
            checks.append(_ok("outbox.dir", f"{directory} will be created on the first run"))
        else:
            checks.append(
                _fail(
                    "outbox.dir",
                    f"{directory} does not exist and cannot be created in {existing} — create "
                    "it and give the agent's user write access, or change outbox.path",
                )
            )
    elif not directory.is_dir():
        checks.append(_fail("outbox.dir", f"{directory} is not a directory — change outbox.path"))
    else:
        try:
            with tempfile.TemporaryFile(dir=directory):
                pass
            checks.append(_ok("outbox.dir", f"{directory} is writable"))
        except OSError as exc:
            checks.append(
                _fail(
                    "outbox.dir",
                    f"cannot write in {directory}: {_why(exc)} — give the agent's user write "
                    "access, or free the disk",
                )
            )
    checks.append(_disk(existing))
    checks.append(_queue(path))
    return checks


def _disk(directory: Path) -> Check:
    free = shutil.disk_usage(directory).free
    said = f"{free / 2**20:,.0f} MB free for the outbox in {directory}"
    fix = " — free some space: events are kept on this disk while the uplink is down"
    if free < DISK_FAIL_BYTES:
        return _fail("outbox.disk", said + fix)
    if free < DISK_WARN_BYTES:
        return _warn("outbox.disk", said + fix)
    return _ok("outbox.disk", said)


def _queue(path: Path) -> Check:
    if not path.exists():
        return _ok("outbox.queue", f"no outbox at {path} yet (the agent has not run)")
    try:
        with Outbox(path, readonly=True) as outbox:
            stats = outbox.stats()
    except (OutboxError, OSError) as exc:
        return _fail(
            "outbox.queue",
            f"cannot read the outbox: {exc} — check its permissions; if it is corrupt, move it "
            "aside (its unsent events are lost) and restart the agent",
        )
    except Exception as exc:  # noqa: BLE001 - sqlite3.Error and kin: report, never crash the check-up
        return _fail("outbox.queue", f"cannot read the outbox {path}: {exc}")
    running = " (an agent is running on it)" if _locked(path) else ""
    if stats.oldest_age_s is None:
        return _ok("outbox.queue", f"{path}: no unsent events{running}")
    said = (
        f"{path}: {stats.depth} unsent event(s), the oldest stored "
        f"{_duration(stats.oldest_age_s)} ago{running}"
    )
    if stats.oldest_age_s > BACKLOG_WARN_S:
        return _warn("outbox.queue", said + " — the uplink has been down a while: see broker")
    return _ok("outbox.queue", said)


def _locked(path: Path) -> bool:
    """Whether an agent holds the outbox's lock (never creates the lock file)."""
    try:
        fd = os.open(f"{path}.lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        if not try_lock(fd, shared=True):
            return True
        unlock(fd)
    finally:
        os.close(fd)
    return False


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# --- hardware -------------------------------------------------------------------------------


def _port_options(value: object) -> Iterator[str]:
    """Every ``port`` option, nested ones (a gate's card readers) too."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if key == "port" and isinstance(item, str):
                yield item
            else:
                yield from _port_options(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _port_options(item)


def check_serial(config: AgentConfig) -> Check:
    seen: dict[str, str] = {}
    for port in sorted(list_ports.comports(), key=lambda p: str(p.device)):
        desc = port.description if port.description and port.description != "n/a" else ""
        seen[str(port.device)] = f"{port.device} ({desc})" if desc else str(port.device)
    by_id = Path("/dev/serial/by-id")
    if by_id.is_dir():
        for link in sorted(by_id.iterdir()):
            seen.setdefault(str(link), f"{link} -> {os.path.realpath(link)}")
    missing: dict[str, list[str]] = {}
    for d in config.drivers:
        for port in _port_options(d.options):
            if not port.startswith("/"):
                continue  # usb:VID:PID and pyserial URLs are not paths
            if os.path.exists(port):
                seen.setdefault(port, f"{port} -> {os.path.realpath(port)} (configured)")
            else:
                missing.setdefault(port, []).append(d.name)
    listed = "; ".join(seen.values()) or "none"
    if missing:
        gone = ", ".join(f"{port} ({', '.join(names)})" for port, names in missing.items())
        return _warn(
            "hardware.serial",
            f"configured but not present: {gone} — is the device plugged in? "
            f"Serial ports seen: {listed}",
        )
    return _ok("hardware.serial", f"serial ports: {listed}")


def check_pcsc(config: AgentConfig) -> Check:
    wanted = any(
        d.type == "pcsc" or '"pcsc"' in json.dumps(d.options, default=str) for d in config.drivers
    )
    try:
        # Optional (the smartcard extra): imported only here so the check can say it is missing.
        from smartcard.System import readers  # noqa: PLC0415

        names = [str(r) for r in readers()]
    except ImportError as exc:
        why = f"PC/SC not available: pyscard is not installed ({exc})"
        fix = " — pip install 'campus-edge[smartcard]'"
        return _warn("hardware.pcsc", why + fix) if wanted else _ok("hardware.pcsc", why)
    except Exception as exc:  # noqa: BLE001 - pyscard raises its own types for a missing or dead pcscd
        why = f"PC/SC not available: {exc or type(exc).__name__}"
        fix = f" — is {PCSC_SERVICE} installed and running ({PCSC_START_HINT})?"
        return _warn("hardware.pcsc", why + fix) if wanted else _ok("hardware.pcsc", why)
    if not names and wanted:
        return _warn(
            "hardware.pcsc", f"{PCSC_SERVICE} is running but sees no reader — plug the reader in"
        )
    return _ok("hardware.pcsc", f"PC/SC readers: {', '.join(names) or 'none'}")


def check_cameras() -> Check:
    found = sorted(str(p) for p in Path("/dev").glob("video*"))
    return _ok("hardware.cameras", f"video devices: {', '.join(found) or 'none'}")


# --- drivers --------------------------------------------------------------------------------


def _types_of(module: str) -> set[str]:
    """The driver types a module registers, read from its source (it cannot be imported)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return set()
    try:
        source = Path(spec.origin).read_text(encoding="utf-8")
    except OSError:
        return set()
    return set(re.findall(r"register_driver\(\s*[\"']([^\"']+)[\"']", source))


def _missing_extra(type_name: str) -> str | None:
    """For a type whose module failed to import: what to install, in one sentence."""
    for module, why in sorted(drivers.UNAVAILABLE.items()):
        if type_name not in _types_of(module):
            continue
        missing = re.search(r"No module named '([^'.]+)", why)
        extra = _EXTRAS.get(missing.group(1)) if missing else None
        fix = (
            f"install the {extra!r} extra: pip install 'campus-edge[{extra}]'"
            if extra
            else "install the missing package"
        )
        return f"driver type {type_name!r} is unavailable ({module}: {why}) — {fix}"
    return None


_PROBE_STATUS: Final = {"ok": Status.OK, "warn": Status.WARN, "fail": Status.FAIL}


def _probe_verdict(result: ProbeResult | str) -> tuple[Status, str]:
    # A plain string is a third-party probe written before ProbeResult: taken as OK.
    if isinstance(result, str):
        return Status.OK, result
    return _PROBE_STATUS[result.status], result.message


async def check_driver(config: AgentConfig, d: DriverConfig) -> Check:
    check = f"driver {d.name}"
    drivers.load_builtin_drivers()
    if d.type not in drivers.DRIVERS and (why := _missing_extra(d.type)):
        return _fail(check, why)
    key = config.hash_key or bytes(16)
    ctx = DriverContext(config.device.id, UidHasher(key, send_raw=config.send_raw_uid))
    try:
        drivers.build_driver(d.type, d.name, d.options, ctx)
    except DriverError as exc:
        return _fail(check, f"{exc} — fix [[drivers]] {d.name!r} in {config.source}")
    module = sys.modules[drivers.DRIVERS[d.type].__module__]
    probe: Callable[[Mapping[str, Any]], Awaitable[ProbeResult | str]] | None = getattr(
        module, "probe", None
    )
    if probe is None:
        return _ok(check, f"{d.type}: built; this driver type has no probe")
    try:
        result = await asyncio.wait_for(probe(d.options), PROBE_TIMEOUT_S)
    except TimeoutError:
        return _fail(
            check,
            f"{d.type}: the probe got no verdict within {PROBE_TIMEOUT_S:g} s — check the "
            "device's cable and power",
        )
    except Exception as exc:  # noqa: BLE001 - a probe bug must not end the check-up
        return _fail(check, f"{d.type}: the probe failed: {type(exc).__name__}: {exc}")
    status, verdict = _probe_verdict(result)
    if status is Status.FAIL and "?" not in verdict:
        verdict += (
            f" — is the device plugged in and powered, and are the options of [[drivers]] "
            f"{d.name!r} right?"
        )
    return Check(check, status, f"{d.type}: {verdict}")


async def _drivers(config: AgentConfig) -> list[Check]:
    # One at a time: two drivers may share a bus, and probes take ports exclusively.
    return [await check_driver(config, d) for d in config.drivers]


# --- the check-up ---------------------------------------------------------------------------


async def diagnose(config: AgentConfig, *, server: str | None = None) -> list[Check]:
    """Run every check after the config's; independent groups run concurrently."""
    head = _ok(
        "config",
        f"{config.source}: device {config.device.id} ({config.device.kind}), school "
        f"{config.device.school_id}, {len(config.drivers)} driver(s)",
    )
    broker, clock, outbox, serial, pcsc, drivers_ = await asyncio.gather(
        check_broker(config.broker),
        check_clock(server, config.clock.reference),
        asyncio.to_thread(check_outbox, config.outbox_path),
        asyncio.to_thread(check_serial, config),
        asyncio.to_thread(check_pcsc, config),
        _drivers(config),
    )
    return [head, *broker, clock, *outbox, serial, pcsc, check_cameras(), *drivers_]


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.status is Status.FAIL for c in checks) else 0


def _print(checks: list[Check], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
        return
    width = max(len(c.check) for c in checks)
    for c in checks:
        print(f"{c.status.value:<4}  {c.check:<{width}}  {c.message}")
    fails = sum(c.status is Status.FAIL for c in checks)
    warns = sum(c.status is Status.WARN for c in checks)
    summary = "all checks passed" if not fails + warns else f"{fails} FAIL, {warns} WARN"
    print(f"\n{summary}")


def run(config_path: Path, *, server: str | None = None, as_json: bool = False) -> int:
    """The ``doctor`` subcommand: 0 when nothing FAILs, 1 when something does, 2 bad config."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        fix = f"{exc} — fix the config file and run doctor again"
        _print([_fail("config", fix)], as_json=as_json)
        return 2
    checks = asyncio.run(diagnose(config, server=server))
    _print(checks, as_json=as_json)
    return exit_code(checks)
