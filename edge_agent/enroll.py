"""``edge-agent enroll``: trade a one-time enrolment code for this device's identity and secrets.

``POST {server}/api/v1/enrol`` with the code, the device kind and room, the hardware ids found
here and the agent version; the server answers 201 with the device id, school, broker URL and
credentials, the CA certificate, the district hashing key, a seq floor and an optional initial
config. Errors come as 400 / 404 / 410 with ``{"detail": str}``.

Written beside the config file, secrets each in a file of their own, mode 0600: ``mqtt.password``,
``hash.key`` and ``ca.pem`` (when the server sends one). The password and key never go to a log
or a message. A replaced device keeps its id; ``seq_floor`` makes its new outbox start above the
seqs its predecessor used, so the server never sees a seq twice.

Because the answer carries those secrets, the server must be ``https://`` (its certificate is
verified: the system's CAs, or ``ca_file`` for a private CA); plain ``http://`` is accepted only
to a loopback address (a server on this machine) or with ``insecure``. Redirects are not
followed: the code and the secrets go only to the URL given.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

from edge_agent import __version__
from edge_agent.config import ConfigError, apply_remote, load_config
from edge_agent.outbox import Outbox
from schemas.events import DeviceKind
from schemas.patterns import whole
from schemas.topics import ID_PATTERN

log = logging.getLogger(__name__)
Id = Annotated[str, Meta(pattern=whole(ID_PATTERN))]
TIMEOUT_S: Final = 15.0
MAX_REPLY: Final = 1 << 20
_ROUTES: Final = Path("/proc/net/route")
PASSWORD_FILE: Final = "mqtt.password"  # noqa: S105 - a file name, not a password
KEY_FILE: Final = "hash.key"
_ERRORS: Final = {
    400: "the server did not accept the request",
    404: "the enrolment code is not known",
    410: "the enrolment code has expired or was already used",
}


class EnrollError(Exception):
    """Enrolment failed; the message says why in plain words (and never holds a secret)."""


class EnrolRequest(msgspec.Struct, frozen=True, kw_only=True):
    code: str
    kind: str
    room: str | None
    hardware_ids: dict[str, str]
    agent_version: str


class Enrolment(msgspec.Struct, frozen=True, kw_only=True):
    """The server's 201 answer."""

    device_id: Id
    school_id: Id
    mqtt_url: str
    mqtt_username: str
    mqtt_password: str = msgspec.field(default="")
    ca_cert_pem: str | None = None
    hash_key_hex: Annotated[str, Meta(pattern=whole(r"^([0-9a-fA-F]{2}){16,}$"))]
    seq_floor: Annotated[int, Meta(ge=0)] = 0
    config: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"Enrolment(device_id={self.device_id!r}, school_id={self.school_id!r}, ...)"


@dataclass(frozen=True, slots=True)
class Written:
    config: Path
    device_id: str
    school_id: str
    seq_floor: int


def hardware_ids(root: Path = Path("/")) -> dict[str, str]:
    """What identifies this machine, as far as it can be read: machine-id, the MAC of the
    default route's interface and the DMI product serial."""
    ids: dict[str, str] = {}
    for name in ("etc/machine-id", "var/lib/dbus/machine-id"):
        text = _read(root / name)
        if text:
            ids["machine_id"] = text
            break
    iface = _default_interface(root / _ROUTES.relative_to("/"))
    if iface is not None:
        mac = _read(root / "sys/class/net" / iface / "address")
        if mac and mac != "00:00:00:00:00:00":
            ids["mac"] = mac
    serial = _read(root / "sys/class/dmi/id/product_serial")
    if serial and serial.lower() not in ("", "none", "to be filled by o.e.m.", "default string"):
        ids["dmi_serial"] = serial
    if not ids:
        ids["hostname"] = socket.gethostname()
    return ids


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip() or None
    except OSError:
        return None


def _default_interface(routes: Path) -> str | None:
    text = _read(routes)
    for line in (text or "").splitlines()[1:]:
        fields = line.split()
        if len(fields) > 2 and fields[1] == "00000000":
            return fields[0]
    return None


def is_loopback(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1: a server on this machine (no name is resolved)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_server(server: str, *, insecure: bool = False, ca_file: Path | None = None) -> str:
    """The enrolment URL for ``server``, or :class:`EnrollError` when it would expose secrets."""
    parts = urlsplit(server)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EnrollError(
            f"--server: expected an https:// URL such as https://ingest:8080, got {server!r}"
        )
    if parts.username or parts.password or parts.query or parts.fragment:
        raise EnrollError(f"--server: expected https://HOST[:PORT][/PATH], got {server!r}")
    if parts.scheme == "http" and ca_file is not None:
        raise EnrollError("--ca: only used with an https:// server")
    if parts.scheme == "http" and not insecure and not is_loopback(parts.hostname):
        raise EnrollError(
            f"--server {server}: refusing plain http:// to another machine: the answer carries "
            "this device's MQTT password and the district hashing key, readable and replaceable "
            "by anyone on the network. Use https:// (--ca FILE for a private CA), or pass "
            "--insecure on a network you trust completely"
        )
    return server.rstrip("/") + "/api/v1/enrol"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_: Any) -> None:
        return None  # the 3xx itself is then raised as an HTTPError


def _opener(ca_file: Path | None) -> urllib.request.OpenerDirector:
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise EnrollError(f"--ca: cannot use {str(ca_file)!r} as a CA certificate: {exc}") from None
    return urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _NoRedirect)


