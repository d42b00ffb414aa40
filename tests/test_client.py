"""FlexAIClient over real HTTP: against the emulator, and against a stdlib server that answers
things that are not the API (garbage, HTML, wrong shapes) or that we want to script exactly."""

from __future__ import annotations

import http.server
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone

import pytest
from conftest import serving, until
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from flexai_provisioner.client import FlexAIClient
from flexai_provisioner.errors import (
    AuthenticationError,
    ConfigurationError,
    FlexAITimeoutError,
    InvalidRequestError,
    NoCapacityError,
    NotFoundError,
    PlatformError,
    PlatformUnreachableError,
    ProvisioningError,
    ProvisioningTimeoutError,
    UnknownGPUTypeError,
)
from flexai_provisioner.gpu_platform import (
    GPUType,
    Instance,
    InstanceState,
    wait_deleted,
    wait_running,
)

# Retries in these tests wait milliseconds, not the production seconds.
FAST = {"backoff": 0.01, "max_backoff": 0.05}

SSH_PUBLIC_KEY = (
    ed25519.Ed25519PrivateKey.generate()
    .public_key()
    .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    .decode("ascii")
)


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def client(emulator, api_key) -> Iterator[FlexAIClient]:
    with FlexAIClient(emulator.url, api_key, **FAST) as c:
        yield c


@pytest.fixture
def provision(emulator, api_key) -> Iterator[Callable[..., Instance]]:
    """Provision through a client, and delete everything provisioned when the test ends."""
    created: list[str] = []

    def _provision(c: FlexAIClient, gpu_type: str = "A100", **kwargs) -> Instance:
        instance = c.provision(gpu_type, ssh_public_key=SSH_PUBLIC_KEY, **kwargs)
        created.append(instance.id)
        return instance

    yield _provision
    emulator.reset_faults()  # so cleanup itself is not failed on purpose
    with FlexAIClient(emulator.url, api_key) as c:
        for instance_id in created:
            try:
                c.delete_instance(instance_id)
            except NotFoundError:
                continue
            wait_deleted(c, instance_id, timeout=10)


_A100 = {"name": "A100", "memory_gb": 80, "price_per_hour": 1.89, "available": 8}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _instance_json(**changes) -> dict:
    instance = {
        "id": "inst-1",
        "gpu_type": "A100",
        "gpu_count": 1,
        "state": "running",
        "price_per_hour": 1.89,
        "labels": {"a": "1"},
        "created_at": "2026-11-29T01:50:07Z",
        "ttl_seconds": 600,
        "expires_at": "2026-11-29T02:00:07Z",
        "ssh": {
            "host": "127.0.0.1",
            "port": 40123,
            "user": "root",
            "host_key_fingerprint": "SHA256:nThbg6kXUpJWGl7E1IGOCspRomTxdCARLviKw6E5SY8",
        },
        "message": "",
    }
    instance.update(changes)
    return instance


class ScriptedAPI(http.server.ThreadingHTTPServer):
    """Answers each request with the next scripted reply (the last one repeats); records requests.

    A reply is ``(status, body, headers)``; a dict or list body is sent as JSON.
    """

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)
        self.replies: list[tuple[int, object, dict[str, str]]] = [(200, {}, {})]
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def script(self, *replies: tuple[int, object] | tuple[int, object, dict[str, str]]) -> None:
        self.replies = [(r[0], r[1], r[2] if len(r) > 2 else {}) for r in replies]


class _ScriptedHandler(http.server.BaseHTTPRequestHandler):
    server: ScriptedAPI

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append((self.command, self.path, dict(self.headers)))
        replies = self.server.replies
        status, body, headers = replies.pop(0) if len(replies) > 1 else replies[0]
        if isinstance(body, (dict, list)):
            data, ctype = json.dumps(body).encode(), "application/json"
        else:
            data, ctype = str(body).encode(), "text/html"
        self.send_response(status)
        self.send_header("Content-Type", headers.pop("Content-Type", ctype))
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[ScriptedAPI]:
    with serving(ScriptedAPI()) as server:
        yield server


# -- configuration -------------------------------------------------------------------------------


def test_settings_fall_back_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXAI_API_URL", "https://api.example.com/")
    monkeypatch.setenv("FLEXAI_API_KEY", "env-key")
    assert FlexAIClient().api_url == "https://api.example.com"


