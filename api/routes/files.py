"""Datasets: upload (validated line by line), list, inspect."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, Request, UploadFile
from sqlalchemy import select

from api.datasets import inspect_dataset, store_upload
from api.deps import CatalogDep, CurrentTenant, SessionDep, SettingsDep
from api.errors import InvalidRequest, PayloadTooLarge
from api.ids import new_id
from api.queries import owned_file, page
from api.schemas.common import ERROR_RESPONSES, MAX_PAGE
from api.schemas.files import FilePublic, FilesPublic
from api.tables import File, utcnow

router = APIRouter(prefix="/v1/files", tags=["files"], responses=ERROR_RESPONSES)

PURPOSES = ("fine-tune",)


@router.post("", response_model=FilePublic)
def upload_file(
    request: Request,
    session: SessionDep,
    catalog: CatalogDep,
    settings: SettingsDep,
    tenant: CurrentTenant,
    file: UploadFile,
    purpose: Annotated[str, Form()] = "fine-tune",
    model: Annotated[str | None, Form(description="count tokens with this model's tokenizer")] = None,
) -> FilePublic:
    """Upload a JSONL dataset; every line is checked, and a bad one answers 400 naming its line and field."""
    if purpose not in PURPOSES:
        raise InvalidRequest(f"purpose must be one of {', '.join(PURPOSES)}, not {purpose!r}", param="purpose")
    length = int(request.headers.get("content-length") or 0)
    if length > settings.max_upload_bytes + (1 << 16):  # multipart framing aside
        raise PayloadTooLarge(f"the file is larger than the limit of {settings.max_upload_bytes} bytes")
    tokenizer_model = model or (settings.demo_model if settings.demo_model in catalog.ids() else None)
    tokenizer = catalog.tokenizer(tokenizer_model) if tokenizer_model else None
    file_id = new_id("file")
    relative = f"files/{tenant.id}/{file_id}.jsonl"
    assert settings.artifacts_dir is not None
    stored = store_upload(file.file, settings.artifacts_dir / relative, settings.max_upload_bytes)
    try:
        summary = inspect_dataset(stored.path, tokenizer)
    except Exception:
        stored.path.unlink(missing_ok=True)
        raise
    row = File(
        id=file_id, tenant_id=tenant.id, filename=(file.filename or "upload.jsonl")[:255], purpose=purpose,
        bytes=stored.bytes, sha256=stored.sha256, format=summary.format, examples=summary.examples,
        tokens=summary.tokens, tokenizer=tokenizer_model if tokenizer is not None else None, path=relative,
        created_at=utcnow(),
    )
    session.add(row)
    session.commit()
    return FilePublic.of(row)


@router.get("", response_model=FilesPublic)
def list_files(
    session: SessionDep,
    tenant: CurrentTenant,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
    after: Annotated[str | None, Query(description="the last id of the previous page")] = None,
) -> FilesPublic:
    """The tenant's files, newest first."""
    rows, more = page(session, select(File).where(File.tenant_id == tenant.id), File.id, limit, after, True)
    return FilesPublic(data=[FilePublic.of(r) for r in rows], has_more=more)


@router.get("/{file_id}", response_model=FilePublic)
def get_file(file_id: str, session: SessionDep, tenant: CurrentTenant) -> FilePublic:
    """One file: format, examples, tokens."""
    return FilePublic.of(owned_file(session, tenant.id, file_id))
