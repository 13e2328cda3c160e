"""A folder streamed as an uncompressed tar (POSIX ustar/pax), in constant memory, with its exact length known
up front (``Content-Length``). Safetensors do not compress, so tar without gzip costs nothing in size."""

from __future__ import annotations

import errno
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

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
            try:
                handle = entry.path.open("rb")
            except FileNotFoundError as exc:
                raise ArchiveChanged(
                    errno.ENOENT, "removed while the archive was being sent", str(entry.path)
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


def folder_bytes(folder: Path, exclude: Iterable[str] = RESUME_ONLY) -> int:
    """Bytes of the regular files under ``folder``, leaving out top-level names in ``exclude``."""
    skip = set(exclude)
    return sum(
        p.stat().st_size
        for p in folder.rglob("*")
        if p.is_file() and p.relative_to(folder).parts[0] not in skip
    )


def plan_tar(folder: Path, root: str, exclude: Iterable[str] = ()) -> TarPlan:
    """Plan a tar of ``folder``'s regular files (recursively) under the top folder ``root``; names in
    ``exclude`` (top-level files or folders) are left out. Symlinks are followed (final/ holds hard links).
    FileNotFoundError if ``folder`` (or a file in it) is gone."""
    if (
        not folder.is_dir()
    ):  # rglob of a missing folder finds nothing: that would plan an empty, valid archive
        raise FileNotFoundError(errno.ENOENT, "no such folder", str(folder))
    skip = set(exclude)
    entries = []
    length = 2 * BLOCK
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if relative.parts[0] in skip or not path.is_file():
            continue
        stat = path.stat()
        info = tarfile.TarInfo(f"{root}/{relative.as_posix()}")
        info.size = stat.st_size
        info.mtime = int(stat.st_mtime)
        info.mode = 0o644
        header = info.tobuf(format=tarfile.PAX_FORMAT)
        entries.append(TarEntry(path, header, stat.st_size, (stat.st_dev, stat.st_ino)))
        length += len(header) + stat.st_size + (-stat.st_size % BLOCK)
    return TarPlan(entries, length)
