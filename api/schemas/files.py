"""Uploaded datasets."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from api.schemas.common import Page, unix_s
from api.tables import File


class FilePublic(BaseModel):
    id: str
    object: Literal["file"] = "file"
    filename: str
    purpose: str
    bytes: int
    created_at: int = Field(description="seconds since 1970")
    status: Literal["processed"] = "processed"
    format: str = Field(description="messages, prompt_completion or text_label")
    examples: int
    tokens: int | None = Field(description="tokens of all examples with the tokenizer of `tokenizer`")
    tokenizer: str | None = Field(description="the model whose tokenizer counted `tokens`")

    @classmethod
    def of(cls, row: File) -> FilePublic:
        return cls(
            id=row.id,
            filename=row.filename,
            purpose=row.purpose,
            bytes=row.bytes,
            created_at=unix_s(row.created_at) or 0,
            format=row.format,
            examples=row.examples,
            tokens=row.tokens,
            tokenizer=row.tokenizer,
        )


class FilesPublic(Page):
    data: list[FilePublic]


class FileDeleted(BaseModel):
    """What ``DELETE /v1/files/{file_id}`` answers (OpenAI's ``FileDeleted``)."""

    id: str
    object: Literal["file"] = "file"
    deleted: bool = Field(description="true: the file's row and its stored bytes are gone")
