"""TLS for the HTTP API: the certificate and key given with ``--tls-cert``/``--tls-key``.

They are checked when the settings are made, so a bad file stops the server at start with a
message naming it, before the broker or the database is touched.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NoReturn

#: Certificate chains and keys are a few KiB; a larger "certificate" is the wrong file.
MAX_PEM_BYTES: Final = 1024 * 1024


class TlsError(ValueError):
    """The certificate or key cannot be used; the message names the file and why."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """A PEM certificate chain (server certificate first) and its unencrypted private key."""

    cert: Path
    key: Path

    def check(self) -> None:
        """Raise :class:`TlsError` unless the files load as a matching certificate and key."""
        server_context(self)


def _read(flag: str, path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise TlsError(f"{flag} {path}: cannot read it ({exc.strerror})") from None
    if len(data) > MAX_PEM_BYTES:
        raise TlsError(f"{flag} {path}: larger than {MAX_PEM_BYTES} bytes; not a PEM file")
    return data


def _encrypted_key(files: TlsFiles) -> NoReturn:
    # Called by OpenSSL only for an encrypted key: without it OpenSSL would prompt on the tty.
    raise TlsError(
        f"--tls-key {files.key}: the key is encrypted; give an unencrypted key readable only "
        "by the server's user"
    )


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """A TLS 1.2+ server context with the certificate and key loaded (errors name the file)."""
    cert = _read("--tls-cert", files.cert)
    key = _read("--tls-key", files.key)
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise TlsError(f"--tls-cert {files.cert}: no PEM certificate in it")
    if b"PRIVATE KEY-----" not in key:
        raise TlsError(f"--tls-key {files.key}: no PEM private key in it")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(files.cert, files.key, password=lambda: _encrypted_key(files))
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsError(
                f"--tls-key {files.key} is not the key of the certificate in "
                f"--tls-cert {files.cert}"
            ) from None
        raise TlsError(
            f"--tls-cert {files.cert} / --tls-key {files.key}: cannot load them "
            f"({exc.reason or exc})"
        ) from None
    except OSError as exc:
        raise TlsError(
            f"--tls-cert {files.cert} / --tls-key {files.key}: cannot read them ({exc.strerror})"
        ) from None
    return ctx
