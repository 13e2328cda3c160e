"""A small HTTP client of the API (httpx), used by the ``greentrainer`` client commands, tests and
benchmarks."""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path
from typing import Any

import httpx

JOBS = "/v1/fine_tuning/jobs"  # OpenAI's path of the fine-tuning jobs


class ApiError(Exception):
    """An error answer: HTTP ``status`` and the body's ``code`` and ``message``."""

    def __init__(self, status: int, code: str, message: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.body = body or {}


class Client:
    """The v1 API at ``base_url`` with an API key."""

    def __init__(self, base_url: str, api_key: str | None, timeout_s: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            try:
                body = response.json()
                error = body.get("error") or {}
                code, message = error.get("code", "error"), error.get("message", response.text)
            except ValueError:
                body, code, message = {}, "error", response.text
            raise ApiError(response.status_code, code, message, body)
        return response

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """JSON of ``method path``; ApiError on a 4xx or 5xx."""
        return self._check(self.http.request(method, path, **kwargs)).json()

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/health")

    def upload_file(
        self, path: str | Path, purpose: str = "fine-tune", model: str | None = None
    ) -> dict[str, Any]:
        path = Path(path)
        data = {"purpose": purpose, **({"model": model} if model else {})}
        with path.open("rb") as handle:
            return self.request("POST", "/v1/files", files={"file": (path.name, handle)}, data=data)

    def list_files(self, limit: int = 20, after: str | None = None) -> dict[str, Any]:
        return self.request("GET", "/v1/files", params=_params(limit=limit, after=after))

    def list_models(self) -> dict[str, Any]:
        return self.request("GET", "/v1/models")

    def estimate(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/v1/estimates", json=body)

    def create_job(self, body: dict[str, Any]) -> dict[str, Any]:
        """``body``: OpenAI's creation body; ``method`` is ``{"type": T, T: {"hyperparameters": {...}}}``."""
        return self.request("POST", JOBS, json=body)

    def list_jobs(
        self, limit: int = 20, after: str | None = None, status: str | None = None
    ) -> dict[str, Any]:
        return self.request("GET", JOBS, params=_params(limit=limit, after=after, status=status))

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"{JOBS}/{job_id}")

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"{JOBS}/{job_id}/cancel")

    def epochs(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"{JOBS}/{job_id}/epochs")

    def events(self, job_id: str, after: str | None = None, limit: int | None = None) -> dict[str, Any]:
        """A page of the job's events, newest first; ``after`` an event id: the events before it."""
        return self.request("GET", f"{JOBS}/{job_id}/events", params=_params(after=after, limit=limit))

    def checkpoints(self, job_id: str, after: str | None = None, limit: int | None = None) -> dict[str, Any]:
        """A page of the job's checkpoints, newest first; ``after`` a checkpoint id: the ones before it."""
        return self.request("GET", f"{JOBS}/{job_id}/checkpoints", params=_params(after=after, limit=limit))

    def all_checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        """Every checkpoint of the job, newest first (every page)."""
        found: list[dict[str, Any]] = []
        after = None
        while True:
            page = self.checkpoints(job_id, after=after, limit=100)
            found += page["data"]
            if not page["has_more"] or not page["data"]:
                return found
            after = page["data"][-1]["id"]

    def download_checkpoint(self, job_id: str, checkpoint_id: str, dest: str | Path) -> Path:
        """Stream a checkpoint's tar and unpack it into ``dest``; returns the Hugging Face folder."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        url = f"{JOBS}/{job_id}/checkpoints/{checkpoint_id}/content"
        with tempfile.TemporaryFile() as tmp:
            with self.http.stream("GET", url) as response:
                if response.status_code >= 400:
                    response.read()
                    self._check(response)
                for chunk in response.iter_bytes(1 << 20):
                    tmp.write(chunk)
            tmp.seek(0)
            with tarfile.open(fileobj=tmp, mode="r:") as tar:
                roots = {Path(m.name).parts[0] for m in tar.getmembers()}
                tar.extractall(dest, filter="data")  # no absolute paths, no '..', no links out
        return dest / sorted(roots)[0] if len(roots) == 1 else dest


def _params(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}
