"""Shapes shared by every resource: pagination and errors."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field

from api.ids import ID_PATTERN

MAX_PAGE = 100  # the most objects one list answer holds
MAX_ROW_ID = 2**31 - 1  # the largest epoch number or event id: both are 32-bit integer columns on PostgreSQL

# Cursors of the lists: an object id, or (epochs, events) a number.
IdCursor = Annotated[
    str | None, Query(pattern=ID_PATTERN, max_length=40, description="the last id of the previous page")
]


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    message: str = Field(description="what was wrong and where")
    type: str = Field(description="OpenAI's class of error: invalid_request_error, authentication_error, ...")
    code: str = Field(description="machine-readable: not_found, invalid_dataset, budget_too_small, ...")
    line: int | None = Field(None, description="dataset errors: the 1-based line")
    field: str | None = Field(None, description="dataset errors: the field of that line")
    rho_min: float | None = Field(None, description="budget errors: the smallest rho that trains anything")
    min_max_flops: float | None = Field(
        None, description="budget errors: the smallest whole-run FLOPs budget"
    )
    min_max_energy_kwh: float | None = Field(None, description="budget errors: the same budget in kWh")
    advice: list[str] | None = Field(
        None,
        description="budget errors: changes that would make the job fit its budget, each with the rho_min it "
        "would have (green on a small dataset: reselect_every, importance_rows, batch_size, more examples)",
    )
    param: str | None = Field(None, description="request errors: the parameter at fault")
    max_upload_bytes: int | None = Field(None, description="413: the upload limit, bytes")
    max_active_jobs: int | None = Field(None, description="429: jobs a tenant may have active at once")
    retry_after_s: int | None = Field(None, description="429: seconds to wait before trying again (a hint)")


class ErrorPublic(BaseModel):
    error: ErrorBody


ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorPublic, "description": text}
    for status, text in (
        (
            400,
            "invalid request: a body or query that does not validate (OpenAI answers 400, not 422), unknown "
            "ids, a bad dataset (line and field), a budget below rho_min",
        ),
        (401, "missing or invalid API key"),
        (404, "not found (or another tenant's)"),
        (409, "the job's state does not allow it"),
        (413, "upload larger than GT_MAX_UPLOAD_BYTES"),
    )
}

TOO_MANY_JOBS: dict[str, object] = {
    "model": ErrorPublic,
    "description": "the tenant has GT_MAX_ACTIVE_JOBS jobs validating, queued or running",
}


class Page(BaseModel):
    object: Literal["list"] = "list"
    has_more: bool = Field(description="more objects follow; ask again with after=<last id>")


def unix_s(moment: datetime | None) -> int | None:
    """Seconds since 1970 of a stored time (SQLite gives naive datetimes: they are UTC)."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())
