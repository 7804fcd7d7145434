"""Small operating-system helpers shared by the modules that open endpoints."""

from __future__ import annotations

import errno
import os

__all__ = ["open_direct"]


def open_direct(path: str, flags: int) -> int:
    """An O_DIRECT twin of PATH opened with FLAGS, or -1 where the filesystem refuses
    O_DIRECT (tmpfs and others): the core then uses the buffered fd alone."""
    try:
        return os.open(path, flags | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return -1
        raise
