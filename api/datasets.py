"""Uploaded datasets: stored atomically under the artifacts folder, validated line by line by greencore within
the GT_MAX_DATASET_* limits, on at most GT_DATASET_THREADS threads at once per process; what a crashed upload
left behind is swept (:func:`sweep_uploads`)."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread
from sqlalchemy import select

from api.config import Settings
from api.db import SessionFactory
from api.errors import DatasetInvalid, InsufficientStorage
from api.limits import upload_too_large
from api.tables import File
from greencore.durable import fsync_dir

if TYPE_CHECKING:
    from greencore.data import DatasetLimitExceeded, DatasetLimits

log = logging.getLogger(__name__)
T = TypeVar("T")

CHUNK = 1 << 20
TEMP_PREFIX = ".upload-"  # never a file id: ids are `file-...`, and no row ever names a temporary file
STALE_TEMP_S = 24 * 3600  # a temporary file this old was left by a killed process: removed by the next upload
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
UPLOADS = "files"  # under the artifacts folder: one folder per tenant, `files/<tenant id>/<file id>.jsonl`
# An upload in place this long with no row naming it was left by a process that died before its commit.
ORPHAN_GRACE_S = 3600.0
SWEEP_BATCH = 500  # paths looked up per query of the sweep
# greencore's name of each dataset limit -> the setting that raises it, and what the user can do.
LIMIT_SETTINGS = {
    "max_line_bytes": ("max_dataset_line_bytes", "shorten the example"),
    "max_examples": ("max_dataset_examples", "use fewer examples"),
    "max_tokens": ("max_dataset_tokens", "use fewer or shorter examples"),
}


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
        os.utime(tmp)  # sweep_uploads' grace counts from the rename, not from the copy before validation
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


def _remove_stale_temps(folder: Path) -> list[Path]:
    """Delete temporary files of uploads whose process was killed mid-write (older than STALE_TEMP_S); the
    paths deleted."""
    before = time.time() - STALE_TEMP_S
    removed = []
    for path in folder.glob(f"{TEMP_PREFIX}*"):
        try:
            if path.stat().st_mtime < before:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:  # another upload's cleanup got there first
            pass
    return removed


def sweep_uploads(
    sessions: SessionFactory, settings: Settings, grace_s: float = ORPHAN_GRACE_S
) -> list[Path]:
    """Delete what dead uploads left under ``ARTIFACTS_DIR/files``; the paths deleted.

    An upload is renamed into place (``store_upload``), then its row commits; a process killed between the two
    leaves a file no row names. That order is kept on purpose: a row is visible to list, download and job
    creation the moment it commits, so committing it first would show files whose bytes are not there yet,
    and a crash would leave rows to delete behind users' backs. This way a crash leaves only bytes no one can
    see, and this sweep deletes them: files that no live ``files`` row names and that were renamed into place
    more than ``grace_s`` seconds ago (younger ones may be uploads whose commit is still in flight), and
    temporary files of uploads killed mid-write, older than STALE_TEMP_S. Bytes a deletion failed to remove
    go too. Runs at the API's start and in every worker's recovery (``api.recovery.recover``).
    """
    root = settings.artifacts_dir / UPLOADS
    if not root.is_dir():
        return []
    before = time.time() - grace_s
    removed: list[Path] = []
    old: dict[str, Path] = {}  # the path a row would hold -> the file
    for folder in (Path(entry.path) for entry in os.scandir(root) if entry.is_dir(follow_symlinks=False)):
        removed += _remove_stale_temps(folder)
        for entry in os.scandir(folder):
            if entry.name.startswith(TEMP_PREFIX) or not entry.is_file(follow_symlinks=False):
                continue
            try:
                if entry.stat(follow_symlinks=False).st_mtime < before:
                    old[f"{UPLOADS}/{folder.name}/{entry.name}"] = Path(entry.path)
            except FileNotFoundError:  # deleted meanwhile
                pass
    # Looked up after the listing: a row committed meanwhile is seen.
    paths = list(old)
    named: set[str] = set()
    with sessions() as session:
        for i in range(0, len(paths), SWEEP_BATCH):
            live = File.path.in_(paths[i : i + SWEEP_BATCH]), File.deleted_at.is_(None)
            named.update(session.scalars(select(File.path).where(*live)))
    for relative, path in old.items():
        if relative in named:
            continue
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not delete %s, an upload no file row names: %s", path, exc)
            continue
        removed.append(path)
    if removed:
        log.warning(
            "deleted %d file(s) that dead uploads left: %s", len(removed), ", ".join(p.name for p in removed)
        )
    return removed


def dataset_limits(settings: Settings) -> DatasetLimits:
    """The GT_MAX_DATASET_* settings as greencore takes them."""
    from greencore.data import DatasetLimits

    return DatasetLimits(
        max_line_bytes=settings.max_dataset_line_bytes,
        max_examples=settings.max_dataset_examples,
        max_tokens=settings.max_dataset_tokens,
    )


def inspect_dataset(path: Path, limits: DatasetLimits, tokenizer: Any | None = None) -> Any:
    """greencore's summary of a dataset (examples, format, labels, tokens: counted only with ``tokenizer``);
    DatasetInvalid (400) naming the line and the field of the first bad line, or the line where one of
    ``limits`` (:func:`dataset_limits`) is crossed, naming its setting (nothing past that line is read)."""
    from greencore.data import DatasetError, DatasetLimitExceeded, validate_dataset

    try:
        return validate_dataset(path, tokenizer, limits)
    except DatasetLimitExceeded as exc:
        raise over_limit(exc) from exc
    except DatasetError as exc:
        raise DatasetInvalid(exc.message, exc.line, exc.field) from exc


def over_limit(exc: DatasetLimitExceeded) -> DatasetInvalid:
    """The 400 of a dataset over a limit: the line, the limit and the setting that raises it (also as a field
    of the error, ``max_dataset_line_bytes``: 1048576)."""
    setting, advice = LIMIT_SETTINGS[exc.limit]
    error = DatasetInvalid(
        f"{exc.message} (GT_{setting.upper()}={exc.value}): {advice}, or ask the operator to raise the limit",
        exc.line,
        exc.field,
    )
    error.details[setting] = exc.value
    return error


# Validating or tokenizing a dataset holds it in memory and a CPU for seconds to minutes: uploads, estimates
# and job creation share one limiter, so that a process holds at most GT_DATASET_THREADS datasets at once
# whichever route brought them, and the other requests keep the GIL's turns to themselves.
@cache
def dataset_limiter(threads: int) -> anyio.CapacityLimiter:
    """The process's limiter of dataset work for GT_DATASET_THREADS=``threads`` (one value per deployment)."""
    return anyio.CapacityLimiter(threads)


async def on_dataset_thread(settings: Settings, work: Callable[..., T], *args: Any) -> T:
    """``work(*args)``, which reads a whole dataset, on a thread once one of GT_DATASET_THREADS is free."""
    return await anyio.to_thread.run_sync(work, *args, limiter=dataset_limiter(settings.dataset_threads))


@contextmanager
def dataset_slot(settings: Settings) -> Iterator[None]:
    """One of GT_DATASET_THREADS held for the block by a thread that anyio started (a handler's work on a DB
    thread, as job creation's), which waits for one to be free; raises NoEventLoopError on another thread."""
    limiter = dataset_limiter(settings.dataset_threads)
    borrower = object()
    anyio.from_thread.run(limiter.acquire_on_behalf_of, borrower)
    try:
        yield
    finally:
        anyio.from_thread.run_sync(limiter.release_on_behalf_of, borrower)
