"""A folder streamed as an uncompressed tar (POSIX ustar/pax), in constant memory, with its exact length known
up front (``Content-Length``). Safetensors do not compress, so tar without gzip costs nothing in size."""

from __future__ import annotations

import errno
import logging
import os
import stat as stat_mode
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

BLOCK = 512
CHUNK = 1 << 20
# Files of a checkpoint folder that only a resumed run needs (optimizer state, float32 master weights): left
# out of downloads and of a checkpoint's `bytes`.
RESUME_ONLY = (
    "training_state.pt",
    "master_weights.safetensors",
)  # greencore.checkpoint.STATE_FILE, MASTER_FILE


class ArchiveChanged(OSError):
    """A file of a planned archive vanished or changed before it was sent in full. Raised mid-stream, after
    the headers promised ``Content-Length``: the connection is cut short, so the client sees a failed
    download, never a shorter archive that looks complete."""


@dataclass(frozen=True)
class TarEntry:
    path: Path
    header: bytes  # the tar header block(s)
    size: int  # bytes of the file
    identity: tuple[int, int]  # (st_dev, st_ino) when planned: a file replaced since is refused


@dataclass
class TarPlan:
    entries: list[TarEntry]
    length: int  # bytes of the whole archive

    def stream(self) -> Iterator[bytes]:
        """The archive's bytes, file by file; ArchiveChanged if a file is no longer the one planned."""
        for entry in self.entries:
            try:  # O_NOFOLLOW: a file replaced by a symlink since it was planned is not opened through it
                handle = os.fdopen(os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW), "rb")
            except FileNotFoundError as exc:
                raise ArchiveChanged(
                    errno.ENOENT, "removed while the archive was being sent", str(entry.path)
                ) from exc
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                raise ArchiveChanged(
                    errno.ESTALE,
                    "replaced by a symbolic link while the archive was being sent",
                    str(entry.path),
                ) from exc
            with handle:
                stat = os.fstat(handle.fileno())
                if (stat.st_dev, stat.st_ino) != entry.identity or stat.st_size != entry.size:
                    raise ArchiveChanged(
                        errno.ESTALE, "replaced while the archive was being sent", str(entry.path)
                    )
                yield entry.header
                sent = 0
                while sent < entry.size and (chunk := handle.read(min(CHUNK, entry.size - sent))):
                    sent += len(chunk)
                    yield chunk
            if sent != entry.size:
                raise ArchiveChanged(
                    errno.EIO, f"shrank to {sent} of {entry.size} bytes while being sent", str(entry.path)
                )
            if entry.size % BLOCK:
                yield b"\0" * (BLOCK - entry.size % BLOCK)
        yield b"\0" * (2 * BLOCK)  # end of archive


def regular_files(folder: Path, exclude: Iterable[str] = ()) -> Iterator[tuple[Path, os.stat_result]]:
    """The regular files under ``folder`` (recursively) and their ``lstat``, sorted by path, leaving out
    top-level names in ``exclude``. Symbolic links are never followed, to a file or to a folder: they are left
    out (with a warning in the log), and so is anything else that is not a regular file (fifos, sockets).
    Hard links are regular files (``final/`` holds hard links to the last epoch's files)."""
    skip = set(exclude)

    def walk(current: Path, depth: int) -> Iterator[tuple[Path, os.stat_result]]:
        try:
            names = sorted(os.listdir(current))
        except (FileNotFoundError, NotADirectoryError):  # gone (or not a folder): nothing in it to count
            return
        for name in names:
            if depth == 0 and name in skip:
                continue
            path = current / name
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat_mode.S_ISLNK(info.st_mode):
                log.warning("%s is a symbolic link: left out, not followed", path)
            elif stat_mode.S_ISDIR(info.st_mode):
                yield from walk(path, depth + 1)
            elif stat_mode.S_ISREG(info.st_mode):
                yield path, info

    yield from walk(folder, 0)


def folder_bytes(folder: Path, exclude: Iterable[str] = RESUME_ONLY) -> int:
    """Bytes of the regular files under ``folder``, leaving out top-level names in ``exclude`` and symbolic
    links (as ``plan_tar`` does)."""
    return sum(info.st_size for _, info in regular_files(folder, exclude))


def plan_tar(folder: Path, root: str, exclude: Iterable[str] = ()) -> TarPlan:
    """Plan a tar of ``folder``'s regular files (recursively) under the top folder ``root``; names in
    ``exclude`` (top-level files or folders) are left out.

    Symbolic links are never followed: a link inside ``folder`` (to a file or to a folder, wherever it
    points) is left out of the archive with a warning in the log, and its target is never read; a ``folder``
    that is itself a link is refused as FileNotFoundError. Hard links are archived as the files they are
    (``final/`` holds hard links). FileNotFoundError if ``folder`` (or a file in it) is gone."""
    try:
        top = os.lstat(folder)
    except FileNotFoundError as exc:  # planning nothing would give an empty, valid archive
        raise FileNotFoundError(errno.ENOENT, "no such folder", str(folder)) from exc
    if stat_mode.S_ISLNK(top.st_mode):
        log.warning("%s is a symbolic link: not archived, not followed", folder)
        raise FileNotFoundError(errno.ENOENT, "a symbolic link, not a folder: not followed", str(folder))
    if not stat_mode.S_ISDIR(top.st_mode):
        raise FileNotFoundError(errno.ENOENT, "no such folder", str(folder))
    entries = []
    length = 2 * BLOCK
    for path, stat in regular_files(folder, exclude):
        relative = path.relative_to(folder)
        info = tarfile.TarInfo(f"{root}/{relative.as_posix()}")
        info.size = stat.st_size
        info.mtime = int(stat.st_mtime)
        info.mode = 0o644
        header = info.tobuf(format=tarfile.PAX_FORMAT)
        entries.append(TarEntry(path, header, stat.st_size, (stat.st_dev, stat.st_ino)))
        length += len(header) + stat.st_size + (-stat.st_size % BLOCK)
    return TarPlan(entries, length)
