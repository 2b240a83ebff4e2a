"""deploy/: the systemd units verify, the compose file is wired to what the programs read."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ingest_server import cli

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "deploy/systemd"
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "PrivateTmp": "yes",
    "ProtectHome": "yes",
    "Restart": "on-failure",
    "CapabilityBoundingSet": "",
}


def _unit(path: Path) -> dict[str, str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(re.sub(r"\\\n\s*", " ", path.read_text()))
    return dict(parser["Service"])


def _unit_values(path: Path, key: str) -> list[str]:
    """Every value of a key set more than once (configparser keeps only the last)."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    return re.findall(rf"^{key}=(.*)$", text, re.M)


@pytest.mark.parametrize("name", ["campus-edge-agent.service", "campus-edge-ingest.service"])
def test_units_are_hardened(name: str) -> None:
    svc = _unit(SYSTEMD / name)
    for key, value in HARDENING.items():
        assert svc.get(key) == value, f"{name}: {key}={svc.get(key)!r}, want {value!r}"
    assert "ReadWritePaths" in svc
    assert svc.get("DynamicUser") == "yes" or svc.get("User") == "campus-edge"


def test_ingest_unit_arguments_parse_and_hold_no_secret() -> None:
    svc = _unit(SYSTEMD / "campus-edge-ingest.service")
    argv = shlex.split(svc["ExecStart"])
    assert argv[0].endswith("/ingest-server")
    args = cli._parser().parse_args(argv[1:])
    assert args.mosquitto_passwd.parent == Path(svc["ReadWritePaths"])
    # HTTPS by default: the key comes as a systemd credential, the certificate from /etc
    assert args.tls_cert == Path("/etc/campus-edge/api.crt")
    assert str(args.tls_key) == "${CREDENTIALS_DIRECTORY}/api-key"
    credentials = _unit_values(SYSTEMD / "campus-edge-ingest.service", "LoadCredential")
    assert "api-key:/etc/campus-edge/api.key" in credentials
    assert "hash-key:/etc/campus-edge/hash-key" in credentials
    assert not re.search(r"://[^/\s]*:[^/\s]*@", svc["ExecStart"])  # no password in a URL
    conf = (ROOT / "deploy/mosquitto/mosquitto-tls.conf").read_text()
    assert f"password_file {args.mosquitto_passwd}" in conf
    assert f"acl_file {args.mosquitto_acl}" in conf
    watched = (SYSTEMD / "campus-edge-broker-reload.path").read_text()
    assert f"PathChanged={args.mosquitto_passwd}" in watched
    assert f"PathChanged={args.mosquitto_acl}" in watched


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # The units name /opt/campus-edge/bin/...; point them at this venv's scripts to verify.
    bindir = Path(sys.executable).parent
    units = []
    for src in sorted(SYSTEMD.glob("*.service")) + sorted(SYSTEMD.glob("*.path")):
        dst = tmp_path / src.name
        dst.write_text(src.read_text().replace("/opt/campus-edge/bin", str(bindir)))
        units.append(str(dst))
    done = subprocess.run(
        ["systemd-analyze", "verify", *units],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    ours = [line for line in (done.stdout + done.stderr).splitlines() if "campus-edge" in line]
    assert ours == [], "\n".join(ours)


def _compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    data: dict[str, Any] = yaml.safe_load((ROOT / "deploy/compose/compose.yaml").read_text())
    return data


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path → source, for ``source:target[:mode]`` volume strings."""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def test_compose_wiring() -> None:
    doc = _compose()
    svc = doc["services"]
    assert set(svc) >= {"timescaledb", "mosquitto", "ingest", "broker-auth-init"}
    assert "8883:8883" in svc["mosquitto"]["ports"]
    assert "8080:8080" in svc["ingest"]["ports"]
    assert "1883:1883" not in svc["mosquitto"].get("ports", [])  # TLS only

    # the broker runs the shipped TLS config, and its files exist in the repository
    mq = _mounts(svc["mosquitto"])
    conf_src = (ROOT / "deploy/compose" / mq["/mosquitto/config/mosquitto.conf"]).resolve()
    assert conf_src == ROOT / "deploy/mosquitto/mosquitto-tls.conf"
    conf = conf_src.read_text()
    assert re.search(r"^allow_anonymous false$", conf, re.M)
    assert re.search(r"^max_queued_messages 0$", conf, re.M)
    cert_dir = re.search(r"^certfile (.*)/server.crt$", conf, re.M)
    assert cert_dir is not None
    assert mq[cert_dir[1]] == "./certs"

    # the server writes the credential files where the broker reads them (a shared volume)
    args = cli._parser().parse_args(svc["ingest"]["command"])
    auth_dir = str(args.mosquitto_passwd.parent)
    assert _mounts(svc["ingest"])[auth_dir] == mq[auth_dir] == "broker-auth"
    assert _mounts(svc["broker-auth-init"])[auth_dir] == "broker-auth"
    assert f"password_file {args.mosquitto_passwd}" in conf
    assert args.hash_key_file == Path("/run/secrets/hash-key")
    assert "hash-key" in svc["ingest"]["secrets"]
    assert str(args.ca_cert) in _mounts(svc["ingest"])
    # HTTPS by default: the certificate mounted, the key a secret, both from ./certs
    assert _mounts(svc["ingest"])[str(args.tls_cert)] == "./certs/api.crt"
    assert args.tls_key == Path("/run/secrets/api-key")
    assert "api-key" in svc["ingest"]["secrets"]
    assert doc["secrets"]["api-key"]["file"] == "./certs/api.key"
    assert svc["ingest"]["pid"] == "service:mosquitto"  # so the reload command reaches it

    # environment names are the ones the CLI reads; they point at the compose services
    env = svc["ingest"]["environment"]
    assert set(env) == {cli.DB_ENV, cli.BROKER_ENV}
    assert "@timescaledb:5432/" in env[cli.DB_ENV]
    assert env[cli.BROKER_ENV].startswith("mqtts://ingest:")
    assert "@mosquitto:8883" in env[cli.BROKER_ENV]
    assert cli.DB_ENV in svc["broker-auth-init"]["environment"]
    assert set(doc["volumes"]) >= {"pgdata", "broker-auth", "mosquitto-data"}
    build = svc["broker-auth-init"]["build"]
    assert (ROOT / "deploy/compose" / build["context"] / build["dockerfile"]).resolve().is_file()
