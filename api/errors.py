"""Errors a user can cause, each mapped to one HTTP status here and nowhere else.

Every error answers ``{"error": {"code", "message", ...}}``; dataset errors add ``line`` and ``field``, budget
errors ``rho_min`` (and the smallest budget in the user's units), limit errors the limit. Starlette's own
errors (an unknown path, a method not allowed, a body that cannot be parsed) answer in the same shape.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from api.states import InvalidTransition


class UserError(Exception):
    """A mistake in a request; ``code`` is machine-readable, the message says what and where."""

    code = "invalid_request"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **self.details}

    def headers(self) -> dict[str, str] | None:
        """HTTP headers the answer carries."""
        return None


class NotAuthenticated(UserError):
    code = "invalid_api_key"

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


class PayloadTooLarge(UserError):
    code = "payload_too_large"


class Conflict(UserError):
    code = "conflict"


class TooManyJobs(UserError):
    """The tenant already has GT_MAX_ACTIVE_JOBS jobs validating, queued or running; ``retry_after_s`` is a
    hint."""

    code = "too_many_jobs"

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.details["retry_after_s"])}


class InsufficientStorage(UserError):
    """The service's storage has no space left for what the request would write; nothing was stored."""

    code = "insufficient_storage"


STATUS: dict[type[Exception], int] = {
    NotAuthenticated: 401,
    NotFound: 404,
    InvalidRequest: 400,
    DatasetInvalid: 400,
    BudgetTooSmallError: 400,
    PayloadTooLarge: 413,
    TooManyJobs: 429,
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


def install(app: FastAPI) -> None:
    """Register the handlers that turn user errors and request validation errors into JSON answers."""

    async def user_error(_request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, InvalidTransition):
            body = {"code": "invalid_state", "message": str(exc), "status": exc.status}
        else:
            assert isinstance(exc, UserError)
            body = exc.body()
        headers = exc.headers() if isinstance(exc, UserError) else None
        return JSONResponse({"error": body}, status_code=status_of(exc), headers=headers)

    async def http_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        code = HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        body = {"code": code, "message": str(exc.detail)}
        return JSONResponse({"error": body}, status_code=exc.status_code, headers=exc.headers)

    async def validation_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        body = {"code": "invalid_request", "message": "; ".join(problems), "param": param}
        return JSONResponse({"error": body}, status_code=422)

    app.add_exception_handler(UserError, user_error)
    app.add_exception_handler(InvalidTransition, user_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
