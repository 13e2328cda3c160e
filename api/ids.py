"""Public object ids: a prefix and a time-ordered random part, so that ids sort in creation order."""

from __future__ import annotations

import re
import secrets
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case


def _base32(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        value, digit = divmod(value, 32)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))


def new_id(prefix: str) -> str:
    """``prefix-`` + 10 chars of milliseconds since 1970 + 16 random chars (80 bits): ``job-01jq...``."""
    return f"{prefix}-{_base32(time.time_ns() // 1_000_000, 10)}{_base32(secrets.randbits(80), 16)}"


ID_PATTERN = rf"^[a-z]+-[{_ALPHABET}]{{26}}$"  # what new_id makes
_ID = re.compile(ID_PATTERN)


def is_id(value: str) -> bool:
    """Whether ``value`` has the shape of an id :func:`new_id` makes. Anything else (a path trick, a NUL byte,
    a very long string) names no object: callers answer it as not found without asking the database."""
    return len(value) <= 40 and _ID.fullmatch(value) is not None
