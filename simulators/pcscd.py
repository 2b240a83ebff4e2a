"""A private ``pcscd`` with vsmartcard ``vpcd`` virtual readers, for tests and demos.

pcscd 1.9.x always serves clients on ``/run/pcscd/pcscd.comm``; only the client library lets
the path be chosen (``PCSCLITE_CSOCK_NAME``, read once per process). So, where the kernel
allows it, pcscd runs in a mount namespace of its own with a private ``/run/pcscd`` and clients
reach it through ``/proc/<pid>/root/run/pcscd/pcscd.comm``, via a symlink at a path that stays
the same across restarts. Elsewhere it takes the system path, refusing if another pcscd
already runs there. vpcd's two readers listen on TCP ports ``port`` and ``port + 1`` (chosen
at run time, on all interfaces: vpcd cannot be told to bind loopback only).

    with Pcscd(workdir, socket_link) as pcscd:      # export PCSCLITE_CSOCK_NAME=socket_link
        card = VirtualCard(pcscd.port)
        pcscd.kill(); pcscd.start()
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Final

from simulators.pty import point_link

SYSTEM_SOCKET = Path("/run/pcscd/pcscd.comm")
VPCD_DRIVER = Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so")


class PcscdUnavailable(RuntimeError):
    """pcscd or the vpcd driver is not installed."""


def find_pcscd() -> str:
    binary = shutil.which("pcscd") or next(
        (p for p in ("/usr/sbin/pcscd", "/sbin/pcscd") if Path(p).exists()), None
    )
    if binary is None or not VPCD_DRIVER.exists():
        raise PcscdUnavailable(
            "pcscd with the vpcd driver is not installed: apt-get install pcscd vsmartcard-vpcd"
        )
    return binary


#: Where pairs are looked for first: below Linux's ephemeral range (32768-60999 by default), so
#: a machine busy with many outgoing connections (TIME_WAIT included) still has pairs to give.
_PAIR_RANGE: Final = (20000, 32000)


def free_port_pair() -> int:
    """A port p with p and p + 1 both free on every interface (vpcd binds 0.0.0.0)."""
    rng = random.Random()  # noqa: S311 - picking test ports, not secrets
    candidates = [rng.randrange(*_PAIR_RANGE) for _ in range(200)] + [0] * 50
    for wanted in candidates:
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("0.0.0.0", wanted))  # noqa: S104 - vpcd itself binds all interfaces
            except OSError:
                continue
            port = int(a.getsockname()[1])
            if port >= 65535:
                continue
            try:
                b.bind(("0.0.0.0", port + 1))  # noqa: S104
            except OSError:
                continue
            return port
    raise RuntimeError("no pair of adjacent free TCP ports")


def listening(port: int) -> bool:
    """True if something listens on TCP ``port`` (read from /proc, so no connection is made:
    a connection to vpcd would look like a card)."""
    want = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[1].endswith(want) and fields[3] == "0A":
                    return True
    return False


def _can_isolate(prefix: list[str]) -> bool:
    try:
        done = subprocess.run(
            [*prefix, "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


class Pcscd:
    """pcscd in the foreground with a vpcd reader config of its own: start/stop/kill/restart."""

    def __init__(
        self, workdir: Path, socket_link: Path, *, label: str = "Campus vpcd", port: int = 0
    ) -> None:
        self.binary = find_pcscd()
        self.workdir = workdir
        self.socket_link = socket_link
        self.label = label
        self.port = port or free_port_pair()
        self.log = workdir / "pcscd.log"
        confdir = workdir / "reader.conf.d"
        confdir.mkdir(parents=True, exist_ok=True)
        (confdir / "vpcd").write_text(
            f'FRIENDLYNAME "{label}"\n'
            f"DEVICENAME /dev/null:{self.port}\n"
            f"LIBPATH {VPCD_DRIVER}\n"
            f"CHANNELID {self.port}\n"
        )
        self._cmd = [self.binary, "--foreground", "--config", str(confdir)]
        self._prefix = self._isolation()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def isolated(self) -> bool:
        return bool(self._prefix)

    @property
    def readers(self) -> tuple[str, str]:
        """The PC/SC names of vpcd's two slots (ports ``port`` and ``port + 1``)."""
        return f"{self.label} 00 00", f"{self.label} 00 01"

    def _isolation(self) -> list[str]:
        unshare = shutil.which("unshare")
        if unshare is None:
            return []
        for userns in ([], ["--user", "--map-root-user"]):
            prefix = [unshare, *userns, "--mount", "--propagation", "private"]
            if _can_isolate(prefix):
                return prefix
        return []

    def _server_socket(self) -> Path:
        if self.proc is None:
            raise RuntimeError("pcscd is not running")
        if self.isolated:
            return Path(f"/proc/{self.proc.pid}/root/run/pcscd/pcscd.comm")
        return SYSTEM_SOCKET

    def start(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            raise RuntimeError("pcscd already started")
        if self.isolated:
            script = 'mkdir -p /run/pcscd && mount -t tmpfs tmpfs /run/pcscd && exec "$@"'
            argv = [*self._prefix, "sh", "-c", script, "pcscd", *self._cmd]
        else:
            if SYSTEM_SOCKET.exists() and _someone_listens(SYSTEM_SOCKET):
                raise RuntimeError(
                    f"another pcscd serves {SYSTEM_SOCKET} and this machine cannot give a test "
                    "pcscd a private one (no mount namespaces): stop it first "
                    "(systemctl stop pcscd.socket pcscd)"
                )
            argv = self._cmd
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while not (self._server_socket().exists() and listening(self.port)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"pcscd did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.02)
        point_link(self.socket_link, self._server_socket())

    def stop(self) -> None:
        """Graceful stop (SIGTERM)."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        self._end(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def _end(self, sig: signal.Signals) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None
        self.socket_link.unlink(missing_ok=True)

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> Pcscd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _someone_listens(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(os.fspath(path))
        except OSError:
            return False
        return True
