"""The Jupyter server extension over real HTTP: a ``jupyter server`` subprocess per test.

The extension is enabled by the config file the package installs (nothing in these tests
enables it), kernels run on the emulator, and the autouse ``no_leaks`` fixture checks that
every instance is gone after each test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests
from conftest import until
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from flexai_provisioner.progress import PHASES
from flexai_provisioner.serverext import SCHEMA_ID

START_PHASES = ["requesting", "connecting", "starting kernel", "ready"]


def ok(response: requests.Response, status: int = 200) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    return response.json()


def error(response: requests.Response, status: int) -> str:
    """The JSON error's message, after checking it is one (and not a trace)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["message"] and "Traceback" not in response.text
    return body["message"]


def kernel_ids(server) -> list[str]:
    return [k["id"] for k in ok(server.get("api/kernels"))]


def phase_names(model: dict) -> list[str]:
    return [p["phase"] for p in model["phases"]]


def assert_start_phases(names: list[str]) -> None:
    """The start's phases, in the documented order (queued/booting depend on timing)."""
    assert [n for n in names if n in START_PHASES] == START_PHASES
    assert names == sorted(names, key=PHASES.index)


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections (bound, never listening) while open."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture
def server(jupyter_server):
    return jupyter_server()


def test_health_and_available(server, emulator):
    health = ok(server.get("api/compute/health"))
    assert health["ok"] and health["extension"]["ok"]
    assert health["platform"] == {"ok": True, "api_url": emulator.url, "gpu_types": 4}

    types = {t["name"]: t for t in ok(server.get("api/compute/available"))["gpu_types"]}
    assert types["A100"] == {
        "name": "A100",
        "memory_gb": 80,
        "price_per_hour": 1.89,
        "available": 8,
        "kernel_name": "flexai-a100",
    }
    assert types["H100"]["kernel_name"] is None  # no kernelspec installed for it


def test_an_unreachable_platform_is_reported_not_raised(jupyter_server):
    with closed_port() as port:
        server = jupyter_server(env={"FLEXAI_API_URL": f"http://127.0.0.1:{port}"})
        started = time.monotonic()
        health = ok(server.get("api/compute/health"))
        assert time.monotonic() - started < 10
        assert not health["ok"] and health["extension"]["ok"]
        assert not health["platform"]["ok"]
        assert "Connection refused" in health["platform"]["message"]
        assert "cannot reach the FlexAI API" in error(server.get("api/compute/available"), 503)


def test_the_provisioners_config_names_the_platform_over_the_environment(jupyter_server, emulator):
    with closed_port() as port:
        server = jupyter_server(
            f"--FlexAIProvisioner.api_url={emulator.url}",
            env={"FLEXAI_API_URL": f"http://127.0.0.1:{port}"},
        )
        health = ok(server.get("api/compute/health"))
        assert health["platform"] == {"ok": True, "api_url": emulator.url, "gpu_types": 4}
        assert "A100" in [t["name"] for t in ok(server.get("api/compute/available"))["gpu_types"]]


def test_an_unconfigured_platform_is_reported(jupyter_server):
    server = jupyter_server(env={"FLEXAI_API_URL": ""})
    health = ok(server.get("api/compute/health"))
    assert not health["platform"]["ok"]
    assert "FLEXAI_API_URL" in health["platform"]["message"]
    assert "FLEXAI_API_URL" in error(server.get("api/compute/available"), 503)


ENDPOINTS = [
    ("GET", "api/compute/available"),
    ("POST", "api/compute/select"),
    ("GET", "api/compute/instances"),
    ("GET", "api/compute/instance/inst-0"),
    ("POST", "api/compute/instance/inst-0/stop"),
    ("GET", "api/compute/progress"),
    ("GET", "api/compute/progress/k-0"),
    ("GET", "api/compute/health"),
]


def test_every_endpoint_refuses_requests_without_a_valid_token(server, emulator):
    for method, path in ENDPOINTS:
        missing = server.request(method, path, token=False, json={"gpu_type": "A100"})
        assert missing.status_code == 403, (method, path, missing.text)
        wrong = server.request(
            method, path, token=False, headers={"Authorization": "token nope"}, json={}
        )
        assert wrong.status_code == 403, (method, path, wrong.text)
    assert emulator.live_instances() == []


