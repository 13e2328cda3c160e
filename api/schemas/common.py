"""Shapes shared by every resource: pagination and errors."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_PAGE = 100  # the most objects one list answer holds


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    code: str = Field(description="machine-readable: not_found, invalid_dataset, budget_too_small, ...")
    message: str = Field(description="what was wrong and where")
    line: int | None = Field(None, description="dataset errors: the 1-based line")
    field: str | None = Field(None, description="dataset errors: the field of that line")
    rho_min: float | None = Field(None, description="budget errors: the smallest rho that trains anything")
    min_max_flops: float | None = Field(None, description="budget errors: the smallest whole-run FLOPs budget")
    min_max_energy_kwh: float | None = Field(None, description="budget errors: the same budget in kWh")
    param: str | None = Field(None, description="request errors: the parameter at fault")


class ErrorPublic(BaseModel):
    error: ErrorBody


ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorPublic, "description": text}
    for status, text in (
        (400, "invalid request: unknown ids, a bad dataset (line and field), a budget below rho_min"),
        (401, "missing or invalid API key"),
        (404, "not found (or another tenant's)"),
        (409, "the job's state does not allow it"),
        (413, "upload too large"),
        (422, "the body or query does not validate"),
    )
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
