"""Signed agent releases: what is signed, the ``update_agent`` command's args, ``campus-release``.

A release is a wheel plus a detached Ed25519 signature by the district's release key over
:func:`release_message` (the version and the wheel's SHA-256), so a signed wheel cannot be
passed off under another version. The private key stays on the offline machine that runs
``campus-release sign``; the ingest server and the agents hold only the public key.

``campus-release keygen --out KEY`` writes ``KEY`` (the private key, PEM, 0600) and
``KEY.pub``; ``campus-release sign --key KEY WHEEL`` writes ``WHEEL.sig`` (base64);
``campus-release verify --pubkey KEY.pub WHEEL`` checks one.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Final

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from msgspec import Meta

from schemas.patterns import whole

#: A release version: also a directory name on the agent, so no separators and a leading digit.
VERSION_PATTERN: Final = r"^[0-9][0-9A-Za-z.+_-]{0,63}$"
SHA256_PATTERN: Final = r"^[0-9a-f]{64}$"
#: An Ed25519 signature (64 bytes) in standard base64.
SIGNATURE_PATTERN: Final = r"^[A-Za-z0-9+/]{86}==$"
#: The largest wheel a server stores and an agent downloads.
MAX_WHEEL_BYTES: Final = 64 * 1024 * 1024
_WHEEL_NAME: Final = re.compile(r"^([A-Za-z0-9_.]+)-([0-9][0-9A-Za-z.+_]*)-[^-]+-[^-]+-[^-]+\.whl$")


class ReleaseError(Exception):
    """A release that cannot be trusted or used; the message says what is wrong."""


class UpdateArgs(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The ``update_agent`` command's args."""

    version: Annotated[str, Meta(pattern=whole(VERSION_PATTERN))]
    #: ``https://…`` (``http://`` only to a loopback address, or with ``[update] insecure_http``).
    url: Annotated[str, Meta(min_length=8, max_length=2048)]
    sha256: Annotated[str, Meta(pattern=whole(SHA256_PATTERN))]
    signature: Annotated[str, Meta(pattern=whole(SIGNATURE_PATTERN))]


def release_message(version: str, sha256: str) -> bytes:
    """The bytes the release key signs: the version and the wheel's hash, nothing else."""
    return f"campus-edge release v1\nversion={version}\nsha256={sha256}\n".encode()


def wheel_version(name: str) -> str:
    """The version in a wheel's file name (``campus_edge-0.2.0-py3-none-any.whl`` → 0.2.0)."""
    m = _WHEEL_NAME.match(name)
    if m is None or re.match(whole(VERSION_PATTERN), m.group(2)) is None:
        raise ReleaseError(f"{name!r} is not a wheel file name (NAME-VERSION-PY-ABI-PLATFORM.whl)")
    return m.group(2)


def load_public_key(path: Path) -> bytes:
    """The raw 32-byte Ed25519 public key of a PEM file (``campus-release keygen``'s ``.pub``)."""

    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise ReleaseError(f"cannot read the release public key {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ReleaseError(f"{path}: not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ReleaseError(f"{path}: not an Ed25519 public key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def verify(public_key: bytes, version: str, sha256: str, signature: str) -> None:
    """Raise :class:`ReleaseError` unless ``signature`` signs ``version`` and ``sha256``."""

    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise ReleaseError("the signature is not base64") from None
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(raw, release_message(version, sha256))
    except (InvalidSignature, ValueError):
        raise ReleaseError(
            f"the signature does not match version {version} with sha256 {sha256} "
            "under the release public key"
        ) from None


def sha256_file(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _load_private(path: Path) -> Ed25519PrivateKey:

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise ReleaseError(f"cannot read the signing key {path}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise ReleaseError(f"{path}: not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ReleaseError(f"{path}: not an Ed25519 private key")
    return key


def sign(key_file: Path, wheel: Path) -> str:
    """The base64 signature of ``wheel`` (its version from the file name) with ``key_file``."""

    key = _load_private(key_file)
    version = wheel_version(wheel.name)
    digest, _ = sha256_file(wheel)
    return base64.b64encode(key.sign(release_message(version, digest))).decode()


def keygen(out: Path) -> Path:
    """Write a new private key to ``out`` (0600, refusing to overwrite) and ``out.pub``."""

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ReleaseError(f"{out} exists: not overwriting a signing key") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = out.with_name(out.name + ".pub")
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pub


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="campus-release", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    kg = sub.add_parser("keygen", help="make the district's release key pair (offline machine)")
    kg.add_argument("--out", type=Path, required=True, help="private key file to write (0600)")
    sg = sub.add_parser("sign", help="sign a wheel: writes WHEEL.sig")
    sg.add_argument("--key", type=Path, required=True, help="the private release key (PEM)")
    sg.add_argument("wheel", type=Path)
    vf = sub.add_parser("verify", help="check a wheel against WHEEL.sig and the public key")
    vf.add_argument("--pubkey", type=Path, required=True)
    vf.add_argument("--signature", type=Path, help="default: WHEEL.sig")
    vf.add_argument("wheel", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "keygen":
            pub = keygen(args.out)
            print(f"private key {args.out} (keep it offline), public key {pub}")
        elif args.cmd == "sign":
            sig = sign(args.key, args.wheel)
            out = args.wheel.with_name(args.wheel.name + ".sig")
            out.write_text(sig + "\n")
            print(f"signed {args.wheel.name}: {out}")
        else:
            sig_file = args.signature or args.wheel.with_name(args.wheel.name + ".sig")
            digest, _ = sha256_file(args.wheel)
            verify(
                load_public_key(args.pubkey),
                wheel_version(args.wheel.name),
                digest,
                sig_file.read_text().strip(),
            )
            print(f"{args.wheel.name}: signature good")
    except (ReleaseError, OSError) as exc:
        print(f"campus-release: {exc}", file=sys.stderr)
        return 1
    return 0