def test_cookie_sessions_need_the_xsrf_token_to_post(server, emulator):
    browser = requests.Session()
    # A token-authenticated visit logs the browser in with a cookie, as JupyterLab's does.
    assert browser.get(server.base + f"lab?token={server.token}").status_code in (200, 404)
    assert browser.get(server.base + "api/compute/instances").status_code == 200
    refused = browser.post(server.base + "api/compute/select", json={"gpu_type": "A100"})
    assert refused.status_code == 403 and "xsrf" in refused.text.lower()
    refused = browser.post(server.base + "api/compute/instance/inst-0/stop")
    assert refused.status_code == 403
    assert emulator.live_instances() == []
    xsrf = browser.cookies["_xsrf"]
    answer = browser.post(
        server.base + "api/compute/instance/inst-0/stop", headers={"X-XSRFToken": xsrf}
    )
    assert answer.status_code == 404  # past the XSRF check, to the unknown id


def test_select_runs_a_kernel_and_stop_deletes_its_instance(server, emulator):
    selected = ok(server.post("api/compute/select", json={"gpu_type": "A100"}), 201)
    kernel_id, instance_id = selected["kernel_id"], selected["instance_id"]
    assert selected["kernel_name"] == "flexai-a100" and selected["session_id"] is None
    assert emulator.live_instances() == [instance_id]
    assert_start_phases(phase_names(selected))
    assert kernel_id in kernel_ids(server)

    (listed,) = ok(server.get("api/compute/instances"))["instances"]
    assert listed["kernel_id"] == kernel_id and listed["instance_id"] == instance_id
    assert listed["state"] == "running" and listed["connected"] is True
    assert listed["reconnects"] == 0
    assert (listed["gpu_type"], listed["gpu_count"], listed["price_per_hour"]) == ("A100", 1, 1.89)
    assert listed["uptime_seconds"] >= 0 and listed["cost_usd"] >= 0
    assert listed["limits"] == {"max_hours": None, "max_cost": None}
    assert_start_phases(phase_names(listed))

    one = ok(server.get(f"api/compute/instance/{instance_id}"))
    assert one["kernel_id"] == kernel_id and one["state"] == "running"
    assert one["uptime_seconds"] >= listed["uptime_seconds"]
    assert one["cost_usd"] == pytest.approx(1.89 * one["uptime_seconds"] / 3600, abs=1e-4)

    stopped = ok(server.post(f"api/compute/instance/{instance_id}/stop"))
    assert stopped["kernel_id"] == kernel_id and stopped["state"] == "deleted"
    assert stopped["cost_usd"] >= one["cost_usd"]
    assert emulator.live_instances() == []
    assert ok(server.get("api/compute/instances")) == {"instances": [], "parked": []}
    assert kernel_id not in kernel_ids(server)
    assert "no kernel of this server" in error(
        server.get(f"api/compute/instance/{instance_id}"), 404
    )
    error(server.post(f"api/compute/instance/{instance_id}/stop"), 404)

    progress = ok(server.get(f"api/compute/progress/{kernel_id}"))
    assert progress["phase"] == "shut down"
    assert progress["phases"][-1]["cost_usd"] == stopped["cost_usd"]
    log = server.log()
    assert f"FlexAI kernel {kernel_id}: shut down; instance {instance_id} ran" in log
    for phase in START_PHASES:  # once each: the server's log handler, no stderr duplicate
        assert log.count(f"FlexAI kernel {kernel_id}: {phase} (") == 1, phase


def test_select_for_a_notebook_creates_its_session(server, emulator):
    selected = ok(
        server.post("api/compute/select", json={"gpu_type": "a100", "path": "work/train.ipynb"}),
        201,
    )
    sessions = ok(server.get("api/sessions"))
    assert [(s["id"], s["path"], s["kernel"]["id"]) for s in sessions] == [
        (selected["session_id"], "work/train.ipynb", selected["kernel_id"])
    ]
    again = server.post("api/compute/select", json={"gpu_type": "A100", "path": "work/train.ipynb"})
    assert selected["session_id"] in error(again, 409)
    assert emulator.live_instances() == [selected["instance_id"]]
    assert server.delete(f"api/sessions/{selected['session_id']}").status_code == 204
    assert emulator.live_instances() == []


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b"", "JSON object"),
        (b"{}", "gpu_type"),
        (b'{"gpu_type": 100}', "gpu_type"),
        (b'{"gpu_type": " "}', "gpu_type"),
        (b'{"gpu_type": "A100", "path": 3}', "path"),
        (b'{"gpu_type": "A100", "path": "/"}', "path"),
        (b'{"gpu_type": "A100", "gpus": 2}', "unknown fields ['gpus']"),
    ],
)
def test_select_rejects_bad_bodies(server, emulator, body, expected):
    message = error(server.post("api/compute/select", data=body), 400)
    assert expected in message
    assert emulator.live_instances() == []


