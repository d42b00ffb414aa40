"""The HTTP face of the emulator: routing, bearer auth, request faults, JSON errors.

Every answer, including errors raised by :mod:`http.server` itself, is a JSON body in the
shape docs/api.md describes; an unexpected exception is logged and answered 500 ``internal``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .errors import ApiError, invalid, not_found
from .faults import FaultInjector
from .instances import Cloud
from .validation import parse_json, parse_label_filter, parse_update

log = logging.getLogger("flexai_provisioner.emulator")

MAX_BODY = 1 << 20
MAX_IDEMPOTENCY_KEY = 255
_ID = r"(?P<id>[^/]+)"

Route = Callable[["Handler", str, dict[str, str]], tuple[int, Any]]


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The OpenAPI document of this API (``openapi.json`` beside this module)."""
    return json.loads(resources.files(__package__).joinpath("openapi.json").read_text("utf-8"))


def account_name(api_key: str) -> str:
    """A stable name for the account of ``api_key`` that is safe to log."""
    return "acct-" + hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:10]


class ApiServer(ThreadingHTTPServer):
    """Serves the FlexAI API for one :class:`Cloud` on 127.0.0.1 only."""

    daemon_threads = True

    def __init__(self, port: int, cloud: Cloud, injector: FaultInjector, api_keys: Iterable[str]):
        self.cloud = cloud
        self.injector = injector
        self.api_keys = {key.encode("utf-8"): account_name(key) for key in api_keys}
        self.closing = threading.Event()
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", port), Handler)

    def track(self, conn: socket.socket, open_: bool) -> None:
        with self._connections_lock:
            (self._connections.add if open_ else self._connections.discard)(conn)

    def close(self) -> None:
        """Stop serving and drop kept-alive connections, whose threads would otherwise idle."""
        self.closing.set()
        self.shutdown()
        self.server_close()
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class Handler(BaseHTTPRequestHandler):
    server: ApiServer
    protocol_version = "HTTP/1.1"
    server_version = "FlexAI-Emulator/1"
    timeout = 120
    # Headers and body go out in two writes; with Nagle, delayed ACKs stall each reply ~40 ms.
    disable_nagle_algorithm = True
    body = b""

    # --- plumbing -------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        self.server.track(self.connection, False)
        super().finish()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Each request is logged once, by :meth:`_handle`, with its account and duration."""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors raised by http.server itself (bad request line, odd method...) as JSON too."""
        self.close_connection = True
        # An unparsable request line leaves the HTTP/0.9 default, which would drop the headers.
        self.request_version = self.protocol_version
        if code == HTTPStatus.NOT_IMPLEMENTED:  # an unknown method: as for any other no-route
            error = not_found(f"no route for {self.command} {self.path[:100]}; see docs/api.md")
        else:
            error = ApiError(code, "invalid_request", message or explain or "bad request")
        self._send(error.body(), error.status)

    def _send(self, payload: Any, status: int, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise invalid("chunked request bodies are not supported; send Content-Length")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True
            raise invalid(f"Content-Length must be an integer in 0..{MAX_BODY}")
        return self.rfile.read(length) if length else b""

    # --- one request ----------------------------------------------------------------------

    def _handle(self) -> None:
        started = time.monotonic()
        account = "-"
        headers: dict[str, str] = {}
        try:
            self.body = self._read_body()
            url = urlsplit(self.path)
            path = url.path.rstrip("/") or "/"
            if path == "/openapi.json" and self.command == "GET":  # public, as API docs are
                status, payload = 200, openapi_document()
            else:
                if not path.startswith("/_emulator/"):
                    self._inject_faults()
                account = self._authenticate()
                route, params = self._route(path)
                status, payload = route(self, account, params | {"query": url.query})
        except ApiError as exc:
            status, payload, headers = exc.status, exc.body(), exc.headers
        except Exception:
            log.exception("unexpected error serving %s %s", self.command, self.path)
            status = 500
            payload = ApiError(500, "internal", "unexpected emulator error; see its log").body()
        self._send(payload, status, headers)
        log.debug(
            "%s %s -> %d (%s, %.1f ms)",
            self.command,
            self.path,
            status,
            account,
            (time.monotonic() - started) * 1000,
        )

    # BaseHTTPRequestHandler calls do_<METHOD>: every method goes through the one router.
    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _handle

    def _inject_faults(self) -> None:
        latency = self.server.injector.faults.latency
        if latency:
            self.server.closing.wait(latency)
        fault = self.server.injector.request_fault()
        if fault is not None:
            raise fault

    def _authenticate(self) -> str:
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            given = token.strip().encode("utf-8")
            for key, account in self.server.api_keys.items():
                if hmac.compare_digest(given, key):
                    return account
        raise ApiError(401, "unauthorized", "missing or wrong bearer token")

    def _route(self, path: str) -> tuple[Route, dict[str, str]]:
        for method, pattern, route in ROUTES:
            match = pattern.fullmatch(path)
            if match and method == self.command:
                return route, match.groupdict()
        raise not_found(f"no route for {self.command} {path[:100]}; see docs/api.md")

    def _json_body(self) -> Any:
        return parse_json(self.body)

    # --- routes ---------------------------------------------------------------------------

    def gpu_types(self, account: str, params: dict[str, str]) -> tuple[int, Any]:
        return 200, {"gpu_types": self.server.cloud.gpu_types()}

    def provision(self, account: str, params: dict[str, str]) -> tuple[int, Any]:
        key = self.headers.get("Idempotency-Key")
        if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
            raise invalid(f"Idempotency-Key must have 1..{MAX_IDEMPOTENCY_KEY} characters")
        return self.server.cloud.provision(account, self._json_body(), key)

    def list_instances(self, account: str, params: dict[str, str]) -> tuple[int, Any]:
        query = parse_qs(params["query"], keep_blank_values=True)
        labels = parse_label_filter(query.get("label", []))
        return 200, {"instances": self.server.cloud.list_instances(account, labels)}

    def get_instance(self, account: str, params: dict[str, str]) -> tuple[int, Any]:
        return 200, self.server.cloud.get(account, params["id"])

    def update_instance(self, account: str, params: dict[str, str]) -> tuple[int, Any]:
        self.server.cloud.get(account, params["id"])  # a missing instance: 404 before any 400
        ttl = parse_update(self._json_body())
        return 200, self.server.cloud.set_ttl(account, params["id"], ttl)

    def delete_instance(self, account: str, params: dict[str, str]) -> tuple[int, Any]:
        return 200, self.server.cloud.delete(account, params["id"])

    def stop_instance(self, account: str, params: dict[str, str]) -> tuple[int, Any]:
        return 200, self.server.cloud.stop(account, params["id"])

    def heartbeat(self, account: str, params: dict[str, str]) -> tuple[int, Any]:
        return 200, self.server.cloud.heartbeat(account, params["id"])

    def get_faults(self, account: str, params: dict[str, str]) -> tuple[int, Any]:
        return 200, self.server.injector.snapshot().to_dict()

    def put_faults(self, account: str, params: dict[str, str]) -> tuple[int, Any]:
        changes = self._json_body()
        if not isinstance(changes, dict):
            raise invalid("the body must be a JSON object of fault fields")
        try:
            faults = self.server.injector.update(**changes)
        except ValueError as exc:
            raise invalid(str(exc)) from None
        log.info("faults changed: %s", ", ".join(f"{k}={v!r}" for k, v in changes.items()))
        return 200, faults.to_dict()


ROUTES: list[tuple[str, re.Pattern[str], Route]] = [
    (method, re.compile(pattern), route)
    for method, pattern, route in [
        ("GET", "/v1/gpu-types", Handler.gpu_types),
        ("GET", "/v1/instances", Handler.list_instances),
        ("POST", "/v1/instances", Handler.provision),
        ("GET", f"/v1/instances/{_ID}", Handler.get_instance),
        ("PATCH", f"/v1/instances/{_ID}", Handler.update_instance),
        ("DELETE", f"/v1/instances/{_ID}", Handler.delete_instance),
        ("POST", f"/v1/instances/{_ID}/stop", Handler.stop_instance),
        ("POST", f"/v1/instances/{_ID}/heartbeat", Handler.heartbeat),
        ("GET", "/_emulator/faults", Handler.get_faults),
        ("PUT", "/_emulator/faults", Handler.put_faults),
    ]
]
