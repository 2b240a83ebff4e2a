"""End to end: signed agent updates through the real server, Mosquitto, PostgreSQL and real
``edge-agent-launch`` / ``edge-agent`` processes.

The releases are real wheels of this tree's ``schemas``, ``edge_agent`` and ``device_drivers``
with another version in their metadata (zipped here: faster than a build backend, and the
machine has no ``wheel`` package); ``ingest-server release add`` checks and stores them, the
agents download them from the server, verify, install each into a new venv, switch and restart.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ingest_server.server import IngestServer
from schemas.release import keygen, sign
from simulators.harness import Mosquitto, shared_tmpdir, wait_until
from simulators.harness_pipeline import Agent
from tests.api_client import Api, _settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PACKAGES = ("schemas", "edge_agent", "device_drivers")
BROKEN_MAIN = 'raise SystemExit("this build cannot start")\n'


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}\n"


def build_wheel(out: Path, version: str, *, broken: bool = False) -> Path:
    """A wheel of the agent's packages at ``version``; ``broken``: its agent exits at start."""
    wheel = out / f"campus_edge-{version}-py3-none-any.whl"
    dist = f"campus_edge-{version}.dist-info"
    record = ""
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for package in PACKAGES:
            for path in sorted((ROOT / package).rglob("*")):
                if not path.is_file() or "__pycache__" in path.parts:
                    continue
                name = path.relative_to(ROOT).as_posix()
                data = path.read_bytes()
                if broken and name == "edge_agent/__main__.py":
                    data = BROKEN_MAIN.encode()
                z.writestr(name, data)
                record += _record_line(name, data)
        meta = {
            "METADATA": f"Metadata-Version: 2.1\nName: campus-edge\nVersion: {version}\n",
            "WHEEL": "Wheel-Version: 1.0\nGenerator: campus-edge-tests\nRoot-Is-Purelib: true\n"
            "Tag: py3-none-any\n",
            "entry_points.txt": "[console_scripts]\nedge-agent = edge_agent.cli:main\n",
            "top_level.txt": "".join(f"{p}\n" for p in PACKAGES),
        }
        for name, text in meta.items():
            z.writestr(f"{dist}/{name}", text)
            record += _record_line(f"{dist}/{name}", text.encode())
        z.writestr(f"{dist}/RECORD", record + f"{dist}/RECORD,,\n")
    return wheel


def add_release(db_url: str, wheel: Path, pubkey: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "ingest-server"), "release", "add", "--db", db_url, "--wheel", str(wheel),
         "--release-pubkey", str(pubkey)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


class Launched(Agent):
    """An edge agent under ``edge-agent-launch``, updatable, trusting ``pubkey``."""

    def __init__(self, workdir: Path, device_id: str, broker_url: str, pubkey: Path) -> None:
        super().__init__(workdir, device_id, broker_url, count=1)
        shutil.copy(pubkey, self.dir / "release.pub")
        with self.config.open("a") as f:
            f.write('\n[update]\npublic_key_file = "release.pub"\nhealthy_within_s = 30\n')
        self.base = self.dir / "agent-base"
        self.argv = [
            sys.executable, "-m", "edge_agent.launch", "--base", str(self.base), "--",
            "run", "--config", str(self.config),
        ]  # fmt: skip


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    private = tmp_path / "release.key"
    return private, keygen(private)


