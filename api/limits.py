"""Per-tenant limits: jobs active at once (GT_MAX_ACTIVE_JOBS, 429) and the size of an upload
(GT_MAX_UPLOAD_BYTES, 413, refused while the body streams in)."""

from __future__ import annotations

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import PayloadTooLarge, TooManyJobs, status_of
from api.states import JobState
from api.tables import Job, Tenant

ACTIVE = (str(JobState.validating), str(JobState.queued), str(JobState.running))
RETRY_AFTER_S = 60  # a hint only: when a running job ends cannot be known
MULTIPART_OVERHEAD_BYTES = 1 << 16  # boundaries, part headers and the small form fields around the file
UPLOAD_PATH = "/v1/files"


def check_active_jobs(session: Session, tenant: Tenant, limit: int) -> None:
    """Raise TooManyJobs (429) when ``tenant`` already has ``limit`` jobs validating, queued or running.

    Call it in the transaction that adds the job, right before adding it: it locks the tenant's row until that
    transaction ends, so two requests at ``limit - 1`` cannot both pass (the second waits for the first to
    commit, then counts its job).
    """
    # One statement locks on both databases: on PostgreSQL the row (FOR NO KEY UPDATE, which leaves the
    # foreign-key checks of concurrent uploads alone), on SQLite the database's write lock (SQLite ignores
    # SELECT ... FOR UPDATE, and a count read before that lock could be stale).
    session.execute(
        update(Tenant)
        .where(Tenant.id == tenant.id)
        .values(created_at=Tenant.created_at)
        .execution_options(synchronize_session=False)
    )
    # The count stops at the limit: a tenant with many queued jobs does not make every creation slower.
    active_ids = select(Job.id).where(Job.tenant_id == tenant.id, Job.status.in_(ACTIVE)).limit(limit)
    active = session.scalar(select(func.count()).select_from(active_ids.subquery())) or 0
    if active >= limit:
        raise TooManyJobs(
            f"too many active jobs: this tenant already has {limit} jobs validating, queued or running, "
            f"the limit (GT_MAX_ACTIVE_JOBS={limit}). Wait for one to end, or cancel one with "
            "POST /v1/fine_tuning/jobs/{id}/cancel, then try again",
            retry_after_s=RETRY_AFTER_S,
            max_active_jobs=limit,
        )


def upload_too_large(max_bytes: int) -> PayloadTooLarge:
    """The 413 of an upload over ``max_bytes``, naming the limit in bytes and in MB."""
    return PayloadTooLarge(
        f"the file is larger than the upload limit of {max_bytes} bytes ({max_bytes / 1e6:.4g} MB, "
        "GT_MAX_UPLOAD_BYTES): split the dataset into smaller files, or ask the operator to raise the limit",
        max_upload_bytes=max_bytes,
    )


class _BodyTooLarge(Exception):
    """Raised into the form parser to stop reading an upload past the limit."""


class UploadLimit:
    """ASGI middleware: a ``POST /v1/files`` body longer than GT_MAX_UPLOAD_BYTES (plus multipart framing) is
    answered 413 at once when its Content-Length says so, and otherwise as soon as the bytes counted so far
    pass the limit (a chunked upload), before the form parser has spooled more of it to a temporary file.
    The exact file size is checked again while the file is stored (api.datasets.store_upload)."""

    def __init__(self, app: ASGIApp, max_upload_bytes: int) -> None:
        self.app = app
        self.max_upload_bytes = max_upload_bytes
        self.max_body_bytes = max_upload_bytes + MULTIPART_OVERHEAD_BYTES

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].rstrip("/") != UPLOAD_PATH:
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._refuse(scope, receive, send)
            return
        received = 0
        over = started = False

        async def counted_receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    over = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over:  # the app's answer to the aborted read (FastAPI makes it a 400): ours replaces it
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = upload_too_large(self.max_upload_bytes)
        response = JSONResponse(
            {"error": error.body()}, status_code=status_of(error), headers={"Connection": "close"}
        )
        await response(scope, receive, send)
