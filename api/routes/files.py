"""Datasets: upload (validated line by line), list, inspect, download, delete."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from typing import Annotated, BinaryIO
from urllib.parse import quote

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.responses import StreamingResponse
from sqlalchemy import delete, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.catalog import ModelCatalog
from api.config import Settings
from api.datasets import StoredUpload, dataset_limits, inspect_dataset, on_dataset_thread, store_upload
from api.deps import CatalogDep, CurrentTenant, SessionDep, SettingsDep, run_and_close
from api.errors import Conflict, InvalidRequest, NotFound
from api.ids import new_id
from api.queries import owned_file, page
from api.schemas.common import MAX_PAGE, ErrorPublic, IdCursor
from api.schemas.files import FileDeleted, FilePublic, FilesPublic
from api.states import TERMINAL
from api.tables import File, Job, utcnow

log = logging.getLogger(__name__)

router = APIRouter(
    prefix="/files", tags=["files"]
)  # mounted under /v1 by api.routes (auth, id checks, errors)

PURPOSES = ("fine-tune",)
CHUNK = 1 << 20  # bytes read from storage per chunk of a download
IN_USE: dict[int | str, dict[str, object]] = {
    409: {"model": ErrorPublic, "description": "a job uses the file (the message names the job)"}
}


@router.post(
    "",
    response_model=FilePublic,
    responses={507: {"model": ErrorPublic, "description": "no space left on the service's storage"}},
)
async def upload_file(
    session: SessionDep,
    catalog: CatalogDep,
    settings: SettingsDep,
    tenant: CurrentTenant,
    file: UploadFile,
    purpose: Annotated[str, Form()] = "fine-tune",
    model: Annotated[str | None, Form(description="count tokens with this model's tokenizer")] = None,
) -> FilePublic:
    """Upload a JSONL dataset; every line is checked, and a bad one answers 400 naming its line and field, as
    does the line where a GT_MAX_DATASET_* limit is crossed. A file over GT_MAX_UPLOAD_BYTES answers 413
    (api.limits.BodyLimit refuses it as it streams in)."""
    if purpose not in PURPOSES:
        raise InvalidRequest(
            f"purpose must be one of {', '.join(PURPOSES)}, not {purpose!r}", param="purpose"
        )
    file_id = new_id("file")
    relative = f"files/{tenant.id}/{file_id}.jsonl"
    # Storing and validating read the whole file: on a thread, at most GT_DATASET_THREADS at once per process
    # (api.datasets.dataset_limiter); the event loop only receives the bytes.
    stored, tokenizer_model = await on_dataset_thread(
        settings, _store, file.file, settings, catalog, relative, model
    )
    summary = stored.summary
    row = File(
        id=file_id,
        tenant_id=tenant.id,
        filename=display_name(file.filename),
        purpose=purpose,
        bytes=stored.bytes,
        sha256=stored.sha256,
        format=summary.format,
        examples=summary.examples,
        tokens=summary.tokens,
        tokenizer=tokenizer_model,
        path=relative,
        created_at=utcnow(),
    )
    return FilePublic.of(await run_and_close(session, _commit_upload, session, row, stored))


def _store(
    source: BinaryIO, settings: Settings, catalog: ModelCatalog, relative: str, model: str | None
) -> tuple[StoredUpload, str | None]:
    """The upload stored at ``relative`` (validated, its tokens counted with the tokenizer of ``model``, else
    of the demo model when there is one), and the name of the model whose tokenizer counted them."""
    tokenizer_model = model or (settings.demo_model if settings.demo_model in catalog.ids() else None)
    tokenizer = catalog.tokenizer(tokenizer_model) if tokenizer_model else None
    limits = dataset_limits(settings)
    stored = store_upload(
        source,
        settings.artifacts_dir / relative,
        settings.max_upload_bytes,
        validate=lambda path: inspect_dataset(path, limits, tokenizer),
    )
    return stored, tokenizer_model


def _commit_upload(session: Session, row: File, stored: StoredUpload) -> File:
    """Commit the row of a stored upload. The file is in place first and its row follows: a failed commit
    takes the file away again, and a process killed in between leaves a file no row names, which
    api.datasets.sweep_uploads deletes (its docstring says why this order)."""
    session.add(row)
    try:
        session.commit()
    except BaseException:
        stored.path.unlink(missing_ok=True)
        raise
    return row


def display_name(filename: str | None) -> str:
    """The name an upload is listed under: the last part of the name the client sent (which may be a path,
    even ``../../etc/passwd``), without control characters, at most 255 characters. Only a label: the file is
    stored as ``files/<tenant id>/<file id>.jsonl``."""
    name = "".join(ch for ch in re.split(r"[/\\]", filename or "")[-1] if ch.isprintable())[:255].strip()
    return name if name not in ("", ".", "..") else "upload.jsonl"


@router.get("", response_model=FilesPublic)
def list_files(
    session: SessionDep,
    tenant: CurrentTenant,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
    after: IdCursor = None,
) -> FilesPublic:
    """The tenant's files, newest first."""
    live = select(File).where(File.tenant_id == tenant.id, File.deleted_at.is_(None))
    rows, more = page(session, live, File.id, limit, after, True)
    return FilesPublic(data=[FilePublic.of(r) for r in rows], has_more=more)


