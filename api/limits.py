"""Limits: per tenant, jobs active at once (GT_MAX_ACTIVE_JOBS, 429); per request, the size of a body
(GT_MAX_BODY_BYTES, and GT_MAX_UPLOAD_BYTES for an upload: 413, refused while the body streams in, before the
API key is checked), and an upload's API key checked before its body is read (401)."""

from __future__ import annotations

from fastapi.security.utils import get_authorization_scheme_param
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session
from starlette.datastructures import Headers, State
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import on_db_thread
from api.errors import NotAuthenticated, PayloadTooLarge, RateLimited, TooManyJobs, UserError, status_of
from api.keys import authenticate
from api.ratelimit import client_address
from api.states import JobState
from api.tables import Job, Tenant

ACTIVE = (str(JobState.validating), str(JobState.queued), str(JobState.running))
RETRY_AFTER_S = 60  # a hint only: when a running job ends cannot be known
MULTIPART_OVERHEAD_BYTES = 1 << 16  # boundaries, part headers and the small form fields around the file
UPLOAD_PATH = "/v1/files"
MISSING_KEY = "missing API key: send 'Authorization: Bearer <key>'"  # as api.deps.current_tenant says it
INVALID_KEY = "invalid API key"


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


def body_too_large(max_bytes: int) -> PayloadTooLarge:
    """The 413 of a request body (other than an upload) over ``max_bytes``, naming the limit."""
    return PayloadTooLarge(
        f"the request body is larger than the limit of {max_bytes} bytes ({max_bytes / 1e6:.4g} MB, "
        "GT_MAX_BODY_BYTES): a job or an estimate is a small JSON object; datasets are uploaded with "
        "POST /v1/files",
        max_body_bytes=max_bytes,
    )


def bearer_key(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header, parsed as FastAPI's HTTPBearer does; None
    without one."""
    scheme, key = get_authorization_scheme_param(authorization)
    return key if scheme.lower() == "bearer" and key else None


def _key_authenticates(state: State, key: str, address: str) -> bool:
    """Whether ``key`` is a stored, unrevoked key of the app whose ``state`` is given, under the failed-auth
    limit of ``address`` as api.deps.current_tenant applies it: RateLimited before the lookup when the address
    sent too many wrong keys, and a wrong key counted against it. Blocks (database, Redis)."""
    state.rate_limits.check_address(address)
    with state.session_factory() as session:
        if authenticate(session, key) is not None:
            return True
    state.rate_limits.count_failed_auth(address)
    return False


async def key_authenticates(state: State, key: str, client_host: str | None) -> bool:
    """:func:`_key_authenticates` on a DB thread; ``client_host``: the request's client address."""
    return await on_db_thread(_key_authenticates, state, key, client_address(client_host))


class _BodyTooLarge(Exception):
    """Raised into the app's body reader (JSON or form parser) to stop reading past the limit."""


class BodyLimit:
    """ASGI middleware, outside everything else, that bounds what a request may make the service hold before
    its API key is checked (FastAPI reads a body before the dependencies run):

    - every body is limited: GT_MAX_BODY_BYTES, and for ``POST /v1/files`` GT_MAX_UPLOAD_BYTES plus multipart
      framing. Over it, the answer is 413 at once when Content-Length says so (nothing read), and otherwise
      as soon as the bytes counted so far pass the limit (a chunked body), before the JSON or form parser has
      held or spooled more of it;
    - an upload without a valid API key answers 401 before any of its body is read, so that nothing is
      spooled to a temporary file for it; a wrong key counts against the client address's failed-auth limit
      (429 past it), as on every other route. The route's own auth dependency still runs (a second lookup,
      which counts the request against the key's and the tenant's limits).

    The exact file size is checked again while the file is stored (api.datasets.store_upload)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = scope["method"] == "POST" and scope["path"].rstrip("/") == UPLOAD_PATH
        limit = self.max_upload_bytes + MULTIPART_OVERHEAD_BYTES if upload else self.max_body_bytes
        too_large = upload_too_large(self.max_upload_bytes) if upload else body_too_large(self.max_body_bytes)
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _refuse(too_large, scope, receive, send)
            return
        if upload:
            key = bearer_key(headers.get("authorization"))
            if key is None:
                await _refuse(NotAuthenticated(MISSING_KEY), scope, receive, send)
                return
            client = scope.get("client")
            try:
                known = await key_authenticates(scope["app"].state, key, client[0] if client else None)
            except RateLimited as exc:
                await _refuse(exc, scope, receive, send)
                return
            if not known:
                await _refuse(NotAuthenticated(INVALID_KEY), scope, receive, send)
                return
        received = 0
        over = started = False

        async def counted_receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
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
            await _refuse(too_large, scope, receive, send)


async def _refuse(error: UserError, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer ``error`` in the service's shape and close the connection (its body may be left unread)."""
    headers = {**(error.headers() or {}), "Connection": "close"}
    response = JSONResponse({"error": error.body()}, status_code=status_of(error), headers=headers)
    await response(scope, receive, send)
