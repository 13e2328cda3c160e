"""Browser tests of the dashboard: the real service (``greentrainer serve`` on its embedded default, with its
worker) in a subprocess, driven by Debian's Chromium through Playwright.

Nothing is installed here: ``make test`` installs Chromium (apt) and Playwright (the project's test extra).
Every test fails on a console error or an uncaught page error; a test that provokes an HTTP error on purpose
(a bad dataset, a refused rho) says so with ``console.expect_http_error``, and that error must then happen.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from tests.processes import clean_env, free_port, process, wait_healthy

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = os.environ.get("GT_TEST_CHROMIUM", "/usr/bin/chromium")
# Without the background-networking flags Chromium keeps calling out of this closed network.
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
DEMO = "demo-tiny"
START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 180
HTTP_ERROR = re.compile(r"^Failed to load resource: the server responded with a status of (\d{3})")


def dataset_lines(n: int) -> str:
    """``n`` prompt/completion lines the demo model's byte-level tokenizer encodes."""
    return "".join(
        json.dumps({"prompt": f"What is {i} plus {i}? ", "completion": f"It is {2 * i}."}) + "\n"
        for i in range(n)
    )


# 96 examples in batches of 8: 12 steps per epoch, so GreenTrainer's importance pass leaves room in the budget
# (rho_min about 0.57); 2 epochs of the demo model take a few seconds on a CPU.
EXAMPLES = 96
TINY_HP = {"n_epochs": 2, "batch_size": 8, "max_seq_len": 32, "learning_rate": 1e-3}


@dataclass
class Service:
    url: str
    key: str
    data_dir: Path
    log: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30)


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


@dataclass
class ConsoleWatch:
    """Console errors and page errors of a page. HTTP errors a test provokes on purpose are announced with
    ``expect_http_error`` and kept apart; anything else fails the test."""

    page: object
    errors: list[str] = field(default_factory=list)
    expected: list[str] = field(default_factory=list)
    _armed: list[tuple[int, str]] = field(default_factory=list)

    def on_console(self, message) -> None:  # playwright.sync_api.ConsoleMessage
        if message.type != "error":
            return
        text = f"{message.text} ({message.location.get('url', '')})"
        if self._is_armed(message):
            self.expected.append(text)
        else:
            self.errors.append(text)

    def on_page_error(self, error) -> None:  # playwright's Error
        self.errors.append(f"uncaught: {error}")

    def _is_armed(self, message) -> bool:
        match = HTTP_ERROR.match(message.text)
        if not match:
            return False
        path = urlparse(message.location.get("url", "")).path
        return (int(match.group(1)), path) in self._armed

    @contextmanager
    def expect_http_error(self, status: int, path: str) -> Iterator[None]:
        """The block makes the page receive ``status`` from ``path``; Chromium logs that as a console error.
        Waits for it, so that an error announced but never seen fails the test too."""
        self._armed.append((status, path))
        try:
            with self.page.expect_console_message(
                lambda m: m.type == "error" and self._is_armed(m), timeout=15_000
            ):
                yield
        finally:
            self._armed.remove((status, path))


@dataclass
class Dashboard:
    page: object
    console: ConsoleWatch
    service: Service

    def open(self, fragment: str = "") -> None:
        self.page.goto(f"{self.service.url}/{fragment}")

    def sign_in(self) -> None:
        """Enter the API key in the key form, as a user does once."""
        self.open()
        self.page.fill("#api-key", self.service.key)
        self.page.click("#key-form button[type=submit]")
        self.page.wait_for_selector("#nav:not([hidden])")

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@contextmanager
def dashboard_page(browser, service: Service, **context_options) -> Iterator[Dashboard]:
    """A page in a fresh browser context (empty localStorage); fails on unexpected console or page errors."""
    context = browser.new_context(accept_downloads=True, **context_options)
    context.set_default_timeout(20_000)
    page = context.new_page()
    console = ConsoleWatch(page)
    page.on("console", console.on_console)
    page.on("pageerror", console.on_page_error)
    try:
        yield Dashboard(page, console, service)
        page.wait_for_timeout(300)  # let late console messages arrive
        assert not console.errors, f"console errors: {console.errors}"
    finally:
        context.close()


@pytest.fixture
def dashboard(browser, service: Service) -> Iterator[Dashboard]:
    with dashboard_page(browser, service, viewport={"width": 1280, "height": 900}) as d:
        yield d


def upload_dataset(service: Service, n: int = EXAMPLES) -> str:
    with service.client() as client:
        response = client.post(
            "/v1/files",
            files={"file": ("api.jsonl", dataset_lines(n).encode())},
            data={"purpose": "fine-tune"},
        )
        assert response.status_code == 200, response.text
        return response.json()["id"]


def wait_job(service: Service, job_id: str, timeout_s: float = JOB_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout_s
    with service.client() as client:
        while True:
            job = client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            assert time.monotonic() < deadline, (
                f"job {job_id} still {job['status']}:\n{service.log.read_text()[-3000:]}"
            )
            time.sleep(0.5)


@pytest.fixture(scope="session")
def trained_job(service: Service) -> dict:
    """A green job on the demo model, created through the API and finished."""
    file_id = upload_dataset(service)
    with service.client() as client:
        body = {
            "model": DEMO,
            "training_file": file_id,
            "method": "green",
            "hyperparameters": {**TINY_HP, "rho": 0.8},
        }
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 200, response.text
    job = wait_job(service, response.json()["id"])
    assert job["status"] == "succeeded", (job, service.log.read_text()[-3000:])
    return job
