"""The local FlexAI platform emulator, over real HTTP and real SSH."""

from __future__ import annotations

import base64
import contextlib
import glob
import hashlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
import requests
from conftest import until

from flexai_provisioner.emulator import Emulator, EmulatorError, Faults, GPUCatalogEntry
from flexai_provisioner.emulator.keys import new_private_key, public_line, write_private_key

RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")

# A classic daemon: double fork and setsid, so it is in no process tree or group of sshd's.
DAEMON = """
import os, sys
if os.fork():
    sys.exit(0)
os.setsid()
if os.fork():
    os._exit(0)
print(os.getpid(), flush=True)
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
os.execvp("sleep", ["sleep", "1000"])
"""


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :][:1] not in (b"Z", b"X")


class Api:
    """A thin requests session against one emulator account."""

    def __init__(self, url: str, key: str | None, public_key: str):
        self.url = url
        self.public_key = public_key
        self.session = requests.Session()
        if key is not None:
            self.session.headers["Authorization"] = f"Bearer {key}"
        self.created: list[str] = []

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.session.request(method, self.url + path, timeout=30, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def provision(self, headers: dict[str, str] | None = None, **body: Any) -> requests.Response:
        body = {"gpu_type": "L4", "ssh_public_key": self.public_key, **body}
        response = self.post("/v1/instances", json=body, headers=headers)
        if response.status_code in (200, 201):
            self.created.append(response.json()["id"])
        return response

    def instance(self, instance_id: str) -> dict[str, Any]:
        response = self.get(f"/v1/instances/{instance_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def wait_state(self, instance_id: str, *states: str, timeout: float = 10.0) -> dict[str, Any]:
        return until(
            lambda: (inst := self.instance(instance_id))["state"] in states and inst,
            f"{instance_id} to be {'/'.join(states)}",
            timeout,
        )

    def running(self, **body: Any) -> dict[str, Any]:
        response = self.provision(**body)
        assert response.status_code == 201, response.text
        return self.wait_state(response.json()["id"], "running")

    def delete(self, instance_id: str) -> requests.Response:
        return self.request("DELETE", f"/v1/instances/{instance_id}")

    def available(self, gpu_type: str) -> int:
        types = self.get("/v1/gpu-types").json()["gpu_types"]
        return next(t["available"] for t in types if t["name"] == gpu_type)

    def cleanup(self) -> None:
        for instance_id in self.created:
            self.delete(instance_id)
        self.session.close()


@pytest.fixture(scope="session")
def client_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An ed25519 key pair for SSH: (private key file, public key line)."""
    key = new_private_key()
    path = tmp_path_factory.mktemp("client-key") / "id_ed25519"
    write_private_key(key, path)
    return path, public_line(key, "flexai-test")


@pytest.fixture
def api(emulator: Emulator, api_key: str, client_key: tuple[Path, str]) -> Iterator[Api]:
    client = Api(emulator.url, api_key, client_key[1])
    yield client
    client.cleanup()


@pytest.fixture
def other_api(
    emulator: Emulator, other_api_key: str, client_key: tuple[Path, str]
) -> Iterator[Api]:
    client = Api(emulator.url, other_api_key, client_key[1])
    yield client
    client.cleanup()


def assert_error(response: requests.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    return error


# --- SSH helpers -----------------------------------------------------------------------------


def openssh_fingerprint(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def ssh_connect(instance: dict[str, Any], key_path: Path) -> tuple[paramiko.Transport, str]:
    """An authenticated transport to ``instance``, and the fingerprint its server presented."""
    ssh = instance["ssh"]
    transport = paramiko.Transport(socket.create_connection((ssh["host"], ssh["port"]), 10))
    try:
        transport.start_client(timeout=10)
        presented = openssh_fingerprint(transport.get_remote_server_key())
        transport.auth_publickey(ssh["user"], paramiko.Ed25519Key.from_private_key_file(key_path))
    except BaseException:
        transport.close()
        raise
    return transport, presented


def ssh_run(transport: paramiko.Transport, command: str, stdin: str = "") -> tuple[int, str]:
    channel = transport.open_session(timeout=10)
    channel.settimeout(20)
    channel.exec_command(command)
    if stdin:
        channel.sendall(stdin.encode())
    channel.shutdown_write()
    output = b""
    while chunk := channel.recv(65536):
        output += chunk
    status = channel.recv_exit_status()
    channel.close()
    return status, output.decode()


# --- the API: auth, errors, objects -----------------------------------------------------------


def test_gpu_types_catalog(api: Api) -> None:
    response = api.get("/v1/gpu-types")
    assert response.status_code == 200
    assert response.json() == {
        "gpu_types": [
            {"name": "A100", "memory_gb": 80, "price_per_hour": 1.89, "available": 8},
            {"name": "H100", "memory_gb": 80, "price_per_hour": 3.49, "available": 4},
            {"name": "L40S", "memory_gb": 48, "price_per_hour": 1.19, "available": 8},
            {"name": "L4", "memory_gb": 24, "price_per_hour": 0.59, "available": 16},
        ]
    }


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Bearer ", "Basic x", "token"])
@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/v1/instances"),
        ("GET", "/_emulator/faults"),
        ("POST", "/v1/instances"),
        ("GET", "/nowhere"),
    ],
)
def test_unauthorized(
    emulator: Emulator, authorization: str | None, method: str, path: str
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = requests.request(method, emulator.url + path, headers=headers, json={}, timeout=10)
    assert_error(response, 401, "unauthorized")


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/"),
        ("GET", "/v2/instances"),
        ("PUT", "/v1/instances"),
        ("PATCH", "/v1/instances/inst-000000000000"),
        ("GET", "/v1/instances/inst-000000000000"),
        ("DELETE", "/v1/instances/inst-000000000000"),
        ("POST", "/v1/instances/inst-000000000000/stop"),
        ("POST", "/v1/instances/inst-000000000000/heartbeat"),
        ("GET", "/v1/instances/a/b/c"),
    ],
)
def test_not_found(api: Api, method: str, path: str) -> None:
    assert_error(api.request(method, path), 404, "not_found")


@pytest.mark.parametrize(
    "request_head",
    [
        "GARBAGE\r\n\r\n",
        "GET / HTTP/x.y\r\n\r\n",
        "BREW /pot HTTP/1.1\r\n\r\n",
        "POST /v1/instances HTTP/1.1\r\nAuthorization: Bearer {key}\r\nContent-Length: x\r\n\r\n",
        "POST /v1/instances HTTP/1.1\r\nAuthorization: Bearer {key}\r\n"
        "Content-Length: 99999999\r\n\r\n",
        "POST /v1/instances HTTP/1.1\r\nAuthorization: Bearer {key}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ],
    ids=["garbage", "bad version", "unknown method", "bad length", "huge length", "chunked"],
)
def test_http_level_garbage_is_answered_in_json(
    emulator: Emulator, api_key: str, request_head: str
) -> None:
    with socket.create_connection(("127.0.0.1", emulator.port), timeout=10) as sock:
        sock.sendall(request_head.format(key=api_key).encode())
        reply = sock.makefile("rb").read()  # the server closes the connection after answering
    head, _, body = reply.partition(b"\r\n\r\n")
    assert re.match(rb"HTTP/1.1 (400|404) ", head), head
    assert b"Content-Type: application/json" in head
    error = json.loads(body)["error"]
    assert error["code"] in ("invalid_request", "not_found") and error["message"]


def test_server_binds_loopback_only(emulator: Emulator) -> None:
    assert emulator.url == f"http://127.0.0.1:{emulator.port}"
    listening = [
        fields[1]
        for fields in (line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:])
        if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == emulator.port
    ]
    assert listening == [f"0100007F:{emulator.port:04X}"]


DROP = object()
BAD_BODIES: list[tuple[str, Any]] = [
    ("not json", b"{not json"),
    ("not utf-8", b"\xff\xfe"),
    ("deep nesting", b"[" * 100_000),
    ("array", []),
    ("missing gpu_type", {"gpu_type": DROP}),
    ("gpu_type not a string", {"gpu_type": 5}),
    ("missing ssh_public_key", {"ssh_public_key": DROP}),
    ("ssh_public_key garbage", {"ssh_public_key": "not a key"}),
    ("ssh_public_key with options", {"ssh_public_key": 'command="sh" ssh-ed25519 AAAA'}),
    ("gpu_count 0", {"gpu_count": 0}),
    ("gpu_count 9", {"gpu_count": 9}),
    ("gpu_count string", {"gpu_count": "1"}),
    ("gpu_count bool", {"gpu_count": True}),
    ("gpu_count float", {"gpu_count": 1.5}),
    ("labels list", {"labels": ["a"]}),
    ("label key charset", {"labels": {"bad key!": "v"}}),
    ("label key too long", {"labels": {"k" * 64: "v"}}),
    ("label value type", {"labels": {"k": 5}}),
    ("label value too long", {"labels": {"k": "v" * 257}}),
    ("too many labels", {"labels": {f"k{i}": "v" for i in range(33)}}),
    ("ttl 0", {"ttl_seconds": 0}),
    ("ttl string", {"ttl_seconds": "60"}),
    ("ttl float", {"ttl_seconds": 1.5}),
    ("ttl huge", {"ttl_seconds": 10**30}),
]


@pytest.mark.parametrize("body", [b for _, b in BAD_BODIES], ids=[n for n, _ in BAD_BODIES])
def test_invalid_provision_requests(api: Api, emulator: Emulator, body: Any) -> None:
    if isinstance(body, bytes):
        response = api.post(
            "/v1/instances", data=body, headers={"Content-Type": "application/json"}
        )
    elif isinstance(body, dict):
        full = {"gpu_type": "L4", "ssh_public_key": api.public_key, **body}
        response = api.post("/v1/instances", json={k: v for k, v in full.items() if v is not DROP})
    else:
        response = api.post("/v1/instances", json=body)
    assert_error(response, 400, "invalid_request")
    assert emulator.live_instances() == []


def test_valid_edge_values_are_accepted(api: Api) -> None:
    labels = {f"k.{i}/x-y_{i}": "v" * 256 for i in range(32)}
    response = api.provision(gpu_count=8, labels=labels, ttl_seconds=None, gpu_type="A100")
    assert response.status_code == 201, response.text
    assert response.json()["labels"] == labels
    assert api.delete(response.json()["id"]).json()["state"] == "deleted"


def test_unknown_gpu_type(api: Api) -> None:
    error = assert_error(api.provision(gpu_type="Z9000"), 400, "unknown_gpu_type")
    assert error["gpu_types"] == ["A100", "H100", "L40S", "L4"]


def test_no_capacity(api: Api, emulator: Emulator) -> None:
    emulator.update_faults(capacity={"H100": 1, "L40S": 0})
    assert api.available("H100") == 1
    error = assert_error(api.provision(gpu_type="H100", gpu_count=2), 409, "no_capacity")
    assert error["available"] == ["A100", "H100", "L4"]
    first = api.running(gpu_type="H100")
    assert api.available("H100") == 0
    error = assert_error(api.provision(gpu_type="H100"), 409, "no_capacity")
    assert error["available"] == ["A100", "L4"]
    api.delete(first["id"])
    assert api.available("H100") == 1


def test_instance_object_and_listing(api: Api) -> None:
    run = uuid.uuid4().hex
    response = api.provision(
        gpu_type="A100", gpu_count=3, labels={"run": run, "n": "1"}, ttl_seconds=600
    )
    assert response.status_code == 201
    created = response.json()
    assert created["state"] == "pending"
    assert created["ssh"] is None
    assert re.fullmatch(r"inst-[0-9a-f]{12}", created["id"])
    assert created["price_per_hour"] == pytest.approx(5.67)
    assert RFC3339.fullmatch(created["created_at"])
    assert RFC3339.fullmatch(created["expires_at"])
    assert created["ttl_seconds"] == 600
    second = api.provision(labels={"run": run, "n": "2"}).json()
    assert api.provision(labels={"run": run}).status_code == 201
    listed = api.get("/v1/instances", params=[("label", f"run={run}"), ("label", "n=2")])
    assert [i["id"] for i in listed.json()["instances"]] == [second["id"]]
    listed = api.get("/v1/instances", params={"label": f"run={run}"}).json()["instances"]
    assert len(listed) == 3
    assert_error(api.get("/v1/instances", params={"label": "novalue"}), 400, "invalid_request")


def test_accounts_are_isolated(api: Api, other_api: Api) -> None:
    mine = api.provision(labels={"owner": "me"}).json()["id"]
    for method, path in [("GET", ""), ("POST", "/stop"), ("POST", "/heartbeat"), ("DELETE", "")]:
        assert_error(other_api.request(method, f"/v1/instances/{mine}{path}"), 404, "not_found")
    assert mine not in [i["id"] for i in other_api.get("/v1/instances").json()["instances"]]
    assert mine in [i["id"] for i in api.get("/v1/instances").json()["instances"]]
    assert api.instance(mine)["state"] != "deleted"


def test_idempotent_replay_and_conflict(api: Api, other_api: Api) -> None:
    key, run = str(uuid.uuid4()), uuid.uuid4().hex
    headers = {"Idempotency-Key": key}
    first = api.provision(headers=headers, labels={"run": run})
    assert first.status_code == 201
    replay = api.provision(headers=headers, labels={"run": run})
    assert replay.status_code == 200
    assert replay.json()["id"] == first.json()["id"]
    assert len(api.get("/v1/instances", params={"label": f"run={run}"}).json()["instances"]) == 1
    conflict = api.provision(headers=headers, labels={"run": run}, gpu_count=2)
    assert_error(conflict, 409, "idempotency_conflict")
    elsewhere = other_api.provision(headers=headers, labels={"run": run})
    assert elsewhere.status_code == 201, "idempotency keys are scoped per account"
    assert elsewhere.json()["id"] != first.json()["id"]


def test_error_after_create_then_idempotent_retry_creates_one(api: Api, emulator: Emulator) -> None:
    emulator.update_faults(error_after_create=1)
    headers, run = {"Idempotency-Key": str(uuid.uuid4())}, uuid.uuid4().hex
    assert_error(api.provision(headers=headers, labels={"run": run}), 500, "internal")
    listed = api.get("/v1/instances", params={"label": f"run={run}"}).json()["instances"]
    assert len(listed) == 1, "the failed-looking request did create the instance"
    api.created.append(listed[0]["id"])
    retry = api.provision(headers=headers, labels={"run": run})
    assert retry.status_code == 200
    assert retry.json()["id"] == listed[0]["id"]
    assert len(api.get("/v1/instances", params={"label": f"run={run}"}).json()["instances"]) == 1


# --- instances over SSH -----------------------------------------------------------------------


def test_running_instance_serves_ssh_with_its_environment(
    api: Api, emulator: Emulator, client_key: tuple[Path, str]
) -> None:
    inst = api.running(gpu_type="A100", gpu_count=2)
    ssh = inst["ssh"]
    assert ssh["host"] == "127.0.0.1"
    assert ssh["host_key_fingerprint"].startswith("SHA256:")
    transport, presented = ssh_connect(inst, client_key[0])
    try:
        assert presented == ssh["host_key_fingerprint"]
        status, out = ssh_run(transport, "env")
        assert status == 0
        env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        assert env["FLEXAI_INSTANCE_ID"] == inst["id"]
        assert env["FLEXAI_GPU_TYPE"] == "A100"
        assert env["FLEXAI_GPU_COUNT"] == "2"
        python_dir = os.path.dirname(sys.executable)
        assert env["PATH"].split(":")[0] == python_dir
        assert env["HOME"].startswith(str(emulator.state_dir)) and env["HOME"].endswith("/home")
        assert env["TMPDIR"].startswith(str(emulator.state_dir)) and env["TMPDIR"].endswith("/tmp")
        status, out = ssh_run(
            transport, "python3 -c 'import ipykernel, sys; print(sys.executable)'"
        )
        assert status == 0
        assert os.path.dirname(out.strip()) == python_dir
        status, out = ssh_run(transport, 'test -d "$HOME" && test -w "$TMPDIR" && echo ok')
        assert out.strip() == "ok"
    finally:
        transport.close()


def test_only_the_requested_key_is_authorised(api: Api, tmp_path: Path) -> None:
    inst = api.running()
    stranger = tmp_path / "stranger"
    write_private_key(new_private_key(), stranger)
    with pytest.raises(paramiko.AuthenticationException):
        ssh_connect(inst, stranger)


def test_delete_kills_detached_processes_and_sshd(
    api: Api, emulator: Emulator, client_key: tuple[Path, str]
) -> None:
    inst = api.running()
    transport, _ = ssh_connect(inst, client_key[0])
    try:
        _, daemon = ssh_run(transport, "python3 -", stdin=DAEMON)
        _, nohup = ssh_run(
            transport, "nohup setsid sleep 1001 >/dev/null 2>&1 </dev/null & echo $!"
        )
    finally:
        transport.close()
    pids = [int(daemon), int(nohup)]
    for pid in pids:  # nohup and setsid exec sleep in place, perhaps after we read $!
        cmdline = Path(f"/proc/{pid}/cmdline")
        until(lambda c=cmdline: c.read_bytes().startswith(b"sleep\0"), f"{pid} to be sleep", 10)
    # A process that is no descendant of the instance at all, found only by its environment.
    outsider = subprocess.Popen(
        ["sleep", "1002"], env={"FLEXAI_INSTANCE_ID": inst["id"], "PATH": os.defpath}
    )
    try:
        instance_pids = set(emulator.processes())
        assert {*pids, outsider.pid} <= instance_pids
        assert len(instance_pids) >= 5, "init and sshd are listed too"
        deleted = api.delete(inst["id"])
        assert deleted.status_code == 200
        assert deleted.json()["state"] == "deleted"
        assert outsider.wait(10) == -signal.SIGTERM
    finally:
        if outsider.poll() is None:
            outsider.kill()
            outsider.wait()
    for pid in instance_pids:
        assert not pid_alive(pid), f"pid {pid} outlived its instance"
    assert emulator.processes() == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", inst["ssh"]["port"]), timeout=5).close()


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return int(stat[stat.rfind(b")") + 2 :].split()[1])


def test_the_instance_init_adopts_detached_processes(
    api: Api, emulator: Emulator, client_key: tuple[Path, str]
) -> None:
    """The init becomes the subreaper after it has started sshd, still in time for any
    process started through it: a daemon's parent is the init, not the machine's PID 1."""
    inst = api.running()
    transport, _ = ssh_connect(inst, client_key[0])
    try:
        _, daemon = ssh_run(transport, "python3 -", stdin=DAEMON)
    finally:
        transport.close()
    (directory,) = emulator.state_dir.glob(f"{inst['id']}-*")
    init = _ppid(int((directory / "sshd.pid").read_text()))
    assert init != 1
    assert _ppid(int(daemon)) == init
    assert api.delete(inst["id"]).status_code == 200
    assert not pid_alive(int(daemon))


def test_deleted_instance_is_answered_but_not_listed(api: Api, emulator: Emulator) -> None:
    inst = api.running()
    directories = glob.glob(str(emulator.state_dir / f"{inst['id']}-*"))
    assert len(directories) == 1
    assert sorted(os.listdir(directories[0])) == [
        "authorized_keys",
        "home",
        "ssh_host_ed25519_key",
        "ssh_host_ed25519_key.pub",
        "sshd.log",
        "sshd.pid",
        "sshd_config",
        "tmp",
    ]
    assert os.stat(Path(directories[0]) / "ssh_host_ed25519_key").st_mode & 0o777 == 0o600
    assert Path(directories[0], "authorized_keys").read_text() == api.public_key + "\n"
    first = api.delete(inst["id"])
    assert first.json()["state"] == "deleted"
    assert not os.path.exists(directories[0])
    again = api.delete(inst["id"])
    assert again.status_code == 200
    assert again.json()["state"] == "deleted"
    assert api.instance(inst["id"])["state"] == "deleted"
    assert api.instance(inst["id"])["ssh"] is None
    assert inst["id"] not in [i["id"] for i in api.get("/v1/instances").json()["instances"]]


def test_stop_releases_processes_and_capacity(api: Api, emulator: Emulator) -> None:
    before = api.available("L40S")
    inst = api.running(gpu_type="L40S", gpu_count=2)
    assert api.available("L40S") == before - 2
    assert emulator.processes()
    stopped = api.post(f"/v1/instances/{inst['id']}/stop")
    assert stopped.status_code == 200
    assert stopped.json()["state"] == "stopped"
    assert stopped.json()["ssh"] is None
    assert emulator.processes() == []
    assert inst["id"] not in emulator.live_instances()
    assert api.available("L40S") == before
    assert inst["id"] in [i["id"] for i in api.get("/v1/instances").json()["instances"]]
    assert api.post(f"/v1/instances/{inst['id']}/stop").json()["state"] == "stopped"


def test_ttl_expiry_deletes_the_instance(api: Api, emulator: Emulator) -> None:
    inst = api.running(ttl_seconds=1)
    assert inst["expires_at"] is not None
    api.wait_state(inst["id"], "deleted", timeout=5)
    assert emulator.processes() == []


def test_heartbeat_pushes_expiry_back(api: Api) -> None:
    inst = api.running(ttl_seconds=1)
    start = time.monotonic()
    while time.monotonic() - start < 2.5:
        beat = api.post(f"/v1/instances/{inst['id']}/heartbeat")
        assert beat.status_code == 200
        assert beat.json()["state"] == "running"
        time.sleep(0.2)
    assert beat.json()["expires_at"] > inst["expires_at"]
    api.wait_state(inst["id"], "deleted", timeout=5)


def test_heartbeat_without_ttl_keeps_no_expiry(api: Api) -> None:
    inst = api.provision().json()
    beat = api.post(f"/v1/instances/{inst['id']}/heartbeat").json()
    assert beat["ttl_seconds"] is None and beat["expires_at"] is None


def test_patch_replaces_the_lease_and_heartbeats_renew_the_new_one(api: Api) -> None:
    inst = api.running(ttl_seconds=3600)
    path = f"/v1/instances/{inst['id']}"
    short = api.request("PATCH", path, json={"ttl_seconds": 1})
    assert short.status_code == 200, short.text
    assert short.json()["ttl_seconds"] == 1 and short.json()["expires_at"] < inst["expires_at"]
    beat = api.post(path + "/heartbeat").json()
    assert beat["ttl_seconds"] == 1 and beat["expires_at"] < inst["expires_at"]
    never = api.request("PATCH", path, json={"ttl_seconds": None}).json()
    assert never["ttl_seconds"] is None and never["expires_at"] is None
    assert api.request("PATCH", path, json={"ttl_seconds": 1}).status_code == 200
    api.wait_state(inst["id"], "deleted", timeout=5)
    after = api.request("PATCH", path, json={"ttl_seconds": 600})
    assert after.status_code == 200 and after.json()["state"] == "deleted"
    assert after.json()["ttl_seconds"] == 1


@pytest.mark.parametrize(
    "body",
    [{}, {"ttl_seconds": 0}, {"ttl_seconds": "60"}, {"ttl_seconds": 60, "gpu_count": 2}, [60]],
    ids=["empty", "zero", "string", "other-field", "not-object"],
)
def test_patch_refuses_anything_but_a_valid_ttl(api: Api, body: Any) -> None:
    inst = api.provision(ttl_seconds=600).json()
    answer = api.request("PATCH", f"/v1/instances/{inst['id']}", json=body)
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "invalid_request"
    assert api.instance(inst["id"])["ttl_seconds"] == 600


# --- faults ---------------------------------------------------------------------------------


def test_faults_over_http(api: Api, emulator: Emulator) -> None:
    assert api.get("/_emulator/faults").json() == Faults().to_dict()
    changed = api.request("PUT", "/_emulator/faults", json={"latency": 0.01, "stuck": True})
    assert changed.status_code == 200
    assert changed.json()["latency"] == 0.01 and changed.json()["stuck"] is True
    assert emulator.faults.stuck is True
    for bad in [
        {"nope": 1},
        {"stuck": "yes"},
        {"error_rate": 2},
        {"capacity": {"Z1": 1}},
        {"fail_status": 200},
        {"latency": 0.5, "seed": "x"},
        [],
    ]:
        assert_error(api.request("PUT", "/_emulator/faults", json=bad), 400, "invalid_request")
    assert emulator.faults.latency == 0.01, "a rejected PUT changes nothing"
    emulator.reset_faults()
    assert emulator.faults == Faults()


def test_fault_latency(api: Api, emulator: Emulator) -> None:
    emulator.update_faults(latency=0.3)
    start = time.monotonic()
    assert api.get("/v1/gpu-types").status_code == 200
    assert time.monotonic() - start >= 0.3
    start = time.monotonic()
    assert api.get("/_emulator/faults").status_code == 200
    assert time.monotonic() - start < 0.3, "the /_emulator endpoints take no faults"


def test_fault_fail_next_is_deterministic_and_has_no_effect(api: Api, emulator: Emulator) -> None:
    emulator.update_faults(fail_next=2)
    run = uuid.uuid4().hex
    first = api.provision(labels={"run": run})
    assert_error(first, 503, "unavailable")
    assert first.headers["Retry-After"] == "0"
    assert api.get("/_emulator/faults").json()["fail_next"] == 1
    assert_error(api.get("/v1/instances"), 503, "unavailable")
    assert api.get("/v1/instances", params={"label": f"run={run}"}).json()["instances"] == []
    emulator.update_faults(fail_next=1, fail_status=500)
    assert_error(api.get("/v1/gpu-types"), 500, "internal")
    assert api.get("/v1/gpu-types").status_code == 200


def test_fault_fail_for_is_an_outage_that_ends_on_its_own(api: Api, emulator: Emulator) -> None:
    assert api.request("PUT", "/_emulator/faults", json={"fail_for": 1.0}).status_code == 200
    for _ in range(3):
        assert_error(api.get("/v1/gpu-types"), 503, "unavailable")
    until(lambda: api.get("/v1/gpu-types").status_code == 200, "the outage to end", 10)
    bad = api.request("PUT", "/_emulator/faults", json={"fail_for": -1})
    assert_error(bad, 400, "invalid_request")


def test_fault_error_rate(api: Api, emulator: Emulator) -> None:
    emulator.update_faults(error_rate=1.0)
    run = uuid.uuid4().hex
    assert_error(api.provision(labels={"run": run}), 500, "internal")
    emulator.update_faults(error_rate=0.0)
    assert api.get("/v1/instances", params={"label": f"run={run}"}).json()["instances"] == []


def test_fault_rate_limit(api: Api, emulator: Emulator) -> None:
    emulator.update_faults(rate_limit_rate=1.0)
    for _ in range(5):
        response = api.get("/v1/instances")
        assert_error(response, 429, "rate_limited")
        assert response.headers["Retry-After"] in ("0", "1")


def test_random_faults_are_reproducible_with_a_seed(api: Api, emulator: Emulator) -> None:
    def statuses() -> list[int]:
        api.request(
            "PUT", "/_emulator/faults", json={"seed": 42, "error_rate": 0.3, "rate_limit_rate": 0.3}
        )
        return [api.get("/v1/gpu-types").status_code for _ in range(30)]

    first = statuses()
    assert set(first) == {200, 429, 500}
    assert statuses() == first


def test_fault_provision_delay(api: Api, emulator: Emulator) -> None:
    emulator.update_faults(provision_delay=0.5)
    start = time.monotonic()
    inst = api.provision().json()
    assert api.instance(inst["id"])["state"] in ("pending", "provisioning")
    api.wait_state(inst["id"], "running")
    assert time.monotonic() - start >= 0.5


def test_fault_stuck_never_runs_but_deletes(api: Api, emulator: Emulator) -> None:
    emulator.update_faults(stuck=True)
    inst = api.provision().json()
    api.wait_state(inst["id"], "provisioning")
    deadline = time.monotonic() + 0.5  # a healthy instance runs in well under this
    while time.monotonic() < deadline:
        assert api.instance(inst["id"])["state"] == "provisioning"
        time.sleep(0.05)
    assert inst["id"] in emulator.live_instances()
    assert api.delete(inst["id"]).json()["state"] == "deleted"


def test_fault_fail_provisioning(api: Api, emulator: Emulator) -> None:
    emulator.update_faults(fail_provisioning=True)
    before = api.available("L4")
    inst = api.provision().json()
    failed = api.wait_state(inst["id"], "failed")
    assert "fault" in failed["message"]
    assert failed["ssh"] is None
    assert api.available("L4") == before
    assert inst["id"] not in emulator.live_instances()


def test_fault_wrong_host_key(api: Api, emulator: Emulator, client_key: tuple[Path, str]) -> None:
    emulator.update_faults(wrong_host_key=True)
    inst = api.running()
    transport, presented = ssh_connect(inst, client_key[0])
    transport.close()
    assert presented != inst["ssh"]["host_key_fingerprint"]


def test_fault_wrong_authorized_key(
    api: Api, emulator: Emulator, client_key: tuple[Path, str]
) -> None:
    emulator.update_faults(wrong_authorized_key=True)
    inst = api.running()
    with pytest.raises(paramiko.AuthenticationException):
        ssh_connect(inst, client_key[0])


def test_fault_banner_hang(api: Api, emulator: Emulator) -> None:
    emulator.update_faults(banner_hang=True)
    inst = api.running()
    address = ("127.0.0.1", inst["ssh"]["port"])
    with socket.create_connection(address, timeout=0.3) as sock:
        with pytest.raises(socket.timeout):
            sock.recv(1)
        assert api.delete(inst["id"]).json()["state"] == "deleted"
        sock.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(1) == b"", "delete closes held connections"
    with pytest.raises(OSError):
        socket.create_connection(address, timeout=5).close()


def _timed_run(transport: paramiko.Transport, command: str, stdin: str = "") -> float:
    t0 = time.monotonic()
    status, _ = ssh_run(transport, command, stdin)
    assert status == 0
    return time.monotonic() - t0


def test_fault_link_latency_delays_every_exchange_and_follows_changes(
    api: Api, emulator: Emulator, client_key: tuple[Path, str]
) -> None:
    emulator.update_faults(link_latency_ms=150)
    inst = api.running()
    # Opening the channel and the exec request are two serial exchanges: at least two round
    # trips of 300 ms, however fast the machine (the relay holds each chunk its full delay).
    transport, presented = ssh_connect(inst, client_key[0])
    try:
        assert presented == inst["ssh"]["host_key_fingerprint"]
        assert _timed_run(transport, "true") >= 0.59
        emulator.update_faults(link_latency_ms=300)  # on the open connection, at once
        assert _timed_run(transport, "true") >= 1.19
        status, echoed = ssh_run(transport, "cat", stdin="x" * 300_000 + "end")
        assert (status, len(echoed), echoed[-3:]) == (0, 300_003, "end")
    finally:
        transport.close()
    assert api.delete(inst["id"]).json()["state"] == "deleted"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", inst["ssh"]["port"]), timeout=5).close()


def test_deleting_an_instance_drops_what_its_link_holds_at_once(
    api: Api, emulator: Emulator, client_key: tuple[Path, str]
) -> None:
    emulator.update_faults(link_latency_ms=4000)
    inst = api.running()
    with socket.create_connection(("127.0.0.1", inst["ssh"]["port"]), timeout=30) as sock:
        sock.sendall(b"SSH-2.0-test\r\n")  # in flight for 4 s when the delete comes
        t0 = time.monotonic()
        assert api.delete(inst["id"]).json()["state"] == "deleted"
        assert time.monotonic() - t0 < 3.0, "the delete waited for the link's delay"


def test_fault_link_bandwidth_paces_each_direction(
    api: Api, emulator: Emulator, client_key: tuple[Path, str]
) -> None:
    emulator.update_faults(link_bandwidth_mbps=8)  # one megabyte per second
    inst = api.running()
    transport, _ = ssh_connect(inst, client_key[0])
    try:
        assert _timed_run(transport, "head -c 1000000 /dev/zero") >= 0.9
        assert _timed_run(transport, "wc -c", stdin="y" * 1_000_000) >= 0.9
    finally:
        transport.close()


def test_link_faults_are_validated(emulator: Emulator) -> None:
    with pytest.raises(ValueError, match="link_latency_ms"):
        emulator.update_faults(link_latency_ms=-1)
    with pytest.raises(ValueError, match="link_bandwidth_mbps"):
        emulator.update_faults(link_bandwidth_mbps="fast")


def test_fault_capacity_rejects_unknown_types(emulator: Emulator) -> None:
    with pytest.raises(ValueError, match="Z1"):
        emulator.update_faults(capacity={"Z1": 1})
    assert emulator.faults.capacity == {}


# --- the Emulator object and its command -----------------------------------------------------


def test_custom_catalog_and_context_manager(tmp_path: Path, client_key: tuple[Path, str]) -> None:
    catalog = [GPUCatalogEntry("T4", memory_gb=16, price_per_hour=0.35, capacity=1)]
    with Emulator(api_keys=["k"], gpu_types=catalog, state_dir=tmp_path) as emu:
        api = Api(emu.url, "k", client_key[1])
        assert api.get("/v1/gpu-types").json()["gpu_types"] == [
            {"name": "T4", "memory_gb": 16, "price_per_hour": 0.35, "available": 1}
        ]
        inst = api.running(gpu_type="T4")
        transport, _ = ssh_connect(inst, client_key[0])
        _, daemon = ssh_run(transport, "python3 -", stdin=DAEMON)
        transport.close()
        assert pid_alive(int(daemon))
        pids = emu.processes()
    assert emu.live_instances() == []
    assert emu.processes() == []
    assert not any(pid_alive(pid) for pid in pids)
    emu.stop()  # idempotent
    with pytest.raises(requests.ConnectionError):
        requests.get(emu.url + "/v1/gpu-types", timeout=5)


def test_missing_sshd_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EmulatorError, match="apt-get install openssh-server"):
        Emulator(sshd_path=str(tmp_path / "no-sshd"))


def test_sshd_vanishing_later_fails_the_instance(
    tmp_path: Path, client_key: tuple[Path, str]
) -> None:
    sshd = tmp_path / "sshd"
    sshd.symlink_to("/usr/sbin/sshd")
    with Emulator(api_keys=["k"], state_dir=tmp_path / "state", sshd_path=str(sshd)) as emu:
        sshd.unlink()
        api = Api(emu.url, "k", client_key[1])
        inst = api.provision().json()
        failed = api.wait_state(inst["id"], "failed")
        assert "sshd not found" in failed["message"]
        assert "apt-get install openssh-server" in failed["message"]


@contextlib.contextmanager
def emulator_command(
    state_dir: Path, public_key: str, *args: str
) -> Iterator[tuple[subprocess.Popen[str], Api]]:
    """``python -m flexai_provisioner.emulator`` running, and an Api on its announced URL."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flexai_provisioner.emulator",
            "--port",
            "0",
            "--api-key",
            "cli-key",
            "--state-dir",
            str(state_dir),
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "the emulator printed nothing"
        line = proc.stdout.readline()
        match = re.fullmatch(r"FlexAI emulator listening on (http://127\.0\.0\.1:\d+)\n", line)
        assert match, line
        yield proc, Api(match.group(1), "cli-key", public_key)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


def test_command_runs_until_sigterm_and_cleans_up(
    tmp_path: Path, client_key: tuple[Path, str]
) -> None:
    args = ("--capacity", "A100=1", "--seed", "1")
    with emulator_command(tmp_path, client_key[1], *args) as (proc, api):
        assert api.available("A100") == 1
        inst = api.running(gpu_type="A100")
        sshd_pid = int(next(tmp_path.glob(f"{inst['id']}-*/sshd.pid")).read_text())
        assert pid_alive(sshd_pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert not pid_alive(sshd_pid)
    assert list(tmp_path.glob("inst-*")) == []


def test_instances_die_with_a_killed_emulator(tmp_path: Path, client_key: tuple[Path, str]) -> None:
    with emulator_command(tmp_path, client_key[1]) as (proc, api):
        inst = api.running()
        transport, _ = ssh_connect(inst, client_key[0])
        _, daemon = ssh_run(transport, "python3 -", stdin=DAEMON)
        transport.close()
        pids = [int(daemon), int(next(tmp_path.glob(f"{inst['id']}-*/sshd.pid")).read_text())]
        assert all(pid_alive(pid) for pid in pids)
        proc.kill()  # no chance to clean up: the instances' inits must notice on their own
        proc.wait()
        until(lambda: not any(pid_alive(pid) for pid in pids), "the instance to die", 10)


def test_command_needs_an_api_key() -> None:
    env = {k: v for k, v in os.environ.items() if k != "FLEXAI_API_KEY"}
    result = subprocess.run(
        [sys.executable, "-m", "flexai_provisioner.emulator", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "FLEXAI_API_KEY" in result.stderr and "--api-key" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_link_counts_each_connections_serial_flights():
    """A request and its answer, twice, are four flights: what a protocol's round trips are."""
    from flexai_provisioner.emulator.link import DelayedLink

    server = socket.create_server(("127.0.0.1", 0))
    link = DelayedLink(server.getsockname()[1], lambda: (0.005, 0.0))
    try:
        with socket.create_connection(("127.0.0.1", link.port), timeout=10) as client:
            peer, _ = server.accept()
            with peer:
                peer.settimeout(10)
                for request in (b"one", b"two"):
                    client.sendall(request)
                    assert peer.recv(16) == request
                    peer.sendall(request.upper())
                    assert client.recv(16) == request.upper()
                (connection,) = link._connections
                assert connection.flights == 4
    finally:
        link.stop()
        server.close()
