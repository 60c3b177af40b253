"""Headless Debian Chromium driven by Selenium against a running ComfyUI frontend (no browser download:
the chromium and chromium-driver packages). Used by the chart test and tools/make_ui_workflows.py."""
from __future__ import annotations

import os
import shutil
import tempfile
import time

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")


def missing() -> str | None:
    """Why no browser test can run here, or None."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        return "Debian chromium + chromium-driver not installed (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium not installed (pip install selenium)"
    return None


class Browser:
    """One headless Chromium with a fresh profile; closed (and the profile removed) on exit."""

    def __init__(self, width: int = 1600, height: int = 1000):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = tempfile.mkdtemp(prefix="lora-resize-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", f"--window-size={width},{height}", f"--user-data-dir={self.profile}"):
            options.add_argument(flag)
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.driver.set_script_timeout(120)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.driver.quit()
        shutil.rmtree(self.profile, ignore_errors=True)

    def open_comfy(self, url: str, timeout: float = 90) -> None:
        """Load the frontend and wait until the app and this pack's nodes are registered."""
        self.driver.get(url)
        deadline = time.time() + timeout
        while time.time() < deadline:
            ready = self.driver.execute_script(
                "return !!(window.app && window.app.graph && window.LiteGraph && "
                "LiteGraph.registered_node_types['LoraResize_ResizeLoRA'])")
            if ready:
                return
            time.sleep(0.5)
        raise AssertionError("ComfyUI frontend did not load: " + self.driver.title)

    def run(self, script: str, *args):
        """An async script: ``done`` (the last argument) resolves it; errors come back as strings."""
        wrapped = ("const done = arguments[arguments.length - 1];"
                   "(async () => {" + script + "})().then(done, e => done({error: String(e && e.stack || e)}));")
        result = self.driver.execute_async_script(wrapped, *args)
        if isinstance(result, dict) and "error" in result and len(result) == 1:
            raise AssertionError(result["error"])
        return result
