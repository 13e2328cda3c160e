"""Dependencies that handlers take through typed aliases: ``SessionDep``, ``CurrentTenant``, ``SettingsDep``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.catalog import ModelCatalog
from api.config import Settings
from api.errors import NotAuthenticated
from api.keys import DEFAULT_TENANT, authenticate, ensure_tenant, is_key
from api.queue import JobQueue
from api.tables import Tenant


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.session_factory() as session:
        yield session


def get_queue(request: Request) -> JobQueue:
    return request.app.state.queue


def get_catalog(request: Request) -> ModelCatalog:
    return request.app.state.catalog


SettingsDep = Annotated[Settings, Depends(get_settings)]
CatalogDep = Annotated[ModelCatalog, Depends(get_catalog)]
SessionDep = Annotated[Session, Depends(get_session)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]

_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer gt-...`")


def current_tenant(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    """The tenant of the request's API key; 401 without a valid one. GT_BOOTSTRAP_API_KEY is tenant
    ``default`` (looked up once per process)."""
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise NotAuthenticated("missing API key: send 'Authorization: Bearer <key>'")
    key = credentials.credentials
    if settings.bootstrap_api_key is not None and is_key(key, settings.bootstrap_api_key.get_secret_value()):
        if getattr(request.app.state, "bootstrap_tenant", None) is None:
            request.app.state.bootstrap_tenant = ensure_tenant(session, DEFAULT_TENANT)
            session.commit()
        return request.app.state.bootstrap_tenant
    tenant = authenticate(session, key)
    if tenant is None:
        raise NotAuthenticated("invalid API key")
    return tenant


CurrentTenant = Annotated[Tenant, Depends(current_tenant)]