@pytest.mark.parametrize(
    ("url", "key", "says"),
    [
        (None, "k", "FLEXAI_API_URL"),
        ("https://api.example.com", None, "FLEXAI_API_KEY"),
        ("https://api.example.com", "  ", "FLEXAI_API_KEY"),
        ("ftp://api.example.com", "k", "http(s)"),
        ("api.example.com", "k", "http(s)"),
        ("http://", "k", "http(s)"),
        ("https://api.example.com:99999", "k", "http(s)"),
        ("http://api.example.com", "k", "use https for a remote API"),
        ("https://user:pw@api.example.com", "k", "FLEXAI_API_KEY"),
        ("https://api.example.com", "two words", "FLEXAI_API_KEY"),
        ("https://api.example.com", "k\r\nX-Evil: 1", "FLEXAI_API_KEY"),
    ],
)
def test_unusable_settings_say_what_to_set(
    monkeypatch: pytest.MonkeyPatch, url: str | None, key: str | None, says: str
) -> None:
    monkeypatch.delenv("FLEXAI_API_URL", raising=False)
    monkeypatch.delenv("FLEXAI_API_KEY", raising=False)
    with pytest.raises(ConfigurationError, match=None) as info:
        FlexAIClient(url, key)
    assert says in str(info.value)
    if url is None or key in (None, "  "):
        assert "jupyter flexai emulator" in str(info.value)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "http://localhost", "http://[::1]:9"])
def test_plain_http_is_fine_on_loopback(url: str) -> None:
    assert FlexAIClient(url, "k").api_url == url


def test_plain_http_to_a_remote_host_needs_allow_insecure() -> None:
    client = FlexAIClient("http://10.1.2.3:8080", "k", allow_insecure=True)
    assert client.api_url == "http://10.1.2.3:8080"


def test_the_key_is_never_shown(scripted: ScriptedAPI, caplog: pytest.LogCaptureFixture) -> None:
    key = "sk-" + uuid.uuid4().hex
    client = FlexAIClient(scripted.url, key, max_retries=2, **FAST)
    scripted.script(
        (503, {"error": {"code": "unavailable", "message": "busy"}}),
        (401, {"error": {"code": "unauthorized", "message": f"bad key {key}"}}),
    )
    caplog.set_level(logging.DEBUG, logger="flexai_provisioner.client")
    with pytest.raises(AuthenticationError) as info:
        client.list_gpu_types()
    assert "retrying GET /v1/gpu-types" in caplog.text
    for shown in (repr(client), str(info.value), caplog.text, repr(client.__dict__)):
        assert key not in shown
    assert scripted.requests[-1][2]["Authorization"] == f"Bearer {key}"


# -- every operation, against the emulator -------------------------------------------------------


def test_list_gpu_types(client: FlexAIClient) -> None:
    types = client.list_gpu_types()
    assert types and all(isinstance(t, GPUType) for t in types)
    a100 = next(t for t in types if t.name == "A100")
    assert a100.memory_gb == 80 and a100.price_per_hour == pytest.approx(1.89)
    assert a100.available > 0


def test_instance_lifecycle(client: FlexAIClient, provision) -> None:
    before = time.time()
    instance = provision(client, "A100", gpu_count=2, labels={"who": "test"}, ttl_seconds=600)
    assert instance.state in (InstanceState.PENDING, InstanceState.PROVISIONING)
    assert instance.gpu_type == "A100" and instance.gpu_count == 2
    assert instance.labels == {"who": "test"} and instance.ssh is None
    assert instance.price_per_hour == pytest.approx(2 * 1.89)
    assert instance.created_at.tzinfo is not None
    assert abs(instance.created_at.timestamp() - before) < 60

    seen: list[InstanceState] = []
    running = wait_running(client, instance.id, timeout=20, on_state=lambda i: seen.append(i.state))
    assert running.state is InstanceState.RUNNING and seen[-1] is InstanceState.RUNNING
    assert len(seen) == len(set(seen)), "on_state is called on changes only"
    assert running.ssh is not None and running.ssh.port > 0
    assert running.ssh.host_key_fingerprint.startswith("SHA256:")
    with socket.create_connection((running.ssh.host, running.ssh.port), timeout=5) as sock:
        assert sock.recv(4).startswith(b"SSH-")

    assert client.get_instance(instance.id) == running
    assert instance.id in {i.id for i in client.list_instances()}

    assert running.expires_at is not None
    beat = client.heartbeat(instance.id)
    assert beat.expires_at is not None and beat.expires_at >= running.expires_at

    stopped = client.stop_instance(instance.id)
    assert stopped.state in (InstanceState.STOPPING, InstanceState.STOPPED)

    deleted = client.delete_instance(instance.id)
    assert deleted.state in (InstanceState.STOPPING, InstanceState.DELETED)
    wait_deleted(client, instance.id, timeout=10)
    assert instance.id not in {i.id for i in client.list_instances()}