@pytest.fixture
def workdir() -> Iterator[Path]:
    # a directory of its own: pytest may prune old basetemps while other sessions run
    path = shared_tmpdir("campus-update-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _release(db_url: str, out: Path, version: str, key: Path, pub: Path, **kw: bool) -> Path:
    wheel = build_wheel(out, version, **kw)
    wheel.with_name(wheel.name + ".sig").write_text(sign(key, wheel) + "\n")
    done = add_release(db_url, wheel, pub)
    assert done.returncode == 0, done.stderr
    assert f"release {version} added" in done.stdout
    return wheel


def _update_args(api: Api, version: str) -> dict[str, Any]:
    status, listing = api("GET", "/api/v1/releases")
    assert status == 200, listing
    (entry,) = [r for r in listing if r["version"] == version]
    args: dict[str, Any] = dict(entry["update_args"])
    assert args["url"].startswith(api.server.http.url + "/api/v1/releases/"), args
    return args


def _presence(api: Api, device_id: str) -> dict[str, Any]:
    try:
        status, body = api("GET", f"/api/v1/devices/{device_id}/presence")
    except TimeoutError:
        return {}
    return body if status == 200 else {}


def _wait_done(api: Api, cmd_id: str, timeout: float) -> dict[str, Any]:
    last: list[dict[str, Any]] = []

    def done() -> bool:
        try:
            last[:] = [api.command(cmd_id)]
        except TimeoutError:  # the API is slow while five agents install at once: ask again
            return False
        return last[0]["status"] in ("ok", "error", "rejected")

    wait_until(done, timeout, f"command {cmd_id} acked")
    return last[0]


def _version(api: Api, device_id: str) -> str:
    """The agent_version in the device's state (asked again while the API is busy)."""
    seen: list[str] = []

    def got() -> bool:
        seen[:] = [v] if (v := _presence(api, device_id).get("agent_version")) else []
        return bool(seen)

    wait_until(got, 60, f"{device_id}'s agent_version")
    return seen[0]


def _start(agents: list[Launched], api: Api) -> None:
    for a in agents:
        a.start()
    for a in agents:
        try:
            wait_until(lambda a=a: _presence(api, a.device_id).get("state") == "online", 120, "up")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; {a.device_id}'s log:\n{a.tail()}") from None


def _rollout(api: Api, rollout_id: int) -> dict[str, Any]:
    try:
        status, body = api("GET", f"/api/v1/rollouts/{rollout_id}?limit=1000")
    except TimeoutError:  # the API is slow while agents install: ask again
        return {}
    assert status == 200, body
    result: dict[str, Any] = body
    return result


def _wait_rollout(
    api: Api, rollout_id: int, state: str, timeout: float, agents: list[Launched]
) -> dict[str, Any]:
    last: list[dict[str, Any]] = [{}]

    def reached() -> bool:
        last[0] = _rollout(api, rollout_id) or last[0]
        return last[0].get("state") == state

    try:
        wait_until(reached, timeout, f"rollout {rollout_id} {state}")
    except TimeoutError as exc:
        logs = "\n".join(f"--- {a.device_id}:\n{a.tail()}" for a in agents)
        raise AssertionError(f"{exc}; last seen {last[0]}\n{logs}") from None
    return last[0]


def _create_rollout(api: Api, target: dict[str, Any], args: dict[str, Any]) -> int:
    status, created = api(
        "POST",
        "/api/v1/rollouts",
        {
            "target": target,
            "command": {"name": "update_agent", "args": args, "ttl_s": 600},
            # the canary alone first, then two at a time; one failure of one settled halts it
            "strategy": {
                "canary": 1, "batch_size": 2, "max_failure_share": 0.5, "device_timeout_s": 300,
            },
        },
    )  # fmt: skip
    assert status == 201, created
    assert (created["what"], created["command_name"], created["total"]) == (
        "command", "update_agent", 5,
    )  # fmt: skip
    return int(created["id"])


def test_rollouts_take_five_agents_to_a_signed_version_and_halt_on_one_that_cannot_start(
    mosquitto: Mosquitto, db_url: str, tmp_path: Path, workdir: Path, keys: tuple[Path, Path]
) -> None:
    key, pub = keys
    _release(db_url, tmp_path, "0.9.1", key, pub)
    (tmp_path / "broken").mkdir()
    _release(db_url, tmp_path / "broken", "0.9.2", key, pub, broken=True)
    agents = [Launched(workdir, f"upd-{i:04d}", mosquitto.url, pub) for i in range(5)]
    ids = [a.device_id for a in agents]
    cfg = _settings(mosquitto, db_url, tmp_path)
    try:
        with IngestServer(cfg) as srv:
            wait_until(cfg.token_file.exists, 60, "the bootstrap admin token")
            api = Api(srv)
            _start(agents, api)
            before = {a.device_id: _version(api, a.device_id) for a in agents}
            assert set(before.values()).isdisjoint({"0.9.1", "0.9.2"})
            for d in ids:
                status, tags = api("PUT", f"/api/v1/devices/{d}/tags", {"tags": ["upd-pilot"]})
                assert status == 200, tags

            # 1. a release whose agent cannot start: the canary rolls itself back, acks error,
            #    and the rollout halts before any other agent gets it
            broken = _update_args(api, "0.9.2")
            halted_id = _create_rollout(api, {"devices": ids}, broken)
            halted = _wait_rollout(api, halted_id, "halted", 300, agents)
            assert halted["counts"] == {"pending": 4, "sent": 0, "ok": 0, "failed": 1, "skipped": 0}
            assert halted["batches"] == 1
            assert "1 of 1 settled devices failed" in halted["reason"]
            rows = {r["device_id"]: r for r in halted["devices"]}
            canary = rows.pop("upd-0000")
            assert (canary["batch"], canary["outcome"]) == (1, "failed")
            acked = api.command(canary["command_id"])
            assert acked["status"] == "error", acked
            assert "update to 0.9.2 rolled back" in acked["detail"]
            assert "exited with status 1" in acked["detail"]
            assert "update to 0.9.2 rolled back" in canary["detail"]
            assert "this build cannot start" in agents[0].tail(20000)  # it did run, and failed
            assert not (agents[0].base / "current").exists()  # back on the factory env
            assert not (agents[0].base / "trial.json").exists()
            assert all(r["batch"] is None and r["command_id"] is None for r in rows.values())
            wait_until(lambda: _presence(api, "upd-0000").get("state") == "online", 60, "back")
            for a in agents:
                assert _version(api, a.device_id) == before[a.device_id]
                assert a.running
            for a in agents[1:]:  # nothing downloaded, nothing installed
                assert not (a.base / "envs").exists()
            status, aborted = api("POST", f"/api/v1/rollouts/{halted_id}/abort")
            assert (status, aborted["state"], aborted["counts"]["skipped"]) == (200, "aborted", 4)

            # 2. the good release to the group, as the listing gives its args (absolute url)
            args = _update_args(api, "0.9.1")
            # the download needs no token: the signature is the trust
            with urllib.request.urlopen(args["url"], timeout=10) as resp:  # noqa: S310 - loopback
                assert hashlib.sha256(resp.read()).hexdigest() == args["sha256"]
            done_id = _create_rollout(api, {"tags": ["upd-pilot"]}, args)
            done = _wait_rollout(api, done_id, "done", 900, agents)
            assert done["counts"] == {"pending": 0, "sent": 0, "ok": 5, "failed": 0, "skipped": 0}
            assert done["batches"] == 3  # the canary, then 2 and 2
            assert sorted(r["batch"] for r in done["devices"]) == [1, 2, 2, 3, 3]
            for r in done["devices"]:
                acked = api.command(r["command_id"])
                assert acked["status"] == "ok", acked
                assert acked["detail"]["version"] == "0.9.1"
                assert acked["detail"]["previous"] == before[r["device_id"]]
            for a in agents:
                wait_until(
                    lambda a=a: _presence(api, a.device_id).get("agent_version") == "0.9.1",
                    30,
                    f"{a.device_id}'s state shows 0.9.1",
                )
                assert (a.base / "current").resolve() == (a.base / "envs" / "0.9.1").resolve()
                assert not (a.base / "trial.json").exists()
                assert a.running
            # the outbox carried over: the same file, schema versioned, seqs going on
            for a in agents:
                assert a.status()["highest_seq"] >= 1
    finally:
        for a in agents:
            a.terminate()


def test_a_tampered_release_is_refused_before_install(
    mosquitto: Mosquitto, db_url: str, tmp_path: Path, workdir: Path, keys: tuple[Path, Path]
) -> None:
    key, pub = keys
    wheel = _release(db_url, tmp_path, "0.9.3", key, pub)
    # a wheel whose signature is not the district's is refused by the server already
    rogue_key = tmp_path / "rogue.key"
    rogue_pub = keygen(rogue_key)
    (tmp_path / "rogue").mkdir()
    other = build_wheel(tmp_path / "rogue", "0.9.4")
    other.with_name(other.name + ".sig").write_text(sign(rogue_key, other))
    refused = add_release(db_url, other, pub)
    assert refused.returncode == 1
    assert "signature does not match" in refused.stderr
    assert add_release(db_url, other, rogue_pub).returncode == 0  # (a rogue server's store)
    # and a server whose stored wheel was changed afterwards
    tampered = bytearray(wheel.read_bytes())
    tampered[len(tampered) // 2] ^= 0xFF
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE releases SET wheel = %s WHERE version = '0.9.3'", (bytes(tampered),))
    agent = Launched(workdir, "upd-0200", mosquitto.url, pub)
    cfg = _settings(mosquitto, db_url, tmp_path)
    try:
        with IngestServer(cfg) as srv:
            wait_until(cfg.token_file.exists, 60, "the bootstrap admin token")
            api = Api(srv)
            _start([agent], api)
            path = "/api/v1/devices/upd-0200/commands"
            hash_args = _update_args(api, "0.9.3")  # the signed hash, a changed wheel
            # the API checks update_agent args against the stored releases first: 422, named
            for bad, field in [
                ({**hash_args, "sha256": "0" * 64}, "args.sha256: is not release 0.9.3's"),
                ({**hash_args, "version": "7.7.7"}, "args.version: no release 7.7.7"),
                ({**hash_args, "signature": _update_args(api, "0.9.4")["signature"]},
                 "args.signature: is not release 0.9.3's stored signature"),
                ({**hash_args, "sha256": "X"}, "args.sha256: Expected `str` matching regex"),
                ({k: v for k, v in hash_args.items() if k != "url"}, "args.url: Object missing"),
                ({**hash_args, "force": True}, "args.force: Object contains unknown field"),
            ]:  # fmt: skip
                body = {"name": "update_agent", "args": bad}
                name = field.split(":")[0].split(".")[1]
                status, refused = api("POST", path, body)
                assert status == 422, refused
                (err,) = refused["detail"]
                assert err["loc"] == ["body", "args", name], refused
                assert err["msg"].startswith(f"update_agent {field}"), refused
                status, refused = api(
                    "POST", "/api/v1/rollouts",
                    {"target": {"devices": ["upd-0200"]}, "command": body},
                )  # fmt: skip
                assert status == 422, refused
                (err,) = refused["detail"]
                assert err["loc"] == ["body", "command", "args", name], refused
                assert err["msg"].startswith(f"update_agent {field}"), refused
            status, listed = api("GET", "/api/v1/rollouts")
            assert (status, listed) == (200, [])  # nothing was stored
            status, cmds = api("GET", "/api/v1/devices/upd-0200/commands")
            assert (status, cmds) == (200, [])
            api("POST", path, {"name": "update_agent", "args": hash_args, "id": "t-hash"})
            acked = _wait_done(api, "t-hash", 60)
            assert acked["status"] == "error", acked
            assert "refused: the downloaded wheel's sha256" in acked["detail"]
            # the rogue release: hash matches its wheel, its signature is not the district's
            rogue_args = _update_args(api, "0.9.4")
            api("POST", path, {"name": "update_agent", "args": rogue_args, "id": "t-sig"})
            acked = _wait_done(api, "t-sig", 60)
            assert acked["status"] == "error", acked
            assert "refused: the signature does not match" in acked["detail"]
            # nothing was installed, nothing switched; the agent runs on
            assert not (agent.base / "envs").exists() or not any((agent.base / "envs").iterdir())
            assert not (agent.base / "current").exists()
            assert agent.running
    finally:
        agent.terminate()


def test_the_release_listing_gives_urls_under_public_url(
    mosquitto: Mosquitto, db_url: str, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    key, pub = keys
    _release(db_url, tmp_path, "0.9.5", key, pub)
    base = "https://edge.district.example:8443/campus"
    cfg = dataclasses.replace(_settings(mosquitto, db_url, tmp_path), public_url=base + "/")
    with IngestServer(cfg) as srv:
        wait_until(cfg.token_file.exists, 60, "the bootstrap admin token")
        status, listing = Api(srv)("GET", "/api/v1/releases")
        assert status == 200, listing
        (entry,) = listing
        assert entry["update_args"] == {
            "version": "0.9.5",
            "url": f"{base}/api/v1/releases/0.9.5/wheel",
            "sha256": entry["sha256"],
            "signature": entry["signature"],
        }
