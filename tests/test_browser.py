"""JupyterLab in a real headless Chromium, against a real ``jupyter lab`` and the emulator.

A person's path: the launcher offers "FlexAI A100", a notebook on it runs ``print(1+1)``,
and shutting the kernel down from the Kernel menu deletes the instance. Chromium is
Debian's (``apt-get install chromium``), driven by Playwright with its executable path set;
without it the test is skipped, except in CI (``CI`` set), where it must run.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

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


def until(predicate: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.1)


def menu(page: Page, *path: str) -> None:
    """Click through the main menu bar, e.g. ``menu(page, "Kernel", "Shut Down Kernel")``."""
    page.locator("#jp-menu-panel .lm-MenuBar-itemLabel", has_text=path[0]).click()
    for label in path[1:]:
        page.locator(".lm-Menu-itemLabel", has_text=label).first.click()


def shoot(page: Page, name: str) -> None:
    path = ARTIFACTS / name
    page.screenshot(path=str(path))
    print(f"\nscreenshot: {path}")


def test_jupyterlab_runs_a_notebook_on_a_flexai_gpu(jupyter_server, emulator, tmp_path):
    server = jupyter_server(app="lab")
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
            page.goto(server.base + f"lab?token={server.token}")

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
        finally:
            browser.close()
