"""A folder streamed as an uncompressed tar (POSIX ustar/pax), in constant memory, with its exact length known
up front (``Content-Length``). Safetensors do not compress, so tar without gzip costs nothing in size."""

from __future__ import annotations

import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

BLOCK = 512
CHUNK = 1 << 20
# Files of a checkpoint folder that only a resumed run needs (optimizer state, float32 master weights): left out
# of downloads and of a checkpoint's `bytes`.
RESUME_ONLY = ("training_state.pt", "master_weights.safetensors")  # greencore.checkpoint.STATE_FILE, MASTER_FILE


@dataclass
class TarPlan:
    entries: list[tuple[Path, bytes, int]]  # (file, header bytes, file size)
    length: int  # bytes of the whole archive

    def stream(self) -> Iterator[bytes]:
        """The archive's bytes, file by file."""
        for path, header, size in self.entries:
            yield header
            sent = 0
            with path.open("rb") as handle:
                while sent < size and (chunk := handle.read(min(CHUNK, size - sent))):
                    sent += len(chunk)
                    yield chunk
            if sent != size:
                raise OSError(f"{path} changed size while being sent")
            if size % BLOCK:
                yield b"\0" * (BLOCK - size % BLOCK)
        yield b"\0" * (2 * BLOCK)  # end of archive


def folder_bytes(folder: Path, exclude: Iterable[str] = RESUME_ONLY) -> int:
    """Bytes of the regular files under ``folder``, leaving out top-level names in ``exclude``."""
    skip = set(exclude)
    return sum(
        p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).parts[0] not in skip
    )


def plan_tar(folder: Path, root: str, exclude: Iterable[str] = ()) -> TarPlan:
    """Plan a tar of ``folder``'s regular files (recursively) under the top folder ``root``; names in
    ``exclude`` (top-level files or folders) are left out. Symlinks are followed (final/ holds hard links)."""
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
        entries.append((path, header, stat.st_size))
        length += len(header) + stat.st_size + (-stat.st_size % BLOCK)
    return TarPlan(entries, length)