def test_heartbeat_pushes_back_expiry(client: FlexAIClient, provision) -> None:
    instance = provision(client, "L4", ttl_seconds=3600)
    assert instance.expires_at is not None
    beat = until(
        lambda: (b := client.heartbeat(instance.id)).expires_at != instance.expires_at and b,
        "a heartbeat to move expires_at",
        5,
    )
    assert beat.expires_at > instance.expires_at


def test_set_ttl_replaces_the_lease(client: FlexAIClient, provision) -> None:
    instance = provision(client, "L4", ttl_seconds=3600)
    parked = client.set_ttl(instance.id, 60)
    assert parked.ttl_seconds == 60
    assert parked.expires_at is not None and instance.expires_at is not None
    assert parked.expires_at < instance.expires_at
    restored = client.set_ttl(instance.id, None)
    assert restored.ttl_seconds is None and restored.expires_at is None


def test_list_by_labels_requires_every_label(client: FlexAIClient, provision) -> None:
    run = uuid.uuid4().hex
    both = provision(client, "L4", labels={"run": run, "role": "a"})
    other = provision(client, "L4", labels={"run": run, "role": "b"})
    assert {i.id for i in client.list_instances({"run": run})} == {both.id, other.id}
    assert [i.id for i in client.list_instances({"run": run, "role": "a"})] == [both.id]
    assert client.list_instances({"run": run, "role": "c"}) == []


def test_labels_travel_as_repeated_query_params(scripted: ScriptedAPI) -> None:
    scripted.script((200, {"instances": [_instance_json()]}))
    client = FlexAIClient(scripted.url, "k")
    [instance] = client.list_instances({"a": "1", "b": "x=y"})
    assert instance.labels == {"a": "1"}
    assert scripted.requests[0][1] == "/v1/instances?label=a%3D1&label=b%3Dx%3Dy"


def test_an_instance_is_parsed_whole(scripted: ScriptedAPI) -> None:
    scripted.script((200, _instance_json()))
    instance = FlexAIClient(scripted.url, "k").get_instance("inst-1")
    assert instance.created_at == datetime(2026, 11, 29, 1, 50, 7, tzinfo=timezone.utc)
    assert instance.expires_at == datetime(2026, 11, 29, 2, 0, 7, tzinfo=timezone.utc)
    assert instance.ssh is not None and instance.ssh.port == 40123
    assert instance.ttl_seconds == 600 and instance.message == ""


def test_instance_ids_cannot_escape_the_path(scripted: ScriptedAPI) -> None:
    scripted.script((200, _instance_json()))
    FlexAIClient(scripted.url, "k").get_instance("../gpu-types")
    assert scripted.requests[0][1] == "/v1/instances/..%2Fgpu-types"


# -- errors --------------------------------------------------------------------------------------


def test_wrong_key(emulator) -> None:
    client = FlexAIClient(emulator.url, "not-the-key", **FAST)
    with pytest.raises(AuthenticationError, match="check FLEXAI_API_KEY") as info:
        client.list_gpu_types()
    assert (info.value.status, info.value.code) == (401, "unauthorized")


def test_unknown_gpu_type_lists_the_offered_ones(client: FlexAIClient) -> None:
    with pytest.raises(UnknownGPUTypeError) as info:
        client.provision("Z9000", ssh_public_key=SSH_PUBLIC_KEY)
    assert {"A100", "H100"} <= set(info.value.known)
    assert "A100" in str(info.value) and "H100" in str(info.value)
    assert (info.value.status, info.value.code) == (400, "unknown_gpu_type")


def test_no_capacity_names_what_is_free(client: FlexAIClient, emulator) -> None:
    emulator.update_faults(capacity={"H100": 0})
    with pytest.raises(NoCapacityError) as info:
        client.provision("H100", ssh_public_key=SSH_PUBLIC_KEY)
    assert "H100" not in info.value.available and "A100" in info.value.available
    assert "A100" in str(info.value)
    assert (info.value.status, info.value.code) == (409, "no_capacity")


