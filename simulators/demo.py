"""A small simulated school on the embedded default: ``ingest-server demo``.

It starts a private PostgreSQL and the ingest server with its in-process broker, then one real
edge agent process per device, each reading a simulator through the device's real protocol:

- ``cr-0101``  card reader, EM4100 frames over a pseudo-terminal
- ``cs-0101``  class signage, card check-ins bound to a timetable, EM4100 over a pty
- ``sb-0101``  smart board, SMART-style RS-232 control protocol over a pty
- ``env-0101`` environment sensor, Modbus TCP on loopback

and prints live counts read back from the database until Ctrl-C (or ``--duration``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg

from simulators.em4100 import Em4100Simulator
from simulators.modbus_sensor import ModbusSensorSim
from simulators.panel import SmartPanel

SCHOOL = "demo-school"
KEY_HEX = "6361 6d70 7573 2d65 6467 652d 6465 6d6f 2d6b 6579".replace(" ", "")


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def _free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _agent_config(device: str, kind: str, broker_port: int, drivers: str) -> str:
    return (
        f'[device]\nid = "{device}"\nschool_id = "{SCHOOL}"\nkind = "{kind}"\n'
        f'[outbox]\npath = "{device}.outbox.db"\n'
        f'[mqtt]\nurl = "mqtt://127.0.0.1:{broker_port}"\nprotocol = "3.1.1"\n'
        '[privacy]\nhash_key_file = "district.key"\n' + drivers
    )


def _all_day_periods() -> str:
    """Periods covering every hour of every day, so a demo check-in always has a period."""
    days = '["mon", "tue", "wed", "thu", "fri", "sat", "sun"]'
    return "".join(
        f'[[drivers.periods]]\nname = "p{h:02d}"\nstart = "{h:02d}:00"\nend = "{h:02d}:50"\n'
        f"days = {days}\n"
        for h in range(24)
    )


class _Drift:
    """Moves the simulated sensor's values slowly, like a classroom filling up."""

    def __init__(self, sim: ModbusSensorSim) -> None:
        self._sim = sim
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-drift", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        t = 0.0
        while not self._stop.wait(1.0):
            t += 1
            self._sim.set(
                temperature_c=22 + 1.5 * math.sin(t / 60),
                humidity_pct=45 + 5 * math.sin(t / 90),
                co2_ppm=600 + 400 * (1 + math.sin(t / 120)) / 2,
                pm25_ugm3=18 + random.randint(0, 6),  # noqa: S311 - simulated data
                noise_db=40 + random.randint(0, 15),  # noqa: S311
            )


class _BoardUse:
    """Switches the simulated board on, between inputs, and to standby now and then."""

    def __init__(self, panel: SmartPanel) -> None:
        self._panel = panel
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-board", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        rng = random.Random(7)  # noqa: S311 - simulated use
        self._panel.set_power("on")
        while not self._stop.wait(rng.uniform(4, 9)):
            if rng.random() < 0.2:
                self._panel.set_power("standby" if self._panel.power == "on" else "on")
            else:
                self._panel.set_input(rng.choice(["hdmi1", "hdmi2", "ops"]))


def _wait_healthy(port: int, server: subprocess.Popen[bytes], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit("demo: the ingest server exited; see its log above")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r,
        ):
            if r.status == 200:
                return
        time.sleep(0.2)
    raise SystemExit(f"demo: the ingest server was not healthy within {timeout:.0f} s")


def _counts(db_url: str) -> tuple[list[tuple[str, str, str, int, str]], int, int]:
    with psycopg.connect(db_url, connect_timeout=3) as conn:
        devices = conn.execute(
            "SELECT d.device_id, coalesce(d.kind, '?'), coalesce(d.state, '?'), d.event_count,"
            " coalesce((SELECT string_agg(type || '=' || n, ' ' ORDER BY type) FROM"
            "   (SELECT type, count(*) AS n FROM events e WHERE e.device_id = d.device_id"
            "    GROUP BY type) t), '')"
            " FROM devices d ORDER BY d.device_id"
        ).fetchall()
        total = conn.execute("SELECT count(*) FROM events").fetchone()
        quarantined = conn.execute("SELECT count(*) FROM quarantine").fetchone()
    return devices, int(total[0] if total else 0), int(quarantined[0] if quarantined else 0)


