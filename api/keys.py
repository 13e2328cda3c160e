"""Tenants and API keys. A key is ``gt-`` + 43 random URL-safe characters (256 bits); the database keeps its
first characters (to find the row) and its SHA-256 (compared in constant time), never the key."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.ids import is_id, new_id
from api.tables import ApiKey, Tenant, utcnow

log = logging.getLogger(__name__)

DEFAULT_TENANT = "default"
KEY_PREFIX_CHARS = 12  # "gt-" + 9 random characters: unique enough to index, useless to guess the rest
BOOTSTRAP_KEY_NAME = "bootstrap"  # the name GT_BOOTSTRAP_API_KEY's stored row carries in `keys list`


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
            id=new_id("key"),
            tenant_id=tenant.id,
            name=name,
            prefix=key[:KEY_PREFIX_CHARS],
            key_sha256=key_sha256(key),
            created_at=utcnow(),
        )
    )
    session.commit()
    return key


class BootstrapKeyClash(ValueError):
    """GT_BOOTSTRAP_API_KEY starts as another stored key does: keys are found by their first characters."""


def store_bootstrap_key(session: Session, key: str) -> ApiKey:
    """Store GT_BOOTSTRAP_API_KEY ``key`` as a key of tenant ``default`` named "bootstrap" (its prefix and
    hash, as :func:`create_key` stores a key) unless it is stored already; returns its row. From then on it is
    a stored key like any other: ``greentrainer keys revoke`` revokes it on every API process, and a revoked
    one stays revoked when a process starts again with the same setting (a warning is logged). Safe when two
    processes start together. Raises BootstrapKeyClash when another key has the same first
    KEY_PREFIX_CHARS characters. Commits."""
    prefix = key[:KEY_PREFIX_CHARS]
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if row is None:
        tenant = ensure_tenant(session, DEFAULT_TENANT)
        new = ApiKey(
            id=new_id("key"),
            tenant_id=tenant.id,
            name=BOOTSTRAP_KEY_NAME,
            prefix=prefix,
            key_sha256=key_sha256(key),
            created_at=utcnow(),
        )
        try:
            with session.begin_nested():
                session.add(new)
            row = new
        except IntegrityError:  # another process stored it (or a key of the same prefix) first
            row = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).one()
        session.commit()
    if not hmac.compare_digest(row.key_sha256, key_sha256(key)):
        raise BootstrapKeyClash(
            f"GT_BOOTSTRAP_API_KEY starts with the same {KEY_PREFIX_CHARS} characters ({prefix!r}) as the "
            f"stored key {row.id}: keys are found by their first {KEY_PREFIX_CHARS} characters, so choose a "
            "bootstrap key that starts differently (a random one, e.g. `openssl rand -hex 32`)"
        )
    if row.revoked_at is not None:
        log.warning(
            "GT_BOOTSTRAP_API_KEY (stored as %s, %s...) was revoked at %s: it stays revoked; remove the "
            "setting, or set a new key",
            row.id,
            prefix,
            row.revoked_at.isoformat(),
        )
    return row


def is_key(key: str, expected: str) -> bool:
    """Whether ``key`` is ``expected``, compared in constant time (through their digests)."""
    return hmac.compare_digest(key_sha256(key), key_sha256(expected))


def authenticate(session: Session, key: str) -> Tenant | None:
    """The tenant a stored, unrevoked key belongs to, or None."""
    if "\x00" in key:  # no key holds a NUL, and PostgreSQL refuses to compare a string that does
        return None
    digest = key_sha256(key)
    row = session.execute(
        select(ApiKey, Tenant)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .where(ApiKey.prefix == key[:KEY_PREFIX_CHARS], ApiKey.revoked_at.is_(None))
    ).first()
    if row is None or not hmac.compare_digest(digest, row.ApiKey.key_sha256):
        return None
    return row.Tenant


class KeyNotFound(LookupError):
    """No stored key matches what was given (or no tenant of that name)."""


def list_keys(session: Session, tenant_name: str | None = None) -> list[tuple[ApiKey, str]]:
    """Every stored key with its tenant's name, oldest first; only ``tenant_name``'s when given (KeyNotFound
    when there is no such tenant)."""
    stmt = select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id)
    if tenant_name is not None:
        if session.scalar(select(Tenant.id).where(Tenant.name == tenant_name)) is None:
            raise KeyNotFound(f"no tenant named {tenant_name!r}")
        stmt = stmt.where(Tenant.name == tenant_name)
    return [(key, name) for key, name in session.execute(stmt.order_by(ApiKey.created_at, ApiKey.id))]


def find_key(session: Session, ref: str) -> ApiKey:
    """The stored key that ``ref`` names: its id (``key-...``), its prefix (the first 12 characters, as
    ``keys list`` shows) or the key itself; KeyNotFound otherwise."""
    if ref.startswith("key-"):
        row = session.get(ApiKey, ref) if is_id(ref) else None
    else:
        row = session.scalar(select(ApiKey).where(ApiKey.prefix == ref[:KEY_PREFIX_CHARS]))
        if (
            row is not None
            and len(ref) > KEY_PREFIX_CHARS
            and not hmac.compare_digest(key_sha256(ref), row.key_sha256)
        ):
            row = None  # the right prefix, but not the key
    if row is None:
        shown = (
            ref if ref.startswith("key-") or len(ref) <= KEY_PREFIX_CHARS else ref[:KEY_PREFIX_CHARS] + "..."
        )
        raise KeyNotFound(
            f"no API key matches {shown!r}: give its id, its prefix or the key (see `greentrainer keys list`)"
        )
    return row


def revoke_key(session: Session, ref: str) -> tuple[ApiKey, bool]:
    """Revoke the key ``ref`` names (see :func:`find_key`): from the next request on it answers 401. Returns
    the key and whether this call revoked it (False: it was revoked already, and its time is kept).
    Commits."""
    row = find_key(session, ref)
    if row.revoked_at is not None:
        return row, False
    row.revoked_at = utcnow()
    session.commit()
    return row, True