def test_not_found(client: FlexAIClient) -> None:
    calls = (client.get_instance, client.delete_instance, client.stop_instance, client.heartbeat)
    for call in (*calls, lambda instance_id: client.set_ttl(instance_id, 60)):
        with pytest.raises(NotFoundError) as info:
            call("inst-doesnotexist")
        assert (info.value.status, info.value.code) == (404, "not_found")


@pytest.mark.parametrize("gpu_count", [0, 10000])
def test_invalid_request(client: FlexAIClient, gpu_count: int) -> None:
    with pytest.raises(InvalidRequestError, match="gpu_count") as info:
        client.provision("A100", ssh_public_key=SSH_PUBLIC_KEY, gpu_count=gpu_count)
    assert (info.value.status, info.value.code) == (400, "invalid_request")


def test_unreachable_url_names_it_and_what_to_check() -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    client = FlexAIClient(url, "k", max_retries=2, **FAST)
    with pytest.raises(PlatformUnreachableError) as info:
        client.list_gpu_types()
    message = str(info.value)
    assert url in message and "FLEXAI_API_URL" in message and "emulator" in message
    assert "refused" in message.lower() and "3 attempts" in message


def test_a_slow_api_times_out_as_unreachable(emulator, api_key) -> None:
    emulator.update_faults(latency=1.0)
    client = FlexAIClient(emulator.url, api_key, timeout=0.2, max_retries=1, **FAST)
    started = time.monotonic()
    with pytest.raises(PlatformUnreachableError, match=r"no answer within 0\.2 s"):
        client.list_gpu_types()
    assert time.monotonic() - started < 1.0


def test_an_api_that_never_answers_is_an_error_within_the_deadline(silent_api: str) -> None:
    client = FlexAIClient(silent_api, "k")  # the defaults: what a user gets
    started = time.monotonic()
    with pytest.raises(PlatformUnreachableError, match="no answer within") as info:
        client.list_gpu_types()
    elapsed = time.monotonic() - started
    assert 20 <= elapsed < 30, f"a hung API took {elapsed:.1f} s to give up on"
    assert silent_api in str(info.value)
    started = time.monotonic()
    with pytest.raises(PlatformUnreachableError, match="2 attempts"):
        FlexAIClient(silent_api, "k", timeout=0.5, deadline=1.0, **FAST).list_gpu_types()
    assert time.monotonic() - started < 3


@pytest.mark.parametrize(
    ("status", "body", "says"),
    [
        (200, "<html><body>Welcome to nginx!</body></html>", "not JSON"),
        (200, "", "empty body"),
        (200, [1, 2], "a list"),
        (200, {"gpu_types": "A100"}, "'gpu_types' is a string"),
        (200, {"gpu_types": [{"name": "A100"}]}, "missing 'memory_gb'"),
        (200, {"gpu_types": [{**_A100, "memory_gb": True}]}, "'memory_gb' is bool"),
        (404, "<html>Not Found</html>", "HTTP 404"),
        (401, {"detail": "nope"}, "not a FlexAI API error"),
        (400, {"error": "bad"}, "not a FlexAI API error"),
        (418, {"error": {"code": "teapot", "message": "short and stout"}}, "short and stout"),
        (302, "", "HTTP 302"),
    ],
)
def test_answers_that_are_not_the_api(
    scripted: ScriptedAPI, status: int, body: object, says: str
) -> None:
    scripted.script((status, body))
    with pytest.raises(PlatformError) as info:
        FlexAIClient(scripted.url, "k", max_retries=0).list_gpu_types()
    assert type(info.value) is PlatformError, "a shape we cannot read is not a typed API error"
    assert says in str(info.value) and info.value.status == status


@pytest.mark.parametrize(
    "changes",
    [
        {"state": "exploded"},
        {"created_at": "yesterday"},
        {"created_at": "2026-11-29T01:50:07"},
        {"labels": {"a": 1}},
        {"ssh": {"host": "h"}},
        {"gpu_count": "1"},
        {"id": None},
    ],
)
def test_instances_that_are_not_the_api(scripted: ScriptedAPI, changes: dict) -> None:
    scripted.script((200, _instance_json(**changes)))
    with pytest.raises(PlatformError, match="not the FlexAI API's") as info:
        FlexAIClient(scripted.url, "k").get_instance("inst-1")
    assert type(info.value) is PlatformError


