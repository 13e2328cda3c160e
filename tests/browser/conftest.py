"""Browser tests of the dashboard: the real service (``greentrainer serve`` on its embedded default, with its
worker) in a subprocess, driven by Debian's Chromium through Playwright.

Nothing is installed here: ``make test`` installs Chromium (apt) and Playwright (the project's test extra).
Every test fails on a console error or an uncaught page error; a test that provokes an HTTP error on purpose
(a bad dataset, a refused rho) says so with ``console.expect_http_error``, and that error must then happen.
"""

from __future__ import annotations

import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser.pages import (
    CHROMIUM,
    CHROMIUM_ARGS,
    DEMO,
    JOBS,
    TINY_HP,
    Dashboard,
    Service,
    dashboard_page,
    method,
    upload_dataset,
    wait_job,
)
from tests.processes import clean_env, free_port, process, wait_healthy

START_TIMEOUT_S = 120


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """`greentrainer serve` (API + one worker) on a temporary GT_DATA_DIR; it creates the demo model."""
    data_dir = tmp_path_factory.mktemp("gt-browser")
    port = free_port()
    key = "gt-browser-" + secrets.token_urlsafe(24)
    env = clean_env(GT_DATA_DIR=str(data_dir / "data"), GT_PORT=str(port), GT_BOOTSTRAP_API_KEY=key)
    log = data_dir / "serve.log"
    url = f"http://127.0.0.1:{port}"
    with process([str(Path(sys.executable).parent / "greentrainer"), "serve"], env, log) as proc:
        wait_healthy(url, proc, log, START_TIMEOUT_S)
        yield Service(url, key, data_dir, log)


@pytest.fixture(scope="package")
def browser() -> Iterator[object]:
    """Headless Debian Chromium (Playwright cannot download a browser here; ``make test`` installs it). Closed
    with the browser tests: Playwright's sync API keeps an asyncio loop running on the main thread while it is
    open, and tests that run after these may start loops of their own."""
    if shutil.which(CHROMIUM) is None and not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} not found: `make test` installs it (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "playwright is not installed: `make test` installs the test extra (pip install -e '.[test]')"
        )
    with sync_playwright() as playwright:
        # Playwright gives each launch a fresh temporary --user-data-dir.
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def dashboard(browser, service: Service) -> Iterator[Dashboard]:
    with dashboard_page(browser, service, viewport={"width": 1280, "height": 900}) as d:
        yield d


@pytest.fixture(scope="session")
def trained_job(service: Service) -> dict:
    """A green job on the demo model, created through the API and finished."""
    file_id = upload_dataset(service)
    with service.client() as client:
        body = {
            "model": DEMO,
            "training_file": file_id,
            "method": method("green", **TINY_HP, rho=0.8),
        }
        response = client.post(JOBS, json=body)
        assert response.status_code == 200, response.text
    job = wait_job(service, response.json()["id"])
    assert job["status"] == "succeeded", (job, service.log.read_text()[-3000:])
    return job
