"""Headless Chromium for the dashboard tests (Debian's chromium and chromedriver, no downloads).

Importable from every test folder: pytest puts ``tests/`` on sys.path for its conftest.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--window-size=1100,760")


@contextlib.contextmanager
def chromium(profile_dir: Path, required: bool) -> Iterator[Any]:
    """A Selenium driver; without Chromium a ``required`` test fails and any other skips."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        why = "Debian chromium and chromium-driver are missing: run make install (it installs them with apt)"
        pytest.fail(why) if required else pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*_FLAGS, f"--user-data-dir={profile_dir}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # to catch script errors
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def script_errors(driver: Any) -> list[str]:
    """Console errors other than the 503s the page is meant to answer with a banner."""
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and "status of 503" not in e["message"]]


def wait(driver: Any, check: Any, seconds: float, what: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.1).until(check, f"{what} not seen within {seconds}s")


def badges(driver: Any, function_id: str) -> list[str]:
    """The state badges of a function's row: its own state, then "STATE count" each.

    Read in one script, since the page re-renders its tables every second (stale elements)."""
    return list(driver.execute_script(
        "const row = [...document.querySelectorAll('#functions tr')].find("
        "  (r) => r.cells[0] && r.cells[0].textContent === arguments[0]);"
        "return row ? [...row.querySelectorAll('.state')].map((b) => b.textContent) : [];", function_id))
