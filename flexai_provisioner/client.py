"""The FlexAI REST API client (see ``docs/api.md``), and waits that work over any Platform.

:class:`FlexAIClient` turns every API answer into the :mod:`~flexai_provisioner.platform`
data classes or into one of the :mod:`~flexai_provisioner.errors`, so callers never see a
``requests``, JSON or ``KeyError`` exception. Every call it makes is safe to repeat (provision
carries an ``Idempotency-Key``), so every call is retried on transient failures.

:func:`wait_running` and :func:`wait_deleted` are functions over :class:`Platform` rather than
client methods: polling for a state is the same for any platform, and keeping them out of the
interface keeps each platform down to its seven API calls.

Settings are looked up in this order, the first one set wins: the argument (the provisioner's
``api_url``/``api_key`` traits, the CLI's ``--api-url``/``--api-key``), the environment
(``FLEXAI_API_URL``/``FLEXAI_API_KEY``), then the credentials file
(:func:`credentials_path`, a JSON object with ``api_key`` and optionally ``api_url``), which
must be private to its owner (mode 0600, as OpenSSH requires of private keys).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import random
import stat
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import requests
from jupyter_core.paths import jupyter_config_dir

from . import __version__
from .errors import (
    AuthenticationError,
    ConfigurationError,
    InvalidRequestError,
    NoCapacityError,
    NotFoundError,
    PlatformError,
    PlatformUnreachableError,
    ProvisioningError,
    ProvisioningTimeoutError,
    StartCancelledError,
    UnknownGPUTypeError,
)
from .platform import GPUType, Instance, InstanceState, Platform, SSHEndpoint

__all__ = ["FlexAIClient", "credentials_path", "read_credentials", "wait_deleted", "wait_running"]

log = logging.getLogger("flexai_provisioner.client")

T = TypeVar("T")

#: Statuses worth retrying: the platform says "later" or failed before doing anything durable.
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
#: Transport failures worth retrying (a broken chunked body is a connection dropped mid-answer).
_TRANSIENT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
_EMULATOR_HINT = "for local use, start `jupyter flexai emulator` and use the URL and key it prints"
_CREDENTIAL_FIELDS = ("api_key", "api_url")


class FlexAIClient(Platform):
    """Blocking client for the FlexAI API.

    One ``requests.Session`` per client reuses connections. Calls may be made from several
    threads at once: each call only reads the client's settings, and the session's connection
    pool hands each thread its own connection (do not reconfigure the session meanwhile).
    """

    def __init__(
        self,
        api_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 20.0,
        connect_timeout: float = 5.0,
        deadline: float = 25.0,
        max_retries: int = 5,
        backoff: float = 0.2,
        max_backoff: float = 10.0,
        allow_insecure: bool = False,
        session: requests.Session | None = None,
    ):
        """Settings fall back to ``FLEXAI_API_URL``/``FLEXAI_API_KEY``, then the credentials file.

        ``allow_insecure`` permits ``http://`` to a non-loopback host, which would send the key in
        clear text. ``backoff`` is the first retry's maximum delay; it doubles up to
        ``max_backoff``, which also caps a server's ``Retry-After``. Each request may take
        ``connect_timeout`` to connect and ``timeout`` to answer, and one call, retries
        included, at most ``deadline`` seconds: an API that accepts connections and never
        answers is an error within ``deadline``.
        """
        api_url = api_url or os.environ.get("FLEXAI_API_URL")
        api_key = api_key or os.environ.get("FLEXAI_API_KEY")
        if not (api_url and api_key):  # read only when needed: the environment may suffice
            saved = read_credentials()
            api_url, api_key = api_url or saved.get("api_url"), api_key or saved.get("api_key")
        self.api_url = _check_url(api_url, allow_insecure)
        self._auth = _BearerAuth(_check_key(api_key))
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._deadline = deadline
        self._max_retries = max_retries
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._owns_session = session is None
        self._session = session if session is not None else requests.Session()

    def __repr__(self) -> str:
        return f"FlexAIClient(api_url={self.api_url!r})"

    def close(self) -> None:
        """Close the connection pool, unless the session was passed in (then it is the caller's)."""
        if self._owns_session:
            self._session.close()

    def __enter__(self) -> FlexAIClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the Platform interface --------------------------------------------------------------

    def list_gpu_types(self) -> list[GPUType]:
        return self._call(
            "GET", "/v1/gpu-types", lambda b: [_gpu_type(g) for g in _get(b, "gpu_types", list)]
        )

    def provision(
        self,
        gpu_type: str,
        *,
        ssh_public_key: str,
        gpu_count: int = 1,
        labels: dict[str, str] | None = None,
        ttl_seconds: int | None = None,
        idempotency_key: str | None = None,
    ) -> Instance:
        """Request an instance; it starts ``pending``, see :func:`wait_running`.

        The ``Idempotency-Key`` (a fresh uuid4 unless given) makes retries safe: a replay returns
        the instance the first attempt created. Pass your own key to retry across calls.
        """
        body = {
            "gpu_type": gpu_type,
            "gpu_count": gpu_count,
            "ssh_public_key": ssh_public_key,
            "labels": labels or {},
            "ttl_seconds": ttl_seconds,
        }
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        return self._call("POST", "/v1/instances", _instance, json=body, headers=headers)

    def get_instance(self, instance_id: str) -> Instance:
        return self._call("GET", _instance_path(instance_id), _instance)

    def list_instances(self, labels: dict[str, str] | None = None) -> list[Instance]:
        params = [("label", f"{k}={v}") for k, v in (labels or {}).items()]
        return self._call(
            "GET",
            "/v1/instances",
            lambda b: [_instance(i) for i in _get(b, "instances", list)],
            params=params,
        )

    def stop_instance(self, instance_id: str) -> Instance:
        return self._call("POST", _instance_path(instance_id) + "/stop", _instance)

    def delete_instance(self, instance_id: str) -> Instance:
        """Delete; the result is ``deleted``, or ``stopping`` while under way (see wait_deleted).

        A missing instance raises :class:`NotFoundError`: whether that means "already gone" or
        "wrong id" is the caller's call.
        """
        return self._call("DELETE", _instance_path(instance_id), _instance)

    def heartbeat(self, instance_id: str) -> Instance:
        return self._call("POST", _instance_path(instance_id) + "/heartbeat", _instance)

    # -- HTTP ----------------------------------------------------------------------------------

    def _call(self, method: str, path: str, parse: Callable[[Any], T], **kwargs: Any) -> T:
        """Send one API call, retrying transient failures; parse its JSON or raise a typed error."""
        resp, attempts = self._send(method, path, **kwargs)
        status = resp.status_code
        if not 200 <= status < 300:
            raise self._error(method, path, resp, attempts)
        try:
            body = resp.json()
        except ValueError:
            raise PlatformError(
                f"{self.api_url} answered {method} {path} with HTTP {status} but not JSON "
                f"({_preview(resp)}); is FLEXAI_API_URL the FlexAI API?",
                status=status,
            ) from None
        try:
            return parse(body)
        except _BadShape as exc:
            raise PlatformError(
                f"{self.api_url} answered {method} {path} with HTTP {status} but JSON that is "
                f"not the FlexAI API's ({exc}); is FLEXAI_API_URL the FlexAI API?",
                status=status,
            ) from None

    def _send(self, method: str, path: str, **kwargs: Any) -> tuple[requests.Response, int]:
        """Return the first non-retryable response (or the last one) and the attempts made."""
        url = self.api_url + path
        headers = {"User-Agent": f"flexai-provisioner/{__version__}", **kwargs.pop("headers", {})}
        attempt = 0
        started = time.monotonic()
        deadline = started + self._deadline
        while True:
            remaining = max(deadline - time.monotonic(), 0.001)
            read_timeout = min(self._timeout, remaining)
            try:
                resp = self._session.request(
                    method,
                    url,
                    headers=headers,
                    auth=self._auth,  # an explicit auth also keeps ~/.netrc from replacing ours
                    timeout=(min(self._connect_timeout, remaining), read_timeout),
                    allow_redirects=False,
                    **kwargs,
                )
            except _TRANSIENT as exc:
                failure, retry_after, resp = type(exc).__name__, None, None
                reason = self._reason(exc, read_timeout)
            except requests.RequestException as exc:
                raise PlatformError(
                    f"cannot send {method} {path} to {self.api_url}: {type(exc).__name__}"
                ) from None
            else:
                if resp.status_code not in _RETRY_STATUSES:
                    return resp, attempt + 1
                failure, retry_after = f"HTTP {resp.status_code}", _retry_after(resp)
            delay = self._delay(attempt, retry_after)
            if attempt == self._max_retries or time.monotonic() + delay >= deadline:
                if resp is not None:
                    return resp, attempt + 1
                raise PlatformUnreachableError(
                    f"cannot reach the FlexAI API at {self.api_url} ({reason}, "
                    f"{attempt + 1} attempts in {time.monotonic() - started:.0f} s); check "
                    "FLEXAI_API_URL, or that `jupyter flexai emulator` is running"
                ) from None
            attempt += 1
            log.debug(
                "retrying %s %s after %s in %.2f s (retry %d of %d)",
                method, path, failure, delay, attempt, self._max_retries,
            )  # fmt: skip
            time.sleep(delay)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter in its upper half, so retries always spread over
        seconds (a ``Retry-After: 0`` storm must not use them all at once); a longer
        Retry-After wins. Capped at ``max_backoff``."""
        step = min(self._max_backoff, self._backoff * 2**attempt)
        return min(max(retry_after or 0.0, random.uniform(step / 2, step)), self._max_backoff)

    def _reason(self, exc: Exception, timeout: float) -> str:
        if isinstance(exc, requests.Timeout):
            return f"no answer within {timeout:.3g} s"
        return _os_reason(exc) or type(exc).__name__

    def _error(
        self, method: str, path: str, resp: requests.Response, attempts: int
    ) -> PlatformError:
        """Map an error answer to the exception whose name says what happened."""
        status = resp.status_code
        try:
            error = _get(resp.json(), "error", dict)
            code, message = _get(error, "code", str), _get(error, "message", str, required=False)
        except (ValueError, _BadShape):
            return PlatformError(
                f"{self.api_url} answered {method} {path} with HTTP {status} {resp.reason}".rstrip()
                + f"{_gave_up(attempts)}, not a FlexAI API error ({_preview(resp)})",
                status=status,
            )
        message = (message or code).replace(self._auth.key, "<FLEXAI_API_KEY>")
        if status == 401:
            return AuthenticationError(
                f"the FlexAI API at {self.api_url} rejected the API key ({message}); "
                "check FLEXAI_API_KEY",
                status=status,
                code=code,
            )
        if status in (404, 410):
            return NotFoundError(message, status=status, code=code)
        if status in (400, 409):
            if code == "unknown_gpu_type":
                known = _strings(error.get("gpu_types"))
                return UnknownGPUTypeError(
                    f"{message}; offered GPU types: {', '.join(known) or 'none'}",
                    known=known,
                    status=status,
                    code=code,
                )
            if code == "no_capacity":
                available = _strings(error.get("available"))
                return NoCapacityError(
                    f"{message}; GPU types free right now: {', '.join(available) or 'none'}",
                    available=available,
                    status=status,
                    code=code,
                )
            return InvalidRequestError(message, status=status, code=code)
        return PlatformError(
            f"the FlexAI API failed {method} {path} with HTTP {status} {code}{_gave_up(attempts)}"
            f": {message}",
            status=status,
            code=code,
        )


# -- waiting for a state, over any Platform ------------------------------------------------------


def wait_running(
    platform: Platform,
    instance_id: str,
    timeout: float,
    *,
    on_state: Callable[[Instance], None] | None = None,
    cancel: threading.Event | None = None,
) -> Instance:
    """Poll until the instance is running with an SSH endpoint, and return it.

    Polls every 20 ms for the first second (a fast platform is fast: a 100 ms poll would
    add up to that to every start), then backs off, doubling up to 2 s.
    ``on_state`` sees the instance whenever its state changes (for progress messages).
    Setting ``cancel`` ends the wait between polls with ``StartCancelledError``; a request in
    flight finishes first (bounded by the client's timeout and retries).
    """
    stop = cancel or threading.Event()
    cancelled = f"cancelled while waiting for instance {instance_id} to start"
    deadline = time.monotonic() + timeout
    interval, last = 0.02, None
    fast_until = time.monotonic() + 1.0
    while True:
        if stop.is_set():
            raise StartCancelledError(cancelled)
        instance = platform.get_instance(instance_id)
        if instance.state != last:
            last = instance.state
            if on_state is not None:
                on_state(instance)
        if instance.state is InstanceState.RUNNING and instance.ssh is not None:
            return instance
        if instance.state is InstanceState.FAILED:
            raise ProvisioningError(
                f"instance {instance_id} failed to start: "
                f"{instance.message or 'the platform gave no reason'}"
            )
        if instance.state in (InstanceState.STOPPING, InstanceState.STOPPED, InstanceState.DELETED):
            raise ProvisioningError(
                f"instance {instance_id} became {instance.state.value} before it was running"
                f"{_note(instance)}"
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ProvisioningTimeoutError(
                f"instance {instance_id} was still {instance.state.value} after {timeout:g} s"
                f"{_note(instance)}; raise c.FlexAIProvisioner.provision_timeout to wait longer"
            )
        if stop.wait(min(interval, remaining)):
            raise StartCancelledError(cancelled)
        if time.monotonic() > fast_until:
            interval = min(interval * 2, 2.0)


def wait_deleted(platform: Platform, instance_id: str, timeout: float, poll: float = 0.2) -> None:
    """Poll until the instance is ``deleted`` or gone (404), e.g. after a 202 from delete."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            instance = platform.get_instance(instance_id)
        except NotFoundError:
            return
        if instance.state is InstanceState.DELETED:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PlatformError(
                f"instance {instance_id} was still {instance.state.value} {timeout:g} s after "
                "its deletion was requested; it may still be billed: delete it again later"
            )
        time.sleep(min(poll, remaining))


# -- the credentials file ------------------------------------------------------------------------


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


# -- helpers -------------------------------------------------------------------------------------


class _BearerAuth(requests.auth.AuthBase):
    """Adds the bearer token to each request; its repr never shows the key."""

    def __init__(self, key: str):
        self.key = key

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self.key}"
        return request

    def __repr__(self) -> str:
        return "_BearerAuth(<hidden>)"


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


def _instance_path(instance_id: str) -> str:
    return "/v1/instances/" + quote(instance_id, safe="")


def _retry_after(resp: requests.Response) -> float | None:
    """``Retry-After`` in seconds (the form the API uses), or None if absent or unreadable."""
    try:
        seconds = float(resp.headers.get("Retry-After", ""))
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _os_reason(exc: BaseException) -> str | None:
    """The OS's words ("Connection refused") buried in requests' and urllib3's wrappers."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        nested = getattr(current, "reason", None)
        if not isinstance(nested, BaseException) and current.args:
            nested = current.args[0]
        if not isinstance(nested, BaseException):
            nested = current.__cause__ or current.__context__
        current = nested
    return None


def _preview(resp: requests.Response) -> str:
    text = " ".join(resp.text.split())
    kind = resp.headers.get("Content-Type") or "no content type"
    return f"{kind}: {text[:80]!r}" if text else f"{kind}, empty body"


def _gave_up(attempts: int) -> str:
    return f" (gave up after {attempts} attempts)" if attempts > 1 else ""


def _note(instance: Instance) -> str:
    return f" ({instance.message})" if instance.message else ""


def _strings(value: object) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


# -- parsing: every shape problem becomes _BadShape, reported as a PlatformError -------------


class _BadShape(Exception):
    """The JSON is not what the API documents."""


def _get(obj: object, key: str, kind: type | tuple[type, ...], *, required: bool = True) -> Any:
    if not isinstance(obj, dict):
        raise _BadShape(f"expected an object holding {key!r}, got {_kind(obj)}")
    value = obj.get(key)
    if value is None:
        if required:
            raise _BadShape(f"missing {key!r}")
        return None
    if isinstance(value, bool) or not isinstance(value, kind):  # no API field is a boolean
        raise _BadShape(f"{key!r} is {_kind(value)}")
    return value


def _kind(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string"}
    return names.get(type(value), type(value).__name__)


def _time(value: str) -> datetime:
    try:  # Python 3.10's fromisoformat does not read "Z"
        parsed = datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
    except ValueError:
        raise _BadShape(f"{value!r} is not an RFC 3339 time") from None
    if parsed.tzinfo is None:
        raise _BadShape(f"{value!r} has no time zone")
    return parsed


def _gpu_type(obj: object) -> GPUType:
    return GPUType(
        name=_get(obj, "name", str),
        memory_gb=_get(obj, "memory_gb", int),
        price_per_hour=float(_get(obj, "price_per_hour", (int, float))),
        available=_get(obj, "available", int),
    )


def _instance(obj: object) -> Instance:
    state_name = _get(obj, "state", str)
    try:
        state = InstanceState(state_name)
    except ValueError:
        raise _BadShape(f"unknown state {state_name!r}") from None
    labels = _get(obj, "labels", dict, required=False) or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise _BadShape("'labels' holds non-string values")
    ssh = _get(obj, "ssh", dict, required=False)
    expires_at = _get(obj, "expires_at", str, required=False)
    return Instance(
        id=_get(obj, "id", str),
        gpu_type=_get(obj, "gpu_type", str),
        gpu_count=_get(obj, "gpu_count", int),
        state=state,
        price_per_hour=float(_get(obj, "price_per_hour", (int, float))),
        created_at=_time(_get(obj, "created_at", str)),
        labels=dict(labels),
        ssh=None if ssh is None else _ssh(ssh),
        ttl_seconds=_get(obj, "ttl_seconds", int, required=False),
        expires_at=None if expires_at is None else _time(expires_at),
        message=_get(obj, "message", str, required=False) or "",
    )


def _ssh(obj: dict[str, Any]) -> SSHEndpoint:
    return SSHEndpoint(
        host=_get(obj, "host", str),
        port=_get(obj, "port", int),
        user=_get(obj, "user", str),
        host_key_fingerprint=_get(obj, "host_key_fingerprint", str),
    )
