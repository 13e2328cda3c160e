"""The database tables (SQLAlchemy 2.0). Alembic migrations in ``migrations/`` are the only way they change.

Every user-visible object belongs to a tenant: files and jobs directly; epochs, events and checkpoints through
their job. Paths are stored relative to the artifacts folder so that a shared volume may be mounted anywhere.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names, so that migrations can drop them on every database.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Now, timezone-aware UTC."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    """An API key, stored as the SHA-256 of the key; ``prefix`` (the key's first characters) finds the row."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    prefix: Mapped[str] = mapped_column(String(24), unique=True)
    key_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class File(Base):
    """An uploaded dataset (JSONL), validated line by line at upload."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(40))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    format: Mapped[str] = mapped_column(String(40))  # prompt_completion | messages | classification
    examples: Mapped[int] = mapped_column(Integer)
    tokens: Mapped[int | None] = mapped_column(BigInteger)  # counted with the tokenizer of `tokenizer`
    tokenizer: Mapped[str | None] = mapped_column(String(255))  # a model id
    path: Mapped[str] = mapped_column(String(500))  # relative to the artifacts folder
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Deleted while finished jobs still name it: the bytes are gone, the row stays for those jobs' records.
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_files_tenant_id_id", "tenant_id", "id"),)


class Job(Base):
    """A fine-tuning job. ``status`` changes only through :mod:`api.states`."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(255))
    training_file: Mapped[str] = mapped_column(ForeignKey("files.id"))
    validation_file: Mapped[str | None] = mapped_column(ForeignKey("files.id"))
    method: Mapped[str] = mapped_column(String(20))
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)  # as the user gave them, defaults filled
    rho: Mapped[float | None] = mapped_column(
        Float
    )  # the budget in force (from rho, max_flops or max_energy_kwh)
    rho_min: Mapped[float | None] = mapped_column(Float)
    estimate: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the estimate at creation
    seed: Mapped[int] = mapped_column(Integer, default=0)
    suffix: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(20), index=True)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Progress, heartbeat and delivery bookkeeping, written by the worker at most every GT_CANCEL_POLL_S.
    current_epoch: Mapped[int | None] = mapped_column(Integer)
    current_step: Mapped[int | None] = mapped_column(Integer)
    steps_in_epoch: Mapped[int | None] = mapped_column(Integer)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # times a worker started (or resumed) it
    worker: Mapped[str | None] = mapped_column(String(255))  # the worker running it now
    # Sums over its epochs, kept with them in the same transaction (api.queries.refresh_totals): a job reads
    # in one query.
    epochs_done: Mapped[int] = mapped_column(Integer, default=0)
    flops_total: Mapped[int] = mapped_column(BigInteger, default=0)
    flops_full: Mapped[int] = mapped_column(BigInteger, default=0)
    energy_j: Mapped[float] = mapped_column(Float, default=0.0)
    gco2e: Mapped[float] = mapped_column(Float, default=0.0)
    trained_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    communication_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    communication_bytes_full: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    world_size: Mapped[int | None] = mapped_column(Integer)  # ranks of its latest attempt (GT_WORKER_NPROC)
    # OpenAI's metadata: up to 16 string pairs the user attaches (the attribute "metadata" is SQLAlchemy's).
    user_metadata: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON)

    __table_args__ = (Index("ix_jobs_tenant_id_id", "tenant_id", "id"),)


class Epoch(Base):
    """One epoch's report (greencore.EpochReport), written as soon as the epoch ends."""

    __tablename__ = "epochs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    epoch: Mapped[int] = mapped_column(Integer)  # 1-based
    selected_tensors: Mapped[list[str]] = mapped_column(JSON)
    flops: Mapped[dict[str, int]] = mapped_column(JSON)
    rho_achieved: Mapped[float] = mapped_column(Float)
    tokens: Mapped[int] = mapped_column(BigInteger)
    steps: Mapped[int] = mapped_column(Integer, default=0)
    truncated_examples: Mapped[int] = mapped_column(Integer, default=0)
    dropped_examples: Mapped[int] = mapped_column(Integer, default=0)
    selection: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # how the tensors were chosen
    wall_s: Mapped[float] = mapped_column(Float)
    valid_wall_s: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")  # part of wall_s
    train_loss: Mapped[float | None] = mapped_column(Float)
    valid_loss: Mapped[float | None] = mapped_column(Float)
    valid_accuracy: Mapped[float | None] = mapped_column(Float)
    valid_token_accuracy: Mapped[float | None] = mapped_column(Float)
    energy_j: Mapped[float] = mapped_column(Float)
    energy_method: Mapped[str] = mapped_column(String(20))
    energy_inputs: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # what an estimate used
    gco2e: Mapped[float] = mapped_column(Float)
    # The device profile it ran on (GT_DEVICE_NAME); estimates are calibrated on the latest epochs of theirs.
    # Null for epochs recorded before migration 0003: unknown, never used for calibration.
    device: Mapped[str | None] = mapped_column(String(100))
    # The ranks it ran on and the bytes they exchanged, beside full fine-tuning's (greencore.distributed).
    world_size: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    communication_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    communication_bytes_full: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # The peak learning rate it trained at; null for epochs recorded before migration 0005.
    learning_rate: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (
        UniqueConstraint("job_id", "epoch", name="uq_epochs_job_id_epoch"),
        Index("ix_epochs_device_id", "device", "id"),
    )


class Event(Base):
    """Something that happened to a job: a status change, a selection, a checkpoint, an error."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(20))  # status | selection | epoch | checkpoint | error | info
    level: Mapped[str] = mapped_column(String(10), default="info")  # info | warn | error (OpenAI's)
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (Index("ix_events_job_id_id", "job_id", "id"),)


class Checkpoint(Base):
    """A Hugging Face folder written by the training run: one per epoch (``epoch-N``) and ``final``."""

    __tablename__ = "checkpoints"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(40))  # epoch-N | final
    epoch: Mapped[int | None] = mapped_column(Integer)  # the epoch it ends; final: the last one
    path: Mapped[str] = mapped_column(String(500))  # relative to the artifacts folder
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_checkpoints_job_id_name"),)
