"""Uploaded datasets: stored atomically under the artifacts folder, validated line by line by greencore."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from api.errors import DatasetInvalid, InsufficientStorage
from api.limits import upload_too_large
from greencore.durable import fsync_dir

log = logging.getLogger(__name__)

CHUNK = 1 << 20
TEMP_PREFIX = ".upload-"  # never a file id: ids are `file-...`, and no row ever names a temporary file
STALE_TEMP_S = 24 * 3600  # a temporary file this old was left by a killed process: removed by the next upload
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass
class StoredUpload:
    path: Path  # the final file
    bytes: int
    sha256: str
    summary: Any  # what ``validate`` returned


def store_upload(
    source: BinaryIO, target: Path, max_bytes: int, validate: Callable[[Path], Any] = lambda _path: None
) -> StoredUpload:
    """Copy ``source`` to a temporary file beside ``target``, fsync it, ``validate`` it (given the temporary
    path), and only then rename it to ``target`` (and fsync the folder): ``target`` never holds a partial or
    an invalid file.

    Raises PayloadTooLarge (413) past ``max_bytes``, InsufficientStorage (507) when the volume is full, and
    whatever ``validate`` raises (or reading ``source`` raises: a client gone); nothing is left behind then.
    """
    folder = target.parent
    tmp: Path | None = None
    try:
        created = not folder.is_dir()
        folder.mkdir(parents=True, exist_ok=True)
        if created:
            fsync_dir(folder.parent)
        _remove_stale_temps(folder)
        digest = hashlib.sha256()
        size = 0
        fd, name = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX)
        tmp = Path(name)
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise upload_too_large(max_bytes)
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        summary = validate(tmp)
        os.replace(tmp, target)
        tmp = None
        fsync_dir(folder)
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        log.error("no space left to store an upload in %s: %s", folder, exc)
        raise InsufficientStorage(
            "no space left on the service's storage for this upload; nothing was stored. Try again later, "
            "or ask the operator to free space on the artifacts volume"
        ) from exc
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return StoredUpload(target, size, digest.hexdigest(), summary)


def _remove_stale_temps(folder: Path) -> None:
    """Delete temporary files of uploads whose process was killed mid-write (older than STALE_TEMP_S)."""
    before = time.time() - STALE_TEMP_S
    for path in folder.glob(f"{TEMP_PREFIX}*"):
        try:
            if path.stat().st_mtime < before:
                path.unlink()
        except FileNotFoundError:  # another upload's cleanup got there first
            pass


def inspect_dataset(path: Path, tokenizer: Any | None = None) -> Any:
    """greencore's summary of a dataset (examples, format, labels, tokens); DatasetInvalid (400) naming the
    line and the field of the first bad line."""
    from greencore.data import DatasetError, validate_dataset

    try:
        return validate_dataset(path, tokenizer)
    except DatasetError as exc:
        raise DatasetInvalid(exc.message, exc.line, exc.field) from exc
