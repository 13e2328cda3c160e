"""A training run's exception as the job's ``error: {code, message}``."""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How libraries that do their own I/O report it: the C library's text (in C++ and Rust messages too) and
# Rust's io::Error suffix, e.g. safetensors' "I/O error: No space left on device (os error 28)".
DISK_FULL_TEXT = re.compile(
    rf"no space left on device|disk quota exceeded|\(os error ({errno.ENOSPC}|{errno.EDQUOT})\)",
    re.IGNORECASE,
)
CPU_OOM_TEXT = re.compile(r"DefaultCPUAllocator: (can't allocate memory|not enough memory)")


def error_of(
    exc: BaseException, *, artifacts_dir: Path | None = None, models_dir: Path | None = None
) -> tuple[str, str]:
    """(code, message) for an exception raised by greencore.train or around it.

    A full disk is found anywhere in the exception's chain (``__cause__``, ``__context__``): torch and
    safetensors wrap ENOSPC in their own exception types.

    Given the settings' ``artifacts_dir`` and ``models_dir``, the message is the one stored for the user,
    without the server's paths (``hide_paths``), and the full message goes to this module's log; without
    them, it is the full message.
    """
    code, message = _error_of(exc)
    if artifacts_dir is None and models_dir is None:
        return code, message
    public = hide_paths(message, artifacts_dir=artifacts_dir, models_dir=models_dir)
    if public != message:
        log.warning("job error %s, shown to the user without server paths; in full: %s", code, message)
    return code, public


# A path's characters, as they appear in messages: not blanks, quotes, brackets or the separators that
# messages put after a path ("...: [Errno 28]", "..., ...").
_PATH_CHAR = r"[^\s'\"`:,;()\[\]{}<>|=]"
# An absolute path, or a URL (kept as it is: "https://host/a/b" names no file of this machine).
_ABSOLUTE = re.compile(
    rf"(?P<url>\b(?!file:)[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"`<>]*)|(?<!{_PATH_CHAR})/{_PATH_CHAR}*"
)


def hide_paths(message: str, *, artifacts_dir: Path | None = None, models_dir: Path | None = None) -> str:
    """``message`` without absolute paths: one under ``artifacts_dir`` becomes its path relative to it
    (``jobs/<id>/attempt-1/epoch-1``), one under ``models_dir`` the model it names (``model <id>``, then the
    rest of its path), and any other absolute path its last component. The user sees what went wrong, not
    where the operator keeps files."""
    roots: list[tuple[str, str]] = []  # (root as written in messages, "artifacts" | "models")
    for root, kind in ((artifacts_dir, "artifacts"), (models_dir, "models")):
        if root is None:
            continue
        for spelling in {os.fspath(root), os.path.realpath(root)}:
            spelling = spelling.rstrip("/")
            if spelling:
                roots.append((spelling, kind))
    roots.sort(key=lambda r: len(r[0]), reverse=True)  # a root inside the other one is matched first
    for spelling, kind in roots:
        under = re.compile(
            rf"(?<!{_PATH_CHAR}){re.escape(spelling)}(?P<rest>/{_PATH_CHAR}*)?(?!{_PATH_CHAR})"
        )
        message = under.sub(lambda m, kind=kind: _relative(m.group("rest") or "", kind), message)
    return _ABSOLUTE.sub(lambda m: m.group() if m.group("url") else _last_component(m.group()), message)


def _relative(rest: str, kind: str) -> str:
    """What stands for ``<root>/<rest>`` in a user's message."""
    rest, dots = _split_dots(rest.strip("/"))
    rest = rest.strip("/")
    if kind == "models":
        return (f"model {rest}" if rest else "the models folder") + dots
    return (rest or "the artifacts folder") + dots


def _last_component(path: str) -> str:
    path, dots = _split_dots(path)
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return (name or "/") + dots


def _split_dots(path: str) -> tuple[str, str]:
    """A path and the periods that end the sentence after it ("... in /a/b." -> "/a/b", ".")."""
    stripped = path.rstrip(".")
    if not stripped.rstrip("/"):  # "/.." or "..": a path of dots, not a sentence's end
        return path, ""
    return stripped, path[len(stripped) :]


def _error_of(exc: BaseException) -> tuple[str, str]:
    """``error_of``'s (code, message), with the paths in it."""
    import torch

    from greencore.checkpoint import CheckpointError
    from greencore.data import DatasetError
    from greencore.memory import InsufficientMemory
    from greencore.methods import MethodError
    from greencore.models import ModelFolderError
    from greencore.select import BudgetTooSmall
    from greencore.spec import SpecError
    from greencore.train import LossNotFinite
    from worker.ranks import RankError

    if isinstance(exc, RankError):  # named by the rank it ended (worker/ranks.py)
        return exc.code, exc.message
    codes: list[tuple[type[BaseException], str]] = [
        (DatasetError, "invalid_dataset"),
        (ModelFolderError, "invalid_model"),
        (SpecError, "invalid_hyperparameters"),
        (BudgetTooSmall, "budget_too_small"),
        (MethodError, "method_error"),
        (CheckpointError, "invalid_checkpoint"),
        (InsufficientMemory, "insufficient_memory"),
        (torch.OutOfMemoryError, "out_of_memory"),
        (LossNotFinite, "loss_not_finite"),
    ]
    for cls, code in codes:
        if isinstance(exc, cls):
            return code, str(exc)
    full = disk_full_message(exc)
    if full is not None:
        return "disk_full", full
    if any(CPU_OOM_TEXT.search(str(e)) for e in causes(exc)):  # torch's CPU allocator raises a RuntimeError
        return "out_of_memory", f"out of host memory: {exc}; use a smaller batch_size or max_seq_len"
    return "training_error", f"{type(exc).__name__}: {exc}"


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception in its chain (``__cause__`` and ``__context__``), outermost first, once
    each."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)


def disk_full_message(exc: BaseException) -> str | None:
    """A message saying that no space was left and where (the checkpoint folder, or the file), when ``exc``'s
    chain holds an ENOSPC or EDQUOT (as an OSError, or in a library's message); else None."""
    from greencore.checkpoint import CheckpointWriteError

    chain = list(causes(exc))
    full = next((e for e in chain if _is_disk_full(e)), None)
    if full is None:
        return None
    where = next((f"checkpoint {e.folder}" for e in chain if isinstance(e, CheckpointWriteError)), None)
    where = where or next((str(e.filename) for e in chain if isinstance(e, OSError) and e.filename), None)
    where = where or "the job's output folder"
    what = (
        "disk quota exceeded" if isinstance(full, OSError) and full.errno == errno.EDQUOT else "no space left"
    )
    return (
        f"{what} on the device while writing {where}: free space on that volume, then submit the job again "
        f"({full})"
    )


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in DISK_FULL_ERRNOS
    return DISK_FULL_TEXT.search(str(exc)) is not None
