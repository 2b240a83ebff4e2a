"""A private pcscd with the vpcd virtual reader (module-scoped ``pcscd`` fixture) and
``reader_empty``, for the PC/SC reader, library terminal and conformance tests."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulators.pcscd import Pcscd, PcscdUnavailable, find_pcscd

SOCKET_LINK = Path(tempfile.gettempdir()) / f"campus-pcscd-{os.getpid()}.comm"


@pytest.fixture(scope="module")
def pcscd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pcscd]:
    try:
        find_pcscd()
    except PcscdUnavailable as exc:
        pytest.skip(str(exc))
    os.environ["PCSCLITE_CSOCK_NAME"] = str(SOCKET_LINK)
    daemon = Pcscd(tmp_path_factory.mktemp("pcscd"), SOCKET_LINK)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


def reader_empty(reader: str) -> bool:
    from smartcard import scard  # pyscard only when a test asks: loading the plugin needs none

    code, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if code != scard.SCARD_S_SUCCESS:
        return False
    try:
        query = [(reader, scard.SCARD_STATE_UNAWARE)]
        code, result = scard.SCardGetStatusChange(context, 0, query)
        return code == scard.SCARD_S_SUCCESS and bool(result[0][1] & scard.SCARD_STATE_EMPTY)
    finally:
        scard.SCardReleaseContext(context)
