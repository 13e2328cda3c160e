"""Errors a user can cause, each mapped to one HTTP status here and nowhere else.

Every error answers in OpenAI's shape, ``{"error": {"message", "type", "param", "code", ...}}``: ``type`` is
OpenAI's class of error (``invalid_request_error``, ``authentication_error``, ...), ``code`` this service's
machine-readable reason; dataset errors add ``line`` and ``field``, budget errors ``rho_min`` (and the
smallest budget in the user's units), limit errors the limit. A body that does not validate is a 400, as
OpenAI answers it. An error that retrying cannot fix carries ``x-should-retry: false``, which OpenAI's
clients obey. Starlette's own errors (an unknown path, a method not allowed, a body that cannot be parsed)
answer in the same shape.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from api.states import InvalidTransition

NO_RETRY = {"x-should-retry": "false"}  # OpenAI's clients retry 409, 429 and 5xx unless told not to


class UserError(Exception):
    """A mistake in a request; ``code`` is machine-readable, the message says what and where."""

    code = "invalid_request"
    error_type = "invalid_request_error"  # OpenAI's class of error
    retry = True  # False: the same request can only fail again (x-should-retry: false)

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        return {
            "message": self.message,
            "type": self.error_type,
            "param": None,
            "code": self.code,
            **self.details,
        }

    def headers(self) -> dict[str, str] | None:
        """HTTP headers the answer carries."""
        return None if self.retry else dict(NO_RETRY)


class NotAuthenticated(UserError):
    code = "invalid_api_key"
    error_type = "authentication_error"

    def headers(self) -> dict[str, str] | None:
        return {"WWW-Authenticate": "Bearer"}


class NotFound(UserError):
    """A path names an object that does not exist or belongs to another tenant."""

    code = "not_found"


class InvalidRequest(UserError):
    """The body names something that does not exist, or values that do not fit together."""

    code = "invalid_request"


class DatasetInvalid(UserError):
    """A dataset line is wrong; ``line`` (1-based) and ``field`` say where."""

    code = "invalid_dataset"

    def __init__(self, message: str, line: int | None, field: str | None) -> None:
        where = f"line {line}" if line else "file"
        where += f", field '{field}'" if field else ""
        super().__init__(f"{where}: {message}", line=line, field=field)


class BudgetTooSmallError(UserError):
    """A budget (rho, max_flops or max_energy_kwh) below what training a single tensor costs."""

    code = "budget_too_small"


class InsufficientMemory(UserError):
    """The job's estimated peak memory exceeds the device's (GT_DEVICE_MEMORY_BYTES); ``peak_memory_bytes``
    and ``device_memory_bytes`` name both."""

    code = "insufficient_memory"
    retry = False


class PayloadTooLarge(UserError):
    code = "payload_too_large"
    retry = False


class Conflict(UserError):
    code = "conflict"
    retry = False


class TooManyJobs(UserError):
    """The tenant already has GT_MAX_ACTIVE_JOBS jobs validating, queued or running; ``retry_after_s`` is a
    hint."""

    code = "too_many_jobs"
    error_type = "rate_limit_error"
    retry = False  # not within a client's few quick retries: when the tenant's jobs end

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.details["retry_after_s"]), **NO_RETRY}


class RateLimited(UserError):
    """A rate limit (GT_RATE_LIMIT_*) is used up for this minute; ``retry_after_s`` (whole seconds, at least
    1) is when its window frees. Retrying is right, after that wait: OpenAI's clients retry a 429 and honour
    Retry-After, so no ``x-should-retry: false`` here."""

    code = "rate_limit_exceeded"
    error_type = "rate_limit_error"

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.details["retry_after_s"])}


class InsufficientStorage(UserError):
    """The service's storage has no space left for what the request would write; nothing was stored."""

    code = "insufficient_storage"
    error_type = "server_error"
    retry = False


STATUS: dict[type[Exception], int] = {
    NotAuthenticated: 401,
    NotFound: 404,
    InvalidRequest: 400,
    DatasetInvalid: 400,
    BudgetTooSmallError: 400,
    InsufficientMemory: 400,
    PayloadTooLarge: 413,
    TooManyJobs: 429,
    RateLimited: 429,
    Conflict: 409,
    InsufficientStorage: 507,
    InvalidTransition: 409,
}


# Codes of the errors Starlette raises itself.
HTTP_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def status_of(exc: Exception) -> int:
    """The HTTP status of a user error (its class or the nearest base class in STATUS)."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 400


WHERE = ("body", "query", "path", "header", "cookie")  # where FastAPI found the value: not a field's name


def _location(loc: tuple[Any, ...], body: Any) -> list[str]:
    """A validation error's place as the user wrote it: the field's path, without FastAPI's source (``body``,
    ``query``) and pydantic's union members (``constrained-int``, ``literal['auto']``); ``method.settings.x``
    is ``method.<type>.x``."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in WHERE:
        parts = parts[1:]
    parts = [p for p in parts if p.isidentifier() or p.isdigit()]
    if (
        parts[:2] == ["method", "settings"]
        and isinstance(body, dict)
        and isinstance(body.get("method"), dict)
    ):
        parts[1] = str(body["method"].get("type", "settings"))
    return parts


def _problems(exc: RequestValidationError) -> list[tuple[str, str]]:
    """(field path, message) of each problem, one per field: a value that fits no member of a union (a number
    or "auto") is one problem, the first member's."""
    found: dict[str, str] = {}
    for err in exc.errors():
        where = ".".join(_location(err.get("loc", ()), exc.body))
        found.setdefault(where, str(err.get("msg", "")).removeprefix("Value error, "))
    return list(found.items())


def install(app: FastAPI) -> None:
    """Register the handlers that turn user errors and request validation errors into JSON answers."""

    async def user_error(_request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, InvalidTransition):  # a job's state does not allow it: asking again cannot help
            body = {
                "message": str(exc),
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_state",
            }
            return JSONResponse({"error": {**body, "status": exc.status}}, status_code=409, headers=NO_RETRY)
        assert isinstance(exc, UserError)
        return JSONResponse({"error": exc.body()}, status_code=status_of(exc), headers=exc.headers())

    async def http_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        code = HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        body = {"message": str(exc.detail), "type": kind, "param": None, "code": code}
        return JSONResponse({"error": body}, status_code=exc.status_code, headers=exc.headers)

    async def validation_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = _problems(exc)
        body = {
            "message": "; ".join(f"{where}: {msg}" if where else msg for where, msg in problems),
            "type": "invalid_request_error",
            "param": (problems[0][0] or None) if problems else None,
            "code": "invalid_request",
        }
        return JSONResponse({"error": body}, status_code=400, headers=NO_RETRY)

    app.add_exception_handler(UserError, user_error)
    app.add_exception_handler(InvalidTransition, user_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
