"""SSH keys: instance host keys, their OpenSSH fingerprints, and checking client public keys."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519


def new_private_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def public_line(key: ed25519.Ed25519PrivateKey, comment: str = "") -> str:
    """The ``ssh-ed25519 AAAA... comment`` line of ``key``'s public half."""
    line = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode("ascii")
    )
    return f"{line} {comment}" if comment else line


def write_private_key(key: ed25519.Ed25519PrivateKey, path: Path) -> None:
    """Write ``key`` in OpenSSH format, created 0600 (sshd refuses group/world-readable keys)."""
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def fingerprint(public_key_line: str) -> str:
    """OpenSSH ``SHA256:<base64, no padding>`` fingerprint of a public key line."""
    blob = base64.b64decode(public_key_line.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii")
    return "SHA256:" + digest.rstrip("=")


def check_public_key(text: str) -> str:
    """Return ``text`` as one authorized_keys line, or raise ValueError.

    Options (``command="..."``), several lines, or anything OpenSSH would not parse as a
    public key are refused: the requested key must be the only thing authorised.
    """
    line = text.strip()
    if not line or "\n" in line or "\r" in line or "\0" in line:
        raise ValueError("ssh_public_key must be one line: '<type> <base64> [comment]'")
    try:
        serialization.load_ssh_public_key(line.encode("utf-8"))
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"ssh_public_key is not an OpenSSH public key: {exc}") from None
    return line