@router.get("/{file_id}", response_model=FilePublic)
def get_file(file_id: str, session: SessionDep, tenant: CurrentTenant) -> FilePublic:
    """One file: format, examples, tokens."""
    return FilePublic.of(owned_file(session, tenant.id, file_id))


@router.get(
    "/{file_id}/content",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/jsonl": {}}, "description": "the file's bytes as uploaded"}},
)
def file_content(
    file_id: str, session: SessionDep, settings: SettingsDep, tenant: CurrentTenant
) -> StreamingResponse:
    """The file's bytes exactly as uploaded (JSONL), streamed, with ``Content-Length``. Another tenant's file,
    or one whose bytes are no longer in storage, answers 404."""
    row = owned_file(session, tenant.id, file_id)
    # Done with the database: a slow download must not hold a connection of the pool.
    session.close()
    try:
        handle = (settings.artifacts_dir / row.path).open("rb")
    except FileNotFoundError as exc:  # removed, or the volume is not mounted: say so, not a 500
        raise NotFound(f"file {file_id!r} is listed, but its bytes are no longer in storage") from exc
    # The open handle is what is sent: a file deleted meanwhile is still read to its end (POSIX keeps an
    # unlinked file while it is open), and its length is the one announced.
    size = os.fstat(handle.fileno()).st_size
    headers = {
        "Content-Length": str(size),
        "Content-Disposition": f'attachment; filename="{row.id}.jsonl"; '
        f"filename*=UTF-8''{quote(row.filename, safe='')}",
    }
    return StreamingResponse(_read_all(handle, size), media_type="application/jsonl", headers=headers)


def _read_all(handle: BinaryIO, size: int) -> Iterator[bytes]:
    """``size`` bytes of ``handle`` in chunks, then the handle closed. A file shorter than announced raises
    mid-stream, which cuts the connection: the client sees a failed download, never a short one."""
    with handle:
        sent = 0
        while sent < size and (chunk := handle.read(min(CHUNK, size - sent))):
            sent += len(chunk)
            yield chunk
    if sent != size:
        raise OSError(f"{handle.name} shrank to {sent} of {size} bytes while being sent")


@router.delete("/{file_id}", response_model=FileDeleted, responses=IN_USE)
def delete_file(
    file_id: str, session: SessionDep, settings: SettingsDep, tenant: CurrentTenant
) -> FileDeleted:
    """Delete a file: its stored bytes, and its row unless a finished job names it (that job's record keeps
    the id; the file answers 404 from now on, as a deleted one). A job still validating, queued or running
    needs the data: 409 naming the job."""
    row = owned_file(session, tenant.id, file_id)
    stored = settings.artifacts_dir / row.path
    named = _refuse_if_used(session, tenant.id, row.id)
    if named:
        row.deleted_at = utcnow()
    else:
        session.execute(delete(File).where(File.id == row.id))
    try:
        session.commit()
    except IntegrityError as exc:  # a job naming the file was created since the check
        session.rollback()
        _refuse_if_used(session, tenant.id, file_id)
        raise Conflict(f"file {file_id} is used by a job: it cannot be deleted") from exc
    # The row first, then the bytes: a failed commit leaves both, and bytes left behind by a failed unlink are
    # never served again (nothing names them).
    try:
        stored.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("file %s deleted, but its bytes %s stay in storage: %s", file_id, stored, exc)
    return FileDeleted(id=file_id, deleted=True)


def _refuse_if_used(session: Session, tenant_id: str, file_id: str) -> bool:
    """Conflict (409) naming a job of the tenant that uses the file and has not ended; whether a finished job
    names it."""
    jobs = session.execute(
        select(Job.id, Job.status, Job.training_file)
        .where(
            Job.tenant_id == tenant_id,
            or_(Job.training_file == file_id, Job.validation_file == file_id),
        )
        .order_by(Job.id.desc())
    ).all()
    active = [job for job in jobs if job.status not in TERMINAL]
    if not active:
        return bool(jobs)
    job = active[0]
    role = "training_file" if job.training_file == file_id else "validation_file"
    more = f" (and {len(active) - 1} more job{'s' if len(active) > 2 else ''})" if len(active) > 1 else ""
    advice = "cancel the job or wait for it to end, then delete the file"
    raise Conflict(f"file {file_id} is the {role} of job {job.id}, which is {job.status}{more}: {advice}")