# -- retries -------------------------------------------------------------------------------------


def _retries(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The client's retry log lines, without their random delays."""
    return [
        r.getMessage().split(" in ")[0]
        for r in caplog.records
        if r.name == "flexai_provisioner.client" and r.getMessage().startswith("retrying")
    ]


def test_transient_failures_are_retried(
    client: FlexAIClient, emulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="flexai_provisioner.client")
    emulator.update_faults(fail_next=3, fail_status=503)
    assert client.list_gpu_types()
    assert _retries(caplog) == ["retrying GET /v1/gpu-types after HTTP 503"] * 3


def test_a_rate_limit_storm_is_ridden_out(
    emulator, api_key, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="flexai_provisioner.client")
    emulator.update_faults(rate_limit_rate=0.5, seed=7)
    client = FlexAIClient(emulator.url, api_key, max_retries=20, **FAST)
    for _ in range(10):
        assert client.list_gpu_types()
    assert len(_retries(caplog)) >= 3
    assert set(_retries(caplog)) == {"retrying GET /v1/gpu-types after HTTP 429"}


def test_retries_run_out(emulator, api_key, caplog: pytest.LogCaptureFixture) -> None:
    emulator.update_faults(fail_next=100, fail_status=503)
    caplog.set_level(logging.DEBUG, logger="flexai_provisioner.client")
    client = FlexAIClient(emulator.url, api_key, max_retries=2, **FAST)
    with pytest.raises(PlatformError, match="gave up after 3 attempts") as info:
        client.list_gpu_types()
    assert (info.value.status, info.value.code) == (503, "unavailable")
    assert _retries(caplog) == ["retrying GET /v1/gpu-types after HTTP 503"] * 2


def test_non_retryable_errors_are_not_retried(scripted: ScriptedAPI) -> None:
    scripted.script((400, {"error": {"code": "invalid_request", "message": "no"}}))
    with pytest.raises(InvalidRequestError):
        FlexAIClient(scripted.url, "k", **FAST).list_gpu_types()
    assert len(scripted.requests) == 1


def test_retry_after_is_honoured_and_capped(scripted: ScriptedAPI) -> None:
    scripted.script((429, {}, {"Retry-After": "0.3"}), (200, {"gpu_types": []}))
    started = time.monotonic()
    assert FlexAIClient(scripted.url, "k", max_backoff=5).list_gpu_types() == []
    assert time.monotonic() - started >= 0.3

    scripted.script((503, {}, {"Retry-After": "3600"}), (200, {"gpu_types": []}))
    started = time.monotonic()
    assert FlexAIClient(scripted.url, "k", max_backoff=0.05).list_gpu_types() == []
    assert time.monotonic() - started < 1


def test_retry_after_zero_storms_are_spread_over_seconds(scripted: ScriptedAPI) -> None:
    scripted.script(*[(503, {}, {"Retry-After": "0"})] * 6)
    started = time.monotonic()
    with pytest.raises(PlatformError, match="gave up after 6 attempts"):
        FlexAIClient(scripted.url, "k").list_gpu_types()
    assert time.monotonic() - started >= 3, "all retries were spent in a burst"


def test_provision_retries_with_one_idempotency_key(scripted: ScriptedAPI) -> None:
    scripted.script((502, "<html>bad gateway</html>"), (201, _instance_json()))
    FlexAIClient(scripted.url, "k", **FAST).provision("A100", ssh_public_key="ssh-ed25519 AAAA")
    first, second = (headers for _, _, headers in scripted.requests)
    assert first["Idempotency-Key"] == second["Idempotency-Key"]
    uuid.UUID(first["Idempotency-Key"])
    assert first["User-Agent"].startswith("flexai-provisioner/")


def test_provision_uses_the_callers_idempotency_key(scripted: ScriptedAPI) -> None:
    scripted.script((201, _instance_json()))
    FlexAIClient(scripted.url, "k").provision(
        "A100", ssh_public_key="ssh-ed25519 AAAA", idempotency_key="mine"
    )
    assert scripted.requests[0][2]["Idempotency-Key"] == "mine"


def test_error_after_create_leaves_exactly_one_instance(
    client: FlexAIClient, emulator, provision, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="flexai_provisioner.client")
    labels = {"run": uuid.uuid4().hex}
    emulator.update_faults(error_after_create=2)
    instance = provision(client, "L4", labels=labels)
    assert _retries(caplog) == ["retrying POST /v1/instances after HTTP 500"]
    assert [i.id for i in client.list_instances(labels)] == [instance.id]


def test_calls_from_several_threads(client: FlexAIClient) -> None:
    results: list[list[GPUType]] = []
    threads = [
        threading.Thread(target=lambda: results.append(client.list_gpu_types())) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(results) == 8 and all(r == results[0] for r in results)


# -- waiting -------------------------------------------------------------------------------------


def test_wait_running_times_out_saying_how_to_wait_longer(
    client: FlexAIClient, emulator, provision
) -> None:
    emulator.update_faults(stuck=True)
    instance = provision(client, "L4")
    started = time.monotonic()
    with pytest.raises(ProvisioningTimeoutError) as info:
        wait_running(client, instance.id, timeout=0.5)
    assert 0.5 <= time.monotonic() - started < 2.5
    message = str(info.value)
    assert instance.id in message and "0.5 s" in message
    assert "c.FlexAIProvisioner.provision_timeout" in message
    assert "pending" in message or "provisioning" in message


def test_wait_running_reports_a_failed_provisioning(
    client: FlexAIClient, emulator, provision
) -> None:
    emulator.update_faults(fail_provisioning=True)
    instance = provision(client, "L4")
    with pytest.raises(ProvisioningError, match="failed to start") as info:
        wait_running(client, instance.id, timeout=20)
    assert not isinstance(info.value, ProvisioningTimeoutError)
    assert client.get_instance(instance.id).state is InstanceState.FAILED


def test_wait_running_stops_promptly_when_cancelled(
    client: FlexAIClient, emulator, provision, monkeypatch: pytest.MonkeyPatch
) -> None:
    emulator.update_faults(stuck=True)
    instance = provision(client, "L4")
    get_instance, polls = client.get_instance, []
    polled_enough, cancel, outcome = threading.Event(), threading.Event(), []

    def counted_get_instance(instance_id: str) -> Instance:
        polls.append(instance_id)
        if len(polls) == 6:  # the next poll is >= 0.8 s away: cancelling must cut that short
            polled_enough.set()
        return get_instance(instance_id)

    monkeypatch.setattr(client, "get_instance", counted_get_instance)

    def wait() -> None:
        try:
            wait_running(client, instance.id, timeout=60, cancel=cancel)
        except ProvisioningError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()
    assert polled_enough.wait(10)
    cancelled_at = time.monotonic()
    cancel.set()
    thread.join(10)
    assert time.monotonic() - cancelled_at < 0.5
    [error] = outcome
    assert "cancelled" in str(error)


def test_wait_running_reports_an_instance_stopped_meanwhile(
    client: FlexAIClient, emulator, provision
) -> None:
    emulator.update_faults(stuck=True)
    instance = provision(client, "L4")
    client.stop_instance(instance.id)
    with pytest.raises(ProvisioningError, match="became stopped before it was running"):
        wait_running(client, instance.id, timeout=5)


def test_a_deletion_under_way_is_waited_for(scripted: ScriptedAPI) -> None:
    stopping = _instance_json(state="stopping", ssh=None)
    scripted.script(
        (202, stopping),
        (200, stopping),
        (404, {"error": {"code": "not_found", "message": "no instance 'inst-1'"}}),
    )
    client = FlexAIClient(scripted.url, "k")
    assert client.delete_instance("inst-1").state is InstanceState.STOPPING
    wait_deleted(client, "inst-1", timeout=5, poll=0.01)
    assert [(m, p) for m, p, _ in scripted.requests] == [
        ("DELETE", "/v1/instances/inst-1"),
        ("GET", "/v1/instances/inst-1"),
        ("GET", "/v1/instances/inst-1"),
    ]


def test_wait_deleted_times_out_with_a_platform_error(scripted: ScriptedAPI) -> None:
    scripted.script((200, _instance_json(state="stopping", ssh=None)))
    with pytest.raises(PlatformError, match=r"still stopping 0\.2 s after") as info:
        wait_deleted(FlexAIClient(scripted.url, "k"), "inst-1", timeout=0.2, poll=0.05)
    assert isinstance(info.value, FlexAITimeoutError)
