"""Where the FlexAI API is and the key to it.

Settings are looked up in this order, the first one set wins: the argument (the provisioner's
``api_url``/``api_key`` traits, the CLI's ``--api-url``/``--api-key``), the environment
(``FLEXAI_API_URL``/``FLEXAI_API_KEY``), then the credentials file
(:func:`credentials_path`, a JSON object with ``api_key`` and optionally ``api_url``), which
must be private to its owner (mode 0600, as OpenSSH requires of private keys).
"""

from __future__ import annotations

import ipaddress
import json
import os
import stat
from pathlib import Path
from urllib.parse import urlsplit

from jupyter_core.paths import jupyter_config_dir

from .errors import ConfigurationError

__all__ = ["api_settings", "credentials_path", "read_credentials"]

_EMULATOR_HINT = "for local use, start `jupyter flexai emulator` and use the URL and key it prints"
_CREDENTIAL_FIELDS = ("api_key", "api_url")


def api_settings(
    api_url: str | None, api_key: str | None, *, allow_insecure: bool = False
) -> tuple[str, str]:
    """The API's base URL (without a trailing ``/``) and key, looked up and checked.

    The credentials file is read only when the arguments and the environment leave a setting
    unset. ``allow_insecure`` permits ``http://`` to a non-loopback host, which would send the
    key in clear text.
    """
    api_url = api_url or os.environ.get("FLEXAI_API_URL")
    api_key = api_key or os.environ.get("FLEXAI_API_KEY")
    if not (api_url and api_key):
        saved = read_credentials()
        api_url, api_key = api_url or saved.get("api_url"), api_key or saved.get("api_key")
    return _check_url(api_url, allow_insecure), _check_key(api_key)


def credentials_path() -> Path:
    """``$JUPYTER_CONFIG_DIR/flexai/credentials.json`` (``~/.jupyter/flexai/...`` by default)."""
    return Path(jupyter_config_dir()) / "flexai" / "credentials.json"


def read_credentials(path: Path | None = None) -> dict[str, str]:
    """The settings saved in the credentials file; ``{}`` if there is none.

    The file's mode and owner are checked on the open file itself, so it cannot be swapped
    between the check and the read. Nothing of its content is ever put into an error.
    """
    path = path or credentials_path()
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigurationError(
            f"cannot read the FlexAI credentials file {path}: {e.strerror}"
        ) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigurationError(f"the FlexAI credentials file {path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise ConfigurationError(
                f"the FlexAI credentials file {path} belongs to another user (uid {st.st_uid}): "
                "refusing to send its key; use a file of your own"
            )
        if st.st_mode & 0o077:
            raise ConfigurationError(
                f"the FlexAI credentials file {path} is accessible by other users "
                f"(mode {st.st_mode & 0o777:04o}): run `chmod 600 {path}`, and replace the key "
                "if others may have read it"
            )
        raw = f.read()
    try:
        saved = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        saved = None
    if not (
        isinstance(saved, dict)
        and set(saved) <= set(_CREDENTIAL_FIELDS)
        and all(isinstance(v, str) for v in saved.values())
    ):
        raise ConfigurationError(
            f"the FlexAI credentials file {path} must be a JSON object holding only the strings "
            'api_key and (optionally) api_url, like {"api_key": "..."}'
        )
    return saved


def _check_url(url: str | None, allow_insecure: bool) -> str:
    if not url:
        raise ConfigurationError(
            "no FlexAI API URL: set the FLEXAI_API_URL environment variable or api_url in "
            f"{credentials_path()} ({_EMULATOR_HINT})"
        )
    try:
        parts = urlsplit(url)
        host, _ = parts.hostname, parts.port  # .port raises on a bad port
    except ValueError:
        host = None
    if not host or parts.scheme not in ("http", "https"):
        raise ConfigurationError(
            f"FLEXAI_API_URL {url!r} is not an http(s) URL such as https://api.flex.ai"
        )
    if parts.username or parts.password:
        raise ConfigurationError(
            "FLEXAI_API_URL must not contain credentials; put the key in FLEXAI_API_KEY"
        )
    if parts.scheme == "http" and not allow_insecure and not _is_loopback(host):
        raise ConfigurationError(
            f"FLEXAI_API_URL {url!r} would send the API key unencrypted: use https for a "
            "remote API (or allow_insecure=True if the network is trusted)"
        )
    return url.rstrip("/")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _check_key(key: str | None) -> str:
    key = (key or "").strip()
    if not key:
        raise ConfigurationError(
            "no FlexAI API key: set the FLEXAI_API_KEY environment variable or api_key in "
            f"{credentials_path()}, mode 0600 ({_EMULATOR_HINT})"
        )
    if not (key.isascii() and key.isprintable()) or any(c.isspace() for c in key):
        raise ConfigurationError(
            "FLEXAI_API_KEY contains spaces or characters that cannot be sent in an HTTP header"
        )
    return key
