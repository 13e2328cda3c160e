"""Uploaded datasets: stored atomically under the artifacts folder, validated line by line by greencore."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from api.errors import DatasetInvalid, PayloadTooLarge

CHUNK = 1 << 20


@dataclass
class StoredUpload:
    path: Path  # the final file
    bytes: int
    sha256: str


def store_upload(source: BinaryIO, target: Path, max_bytes: int) -> StoredUpload:
    """Copy ``source`` to ``target`` through a temporary file in the same folder, renamed when complete.

    Raises PayloadTooLarge (413) past ``max_bytes``; nothing is left behind then.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLarge(f"the file is larger than the limit of {max_bytes} bytes (GT_MAX_UPLOAD_BYTES)")
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return StoredUpload(target, size, digest.hexdigest())


def inspect_dataset(path: Path, tokenizer: Any | None = None) -> Any:
    """greencore's summary of a dataset (examples, format, labels, tokens); DatasetInvalid (400) naming the line
    and the field of the first bad line."""
    from greencore.data import DatasetError, validate_dataset

    try:
        return validate_dataset(path, tokenizer)
    except DatasetError as exc:
        raise DatasetInvalid(exc.message, exc.line, exc.field) from exc