@contextlib.contextmanager
def _processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="ingest-server demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--data-dir", type=Path, default=Path("campus-data"))
    ap.add_argument(
        "--http", default="127.0.0.1:8080", metavar="HOST:PORT", help="PORT 0: any free port"
    )
    ap.add_argument(
        "--broker-port",
        type=int,
        default=1883,
        help="port of the embedded broker on 127.0.0.1 (0: any free port)",
    )
    ap.add_argument("--duration", type=float, default=0, help="seconds to run (0: until Ctrl-C)")
    ap.add_argument("--interval", type=float, default=2.0, help="seconds between count updates")
    args = ap.parse_args(argv)
    http_host, _, port_text = args.http.rpartition(":")
    if not http_host or not port_text.isdigit() or int(port_text) > 65535:
        ap.error(f"--http: expected HOST:PORT, e.g. 127.0.0.1:8080, got {args.http!r}")
    http_port = int(port_text) or _free_port()
    http = f"{http_host}:{http_port}"

    from ingest_server.embedded.postgres import EmbeddedPostgres  # noqa: PLC0415 - server extra

    data = args.data_dir.resolve()
    work = data / "demo"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "district.key").write_text(KEY_HEX)
    broker_port = args.broker_port or _free_port()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with EmbeddedPostgres(data) as pg, _processes() as procs:
        print(f"demo: PostgreSQL    {pg.url}")
        server_log = (work / "ingest-server.log").open("ab")
        procs.append(
            subprocess.Popen(
                [
                    _bin("ingest-server"),
                    "run",
                    "--db",
                    pg.url,
                    "--http",
                    http,
                    "--embedded-broker-port",
                    str(broker_port),
                    "--data-dir",
                    str(data),
                    # the demo's agents are not enrolled: they publish without credentials
                    "--embedded-anonymous",
                ],
                stdout=server_log,
                stderr=server_log,
            )
        )
        _wait_healthy(http_port, procs[0])
        print(
            f"demo: MQTT broker   mqtt://127.0.0.1:{broker_port} (MQTT 3.1.1, embedded; "
            "admits anonymous agents, publish only: demo use only)"
        )
        print(f"demo: HTTP          http://{http}/healthz  http://{http}/docs (API)")
        print(f"demo: admin token   {data / 'admin-token'} (Authorization: Bearer <token>)")
        print(f"demo: logs          {work}")

        card = Em4100Simulator(work / "cr-0101.tty")
        door = Em4100Simulator(work / "cs-0101.tty")
        panel = SmartPanel(work / "sb-0101.tty")
        sensor = ModbusSensorSim()
        sensor_port = sensor.start_tcp()
        drift, board = _Drift(sensor), _BoardUse(panel)
        configs = {
            "cr-0101": _agent_config(
                "cr-0101",
                "card_reader",
                broker_port,
                f'[[drivers]]\ntype = "em4100"\nname = "door-1"\nport = "{card.link}"\n',
            ),
            "cs-0101": _agent_config(
                "cs-0101",
                "class_signage",
                broker_port,
                f'[[drivers]]\ntype = "signage"\nname = "cs-0101"\nclass_id = "g7-c3"\n'
                f'[[drivers.cards]]\ntype = "em4100"\nport = "{door.link}"\n' + _all_day_periods(),
            ),
            "sb-0101": _agent_config(
                "sb-0101",
                "smart_board",
                broker_port,
                f'[[drivers]]\ntype = "panel"\nname = "board"\nprofile = "smart"\n'
                f'port = "{panel.port}"\npoll_s = 1\n',
            ),
            "env-0101": _agent_config(
                "env-0101",
                "env_sensor",
                broker_port,
                f'[[drivers]]\ntype = "modbus_env"\nname = "room-101"\nhost = "127.0.0.1"\n'
                f"port = {sensor_port}\npoll_s = 5\n",
            ),
        }
        try:
            for device, text in configs.items():
                path = work / f"{device}.toml"
                path.write_text(text)
                log = (work / f"{device}.log").open("ab")
                procs.append(
                    subprocess.Popen(
                        [_bin("edge-agent"), "run", "--config", str(path)], stdout=log, stderr=log
                    )
                )
            card.start_random(0.5)
            door.start_random(0.3)
            drift.start()
            board.start()
            _show(pg.url, args, stop, procs)
        finally:
            drift.stop()
            board.stop()
            for sim in (card, door):
                sim.close()
            panel.close()
            sensor.close()
    return 0


def _show(
    db_url: str,
    args: argparse.Namespace,
    stop: threading.Event,
    procs: list[subprocess.Popen[bytes]],
) -> None:
    started = time.monotonic()
    tty = sys.stdout.isatty()
    try:
        while not stop.wait(args.interval):
            if args.duration and time.monotonic() - started > args.duration:
                break
            for p in procs:
                if p.poll() is not None:
                    print(f"demo: a process exited early: {p.args!r}")
                    return
            try:
                devices, total, quarantined = _counts(db_url)
            except psycopg.Error as exc:
                print(f"demo: database not readable yet: {exc}".strip())
                continue
            lines = [f"{'device':10} {'kind':14} {'state':8} {'stored':>7}  by type"]
            lines += [f"{d:10} {k:14} {s:8} {n:7}  {types}" for d, k, s, n, types in devices]
            lines.append(
                f"events stored: {total}   quarantined: {quarantined}   "
                f"({time.monotonic() - started:.0f} s, Ctrl-C to stop)"
            )
            if tty:
                sys.stdout.write("\x1b[2J\x1b[H")
            print("\n".join(lines), flush=True)
    except KeyboardInterrupt:
        pass
    print("demo: stopping", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
