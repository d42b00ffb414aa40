"""JupyterLab in a real headless Chromium, against a real ``jupyter lab`` and the emulator.

A person's path: the launcher offers "FlexAI A100", a notebook on it runs ``print(1+1)``,
and shutting the kernel down from the Kernel menu deletes the instance. Then the extension's:
the GPU dialog with prices switching a notebook's kernel, the boot's phase, the running cost,
the instances dialog's Stop, Cancel during the boot, a start without capacity, an unreachable
platform, and Notebook 7. Screenshots go to ``test-artifacts/``. Chromium is
Debian's (``apt-get install chromium``), driven by Playwright with its executable path set;
without it the test is skipped, except in CI (``CI`` set), where it must run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from conftest import until

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
UI_TIMEOUT_MS = 60_000

if not os.path.exists(CHROMIUM) and not os.environ.get("CI"):
    pytest.skip(
        "Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True
    )

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402

expect.set_options(timeout=UI_TIMEOUT_MS)  # a loaded machine starts even a local kernel slowly


def menu(page: Page, *path: str) -> None:
    """Click through the main menu bar, e.g. ``menu(page, "Kernel", "Shut Down Kernel")``."""
    page.locator("#jp-menu-panel .lm-MenuBar-itemLabel", has_text=path[0]).click()
    for label in path[1:]:
        page.locator(".lm-Menu-itemLabel", has_text=label).first.click()


def shoot(page: Page, name: str) -> None:
    path = ARTIFACTS / name
    page.screenshot(path=str(path))
    print(f"\nscreenshot: {path}")


@contextlib.contextmanager
def lab_page(server, tmp_path: Path, path: str = "", app: str = "lab") -> Iterator[Page]:
    """Chromium on ``app`` (``lab``, or ``notebooks`` for Notebook 7) showing ``path``."""
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 800},
        )
        try:
            page = browser.pages[0] if browser.pages else browser.new_page()
            page.set_default_timeout(UI_TIMEOUT_MS)
            where = f"{app}/tree/{path}" if app == "lab" and path else f"{app}/{path}"
            page.goto(server.base + f"{where}?token={server.token}")
            yield page
        finally:
            browser.close()


def test_jupyterlab_runs_a_notebook_on_a_flexai_gpu(jupyter_server, emulator, tmp_path):
    server = jupyter_server(app="lab")
    with lab_page(server, tmp_path) as page:
        card = page.locator('.jp-LauncherCard[data-category="Notebook"][title="FlexAI A100"]')
        expect(card).to_be_visible()
        shoot(page, "jupyterlab-launcher.png")
        card.click()

        # The kernel runs once the status bar says so; until then the instance provisions.
        status = page.locator(".jp-StatusBar-TextItem", has_text="FlexAI A100")
        expect(status).to_contain_text("Idle")
        assert len(emulator.live_instances()) == 1

        editor = page.locator(".jp-Notebook .jp-Cell .cm-content").first
        editor.click()
        page.keyboard.type("print(1+1)")
        page.keyboard.press("Shift+Enter")
        output = page.locator(".jp-Notebook .jp-OutputArea-output").first
        expect(output).to_have_text("2")
        shoot(page, "jupyterlab-notebook-on-flexai-a100.png")

        menu(page, "Kernel", "Shut Down Kernel")
        confirm = page.locator(".jp-Dialog .jp-mod-accept")
        if confirm.count():
            confirm.click()
        until(lambda: emulator.live_instances() == [], "the instance's deletion", 60)
        expect(page.locator(".jp-StatusBar-TextItem", has_text="No Kernel")).to_be_visible()


# -- the flexai-provisioner JupyterLab extension -------------------------------------------------


def lab_server(jupyter_server, tmp_path: Path, *args: str, app: str = "lab", **env: str):
    """``jupyter lab`` (or ``notebook``) with ``args``, and settings of its own: no news
    prompt."""
    settings = tmp_path / "lab-settings"
    plugin = settings / "@jupyterlab" / "apputils-extension"
    plugin.mkdir(parents=True, exist_ok=True)
    (plugin / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    return jupyter_server(*args, app=app, env={"JUPYTERLAB_SETTINGS_DIR": str(settings), **env})


def notebook(server, name: str, kernel: str) -> str:
    """Write an empty notebook ``name`` whose kernelspec is ``kernel``; its path."""
    spec = {"name": kernel, "display_name": kernel, "language": "python"}
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("")], metadata={"kernelspec": spec}
    )
    nbformat.write(nb, server.root / name)
    return name


def status_item(page: Page):
    return page.locator(".jp-StatusBar-Widget .jp-FlexAI-status")


def open_gpu_dialog(page: Page):
    page.locator(".jp-FlexAI-gpuButton button[title*='GPU']").first.click()
    dialog = page.locator(".jp-Dialog")
    expect(dialog.locator(".jp-Dialog-header")).to_contain_text("Choose a GPU")
    return dialog


def test_the_gpu_dialog_switches_the_kernel_and_shows_progress_and_cost(
    jupyter_server, emulator, tmp_path
):
    server = lab_server(jupyter_server, tmp_path)
    path = notebook(server, "gpu.ipynb", "python3")
    emulator.update_faults(provision_delay=8.0)
    with lab_page(server, tmp_path, path) as page:
        expect(page.locator(".jp-StatusBar-TextItem", has_text="Python 3")).to_contain_text("Idle")
        # The price shows before any click: from the cheapest type a kernel can start on here.
        expect(page.locator(".jp-FlexAI-gpuButton")).to_have_text("GPU · from $1.89/h")
        dialog = open_gpu_dialog(page)
        a100 = dialog.locator(".jp-FlexAI-gpuRow[data-gpu='A100']")
        expect(a100).to_contain_text("80 GB")
        expect(a100).to_contain_text("$1.89/h")
        expect(a100).not_to_have_class(re.compile("jp-mod-disabled"))
        # Only A100 has a kernelspec here: the other types are greyed, saying why.
        h100 = dialog.locator(".jp-FlexAI-gpuRow[data-gpu='H100']")
        expect(h100).to_have_class(re.compile("jp-mod-disabled"))
        expect(h100).to_contain_text("not installed")
        expect(dialog.locator(".jp-FlexAI-total")).to_have_text("Total $1.89/h")
        shoot(page, "gpu-dialog.png")
        dialog.locator(".jp-mod-accept").click()

        status = status_item(page)
        expect(status).to_contain_text("Booting the instance", timeout=20_000)
        expect(status.locator(".jp-FlexAI-cancel")).to_be_visible()
        # The seconds count on while the phase stays (no event arrives during the boot).
        expect(status).to_contain_text(re.compile(r"Booting the instance… [1-9]\d* s"))
        shoot(page, "gpu-booting.png")
        expect(status).to_contain_text(re.compile(r"A100 · \d+:\d\d:\d\d · \$0\.\d+"))
        expect(page.locator(".jp-FlexAI-gpuButton")).to_contain_text("GPU: A100 · $1.89/h")
        shoot(page, "gpu-running-cost.png")
        (instance_id,) = emulator.live_instances()

        page.keyboard.press("Control+s")
        until(
            lambda: (
                json.loads((server.root / path).read_text())["metadata"]["kernelspec"]["name"]
                == "flexai-a100"
            ),
            "the notebook's saved kernelspec to be flexai-a100",
        )

        status.locator(".jp-FlexAI-status-label").click()
        listing = page.locator(".jp-Dialog .jp-FlexAI-instanceTable")
        row = listing.locator(f"tr[data-instance='{instance_id}']")
        expect(row).to_contain_text("gpu.ipynb")
        expect(row).to_contain_text("running")
        shoot(page, "gpu-instances.png")
        row.locator(".jp-FlexAI-stop").click()
        toast = page.locator(
            ".Toastify__toast", has_text=re.compile(f"^Instance {instance_id} deleted, ran")
        )
        expect(toast).to_contain_text(re.compile(r"ran \d+:\d\d:\d\d, \$0\.\d+"))
        expect(toast).to_be_in_viewport(ratio=1)  # slid in (it goes after 10 s)
        expect(page.locator(".jp-Dialog .jp-FlexAI-summary")).to_contain_text("No FlexAI instance")
        shoot(page, "gpu-deleted-notification.png")
        assert emulator.live_instances() == []


def test_cancel_deletes_the_booting_instance(jupyter_server, emulator, tmp_path):
    server = lab_server(jupyter_server, tmp_path)
    path = notebook(server, "cancel.ipynb", "python3")
    emulator.update_faults(provision_delay=120.0)
    with lab_page(server, tmp_path, path) as page:
        expect(page.locator(".jp-StatusBar-TextItem", has_text="Python 3")).to_contain_text("Idle")
        open_gpu_dialog(page).locator(".jp-mod-accept").click()
        status = status_item(page)
        expect(status).to_contain_text("Booting the instance", timeout=20_000)
        cancel = status.locator(".jp-FlexAI-cancel")
        expect(cancel).to_be_enabled()
        assert len(emulator.live_instances()) == 1
        cancel.click()
        until(lambda: emulator.live_instances() == [], "the cancelled instance's deletion", 30)
        toast = page.locator(".Toastify__toast", has_text="was cancelled: instance")
        expect(toast).to_contain_text(re.compile(r"deleted, ran \d+:\d\d:\d\d, \$0\.\d+"))
        expect(toast).to_be_in_viewport(ratio=1)
        expect(page.locator(".jp-Dialog")).to_have_count(0)
        shoot(page, "gpu-cancelled.png")


def test_shut_down_kernel_during_the_first_boot_deletes_the_instance(
    jupyter_server, emulator, tmp_path
):
    server = lab_server(jupyter_server, tmp_path)
    emulator.update_faults(provision_delay=120.0)
    path = notebook(server, "first.ipynb", "flexai-a100")
    with lab_page(server, tmp_path, path) as page:
        expect(status_item(page)).to_contain_text("Booting the instance", timeout=20_000)
        until(lambda: len(emulator.live_instances()) == 1, "the instance's request")
        # The notebook has no session yet: JupyterLab's own shutdown sends nothing.
        menu(page, "Kernel", "Shut Down Kernel")
        until(lambda: emulator.live_instances() == [], "the abandoned instance's deletion", 30)
        toast = page.locator(".Toastify__toast", has_text="was cancelled: instance")
        expect(toast).to_contain_text(re.compile(r"deleted, ran \d+:\d\d:\d\d"))
        expect(toast).to_be_in_viewport(ratio=1)
        # Neither JupyterLab's "Error Starting Kernel" nor its kernel selector: asked for.
        expect(page.locator(".jp-Dialog")).to_have_count(0)
        shoot(page, "gpu-shut-down-during-boot.png")


def test_a_start_without_capacity_explains_itself(jupyter_server, emulator, tmp_path):
    server = lab_server(jupyter_server, tmp_path)
    emulator.update_faults(capacity={"A100": 0})
    path = notebook(server, "full.ipynb", "flexai-a100")
    with lab_page(server, tmp_path, path) as page:
        toast = page.locator(".Toastify__toast", has_text="did not start")
        # Only A100 has a kernelspec here: the free types are named with how to add one.
        expect(toast).to_contain_text("Install a free GPU type: jupyter flexai install --gpu H100")
        expect(toast).to_be_in_viewport(ratio=1)
        # Instead of JupyterLab's one-line error and its kernel selector with the type that
        # failed preselected, the GPU dialog opens, A100 greyed as none is free.
        dialog = page.locator(".jp-Dialog")
        expect(dialog).to_have_count(1)
        expect(dialog.locator(".jp-Dialog-header")).to_contain_text("Choose a GPU")
        a100 = dialog.locator(".jp-FlexAI-gpuRow[data-gpu='A100']")
        expect(a100).to_have_class(re.compile("jp-mod-disabled"))
        expect(a100).to_contain_text("none")
        expect(dialog.locator(".jp-mod-accept")).to_be_disabled()
        shoot(page, "gpu-no-capacity.png")
        dialog.locator(".jp-mod-reject").click()
        toast.get_by_role("button", name="Show error").click()
        dialog = page.locator(".jp-Dialog", has_text="did not start")
        expect(dialog.locator(".jp-FlexAI-fix")).to_contain_text("Install a free GPU type")
        expect(dialog.locator(".jp-FlexAI-message")).to_contain_text("GPU types free right now")
        shoot(page, "gpu-no-capacity-details.png")
    assert emulator.live_instances() == []


def test_the_gpu_dialog_says_what_is_wrong_when_flexai_is_unreachable(
    jupyter_server, emulator, tmp_path
):
    server = lab_server(jupyter_server, tmp_path, FLEXAI_API_KEY="wrong-key")
    path = notebook(server, "health.ipynb", "python3")
    with lab_page(server, tmp_path, path) as page:
        expect(page.locator(".jp-StatusBar-TextItem", has_text="Python 3")).to_contain_text("Idle")
        dialog = open_gpu_dialog(page)
        expect(dialog.locator(".jp-FlexAI-problem-title")).to_contain_text("cannot reach FlexAI")
        expect(dialog.locator(".jp-FlexAI-fix")).to_contain_text("FLEXAI_API_KEY")
        expect(dialog.locator(".jp-FlexAI-message")).to_contain_text("rejected the API key")
        shoot(page, "gpu-dialog-unhealthy.png")


def test_notebook_7_shows_the_gpu_button_and_the_cost_in_its_toolbar(
    jupyter_server, emulator, tmp_path
):
    server = lab_server(jupyter_server, tmp_path, app="notebook")
    path = notebook(server, "nb7.ipynb", "python3")
    emulator.update_faults(provision_delay=4.0)
    with lab_page(server, tmp_path, path, app="notebooks") as page:
        dialog = open_gpu_dialog(page)
        expect(dialog.locator(".jp-FlexAI-gpuRow[data-gpu='A100']")).to_contain_text("$1.89/h")
        dialog.locator(".jp-mod-accept").click()
        # Notebook 7 has no status bar: the item is in the notebook's toolbar.
        status = page.locator(".jp-Toolbar .jp-FlexAI-status")
        expect(status).to_contain_text("Booting the instance", timeout=20_000)
        expect(status).to_have_text(re.compile(r"^\d+:\d\d:\d\d · \$0\.\d+"))
        expect(page.locator(".jp-FlexAI-gpuButton")).to_have_text("GPU: A100 · $1.89/h")
        shoot(page, "notebook7-running-cost.png")
        (instance_id,) = emulator.live_instances()
        status.locator(".jp-FlexAI-status-label").click()
        row = page.locator(f".jp-Dialog .jp-FlexAI-instanceTable tr[data-instance='{instance_id}']")
        row.locator(".jp-FlexAI-stop").click()
        until(lambda: emulator.live_instances() == [], "the stopped instance's deletion", 60)


def test_a_limit_is_warned_of_before_it_shuts_the_kernel_down(
    jupyter_server, kernelspecs, emulator, tmp_path
):
    # 76 s at $1.89/h: on a loaded machine the start alone can take half a minute of that.
    kernelspecs.add("flexai-limited", {"max_cost": 0.04})
    server = lab_server(jupyter_server, tmp_path, "--FlexAIExtension.limit_check_interval=0.5")
    path = notebook(server, "limited.ipynb", "flexai-limited")
    with lab_page(server, tmp_path, path) as page:
        status = status_item(page)
        expect(status).to_have_class(re.compile("jp-mod-warning"))
        warning = page.locator(".Toastify__toast", has_text="will be shut down")
        expect(warning).to_contain_text(
            re.compile(r"for limited.ipynb will .* deleted in 0:0\d:\d\d: .* max_cost of \$0\.04")
        )
        expect(warning).to_be_in_viewport(ratio=1)
        shoot(page, "gpu-limit-warning.png")
        until(lambda: emulator.live_instances() == [], "the limit's shutdown", 90)
        reached = page.locator(".Toastify__toast", has_text="is being shut down")
        expect(reached).to_contain_text("for limited.ipynb reached its max_cost of $0.04")


def test_the_instances_dialog_shows_a_parked_instance_and_stop_deletes_it(
    jupyter_server, emulator, kernelspecs, tmp_path
):
    from test_keep_alive import run

    kernelspecs.add("flexai-warm", {"keep_alive": 300})
    parked, _ = run(tmp_path / "pipeline", kernel="flexai-warm")  # a `jupyter execute` run
    instance_id = parked["instance"]
    server = lab_server(jupyter_server, tmp_path)
    with lab_page(server, tmp_path) as page:
        expect(page.locator(".jp-LauncherCard").first).to_be_visible()
        page.keyboard.press("Control+Shift+C")
        page.locator(".lm-CommandPalette-input").fill("Show FlexAI GPU instances")
        page.keyboard.press("Enter")
        row = page.locator(f".jp-Dialog tr[data-instance='{instance_id}']")
        expect(row).to_contain_text("parked for the next kernel")
        expect(row).to_contain_text(re.compile(r"parked, 0:0\d:\d\d left\s*\d+:\d\d:\d\d"))
        expect(row).to_contain_text(re.compile(r"\$0\.\d+ at \$1\.89/h"))
        summary = page.locator(".jp-Dialog .jp-FlexAI-summary")
        expect(summary).to_contain_text("0 running, 1 parked, $1.89/h in all")
        shoot(page, "gpu-instances-parked.png")
        row.locator(".jp-FlexAI-stop").click()
        expect(summary).to_contain_text("No FlexAI instance")
        assert emulator.live_instances() == []
