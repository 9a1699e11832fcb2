"""The dashboard in a real headless Chromium, in front of the real local cluster.

It loads ``/dashboard/``, waits for the demo function, sends one chat completion through the
gateway and waits for the page to show the instance RUNNING or IDLE; then it stops the scheduler
process (the error banner appears) and starts it again (the banner goes). The screenshot it
takes becomes ``docs/dashboard.png`` when SNAPWAKE_REFRESH_SCREENSHOT=1.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from dashboard_driver import badges, chromium, script_errors, wait

from snapwake.devcluster import ROOT, Cluster, ClusterConfig, deploy_demo

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DEMO = "default/default/demo"
# The README's screenshot is refreshed only on request, so a test run leaves the tree clean.
SCREENSHOT = ROOT / "docs" / "dashboard.png"
REFRESH = os.environ.get("SNAPWAKE_REFRESH_SCREENSHOT") == "1"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Iterator[Cluster]:
    config = ClusterConfig(var_dir=tmp_path_factory.mktemp("cluster"), gateway_port=0, scheduler_port=0,
                           nodeagent_port=0, blobstore_port=0, etcd_port=0)
    with Cluster(config) as c:
        asyncio.run(deploy_demo(c.scheduler_address, demo_model_dir, timeout=240, tls=c.client_tls()))
        yield c


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    with chromium(tmp_path / "chromium", required=True) as driver:
        yield driver


def _badges(driver: Any) -> list[str]:
    return badges(driver, DEMO)


def _serving(badges: list[str]) -> list[str]:
    return [b for b in badges[1:] if b.split()[0] in ("RUNNING", "IDLE")]


def test_dashboard_follows_a_request_and_a_scheduler_outage(cluster: Cluster, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.get(cluster.gateway_url + "/dashboard/")
    before = wait(browser, lambda d: _badges(d) or False, 20, "the demo function")
    assert before[0] == "READY"
    client = openai.OpenAI(base_url=cluster.gateway_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    reply = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4, temperature=0)
    assert reply.choices[0].message.content
    after = wait(browser, lambda d: _serving(_badges(d)) and _badges(d), 20, "a RUNNING or IDLE demo instance")
    assert after != before, "the page did not change after the request"
    assert "node-0" in browser.find_element(By.ID, "nodes").text

    banner = browser.find_element(By.ID, "banner")
    assert not banner.is_displayed()
    shot = SCREENSHOT if REFRESH else tmp_path / "dashboard.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000, "the screenshot is empty"
    cluster.stop_service("scheduler")
    wait(browser, lambda d: banner.is_displayed() and "scheduler unreachable" in banner.text, 15,
          "the scheduler-unreachable banner")
    cluster.start_service("scheduler")
    wait(browser, lambda d: not banner.is_displayed(), 30, "the banner going away")
    assert _badges(browser)[0] == "READY"
    assert script_errors(browser) == []
    assert SCREENSHOT.stat().st_size < 300_000  # small enough to commit
