"""Dependencies that handlers take through typed aliases: ``SessionDep``, ``CurrentTenant``, ``SettingsDep``.

They are ``async def`` wherever they do no I/O: FastAPI runs a sync dependency in its threadpool, and each
such hop costs two GIL hand-overs between the event loop and a worker thread, which under load queue behind
every other request (bench/results/api_load.md). What blocks (a query, a rollback) runs on a thread.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, TypeVar

import anyio.to_thread
from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.catalog import ModelCatalog
from api.config import Settings
from api.errors import NotAuthenticated, NotFound
from api.ids import is_id
from api.keys import authenticate
from api.queue import JobQueue
from api.ratelimit import ESTIMATES_ROUTE, RateLimits, client_address
from api.tables import Tenant

T = TypeVar("T")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session for the request. Opening one does no I/O (it connects on first use); closing one that still
    holds a connection (a read, an error) rolls back, which blocks: that runs in the threadpool."""
    session = request.app.state.session_factory()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


async def get_queue(request: Request) -> JobQueue:
    return request.app.state.queue


async def get_catalog(request: Request) -> ModelCatalog:
    return request.app.state.catalog


# Request work that blocks on the database runs on at most this many threads at once, not on FastAPI's pool of
# 40: the work holds the GIL between round trips, and with dozens of threads at once each thread back from a
# round trip queues for the GIL behind all the others (bench/results/api_threads.md). Two rather than one, so
# that one slow call (a stalled commit) does not hold up every other read.
DB_THREADS = 2
DB_LIMITER = anyio.CapacityLimiter(DB_THREADS)
# Creating a job may compute its estimate first (a profile of the model: seconds when the model and the
# dataset are new to this process): creations take turns on a thread of their own, so that reads never wait
# behind one (one tenant's creations take turns on its row lock anyway; bench/results/api_threads.md).
CREATE_LIMITER = anyio.CapacityLimiter(1)


async def on_db_thread(work: Callable[..., T], *args: Any, limiter: anyio.CapacityLimiter = DB_LIMITER) -> T:
    """``work(*args)`` on one of ``limiter``'s threads; waits for one to be free."""
    return await anyio.to_thread.run_sync(work, *args, limiter=limiter)


async def run_and_close(
    session: Session, work: Callable[..., T], *args: Any, limiter: anyio.CapacityLimiter = DB_LIMITER
) -> T:
    """``work(*args)``, which blocks on ``session``, on a DB thread, then ``session`` closed there too: an
    async handler that does its work through this takes one hop where a sync handler takes three (the handler,
    the check of its answer, the session's rollback). What ``work`` returns stays readable: closing a session
    detaches its objects without expiring them."""

    def run() -> T:
        try:
            return work(*args)
        finally:
            session.close()

    return await on_db_thread(run, limiter=limiter)


SettingsDep = Annotated[Settings, Depends(get_settings)]
CatalogDep = Annotated[ModelCatalog, Depends(get_catalog)]
SessionDep = Annotated[Session, Depends(get_session)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]

_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer gt-...`")


def _authenticate_within_limits(
    session: Session, limits: RateLimits, key: str, address: str, estimate: bool
) -> Tenant:
    """The tenant of stored, unrevoked ``key``, its request counted; 429 (before the lookup) when ``address``
    sent too many wrong keys, 401 for a wrong key (counted against ``address``), 429 past the key's, its
    tenant's or (``estimate``) the estimates' limit. Blocks: on the database, and on Redis's counters."""
    limits.check_address(address)
    tenant = authenticate(session, key)
    if tenant is None:
        limits.count_failed_auth(address)
        raise NotAuthenticated("invalid API key")
    limits.count_request(key, tenant.id, estimate)
    return tenant


async def current_tenant(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    """The tenant of the request's API key: 401 without a valid one, 429 past a rate limit (api.ratelimit).
    Every key is a stored one (GT_BOOTSTRAP_API_KEY too, stored at start: api.keys.store_bootstrap_key), so
    a revoked key answers 401 on the very next request. The lookup and the rate-limit counters run in one hop
    on a DB thread. A request without a key answers 401 at once: it guesses nothing, so it is not counted."""
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise NotAuthenticated("missing API key: send 'Authorization: Bearer <key>'")
    estimate = getattr(request.scope.get("route"), "name", None) == ESTIMATES_ROUTE
    address = client_address(request.client.host if request.client else None)
    return await on_db_thread(
        _authenticate_within_limits,
        session,
        request.app.state.rate_limits,
        credentials.credentials,
        address,
        estimate,
    )


CurrentTenant = Annotated[Tenant, Depends(current_tenant)]


async def ids_in_path(request: Request, _tenant: CurrentTenant) -> None:
    """404 for an id in the path that no object can have (a path trick, a NUL byte, a very long string),
    before any query sees it; after the key is checked, so that a request without one still answers 401."""
    for name, value in request.path_params.items():
        if name.endswith("_id") and not is_id(value):
            raise NotFound(f"{name.removesuffix('_id')} {value[:64]!r} not found")