def test_select_errors_say_what_to_do(server, kernelspecs, emulator):
    no_spec = server.post("api/compute/select", json={"gpu_type": "H100"})
    assert "jupyter flexai install" in error(no_spec, 400)
    assert no_spec.json()["gpu_types"] == ["a100"]

    kernelspecs.add("flexai-z999", {}, gpu_type="Z999")
    unknown = server.post("api/compute/select", json={"gpu_type": "Z999"})
    assert "Z999" in error(unknown, 400)
    assert set(unknown.json()["gpu_types"]) == {"A100", "H100", "L40S", "L4"}

    emulator.update_faults(capacity={"A100": 0})
    full = server.post("api/compute/select", json={"gpu_type": "A100"})
    assert "A100" in error(full, 409)
    assert "A100" not in full.json()["available"]

    emulator.update_faults(capacity={}, fail_provisioning=True)
    assert "failed to start" in error(
        server.post("api/compute/select", json={"gpu_type": "A100"}), 502
    )
    assert emulator.live_instances() == []
    assert ok(server.get("api/compute/instances")) == {"instances": [], "parked": []}


def test_an_instance_whose_ssh_hangs_is_a_gateway_timeout(server, kernelspecs, emulator):
    """An SSH handshake that times out is a 504 like a provisioning timeout, not a 502."""
    kernelspecs.add("flexai-l4", {"ssh_connect_timeout": 1.0}, gpu_type="L4")
    emulator.update_faults(banner_hang=True)
    message = error(server.post("api/compute/select", json={"gpu_type": "L4"}), 504)
    assert "did not complete the handshake within 1 s" in message
    assert emulator.live_instances() == []


def test_unknown_ids_are_404(server):
    assert "inst-nope" in error(server.get("api/compute/instance/inst-nope"), 404)
    assert "inst-nope" in error(server.post("api/compute/instance/inst-nope/stop"), 404)
    assert "k-nope" in error(server.get("api/compute/progress/k-nope"), 404)


def test_jupyter_sessions_api_runs_flexai_kernels(server, emulator):
    model = {"path": "gpu.ipynb", "type": "notebook", "kernel": {"name": "flexai-a100"}}
    session = ok(server.post("api/sessions", json=model), 201)
    assert session["kernel"]["name"] == "flexai-a100"
    fetched = ok(server.get(f"api/sessions/{session['id']}"))
    assert fetched["kernel"]["id"] == session["kernel"]["id"]
    (listed,) = ok(server.get("api/compute/instances"))["instances"]
    assert listed["kernel_id"] == session["kernel"]["id"]
    assert emulator.live_instances() == [listed["instance_id"]]
    # Each phase names the notebook, which a frontend knows before the kernel id.
    assert {p.get("path") for p in listed["phases"]} == {"gpu.ipynb"}
    assert server.delete(f"api/sessions/{session['id']}").status_code == 204
    assert emulator.live_instances() == []
    assert ok(server.get("api/sessions")) == []


def test_a_failed_start_says_why_to_the_notebook_it_was_for(server, emulator):
    emulator.update_faults(capacity={"A100": 0})
    model = {"path": "work/gpu.ipynb", "type": "notebook", "kernel": {"name": "flexai-a100"}}
    refused = server.post("api/sessions", json=model)
    assert refused.status_code >= 500
    (kernel,) = ok(server.get("api/compute/progress"))["kernels"]
    assert phase_names(kernel) == ["requesting", "failed", "shut down"]
    failed = kernel["phases"][1]
    assert "A100" in failed["message"] and "GPU types free right now" in failed["message"]
    assert {p.get("path") for p in kernel["phases"][:2]} == {"work/gpu.ipynb"}
    assert emulator.live_instances() == []


@contextlib.contextmanager
def selecting(server, timeout: float = 60) -> Iterator[dict[str, requests.Response]]:
    """POST api/compute/select in a thread (it answers once the kernel is ready); the dict
    holds the response after the block."""
    result: dict[str, requests.Response] = {}
    select = threading.Thread(
        target=lambda: result.update(
            response=server.post("api/compute/select", json={"gpu_type": "A100"})
        ),
        daemon=True,
    )
    select.start()
    try:
        yield result
    finally:
        select.join(timeout)
    assert not select.is_alive(), f"select did not answer within {timeout:g} s"


def booting_kernel(server) -> dict:
    """The progress model of the first kernel seen in its booting phase."""

    def booting() -> dict | None:
        kernels = ok(server.get("api/compute/progress"))["kernels"]
        return next((k for k in kernels if k["phase"] == "booting"), None)

    return until(booting, "a kernel in its booting phase")


