"""Datasets: upload (validated line by line), list, inspect."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Form, Query, UploadFile
from sqlalchemy import select

from api.datasets import inspect_dataset, store_upload
from api.deps import CatalogDep, CurrentTenant, SessionDep, SettingsDep
from api.errors import InvalidRequest
from api.ids import new_id
from api.queries import owned_file, page
from api.schemas.common import MAX_PAGE, ErrorPublic, IdCursor
from api.schemas.files import FilePublic, FilesPublic
from api.tables import File, utcnow

router = APIRouter(
    prefix="/files", tags=["files"]
)  # mounted under /v1 by api.routes (auth, id checks, errors)

PURPOSES = ("fine-tune",)


@router.post(
    "",
    response_model=FilePublic,
    responses={507: {"model": ErrorPublic, "description": "no space left on the service's storage"}},
)
def upload_file(
    session: SessionDep,
    catalog: CatalogDep,
    settings: SettingsDep,
    tenant: CurrentTenant,
    file: UploadFile,
    purpose: Annotated[str, Form()] = "fine-tune",
    model: Annotated[str | None, Form(description="count tokens with this model's tokenizer")] = None,
) -> FilePublic:
    """Upload a JSONL dataset; every line is checked, and a bad one answers 400 naming its line and field. A
    file over GT_MAX_UPLOAD_BYTES answers 413 (api.limits.UploadLimit refuses it as it streams in)."""
    if purpose not in PURPOSES:
        raise InvalidRequest(
            f"purpose must be one of {', '.join(PURPOSES)}, not {purpose!r}", param="purpose"
        )
    tokenizer_model = model or (settings.demo_model if settings.demo_model in catalog.ids() else None)
    tokenizer = catalog.tokenizer(tokenizer_model) if tokenizer_model else None
    file_id = new_id("file")
    relative = f"files/{tenant.id}/{file_id}.jsonl"
    # The file is validated under a temporary name and renamed into place; the row follows it, and a failed
    # commit takes the file away again: a file without a row, or a row without its file, never stays.
    stored = store_upload(
        file.file,
        settings.artifacts_dir / relative,
        settings.max_upload_bytes,
        validate=lambda path: inspect_dataset(path, tokenizer),
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
        tokenizer=tokenizer_model if tokenizer is not None else None,
        path=relative,
        created_at=utcnow(),
    )
    session.add(row)
    try:
        session.commit()
    except BaseException:
        stored.path.unlink(missing_ok=True)
        raise
    return FilePublic.of(row)


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
    rows, more = page(session, select(File).where(File.tenant_id == tenant.id), File.id, limit, after, True)
    return FilesPublic(data=[FilePublic.of(r) for r in rows], has_more=more)


@router.get("/{file_id}", response_model=FilePublic)
def get_file(file_id: str, session: SessionDep, tenant: CurrentTenant) -> FilePublic:
    """One file: format, examples, tokens."""
    return FilePublic.of(owned_file(session, tenant.id, file_id))
