"""Durable writes: what a rename or a new file needs to survive a crash of the machine."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some network filesystems cannot sync a folder; the rename is still atomic there
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)