def test_progress_is_visible_while_the_instance_boots(server, emulator):
    emulator.update_faults(provision_delay=2.0)
    with selecting(server) as result:
        during = booting_kernel(server)
        assert phase_names(during)[0] == "requesting"
        assert during["phases"][-1]["instance_id"] in emulator.live_instances()
    selected = ok(result["response"], 201)
    assert selected["kernel_id"] == during["kernel_id"]
    assert phase_names(selected)[-1] == "ready"
    assert selected["phases"][-1]["elapsed_seconds"] >= 2.0
    ok(server.post(f"api/compute/instance/{selected['instance_id']}/stop"))


def test_stop_while_the_instance_boots_cancels_the_start(server, emulator):
    emulator.update_faults(provision_delay=60)
    # Far less than the boot: a start still waiting then would not have been cancelled.
    with selecting(server, timeout=30) as result:
        during = booting_kernel(server)
        instance_id = during["phases"][-1]["instance_id"]
        stopped = ok(server.post(f"api/compute/instance/{instance_id}/stop"))
        assert (stopped["kernel_id"], stopped["instance_id"], stopped["state"]) == (
            during["kernel_id"],
            instance_id,
            "deleted",
        )
        assert emulator.live_instances() == []
    message = error(result["response"], 409)
    assert "cancelled (stopped through the compute API)" in message
    final = ok(server.get(f"api/compute/progress/{during['kernel_id']}"))
    assert final["phase"] == "shut down"
    assert during["kernel_id"] not in kernel_ids(server)


async def test_phases_are_jupyter_events(server, emulator):
    request = HTTPRequest(
        server.base.replace("http", "ws", 1) + "api/events/subscribe",
        headers={"Authorization": f"token {server.token}"},
    )
    ws = await websocket_connect(request)
    events: list[dict] = []

    async def until_phase(phase: str) -> None:
        while not events or events[-1]["phase"] != phase:
            message = await asyncio.wait_for(ws.read_message(), 60)
            assert message is not None, "the event socket closed"
            event = json.loads(message)
            if event["schema_id"] == SCHEMA_ID:
                events.append(event)

    try:
        response = await asyncio.to_thread(
            server.post, "api/compute/select", json={"gpu_type": "A100"}
        )
        selected = ok(response, 201)
        await until_phase("ready")
        await asyncio.to_thread(server.post, f"api/compute/instance/{selected['instance_id']}/stop")
        await until_phase("shut down")
    finally:
        ws.close()
    assert {e["kernel_id"] for e in events} == {selected["kernel_id"]}
    assert_start_phases([e["phase"] for e in events[:-1]])
    assert events[0].get("instance_id") is None
    assert events[-2]["instance_id"] == selected["instance_id"]
    assert events[-1]["cost_usd"] >= 0 and events[-1]["elapsed_seconds"] >= 0


def test_idle_culling_deletes_the_instance(jupyter_server, emulator):
    server = jupyter_server(
        "--MappingKernelManager.cull_idle_timeout=2", "--MappingKernelManager.cull_interval=1"
    )
    kernel = ok(server.post("api/kernels", json={"name": "flexai-a100"}), 201)
    assert len(emulator.live_instances()) == 1
    until(lambda: emulator.live_instances() == [], "the culled kernel's instance to be deleted")
    until(lambda: not kernel_ids(server), "the culled kernel to be gone")
    log = server.log()
    assert f"kernel 'flexai-a100' ({kernel['id']}) with 0 connections due to" in log
    assert f"FlexAI kernel {kernel['id']}: shut down; instance" in log


@pytest.mark.parametrize(
    ("limit", "words"),
    [({"max_cost": 0.002}, "max_cost of $0.002"), ({"max_hours": 0.001}, "max_hours of 0.001 h")],
    ids=["max_cost", "max_hours"],
)
def test_limits_shut_the_kernel_down(jupyter_server, kernelspecs, emulator, limit, words):
    kernelspecs.add("flexai-limited", limit)
    server = jupyter_server("--FlexAIExtension.limit_check_interval=0.1")
    kernel = ok(server.post("api/kernels", json={"name": "flexai-limited"}), 201)
    (listed,) = ok(server.get("api/compute/instances"))["instances"]
    assert listed["limits"] == {"max_hours": None, "max_cost": None, **limit}
    # The kernel is gone once its shutdown, instance deletion included, has finished (the
    # emulator alone shows the deletion up to a poll earlier than the provisioner reports it).
    until(lambda: not kernel_ids(server), "the limit to shut the kernel down", 60)
    assert emulator.live_instances() == []
    progress = ok(server.get(f"api/compute/progress/{kernel['id']}"))
    assert phase_names(progress)[-2:] == ["limit reached", "shut down"]
    assert words in progress["phases"][-2]["message"]
    assert f"FlexAI kernel {kernel['id']}: instance {listed['instance_id']}" in server.log()