def request_enrolment(
    server: str, body: EnrolRequest, *, insecure: bool = False, ca_file: Path | None = None
) -> Enrolment:
    url = check_server(server, insecure=insecure, ca_file=ca_file)
    req = urllib.request.Request(  # noqa: S310 - the scheme is checked above
        url,
        data=msgspec.json.encode(body),
        headers={"Content-Type": "application/json", "Accept": "application/json"},
        method="POST",
    )
    try:
        with _opener(ca_file).open(req, timeout=TIMEOUT_S) as resp:
            status, raw = resp.status, resp.read(MAX_REPLY)
    except urllib.error.HTTPError as exc:
        if 300 <= exc.code < 400:
            where = exc.headers.get("Location", "elsewhere")
            raise EnrollError(
                f"the enrolment server redirects to {where}: give that as --server"
            ) from None
        raise EnrollError(_refusal(exc.code, exc.read(MAX_REPLY))) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        hint = ""
        if isinstance(reason, ssl.SSLCertVerificationError):
            hint = " (a server with a private CA: pass its certificate with --ca FILE)"
        raise EnrollError(f"cannot reach the enrolment server {url}: {reason}{hint}") from None
    if status != 201:
        raise EnrollError(f"the enrolment server answered {status}, expected 201 Created")
    try:
        return msgspec.json.decode(raw, type=Enrolment)
    except msgspec.DecodeError as exc:
        raise EnrollError(f"the enrolment server's answer is not usable: {exc}") from None


def _refusal(status: int, raw: bytes) -> str:
    detail = None
    try:
        doc = json.loads(raw)
        detail = doc.get("detail") if isinstance(doc, dict) else None
    except ValueError:
        pass
    what = _ERRORS.get(status, f"the enrolment server answered {status}")
    return f"{what}: {detail}" if isinstance(detail, str) and detail else what


def _write_secret(path: Path, text: str) -> None:
    # Bytes as given on every platform: UTF-8 (the TOML reader's encoding, not Windows' ANSI code
    # page) and no CRLF translation. On Windows the mode only sets read-only or not: the
    # directory's ACL (deploy/windows/install.ps1) keeps the files from other users there.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    path.chmod(0o600)  # also when the file was already there with a looser mode


def enroll(
    server: str,
    code: str,
    config_path: Path,
    *,
    kind: str = DeviceKind.GATEWAY.value,
    room: str | None = None,
    outbox_path: str | None = None,
    force: bool = False,
    ids: dict[str, str] | None = None,
    insecure: bool = False,
    ca_file: Path | None = None,
) -> Written:
    """Enrol and write a working config; raise :class:`EnrollError` saying what went wrong."""
    check_server(server, insecure=insecure, ca_file=ca_file)  # before anything is sent
    if kind not in {k.value for k in DeviceKind}:
        known = ", ".join(k.value for k in DeviceKind)
        raise EnrollError(f"--kind: {kind!r} is not a device kind (one of {known})")
    if config_path.exists() and not force:
        raise EnrollError(
            f"{config_path} already exists: pass --force to replace it (this device's old "
            "identity and secrets are then overwritten)"
        )
    body = EnrolRequest(
        code=code,
        kind=kind,
        room=room,
        hardware_ids=ids if ids is not None else hardware_ids(),
        agent_version=__version__,
    )
    got = request_enrolment(server, body, insecure=insecure, ca_file=ca_file)
    base = config_path.parent
    base.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "device": {"id": got.device_id, "school_id": got.school_id, "kind": kind},
        "outbox": {"path": outbox_path or str(base / "outbox.db")},
        "mqtt": {"url": got.mqtt_url, "username": got.mqtt_username},
        "privacy": {"hash_key_file": KEY_FILE},
        # The district server that enrolled the device is the natural time reference.
        "clock": {"reference": server.rstrip("/") + "/healthz"},
    }
    if got.mqtt_password:
        doc["mqtt"]["password_file"] = PASSWORD_FILE
    if got.ca_cert_pem:
        doc["mqtt"]["ca_file"] = "ca.pem"
    tmp = config_path.with_name(config_path.name + ".new")
    _write_secret(tmp, msgspec.toml.encode(doc).decode())
    if got.mqtt_password:
        _write_secret(base / PASSWORD_FILE, got.mqtt_password)
    _write_secret(base / KEY_FILE, got.hash_key_hex.lower())
    if got.ca_cert_pem:
        (base / "ca.pem").write_text(got.ca_cert_pem, encoding="utf-8")
    try:  # the same loader `run` uses: a config we write must be one it accepts
        cfg = load_config(tmp)
        if got.config:
            apply_remote(cfg, got.config)  # only the remotely managed sections pass
            for section, value in got.config.items():
                if isinstance(value, dict) and isinstance(doc.get(section), dict):
                    doc[section].update(value)
                else:
                    doc[section] = value
            _write_secret(tmp, msgspec.toml.encode(doc).decode())
            cfg = load_config(tmp)
    except ConfigError as exc:
        tmp.unlink()
        raise EnrollError(f"the server's answer makes an unusable config: {exc}") from None
    tmp.replace(config_path)
    if got.seq_floor > 0:
        with Outbox(cfg.outbox_path, lock=True) as outbox:
            outbox.raise_seq_floor(got.seq_floor)
    log.info("enrolled as %s in school %s", got.device_id, got.school_id)
    return Written(config_path, got.device_id, got.school_id, got.seq_floor)
