"""A headless Debian ``chromium`` driven through ``chromedriver`` with selenium, for the feature-browser tests
and the screenshot script (``benchmarks/dashboard_screenshots.py``).

Install (Debian): ``apt-get install -y chromium chromium-driver`` (``.ci/run`` does it) and
``pip install selenium`` (in the ``dev`` extra). Selenium is pointed at ``/usr/bin/chromedriver`` and
``/usr/bin/chromium`` explicitly, so it never downloads a browser or a driver.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
    "--hide-scrollbars",
)


def _which(*names: str):
    for n in names:
        p = shutil.which(n) or (n if os.path.isabs(n) and os.path.exists(n) else None)
        if p:
            return p
    return None


def missing() -> str | None:
    """None when a headless browser can run here, else what to install."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install selenium (part of hf_sae's dev extra: pip install -e '.[dev]')"
    if _which("chromium", "/usr/bin/chromium") is None or _which("chromedriver", "/usr/bin/chromedriver") is None:
        return (
            "Debian's chromium and chromedriver are not installed: apt-get install -y chromium chromium-driver "
            "(.ci/run does this before make test)"
        )
    return None


@contextmanager
def chromium():
    """A selenium Chrome driver on the system chromium, headless, fresh profile, console logs captured."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = _which("chromium", "/usr/bin/chromium")
    profile = tempfile.mkdtemp(prefix="hf_sae_chromium_")
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={profile}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(
        service=Service(executable_path=_which("chromedriver", "/usr/bin/chromedriver")), options=opts
    )
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver, css: str, timeout: float = 30.0, min_count: int = 1):
    """The elements matching ``css`` once there are at least ``min_count`` (polls the DOM; raises on timeout)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(
        lambda d: (lambda els: els if len(els) >= min_count else False)(d.find_elements(By.CSS_SELECTOR, css))
    )


def console_errors(driver) -> list[str]:
    """Messages of level SEVERE in the page's console since the last call."""
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def screenshot(driver, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    return path
