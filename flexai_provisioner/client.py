"""The FlexAI REST API client (see ``docs/api.md``).

:class:`FlexAIClient` turns every API answer into the :mod:`~flexai_provisioner.gpu_platform`
data classes or into one of the :mod:`~flexai_provisioner.errors`, so callers never see a
``requests``, JSON or ``KeyError`` exception. Every call it makes is safe to repeat (provision
carries an ``Idempotency-Key``), so every call is retried on transient failures. Where the API
is and its key come from :mod:`~flexai_provisioner.credentials`; the answers' JSON is read by
:mod:`~flexai_provisioner.api_json`.
"""

from __future__ import annotations

import logging
import math
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import requests

from . import __version__, api_json
from .credentials import api_settings
from .errors import (
    AuthenticationError,
    InvalidRequestError,
    NoCapacityError,
    NotFoundError,
    PlatformError,
    PlatformUnreachableError,
    UnknownGPUTypeError,
)
from .gpu_platform import GPUType, Instance, Platform

__all__ = ["FlexAIClient"]

log = logging.getLogger("flexai_provisioner.client")

T = TypeVar("T")

#: Statuses worth retrying: the platform says "later" or failed before doing anything durable.
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
#: Transport failures worth retrying (a broken chunked body is a connection dropped mid-answer).
_TRANSIENT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


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
        self.api_url, api_key = api_settings(api_url, api_key, allow_insecure=allow_insecure)
        self._auth = _BearerAuth(api_key)
        self._retries = _Retries(
            timeout, connect_timeout, deadline, max_retries, backoff, max_backoff
        )
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
        return self._call("GET", "/v1/gpu-types", api_json.gpu_types)

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
        """Request an instance; it starts ``pending``, see :func:`~.gpu_platform.wait_running`.

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
        return self._call("POST", "/v1/instances", api_json.instance, json=body, headers=headers)

    def get_instance(self, instance_id: str) -> Instance:
        return self._call("GET", _instance_path(instance_id), api_json.instance)

    def list_instances(self, labels: dict[str, str] | None = None) -> list[Instance]:
        params = [("label", f"{k}={v}") for k, v in (labels or {}).items()]
        return self._call("GET", "/v1/instances", api_json.instances, params=params)

    def stop_instance(self, instance_id: str) -> Instance:
        return self._call("POST", _instance_path(instance_id) + "/stop", api_json.instance)

    def delete_instance(self, instance_id: str) -> Instance:
        """Delete; the result is ``deleted``, or ``stopping`` while under way (see wait_deleted).

        A missing instance raises :class:`NotFoundError`: whether that means "already gone" or
        "wrong id" is the caller's call.
        """
        return self._call("DELETE", _instance_path(instance_id), api_json.instance)

    def heartbeat(self, instance_id: str) -> Instance:
        return self._call("POST", _instance_path(instance_id) + "/heartbeat", api_json.instance)

    def set_ttl(self, instance_id: str, ttl_seconds: int | None) -> Instance:
        body = {"ttl_seconds": ttl_seconds}
        return self._call("PATCH", _instance_path(instance_id), api_json.instance, json=body)

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
        except api_json.BadShape as exc:
            raise PlatformError(
                f"{self.api_url} answered {method} {path} with HTTP {status} but JSON that is "
                f"not the FlexAI API's ({exc}); is FLEXAI_API_URL the FlexAI API?",
                status=status,
            ) from None

    def _send(self, method: str, path: str, **kwargs: Any) -> tuple[requests.Response, int]:
        """Return the first non-retryable response (or the last one) and the attempts made."""
        url = self.api_url + path
        headers = {"User-Agent": f"flexai-provisioner/{__version__}", **kwargs.pop("headers", {})}
        retries, attempt = self._retries, 0
        started = time.monotonic()
        deadline = started + retries.deadline
        while True:
            remaining = max(deadline - time.monotonic(), 0.001)
            read_timeout = min(retries.timeout, remaining)
            try:
                resp = self._session.request(
                    method,
                    url,
                    headers=headers,
                    auth=self._auth,  # an explicit auth also keeps ~/.netrc from replacing ours
                    timeout=(min(retries.connect_timeout, remaining), read_timeout),
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
            delay = retries.delay(attempt, retry_after)
            if attempt == retries.max_retries or time.monotonic() + delay >= deadline:
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
                method, path, failure, delay, attempt, retries.max_retries,
            )  # fmt: skip
            time.sleep(delay)

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
            error = api_json.field(resp.json(), "error", dict)
            code = api_json.field(error, "code", str)
            message = api_json.field(error, "message", str, required=False)
        except (ValueError, api_json.BadShape):
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
        if status in (400, 409) and code == "unknown_gpu_type":
            known = api_json.strings(error.get("gpu_types"))
            message = _listing(message, "offered GPU types", known)
            return UnknownGPUTypeError(message, known=known, status=status, code=code)
        if status in (400, 409) and code == "no_capacity":
            available = api_json.strings(error.get("available"))
            message = _listing(message, "GPU types free right now", available)
            return NoCapacityError(message, available=available, status=status, code=code)
        if status in (400, 409):
            return InvalidRequestError(message, status=status, code=code)
        return PlatformError(
            f"the FlexAI API failed {method} {path} with HTTP {status} {code}{_gave_up(attempts)}"
            f": {message}",
            status=status,
            code=code,
        )


# -- helpers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Retries:
    """How long one request and one call may take, and how a call's attempts are spaced."""

    timeout: float
    connect_timeout: float
    deadline: float
    max_retries: int
    backoff: float
    max_backoff: float

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter in its upper half, so retries always spread over
        seconds (a ``Retry-After: 0`` storm must not use them all at once); a longer
        Retry-After wins. Capped at ``max_backoff``."""
        step = min(self.max_backoff, self.backoff * 2**attempt)
        return min(max(retry_after or 0.0, random.uniform(step / 2, step)), self.max_backoff)


class _BearerAuth(requests.auth.AuthBase):
    """Adds the bearer token to each request; its repr never shows the key."""

    def __init__(self, key: str):
        self.key = key

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self.key}"
        return request

    def __repr__(self) -> str:
        return "_BearerAuth(<hidden>)"


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


def _listing(message: str, what: str, names: list[str]) -> str:
    """The message with the GPU types it is about ("...; GPU types free right now: A100, L4"),
    which JupyterLab's extension reads back to suggest a type."""
    return f"{message}; {what}: {', '.join(names) or 'none'}"
