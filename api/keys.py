"""Tenants and API keys. A key is ``gt-`` + 43 random URL-safe characters (256 bits); the database keeps its
first characters (to find the row) and its SHA-256 (compared in constant time), never the key."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.ids import new_id
from api.tables import ApiKey, Tenant, utcnow

DEFAULT_TENANT = "default"
KEY_PREFIX_CHARS = 12  # "gt-" + 9 random characters: unique enough to index, useless to guess the rest


def key_sha256(key: str) -> str:
    """Hex SHA-256 of a key."""
    return hashlib.sha256(key.encode()).hexdigest()


def ensure_tenant(session: Session, name: str) -> Tenant:
    """The tenant called ``name``, created if missing (safe when two processes race). The caller commits."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is not None:
        return tenant
    try:
        with session.begin_nested():
            tenant = Tenant(id=new_id("tenant"), name=name, created_at=utcnow())
            session.add(tenant)
    except IntegrityError:
        tenant = session.scalars(select(Tenant).where(Tenant.name == name)).one()
    return tenant


def create_key(session: Session, tenant_name: str, name: str = "") -> str:
    """A new key for tenant ``tenant_name`` (created if missing); returns the key, shown once. Commits."""
    tenant = ensure_tenant(session, tenant_name)
    key = "gt-" + secrets.token_urlsafe(32)
    session.add(
        ApiKey(
            id=new_id("key"), tenant_id=tenant.id, name=name, prefix=key[:KEY_PREFIX_CHARS],
            key_sha256=key_sha256(key), created_at=utcnow(),
        )
    )
    session.commit()
    return key


def is_key(key: str, expected: str) -> bool:
    """Whether ``key`` is ``expected``, compared in constant time (through their digests)."""
    return hmac.compare_digest(key_sha256(key), key_sha256(expected))


def authenticate(session: Session, key: str) -> Tenant | None:
    """The tenant a stored, unrevoked key belongs to, or None."""
    digest = key_sha256(key)
    row = session.execute(
        select(ApiKey, Tenant)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .where(ApiKey.prefix == key[:KEY_PREFIX_CHARS], ApiKey.revoked_at.is_(None))
    ).first()
    if row is None or not hmac.compare_digest(digest, row.ApiKey.key_sha256):
        return None
    return row.Tenant
