"""The dashboard's browser tests' pieces besides fixtures (bench/dashboard.py uses them too): Debian's
Chromium and its flags, the service under test and its API calls (a dataset, an upload, a finished job), and a
dashboard page that fails on unexpected console or page errors."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

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
JOB_TIMEOUT_S = 180
JOBS = "/v1/fine_tuning/jobs"  # OpenAI's path
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


def method(type_: str, **hyperparameters: object) -> dict:
    """OpenAI's method object: ``{"type": T, T: {"hyperparameters": {...}}}``."""
    return {"type": type_, type_: {"hyperparameters": hyperparameters}}


@dataclass
class Service:
    url: str
    key: str
    data_dir: Path
    log: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30)


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
            job = client.get(f"{JOBS}/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            assert time.monotonic() < deadline, (
                f"job {job_id} still {job['status']}:\n{service.log.read_text()[-3000:]}"
            )
            time.sleep(0.5)
